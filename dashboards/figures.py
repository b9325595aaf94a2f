"""Paper-style figures of a study (Videau et al. 2025, Figures 2, 3, 7, 8 and 9), as PNG and SVG.

Two kinds of input, two kinds of figure:

- the per-trial results DataFrame of :func:`orchestrator.results.collect`: the Pareto front of a
  metric against active parameters per sample (Fig. 2) and the experts × ``mlp_ratio`` heatmap
  against the dense baseline (Fig. 3). Only FINISHED trials count; a configuration's seeds are
  averaged here (:func:`average_seeds`), so a table and a figure of the same study agree.
- one trial's routing analysis (``routing.npz``, :mod:`trainer.analysis`): expert occurrences per
  class and expert similarity (Fig. 9), experts per image, the CDF of patches per expert (Fig. 8)
  and the average spatial map of each expert (Fig. 7).

Every ``*_figure`` function takes data and an output folder, writes ``<stem>.png`` and
``<stem>.svg`` there and returns the written paths; it returns ``[]`` when the data has nothing
to draw (no finished trial, a study without the two axes, a dense trial), so a caller can run
all of them on any study. :func:`write_study_figures` runs them all.

Figures are built on :class:`matplotlib.figure.Figure` directly, never through ``pyplot``: no
global figure state, no GUI backend (PNG is rendered by Agg), safe in a headless driver.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from dashboards.tables import HEADINGS
from orchestrator.results import FINISHED, aggregate, lower_is_better
from trainer.analysis import LayerRouting, RoutingAnalysis, load_routing

if TYPE_CHECKING:
    from orchestrator.expand import Trial
    from orchestrator.tracking import StudyStore

DPI = 150
FORMATS = ("png", "svg")
# trainer.loop.ROUTING_FILE, not imported from there: trainer.loop pulls in the whole training stack.
ROUTING_FILE = "routing.npz"
EXPERTS, MLP_RATIO, PLACEMENT = "axis.experts", "axis.mlp_ratio", "axis.placement"
# collect's per-trial columns from the trial config; the backbone also as an axis where the study varies it.
BACKBONE, BACKBONE_AXIS = "backbone", "axis.backbone"
# Above this many points, name labels on the Pareto plot would hide the points they label.
_MAX_LABELLED_POINTS = 12
# Experts at most this many get a legend entry / an annotated similarity cell; more would be unreadable.
_MAX_EXPERT_LEGEND = 10
_MAX_ANNOTATED_EXPERTS = 8
_SPATIAL_COLUMNS = 8
_MLFLOW_PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


# ---- Results: finished trials, seeds averaged -------------------------------------------------------------


def average_seeds(results: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per configuration with a FINISHED trial, in study order: the table's aggregation
    (:func:`orchestrator.results.aggregate`), so a table and a figure of a study agree.

    Columns: ``name``; ``metric`` (the mean over the finished seeds), ``<metric>_std`` (NaN below
    two seeds), ``seeds`` (finished seeds); and the configuration's ``dense``, ``backbone``,
    ``params_total_m``, ``params_active_m``, ``gflops`` and ``axis.*`` columns. A configuration
    with no finished trial has no row: its numbers are not known yet.

    Raises:
        ValueError: ``results`` lacks ``metric`` or a column of ``collect``'s frame.
    """
    _require_columns(results, ["name", "status", "dense", "params_total_m", "params_active_m", "gflops", metric])
    configs = aggregate(results, [metric])
    configs = configs[configs["n"] > 0].drop(columns="seeds").reset_index(drop=True)
    return configs.rename(columns={f"{metric}_mean": metric, "n": "seeds"})


def pareto_front(
    cost: Sequence[float] | np.ndarray, score: Sequence[float] | np.ndarray, maximize: bool = True
) -> np.ndarray:
    """Boolean mask of the Pareto-optimal points: no other point costs less or the same and
    scores better or the same, and strictly better in one of the two.

    Points with a NaN cost or score are never optimal (they cannot be compared). Identical
    points are optimal together (neither dominates the other).

    Args:
        cost: e.g. active parameters per sample (less is better).
        score: e.g. top-1 accuracy.
        maximize: whether a larger score is better (False for a loss).
    """
    cost = np.asarray(cost, dtype=np.float64)
    signed = np.asarray(score, dtype=np.float64) * (1.0 if maximize else -1.0)
    if cost.shape != signed.shape or cost.ndim != 1:
        raise ValueError(f"cost and score must be 1-D of one length, but got {cost.shape} and {signed.shape}")
    optimal = np.zeros(cost.shape, dtype=bool)
    best, best_cost = -math.inf, math.nan
    # Cheapest first, best score first among equal costs: a point is optimal iff it beats every cheaper one.
    for index in np.lexsort((-signed, cost)):
        if not (math.isfinite(cost[index]) and math.isfinite(signed[index])):
            continue
        if signed[index] > best or (signed[index] == best and cost[index] == best_cost):
            optimal[index] = True
            best, best_cost = signed[index], cost[index]
    return optimal


# ---- Figure 2: the Pareto front -----------------------------------------------------------------------------


def pareto_figure(results: pd.DataFrame, out_dir: Path, metric: str = "val_top1") -> list[Path]:
    """``pareto``: ``metric`` against active parameters per sample, one point per configuration.

    Seeds are averaged (error bars: their standard deviation where there are two or more); dense
    configurations are squares, MoE ones circles, colours tell backbones apart when the study
    varies them; the Pareto-optimal points have a black edge and are joined by a dashed line.
    Nothing is written when no configuration has a finished trial with ``metric``.
    """
    configs = average_seeds(results, metric)
    configs = configs[configs[metric].notna() & configs["params_active_m"].notna()].reset_index(drop=True)
    if configs.empty:
        return []
    maximize = not lower_is_better(metric)
    optimal = pareto_front(configs["params_active_m"], configs[metric], maximize=maximize)
    backbones = _backbones(configs)
    colours = {name: mpl.colormaps["tab10"](i % 10) for i, name in enumerate(dict.fromkeys(backbones))}
    figure = Figure(figsize=(6.4, 4.6), layout="constrained")
    ax = figure.add_subplot()
    for i, row in enumerate(configs.to_dict("records")):
        ax.errorbar(
            row["params_active_m"], row[metric], yerr=_error(row[f"{metric}_std"]),
            marker="s" if row["dense"] else "o", markersize=7, color=colours[backbones[i]], capsize=3,
            markeredgecolor="black" if optimal[i] else "none", linestyle="none", zorder=3,
        )  # fmt: skip
        if len(configs) <= _MAX_LABELLED_POINTS:
            ax.annotate(row["name"], (row["params_active_m"], row[metric]), xytext=(4, 4),
                        textcoords="offset points", fontsize=6)  # fmt: skip
    front = configs[optimal].sort_values("params_active_m")
    ax.plot(front["params_active_m"], front[metric], linestyle="--", color="black", linewidth=1, zorder=2)
    _log_scale_when_wide(ax, configs["params_active_m"])
    ax.set_xlabel(f"{_heading('params_active_m')} per sample")
    ax.set_ylabel(_heading(metric))
    ax.set_title(f"Pareto front ({'higher' if maximize else 'lower'} is better)")
    ax.grid(alpha=0.3)
    ax.legend(handles=_pareto_legend(colours), fontsize=7, loc="best")
    return _save(figure, out_dir, "pareto")


def _backbones(configs: pd.DataFrame) -> list[str]:
    """Each configuration's backbone ("" for all when the frame does not say)."""
    column = next((c for c in (BACKBONE, BACKBONE_AXIS) if c in configs), None)
    if column is None:
        return [""] * len(configs)
    return ["" if _missing(value) else str(value) for value in configs[column]]


def _pareto_legend(colours: dict[str, Any]) -> list[Line2D]:
    def marker(shape: str, label: str, colour: Any = "grey", edge: Any = "none") -> Line2D:
        return Line2D([], [], marker=shape, color=colour, markeredgecolor=edge, linestyle="none", label=label)

    handles = [marker("o", "MoE"), marker("s", "dense")]
    if len(colours) > 1:  # one backbone needs no colour key
        handles += [marker("o", name, colour) for name, colour in colours.items()]
    handles.append(marker("o", "Pareto-optimal", "white", "black"))
    handles.append(Line2D([], [], linestyle="--", color="black", label="Pareto front"))
    return handles


def _error(std: float) -> float | None:
    return None if _missing(std) else float(std)


def _log_scale_when_wide(ax: Axes, values: pd.Series) -> None:
    """Log x when the parameters span more than a decade (a linear axis would crowd the small models)."""
    positive = values[values > 0]
    if len(positive) and positive.max() / positive.min() > 10:
        ax.set_xscale("log")


# ---- Figure 3: experts × mlp_ratio against the dense baseline ---------------------------------------------


@dataclass(frozen=True)
class HeatmapPanel:
    """One experts × mlp_ratio grid: MoE configurations that agree on every other axis.

    Attributes:
        title: the other axes that vary across the study's panels (empty when there is one panel).
        grid: mean metric, index = experts, columns = mlp_ratio (NaN where no finished trial).
        baseline: the mean metric of the matching dense configuration(s), None without one.
    """

    title: str
    grid: pd.DataFrame
    baseline: float | None


def heatmap_panels(results: pd.DataFrame, metric: str = "val_top1") -> list[HeatmapPanel]:
    """The experts × mlp_ratio panels of a study; ``[]`` when it does not vary those two axes.

    MoE configurations are split by every other axis (backbone, placement, router, ...), so a
    cell never averages over a third axis. A panel's dense baseline is the dense configuration
    that agrees with it on every axis a dense model has (the MoE axes of a dense trial are
    empty); when several agree, their mean. A panel of one cell compares nothing and is left out.
    """
    if EXPERTS not in results or MLP_RATIO not in results:
        return []
    configs = average_seeds(results, metric)
    configs = configs[configs[metric].notna()]
    moe = configs[~configs["dense"] & configs[EXPERTS].notna() & configs[MLP_RATIO].notna()]
    others = [column for column in _axis_columns(configs) if column not in (EXPERTS, MLP_RATIO)]
    groups: dict[tuple[Hashable, ...], list[Any]] = {}  # other axes' values → rows, in study order
    for index, row in moe.iterrows():
        groups.setdefault(tuple(_hashable(row[column]) for column in others), []).append(index)
    varying = [column for i, column in enumerate(others) if len({key[i] for key in groups}) > 1]
    panels = []
    for key, rows in groups.items():
        members = moe.loc[rows]
        grid = members.pivot_table(index=EXPERTS, columns=MLP_RATIO, values=metric, aggfunc="mean")
        if grid.size < 2:
            continue
        values = dict(zip(others, key, strict=True))
        if BACKBONE in members:  # the dense baseline is of the same backbone, an axis or not
            values[BACKBONE] = members[BACKBONE].iloc[0]
        title = ", ".join(f"{c.removeprefix('axis.')}={_tick(values[c])}" for c in varying)
        panels.append(
            HeatmapPanel(title, grid.sort_index().sort_index(axis=1), _baseline(configs, values, metric))
        )
    return panels


def experts_mlp_ratio_figure(results: pd.DataFrame, out_dir: Path, metric: str = "val_top1") -> list[Path]:
    """``experts_mlp_ratio``: the mean ``metric`` of each MoE configuration by experts (rows) and
    mlp_ratio (columns), one panel per :func:`heatmap_panels` panel.

    With a dense baseline, colours diverge around it (blue better, red worse), each cell also
    shows its difference to it, and the colour bar marks it with a black line (the paper's
    dotted baseline). Nothing is written for a study without both axes.
    """
    panels = heatmap_panels(results, metric)
    if not panels:
        return []
    columns = min(len(panels), 3)
    rows = math.ceil(len(panels) / columns)
    width = max(max(panel.grid.shape[1] for panel in panels) * 1.1 + 2.2, 5.0)
    height = max(max(panel.grid.shape[0] for panel in panels) * 0.75 + 1.6, 3.0)
    figure = Figure(figsize=(width * columns, height * rows), layout="constrained")
    maximize = not lower_is_better(metric)
    for ax, panel in zip(_grid_axes(figure, rows, columns, len(panels)), panels, strict=True):
        _draw_heatmap(figure, ax, panel, maximize)
    note = "cells: mean, Δ vs dense" if any(panel.baseline is not None for panel in panels) else "cells: mean"
    _suptitle(figure, f"{_heading(metric)} by experts × mlp_ratio", note)
    return _save(figure, out_dir, "experts_mlp_ratio")


def _draw_heatmap(figure: Figure, ax: Axes, panel: HeatmapPanel, maximize: bool) -> None:
    values = panel.grid.to_numpy(dtype=np.float64)
    cmap, norm = _heatmap_scale(values, panel.baseline, maximize)
    image = ax.imshow(values, cmap=cmap, norm=norm, aspect="auto")
    for (row, column), value in np.ndenumerate(values):
        ax.text(column, row, _cell_text(value, panel.baseline), ha="center", va="center", fontsize=8,
                color=_text_colour(cmap, norm, value))  # fmt: skip
    ax.set_xticks(range(values.shape[1]), [_tick(v) for v in panel.grid.columns])
    ax.set_yticks(range(values.shape[0]), [_tick(v) for v in panel.grid.index])
    ax.set_xlabel("mlp_ratio")
    ax.set_ylabel("experts")
    baseline = "" if panel.baseline is None else f"dense {panel.baseline:.2f}"
    ax.set_title("\n".join(part for part in (panel.title, baseline) if part), fontsize=9)
    colourbar = figure.colorbar(image, ax=ax)
    if panel.baseline is not None:
        colourbar.add_lines([panel.baseline], colors=["black"], linewidths=[2])
        colourbar.set_label("black line: dense", fontsize=8)


def _heatmap_scale(values: np.ndarray, baseline: float | None, maximize: bool) -> tuple[Colormap, Normalize]:
    """A diverging scale centred on the baseline (so its colour means "as good as dense"), else viridis."""
    finite = values[np.isfinite(values)]
    if baseline is None:
        low, high = float(finite.min()), float(finite.max())
        cmap = mpl.colormaps["viridis"].with_extremes(bad="lightgrey")
        return cmap, Normalize(low, high if high > low else low + 1)
    half = float(np.abs(finite - baseline).max()) or 1.0
    cmap = mpl.colormaps["RdBu" if maximize else "RdBu_r"].with_extremes(bad="lightgrey")
    return cmap, Normalize(baseline - half, baseline + half)


def _cell_text(value: float, baseline: float | None) -> str:
    if not math.isfinite(value):
        return "–"
    return f"{value:.2f}" if baseline is None else f"{value:.2f}\n{value - baseline:+.2f}"


def _text_colour(cmap: Colormap, norm: Normalize, value: float) -> str:
    """Black on light cells, white on dark ones (relative luminance of the cell's colour)."""
    if not math.isfinite(value):
        return "black"
    red, green, blue, _ = cmap(norm(value))
    return "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"


def _baseline(configs: pd.DataFrame, values: dict[str, Any], metric: str) -> float | None:
    """Mean metric of the dense configurations that agree with an MoE panel on its backbone and
    every axis they have."""
    dense = configs[configs["dense"]]

    def matches(row: pd.Series) -> bool:
        return all(
            _missing(row[column]) or _missing(value) or _hashable(row[column]) == _hashable(value)
            for column, value in values.items()
            if column != PLACEMENT  # a dense model's placement is "none" by definition
        )

    matching = dense[dense.apply(matches, axis=1)] if len(dense) else dense
    return None if matching.empty else float(matching[metric].mean())


# ---- Routing analysis (Figures 7, 8, 9) ---------------------------------------------------------------------


def class_experts_figure(analysis: RoutingAnalysis, out_dir: Path, title: str = "") -> list[Path]:
    """``class_experts`` (Fig. 9, top): per MoE layer, each class's share of tokens per top expert.

    Shares, not raw counts, so that classes with more validation images do not look more
    specialised; a class absent from the validation set is left blank.
    """
    if not analysis.layers:
        return []
    classes = max(layer.class_counts.shape[0] for layer in analysis.layers)
    # Wider for ImageNet's 1000 classes; not taller than a page however many experts there are.
    panel = (4.4 if classes <= 100 else 7.0, min(0.25 * _experts(analysis) + 1.6, 5.0))
    figure, axes = _layer_panels(analysis, columns=3 if classes <= 100 else 2, panel=panel)
    for ax, layer in zip(axes, analysis.layers, strict=True):
        counts = layer.class_counts.astype(np.float64)
        totals = counts.sum(axis=1, keepdims=True)
        share = np.divide(counts, totals, out=np.full_like(counts, np.nan), where=totals > 0)
        image = ax.imshow(share.T, aspect="auto", interpolation="nearest", vmin=0,
                          cmap=mpl.colormaps["viridis"].with_extremes(bad="white"))  # fmt: skip
        ax.set_xlabel("class")
        ax.set_ylabel("expert")
        _integer_ticks(ax)
        ax.set_title(layer.name, fontsize=9)
        figure.colorbar(image, ax=ax, label="share of the class's tokens")
    _suptitle(figure, "Top-expert occurrence per class", title)
    return _save(figure, out_dir, "class_experts")


def expert_similarity_figure(analysis: RoutingAnalysis, out_dir: Path, title: str = "") -> list[Path]:
    """``expert_similarity`` (Fig. 9, bottom): per MoE layer, the paper's Jaccard-like similarity
    of experts over images (1 on the diagonal; 0 for experts never top together)."""
    if not analysis.layers:
        return []
    size = 0.3 * _experts(analysis) + 2.2
    figure, axes = _layer_panels(analysis, columns=4, panel=(size + 0.6, size))
    for ax, layer in zip(axes, analysis.layers, strict=True):
        image = ax.imshow(layer.similarity, vmin=0, vmax=1, cmap="magma", interpolation="nearest")
        if layer.experts <= _MAX_ANNOTATED_EXPERTS:
            norm, cmap = Normalize(0, 1), mpl.colormaps["magma"]
            for (row, column), value in np.ndenumerate(layer.similarity):
                ax.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=6,
                        color=_text_colour(cmap, norm, value))  # fmt: skip
        ax.set_xlabel("expert")
        ax.set_ylabel("expert")
        _integer_ticks(ax)
        ax.set_title(layer.name, fontsize=9)
        figure.colorbar(image, ax=ax, shrink=0.8)
    _suptitle(figure, "Expert similarity", title)
    return _save(figure, out_dir, "expert_similarity")


def experts_per_image_figure(analysis: RoutingAnalysis, out_dir: Path, title: str = "") -> list[Path]:
    """``experts_per_image``: per MoE layer, the mean number of distinct top experts per image,
    stacked by expert.

    Expert e's segment is the share of images in which it is the top expert of at least one
    token; the segments add up to the layer's ``experts_per_image`` exactly, so one bar shows
    both how many experts an image uses and which ones. The dashed line is the layer's E.
    """
    if not analysis.layers:
        return []
    figure = Figure(figsize=(max(4.0, 1.0 * len(analysis.layers) + 2.5), 4.0), layout="constrained")
    ax = figure.add_subplot()
    palette = _expert_palette(_experts(analysis))
    for position, layer in enumerate(analysis.layers):
        active = layer.patch_histogram[:, 1:].sum(axis=1) / analysis.images
        bottoms = np.concatenate([[0.0], np.cumsum(active)[:-1]])
        ax.bar(position, active, bottom=bottoms, color=[palette(e) for e in range(layer.experts)], width=0.6,
               edgecolor="white", linewidth=0.5)  # fmt: skip
        ax.hlines(layer.experts, position - 0.4, position + 0.4, colors="black", linestyles="--")
    ax.set_xticks(
        range(len(analysis.layers)),
        [f"{layer.name}\n{layer.experts_per_image:.2f} of {layer.experts}" for layer in analysis.layers],
    )
    ax.set_ylim(0, max(layer.experts for layer in analysis.layers) * 1.1)
    ax.set_xlabel("MoE layer (input → output)")
    ax.set_ylabel("distinct top experts per image (mean)")
    _expert_legend(figure, palette, _experts(analysis))
    _suptitle(figure, f"Experts per image ({analysis.images} images)", title)
    return _save(figure, out_dir, "experts_per_image")


def patch_cdf_figure(analysis: RoutingAnalysis, out_dir: Path, title: str = "") -> list[Path]:
    """``patch_cdf`` (Fig. 8): per MoE layer and expert, the CDF of the patches it is top expert of
    per image, over the images where it is top expert of at least one (never-used experts: no line)."""
    if not analysis.layers:
        return []
    figure, axes = _layer_panels(analysis, columns=3, panel=(4.0, 3.2))
    palette = _expert_palette(_experts(analysis))
    for ax, layer in zip(axes, analysis.layers, strict=True):
        cdf = layer.patch_cdf()
        patches = np.arange(1, cdf.shape[1] + 1)
        for expert, curve in enumerate(cdf):
            if np.isfinite(curve).all():
                ax.step(patches, curve, where="post", color=palette(expert), linewidth=1.2, label=str(expert))
        ax.set_xlim(1, cdf.shape[1])
        ax.set_ylim(0, 1.02)
        ax.set_xlabel(f"patches per image (of {cdf.shape[1]})")
        ax.set_ylabel("fraction of images where active")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(layer.name, fontsize=9)
        ax.grid(alpha=0.3)
    _expert_legend(figure, palette, _experts(analysis))
    _suptitle(figure, "CDF of patches per expert", title)
    return _save(figure, out_dir, "patch_cdf")


def spatial_map_figures(analysis: RoutingAnalysis, out_dir: Path, title: str = "") -> list[Path]:
    """``spatial_map_<layer>`` (Fig. 7), one figure per MoE layer: for each expert, the share of
    images whose token at each position goes to it, on one colour scale per layer (so experts
    compare), up to eight experts a row."""
    paths: list[Path] = []
    for layer in analysis.layers:
        paths += _spatial_map_figure(layer, out_dir, title)
    return paths


def _spatial_map_figure(layer: LayerRouting, out_dir: Path, title: str) -> list[Path]:
    columns = min(layer.experts, _SPATIAL_COLUMNS)
    rows = math.ceil(layer.experts / columns)
    height, width = layer.grid
    cell = 1.4
    figure = Figure(figsize=(columns * cell + 1.0, rows * cell * height / width + 0.9), layout="constrained")
    axes = _grid_axes(figure, rows, columns, layer.experts)
    top = float(layer.spatial_map.max()) or 1.0
    for expert, ax in enumerate(axes):
        image = ax.imshow(
            layer.spatial_map[expert], vmin=0, vmax=top, cmap="viridis", interpolation="nearest"
        )
        ax.set_title(f"expert {expert}", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    figure.colorbar(image, ax=axes, label="share of images", shrink=0.9)
    _suptitle(figure, f"Average spatial map, {layer.name}", title)
    return _save(figure, out_dir, f"spatial_map_{layer.name}")


def routing_figures(analysis: RoutingAnalysis, out_dir: Path, title: str = "") -> list[Path]:
    """Every routing figure of one trial's analysis into ``out_dir``; ``[]`` for a dense trial."""
    return [
        *class_experts_figure(analysis, out_dir, title),
        *expert_similarity_figure(analysis, out_dir, title),
        *experts_per_image_figure(analysis, out_dir, title),
        *patch_cdf_figure(analysis, out_dir, title),
        *spatial_map_figures(analysis, out_dir, title),
    ]


def _experts(analysis: RoutingAnalysis) -> int:
    return max(layer.experts for layer in analysis.layers)


def _expert_palette(experts: int) -> Colormap:
    """Distinct colours for few experts (tab10/tab20), a continuous map beyond twenty."""
    if experts <= 10:
        return mpl.colormaps["tab10"]
    if experts <= 20:
        return mpl.colormaps["tab20"]
    return mpl.colormaps["turbo"].resampled(experts)


def _expert_legend(figure: Figure, palette: Colormap, experts: int) -> None:
    """A colour key right of the panels, where it hides no data; none beyond ten experts (the
    colours would no longer be told apart by name anyway)."""
    if experts > _MAX_EXPERT_LEGEND:
        return
    handles = [Line2D([], [], color=palette(e), linewidth=4, label=f"expert {e}") for e in range(experts)]
    figure.legend(handles=handles, fontsize=7, loc="outside right upper")


def _layer_panels(
    analysis: RoutingAnalysis, columns: int, panel: tuple[float, float]
) -> tuple[Figure, list[Axes]]:
    """A figure with one panel per MoE layer, input to output, left to right then down."""
    count = len(analysis.layers)
    columns = min(count, columns)
    rows = math.ceil(count / columns)
    figure = Figure(figsize=(panel[0] * columns, panel[1] * rows + 0.4), layout="constrained")
    return figure, _grid_axes(figure, rows, columns, count)


# ---- The whole study ----------------------------------------------------------------------------------------


def write_study_figures(
    results: pd.DataFrame, routing: dict[str, Path], out_dir: Path, metric: str = "val_top1"
) -> list[Path]:
    """Every figure of a study: ``pareto`` and ``experts_mlp_ratio`` in ``out_dir``, and each
    trial's routing figures in ``out_dir/routing/<label>/``.

    Args:
        results: :func:`orchestrator.results.collect`'s per-trial frame (only FINISHED trials count).
        routing: trial label (the short hash, as :func:`fetch_routing` returns) → its ``routing.npz``;
            a label that is a short hash of ``results`` is titled with the trial's name and seed.
        out_dir: created if missing; existing files of the same names are overwritten.
        metric: the results column to plot.

    Returns:
        The written files, PNG and SVG of each figure; figures with nothing to draw are left out.
    """
    paths = [*pareto_figure(results, out_dir, metric), *experts_mlp_ratio_figure(results, out_dir, metric)]
    titles = {row.hash: f"{row.name}, seed {row.seed}" for row in results.itertuples(index=False)}
    for label, path in routing.items():
        paths += routing_figures(
            load_routing(path), out_dir / "routing" / _slug(label), titles.get(label, label)
        )
    return paths


def fetch_routing(
    store: StudyStore, trials: Iterable[Trial], folder: Path, all_seeds: bool = False
) -> dict[str, Path]:
    """Download FINISHED MoE trials' ``routing.npz`` from their MLflow runs into
    ``folder/<short hash>/``, for :func:`write_study_figures`.

    By default one trial per configuration (its first seed, in study order, that has the file):
    the seeds of a configuration route alike, and six figures per trial add up in a large study.
    Dense trials have no routing; a finished run without the file (trained before the analysis
    existed) is skipped rather than failing the other figures.

    Args:
        store: the study's MLflow experiment.
        trials: the study's trials (:func:`orchestrator.expand.expand`).
        folder: where to download; created if missing.
        all_seeds: every seed of each configuration, not only the first.

    Returns:
        Short trial hash → local path, in the order of ``trials``.
    """
    runs = store.trial_runs()
    fetched: dict[str, Path] = {}
    configurations: set[str] = set()
    with _no_progress_bars():
        for trial in trials:
            run = runs.get(trial.hash)
            if trial.config.model.is_dense or run is None or run.status != FINISHED:
                continue
            if trial.name in configurations and not all_seeds:
                continue
            if ROUTING_FILE not in {artifact.path for artifact in store.client.list_artifacts(run.run_id)}:
                continue
            destination = folder / trial.short_hash
            destination.mkdir(parents=True, exist_ok=True)
            local = store.client.download_artifacts(run.run_id, ROUTING_FILE, str(destination))
            fetched[trial.short_hash] = Path(local)
            configurations.add(trial.name)
    return fetched


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """MLflow draws a progress bar per download: dozens of them for one small file each."""
    previous = os.environ.get(_MLFLOW_PROGRESS_BAR)
    os.environ[_MLFLOW_PROGRESS_BAR] = "false"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[_MLFLOW_PROGRESS_BAR]
        else:
            os.environ[_MLFLOW_PROGRESS_BAR] = previous


# ---- Shared helpers -----------------------------------------------------------------------------------------


def _save(figure: Figure, out_dir: Path, stem: str) -> list[Path]:
    """Write ``stem.png`` and ``stem.svg``; SVG without a date or random ids, so reruns are identical.

    The stem may hold a layer name read from a routing file: made a plain file name (:func:`_slug`),
    so the files land in ``out_dir`` whatever it says."""
    stem = _slug(stem)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    with mpl.rc_context({"svg.hashsalt": stem}):
        for extension in FORMATS:
            path = out_dir / f"{stem}.{extension}"
            metadata = {"Date": None} if extension == "svg" else {}
            figure.savefig(path, dpi=DPI, metadata=metadata)
            paths.append(path)
    return paths


def _grid_axes(figure: Figure, rows: int, columns: int, count: int) -> list[Axes]:
    """``count`` axes on a rows × columns grid; the unused cells of the last row are removed."""
    axes = list(figure.subplots(rows, columns, squeeze=False).ravel())
    for ax in axes[count:]:
        ax.remove()
    return axes[:count]


def _axis_columns(frame: pd.DataFrame) -> list[str]:
    return [column for column in frame.columns if column.startswith("axis.")]


def _require_columns(frame: pd.DataFrame, columns: list[str]) -> None:
    missing = [column for column in columns if column not in frame]
    if missing:
        raise ValueError(f"results have no column(s) {missing}; columns: {list(frame.columns)}")


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _hashable(value: Any) -> Hashable:
    """Axis values as comparable keys: lists (explicit placements) become tuples, NaN becomes None."""
    if isinstance(value, list | tuple | np.ndarray):
        return tuple(_hashable(v) for v in value)
    return None if _missing(value) else value


def _tick(value: Any) -> str:
    """mlp_ratio 2.0 → "2" (and an integer axis that a frame with empty dense rows made float)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _heading(metric: str) -> str:
    return HEADINGS.get(metric, metric)


def _suptitle(figure: Figure, what: str, detail: str) -> None:
    """The figure's title with its detail (a trial name can be long) on a second line, wrapped to
    the figure's width rather than cut off by it."""
    figure.suptitle(f"{what}\n{detail}" if detail else what, fontsize=10, wrap=True)


def _integer_ticks(ax: Axes) -> None:
    """Experts and classes are indices: no 0.5 ticks."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _slug(label: str) -> str:
    """A file or folder name from a label (names have spaces and commas): never a path, never
    ``.``, ``..`` or hidden, so what is written under a folder stays in it."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._-") or "trial"
