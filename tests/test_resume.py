"""A study outlives its driver: a second driver is refused, then Ctrl-C, SIGKILL, SIGTERM to the
whole process group, a truncated checkpoint, and a grid that grew. Nothing is lost, and only the
epoch of the truncated checkpoint trains twice.

Each ``sweetspot run`` is a real process (in its own session, as a job under a scheduler) with
its own local Ray, on a 3-trial study that runs one trial at a time. The trainer's timeline
(``SWEETSPOT_TIMELINE``) records every epoch every trial trained, across all the processes.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from trainer.checkpoint import CHECKPOINT_FILE
from trainer.loop import TIMELINE_ENV

STUDY = """
name: resume
base:
  model:
    backbone: vit_mini
    moe: {{top_k: 1, capacity_factor: 2.0}}
  data: {{train_samples: 1024}}
  recipe: {{epochs: 6, batch_size: 64, lr: 0.003}}
grid:
  placement: [none, last2]    # the dense baseline collapses to one trial
  experts: {experts}
max_failures: 0
resources:
  workers: 1
  cpus_per_worker: 0.5
  max_concurrent_trials: 1    # one trial at a time: a deterministic order to interrupt
output: {output}
"""
EPOCHS = 6
TIMEOUT_S = 300


@pytest.fixture
def start() -> Iterator[Callable[[Path, Path], subprocess.Popen[str]]]:
    """``start(study, timeline)``: a ``sweetspot run`` process; any still running at the end is killed."""
    started: list[subprocess.Popen[str]] = []

    def run(study: Path, timeline: Path) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "run", str(study)],
            env={**os.environ, TIMELINE_ENV: str(timeline)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group, like a batch job's
        )
        started.append(process)
        return process

    yield run
    for process in started:
        if process.poll() is None:
            process.kill()
            process.communicate()


class _Runs:
    """The study's trial runs in MLflow, by trial name."""

    def __init__(self, db: Path) -> None:
        self.db = db

    def read(self) -> dict[str, dict]:
        if not self._has_trials():
            return {}
        client = MlflowClient(f"sqlite:///{self.db}")
        experiment = client.get_experiment_by_name("resume")
        if experiment is None:
            return {}
        found = {}
        for run in client.search_runs([experiment.experiment_id]):
            if run.data.tags.get("sweetspot.kind") != "trial":
                continue
            history = client.get_metric_history(run.info.run_id, "val_top1")
            found[run.data.tags["sweetspot.trial_name"]] = {
                "status": run.info.status,
                "end_time": run.info.end_time,
                "epochs": sorted(point.step for point in history),
                "resumes": {p.step: p.value for p in client.get_metric_history(run.info.run_id, "resumes")},
                "hash": run.data.tags["sweetspot.trial_hash"],
                "fallback": run.data.tags.get("sweetspot.checkpoint_fallback", ""),
            }
        return found

    def poll(self) -> dict[str, dict]:
        """Each trial run's status, trial hash and how many epochs it logged, straight from the
        sqlite store: cheap enough to ask four times a second while trials train beside the test."""
        if not self._has_trials():
            return {}
        query = """
            SELECT name.value, run.status, hash.value,
                   (SELECT COUNT(DISTINCT step) FROM metrics
                    WHERE metrics.run_uuid = run.run_uuid AND metrics.key = 'val_top1')
            FROM runs AS run
            JOIN tags AS kind ON kind.run_uuid = run.run_uuid AND kind.key = 'sweetspot.kind' AND kind.value = 'trial'
            JOIN tags AS name ON name.run_uuid = run.run_uuid AND name.key = 'sweetspot.trial_name'
            JOIN tags AS hash ON hash.run_uuid = run.run_uuid AND hash.key = 'sweetspot.trial_hash'
        """
        try:
            with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5) as db:
                rows = db.execute(query).fetchall()
        except sqlite3.OperationalError:
            return {}  # the writer holds the lock: ask again at the next poll
        return {name: {"status": status, "hash": hash_, "epochs": epochs} for name, status, hash_, epochs in rows}

    def wait_for(self, condition: Callable[[dict[str, dict]], bool], process: subprocess.Popen[str]) -> dict:
        """Poll until ``condition(self.poll())``; that poll. ``epochs`` there is a count."""
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            runs = self.poll()
            if condition(runs):
                return runs
            if process.poll() is not None:
                pytest.fail(f"run exited ({process.returncode}) before the moment to interrupt it:\n{_output(process)}")
            time.sleep(0.25)
        process.kill()
        pytest.fail(f"timed out waiting; runs: {self.read()}\n{_output(process)}")

    def _has_trials(self) -> bool:
        """Whether the run created a trial run yet: before that, its MLflow may still be creating
        the database's tables, and a client opened now would race it to create them."""
        if not self.db.is_file():
            return False
        try:
            with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True) as db:
                return db.execute("SELECT 1 FROM tags WHERE key = 'sweetspot.kind' AND value = 'trial'").fetchone() is not None
        except sqlite3.Error:
            return False


def _wait(condition: Callable[[], bool], process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"run exited ({process.returncode}) before the moment to kill it:\n{_output(process)}")
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting for an epoch to be trained")
        time.sleep(0.1)


def _output(process: subprocess.Popen[str]) -> str:
    return process.communicate(timeout=60)[0] if process.stdout else ""


def _trained_epochs(timeline: Path, between: tuple[float, float] = (0.0, math.inf)) -> dict[str, list[int]]:
    """Every epoch each trial (by hash) finished training (at a time ``between``), in every
    process, in order."""
    trained: dict[str, list[int]] = {}
    for line in timeline.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line a trainer is writing right now
        if record["event"] == "epoch_end" and between[0] < record["time"] < between[1]:
            trained.setdefault(record["trial"], []).append(record["epoch"])
    return trained


def _truncate_latest_checkpoint(train_runs: Path, trial_hash: str) -> int:
    """Cut the trial's latest checkpoint (as Ray Train's snapshot records it) in half, as a node
    lost mid-write leaves it; its epoch."""
    [run] = [folder for folder in train_runs.iterdir() if trial_hash.startswith(folder.name.removeprefix("trial-"))]
    latest = json.loads((run / "checkpoint_manager_snapshot.json").read_text())["latest_checkpoint_result"]
    state = run / latest["checkpoint_dir_name"] / CHECKPOINT_FILE
    with state.open("r+b") as file:
        file.truncate(state.stat().st_size // 2)
    return int(latest["metrics"]["epoch"])


@pytest.mark.ray
def test_a_study_survives_its_drivers_and_only_new_trials_train(
    tmp_path: Path, start: Callable[[Path, Path], subprocess.Popen[str]]
) -> None:
    study, timeline, output = tmp_path / "resume.yaml", tmp_path / "timeline.jsonl", tmp_path / "out"
    study.write_text(STUDY.format(experts="[2, 4]", output=output))
    runs = _Runs(output / "mlflow.db")

    # 1. While the study runs, a second `sweetspot run` of it is refused at once (no duplicate trials).
    first = start(study, timeline)
    runs.wait_for(lambda r: any(t["status"] == "RUNNING" for t in r.values()), first)
    second = start(study, timeline)
    text = _output(second)
    assert second.returncode == 2, text
    assert "study 'resume' is already being run by `sweetspot run` pid" in text and "Traceback" not in text

    # 2. Ctrl-C while the second trial trains: it is stopped cleanly and marked KILLED; exit 130.
    before_ctrl_c = runs.wait_for(
        lambda r: sum(t["status"] == "FINISHED" for t in r.values()) == 1
        and any(t["status"] == "RUNNING" and t["epochs"] for t in r.values()),
        first,
    )
    first.send_signal(signal.SIGINT)
    text = _output(first)
    assert first.returncode == 130, text
    assert "interrupted: unfinished trials are marked KILLED" in text
    after_ctrl_c = runs.read()
    [done] = [name for name, t in after_ctrl_c.items() if t["status"] == "FINISHED"]
    [interrupted] = [name for name, t in before_ctrl_c.items() if t["status"] == "RUNNING"]
    interrupted_hash = before_ctrl_c[interrupted]["hash"]
    assert after_ctrl_c[interrupted]["status"] == "KILLED"
    assert len(after_ctrl_c) == 2  # the third trial never started

    # 3. SIGKILL the driver as soon as the interrupted trial trained an epoch from its checkpoint.
    resumed_from = max(after_ctrl_c[interrupted]["epochs"])
    trained_before = len(_trained_epochs(timeline)[interrupted_hash])
    third = start(study, timeline)
    _wait(lambda: len(_trained_epochs(timeline).get(interrupted_hash, [])) > trained_before, third)
    third.kill()
    third.communicate(timeout=60)

    # 4. SIGTERM to the driver's whole process group (a batch scheduler ending the job) once the
    # trial trained one more epoch: the driver, its Ray and the trial's worker all get it.
    trained_before = len(_trained_epochs(timeline)[interrupted_hash])
    fourth = start(study, timeline)
    _wait(lambda: len(_trained_epochs(timeline).get(interrupted_hash, [])) > trained_before, fourth)
    sigterm_at = time.time()
    os.killpg(fourth.pid, signal.SIGTERM)
    text = fourth.communicate(timeout=120)[0]
    # Its local Ray went down with the signal: the driver does not wait for it (Ray's client would
    # hang for a minute, then abort), it marks the trial KILLED and exits at once.
    assert fourth.returncode == 128 + signal.SIGTERM, text
    assert "stopped by SIGTERM: unfinished trials are marked KILLED" in text and "Traceback" not in text, text
    assert time.time() - sigterm_at < 30, text
    assert runs.poll()[interrupted]["status"] == "KILLED"
    # ... and its last checkpoint is cut short, as if the node died while writing it.
    truncated = _truncate_latest_checkpoint(output / "ray" / "train", interrupted_hash)

    # 5. A value added to the grid: one more trial. The next run finishes the study.
    study.write_text(STUDY.format(experts="[2, 4, 8]", output=output))
    fifth_started = time.time()
    fifth = start(study, timeline)
    text = fifth.communicate(timeout=TIMEOUT_S)[0]
    assert fifth.returncode == 0, text
    assert "1 trials already FINISHED in MLflow: skipped." in text

    final = runs.read()
    assert len(final) == 4 and all(t["status"] == "FINISHED" for t in final.values()), final
    assert all(t["epochs"] == list(range(1, EPOCHS + 1)) for t in final.values())
    # The finished trial was not touched again.
    assert final[done]["end_time"] == after_ctrl_c[done]["end_time"]
    # Every trial trained each of its epochs exactly once, over all the runs together, except the one
    # that went through the faults: it trained every epoch, the truncated checkpoint's epoch again
    # (the resume fell back to the checkpoint before), and at most one more epoch per fault that
    # ended a driver: the one a SIGKILLed driver's controller never recorded, the one the SIGTERMed
    # worker may finish while its node goes down (it then stops at its next step).
    trained = _trained_epochs(timeline)
    every_epoch = list(range(1, EPOCHS + 1))
    others = {name: sorted(trained[t["hash"]]) for name, t in final.items() if name != interrupted}
    assert others == {name: every_epoch for name in others}
    faulty = sorted(trained[interrupted_hash])
    assert set(faulty) == set(every_epoch) and faulty.count(truncated) >= 2, faulty
    assert len(faulty) <= EPOCHS + 3, faulty
    late = _trained_epochs(timeline, between=(sigterm_at, fifth_started)).get(interrupted_hash, [])
    assert len(late) <= 1, late
    assert "checkpoint_" in final[interrupted]["fallback"] and "state.pt" in final[interrupted]["fallback"]
    # Its MLflow history says so too: epochs up to the first interrupt from the first start, the
    # last one after a restart from a checkpoint (the count of restarts is in the checkpoints,
    # so a start killed before it saved one is not counted).
    resumes = final[interrupted]["resumes"]
    assert all(resumes[epoch] == 0 for epoch in range(1, resumed_from + 1))
    assert resumes[EPOCHS] >= 1
    new = [name for name in final if name not in after_ctrl_c]
    assert all(set(final[name]["resumes"].values()) == {0} for name in new)
