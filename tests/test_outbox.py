"""The outbox keeps MLflow writes in order through an outage, and across drivers (its journal).

"Down" is a real MLflow client talking to a port nobody listens on (the very error a stopped
tracking server gives); "up" is a real MLflow sqlite store. The end-to-end outage, a real
``mlflow server`` stopped and started under a running study, is in tests/test_cluster.py.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from orchestrator import outbox as outbox_module
from orchestrator.outbox import HTTP_ENV_DEFAULTS, Event, Outbox, unreachable


@pytest.fixture(autouse=True)
def _one_try_per_request(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in HTTP_ENV_DEFAULTS.items():  # as `sweetspot run` sets them
        monkeypatch.setenv(key, value)


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[MlflowClient, str]:
    """One sqlite store for the module (creating its schema takes seconds) and its experiment."""
    folder = tmp_path_factory.mktemp("outbox")
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    return client, client.create_experiment("outbox", artifact_location=(folder / "artifacts").as_uri())


class Tracker:
    """Writes each event as a tag on a run of its own: to a server that is down until ``up`` is set."""

    def __init__(self, store: tuple[MlflowClient, str]) -> None:
        self.store, experiment = store
        self.down = MlflowClient(f"http://127.0.0.1:{_closed_port()}")
        self.run_id = self.store.create_run(experiment).info.run_id
        self.up = False

    def apply(self, event: Event) -> None:
        client = self.store if self.up else self.down
        client.set_tag(self.run_id, f"event{event['n']:03d}", str(event["n"]))

    def written(self) -> list[int]:
        tags = self.store.get_run(self.run_id).data.tags
        return sorted(int(value) for key, value in tags.items() if key.startswith("event"))


def test_a_stopped_server_is_unreachable_and_a_refused_write_is_not(store: tuple[MlflowClient, str], tmp_path: Path) -> None:
    tracker = Tracker(store)
    with pytest.raises(MlflowException) as down:
        tracker.down.get_experiment_by_name("outbox")
    assert unreachable(down.value)
    with pytest.raises(MlflowException) as refused:
        tracker.store.get_run("no-such-run")
    assert not unreachable(refused.value)


def test_writes_wait_in_order_through_an_outage_and_are_written_once_it_ends(store: tuple[MlflowClient, str], tmp_path: Path) -> None:
    tracker = Tracker(store)
    journal = tmp_path / "out" / "pending.jsonl"
    outages: list[str | None] = []
    box = Outbox(tracker.apply, journal, outages.append)

    for n in range(5):
        box.put({"n": n})
    assert len(box) == 5 and tracker.written() == []
    assert [json.loads(line)["n"] for line in journal.read_text().splitlines()] == [0, 1, 2, 3, 4]
    assert len(outages) == 1 and "MLflow is unreachable" in outages[0] and str(journal) in outages[0]
    assert not box.flush()  # the next retry is not due yet: no request at all

    tracker.up = True
    box.put({"n": 5})  # still behind the five waiting ones
    assert tracker.written() == []
    assert box.flush(force=True)
    assert tracker.written() == [0, 1, 2, 3, 4, 5]
    assert not journal.exists() and outages[-1] is None and box.down_since is None


def test_the_next_driver_replays_what_a_dead_one_left_in_the_journal(store: tuple[MlflowClient, str], tmp_path: Path) -> None:
    tracker = Tracker(store)
    journal = tmp_path / "pending.jsonl"
    first = Outbox(tracker.apply, journal)
    for n in range(3):
        first.put({"n": n})
    del first  # the driver dies with the server still down
    with journal.open("a") as torn:
        torn.write('{"n": 9')  # killed halfway through a line

    tracker.up = True
    second = Outbox(tracker.apply, journal)
    assert second.replay() == 3
    assert tracker.written() == [0, 1, 2] and not journal.exists()


def test_drain_gives_up_after_its_timeout_and_keeps_the_journal(
    store: tuple[MlflowClient, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outbox_module, "RETRY_DELAYS_S", (0.2,))
    tracker = Tracker(store)
    journal = tmp_path / "pending.jsonl"
    box = Outbox(tracker.apply, journal)
    box.put({"n": 0})
    assert not box.drain(1.0)
    assert len(box) == 1 and journal.is_file()


def test_a_write_mlflow_refuses_is_raised_not_kept(store: tuple[MlflowClient, str], tmp_path: Path) -> None:
    tracker = Tracker(store)
    tracker.up = True
    tracker.run_id = "no-such-run"
    box = Outbox(tracker.apply, tmp_path / "pending.jsonl")
    with pytest.raises(MlflowException):
        box.put({"n": 0})
