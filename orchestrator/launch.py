"""Run a study's trials: one Ray Tune trial each, each launching a Ray Train TorchTrainer.

The driver side: which trials to run, whether they fit the cluster, the Tune experiment
(concurrency, early stopping, the MLflow callback) and what became of each trial. What runs
inside each Tune trial is :mod:`orchestrator.trial`.

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
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.stopper import CombinedStopper, Stopper

from orchestrator.expand import Trial
from orchestrator.lineage import InitSource, train_run_name
from orchestrator.outbox import JOURNAL_FILE
from orchestrator.redact import redact
from orchestrator.spec import ResourcesSpec, StopSpec, StudySpec
from orchestrator.tags import TAG_INIT_CHECKPOINT, TAG_INIT_TRIAL
from orchestrator.tracking import MLflowTracking, StudyStore
from orchestrator.trial import (
    LOCAL_TRAIN_ENV_DEFAULTS,
    TRAIN_ENV_DEFAULTS,
    TRIAL_DRIVER_CPUS,
    Watchdog,
    run_trial,
    trial_trainable,
)

_STRICT_METRICS_ENV = "TUNE_DISABLE_STRICT_METRIC_CHECKING"
_TUNE_SIGINT_ENV = "TUNE_DISABLE_SIGINT_HANDLER"
AUTH_MODE_ENV = "RAY_AUTH_MODE"
# How long the end of a study waits for an unreachable MLflow before it leaves the writes in the
# journal for the next run; shorter after an interrupt, where the user is waiting to get out.
PENDING_TRACKING_WAIT_S = 120.0
INTERRUPTED_TRACKING_WAIT_S = 10.0
# How long after a signal the driver watches whether its local Ray went down with it.
RAY_LOSS_WATCH_S = 10.0
RAY_PING_TIMEOUT_S = 1.0

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
    pending_writes: int = 0  # MLflow writes still waiting for the tracking server, in ``journal``
    journal: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.failed and not self.incomplete and not self.previously_failed and not self.pending_writes


class ResourceError(RuntimeError):
    """A trial can never be scheduled on this cluster."""


class ClusterError(RuntimeError):
    """The Ray cluster named by ``address`` cannot be joined."""


class TrackingError(RuntimeError):
    """MLflow cannot take the study's writes, so no trial is started."""


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


def check_fits(resources: ResourcesSpec, nodes: list[dict[str, float]]) -> int:
    """How many trials fit at once on a cluster of these nodes (each node's resources);
    ResourceError, with what is missing, when not even one trial ever can."""
    cpus = TRIAL_DRIVER_CPUS + resources.workers * resources.cpus_per_worker
    gpus = resources.workers * resources.gpus_per_worker
    have_cpus = sum(node.get("CPU", 0.0) for node in nodes)
    have_gpus = sum(node.get("GPU", 0.0) for node in nodes)
    if cpus > have_cpus + 1e-9 or gpus > have_gpus + 1e-9:
        raise ResourceError(
            f"a trial needs {cpus:g} CPUs and {gpus:g} GPUs ({resources.workers} workers × "
            f"{resources.cpus_per_worker:g} CPU, {resources.gpus_per_worker:g} GPU, plus {TRIAL_DRIVER_CPUS} "
            f"for the trial driver) but the Ray cluster has {have_cpus:g} CPUs and {have_gpus:g} GPUs; "
            "lower resources.workers or resources.cpus_per_worker/gpus_per_worker"
        )
    worker = f"a worker ({resources.cpus_per_worker:g} CPU, {resources.gpus_per_worker:g} GPU)"
    hosts = [node for node in nodes if _holds(node, resources, 1)]
    if not hosts:
        raise ResourceError(f"no node of the Ray cluster has room for {worker}; {_largest(nodes)}")
    strategy = resources.placement_strategy
    if strategy == "STRICT_PACK" and not any(_holds(node, resources, resources.workers) for node in nodes):
        raise ResourceError(
            f"placement_strategy STRICT_PACK puts all {resources.workers} workers on one node, and no node "
            f"has room for them; {_largest(nodes)}; use PACK, or fewer workers"
        )
    if strategy == "STRICT_SPREAD" and len(hosts) < resources.workers:
        raise ResourceError(
            f"placement_strategy STRICT_SPREAD puts each of the {resources.workers} workers on its own node, "
            f"but only {len(hosts)} node(s) have room for {worker}; use SPREAD or PACK, or fewer workers"
        )
    fits = math.floor((have_cpus + 1e-9) / cpus)
    if gpus:
        fits = min(fits, math.floor((have_gpus + 1e-9) / gpus))
    return max(1, fits)


def _holds(node: dict[str, float], resources: ResourcesSpec, workers: int) -> bool:
    return (
        node.get("CPU", 0.0) + 1e-9 >= workers * resources.cpus_per_worker
        and node.get("GPU", 0.0) + 1e-9 >= workers * resources.gpus_per_worker
    )


def _largest(nodes: list[dict[str, float]]) -> str:
    biggest = max(nodes, key=lambda node: (node.get("GPU", 0.0), node.get("CPU", 0.0)))
    return f"its largest node has {biggest.get('CPU', 0.0):g} CPUs and {biggest.get('GPU', 0.0):g} GPUs"


@dataclass(frozen=True)
class LaunchInfo:
    """What a study is about to run, and on which Ray cluster."""

    trials: list[Trial]  # the trials to run now (not those FINISHED, or FAILED without a retry)
    address: str  # "local" for a Ray started by this process
    cpus: float
    gpus: float
    concurrency: int  # trials at once
    dashboard_url: str | None


class StudyInterrupted(KeyboardInterrupt):
    """The study was stopped by a signal (``signum``) after its running trials were stopped."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Interrupt(Stopper):
    """Ctrl-C (SIGINT) and SIGTERM as a Tune stopper.

    Tune's own SIGINT handler ends the experiment but returns normally, so a caller cannot tell
    an interrupted study from a finished one; SIGTERM (a scheduler ending the job, ``kill``)
    would end the driver at once and leave its trials RUNNING. This stopper, installed as the
    handler of both for the time of ``fit()``, makes Tune stop every trial the same graceful way
    as at the end of an experiment (each trial's Train run is aborted, its checkpoints kept) and
    lets ``run_study`` raise :class:`StudyInterrupted` afterwards. A second signal interrupts at
    once.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, on_request: Callable[[], None] | None = None) -> None:
        self.requested = threading.Event()
        self.signum = signal.SIGINT
        self.on_request = on_request

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.requested.is_set()

    def __getstate__(self) -> dict[str, Any]:
        return {}  # Tune snapshots its stoppers; an Event cannot be pickled, nor needs to be

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    @contextlib.contextmanager
    def catching_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be set from the main thread
            return

        def handler(signum: int, frame: Any) -> None:
            if self.requested.is_set():
                raise StudyInterrupted(signum)
            self.signum = signum
            self.requested.set()
            if self.on_request is not None:
                self.on_request()

        previous = {signum: signal.signal(signum, handler) for signum in self.SIGNALS}
        tune_handler = os.environ.get(_TUNE_SIGINT_ENV)
        os.environ[_TUNE_SIGINT_ENV] = "1"
        try:
            yield
        finally:
            for signum, before in previous.items():
                signal.signal(signum, before)
            _restore_env(_TUNE_SIGINT_ENV, tune_handler)


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
    on_start: Callable[[LaunchInfo], None] | None = None,
    on_interrupt: Callable[[], None] | None = None,
    on_outage: Callable[[str | None], None] | None = None,
    on_ray_lost: Callable[[int], None] | None = None,
) -> StudyOutcome:
    """Run every trial not yet FINISHED in MLflow (FAILED ones only with ``retry_failed``).

    ``inits``: the start checkpoints of fine-tuning / linear-probe trials (from
    :func:`orchestrator.lineage.resolve_inits`), by trial hash. ``on_event``: each trial's
    start, epochs and end; ``on_start``: what runs where, once the study is about to start;
    ``on_interrupt``: the first Ctrl-C, as it stops the trials; ``on_outage``: MLflow became
    unreachable (a message) or is back (None); ``on_ray_lost``: see below.

    A signal to the whole process group (a batch scheduler ending the job) also stops the local
    Ray this driver started, and Ray's client would then hang for a minute before aborting the
    process. So once the local Ray stops answering after a signal, the unfinished trials are
    marked KILLED (their checkpoints are on disk), ``on_ray_lost(signum)`` is called, and the
    process exits at once with ``128 + signum``.

    MLflow writes that could not be made (the tracking server went away) wait in a journal in
    the study's output folder; this run writes them once MLflow is back, else the next one
    does before anything else (``outcome.pending_writes`` says how many are left).

    Uses the Ray that is already initialised (tests, notebooks), else starts a local one
    (or joins ``address``) and shuts it down afterwards.

    Raises:
        ClusterError: the Ray cluster at ``address`` cannot be joined (nothing was started).
        ResourceError: a trial can never fit the cluster (nothing was started).
        StudyInterrupted: after Ctrl-C or SIGTERM, once every running trial was stopped and marked
            KILLED (a ``KeyboardInterrupt``).
    """
    outcome = StudyOutcome()
    parent = store.study_run(spec)
    tags = {trial_hash: _init_tags(source) for trial_hash, source in (inits or {}).items()}
    tracking = MLflowTracking(
        store, parent, {t.hash: t for t in trials}, on_event, tags, scheduler=spec.scheduler, stop=spec.stop,
        journal=spec.output_dir / JOURNAL_FILE, on_outage=on_outage,
    )  # fmt: skip
    # A previous driver's writes that waited for MLflow come first: they may end trials.
    tracking.on_event = lambda *_: None  # not progress of this run
    tracking.outbox.replay()
    tracking.on_event = on_event or tracking.on_event
    if tracking.outbox:
        raise TrackingError(
            f"{len(tracking.outbox)} MLflow writes of the last run still cannot be made "
            f"(kept in {tracking.outbox.journal}); nothing was started"
        )
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
        store.finish_study(parent, "FINISHED" if outcome.ok else "FAILED")
        return outcome

    owns_ray = not ray.is_initialized()
    dashboard_url = None
    if owns_ray:
        dashboard_url = _init_ray(address, dashboard, verbose)
    inits = inits or {}
    def on_request() -> None:
        if on_interrupt is not None:
            on_interrupt()
        if owns_ray and not address:  # a cluster outlives this driver's process group
            threading.Thread(
                target=_exit_if_ray_is_lost, args=(tracking, interrupt.signum, on_ray_lost), name="ray-loss", daemon=True
            ).start()

    interrupt = Interrupt(on_request)
    # A result without the scheduler's metric would otherwise abort the whole Tune run (its strict
    # metric check raises in the driver); ASHA skips such a result, and the tracking callback warns.
    strict_metrics = os.environ.get(_STRICT_METRICS_ENV)
    if spec.scheduler is not None:
        os.environ[_STRICT_METRICS_ENV] = "1"
    try:
        cluster = ray.cluster_resources()
        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        try:
            concurrency = check_fits(spec.resources, nodes)
        except ResourceError:
            tracking.finish_study("FAILED")  # not left RUNNING: nothing runs
            raise
        if spec.resources.max_concurrent_trials:
            concurrency = min(concurrency, spec.resources.max_concurrent_trials)
        if on_start is not None:
            on_start(
                LaunchInfo(
                    trials=todo,
                    address="local" if owns_ray and not address else (address or "connected"),
                    cpus=cluster.get("CPU", 0.0),
                    gpus=cluster.get("GPU", 0.0),
                    concurrency=concurrency,
                    dashboard_url=dashboard_url,
                )
            )
        if not spec.remote_storage:
            Path(spec.ray_storage).mkdir(parents=True, exist_ok=True)
        trainable = tune.with_resources(
            trial_trainable(
                tune.with_parameters(
                    run_trial,
                    resources=spec.resources.model_dump(),
                    storage=spec.train_storage,
                    max_failures=spec.max_failures,
                    stall_timeout_s=spec.stall_timeout_s,
                    watchdog=Watchdog.remote() if spec.stall_timeout_s else None,
                    env=TRAIN_ENV_DEFAULTS | (LOCAL_TRAIN_ENV_DEFAULTS if owns_ray and not address else {}),
                )
            ),
            {"CPU": TRIAL_DRIVER_CPUS},
        )
        stopper = build_stopper(spec)
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
                storage_path=f"{spec.ray_storage}/tune",
                callbacks=[tracking],
                stop=CombinedStopper(stopper, interrupt) if stopper else interrupt,
                verbose=1 if verbose else 0,
            ),
        )
        with interrupt.catching_signals():
            try:
                tuner.fit()
            except EOFError:
                # Once every trial is done, Tune reads each failed trial's pickled error back from the
                # storage; a full disk left that file empty. The tracking callback has the outcomes.
                logger.warning(
                    "sweetspot: Ray Tune could not read a trial's error back from %s", redact(spec.ray_storage)
                )
    finally:
        # Interrupted (Ctrl-C) or crashed: trials still open are KILLED, and resume next time.
        tracking.close_open()
        if spec.scheduler is not None:
            _restore_env(_STRICT_METRICS_ENV, strict_metrics)
        if owns_ray:
            ray.shutdown()
    if interrupt.requested.is_set():
        tracking.finish_study("KILLED")
        tracking.outbox.drain(INTERRUPTED_TRACKING_WAIT_S)
        raise StudyInterrupted(interrupt.signum)
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
    tracking.finish_study("FINISHED" if outcome.ok else "FAILED")
    if not tracking.outbox.drain(PENDING_TRACKING_WAIT_S):
        outcome.pending_writes = len(tracking.outbox)
        outcome.journal = tracking.outbox.journal
    return outcome


def _local_ray_lost() -> bool:
    """Whether the local Ray this process started no longer answers: its GCS or raylet exited,
    or its GCS (which may linger after a SIGTERM) does not answer within a second."""
    # Private Ray API (the node's processes, the driver's GCS client); where it is not there (another
    # Ray version), the driver stops the graceful way.
    worker = ray._private.worker
    try:
        if any(kind in ("gcs_server", "raylet") for kind, _ in worker._global_node.dead_processes()):
            return True
        gcs = worker.global_worker.gcs_client
    except AttributeError:
        return False
    try:
        gcs.internal_kv_get(b"sweetspot-ping", b"sweetspot", timeout=RAY_PING_TIMEOUT_S)
    except ray.exceptions.RayError:  # RpcError: deadline exceeded, unavailable
        return True
    return False


def _exit_if_ray_is_lost(tracking: MLflowTracking, signum: int, on_ray_lost: Callable[[int], None] | None) -> None:
    deadline = time.monotonic() + RAY_LOSS_WATCH_S
    misses = 0
    while time.monotonic() < deadline:
        misses = misses + 1 if _local_ray_lost() else 0
        if misses >= 2:
            tracking.close_open()
            tracking.finish_study("KILLED")
            tracking.outbox.drain(INTERRUPTED_TRACKING_WAIT_S)
            if on_ray_lost is not None:
                on_ray_lost(signum)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(128 + signum)
        time.sleep(0.25)


def _init_ray(address: str | None, dashboard: bool, verbose: bool) -> str | None:
    """Start a local Ray, or join the cluster at ``address``; the dashboard's URL when there is one."""
    try:
        context = ray.init(
            address=address,
            include_dashboard=dashboard,
            log_to_driver=verbose,
            logging_level=logging.INFO if verbose else logging.WARNING,
        )
    except (ConnectionError, RuntimeError) as error:
        if address is None:
            raise
        ray.shutdown()  # a half-made connection keeps threads that would hold the process at exit
        hint = (
            f"; it asks for a token: set {AUTH_MODE_ENV}=token with the cluster's token in "
            "~/.ray/auth_token or RAY_AUTH_TOKEN"
            if "auth" in str(error).lower()
            else "; is it running, and is its token (if it asks for one) here?"
        )
        raise ClusterError(f"cannot join the Ray cluster at {address}: {_first_line(error)}{hint}") from None
    return _url(context.dashboard_url)


def _first_line(error: BaseException) -> str:
    return next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)


def _restore_env(key: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


def _url(address: str | None) -> str | None:
    if not address:
        return None
    return address if "://" in address else f"http://{address}"


def _payload(trial: Trial, init: InitSource | None) -> dict[str, Any]:
    return {
        "hash": trial.hash,
        "name": trial.name,
        "train_run": train_run_name(trial.hash),
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
