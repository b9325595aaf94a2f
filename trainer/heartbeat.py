"""A training process's sign of life, and its check that it is still wanted.

Sign of life: a hung trial (a collective waiting on a stopped or wedged rank, a dead network
file system) reports nothing, and would hold its GPUs forever. Rank 0 calls :class:`Heartbeat`
at every training step and evaluation batch; at most every few seconds that becomes one
fire-and-forget message to the study's watchdog (:mod:`orchestrator.trial`), which fails the
trial as stalled when the messages stop. Every rank waits for the others at each step, so rank 0
going quiet also covers a hang elsewhere.

Still wanted: SIGTERM to a job's process group reaches the Ray node's processes and the workers
alike, but a Ray Train worker trains in a thread of its own. Its main thread ends, its raylet
ends, and the training thread would go on for tens of seconds, writing checkpoints that no Train
controller records. So at each step every rank of a Ray trial also checks that its main thread
is alive and that its parent (the raylet) is the one it started under, and ends the process at
once when not.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

HEARTBEAT_INTERVAL_S = 5.0


class Heartbeat:
    """Call at every step: sends ``send(where)`` at most every ``interval_s``, and, with
    ``watch_parent``, ends this process once what runs it is gone.

    ``send=None`` (ranks other than 0, standalone runs) sends nothing.
    """

    def __init__(
        self,
        send: Callable[[str], Any] | None = None,
        interval_s: float = HEARTBEAT_INTERVAL_S,
        watch_parent: bool = False,
    ) -> None:
        self.send = send
        self.interval_s = interval_s
        self._parent = os.getppid() if watch_parent else None
        self._last = -float("inf")

    def __call__(self, phase: str, epoch: int, step: int | None = None) -> None:
        if self._parent is not None and (os.getppid() != self._parent or not threading.main_thread().is_alive()):
            # Nothing can record what this process would still do; stop before another checkpoint.
            print("sweetspot: the process running this worker is gone; stopping it", file=sys.stderr, flush=True)
            os._exit(1)
        if self.send is None:
            return
        now = time.monotonic()
        if now - self._last < self.interval_s:
            return
        self._last = now
        where = f"{phase}, epoch {epoch + 1}" + (f", step {step + 1}" if step is not None else "")
        self.send(where)
