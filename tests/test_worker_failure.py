"""A Ray Train worker process killed mid-trial: the trial resumes from its last checkpoint.

Real Ray (the session's local cluster), real MLflow, two gloo workers; the test finds a
training worker's process by its Ray process title (Linux /proc) and SIGKILLs it during the second epoch.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from orchestrator.expand import expand
from orchestrator.launch import StudyOutcome, run_study
from orchestrator.spec import load_study
from orchestrator.tracking import StudyStore

EPOCHS = 4
STUDY = """
name: worker-failure
base:
  model:
    backbone: vit_mini
    placement: last2
    moe: {{experts: 4, top_k: 2}}
  data: {{train_samples: 1600}}
  recipe: {{preset: demo, epochs: {epochs}}}
max_failures: 1
resources: {{workers: 2, cpus_per_worker: 0.5}}
output: {output}
"""
# Every per-epoch metric the trainer promises, and those of the last epoch only.
EPOCH_METRICS = {
    "train_loss",
    "aux_loss",
    "val_top1",
    "val_top5",
    "val_loss",
    "dropped_fraction",
    "expert_load_cv",
    "experts_per_image",
    "images_per_s",
    "lr",
    "resumes",
}
FINAL_METRICS = {"inference_images_per_s"}


def _training_workers() -> list[int]:
    """PIDs of Ray Train worker processes (Ray sets their title to ``ray::RayTrainWorker…``)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:  # not a process, or it just exited
            continue
        if proc.name.isdigit() and cmdline.startswith(b"ray::RayTrainWorker"):
            pids.append(int(proc.name))
    return sorted(pids)


@pytest.mark.ray
def test_killed_worker_resumes_from_its_checkpoint_without_gaps_or_duplicates(
    local_ray: None, tmp_path: Path
) -> None:
    path = tmp_path / "study.yaml"
    path.write_text(STUDY.format(output=tmp_path / "out", epochs=EPOCHS))
    spec, source = load_study(path)
    trials = expand(spec, source)
    store = StudyStore.open(spec)
    outcome: list[StudyOutcome] = []
    thread = threading.Thread(target=lambda: outcome.append(run_study(spec, trials, store)), daemon=True)
    thread.start()

    # Wait until the first epoch is in MLflow, then kill a worker in the middle of the second.
    deadline = time.monotonic() + 240
    killed = None
    while killed is None and time.monotonic() < deadline and thread.is_alive():
        runs = store.trial_runs()
        if runs and store.logged_epochs(next(iter(runs.values())).run_id):
            workers = _training_workers()
            if workers:
                killed = workers[-1]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    assert killed is not None, "the trial never finished its first epoch"
    thread.join(timeout=300)
    assert not thread.is_alive(), "the study did not finish after the worker was killed"
    assert outcome and outcome[0].ok, outcome

    client = MlflowClient(spec.tracking_uri)
    (run,) = [r for r in store.runs()]
    assert run.info.status == "FINISHED"
    for name in EPOCH_METRICS:
        steps = [p.step for p in client.get_metric_history(run.info.run_id, name)]
        assert sorted(steps) == list(range(1, EPOCHS + 1)), name  # no gap, no duplicate
    for name in FINAL_METRICS:
        assert [p.step for p in client.get_metric_history(run.info.run_id, name)] == [EPOCHS]
    resumes = {p.step: p.value for p in client.get_metric_history(run.info.run_id, "resumes")}
    assert resumes[1] == 0 and resumes[EPOCHS] == 1  # restarted once, from a checkpoint
    assert run.data.metrics["val_top1"] > 50  # it learned: ten classes, chance is 10%

    # The routing analysis of the trained model is an artifact of the run.
    artifact = Path(client.download_artifacts(run.info.run_id, "routing.npz", str(tmp_path)))
    with np.load(artifact) as routing:
        assert len(routing["layers"]) == 2  # Last 2
