"""Which checkpoint a trial resumes from: the newest one that loads.

A kept checkpoint can be unreadable: its file truncated (the node went down before the storage
had it all), missing, or half-written (an upload that failed on a full disk). A resume tries
the newest first and falls back to older ones, with a warning that names each one it skips and
why. When there are checkpoints and none of them loads, the trial fails with every reason
instead of starting again from scratch (see :func:`load_newest`).

Where the candidates come from is the reporter's business (:mod:`trainer.report`): Ray Train's
checkpoint folders of the trial's run, or a standalone run's ``checkpoint`` and
``checkpoint.prev`` folders.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

CHECKPOINT_FILE = "state.pt"
# What a resume reads from a state (``metrics`` and ``resumes`` are optional: older checkpoints lack them).
REQUIRED_KEYS = ("epoch", "model", "optimizer", "scheduler", "rng")
# The result key that says a resume skipped checkpoints that did not load (the tracker makes it a tag).
FALLBACK_KEY = "checkpoint_fallback"
_NOTE_LIMIT = 4000  # characters: an MLflow tag holds 5000

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be loaded, or none of a trial's can; the message says which and why."""


class Candidate(Protocol):
    """A checkpoint a resume may load: a name for messages, and its folder on this machine."""

    name: str

    def open(self) -> AbstractContextManager[Path]:
        """The checkpoint's folder, for the time of the ``with`` (downloaded first if remote)."""


@dataclass(frozen=True)
class LocalCandidate:
    """A checkpoint folder on a local (or mounted) filesystem."""

    name: str
    folder: Path

    @contextmanager
    def open(self) -> Iterator[Path]:
        yield self.folder


@dataclass(frozen=True)
class Resumed:
    """What :func:`load_newest` found."""

    state: dict[str, Any] | None  # None: there was nothing to resume from
    name: str | None = None  # the checkpoint it came from
    skipped: tuple[tuple[str, str], ...] = ()  # newer checkpoints that did not load: (name, reason)

    @property
    def fallback(self) -> str | None:
        """One line for the trial's record when newer checkpoints were skipped, else None."""
        if not self.skipped or self.state is None:
            return None
        reasons = "; ".join(f"{name}: {reason}" for name, reason in self.skipped)
        text = (
            f"resumed from {self.name} (epoch {int(self.state['epoch']) + 1}) because "
            f"{len(self.skipped)} newer checkpoint(s) did not load: {reasons}"
        )
        return text if len(text) <= _NOTE_LIMIT else text[: _NOTE_LIMIT - 1] + "…"


def load_state(folder: Path) -> dict[str, Any]:
    """The training state saved in ``folder``; CheckpointError when it is missing or unreadable."""
    path = folder / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(f"{CHECKPOINT_FILE} is missing")
    size = path.stat().st_size
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # a truncated zip, a damaged pickle, an I/O error: all unreadable
        raise CheckpointError(
            f"{CHECKPOINT_FILE} ({size} bytes) cannot be read: {_one_line(error)}"
        ) from error
    if not isinstance(state, dict):
        raise CheckpointError(f"{CHECKPOINT_FILE} holds a {type(state).__name__}, not a training state")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{CHECKPOINT_FILE} has no {', '.join(missing)}")
    return state


def load_newest(candidates: Sequence[Candidate], all_ranks: Callable[[bool], bool] | None = None) -> Resumed:
    """Load the newest of ``candidates`` (given newest first) that loads.

    Each one skipped is logged as a warning with the reason. ``all_ranks(ok)`` says whether
    every rank loaded the candidate this rank tried (a collective: every rank must pass the same
    candidates, so all call it equally often and settle on the same checkpoint); without it,
    this rank decides alone.

    Raises:
        CheckpointError: there were candidates and none loaded. Starting again from scratch
            instead would hide a storage problem, throw away every epoch trained so far (Ray
            deletes the old checkpoints once new ones exist), and train a fine-tuning trial
            from random weights, since its start weights are only loaded when it has no
            checkpoint of its own.
    """
    skipped: list[tuple[str, str]] = []
    for candidate in candidates:
        state, reason = None, ""
        try:
            with candidate.open() as folder:
                state = load_state(Path(folder))
        except CheckpointError as error:
            reason = str(error)
        except Exception as error:  # noqa: BLE001 - the storage could not hand the folder over: skip it
            reason = f"cannot be opened: {_one_line(error)}"
        agreed = state is not None if all_ranks is None else all_ranks(state is not None)
        if agreed:
            if skipped:
                logger.warning(
                    "sweetspot: resuming from checkpoint %s, the newest one that loads", candidate.name
                )
            return Resumed(state, candidate.name, tuple(skipped))
        reason = reason or "another rank could not load it"
        logger.warning(
            "sweetspot: checkpoint %s does not load (%s); trying an older one", candidate.name, reason
        )
        skipped.append((candidate.name, reason))
    if skipped:
        reasons = "; ".join(f"{name}: {reason}" for name, reason in skipped)
        raise CheckpointError(
            f"none of the trial's {len(skipped)} checkpoint(s) loads ({reasons}); to train it again "
            "from scratch, delete the folder that holds them and run it again"
        )
    return Resumed(None)


def _one_line(error: BaseException, limit: int = 160) -> str:
    """The error on one line, cut to its first sentence when long (torch adds a paragraph of advice)."""
    text = " ".join(str(error).split())
    if len(text) > limit:
        first = text.find(". ")
        text = text[: first + 1] if 0 < first < limit else text[: limit - 1] + "…"
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
