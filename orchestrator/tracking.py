"""MLflow, written by one process only: the driver.

The study is a parent run; every trial is a child run found again by its trial
hash. :class:`StudyStore` owns the MLflow calls; :class:`MLflowTracking` is the
Ray Tune callback that feeds it from trial events (workers never talk to MLflow,
which keeps sqlite safe and the tracking server out of the training hot path).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.result import AUTO_RESULT_KEYS

from orchestrator.expand import Trial
from orchestrator.outbox import JOURNAL_FILE, Event, Outbox
from orchestrator.redact import redact
from orchestrator.spec import SchedulerSpec, StopSpec, StudySpec
from orchestrator.tags import (
    TAG_AXIS,
    TAG_CHECKPOINT_FALLBACK,
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
from trainer.checkpoint import FALLBACK_KEY
from trainer.config import flatten
from trainer.data import input_spec
from trainer.loop import ROUTING_FILE
from trainer.models.accounting import model_cost

# Files a worker leaves next to its last checkpoint that belong in the trial's MLflow artifacts.
CHECKPOINT_ARTIFACTS = (ROUTING_FILE,)
# Text a worker reports about how it ran (not a metric): result key → run tag.
RESULT_TAGS = {"moe_backend": "sweetspot.moe_backend", FALLBACK_KEY: TAG_CHECKPOINT_FALLBACK}

# Tune's bookkeeping keys in a result; everything else numeric came from the worker.
_NOT_METRICS = set(AUTO_RESULT_KEYS) | {"done", "trial_id", "experiment_tag", "checkpoint_path", "epoch"}
_MLFLOW_TAG_LIMIT = 5000

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrialRun:
    run_id: str
    status: str
    trial_hash: str
    described: bool = True  # has its params and model cost (a start cut short has not)


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
                raise LookupError(
                    f"no MLflow experiment {spec.experiment_name!r} at {redact(uri)}: run the study first"
                )
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
            tags={TAG_KIND: "study", TAG_STUDY: spec.name, "mlflow.note.content": redact(spec.description)},
        )
        return run.info.run_id

    def trial_runs(self) -> dict[str, TrialRun]:
        """Latest child run per trial hash."""
        found: dict[str, TrialRun] = {}
        for run in reversed(self._search(f"tags.`{TAG_KIND}` = 'trial'")):  # oldest first
            trial_hash = run.data.tags.get(TAG_HASH)
            if trial_hash:
                found[trial_hash] = _trial_run(run, trial_hash)
        return found

    def trial_run(self, trial_hash: str) -> TrialRun | None:
        """The trial's latest child run: one filtered search, however many runs the study has
        (reading them all at every trial start made a 100-trial study's starts seconds slower)."""
        runs = self._search(f"tags.`{TAG_KIND}` = 'trial' and tags.`{TAG_HASH}` = '{trial_hash}'")
        return _trial_run(runs[0], trial_hash) if runs else None  # newest first

    def close_stale(self) -> list[str]:
        """Runs left RUNNING by a driver that died: mark them KILLED so they resume, not hang."""
        stale = [run for run in self.trial_runs().values() if run.status == "RUNNING"]
        for run in stale:
            self.client.set_terminated(run.run_id, status="KILLED")
        return [run.trial_hash for run in stale]

    def start_trial(self, trial: Trial, parent_run_id: str) -> str:
        """Reuse the trial's unfinished run (a resume) or create its child run."""
        existing = self.trial_run(trial.hash)
        if existing is not None and existing.status != "FINISHED":
            self.client.update_run(existing.run_id, status="RUNNING")
            if existing.status == "FAILED":  # retried: its old error no longer describes it
                with contextlib.suppress(MlflowException):  # (a tag that is not there)
                    self.client.delete_tag(existing.run_id, TAG_ERROR)
            if not existing.described:  # MLflow went away between creating the run and describing it
                self._describe(existing.run_id, trial)
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
        self._describe(run.info.run_id, trial)
        return run.info.run_id

    def _describe(self, run_id: str, trial: Trial) -> None:
        """The trial's config as params, and its model's size and cost as step-0 metrics."""
        params = [Param(key, _param_value(value)) for key, value in flatten(trial.config.canonical()).items()]
        cost = model_cost(trial.config.model, input_spec(trial.config.data))
        metrics = [
            Metric("params_total", cost.params_total, _now(), 0),
            Metric("params_active", cost.params_active, _now(), 0),
            Metric("gflops", cost.flops / 1e9, _now(), 0),
        ]
        self.client.log_batch(run_id, params=params, metrics=metrics)

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
            error = redact(error)  # a storage or tracking URI in an error text keeps its credentials out
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
        journal: where writes wait while MLflow is unreachable (:mod:`orchestrator.outbox`).
        on_outage: told when MLflow becomes unreachable (a message) and when it is back (None).

    What happened to each trial (``outcomes``, ``errors``, ``stopped``) is decided from Tune's
    events as they come; the MLflow writes go through an :class:`~orchestrator.outbox.Outbox`,
    so an unreachable tracking server delays them and loses none.

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
        journal: Path | None = None,
        on_outage: Callable[[str | None], None] | None = None,
    ) -> None:
        self.store = store
        self.tags = tags or {}
        self.parent_run_id = parent_run_id
        self.trials = trials
        self.on_event = on_event or (lambda *_: None)
        self.outbox = Outbox(self._write, journal or Path(JOURNAL_FILE), on_outage)
        self.run_ids: dict[str, str] = {}  # written runs, by trial hash
        self.logged: dict[str, set[int]] = {}  # epochs in MLflow, by trial hash
        self.started: list[str] = []
        self.reported: dict[str, int] = {}  # the last epoch each trial reported
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
        return {**self.__dict__, "store": None, "on_event": None, "outbox": None}

    def _trial(self, tune_trial: Any) -> Trial:
        return self.trials[tune_trial.config["sweetspot"]["hash"]]

    # Tune's events: decide, then hand the writes to the outbox -----------------------------

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        ours = self._trial(trial)
        self.started.append(ours.hash)
        self.outbox.put({"kind": "start", "trial": ours.hash})

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        ours = self._trial(trial)
        epoch = result.get("epoch")
        if epoch is not None:
            self._note_early_stopping(ours, result, int(epoch))
            self.reported[ours.hash] = max(self.reported.get(ours.hash, 0), int(epoch))
        kept = {
            key: value
            for key, value in result.items()
            if key in RESULT_TAGS or key in ("epoch", "checkpoint_path") or _is_metric(key, value)
        }
        self.outbox.put({"kind": "result", "trial": ours.hash, "result": kept})

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        ours = self._trial(trial)
        reason = self._stop_decisions.get(ours.hash)
        last_epoch = self.reported.get(ours.hash, 0)
        total = ours.config.recipe.epochs
        if reason is None and last_epoch < total:
            error = (
                f"the trial ended after epoch {last_epoch} of {total} without an error or an early-stopping "
                "decision (see the Ray logs)"
            )
            self._end(ours, "FAILED", error=error)
            return
        tags = {}
        if reason is not None:
            tags = {TAG_STOPPED_EARLY: "true", TAG_STOP_REASON: reason}
            self.stopped[ours.hash] = reason
        self._end(ours, "FINISHED", tags=tags)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(self._trial(trial), "FAILED", error=_error_text(trial))

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self.outbox.flush()  # retries what waits for MLflow, when a retry is due

    def close_open(self) -> None:
        """Mark the trials that started but did not end (an interrupt, a crash) KILLED."""
        for trial_hash in list(self.started):
            if trial_hash not in self.outcomes:
                self.outbox.put({"kind": "end", "trial": trial_hash, "status": "KILLED"})

    def finish_study(self, status: str) -> None:
        self.outbox.put({"kind": "study_end", "status": status})

    def _end(self, ours: Trial, status: str, error: str | None = None, tags: dict[str, str] | None = None) -> None:
        self.outcomes[ours.hash] = status
        if error is not None:
            self.errors[ours.hash] = error
        self.outbox.put({"kind": "end", "trial": ours.hash, "status": status, "error": error, "tags": tags or {}})
        if status == "FAILED":
            self.on_event("failed", ours, {"error": error})
        else:
            stopped = self.stopped.get(ours.hash)
            self.on_event("finished", ours, {"stopped_early": stopped} if stopped else {})

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
                self.outbox.put({"kind": "tags", "trial": ours.hash, "tags": {TAG_STOP_WARNING: warning}})
        if result.get("done") and epoch < ours.config.recipe.epochs and ours.hash not in self._stop_decisions:
            self._stop_decisions[ours.hash] = self._stop_reason(result, epoch)

    def _stop_reason(self, result: dict, epoch: int) -> str:
        # Tune asks the stopper first and the scheduler only when the stopper lets the trial go on.
        if self.stop is not None and self.stop.met(result):
            return f"stop rule {self.stop.describe()} at epoch {epoch}"
        if self.scheduler is not None:
            return f"{self.scheduler.kind} at epoch {epoch}"
        return f"stopped by Ray Tune at epoch {epoch}"

    # The writes: each idempotent, as the outbox may apply an event again after a failure ---------

    def _write(self, event: Event) -> None:
        kind = event["kind"]
        if kind == "study_end":
            self.store.finish_study(self.parent_run_id, event["status"])
            return
        ours = self.trials.get(event["trial"])
        if ours is None:  # a journal from before the study file changed
            logger.warning("sweetspot: dropped a pending MLflow write of trial %s: not in the study", event["trial"][:12])
            return
        if kind == "start":
            run_id = self.store.start_trial(ours, self.parent_run_id)
            self.run_ids[ours.hash] = run_id
            self.logged[ours.hash] = self.store.logged_epochs(run_id)
            if ours.hash in self.tags:
                self.store.set_tags(run_id, self.tags[ours.hash])
            self.on_event("start", ours, {"epochs_done": max(self.logged[ours.hash], default=0)})
        elif kind == "result":
            self._write_result(ours, event["result"])
        elif kind == "tags":
            self.store.set_tags(self._run_id(ours), event["tags"])
        elif kind == "end":
            run_id = self._run_id(ours)
            if event.get("tags"):
                self.store.set_tags(run_id, event["tags"])
            self.store.finish(run_id, event["status"], event.get("error"))

    def _write_result(self, ours: Trial, result: dict[str, Any]) -> None:
        run_id = self._run_id(ours)
        # Tags before the duplicate check: a resume's first result (its checkpoint's epoch again) says
        # whether it had to fall back to an older checkpoint.
        tags = {tag: str(result[key]) for key, tag in RESULT_TAGS.items() if key in result}
        if tags:
            self.store.set_tags(run_id, tags)
        epoch = result.get("epoch")
        # A resumed trial re-reports its checkpoint's epoch: keep MLflow's history free of duplicates.
        if epoch is None or int(epoch) in self.logged[ours.hash]:
            return
        metrics = {key: value for key, value in result.items() if _is_metric(key, value)}
        self.store.log_epoch(run_id, metrics, step=int(epoch))
        checkpoint = result.get("checkpoint_path")
        if checkpoint:
            # Ray's storage is a local or mounted filesystem here; an object-store URI is skipped.
            for name in CHECKPOINT_ARTIFACTS:
                if (Path(str(checkpoint)) / name).is_file():
                    self.store.client.log_artifact(run_id, str(Path(str(checkpoint)) / name))
        self.logged[ours.hash].add(int(epoch))
        self.on_event("epoch", ours, {"epoch": epoch, **metrics})

    def _run_id(self, ours: Trial) -> str:
        """The trial's run: this driver's, else (a journal replayed by a new driver) MLflow's."""
        if ours.hash not in self.run_ids:
            existing = self.store.trial_run(ours.hash)
            run_id = existing.run_id if existing else self.store.start_trial(ours, self.parent_run_id)
            self.run_ids[ours.hash] = run_id
            self.logged[ours.hash] = self.store.logged_epochs(run_id)
        return self.run_ids[ours.hash]


def _is_metric(key: str, value: Any) -> bool:
    """Numbers the worker reported (Tune's bookkeeping keys aside)."""
    return (
        key not in _NOT_METRICS
        and isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def _trial_run(run: Run, trial_hash: str) -> TrialRun:
    return TrialRun(run.info.run_id, run.info.status, trial_hash, described="params_total" in run.data.metrics)


def _error_text(trial: Any) -> str:
    path = getattr(trial, "error_file", None)
    if path and Path(path).is_file():
        return Path(path).read_text(errors="replace")
    return "the trial failed without an error message (see the Ray logs)"


def _param_value(value: Any) -> str:
    return "null" if value is None else redact(str(value))


def _now() -> int:
    return int(time.time() * 1000)

