"""A study's MLflow runs → pandas DataFrames: one row per trial, then one row per configuration.

:func:`collect` reads the runs (one row per trial, in study order); trials of the study that have
no run yet appear with status ``NOT RUN``: a table never silently drops a configuration.
:func:`aggregate` folds the seeds of each configuration into mean, sample std and count of the
FINISHED ones, with a status summary that says what the others are doing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import pandas as pd

from orchestrator.expand import Trial
from orchestrator.spec import FINAL_METRICS
from orchestrator.tags import TAG_HASH, TAG_STOPPED_EARLY

if TYPE_CHECKING:
    from mlflow.entities import Run

    from orchestrator.tracking import StudyStore

NOT_RUN = "NOT RUN"
FINISHED = "FINISHED"
# MLflow run statuses as a status summary words them, in the summary's order.
_STATUS_WORDS = {
    FINISHED: "finished",
    "RUNNING": "running",
    "SCHEDULED": "running",
    "KILLED": "killed",
    "FAILED": "failed",
    NOT_RUN: "not run",
}
# A metric whose name contains one of these is better lower; any other, higher.
LOWER_IS_BETTER = ("loss", "error", "dropped", "_cv", "time")
# Columns that describe a configuration (the same for each of its seeds), besides its axes.
DESCRIPTIVE = ("name", "backbone", "dense", "params_total_m", "params_active_m", "gflops")
# Per-trial columns that are neither metrics nor axes.
_NOT_METRICS = {*DESCRIPTIVE, "seed", "hash", "status", "stopped_early", "epoch"}


def collect(trials: list[Trial], store: StudyStore, metrics: list[str]) -> pd.DataFrame:
    """Columns: name, seed, hash, status, stopped_early, epoch, backbone, dense, params_total_m, params_active_m,
    gflops, then ``metrics`` (their last logged value), then the metrics every trial logs after
    training where some run has them (``inference_images_per_s``, ``ood_<set>_top1`` …), then one
    ``axis.<axis>`` column per axis (its values as the trials have them: ``None`` for the MoE axes
    of a dense baseline)."""
    latest: dict[str | None, Run] = {}
    for run in store.runs():  # newest first: keep the newest run per hash
        latest.setdefault(run.data.tags.get(TAG_HASH), run)
    logged = [m for m in _final_metrics(trials, latest.values()) if m not in metrics]
    rows = []
    for trial in trials:
        run = latest.get(trial.hash)
        values = run.data.metrics if run else {}
        row = {
            "name": trial.name,
            "seed": trial.seed,
            "hash": trial.short_hash,
            "status": run.info.status if run else NOT_RUN,
            # FINISHED before its last epoch by the study's scheduler or stop rule: its numbers
            # are not those of a full run, and the table says so.
            "stopped_early": bool(run) and run.data.tags.get(TAG_STOPPED_EARLY) == "true",
            "epoch": _epoch(store, run.info.run_id) if run else 0,
            "backbone": trial.config.model.backbone,
            "dense": trial.config.model.is_dense,
            "params_total_m": values.get("params_total", math.nan) / 1e6,
            "params_active_m": values.get("params_active", math.nan) / 1e6,
            "gflops": values.get("gflops", math.nan),
            **{metric: values.get(metric, math.nan) for metric in [*metrics, *logged]},
        }
        rows.append(row)
    frame = pd.DataFrame(rows)
    for axis in trials[0].axes if trials else []:
        # object dtype keeps the trials' own values: 4 stays 4 (not 4.0), a dense trial's None stays None.
        frame[f"axis.{axis}"] = pd.Series([trial.axes[axis] for trial in trials], dtype=object)
    return frame


def metric_columns(per_trial: pd.DataFrame) -> list[str]:
    """The metric columns of a :func:`collect` frame, in its order."""
    return [c for c in per_trial.columns if c not in _NOT_METRICS and not c.startswith("axis.")]


def aggregate(per_trial: pd.DataFrame, metrics: list[str] | None = None) -> pd.DataFrame:
    """One row per configuration (trials sharing a name), in study order.

    Columns: the configuration's own (name, backbone, dense, params, GFLOPs, ``axis.*``: those of
    its first trial), ``status`` (its seeds' statuses, see :func:`status_summary`), ``seeds`` (its
    trials), ``n`` (its FINISHED trials), ``epoch`` (the furthest any seed got), and for each metric
    ``<m>_mean`` and ``<m>_std`` (sample std, NaN when fewer than two values) over the FINISHED
    seeds that logged it. A metric the frame lacks is all NaN.

    Args:
        per_trial: a :func:`collect` frame.
        metrics: the metrics to aggregate; default: every metric column of ``per_trial``.
    """
    metrics = metric_columns(per_trial) if metrics is None else metrics
    rows = [_configuration(trials, metrics) for _, trials in per_trial.groupby("name", sort=False)]
    frame = pd.DataFrame(rows)
    for column in [c for c in frame.columns if c.startswith("axis.")]:
        frame[column] = pd.Series([row[column] for row in rows], dtype=object)  # as in collect: 4, not 4.0
    return frame


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of ``metric`` is the better one (losses, errors, dropped tokens);
    what tables make bold and figures call optimal."""
    return any(word in metric for word in LOWER_IS_BETTER)


def status_summary(statuses: Iterable[str]) -> str:
    """``FINISHED`` when every seed is; else ``1/2 finished, 1 failed``; a lone status as it is."""
    statuses = list(statuses)
    if len(set(statuses)) == 1:
        return statuses[0]
    counts: dict[str, int] = {}
    for status in statuses:
        word = _STATUS_WORDS.get(status, status.lower())
        counts[word] = counts.get(word, 0) + 1
    finished = f"{counts.pop('finished', 0)}/{len(statuses)} finished"
    order = list(dict.fromkeys(_STATUS_WORDS.values()))
    others = sorted(counts, key=lambda word: order.index(word) if word in order else len(order))
    return ", ".join([finished, *(f"{counts[word]} {word}" for word in others)])


def dense_baselines(configurations: pd.DataFrame) -> list[str | None]:
    """For each configuration of an :func:`aggregate` frame, the name of its dense baseline.

    The baseline is a dense configuration of the same backbone; among several, the one that shares
    most axis values with it (then the first in study order). None for a dense configuration
    and where its backbone has no dense one.
    """
    dense = _is_dense(configurations)
    backbones = _backbones(configurations)
    axes = [c for c in configurations.columns if c.startswith("axis.") and c != "axis.placement"]
    candidates = [i for i in range(len(configurations)) if dense[i]]
    baselines: list[str | None] = []
    for i in range(len(configurations)):
        same = [j for j in candidates if backbones[j] == backbones[i]]
        if dense[i] or not same:
            baselines.append(None)
            continue
        row = configurations.iloc[i]
        shared = [sum(_same(row[a], configurations.iloc[j][a]) for a in axes) for j in same]
        baselines.append(configurations.iloc[same[shared.index(max(shared))]]["name"])
    return baselines


def with_deltas(configurations: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """An :func:`aggregate` frame plus ``<m>_delta``: each mean minus its dense baseline's
    (see :func:`dense_baselines`); NaN where there is none."""
    means = configurations.set_index("name")
    baselines = dense_baselines(configurations)
    frame = configurations.copy()
    for metric in metrics:
        own = configurations[f"{metric}_mean"].to_numpy(dtype=float)
        base = [means.at[b, f"{metric}_mean"] if b is not None else math.nan for b in baselines]
        frame[f"{metric}_delta"] = own - pd.Series(base, dtype=float).to_numpy()
    return frame


def missing(value: Any) -> bool:
    """No value: None or NaN (an MoE axis of a dense baseline, a metric never logged)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _configuration(trials: pd.DataFrame, metrics: list[str]) -> dict[str, Any]:
    finished = trials[trials["status"] == FINISHED]
    row: dict[str, Any] = {
        column: _first(trials[column])
        for column in trials.columns
        if column in DESCRIPTIVE or column.startswith("axis.")
    }
    stopped = int(trials["stopped_early"].sum()) if "stopped_early" in trials else 0
    row |= {
        "status": status_summary(trials["status"]) + (f", {stopped} stopped early" if stopped else ""),
        "seeds": len(trials),
        "n": len(finished),
        "epoch": int(trials["epoch"].max()) if "epoch" in trials else 0,
    }
    for metric in metrics:
        values = finished[metric].dropna().astype(float) if metric in finished else pd.Series(dtype=float)
        row[f"{metric}_mean"] = values.mean() if len(values) else math.nan
        row[f"{metric}_std"] = values.std(ddof=1) if len(values) > 1 else math.nan
    return row


def _first(values: pd.Series) -> Any:
    """The first value that is there: accounting is logged when a run starts, so any seed has it."""
    present = [v for v in values if not missing(v)]
    return present[0] if present else values.iloc[0]


def _is_dense(configurations: pd.DataFrame) -> list[bool]:
    if "dense" in configurations:
        return [bool(d) for d in configurations["dense"]]
    placement = configurations.get("axis.placement", pd.Series([None] * len(configurations)))
    return [p == "none" for p in placement]


def _backbones(configurations: pd.DataFrame) -> list[Any]:
    for column in ("backbone", "axis.backbone"):
        if column in configurations:
            return list(configurations[column])
    return [None] * len(configurations)  # one backbone: the study never varied it


def _same(a: Any, b: Any) -> bool:
    return (missing(a) and missing(b)) or (not missing(a) and not missing(b) and a == b)


def _final_metrics(trials: list[Trial], runs: Iterable[Run]) -> list[str]:
    """Metrics logged after training by some run: throughput first, then the OOD sets in the order
    the trials list them."""
    logged = {key for run in runs for key in run.data.metrics if FINAL_METRICS.fullmatch(key)}
    sets = list(dict.fromkeys(ood.metric_name for trial in trials for ood in trial.config.data.ood))

    def order(key: str) -> tuple[int, int, str]:
        if key == "inference_images_per_s":
            return (0, 0, key)
        # The longest set name that prefixes the key: sets "r" and "r_sub" both prefix "ood_r_sub_top1".
        name = max((s for s in sets if key.startswith(f"ood_{s}_")), key=len, default=None)
        return (1, sets.index(name) if name is not None else len(sets), key)

    return sorted(logged, key=order)


def _epoch(store: StudyStore, run_id: str) -> int:
    history = store.client.get_metric_history(run_id, "val_top1")
    return max((point.step for point in history), default=0)
