"""Where a worker's per-epoch metrics and checkpoints go.

The loop only talks to a :class:`Reporter`, so the same code runs under Ray Train
workers (metrics flow to Tune, checkpoints to Ray's storage) and standalone
(``python -m trainer`` / ``torchrun``: JSON lines on stdout, checkpoints in a folder).
Ray is imported lazily: standalone runs never need it.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from trainer.config import TrialConfig
    from trainer.live_metrics import LiveMetrics


class Reporter(Protocol):
    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        """Called by every rank once per epoch; only rank 0 passes a checkpoint."""

    def latest_checkpoint(self) -> AbstractContextManager[Path | None]:
        """A context manager yielding the folder of the last checkpoint, or None."""

    def live_metrics(self, trial: TrialConfig) -> LiveMetrics | None:
        """Where rank 0 publishes metrics during an epoch, if anywhere."""


class RayTrainReporter:
    """Reports through ``ray.train.report``; Train V2 persists checkpoints and restores them.
    During an epoch, rank 0 sets Ray metrics (:mod:`trainer.live_metrics`)."""

    def __init__(self, trial_name: str = "") -> None:
        self.trial_name = trial_name

    def live_metrics(self, trial: TrialConfig) -> LiveMetrics | None:
        from trainer.live_metrics import LiveMetrics

        return LiveMetrics(trial.trial_hash, self.trial_name)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    @contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            yield Path(folder)


class LocalReporter:
    """Standalone runs: metrics as JSON lines (rank 0), checkpoints kept in ``out_dir/checkpoint``."""

    def __init__(self, out_dir: Path, rank: int = 0) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        sink = self.out_dir / "metrics.jsonl"
        lines = sink.read_text().splitlines() if sink.is_file() else []
        self.history: list[dict[str, Any]] = [json.loads(line) for line in lines if line.strip()]

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        if self.rank != 0:
            return
        if any(seen["epoch"] == metrics["epoch"] for seen in self.history):
            return  # a resumed run re-reports its checkpoint's epoch; it is in metrics.jsonl already
        self.history.append(dict(metrics))
        with (self.out_dir / "metrics.jsonl").open("a") as sink:
            sink.write(json.dumps(metrics) + "\n")
        print(json.dumps(metrics), file=sys.stdout, flush=True)
        if checkpoint_dir is not None:
            target = self.out_dir / "checkpoint"
            staging = self.out_dir / "checkpoint.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(checkpoint_dir, staging)
            # Swap in whole so an interrupted copy never replaces a good checkpoint.
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)

    @contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        target = self.out_dir / "checkpoint"
        yield target if target.is_dir() else None

    def live_metrics(self, trial: TrialConfig) -> LiveMetrics | None:
        return None  # standalone: the JSON lines are the record
