"""Run a study's trials: one Ray Tune trial each, each launching a Ray Train TorchTrainer.

Ray 2.60 runs Train V2, where a ``TorchTrainer`` cannot be handed to a ``Tuner``
directly: a Tune *function* trainable (:func:`run_trial`) builds the trainer and
calls ``fit()``, and ``TuneReportCallback`` forwards rank 0's reports to Tune.
Train runs are named by trial hash, so relaunching an interrupted trial makes
Train V2 restore its last checkpoint.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
import ray.train
from ray import tune
from ray.train.torch import TorchConfig, TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from orchestrator.expand import Trial
from orchestrator.lineage import InitSource, train_run_name
from orchestrator.spec import ResourcesSpec, StudySpec
from orchestrator.tracking import TAG_INIT_CHECKPOINT, TAG_INIT_TRIAL, MLflowTracking, StudyStore
from trainer.loop import worker

# The Tune trial itself only waits on its TorchTrainer; the workers hold the real reservation.
TRIAL_DRIVER_CPUS = 0.01
# A rank that dies must not leave the others blocked in a collective forever.
COLLECTIVE_TIMEOUT_S = 600


@dataclass
class StudyOutcome:
    """What a ``run`` did: trial hashes by what happened to them."""

    skipped: list[str] = field(default_factory=list)
    previously_failed: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
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
            callbacks=[TuneReportCallback()],
            # A lost worker (or an error) restarts the worker group from the last checkpoint.
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    trainer.fit()


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
    tracking = MLflowTracking(store, parent, {t.hash: t for t in todo}, on_event, tags)
    try:
        concurrency = check_fits(spec.resources, ray.cluster_resources())
        if spec.resources.max_concurrent_trials:
            concurrency = min(concurrency, spec.resources.max_concurrent_trials)
        storage = spec.output_dir / "ray"
        storage.mkdir(parents=True, exist_ok=True)
        trainable = tune.with_resources(
            tune.with_parameters(
                run_trial, resources=spec.resources, storage=str(spec.train_storage), max_failures=spec.max_failures
            ),
            {"CPU": TRIAL_DRIVER_CPUS},
        )
        tuner = tune.Tuner(
            trainable,
            param_space={"sweetspot": tune.grid_search([_payload(t, inits.get(t.hash)) for t in todo])},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=concurrency,
                trial_name_creator=_tune_trial_name,
                trial_dirname_creator=_tune_trial_dir,
            ),
            run_config=tune.RunConfig(
                name=spec.name,
                storage_path=str(storage / "tune"),
                callbacks=[tracking],
                verbose=1 if verbose else 0,
            ),
        )
        tuner.fit()
    finally:
        # Interrupted (Ctrl-C) or crashed: trials still open are KILLED, and resume next time.
        for trial_hash, run_id in tracking.run_ids.items():
            if trial_hash not in tracking.outcomes:
                store.finish(run_id, "KILLED")
        if owns_ray:
            ray.shutdown()
    for trial in todo:
        state = tracking.outcomes.get(trial.hash)
        if state == "FINISHED":
            outcome.finished.append(trial.hash)
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
