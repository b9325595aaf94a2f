"""Where a study stands, read from MLflow alone: one row per trial with its state, progress and ETA.

It reads what the driver's tracking callback writes and nothing else, so ``sweetspot status``
works from another terminal (or another machine, given the tracking URI) while ``sweetspot run``
is writing, and it never creates a store, an experiment or a run.

States, from the trial's MLflow run (found by trial hash, the newest one wins):
``new`` (no run), ``done`` (FINISHED), ``failed`` (FAILED), ``running`` (RUNNING) and ``partial``
(KILLED: interrupted; the next ``run`` resumes it from its checkpoint). A RUNNING run whose driver
died is still shown as running: MLflow cannot tell, and the next ``run`` marks it KILLED.

ETA, in seconds:
- a trial's seconds per epoch are the mean over its logged epochs: the time between its first and
  last logged epoch divided by the epochs in between (the timestamps of the ``epochs_total``
  metric, one point per epoch); with a single epoch logged, the time from the run's start to it,
  which includes Ray starting the trial. A pause between two epochs (Ctrl-C, then ``run`` again)
  counts in the mean.
- a running or partial trial: its seconds per epoch × its epochs left. Until it logs an epoch, and
  for a new trial, it is estimated at the seconds per epoch of its configuration's other seeds, else
  the mean over the study's trials that logged one.
- the study: the sum over the trials still to train (running, partial, new; not failed ones:
  ``run`` skips them) divided by the trials that run at once (``resources.max_concurrent_trials``,
  else the number running now, at least 1), and never less than the longest of them.
- None when unknown (nothing of the study has logged an epoch yet).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from orchestrator.expand import Trial
from orchestrator.redact import redact
from orchestrator.spec import StudySpec
from orchestrator.tags import TAG_ERROR, TAG_HASH, TAG_KIND

# Logged by the trainer at every epoch (step = epoch): the epoch count and one timestamp per epoch.
EPOCHS_METRIC = "epochs_total"

NEW, DONE, RUNNING, PARTIAL, FAILED = "new", "done", "running", "partial", "failed"
STATES = (DONE, RUNNING, PARTIAL, FAILED, NEW)  # the summary's order
_STATE_OF_STATUS = {
    "FINISHED": DONE, "FAILED": FAILED, "RUNNING": RUNNING, "SCHEDULED": RUNNING, "KILLED": PARTIAL,
}  # fmt: skip


class Store(Protocol):
    """What status reads: a :class:`~orchestrator.tracking.StudyStore` or :class:`ReadStore`."""

    client: MlflowClient
    experiment_id: str


@dataclass(frozen=True)
class ReadStore:
    """A study's MLflow experiment, opened for reading only."""

    client: MlflowClient
    experiment_id: str


def open_store(spec: StudySpec, tracking_uri: str | None = None) -> ReadStore | None:
    """The study's experiment, or None when the study never ran.

    Unlike ``StudyStore.open`` this creates nothing: a sqlite file that does not exist is not
    touched (MLflow would create it, with its schema), and a missing experiment is not created.
    """
    uri = tracking_uri or spec.tracking_uri
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return None
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(spec.experiment_name)
    return None if experiment is None else ReadStore(client, experiment.experiment_id)


@dataclass(frozen=True)
class TrialStatus:
    """One trial's row.

    Attributes:
        hash: the short trial hash (as in tables).
        epoch: the last epoch logged (0 before the first one).
        epochs_total: the trial's epochs, as logged, else from its config.
        metrics: the last logged value of each of the study's table metrics (None if not logged).
        elapsed_s: wall-clock since the run was created: to its end, or to now while running.
        seconds_per_epoch: the trial's own mean (see the module docstring); None before an epoch.
        eta_s: training time left of a running or partial trial; None for the others.
        error: last line of a failed trial's ``sweetspot.error`` tag.
    """

    name: str
    seed: int
    hash: str
    state: str
    epoch: int
    epochs_total: int
    metrics: dict[str, float | None]
    elapsed_s: float | None = None
    seconds_per_epoch: float | None = None
    eta_s: float | None = None
    error: str | None = None
    run_id: str | None = None

    def row(self) -> dict[str, Any]:
        """A JSON-able record (what ``status --format json`` prints per trial)."""
        return asdict(self)


@dataclass(frozen=True)
class StudyStatus:
    """Every trial's row, in study order, and the study's totals.

    Attributes:
        elapsed_s: from the first trial's start to now while a trial runs, else to the last end;
            pauses between two ``run`` commands count.
        eta_s: training time left for the whole study (see the module docstring).
        at_once: the number of trials the ETA assumes run at the same time.
    """

    study: str
    trials: list[TrialStatus]
    elapsed_s: float | None
    eta_s: float | None
    at_once: int
    metrics: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {state: sum(t.state == state for t in self.trials) for state in STATES}

    @property
    def settled(self) -> bool:
        """Every trial is done or failed: nothing will change until someone runs the study again."""
        return all(t.state in (DONE, FAILED) for t in self.trials)

    def summary(self) -> str:
        counts = ", ".join(f"{n} {state}" for state, n in self.counts().items())
        return f"{counts}; elapsed {format_duration(self.elapsed_s)}; ETA {format_duration(self.eta_s)}"

    def to_json(self) -> dict[str, Any]:
        return {
            "study": self.study,
            "counts": self.counts(),
            "elapsed_s": self.elapsed_s,
            "eta_s": self.eta_s,
            "at_once": self.at_once,
            "trials": [t.row() for t in self.trials],
        }


def status_metrics(spec: StudySpec) -> list[str]:
    """``val_top1``, then the study's table metrics."""
    return ["val_top1"] + [m for m in spec.table.metrics if m != "val_top1"]


class StatusReader:
    """Reads a study's status, again and again under ``--watch``.

    A FINISHED run never changes, so its epoch history is read once and kept.
    """

    def __init__(self, spec: StudySpec, trials: list[Trial], store: Store) -> None:
        self.spec = spec
        self.trials = trials
        self.store = store
        self.metrics = status_metrics(spec)
        self._finished_epochs: dict[str, dict[int, tuple[int, float]]] = {}

    def read(self, now: float | None = None) -> StudyStatus:
        """The study's status at ``now`` (seconds since the epoch; default: the clock)."""
        now = time.time() if now is None else now
        runs = latest_runs(self.store)
        rows = [self._row(trial, runs.get(trial.hash), now) for trial in self.trials]
        eta, at_once = study_eta(rows, self.spec.resources.max_concurrent_trials)
        elapsed = _study_elapsed(runs, self.trials, now)
        return StudyStatus(self.spec.name, rows, elapsed, eta, at_once, self.metrics)

    def _row(self, trial: Trial, run: Run | None, now: float) -> TrialStatus:
        total = trial.config.recipe.epochs
        if run is None:
            return TrialStatus(
                trial.name, trial.seed, trial.short_hash, NEW, 0, total, dict.fromkeys(self.metrics)
            )
        state = _STATE_OF_STATUS.get(run.info.status, RUNNING)
        epochs = self._epochs(run)
        last = max(epochs, default=0)
        if last:
            total = int(epochs[last][1])
        rate = seconds_per_epoch({epoch: ms for epoch, (ms, _) in epochs.items()}, run.info.start_time)
        end_ms = run.info.end_time if state != RUNNING and run.info.end_time else now * 1000
        error = run.data.tags.get(TAG_ERROR) if state == FAILED else None
        return TrialStatus(
            name=trial.name,
            seed=trial.seed,
            hash=trial.short_hash,
            state=state,
            epoch=last,
            epochs_total=total,
            metrics={metric: run.data.metrics.get(metric) for metric in self.metrics},
            elapsed_s=max(end_ms - run.info.start_time, 0) / 1000 if run.info.start_time else None,
            seconds_per_epoch=rate,
            eta_s=rate * max(total - last, 0) if rate is not None and state in (RUNNING, PARTIAL) else None,
            error=last_line(error) if error else None,
            run_id=run.info.run_id,
        )

    def _epochs(self, run: Run) -> dict[int, tuple[int, float]]:
        """Epoch → (timestamp in ms, epochs_total) of each logged epoch."""
        run_id = run.info.run_id
        if run_id in self._finished_epochs:
            return self._finished_epochs[run_id]
        epochs: dict[int, tuple[int, float]] = {}
        for point in self.store.client.get_metric_history(run_id, EPOCHS_METRIC):
            epochs.setdefault(int(point.step), (int(point.timestamp), float(point.value)))
        if run.info.status == "FINISHED":
            self._finished_epochs[run_id] = epochs
        return epochs


def trial_states(trials: list[Trial], store: Store | None) -> dict[str, str]:
    """Trial hash → state, from the run statuses only (no metric reads): what ``plan`` shows."""
    runs = latest_runs(store) if store is not None else {}
    return {
        trial.hash: _STATE_OF_STATUS.get(runs[trial.hash].info.status, RUNNING) if trial.hash in runs else NEW
        for trial in trials
    }


def latest_runs(store: Store) -> dict[str, Run]:
    """Trial hash → its newest trial run in the study's experiment."""
    latest: dict[str, Run] = {}
    token = None
    while True:
        page = store.client.search_runs(
            [store.experiment_id],
            filter_string=f"tags.`{TAG_KIND}` = 'trial'",
            max_results=1000,
            order_by=["attributes.start_time DESC"],
            page_token=token,
        )
        for run in page:
            trial_hash = run.data.tags.get(TAG_HASH)
            if trial_hash:
                latest.setdefault(trial_hash, run)
        token = page.token
        if not token:
            return latest


def seconds_per_epoch(epoch_ms: dict[int, int], start_ms: int | None) -> float | None:
    """Mean seconds per logged epoch: first to last logged epoch over the epochs in between, or,
    with one epoch logged, the run's start to it. None before any epoch."""
    if not epoch_ms:
        return None
    first, last = min(epoch_ms), max(epoch_ms)
    if last > first:
        return max(epoch_ms[last] - epoch_ms[first], 0) / 1000 / (last - first)
    if start_ms is None:
        return None
    return max(epoch_ms[last] - start_ms, 0) / 1000 / last if last > 0 else None


def study_eta(rows: list[TrialStatus], max_concurrent: int | None) -> tuple[float | None, int]:
    """Seconds of training left for the study, and the trials at once it assumes (module docstring)."""
    known = [row for row in rows if row.seconds_per_epoch is not None]
    by_name: dict[str, list[float]] = {}
    for row in known:
        by_name.setdefault(row.name, []).append(row.seconds_per_epoch)
    study_rate = _mean([row.seconds_per_epoch for row in known])
    left: list[float | None] = []
    for row in rows:
        if row.state in (DONE, FAILED):
            continue
        if row.eta_s is not None:
            left.append(row.eta_s)
            continue
        rate = _mean(by_name.get(row.name, []))
        rate = study_rate if rate is None else rate
        left.append(rate * max(row.epochs_total - row.epoch, 0) if rate is not None else None)
    at_once = max(max_concurrent or sum(row.state == RUNNING for row in rows), 1)
    if not left:
        return 0.0, at_once
    if any(seconds is None for seconds in left):
        return None, at_once
    return max(sum(left) / at_once, max(left)), at_once


def _study_elapsed(runs: dict[str, Run], trials: list[Trial], now: float) -> float | None:
    ours = [runs[t.hash] for t in trials if t.hash in runs and runs[t.hash].info.start_time]
    if not ours:
        return None
    start = min(run.info.start_time for run in ours) / 1000
    if any(run.info.status in ("RUNNING", "SCHEDULED") for run in ours):
        return max(now - start, 0.0)
    end = max((run.info.end_time or run.info.start_time) for run in ours) / 1000
    return max(end - start, 0.0)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def last_line(error: str) -> str:
    """The exception line of a traceback: what a person needs to see first (credentials redacted)."""
    line = next((line.strip() for line in reversed(error.strip().splitlines()) if line.strip()), error)
    return redact(line)


def format_duration(seconds: float | None) -> str:
    """``45s``, ``3m 20s``, ``2h 05m``, ``1d 3h``; ``–`` when unknown."""
    if seconds is None:
        return "–"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"
