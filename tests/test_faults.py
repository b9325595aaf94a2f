"""Faults inside trials: each fails alone, with its reason on record, and the study goes on.

One real ``sweetspot run`` (its own local Ray, real MLflow) of a 4-trial study, two trials at a
time, where three trials go wrong for real:

* a learning rate of 1e30 makes the loss non-finite;
* a batch larger than the training set raises inside the trial (an error only the data shows);
* one trial hangs: the test stops its training process with SIGSTOP once it trains, and the
  stall watchdog (``stall_timeout_s``) must abort it and fail it as stalled.

The fourth trial must finish untouched, and the run must exit 1 with one line per failure.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.expand import expand
from orchestrator.spec import load_study
from trainer.loop import TIMELINE_ENV

STALL_TIMEOUT_S = 20
STUDY = """
name: faults
base:
  model:
    backbone: vit_mini
    moe: {{top_k: 1, capacity_factor: 2.0}}
  data: {{train_samples: 256}}
  recipe: {{epochs: 2, batch_size: 64, lr: 0.003}}
cases:
  - {{lr: 0.002}}          # hangs: SIGSTOPped by the test
  - {{lr: 0.003}}          # fine
  - {{lr: 1.0e+30}}        # diverges: non-finite loss
  - {{batch_size: 512}}    # larger than the training set: an error inside the trial
max_failures: 0
stall_timeout_s: {stall}
resources: {{workers: 1, cpus_per_worker: 0.5, max_concurrent_trials: 2}}
output: {output}
"""
TIMEOUT_S = 420


def _first_step_pid(timeline: Path, trial_hash: str) -> int | None:
    if not timeline.is_file():
        return None
    for line in timeline.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["trial"] == trial_hash and record["event"] == "first_step":
            return int(record["pid"])
    return None


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status  # a zombie is dead, only not yet reaped


@pytest.mark.ray
def test_failing_and_hanging_trials_fail_alone_with_their_reasons(tmp_path: Path) -> None:
    study, timeline = tmp_path / "faults.yaml", tmp_path / "timeline.jsonl"
    study.write_text(STUDY.format(output=tmp_path / "out", stall=STALL_TIMEOUT_S))
    spec, source = load_study(study)
    hangs, fine, diverges, too_big = expand(spec, source)

    process = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "run", str(study)],
        env={**os.environ, TIMELINE_ENV: str(timeline)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    stopped_pid = None
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while stopped_pid is None:
            assert process.poll() is None, f"run ended before the hanging trial trained:\n{process.communicate()[0]}"
            assert time.monotonic() < deadline, "the trial to hang never took its first step"
            stopped_pid = _first_step_pid(timeline, hangs.hash)
            time.sleep(0.2)
        os.kill(stopped_pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        text = process.communicate(timeout=TIMEOUT_S)[0]
    finally:
        if process.poll() is None:
            process.kill()
        if stopped_pid is not None and _alive(stopped_pid):
            os.kill(stopped_pid, signal.SIGKILL)

    assert process.returncode == 1, text
    assert "1 finished, 3 failed, 0 incomplete" in text, text
    assert "Traceback" not in text, text
    failures = {line for line in text.splitlines() if line.startswith("failed ")}
    assert len(failures) == 3, text

    client = MlflowClient(spec.tracking_uri)
    experiment = client.get_experiment_by_name(spec.experiment_name)
    runs = {
        run.data.tags["sweetspot.trial_hash"]: run
        for run in client.search_runs([experiment.experiment_id], "tags.`sweetspot.kind` = 'trial'")
    }
    assert len(runs) == 4
    assert runs[fine.hash].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(runs[fine.hash].info.run_id, "val_top1")] == [1, 2]
    reasons = {}
    for trial in (diverges, too_big, hangs):
        run = runs[trial.hash]
        assert run.info.status == "FAILED", trial.name
        reasons[trial.hash] = run.data.tags["sweetspot.error"]
        assert any(trial.name in line for line in failures), (trial.name, failures)
    assert "non-finite loss" in reasons[diverges.hash]
    assert "batch_size 512 is larger than the 256 training images" in reasons[too_big.hash]
    assert "stalled: no progress from the workers" in reasons[hangs.hash]
    assert f"stall_timeout_s: {STALL_TIMEOUT_S}" in reasons[hangs.hash]
    assert "last seen in " in reasons[hangs.hash]
    # The stalled trial's process was taken down with its Train run, not left stopped forever.
    deadline = time.monotonic() + 30
    while _alive(stopped_pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive(stopped_pid), "the stalled worker is still there"
    assert time.monotonic() - stopped_at >= STALL_TIMEOUT_S
