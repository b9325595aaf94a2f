"""What runs inside a Ray Tune trial: one Ray Train ``TorchTrainer`` for one sweetspot trial.

Ray 2.60 runs Train V2, where a ``TorchTrainer`` cannot be handed to a ``Tuner``
directly: a Tune *function* trainable (:func:`run_trial`) builds the trainer and
calls ``fit()``, and ``TuneReportCallback`` forwards rank 0's reports to Tune.
Train runs are named by trial hash, so relaunching an interrupted trial makes
Train V2 restore its last checkpoint.

This module is imported by three processes per trial that do not train: the Tune trial
actor, the Train controller (it unpickles :class:`_TrainRunLink` and :func:`train_worker`)
and the driver. So it imports Ray and nothing of ours that pulls in the trainer (timm,
the models) or MLflow; only the workers import :mod:`trainer.loop`. Each such import saved
is seconds of start-up per trial on a small machine.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.execution.callback import ControllerCallback
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.trainable import wrap_function

# The Tune trial itself only waits on its TorchTrainer; the workers hold the real reservation.
TRIAL_DRIVER_CPUS = 0.01
# A rank that dies must not leave the others blocked in a collective forever.
COLLECTIVE_TIMEOUT_S = 600
# How long a stopped trial waits for its Train run to shut down before killing the controller.
TRAIN_ABORT_TIMEOUT_S = 60
# Ray Train settings for every trial's controller and workers (Train propagates them from the
# process that builds the trainer), unless the user set them. The controller notices that the
# workers finished (or died) at its next poll: Ray's 2 s default is idle time at the end of
# every trial, and a poll is one cheap actor call.
TRAIN_ENV_DEFAULTS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
# On a single machine no node can be preempted: the watcher would be one more process per trial.
LOCAL_TRAIN_ENV_DEFAULTS = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}

logger = logging.getLogger(__name__)


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: the trainer is imported only here, on the workers."""
    from trainer.loop import worker

    worker(config)


class _TorchTrainer(TorchTrainer):
    """``TorchTrainer`` without Ray Data's callback when the run has no Ray Datasets.

    Ray Train starts a ``DatasetManager`` actor for every run, datasets or not: one more Python
    process per trial, about 2.5 s of CPU on a small machine. sweetspot's workers read their data
    themselves (:mod:`trainer.data`), so there is never a dataset to shard.
    """

    def _create_default_callbacks(self) -> list[Any]:
        callbacks = super()._create_default_callbacks()
        if self.datasets:
            return callbacks
        return [callback for callback in callbacks if not isinstance(callback, DatasetsCallback)]


class TrialStalled(RuntimeError):
    """The trial's training made no progress for the study's ``stall_timeout_s``."""


def run_trial(
    config: dict[str, Any],
    resources: dict[str, Any],
    storage: str,
    max_failures: int,
    env: dict[str, str],
    stall_timeout_s: float | None = None,
    watchdog: Any = None,
) -> None:
    """Tune function trainable: train one trial through Ray Train.

    ``resources``: the study's ``ResourcesSpec`` as a dict (plain data: unpickling the model
    would import the config schema into this process). ``env``: Ray Train settings, each
    applied unless this process's environment sets it. ``stall_timeout_s``: how long rank 0
    may go without a heartbeat (to the study's :class:`Watchdog` actor, ``watchdog``) before
    the Train run is aborted and the trial fails.

    Raises:
        TrialStalled: the watchdog gave up on the trial.
    """
    for key, value in env.items():
        os.environ.setdefault(key, value)
    payload = config["sweetspot"]
    link = _TrainRunLink()
    _train_run.queue = link.results
    _train_run.stalled = None
    trial_hash = payload["hash"]
    watched = watchdog if stall_timeout_s else None
    gpus = resources["gpus_per_worker"]
    trainer = _TorchTrainer(
        train_worker,
        train_loop_config={
            "trial": payload["trial"],
            "name": f"{payload['name']} s{payload['trial']['seed']}",
            "init_checkpoint": payload.get("init_checkpoint"),
            "watchdog": watched,
        },
        torch_config=TorchConfig(timeout_s=COLLECTIVE_TIMEOUT_S),
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources["workers"],
            use_gpu=gpus > 0,
            resources_per_worker={"CPU": resources["cpus_per_worker"], **({"GPU": gpus} if gpus else {})},
            placement_strategy=resources["placement_strategy"],
        ),
        run_config=ray.train.RunConfig(
            name=payload["train_run"],
            storage_path=storage,
            callbacks=[link, _ControllerLink(trial_hash, watched)],
            # A lost worker (or an error) restarts the worker group from the last checkpoint.
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    done = threading.Event()
    if watched is not None:
        ray.get(watched.forget.remote(trial_hash))  # beats of an earlier attempt at this trial
        threading.Thread(
            target=_watch, args=(watched, trial_hash, stall_timeout_s, done), name="stall-watchdog", daemon=True
        ).start()
    try:
        trainer.fit()
    except Exception:
        if _train_run.stalled:
            raise TrialStalled(_train_run.stalled) from None
        if _train_run.stopping.is_set():
            return  # Tune stopped this trial and aborted its Train run: not an error
        raise
    finally:
        done.set()
        if watched is not None:
            watched.forget.remote(trial_hash)  # and lets go of its controller's handle
        _train_run.controller = None
        _train_run.queue = None
    if _train_run.stalled:  # aborted between its last report and its end
        raise TrialStalled(_train_run.stalled)


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
        self.controller: Any = None  # the Train controller's actor handle, once it has started
        self.queue: Any = None  # the results queue from the controller to this actor
        self.stopping = threading.Event()
        self.stalled: str | None = None  # why the watchdog aborted the Train run


_train_run = _TrainRunState()


class _TrainRunLink(TuneReportCallback):
    """``TuneReportCallback`` whose results queue the trial actor can drain while aborting."""

    @property
    def results(self) -> Any:
        return self._training_actor_item_queue


class _ControllerLink(ControllerCallback):
    """Runs in the Train controller: as it starts, hands its actor handle to the trial actor
    (and to the study's watchdog, which the trial actor asks while it waits for a result).

    A controller callback, not a user one, so that a trial can be aborted (stopped by Tune, or
    stalled) before its first report; Ray Train runs controller callbacks from ``RunConfig``
    for exactly such extensions.
    """

    def __init__(self, trial_hash: str, watchdog: Any) -> None:
        self._trial_actor = ray.get_runtime_context().current_actor
        self._trial_hash = trial_hash
        self._watchdog = watchdog

    def after_controller_start(self, train_run_context: Any) -> None:
        controller = ray.get_runtime_context().current_actor
        self._trial_actor.register_train_controller.remote(controller)
        if self._watchdog is not None:
            self._watchdog.controller.remote(self._trial_hash, controller)


@ray.remote(num_cpus=0, max_concurrency=64)
class Watchdog:
    """The study's record of each running trial's last heartbeat and Train controller.

    One small actor for the whole study (started by the driver), because the trial actors
    cannot take the messages themselves: Tune keeps a function trainable's actor busy in a
    blocking ``train()`` call until the next result, so anything sent to it waits an epoch.
    """

    def __init__(self) -> None:
        self._beats: dict[str, tuple[float, str]] = {}
        self._controllers: dict[str, Any] = {}

    def beat(self, trial_hash: str, where: str) -> None:
        self._beats[trial_hash] = (time.monotonic(), where)

    def controller(self, trial_hash: str, controller: Any) -> None:
        self._controllers[trial_hash] = controller

    def forget(self, trial_hash: str) -> None:
        self._beats.pop(trial_hash, None)
        self._controllers.pop(trial_hash, None)

    def last_beat(self, trial_hash: str) -> tuple[float, str] | None:
        """Seconds since the trial's last heartbeat and where it was then; None before the first."""
        beat = self._beats.get(trial_hash)
        return None if beat is None else (time.monotonic() - beat[0], beat[1])

    def train_controller(self, trial_hash: str) -> Any:
        return self._controllers.get(trial_hash)


def _register_train_controller(controller: Any) -> None:
    _train_run.controller = controller


def _watch(watchdog: Any, trial_hash: str, timeout_s: float, done: threading.Event) -> None:
    """Abort the Train run once rank 0's heartbeats have stopped for ``timeout_s``.

    The clock starts at the first heartbeat: waiting for resources is not a stall.
    """
    while not done.wait(min(5.0, timeout_s / 4)):
        try:
            last = ray.get(watchdog.last_beat.remote(trial_hash), timeout=60)
        except (ray.exceptions.RayError, TimeoutError):  # the driver, and the watchdog with it, is going
            logger.warning("the stall watchdog is gone; trial %s is no longer watched", trial_hash)
            return
        if last is None or last[0] <= timeout_s:
            continue
        quiet, where = last
        _train_run.stalled = (
            f"stalled: no progress from the workers for {quiet:.0f} s (stall_timeout_s: {timeout_s:g}); "
            f"last seen in {where}"
        )
        logger.warning("%s; aborting the Train run", _train_run.stalled)
        controller = _train_run.controller or ray.get(watchdog.train_controller.remote(trial_hash))
        _abort(controller, _train_run.queue)
        return


def _abort_train_run() -> None:
    """Abort this trial's Train run if it is still going (called from the trial actor's cleanup)."""
    _train_run.stopping.set()
    _abort(_train_run.controller, _train_run.queue)


def _abort(controller: Any, results: Any) -> None:
    """Have the Train controller abort its run (workers, placement group); kill it if it cannot."""
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


def trial_trainable(function: Callable[[dict[str, Any]], None]) -> type:
    """Tune's class for a function trainable, with a cleanup that aborts the trial's Train run."""

    class SweetspotTrial(wrap_function(function)):  # type: ignore[misc]
        # Methods of this class are pickled by value: they may reference module-level functions
        # (pickled by name), but not ``_train_run`` itself (a lock cannot be pickled).
        def register_train_controller(self, controller: Any) -> None:
            _register_train_controller(controller)

        def cleanup(self) -> None:
            _abort_train_run()
            super().cleanup()

    return SweetspotTrial
