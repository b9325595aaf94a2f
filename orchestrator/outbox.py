"""MLflow writes that outlive an unreachable tracking server.

The driver is the study's only MLflow writer (:mod:`orchestrator.tracking`). If the tracking
server goes away mid-study (a restart, a network partition, a full database disk), the trials
keep training: every write becomes an event in an :class:`Outbox`, which applies events in
order and, when the server does not answer, keeps them, retries with a growing delay, and
writes them all once it is back. While any wait, they are also in a journal file next to the
study's results, so a driver that ends (or is killed) before the server returns loses nothing:
the next ``sweetspot run`` replays the journal before it does anything else.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

logger = logging.getLogger(__name__)

JOURNAL_FILE = "mlflow-pending.jsonl"
# Delays between tries while MLflow is unreachable; then the last one, for as long as it takes.
RETRY_DELAYS_S = (2.0, 5.0, 10.0, 20.0, 30.0)
# MLflow's HTTP client retries a failed request 7 times with exponential backoff (minutes) by
# default, blocking the driver's event loop meanwhile. The outbox retries instead: one try per
# request, with a bounded wait, unless the user set these.
HTTP_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
# MLflow error codes of a server that is down, overloaded or behind a failing proxy.
_RETRYABLE_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}

Event = dict[str, Any]


def unreachable(error: BaseException) -> bool:
    """Whether ``error`` says the tracking store could not be reached (worth retrying), rather
    than that it refused a write (a bug to surface)."""
    if isinstance(error, MlflowException):
        return error.error_code in _RETRYABLE_CODES
    # Below MLflow: the HTTP client, the socket, sqlite's "database is locked".
    return type(error).__name__ in {"ConnectionError", "Timeout", "OperationalError"} or isinstance(error, OSError)


class Outbox:
    """Events applied in order by ``apply``; those that cannot be yet wait in memory and in
    ``journal`` (one JSON object per line).

    Args:
        apply: writes one event to MLflow; raises when MLflow cannot take it.
        journal: the file pending events are kept in while MLflow is unreachable.
        on_outage: called with a one-line message when MLflow becomes unreachable, and with
            ``None`` when everything pending was written after an outage.
    """

    def __init__(
        self,
        apply: Callable[[Event], None],
        journal: Path,
        on_outage: Callable[[str | None], None] | None = None,
    ) -> None:
        self.apply = apply
        self.journal = journal
        self.on_outage = on_outage or (lambda _: None)
        self.pending: deque[Event] = deque()
        self.down_since: float | None = None
        self._failures = 0
        self._next_try = 0.0
        # The driver's Tune loop writes; so may its signal watcher, when Ray went down with it.
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self.pending)

    def put(self, event: Event) -> None:
        """Write ``event`` now if MLflow takes it, else keep it (after any already waiting)."""
        with self._lock:
            self.pending.append(event)
            if len(self.pending) > 1:
                self._append_to_journal(event)
            self.flush()

    def flush(self, force: bool = False) -> bool:
        """Write what is pending, unless the next retry is not due (``force``: try anyway);
        True when nothing is left."""
        with self._lock:
            if not self.pending:
                return True
            if self.down_since is not None and not force and time.monotonic() < self._next_try:
                return False
            written = 0
            while self.pending:
                try:
                    self.apply(self.pending[0])
                except Exception as error:
                    if not unreachable(error):
                        raise
                    self._note_failure(error)
                    if written or not self.journal.is_file():
                        self._rewrite_journal()
                    return False
                self.pending.popleft()
                written += 1
            self.journal.unlink(missing_ok=True)
            if self.down_since is not None:
                logger.info("MLflow is back after %.0f s", time.monotonic() - self.down_since)
                self.down_since = None
                self._failures = 0
                self.on_outage(None)
            return True

    def drain(self, timeout_s: float) -> bool:
        """Keep trying to write everything pending for up to ``timeout_s``; True when done."""
        deadline = time.monotonic() + timeout_s
        while not self.flush():
            if time.monotonic() >= deadline:
                return False
            time.sleep(max(0.0, min(self._next_try, deadline) - time.monotonic()) or 0.5)
        return True

    def replay(self) -> int:
        """Queue the events a previous driver left in the journal, and try to write them; how many."""
        if not self.journal.is_file():
            return 0
        events = []
        for line in self.journal.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("skipping a torn line in %s (the driver died while writing it)", self.journal)
        self.pending.extend(events)
        self.flush(force=True)
        return len(events)

    def _note_failure(self, error: BaseException) -> None:
        now = time.monotonic()
        delay = RETRY_DELAYS_S[min(self._failures, len(RETRY_DELAYS_S) - 1)]
        self._failures += 1
        self._next_try = now + delay
        if self.down_since is None:
            self.down_since = now
            reason = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
            self.on_outage(
                f"MLflow is unreachable ({reason[:200]}); training goes on, and its results wait in "
                f"{self.journal} until MLflow is back"
            )

    def _append_to_journal(self, event: Event) -> None:
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        with self.journal.open("a") as journal:
            journal.write(json.dumps(event, default=str) + "\n")

    def _rewrite_journal(self) -> None:
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        staging = self.journal.with_suffix(".tmp")
        staging.write_text("".join(json.dumps(event, default=str) + "\n" for event in self.pending))
        os.replace(staging, self.journal)  # atomic: a crash leaves the old journal or the new one
