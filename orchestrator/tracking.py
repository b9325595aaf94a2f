"""MLflow, written by one process only: the driver.

The study is a parent run; every trial is a child run found again by its trial
hash. :class:`StudyStore` owns the MLflow calls; :class:`MLflowTracking` is the
Ray Tune callback that feeds it from trial events (workers never talk to MLflow,
which keeps sqlite safe and the tracking server out of the training hot path).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, Run
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.result import AUTO_RESULT_KEYS

from orchestrator.expand import Trial
from orchestrator.spec import SchedulerSpec, StopSpec, StudySpec
from orchestrator.tags import (
    TAG_AXIS,
    TAG_ERROR,
    TAG_HASH,
    TAG_KIND,
    TAG_NAME,
    TAG_PARENT,
    TAG_SEED,
    TAG_STOP_REASON,
    TAG_STOP_WARNING,
    TAG_STOPPED_EARLY,
    TAG_STUDY,
)
from trainer.config import flatten
from trainer.data import input_spec
from trainer.loop import ROUTING_FILE
from trainer.models.accounting import model_cost

# Files a worker leaves next to its last checkpoint that belong in the trial's MLflow artifacts.
CHECKPOINT_ARTIFACTS = (ROUTING_FILE,)
# Text a worker reports about how it ran (not a metric): result key → run tag.
RESULT_TAGS = {"moe_backend": "sweetspot.moe_backend"}

# Tune's bookkeeping keys in a result; everything else numeric came from the worker.
_NOT_METRICS = set(AUTO_RESULT_KEYS) | {"done", "trial_id", "experiment_tag", "checkpoint_path", "epoch"}
_MLFLOW_TAG_LIMIT = 5000

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrialRun:
    run_id: str
    status: str
    trial_hash: str


class StudyStore:
    """The MLflow experiment of one study."""

    def __init__(self, client: MlflowClient, experiment_id: str, study: str) -> None:
        self.client = client
        self.experiment_id = experiment_id
        self.study = study

    @classmethod
    def open(cls, spec: StudySpec, tracking_uri: str | None = None, create: bool = True) -> StudyStore:
        """Connect (creating the experiment and, for sqlite, the schema) before any trial starts."""
        uri = tracking_uri or spec.tracking_uri
        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(spec.experiment_name)
        if experiment is None:
            if not create:
                raise LookupError(f"no MLflow experiment {spec.experiment_name!r} at {uri}: run the study first")
            artifacts = (spec.output_dir / "artifacts").as_uri() if uri.startswith("sqlite:") else None
            experiment_id = client.create_experiment(spec.experiment_name, artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
        return cls(client, experiment_id, spec.name)

    def study_run(self, spec: StudySpec) -> str:
        """The study's parent run id, created on first use and reused by every later ``run``."""
        runs = self._search(f"tags.`{TAG_KIND}` = 'study'")
        if runs:
            return runs[0].info.run_id
        run = self.client.create_run(
            self.experiment_id,
            run_name=spec.name,
            tags={TAG_KIND: "study", TAG_STUDY: spec.name, "mlflow.note.content": spec.description},
        )
        return run.info.run_id

    def trial_runs(self) -> dict[str, TrialRun]:
        """Latest child run per trial hash."""
        found: dict[str, TrialRun] = {}
        for run in reversed(self._search(f"tags.`{TAG_KIND}` = 'trial'")):  # oldest first
            trial_hash = run.data.tags.get(TAG_HASH)
            if trial_hash:
                found[trial_hash] = TrialRun(run.info.run_id, run.info.status, trial_hash)
        return found

    def close_stale(self) -> list[str]:
        """Runs left RUNNING by a driver that died: mark them KILLED so they resume, not hang."""
        stale = [run for run in self.trial_runs().values() if run.status == "RUNNING"]
        for run in stale:
            self.client.set_terminated(run.run_id, status="KILLED")
        return [run.trial_hash for run in stale]

    def start_trial(self, trial: Trial, parent_run_id: str) -> str:
        """Reuse the trial's unfinished run (a resume) or create its child run."""
        existing = self.trial_runs().get(trial.hash)
        if existing is not None and existing.status != "FINISHED":
            self.client.update_run(existing.run_id, status="RUNNING")
            return existing.run_id
        tags = {
            TAG_KIND: "trial",
            TAG_STUDY: self.study,
            TAG_HASH: trial.hash,
            TAG_NAME: trial.name,
            TAG_SEED: str(trial.seed),
            TAG_PARENT: parent_run_id,
            **{f"{TAG_AXIS}{axis}": str(value) for axis, value in trial.axes.items()},
        }
        run = self.client.create_run(self.experiment_id, run_name=f"{trial.name} s{trial.seed}", tags=tags)
        params = [Param(key, _param_value(value)) for key, value in flatten(trial.config.canonical()).items()]
        cost = model_cost(trial.config.model, input_spec(trial.config.data))
        metrics = [
            Metric("params_total", cost.params_total, _now(), 0),
            Metric("params_active", cost.params_active, _now(), 0),
            Metric("gflops", cost.flops / 1e9, _now(), 0),
        ]
        self.client.log_batch(run.info.run_id, params=params, metrics=metrics)
        return run.info.run_id

    def logged_epochs(self, run_id: str) -> set[int]:
        """Epochs already in MLflow for this run (every epoch logs ``train_loss``)."""
        return {point.step for point in self.client.get_metric_history(run_id, "train_loss")}

    def log_epoch(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        timestamp = _now()
        self.client.log_batch(
            run_id, metrics=[Metric(key, float(value), timestamp, step) for key, value in metrics.items()]
        )

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)

    def finish(self, run_id: str, status: str, error: str | None = None) -> None:
        if error:
            self.client.set_tag(run_id, TAG_ERROR, error[-_MLFLOW_TAG_LIMIT:])
            self.client.log_text(run_id, error, "error.txt")
        self.client.set_terminated(run_id, status=status)

    def finish_study(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status=status)

    def runs(self) -> list[Run]:
        return self._search(f"tags.`{TAG_KIND}` = 'trial'")

    def _search(self, filter_string: str) -> list[Run]:
        runs: list[Run] = []
        token = None
        while True:
            page = self.client.search_runs(
                [self.experiment_id], filter_string=filter_string, max_results=1000, page_token=token
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs


class MLflowTracking(tune.Callback):
    """Tune callback in the driver: trial events → the study's MLflow runs.

    Args:
        store: the study's MLflow experiment.
        parent_run_id: the study run that trials nest under.
        trials: the study's trials by hash (Tune configs carry only the hash back).
        on_event: called with (event, trial, details) for terminal progress output; a trial
            stopped early is ``"finished"`` with ``details["stopped_early"]`` = the reason.
        tags: extra run tags by trial hash (e.g. where a fine-tuning trial started from).
        scheduler, stop: the study's early stopping, to name the reason a trial was stopped.

    Early stopping: when the study's stop rule or scheduler decides to stop a trial after a
    result, Tune marks that result ``done`` *before* it calls ``on_trial_result``, and later
    calls ``on_trial_complete``. A ``done`` result whose epoch is below the trial's
    ``recipe.epochs`` is a stop decision; the trial is then FINISHED with the tags
    ``sweetspot.stopped_early=true`` and ``sweetspot.stop_reason``. A trial that completes short
    of its epochs without such a decision (nothing should do that) is FAILED, not silently done.
    """

    def __init__(
        self,
        store: StudyStore,
        parent_run_id: str,
        trials: dict[str, Trial],
        on_event: Callable[[str, Trial, dict[str, Any]], None] | None = None,
        tags: dict[str, dict[str, str]] | None = None,
        *,
        scheduler: SchedulerSpec | None = None,
        stop: StopSpec | None = None,
    ) -> None:
        self.store = store
        self.tags = tags or {}
        self.parent_run_id = parent_run_id
        self.trials = trials
        self.on_event = on_event or (lambda *_: None)
        self.run_ids: dict[str, str] = {}
        self.logged: dict[str, set[int]] = {}
        self.outcomes: dict[str, str] = {}
        self.errors: dict[str, str] = {}
        self.scheduler = scheduler
        self.stop = stop
        self.stopped: dict[str, str] = {}  # hash → why it was stopped early
        self._stop_decisions: dict[str, str] = {}
        self._warned: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its run config (callbacks included) into the experiment snapshot. The
        # live callback in this driver keeps its client; a snapshot needs none.
        return {**self.__dict__, "store": None, "on_event": None}

    def _trial(self, tune_trial: Any) -> Trial:
        return self.trials[tune_trial.config["sweetspot"]["hash"]]

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        ours = self._trial(trial)
        run_id = self.store.start_trial(ours, self.parent_run_id)
        self.run_ids[ours.hash] = run_id
        self.logged[ours.hash] = self.store.logged_epochs(run_id)
        if ours.hash in self.tags:
            self.store.set_tags(run_id, self.tags[ours.hash])
        self.on_event("start", ours, {"epochs_done": max(self.logged[ours.hash], default=0)})

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        ours = self._trial(trial)
        epoch = result.get("epoch")
        if epoch is not None:
            self._note_early_stopping(ours, result, int(epoch))
        # A resumed trial re-reports its checkpoint's epoch: keep MLflow's history free of duplicates.
        if epoch is None or int(epoch) in self.logged[ours.hash]:
            return
        self.logged[ours.hash].add(int(epoch))
        metrics = {
            key: value
            for key, value in result.items()
            if key not in _NOT_METRICS
            and isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
        }
        self.store.log_epoch(self.run_ids[ours.hash], metrics, step=int(epoch))
        tags = {tag: str(result[key]) for key, tag in RESULT_TAGS.items() if key in result}
        if tags:
            self.store.set_tags(self.run_ids[ours.hash], tags)
        checkpoint = result.get("checkpoint_path")
        if checkpoint:
            # Ray's storage is a local or mounted filesystem here; an object-store URI is skipped.
            for name in CHECKPOINT_ARTIFACTS:
                if (Path(str(checkpoint)) / name).is_file():
                    self.store.client.log_artifact(self.run_ids[ours.hash], str(Path(str(checkpoint)) / name))
        self.on_event("epoch", ours, {"epoch": epoch, **metrics})

    def _note_early_stopping(self, ours: Trial, result: dict, epoch: int) -> None:
        """Record a stop decision on this result (before the duplicate check: a resumed trial's
        first result repeats its checkpoint's epoch and can be the one it is stopped on)."""
        for rule in (self.scheduler, self.stop):
            if rule is not None and rule.metric not in result and rule.metric not in self._warned:
                self._warned.add(rule.metric)
                key = "scheduler" if rule is self.scheduler else "stop"
                warning = (
                    f"{key}.metric {rule.metric!r} is not among the metrics trial {ours.name!r} reported "
                    f"at epoch {epoch}, so it cannot stop trials on it"
                )
                logger.warning("sweetspot: %s", warning)
                self.store.set_tags(self.run_ids[ours.hash], {TAG_STOP_WARNING: warning})
        if result.get("done") and epoch < ours.config.recipe.epochs and ours.hash not in self._stop_decisions:
            self._stop_decisions[ours.hash] = self._stop_reason(result, epoch)

    def _stop_reason(self, result: dict, epoch: int) -> str:
        # Tune asks the stopper first and the scheduler only when the stopper lets the trial go on.
        if self.stop is not None and self.stop.met(result):
            return f"stop rule {self.stop.describe()} at epoch {epoch}"
        if self.scheduler is not None:
            return f"{self.scheduler.kind} at epoch {epoch}"
        return f"stopped by Ray Tune at epoch {epoch}"

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        ours = self._trial(trial)
        run_id = self.run_ids[ours.hash]
        reason = self._stop_decisions.get(ours.hash)
        last_epoch = max(self.logged[ours.hash], default=0)
        total = ours.config.recipe.epochs
        if reason is None and last_epoch < total:
            error = (
                f"the trial ended after epoch {last_epoch} of {total} without an error or an early-stopping "
                "decision (see the Ray logs)"
            )
            self.store.finish(run_id, "FAILED", error)
            self.outcomes[ours.hash] = "FAILED"
            self.errors[ours.hash] = error
            self.on_event("failed", ours, {"error": error})
            return
        details = {}
        if reason is not None:
            self.store.set_tags(run_id, {TAG_STOPPED_EARLY: "true", TAG_STOP_REASON: reason})
            self.stopped[ours.hash] = reason
            details["stopped_early"] = reason
        self.store.finish(run_id, "FINISHED")
        self.outcomes[ours.hash] = "FINISHED"
        self.on_event("finished", ours, details)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        ours = self._trial(trial)
        error = _error_text(trial)
        self.store.finish(self.run_ids[ours.hash], "FAILED", error)
        self.outcomes[ours.hash] = "FAILED"
        self.errors[ours.hash] = error
        self.on_event("failed", ours, {"error": error})


def _error_text(trial: Any) -> str:
    path = getattr(trial, "error_file", None)
    if path and Path(path).is_file():
        return Path(path).read_text(errors="replace")
    return "the trial failed without an error message (see the Ray logs)"


def _param_value(value: Any) -> str:
    return "null" if value is None else str(value)


def _now() -> int:
    return int(time.time() * 1000)

