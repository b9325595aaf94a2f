"""One ``sweetspot run`` per study at a time.

Two drivers on one study would both start its unfinished trials: duplicate runs in MLflow and two
Train runs writing one checkpoint folder. ``run`` therefore holds an exclusive ``flock`` on a file
in the study's output folder for as long as it runs. The kernel drops the lock with the process,
however that ends (Ctrl-C, SIGKILL, a crash), so a stale lock never blocks the next run.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".sweetspot-run.lock"


class StudyLocked(RuntimeError):
    """Another process is running the study."""


@contextlib.contextmanager
def study_lock(folder: Path, study: str) -> Iterator[None]:
    """Hold the study's run lock in ``folder`` (created if needed).

    Raises:
        StudyLocked: another live process holds it; the message says which.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise StudyLocked(
                f"study '{study}' is already being run by {holder}; wait for that run to end or stop it "
                f"(Ctrl-C), then run again (lock: {path})"
            ) from None
        # Who holds it, for the message above; the lock itself is the flock, not this text.
        handle.seek(0)
        handle.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        handle.write(f"`sweetspot run` pid {os.getpid()} on {socket.gethostname()} (since {started})\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
