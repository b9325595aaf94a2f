"""Render a study's results DataFrame as a paper-style table (Markdown or CSV)."""

from __future__ import annotations

import math

import pandas as pd

# Column headings as the paper writes them.
HEADINGS = {
    "name": "Architecture",
    "seed": "Seed",
    "status": "Status",
    "epoch": "Epochs",
    "params_total_m": "#Params (M)",
    "params_active_m": "Active #Params (M)",
    "gflops": "GFLOPs",
    "val_top1": "Top-1 (%)",
    "val_top5": "Top-5 (%)",
    "val_loss": "Val loss",
    "train_loss": "Train loss",
    "images_per_s": "Images/s",
    "inference_images_per_s": "Inference im/s",
    "dropped_fraction": "Dropped tokens",
    "expert_load_cv": "Expert load CV",
}


def table_frame(results: pd.DataFrame, metrics: list[str], show_seed: bool) -> pd.DataFrame:
    """The displayed columns, renamed, numbers formatted."""
    fixed = ["params_total_m", "params_active_m", "gflops"]
    columns = ["name", *(["seed"] if show_seed else []), *fixed, *metrics, "status"]
    shown = results[columns].copy()
    for column in fixed:
        digits = 3 if column == "gflops" else 2
        shown[column] = shown[column].map(lambda v, digits=digits: _number(v, digits))
    for metric in metrics:
        digits = 0 if metric.endswith("images_per_s") else 2
        shown[metric] = shown[metric].map(lambda v, digits=digits: _number(v, digits))
    return shown.rename(columns={c: HEADINGS.get(c, c) for c in columns})


def to_markdown(results: pd.DataFrame, metrics: list[str]) -> str:
    shown = table_frame(results, metrics, show_seed=results["seed"].nunique() > 1)
    text_columns = {HEADINGS["name"], HEADINGS["status"]}
    align = ["left" if column in text_columns else "right" for column in shown.columns]
    return shown.to_markdown(index=False, disable_numparse=True, colalign=align)


def to_csv(results: pd.DataFrame) -> str:
    return results.to_csv(index=False)


def _number(value: float, digits: int) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"
