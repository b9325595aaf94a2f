"""Cluster mode on loopback: a Ray cluster from ``ray start --head`` and an ``mlflow server``,
both started here; a 2-trial study joins them with ``--address`` and ``--tracking-uri``.

The cluster keeps its state in a temp dir of its own (``--temp-dir``), so that no other Ray of
the test session mistakes it for "the" local cluster, and both services run in their own process
groups, so that the teardown stops every process they started and nothing else.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

STUDY = """
name: cluster
base:
  model:
    backbone: vit_mini
    moe: {{top_k: 1, capacity_factor: 2.0}}
  data: {{train_samples: 256}}
  recipe: {{epochs: 1, batch_size: 64, lr: 0.003}}
grid:
  placement: [none, last2]
  experts: [2]
max_failures: 0
resources: {resources}
output: {output}
storage_path: {storage}        # what every node of a real cluster would mount
"""
ONE_WORKER = "{workers: 1, cpus_per_worker: 0.5}"
BIN = Path(sys.executable).parent
START_TIMEOUT_S = 120
OUTAGE_S = 20


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    """Stop a service and every process it started (its process group)."""
    if process.poll() is None:
        with_group = os.getpgid(process.pid)
        os.killpg(with_group, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        # Ray's own processes may outlive `ray start --block`; they are in its group.
        try:
            os.killpg(with_group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=20)


def _wait_until(ready: Callable[[], bool], process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        if process.poll() is not None:
            pytest.fail(f"{what} exited with {process.returncode}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not start in {START_TIMEOUT_S} s")
        time.sleep(0.5)


# The cluster's token, as `ray start` finds one (~/.ray/auth_token or here): it then admits only
# clients that send it, as a real cluster should.
TOKEN = secrets.token_hex(32)
# Each process sees the token and no explicit auth mode, as on a machine set up by the README.
ENV = {**{k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}, "RAY_AUTH_TOKEN": TOKEN}


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """A one-node Ray cluster (2 CPUs) that asks its clients for a token: its address."""
    port = _free_port()
    # Short: Ray's socket paths live under the temp dir and must stay below the Unix limit.
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
         "--disable-usage-stats", f"--temp-dir={temp}", "--block"],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        _wait_until(lambda: (temp / "ray_current_cluster").is_file(), head, "ray start")
        yield f"127.0.0.1:{port}"
    finally:
        _stop(head)
        shutil.rmtree(temp, ignore_errors=True)


class MlflowServer:
    """An MLflow tracking server (sqlite backend, artifacts served from a folder) that a test can
    stop and start again, on the same port and database."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.uri = f"http://127.0.0.1:{_free_port()}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
             "--artifacts-destination", str(self.folder / "server-artifacts"), "--host", "127.0.0.1",
             "--port", self.uri.rsplit(":", 1)[1], "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        _wait_until(self.healthy, self.process, "mlflow server")

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)
            self.process = None

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.ray
def test_study_joins_a_ray_cluster_and_tracks_to_an_mlflow_server_that_goes_away(
    ray_cluster: str, mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    """The MLflow server is stopped as soon as the study's first trial run is on it, and started
    again a while later: the trials train on, and every result is on the server in the end."""
    study = tmp_path / "cluster.yaml"
    storage = tmp_path / "shared"
    study.write_text(STUDY.format(output=tmp_path / "out", storage=storage, resources=ONE_WORKER))
    uri = mlflow_server.uri
    command = [sys.executable, "-m", "orchestrator.cli", "run", str(study),
               "--address", ray_cluster, "--tracking-uri", uri]  # fmt: skip
    run = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = MlflowClient(uri)
        deadline = time.monotonic() + START_TIMEOUT_S * 2
        while not _trial_runs(client, "cluster"):
            assert run.poll() is None, run.communicate()[0]
            assert time.monotonic() < deadline, "no trial run reached the server"
            time.sleep(0.5)
        mlflow_server.stop()
        time.sleep(OUTAGE_S)  # the trials train, report and end meanwhile
        mlflow_server.start()
        output = run.communicate(timeout=600)[0]
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, output
    assert "MLflow is unreachable" in output and "MLflow is back" in output, output
    assert f"2 trials to run on the Ray cluster at {ray_cluster} (2 CPUs)" in output
    assert f"MLflow: {uri}/#/experiments/" in output
    assert "2 finished, 0 failed, 0 incomplete" in output
    assert "View run" not in output  # the server's per-run links are not printed
    assert not (tmp_path / "out" / "mlflow-pending.jsonl").exists()  # the journal was written out

    # Everything went to the server, nothing to a local store, and nothing was lost in the outage.
    assert not (tmp_path / "out" / "mlflow.db").exists()
    trials = _trial_runs(client, "cluster")
    assert sorted(r.info.status for r in trials) == ["FINISHED", "FINISHED"]
    for trial in trials:
        assert [m.step for m in client.get_metric_history(trial.info.run_id, "val_top1")] == [1]
        assert "params_active" in trial.data.metrics
    moe = next(r for r in trials if r.data.tags["sweetspot.trial_name"].startswith("ViT-Mini-2"))
    assert [a.path for a in client.list_artifacts(moe.info.run_id)] == ["routing.npz"]
    # Checkpoints are in the study's storage_path, one Train run per trial.
    assert len([p for p in (storage / "train").iterdir() if any(p.glob("checkpoint_*"))]) == 2

    # `status` reads the same server from another process.
    status = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "status", str(study), "--tracking-uri", uri,
         "--format", "json"],
        check=False, env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert status.returncode == 0, status.stderr
    assert '"state": "done"' in status.stdout


def _trial_runs(client: MlflowClient, study: str) -> list:
    try:
        experiment = client.get_experiment_by_name(study)
        if experiment is None:
            return []
        return client.search_runs([experiment.experiment_id], filter_string="tags.`sweetspot.kind` = 'trial'")
    except Exception:  # noqa: BLE001 - the server is starting
        return []


def test_an_unreachable_mlflow_server_stops_the_run_before_anything_starts(tmp_path: Path) -> None:
    study = tmp_path / "cluster.yaml"
    study.write_text(STUDY.format(output=tmp_path / "out", storage=tmp_path / "shared", resources=ONE_WORKER))
    nobody = f"http://sweetspot:s3cret@127.0.0.1:{_free_port()}"
    command = [sys.executable, "-m", "orchestrator.cli", "run", str(study), "--tracking-uri", nobody]
    started = time.monotonic()
    run = subprocess.run(command, check=False, env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "cannot reach MLflow at http://sweetspot:***@127.0.0.1" in run.stderr
    assert "Nothing was started" in run.stderr
    assert "s3cret" not in run.stdout + run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "shared").exists()  # no Ray, no checkpoints
    assert time.monotonic() - started < 60  # one try, not MLflow's minutes of retries


@pytest.mark.ray
def test_a_trial_the_cluster_can_never_place_is_rejected_before_anything_starts(
    ray_cluster: str, mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    study = tmp_path / "spread.yaml"
    # Each worker on its own node, and this cluster has one node.
    spread = "{workers: 2, cpus_per_worker: 0.5, placement_strategy: STRICT_SPREAD}"
    text = STUDY.format(output=tmp_path / "out", storage=tmp_path / "shared", resources=spread)
    study.write_text(text.replace("name: cluster", "name: spread"))
    command = [sys.executable, "-m", "orchestrator.cli", "run", str(study),
               "--address", ray_cluster, "--tracking-uri", mlflow_server.uri]  # fmt: skip
    run = subprocess.run(command, check=False, env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "STRICT_SPREAD puts each of the 2 workers on its own node, but only 1 node(s)" in run.stderr
    assert "Traceback" not in run.stderr
    experiment = MlflowClient(mlflow_server.uri).get_experiment_by_name("spread")
    trials = MlflowClient(mlflow_server.uri).search_runs(
        [experiment.experiment_id], filter_string="tags.`sweetspot.kind` = 'trial'"
    )
    assert trials == []  # nothing started
