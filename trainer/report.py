"""Where a worker's per-epoch metrics and checkpoints go.

The loop only talks to a :class:`Reporter`, so the same code runs under Ray Train
workers (metrics flow to Tune, checkpoints to Ray's storage) and standalone
(``python -m trainer`` / ``torchrun``: JSON lines on stdout, checkpoints in a folder).
Ray is imported lazily: standalone runs never need it.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import shutil
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from trainer.checkpoint import Candidate, LocalCandidate
from trainer.heartbeat import Heartbeat

if TYPE_CHECKING:
    from trainer.config import TrialConfig
    from trainer.live_metrics import LiveMetrics

# Ray Train names a run's checkpoint folders ``checkpoint_<date>_<time>.<microseconds>``, and
# lists those it registered, in order, in its run's snapshot file (ray.train.v2._internal.constants).
RAY_CHECKPOINT_PREFIX = "checkpoint_"
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"

logger = logging.getLogger(__name__)


class Reporter(Protocol):
    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        """Called by every rank once per epoch; only rank 0 passes a checkpoint."""

    def latest_checkpoint(self) -> AbstractContextManager[Path | None]:
        """A context manager yielding the folder of the last checkpoint, or None."""

    def checkpoints(self) -> list[Candidate]:
        """The checkpoints a resume may load, newest first (asked on rank 0 only)."""

    def live_metrics(self, trial: TrialConfig) -> LiveMetrics | None:
        """Where rank 0 publishes metrics during an epoch, if anywhere."""

    def heartbeat(self, trial: TrialConfig, send: bool) -> Heartbeat:
        """What a rank calls at every step: with ``send`` (rank 0), its sign of life goes to the
        stall watchdog, if there is one (:mod:`trainer.heartbeat`)."""


class RayTrainReporter:
    """Reports through ``ray.train.report``; Train V2 persists checkpoints and restores them.
    During an epoch, rank 0 sets Ray metrics (:mod:`trainer.live_metrics`)."""

    def __init__(self, trial_name: str = "", watchdog: Any = None) -> None:
        self.trial_name = trial_name
        self.watchdog = watchdog  # the study's Watchdog actor: a trial is failed when its beats stop

    def heartbeat(self, trial: TrialConfig, send: bool) -> Heartbeat:
        watchdog, trial_hash = self.watchdog, trial.trial_hash
        if watchdog is None or not send:
            return Heartbeat(watch_parent=True)
        return Heartbeat(lambda where: watchdog.beat.remote(trial_hash, where), watch_parent=True)

    def live_metrics(self, trial: TrialConfig) -> LiveMetrics | None:
        from trainer.live_metrics import LiveMetrics

        return LiveMetrics(trial.trial_hash, self.trial_name)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        try:
            ray.train.report(metrics, checkpoint=checkpoint)
        except OSError as error:
            if checkpoint is None:
                raise
            # Ray's own text ("Error writing bytes to file. Detail: [errno 28] ...") does not say where.
            reason = os.strerror(error.errno) if error.errno else str(error)
            raise OSError(
                error.errno,
                f"cannot save the checkpoint of epoch {metrics.get('epoch')} in {_storage()}: {reason}",
            ) from error

    @contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            yield Path(folder)

    def checkpoints(self) -> list[Candidate]:
        """Ray's latest checkpoint of this run, then the older ones it keeps, newest first.

        The run's checkpoint folders are siblings on its storage (a local path or any pyarrow
        filesystem). Their order is the order Ray registered them in (its snapshot file), or,
        when that cannot be read, their names' (the time they were written). A folder newer than
        the latest that Ray never registered is an upload that failed (a full disk): it is
        deleted, so it gives its space back and is never mistaken for a checkpoint.
        """
        import ray.train
        from pyarrow import fs

        latest = ray.train.get_checkpoint()
        if latest is None:
            return []
        filesystem, path = latest.filesystem, latest.path.rstrip("/")
        parent, name = posixpath.split(path)
        try:
            found = filesystem.get_file_info(fs.FileSelector(parent))
        except OSError as error:
            logger.warning(
                "sweetspot: cannot list the checkpoints in %s (%s): only the latest is tried", parent, error
            )
            found = []
        folders = sorted(
            info.base_name
            for info in found
            if info.type == fs.FileType.Directory and info.base_name.startswith(RAY_CHECKPOINT_PREFIX)
        )
        registered = _registered(filesystem, parent)
        if registered is not None:
            for orphan in sorted(set(folders) - set(registered)):
                if orphan > name:
                    _delete(filesystem, posixpath.join(parent, orphan))
        order = registered if registered is not None and name in registered else folders
        position = order.index(name) if name in order else 0
        older = [folder for folder in order[:position] if folder in folders]
        return [
            _RayCandidate(path, latest),
            *(
                _RayCandidate(at, ray.train.Checkpoint(at, filesystem=filesystem))
                for at in (posixpath.join(parent, folder) for folder in reversed(older))
            ),
        ]


def _registered(filesystem: Any, run_dir: str) -> list[str] | None:
    """The checkpoint folders Ray registered for this run, oldest first; None when unknown."""
    try:
        with filesystem.open_input_stream(posixpath.join(run_dir, RAY_SNAPSHOT_FILE)) as snapshot:
            state = json.loads(snapshot.read().decode())
        return [str(result["checkpoint_dir_name"]) for result in state["checkpoint_results"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning("sweetspot: cannot read Ray's list of checkpoints in %s: %s", run_dir, error)
        return None


def _delete(filesystem: Any, folder: str) -> None:
    logger.warning("sweetspot: deleting %s, a checkpoint whose upload never completed", folder)
    try:
        filesystem.delete_dir(folder)
    except OSError as error:
        logger.warning("sweetspot: cannot delete %s: %s", folder, error)


def _storage() -> str:
    """Where Ray Train keeps this run's checkpoints, for messages."""
    import ray.train

    try:
        return ray.train.get_context().get_storage().experiment_fs_path  # a DeveloperAPI
    except Exception:  # noqa: BLE001 - only a message depends on it
        return "Ray Train's storage"


@dataclass(frozen=True)
class _RayCandidate:
    """A checkpoint on Ray Train's storage (``name``: its path there)."""

    name: str
    checkpoint: Any  # ray.train.Checkpoint

    @contextmanager
    def open(self) -> Iterator[Path]:
        with self.checkpoint.as_directory() as folder:
            yield Path(folder)


class LocalReporter:
    """Standalone runs: metrics as JSON lines (rank 0), checkpoints kept in ``out_dir/checkpoint``
    and, one epoch older, ``out_dir/checkpoint.prev`` (what a resume falls back to)."""

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
        # A resumed run re-reports its checkpoint's epoch, and one that fell back to an older
        # checkpoint trains epochs again: their metrics are in metrics.jsonl already.
        if not any(seen["epoch"] == metrics["epoch"] for seen in self.history):
            self.history.append(dict(metrics))
            with (self.out_dir / "metrics.jsonl").open("a") as sink:
                sink.write(json.dumps(metrics) + "\n")
            print(json.dumps(metrics), file=sys.stdout, flush=True)
        if checkpoint_dir is not None:
            self._keep(checkpoint_dir)

    def _keep(self, checkpoint_dir: Path) -> None:
        """Make ``checkpoint_dir`` the latest checkpoint, and the latest the previous one.

        The copy is written in full (and synced) under another name first, then swapped in by
        renames, so a crash or a full disk at any moment leaves a loadable checkpoint behind.
        """
        target, previous, staging = self._folders()
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(checkpoint_dir, staging)
        for file in staging.iterdir():
            with file.open("rb") as written:
                os.fsync(written.fileno())
        if target.is_dir():
            shutil.rmtree(previous, ignore_errors=True)
            target.rename(previous)
        staging.rename(target)

    def _folders(self) -> tuple[Path, Path, Path]:
        """The (latest, previous, staging) checkpoint folders."""
        return self.out_dir / "checkpoint", self.out_dir / "checkpoint.prev", self.out_dir / "checkpoint.tmp"

    @contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        kept = self.checkpoints()
        yield kept[0].folder if kept else None

    def checkpoints(self) -> list[LocalCandidate]:
        target, previous, _ = self._folders()
        return [LocalCandidate(str(folder), folder) for folder in (target, previous) if folder.is_dir()]

    def live_metrics(self, trial: TrialConfig) -> LiveMetrics | None:
        return None  # standalone: the JSON lines are the record

    def heartbeat(self, trial: TrialConfig, send: bool) -> Heartbeat:
        return Heartbeat()  # standalone: torchrun's own timeouts and the user watch it
