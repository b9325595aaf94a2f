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


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An MLflow tracking server (sqlite backend, artifacts served from a folder): its URI."""
    tmp_path = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    try:
        _wait_until(healthy, server, "mlflow server")
        yield uri
    finally:
        _stop(server)


@pytest.mark.ray
def test_study_joins_a_ray_cluster_and_tracks_to_an_mlflow_server(
    ray_cluster: str, mlflow_server: str, tmp_path: Path
) -> None:
    study = tmp_path / "cluster.yaml"
    storage = tmp_path / "shared"
    study.write_text(STUDY.format(output=tmp_path / "out", storage=storage, resources=ONE_WORKER))
    command = [sys.executable, "-m", "orchestrator.cli", "run", str(study),
               "--address", ray_cluster, "--tracking-uri", mlflow_server]  # fmt: skip
    run = subprocess.run(command, check=False, env=ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"2 trials to run on the Ray cluster at {ray_cluster} (2 CPUs)" in run.stdout
    assert f"MLflow: {mlflow_server}/#/experiments/" in run.stdout
    assert "2 finished, 0 failed, 0 incomplete" in run.stdout
    assert "View run" not in run.stdout  # the server's per-run links are not printed

    # Everything went to the server, nothing to a local store.
    assert not (tmp_path / "out" / "mlflow.db").exists()
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("cluster")
    trials = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags["sweetspot.kind"] == "trial"]
    assert sorted(r.info.status for r in trials) == ["FINISHED", "FINISHED"]
    moe = next(r for r in trials if r.data.tags["sweetspot.trial_name"].startswith("ViT-Mini-2"))
    assert [a.path for a in client.list_artifacts(moe.info.run_id)] == ["routing.npz"]
    # Checkpoints are in the study's storage_path, one Train run per trial.
    assert len([p for p in (storage / "train").iterdir() if any(p.glob("checkpoint_*"))]) == 2

    # `status` reads the same server from another process.
    status = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "status", str(study), "--tracking-uri", mlflow_server,
         "--format", "json"],
        check=False, env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert status.returncode == 0, status.stderr
    assert '"state": "done"' in status.stdout


@pytest.mark.ray
def test_a_trial_the_cluster_can_never_place_is_rejected_before_anything_starts(
    ray_cluster: str, mlflow_server: str, tmp_path: Path
) -> None:
    study = tmp_path / "spread.yaml"
    # Each worker on its own node, and this cluster has one node.
    spread = "{workers: 2, cpus_per_worker: 0.5, placement_strategy: STRICT_SPREAD}"
    text = STUDY.format(output=tmp_path / "out", storage=tmp_path / "shared", resources=spread)
    study.write_text(text.replace("name: cluster", "name: spread"))
    command = [sys.executable, "-m", "orchestrator.cli", "run", str(study),
               "--address", ray_cluster, "--tracking-uri", mlflow_server]  # fmt: skip
    run = subprocess.run(command, check=False, env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "STRICT_SPREAD puts each of the 2 workers on its own node, but only 1 node(s)" in run.stderr
    assert "Traceback" not in run.stderr
    experiment = MlflowClient(mlflow_server).get_experiment_by_name("spread")
    trials = MlflowClient(mlflow_server).search_runs(
        [experiment.experiment_id], filter_string="tags.`sweetspot.kind` = 'trial'"
    )
    assert trials == []  # nothing started
