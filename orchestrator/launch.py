"""Run a study's trials: one Ray Tune trial each, each launching a Ray Train TorchTrainer.

Ray 2.60 runs Train V2, where a ``TorchTrainer`` cannot be handed to a ``Tuner``
directly: a Tune *function* trainable (:func:`run_trial`) builds the trainer and
calls ``fit()``, and ``TuneReportCallback`` forwards rank 0's reports to Tune.
Train runs are named by trial hash, so relaunching an interrupted trial makes
Train V2 restore its last checkpoint.

Early stopping (the study's ``scheduler`` and ``stop``) is Tune's: an ASHA scheduler and a
:class:`StopRule` stopper decide after each epoch's result. Tune then stops the trial's
actor, whose cleanup aborts the Train run inside it (workers, placement group, controller),
so a stopped trial gives its CPUs/GPUs back at once.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
import ray.train
from ray import tune
from ray.train.torch import TorchConfig, TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.stopper import Stopper
from ray.tune.trainable import wrap_function

from orchestrator.expand import Trial
from orchestrator.lineage import InitSource, train_run_name
from orchestrator.spec import ResourcesSpec, StopSpec, StudySpec
from orchestrator.tracking import TAG_INIT_CHECKPOINT, TAG_INIT_TRIAL, MLflowTracking, StudyStore
from trainer.loop import worker

# The Tune trial itself only waits on its TorchTrainer; the workers hold the real reservation.
TRIAL_DRIVER_CPUS = 0.01
# A rank that dies must not leave the others blocked in a collective forever.
COLLECTIVE_TIMEOUT_S = 600
_STRICT_METRICS_ENV = "TUNE_DISABLE_STRICT_METRIC_CHECKING"
# How long a stopped trial waits for its Train run to shut down before killing the controller.
TRAIN_ABORT_TIMEOUT_S = 60

logger = logging.getLogger(__name__)


@dataclass
class StudyOutcome:
    """What a ``run`` did: trial hashes by what happened to them."""

    skipped: list[str] = field(default_factory=list)
    previously_failed: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)  # including those stopped early
    stopped: list[str] = field(default_factory=list)  # finished, but stopped early (scheduler / stop rule)
    failed: dict[str, str] = field(default_factory=dict)  # hash → error text
    incomplete: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.incomplete and not self.previously_failed


class ResourceError(RuntimeError):
    """A trial can never be scheduled on this cluster."""


def run_trial(config: dict[str, Any], resources: ResourcesSpec, storage: str, max_failures: int) -> None:
    """Tune function trainable: train one trial through Ray Train."""
    payload = config["sweetspot"]
    link = _TrainRunLink()
    _train_run.queue = link.results
    trainer = TorchTrainer(
        worker,
        train_loop_config={"trial": payload["trial"], "init_checkpoint": payload.get("init_checkpoint")},
        torch_config=TorchConfig(timeout_s=COLLECTIVE_TIMEOUT_S),
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources.workers,
            use_gpu=resources.gpus_per_worker > 0,
            resources_per_worker={
                "CPU": resources.cpus_per_worker,
                **({"GPU": resources.gpus_per_worker} if resources.gpus_per_worker else {}),
            },
        ),
        run_config=ray.train.RunConfig(
            name=train_run_name(payload["hash"]),
            storage_path=storage,
            callbacks=[link],
            # A lost worker (or an error) restarts the worker group from the last checkpoint.
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    try:
        trainer.fit()
    except Exception:
        if _train_run.stopping.is_set():
            return  # Tune stopped this trial and aborted its Train run: not an error
        raise
    finally:
        _train_run.controller = None
        _train_run.queue = None


# ---------------------------------------------------------------------------------------------
# Stopping a trial's Train run with it
#
# When Tune stops a trial (the scheduler, the stop rule, the end of the experiment), it calls the
# trial actor's ``stop()`` and then lets the actor go. The Train controller and its workers are
# owned by that actor and die with it, but the workers' placement group is not: Ray scopes a
# placement group created by a (non-detached) actor to the job, and Train V2's
# PlacementGroupCleaner only removes it when the Ray State API answers, which needs the dashboard.
# Without this, every stopped trial kept its workers' CPUs/GPUs reserved until the driver exited,
# and the next trial waited for them (WorkerGroupStartupTimeoutError). So the trial actor's
# cleanup aborts the Train run through the controller's own ``abort()``, which shuts the workers
# down, removes the placement group and stops the cleaner.


class _TrainRunState:
    """The Train run of the trial this process (one Tune trial actor) runs."""

    def __init__(self) -> None:
        self.controller: Any = None  # the Train controller's actor handle, once it has reported
        self.queue: Any = None  # the results queue from the controller to this actor
        self.stopping = threading.Event()


_train_run = _TrainRunState()


class _TrainRunLink(TuneReportCallback):
    """``TuneReportCallback`` that also tells the trial actor where its Train controller is.

    Runs in the Train controller: at its first report it hands the controller's actor handle to
    the trial actor (Tune cannot stop a trial before it has reported).
    """

    def __init__(self) -> None:
        super().__init__()
        self._trial_actor = ray.get_runtime_context().current_actor
        self._registered = False

    @property
    def results(self) -> Any:
        return self._training_actor_item_queue

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if not self._registered:
            self._registered = True
            self._trial_actor.register_train_controller.remote(ray.get_runtime_context().current_actor)
        super().after_report(run_context, metrics, checkpoint)


def _register_train_controller(controller: Any) -> None:
    _train_run.controller = controller


def _abort_train_run() -> None:
    """Abort this trial's Train run if it is still going (called from the trial actor's cleanup)."""
    _train_run.stopping.set()
    controller, results = _train_run.controller, _train_run.queue
    if controller is None:
        return
    aborted = controller.abort.remote()
    deadline = time.monotonic() + TRAIN_ABORT_TIMEOUT_S
    while time.monotonic() < deadline:
        # The controller may be blocked handing a result to Tune, which no longer takes any.
        with contextlib.suppress(Exception):
            while results is not None:
                results.get_nowait()
        done, _ = ray.wait([aborted], timeout=0.5)
        if done:
            break
    else:
        logger.warning("the Train run did not abort in %s s; killing its controller", TRAIN_ABORT_TIMEOUT_S)
        with contextlib.suppress(Exception):
            ray.kill(controller)
    with contextlib.suppress(Exception):  # abort() ends the controller actor: its call "fails"
        ray.get(aborted, timeout=0)
    _train_run.controller = None


def _trial_trainable(function: Callable[[dict[str, Any]], None]) -> type:
    """Tune's class for a function trainable, with a cleanup that aborts the trial's Train run."""

    class SweetspotTrial(wrap_function(function)):  # type: ignore[misc]
        def register_train_controller(self, controller: Any) -> None:
            _register_train_controller(controller)

        def cleanup(self) -> None:
            _abort_train_run()
            super().cleanup()

    return SweetspotTrial


class StopRule(Stopper):
    """The study's ``stop`` rule as a Tune stopper: stop a trial once its metric reaches the threshold."""

    def __init__(self, rule: StopSpec) -> None:
        self.rule = rule

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return self.rule.met(result)

    def stop_all(self) -> bool:
        return False


def build_scheduler(spec: StudySpec, trials: list[Trial]) -> TrialScheduler | None:
    """The study's early-stopping scheduler, or None: ASHA on the ``epoch`` each result carries.

    ``max_t`` is the longest trial's epochs (trials may differ in ``recipe.epochs``); a trial that
    reaches it has run all its epochs anyway.
    """
    scheduler = spec.scheduler
    if scheduler is None:
        return None
    longest = max((trial.config.recipe.epochs for trial in trials), default=1)
    return ASHAScheduler(
        time_attr="epoch",
        metric=scheduler.metric,
        mode=scheduler.mode,
        # ASHA asserts grace_period <= max_t; with a longer grace period it simply never stops a trial.
        max_t=max(longest, scheduler.grace_period),
        grace_period=scheduler.grace_period,
        reduction_factor=scheduler.reduction_factor,
    )


def build_stopper(spec: StudySpec) -> StopRule | None:
    """The study's ``stop`` rule as a Tune stopper, or None."""
    return StopRule(spec.stop) if spec.stop is not None else None


def check_fits(resources: ResourcesSpec, cluster: dict[str, float]) -> int:
    """How many trials fit at once; ResourceError when not even one does."""
    cpus = TRIAL_DRIVER_CPUS + resources.workers * resources.cpus_per_worker
    gpus = resources.workers * resources.gpus_per_worker
    have_cpus, have_gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    if cpus > have_cpus + 1e-9 or gpus > have_gpus + 1e-9:
        raise ResourceError(
            f"a trial needs {cpus:g} CPUs and {gpus:g} GPUs ({resources.workers} workers × "
            f"{resources.cpus_per_worker:g} CPU, {resources.gpus_per_worker:g} GPU, plus {TRIAL_DRIVER_CPUS} "
            f"for the trial driver) but the Ray cluster has {have_cpus:g} CPUs and {have_gpus:g} GPUs; "
            "lower resources.workers or resources.cpus_per_worker/gpus_per_worker"
        )
    fits = math.floor((have_cpus + 1e-9) / cpus)
    if gpus:
        fits = min(fits, math.floor((have_gpus + 1e-9) / gpus))
    return max(1, fits)


def run_study(
    spec: StudySpec,
    trials: list[Trial],
    store: StudyStore,
    *,
    address: str | None = None,
    dashboard: bool = False,
    verbose: bool = False,
    retry_failed: bool = False,
    inits: dict[str, InitSource] | None = None,
    on_event: Callable[[str, Trial, dict[str, Any]], None] | None = None,
) -> StudyOutcome:
    """Run every trial not yet FINISHED in MLflow (FAILED ones only with ``retry_failed``).

    ``inits``: the start checkpoints of fine-tuning / linear-probe trials (from
    :func:`orchestrator.lineage.resolve_inits`), by trial hash.

    Uses the Ray that is already initialised (tests, notebooks), else starts a local one
    (or joins ``address``) and shuts it down afterwards.
    """
    outcome = StudyOutcome()
    parent = store.study_run(spec)
    store.close_stale()
    runs = store.trial_runs()
    todo = []
    for trial in trials:
        status = runs[trial.hash].status if trial.hash in runs else None
        if status == "FINISHED":
            outcome.skipped.append(trial.hash)
        elif status == "FAILED" and not retry_failed:
            outcome.previously_failed.append(trial.hash)
        else:
            todo.append(trial)
    if not todo:
        return outcome

    owns_ray = not ray.is_initialized()
    if owns_ray:
        ray.init(
            address=address,
            include_dashboard=dashboard,
            log_to_driver=verbose,
            logging_level=logging.INFO if verbose else logging.WARNING,
        )
    inits = inits or {}
    tags = {trial_hash: _init_tags(source) for trial_hash, source in inits.items()}
    tracking = MLflowTracking(
        store, parent, {t.hash: t for t in todo}, on_event, tags, scheduler=spec.scheduler, stop=spec.stop
    )
    # A result without the scheduler's metric would otherwise abort the whole Tune run (its strict
    # metric check raises in the driver); ASHA skips such a result, and the tracking callback warns.
    strict_metrics = os.environ.get(_STRICT_METRICS_ENV)
    if spec.scheduler is not None:
        os.environ[_STRICT_METRICS_ENV] = "1"
    try:
        concurrency = check_fits(spec.resources, ray.cluster_resources())
        if spec.resources.max_concurrent_trials:
            concurrency = min(concurrency, spec.resources.max_concurrent_trials)
        storage = spec.output_dir / "ray"
        storage.mkdir(parents=True, exist_ok=True)
        trainable = tune.with_resources(
            _trial_trainable(
                tune.with_parameters(
                    run_trial,
                    resources=spec.resources,
                    storage=str(spec.train_storage),
                    max_failures=spec.max_failures,
                )
            ),
            {"CPU": TRIAL_DRIVER_CPUS},
        )
        tuner = tune.Tuner(
            trainable,
            param_space={"sweetspot": tune.grid_search([_payload(t, inits.get(t.hash)) for t in todo])},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=concurrency,
                scheduler=build_scheduler(spec, trials),
                trial_name_creator=_tune_trial_name,
                trial_dirname_creator=_tune_trial_dir,
            ),
            run_config=tune.RunConfig(
                name=spec.name,
                storage_path=str(storage / "tune"),
                callbacks=[tracking],
                stop=build_stopper(spec),
                verbose=1 if verbose else 0,
            ),
        )
        tuner.fit()
    finally:
        # Interrupted (Ctrl-C) or crashed: trials still open are KILLED, and resume next time.
        for trial_hash, run_id in tracking.run_ids.items():
            if trial_hash not in tracking.outcomes:
                store.finish(run_id, "KILLED")
        if spec.scheduler is not None:
            if strict_metrics is None:
                os.environ.pop(_STRICT_METRICS_ENV, None)
            else:
                os.environ[_STRICT_METRICS_ENV] = strict_metrics
        if owns_ray:
            ray.shutdown()
    for trial in todo:
        state = tracking.outcomes.get(trial.hash)
        if state == "FINISHED":
            outcome.finished.append(trial.hash)
            if trial.hash in tracking.stopped:
                outcome.stopped.append(trial.hash)
        elif state == "FAILED":
            outcome.failed[trial.hash] = tracking.errors.get(trial.hash, "")
        else:
            outcome.incomplete.append(trial.hash)
    store.finish_study(parent, "FINISHED" if outcome.ok else "FAILED")
    return outcome


def _payload(trial: Trial, init: InitSource | None) -> dict[str, Any]:
    return {
        "hash": trial.hash,
        "name": trial.name,
        "trial": trial.config.model_dump(mode="json"),
        "init_checkpoint": str(init.checkpoint.resolve()) if init else None,
    }


def _init_tags(source: InitSource) -> dict[str, str]:
    tags = {TAG_INIT_CHECKPOINT: str(source.checkpoint.resolve())}
    if source.trial_hash:
        tags[TAG_INIT_TRIAL] = f"{source.study}:{source.trial_hash}"
    return tags


def _tune_trial_name(tune_trial: Any) -> str:
    payload = tune_trial.config["sweetspot"]
    return f"{payload['name']} s{payload['trial']['seed']} [{payload['hash'][:8]}]"


def _tune_trial_dir(tune_trial: Any) -> str:
    return train_run_name(tune_trial.config["sweetspot"]["hash"])
