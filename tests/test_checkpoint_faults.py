"""Checkpoint faults, injected for real: a full disk under Ray's storage, then a truncated checkpoint.

One 3-epoch trial, run twice through ``run_study`` (what ``sweetspot run`` calls) on the session's
local Ray, real Ray Train and MLflow:

1. The study's ``storage_path`` is a small tmpfs this test mounts. Once Ray has registered the
   checkpoints of epochs 1 and 2, the test fills the tmpfs, so the upload of epoch 3's checkpoint
   fails with ENOSPC in the worker.
2. The test frees the space and truncates the latest checkpoint's file (epoch 2), as a crash
   before the storage had it all would; the run with ``retry_failed`` (``sweetspot run
   --retry-failed``) must resume from epoch 1's checkpoint.

Needs root (``mount -t tmpfs``); skipped with the reason where mounting is not permitted.
"""

from __future__ import annotations

import errno
import json
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mlflow.entities import Run

from orchestrator.expand import expand
from orchestrator.launch import StudyOutcome, run_study
from orchestrator.spec import load_study
from orchestrator.status import last_line
from orchestrator.tags import TAG_CHECKPOINT_FALLBACK, TAG_ERROR
from orchestrator.tracking import StudyStore
from trainer.checkpoint import CHECKPOINT_FILE, load_state

EPOCHS = 3
STUDY = """
name: checkpoint-faults
base:
  model:
    backbone: vit_mini
    placement: last2
    moe: {{experts: 4, top_k: 2}}
  data: {{train_samples: 512}}
  recipe: {{epochs: {epochs}, batch_size: 64, lr: 0.003}}
max_failures: 0
resources: {{workers: 1, cpus_per_worker: 1}}
output: {output}
storage_path: {storage}
"""
TMPFS_SIZE = "32m"  # two checkpoints of this model take 12 MB
WAIT_S = 300
NO_SPACE = "No space left on device"


def _fill(folder: Path) -> Path:
    """Write zeros into ``folder`` until its filesystem is full."""
    filler = folder / "filler"
    chunk = b"\0" * (1 << 20)
    with filler.open("wb", buffering=0) as sink:
        try:
            while True:
                sink.write(chunk)
        except OSError as error:
            assert error.errno == errno.ENOSPC, error
    return filler


@pytest.fixture(scope="module")
def tmpfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A small tmpfs of its own, unmounted afterwards whatever happens."""
    mountpoint = tmp_path_factory.mktemp("tmpfs")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(mountpoint)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or mounted.returncode}): needs root")
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)  # a straggler still holds a file


@dataclass(frozen=True)
class Study:
    spec: Any
    trials: list[Any]
    store: StudyStore
    storage: Path  # the tmpfs

    def run_dir(self) -> Path | None:
        """The trial's Ray Train run folder (one trial, one folder)."""
        found = sorted((self.storage / "train").glob("trial-*"))
        return found[0] if found else None

    def registered(self) -> list[Path]:
        """The checkpoints Ray Train has registered, oldest first (from its snapshot file)."""
        run_dir = self.run_dir()
        snapshot = run_dir / "checkpoint_manager_snapshot.json" if run_dir else None
        if snapshot is None or not snapshot.is_file():
            return []
        try:
            state = json.loads(snapshot.read_text())
        except ValueError:  # being written
            return []
        return [run_dir / result["checkpoint_dir_name"] for result in state["checkpoint_results"]]

    def trial_run(self) -> Run:
        (run,) = self.store.runs()
        return run


@dataclass(frozen=True)
class DiskFull:
    """What the first run left: its exit code and output, and the checkpoint folders."""

    study: Study
    outcome: StudyOutcome
    registered: list[Path]  # Ray's registered checkpoints after the failure, oldest first
    leftovers: list[Path]  # checkpoint folders Ray never registered


@pytest.fixture(scope="module")
def disk_full(local_ray: None, tmpfs: Path, tmp_path_factory: pytest.TempPathFactory) -> DiskFull:
    folder = tmp_path_factory.mktemp("study")
    path = folder / "study.yaml"
    path.write_text(STUDY.format(epochs=EPOCHS, output=folder / "out", storage=tmpfs))
    spec, source = load_study(path)
    study = Study(spec, expand(spec, source), StudyStore.open(spec), tmpfs)

    def fill_after_epoch_2(done: threading.Event, filled: threading.Event) -> None:
        deadline = time.monotonic() + WAIT_S
        while len(study.registered()) < 2 and not done.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        if len(study.registered()) >= 2:
            _fill(tmpfs)  # epoch 3 is training now: its checkpoint has nowhere to go
            filled.set()

    done, filled = threading.Event(), threading.Event()
    filler = threading.Thread(target=fill_after_epoch_2, args=(done, filled), daemon=True)
    filler.start()
    try:
        outcome = run_study(spec, study.trials, study.store)
    finally:
        done.set()
        filler.join()
    assert filled.is_set(), f"the trial never checkpointed epoch 2: {outcome}"
    registered = study.registered()
    run_dir = study.run_dir()
    assert run_dir is not None
    leftovers = sorted(
        {folder for folder in run_dir.glob("checkpoint_*") if folder.is_dir()} - set(registered)
    )
    return DiskFull(study, outcome, registered, leftovers)


@pytest.mark.ray
def test_disk_full_fails_the_trial_with_the_reason_and_keeps_its_checkpoints(disk_full: DiskFull) -> None:
    study, outcome = disk_full.study, disk_full.outcome
    (trial,) = study.trials
    assert list(outcome.failed) == [trial.hash] and not outcome.incomplete, outcome
    # The line `sweetspot run` prints for the failure says where, and that the disk is full.
    line = last_line(outcome.failed[trial.hash])
    assert line.startswith("OSError: [Errno 28] cannot save the checkpoint of epoch 3 in "), line
    assert str(study.storage) in line and line.endswith(NO_SPACE), line

    run = study.trial_run()
    assert run.info.status == "FAILED"
    assert last_line(run.data.tags[TAG_ERROR]) == line
    assert study.store.logged_epochs(run.info.run_id) == {1, 2}

    # The checkpoints of epochs 1 and 2 are intact.
    assert [load_state(folder)["epoch"] for folder in disk_full.registered] == [0, 1]
    # What Ray Train leaves behind: epoch 3's half-written folder, newer than its latest checkpoint.
    assert [folder.name > disk_full.registered[-1].name for folder in disk_full.leftovers] == [True]


@dataclass(frozen=True)
class Retried:
    outcome: StudyOutcome
    truncated: Path  # the checkpoint whose file the test truncated


@pytest.fixture(scope="module")
def retried(disk_full: DiskFull) -> Retried:
    study = disk_full.study
    (study.storage / "filler").unlink()
    truncated = disk_full.registered[-1]
    data = (truncated / CHECKPOINT_FILE).read_bytes()
    (truncated / CHECKPOINT_FILE).write_bytes(data[: len(data) // 2])
    return Retried(run_study(study.spec, study.trials, study.store, retry_failed=True), truncated)


@pytest.mark.ray
def test_retry_after_freeing_space_resumes_from_the_newest_checkpoint_that_loads(
    disk_full: DiskFull, retried: Retried
) -> None:
    assert retried.outcome.ok and len(retried.outcome.finished) == 1, retried.outcome

    run = disk_full.study.trial_run()
    assert run.info.status == "FINISHED"
    client = disk_full.study.store.client
    for name in ("train_loss", "val_top1", "resumes"):
        steps = [point.step for point in client.get_metric_history(run.info.run_id, name)]
        assert sorted(steps) == list(range(1, EPOCHS + 1)), name  # every epoch once
    # It resumed from a checkpoint (from scratch, epoch 3 would say 0)...
    resumes = {point.step: point.value for point in client.get_metric_history(run.info.run_id, "resumes")}
    assert resumes[1] == resumes[2] == 0 and resumes[3] == 1
    # ... epoch 1's, as the run records: which checkpoint did not load, why, and where it resumed from.
    fallback = run.data.tags[TAG_CHECKPOINT_FALLBACK]
    assert re.match(r"resumed from \S+checkpoint_\S+ \(epoch 1\) because 1 newer checkpoint", fallback), (
        fallback
    )
    assert f"{retried.truncated}: {CHECKPOINT_FILE} (" in fallback and "cannot be read" in fallback

    # Epoch 2 was trained again: Ray now keeps two new checkpoints (epochs 2 and 3), the truncated
    # one is gone, and so is the half-written folder of the failed upload.
    kept = disk_full.study.registered()
    assert [load_state(folder)["epoch"] for folder in kept] == [1, EPOCHS - 1]
    assert all(folder.name > retried.truncated.name for folder in kept)
    assert not retried.truncated.exists()
    assert not any(folder.exists() for folder in disk_full.leftovers)
