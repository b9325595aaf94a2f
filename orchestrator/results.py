"""A study's MLflow runs → one pandas DataFrame, one row per trial, in study order.

Trials of the study that have no run yet appear with status ``NOT RUN``: a table
never silently drops a configuration.
"""

from __future__ import annotations

import pandas as pd

from orchestrator.expand import Trial
from orchestrator.tracking import TAG_HASH, StudyStore

NOT_RUN = "NOT RUN"


def collect(trials: list[Trial], store: StudyStore, metrics: list[str]) -> pd.DataFrame:
    """Columns: name, seed, hash, status, epoch, params_total_m, params_active_m, gflops, then ``metrics``
    (their last logged value), then one column per axis."""
    latest = {}
    for run in store.runs():  # newest first: keep the newest run per hash
        latest.setdefault(run.data.tags.get(TAG_HASH), run)
    rows = []
    for trial in trials:
        run = latest.get(trial.hash)
        values = run.data.metrics if run else {}
        row = {
            "name": trial.name,
            "seed": trial.seed,
            "hash": trial.short_hash,
            "status": run.info.status if run else NOT_RUN,
            "epoch": _epoch(store, run.info.run_id) if run else 0,
            "params_total_m": values.get("params_total", float("nan")) / 1e6,
            "params_active_m": values.get("params_active", float("nan")) / 1e6,
            "gflops": values.get("gflops", float("nan")),
            **{metric: values.get(metric, float("nan")) for metric in metrics},
            **{f"axis.{axis}": value for axis, value in trial.axes.items()},
        }
        rows.append(row)
    return pd.DataFrame(rows)


def _epoch(store: StudyStore, run_id: str) -> int:
    history = store.client.get_metric_history(run_id, "val_top1")
    return max((point.step for point in history), default=0)
