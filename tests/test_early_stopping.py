"""Early stopping: the study's ``scheduler`` (ASHA) and ``stop`` rule.

Unit tests (no Ray) pin the schema, the Tune objects built from it and how the tracking
callback tells a trial stopped early from one that ran all its epochs. One real study
(Ray Tune + Ray Train + MLflow) checks that stopped trials are FINISHED with their reason,
are skipped by the next run, and leave no Ray Train actor holding CPUs behind.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import ray
from mlflow.tracking import MlflowClient
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from orchestrator.expand import Trial, expand
from orchestrator.launch import StopRule, StudyOutcome, build_scheduler, build_stopper, run_study
from orchestrator.source import StudyError
from orchestrator.spec import SchedulerSpec, StopSpec, StudySpec, load_study
from orchestrator.tracking import (
    TAG_STOP_REASON,
    TAG_STOP_WARNING,
    TAG_STOPPED_EARLY,
    MLflowTracking,
    StudyStore,
)


def _study(tmp_path: Path, text: str) -> tuple[StudySpec, list[Trial]]:
    path = tmp_path / "study.yaml"
    path.write_text(text)
    spec, source = load_study(path)
    return spec, expand(spec, source)


def _problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "study.yaml"
    path.write_text(text)
    with pytest.raises(StudyError) as error:
        load_study(path)
    return [str(p).removeprefix(f"{path}:") for p in error.value.problems]


# ---------------------------------------------------------------------------------------------
# The schema


def test_early_stopping_is_off_by_default(tmp_path: Path) -> None:
    spec, trials = _study(tmp_path, "name: s\n")
    assert spec.scheduler is None and spec.stop is None
    assert build_scheduler(spec, trials) is None and build_stopper(spec) is None


def test_scheduler_and_stop_rule_are_read_with_defaults(tmp_path: Path) -> None:
    spec, _ = _study(
        tmp_path,
        "name: s\n"
        "scheduler: {metric: val_loss, mode: min}\n"
        "stop: {metric: val_top1, mode: max, threshold: 99}\n",
    )
    assert spec.scheduler == SchedulerSpec(
        kind="asha", metric="val_loss", mode="min", grace_period=1, reduction_factor=4
    )
    assert spec.stop == StopSpec(metric="val_top1", mode="max", threshold=99.0)
    assert isinstance(spec.stop.threshold, float)


@pytest.mark.parametrize(
    ("yaml", "expected"),
    [
        ("scheduler: {metric: val_top1, mode: maximum}", "scheduler.mode: Input should be 'max' or 'min'"),
        (
            "scheduler: {metric: val_top1, mode: max, grace_period: 0}",
            "scheduler.grace_period: Input should be greater than or equal to 1",
        ),
        (
            "scheduler: {metric: val_top1, mode: max, reduction_factor: 1}",
            "scheduler.reduction_factor: Input should be greater than or equal to 2",
        ),
        ("scheduler: {kind: pbt, metric: val_top1, mode: max}", "scheduler.kind: Input should be 'asha'"),
        ("scheduler: {mode: max}", "scheduler.metric: required field is missing"),
        (
            "scheduler: {metric: val_top1, mode: max, grace_perod: 2}",
            "unknown field 'grace_perod'; did you mean 'grace_period'?",
        ),
        ("stop: {metric: val_top1, mode: up, threshold: 99}", "stop.mode: Input should be 'max' or 'min'"),
        ("stop: {metric: val_top1, mode: max}", "stop.threshold: required field is missing"),
        ("stop: {metric: val_top1, mode: max, threshold: high}", "stop.threshold: Input should be a valid number"),
        ("stop: {metric: '', mode: max, threshold: 1}", "stop.metric: String should have at least 1 character"),
    ],
)
def test_bad_early_stopping_settings_are_located(tmp_path: Path, yaml: str, expected: str) -> None:
    problems = _problems(tmp_path, f"name: s\nseeds: [0]\n{yaml}\n")
    assert len(problems) == 1, problems
    assert problems[0].startswith("3:"), problems
    assert expected in problems[0], problems


def test_early_stopping_does_not_change_the_trial_hash(tmp_path: Path) -> None:
    _, plain = _study(tmp_path, "name: s\ngrid: {experts: [4, 8]}\n")
    _, stopped = _study(
        tmp_path,
        "name: s\ngrid: {experts: [4, 8]}\n"
        "scheduler: {metric: val_top1, mode: max, grace_period: 2}\n"
        "stop: {metric: val_top1, mode: max, threshold: 90}\n",
    )
    assert [t.hash for t in plain] == [t.hash for t in stopped]


# ---------------------------------------------------------------------------------------------
# Tune objects built from the spec


def test_stop_rule_compares_in_the_direction_of_its_mode() -> None:
    high = StopRule(StopSpec(metric="val_top1", mode="max", threshold=90))
    assert not high("t", {"val_top1": 89.9}) and high("t", {"val_top1": 90.0}) and high("t", {"val_top1": 95})
    low = StopRule(StopSpec(metric="val_loss", mode="min", threshold=0.5))
    assert low("t", {"val_loss": 0.5}) and not low("t", {"val_loss": 0.51})
    # A result without the metric (or with NaN) never stops a trial; the rule never ends the study.
    assert not high("t", {"val_loss": 0.1}) and not high("t", {"val_top1": float("nan")})
    assert not high.stop_all()
    assert high.rule.describe() == "val_top1 >= 90" and low.rule.describe() == "val_loss <= 0.5"


def _fake_trial(trial_id: str) -> Any:
    return SimpleNamespace(trial_id=trial_id)


def test_asha_uses_epochs_up_to_the_longest_trial(tmp_path: Path) -> None:
    spec, trials = _study(
        tmp_path,
        "name: s\ngrid: {epochs: [3, 9]}\n"
        "scheduler: {metric: val_top1, mode: max, grace_period: 1, reduction_factor: 3}\n",
    )
    scheduler = build_scheduler(spec, trials)
    assert isinstance(scheduler, ASHAScheduler)
    assert scheduler._time_attr == "epoch" and scheduler._max_t == 9
    assert scheduler.metric == "val_top1" and scheduler._mode == "max"
    assert [milestone for milestone, _ in scheduler._brackets[0]._rungs] == [9, 3, 1]

    # The first trial at a rung continues; a worse one arriving after it is stopped, a better one is not.
    good, bad, better = (_fake_trial(name) for name in ("good", "bad", "better"))
    for trial in (good, bad, better):
        scheduler.on_trial_add(None, trial)
    assert scheduler.on_trial_result(None, good, {"epoch": 1, "val_top1": 60.0}) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, bad, {"epoch": 1, "val_top1": 10.0}) == TrialScheduler.STOP
    assert scheduler.on_trial_result(None, better, {"epoch": 1, "val_top1": 80.0}) == TrialScheduler.CONTINUE
    # A result without the metric is skipped rather than judged.
    assert scheduler.on_trial_result(None, better, {"epoch": 2}) == TrialScheduler.CONTINUE


def test_asha_grace_period_longer_than_the_trials_never_stops_early(tmp_path: Path) -> None:
    spec, trials = _study(
        tmp_path,
        "name: s\nbase: {recipe: {epochs: 2}}\nscheduler: {metric: val_loss, mode: min, grace_period: 5}\n",
    )
    scheduler = build_scheduler(spec, trials)
    assert scheduler is not None and scheduler._max_t == 5 and scheduler._mode == "min"


# ---------------------------------------------------------------------------------------------
# The tracking callback: stopped early, ran all epochs, or neither


class _FakeStore:
    """The part of StudyStore the callback uses, in memory."""

    def __init__(self) -> None:
        self.status: dict[str, str] = {}
        self.tags: dict[str, dict[str, str]] = {}
        self.epochs: dict[str, list[int]] = {}
        self.errors: dict[str, str] = {}

    def start_trial(self, trial: Trial, parent_run_id: str) -> str:
        self.status[trial.hash] = "RUNNING"
        self.tags[trial.hash], self.epochs[trial.hash] = {}, []
        return trial.hash

    def logged_epochs(self, run_id: str) -> set[int]:
        return set(self.epochs[run_id])

    def log_epoch(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        self.epochs[run_id].append(step)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.tags[run_id].update(tags)

    def finish(self, run_id: str, status: str, error: str | None = None) -> None:
        self.status[run_id] = status
        if error:
            self.errors[run_id] = error


def _tune_trial(trial: Trial) -> Any:
    return SimpleNamespace(config={"sweetspot": {"hash": trial.hash}})


def _replay(callback: MLflowTracking, trial: Trial, results: list[dict[str, Any]]) -> None:
    tune_trial = _tune_trial(trial)
    callback.on_trial_start(0, [], tune_trial)
    for result in results:
        callback.on_trial_result(0, [], tune_trial, dict(result))
    callback.on_trial_complete(0, [], tune_trial)


def test_tracking_tells_stopped_early_from_ran_all_epochs(tmp_path: Path) -> None:
    spec, trials = _study(
        tmp_path,
        "name: s\ngrid: {lr: [0.1, 0.01, 0.001, 0.0001, 0.00001]}\nbase: {recipe: {epochs: 4}}\n"
        "scheduler: {metric: val_top1, mode: max, grace_period: 1}\n"
        "stop: {metric: val_top1, mode: max, threshold: 95}\n",
    )
    store = _FakeStore()
    events: list[tuple[str, str, dict]] = []
    callback = MLflowTracking(
        store,  # type: ignore[arg-type]
        "parent",
        {t.hash: t for t in trials},
        lambda event, trial, details: events.append((event, trial.hash, details)),
        scheduler=spec.scheduler,
        stop=spec.stop,
    )
    full, by_rule, by_asha, asha_at_the_end, vanished = trials

    def epoch(n: int, top1: float, done: bool = False) -> dict[str, Any]:
        return {"epoch": n, "epochs_total": 4, "val_top1": top1, "train_loss": 1.0, "done": done}

    _replay(callback, full, [epoch(1, 50), epoch(2, 60), epoch(3, 70), epoch(4, 80)])
    # Tune marks the result it stops a trial after as done (stop rule first, then the scheduler).
    _replay(callback, by_rule, [epoch(1, 90), epoch(2, 96, done=True)])
    _replay(callback, by_asha, [epoch(1, 10, done=True)])
    # ASHA also stops every trial that reaches max_t: that trial ran all its epochs.
    _replay(callback, asha_at_the_end, [epoch(1, 50), epoch(2, 60), epoch(3, 70), epoch(4, 96, done=True)])
    # Short of its epochs without a stop decision: not silently done.
    _replay(callback, vanished, [epoch(1, 50)])

    assert callback.outcomes == {
        full.hash: "FINISHED",
        by_rule.hash: "FINISHED",
        by_asha.hash: "FINISHED",
        asha_at_the_end.hash: "FINISHED",
        vanished.hash: "FAILED",
    }
    assert callback.stopped == {
        by_rule.hash: "stop rule val_top1 >= 95 at epoch 2",
        by_asha.hash: "asha at epoch 1",
    }
    for trial in (by_rule, by_asha):
        assert store.tags[trial.hash][TAG_STOPPED_EARLY] == "true"
        assert store.tags[trial.hash][TAG_STOP_REASON] == callback.stopped[trial.hash]
    for trial in (full, asha_at_the_end, vanished):
        assert TAG_STOPPED_EARLY not in store.tags[trial.hash]
    assert store.epochs[by_rule.hash] == [1, 2] and store.epochs[asha_at_the_end.hash] == [1, 2, 3, 4]
    error = store.errors[vanished.hash]
    assert "ended after epoch 1 of 4 without an error or an early-stopping decision" in error
    finished = {h: d for event, h, d in events if event == "finished"}
    assert finished[by_asha.hash] == {"stopped_early": "asha at epoch 1"} and finished[full.hash] == {}


def test_a_resumed_trial_stopped_on_its_restored_epoch_is_stopped_early(tmp_path: Path) -> None:
    spec, (trial,) = _study(
        tmp_path, "name: s\nbase: {recipe: {epochs: 4}}\nstop: {metric: val_top1, mode: max, threshold: 50}\n"
    )
    store = _FakeStore()
    callback = MLflowTracking(store, "parent", {trial.hash: trial}, stop=spec.stop)  # type: ignore[arg-type]
    tune_trial = _tune_trial(trial)
    callback.on_trial_start(0, [], tune_trial)
    store.epochs[trial.hash] = [1, 2]
    callback.logged[trial.hash] = {1, 2}  # logged by the run that was interrupted
    # Its first result repeats the checkpoint's epoch: not logged again, but the rule applies.
    callback.on_trial_result(0, [], tune_trial, {"epoch": 2, "val_top1": 55.0, "done": True})
    callback.on_trial_complete(0, [], tune_trial)
    assert callback.stopped == {trial.hash: "stop rule val_top1 >= 50 at epoch 2"}
    assert store.epochs[trial.hash] == [1, 2] and store.status[trial.hash] == "FINISHED"


def test_a_metric_the_trials_do_not_report_is_warned_about_once(tmp_path: Path) -> None:
    spec, trials = _study(
        tmp_path, "name: s\ngrid: {lr: [0.1, 0.01]}\nscheduler: {metric: val_top, mode: max}\n"
    )
    store = _FakeStore()
    by_hash = {t.hash: t for t in trials}
    callback = MLflowTracking(store, "parent", by_hash, scheduler=spec.scheduler)  # type: ignore[arg-type]
    for trial in trials:
        _replay(callback, trial, [{"epoch": n, "val_top1": 50.0} for n in (1, 2, 3)])
    first, second = trials
    assert "scheduler.metric 'val_top' is not among the metrics" in store.tags[first.hash][TAG_STOP_WARNING]
    assert TAG_STOP_WARNING not in store.tags[second.hash]
    assert callback.outcomes == {first.hash: "FINISHED", second.hash: "FINISHED"} and not callback.stopped


# ---------------------------------------------------------------------------------------------
# One real study

EPOCHS = 4
STUDY = """
name: early-stopping
base:
  model: {{backbone: vit_mini, placement: none}}
  data: {{train_samples: 256}}
  recipe: {{epochs: {epochs}, batch_size: 64}}
grid:
  epochs: [1, {epochs}]
# Deterministic: the {epochs}-epoch trial is stopped after its first epoch (its first result);
# the 1-epoch trial reaches the threshold on its last epoch, which is not early. ASHA is
# configured (so Tune runs with a scheduler) but could only act at the last epoch.
scheduler: {{kind: asha, metric: val_top1, mode: max, grace_period: {epochs}, reduction_factor: 2}}
stop: {{metric: epoch, mode: max, threshold: 1}}
max_failures: 0
resources: {{workers: 1, cpus_per_worker: 0.5, max_concurrent_trials: 2}}
output: {output}
"""
# Actors of a trial: its Tune actor, its Train controller and workers, their helpers.
TRIAL_ACTOR_TITLES = (
    b"ray::SweetspotTrial",
    b"ray::TrainController",
    b"ray::RayTrainWorker",
    b"ray::PlacementGroupCleaner",
    b"ray::_QueueActor",
)


def _ppid(pid: int) -> int:
    return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])


def _session_actors() -> list[str]:
    """Titles of this test session's Ray worker processes (children of its raylet) that belong to trials."""
    titles: dict[int, bytes] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                titles[int(proc.name)] = (proc / "cmdline").read_bytes()
            except OSError:  # exited meanwhile
                continue
    found = []
    for pid, title in titles.items():
        try:
            raylet = _ppid(pid)
            ours = "raylet" in titles.get(raylet, b"").split(b"\0")[0].decode(errors="replace") and (
                _ppid(raylet) == os.getpid()
            )
        except (OSError, ValueError, IndexError):
            continue
        if ours and title.startswith(TRIAL_ACTOR_TITLES):
            found.append(title.split(b"\0")[0].decode(errors="replace"))
    return found


def _wait_for_all_cpus(timeout_s: float) -> tuple[float, float]:
    total = ray.cluster_resources()["CPU"]
    deadline = time.monotonic() + timeout_s
    while True:
        available = ray.available_resources().get("CPU", 0.0)
        if available == total or time.monotonic() > deadline:
            return available, total
        time.sleep(0.5)


@pytest.mark.ray
def test_stopped_trials_are_finished_with_reason_skipped_next_time_and_leak_no_actors(
    local_ray: None, tmp_path: Path
) -> None:
    spec, trials = _study(tmp_path, STUDY.format(epochs=EPOCHS, output=tmp_path / "out"))
    assert len(trials) == 2
    store = StudyStore.open(spec)

    outcome = run_study(spec, trials, store)

    long_trials = {t.hash for t in trials if t.config.recipe.epochs == EPOCHS}
    assert outcome.ok, outcome
    assert sorted(outcome.finished) == sorted(t.hash for t in trials)
    assert sorted(outcome.stopped) == sorted(long_trials)
    assert not outcome.failed and not outcome.incomplete

    client = MlflowClient(spec.tracking_uri)
    runs = {run.data.tags["sweetspot.trial_hash"]: run for run in store.runs()}
    assert sorted(runs) == sorted(t.hash for t in trials)
    for trial in trials:
        run = runs[trial.hash]
        steps = sorted(p.step for p in client.get_metric_history(run.info.run_id, "val_top1"))
        assert run.info.status == "FINISHED", (trial.name, run.info.status)
        if trial.hash in long_trials:
            assert steps == [1], steps  # fewer epochs than its epochs_total
            assert run.data.params["recipe.epochs"] == str(EPOCHS)
            assert run.data.tags[TAG_STOPPED_EARLY] == "true"
            assert run.data.tags[TAG_STOP_REASON] == "stop rule epoch >= 1 at epoch 1"
            assert "inference_images_per_s" not in run.data.metrics  # the last epoch never ran
        else:
            assert steps == [1]  # reached the threshold on its last epoch: ran all its epochs
            assert TAG_STOPPED_EARLY not in run.data.tags and TAG_STOP_REASON not in run.data.tags
            assert "inference_images_per_s" in run.data.metrics
        assert TAG_STOP_WARNING not in run.data.tags

    # No Ray Train worker, controller or trial actor outlives the study or keeps its CPUs.
    available, total = _wait_for_all_cpus(timeout_s=30)
    assert available == total, f"{available} of {total} CPUs available after the study"
    leftover = [pg for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]
    assert not leftover, leftover
    deadline = time.monotonic() + 30
    while _session_actors() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _session_actors(), _session_actors()

    # A stopped trial is done: the next run launches nothing.
    again: StudyOutcome = run_study(spec, trials, store)
    assert sorted(again.skipped) == sorted(t.hash for t in trials)
    assert not again.finished and not again.stopped
    assert len(store.runs()) == len(trials)
