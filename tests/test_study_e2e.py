"""A real study through Ray Tune + Ray Train (2 DDP workers, gloo) + MLflow (sqlite) + the table.

Two trials train; a third fails inside its workers. The failure is recorded with its reason,
the others finish, and a second ``run`` launches nothing.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from orchestrator.cli import app
from trainer.moe import tutel_backend

STUDY = """
name: e2e
description: smallest real study
base:
  model:
    backbone: vit_mini
    moe: {{top_k: 1, capacity_factor: 2.0}}
  data: {{train_samples: 512}}
  recipe: {{epochs: 2, batch_size: 64, lr: 0.003}}
grid:
  experts: [4]
cases:
  - {{placement: none}}
  - {{placement: last2}}
  - {{placement: last2, train_samples: 4001}}  # valid config, fails in the workers: 4,000 images
max_failures: 0               # the failing trial fails the same way every time: no restart
resources:
  workers: 2
  cpus_per_worker: 0.5
output: {output}
table:
  metrics: [val_top1, dropped_fraction]
"""


@pytest.mark.ray
def test_study_runs_end_to_end_records_failure_and_second_run_trains_nothing(
    local_ray: None, tmp_path: Path
) -> None:
    study = tmp_path / "e2e.yaml"
    study.write_text(STUDY.format(output=tmp_path / "out"))
    runner = CliRunner()
    dense, moe, broken = (
        "ViT-Mini",
        "ViT-Mini-4 Last 2 Top 1, train_samples=512",
        "ViT-Mini-4 Last 2 Top 1, train_samples=4001",
    )

    first = runner.invoke(app, ["run", str(study)])
    assert first.exit_code == 1, first.output  # a trial failed: the study fails, the rest is kept
    assert "2 finished, 1 failed" in first.output
    assert f"failed {broken} seed 0: ValueError: data.train_samples is 4001" in first.output
    assert "Traceback" not in first.output

    client = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("e2e")
    runs = client.search_runs([experiment.experiment_id])
    study_runs = [r for r in runs if r.data.tags["sweetspot.kind"] == "study"]
    trial_runs = {r.data.tags["sweetspot.trial_name"]: r for r in runs if r.data.tags["sweetspot.kind"] == "trial"}
    assert len(study_runs) == 1 and study_runs[0].info.status == "FAILED"
    assert sorted(trial_runs) == sorted([dense, moe, broken])
    for name in (dense, moe):
        run = trial_runs[name]
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == study_runs[0].info.run_id
        assert len(run.data.tags["sweetspot.trial_hash"]) == 64
        assert run.data.params["recipe.epochs"] == "2"
        history = client.get_metric_history(run.info.run_id, "val_top1")
        assert sorted(p.step for p in history) == [1, 2]  # one point per epoch, no duplicates
        assert 0 <= run.data.metrics["val_top1"] <= 100
    failed = trial_runs[broken]
    assert failed.info.status == "FAILED"
    assert "data.train_samples is 4001, but embedded_mnist has 4000 training images" in failed.data.tags[
        "sweetspot.error"
    ]
    moe_run, dense_run = trial_runs[moe], trial_runs[dense]
    assert moe_run.data.params["model.moe.experts"] == "4"
    assert dense_run.data.params["model.moe"] == "null"  # the dense baseline carries no MoE settings
    assert 0 <= moe_run.data.metrics["dropped_fraction"] <= 1
    assert 1 <= moe_run.data.metrics["experts_per_image"] <= 4
    # 4 experts over 2 workers: expert parallel, on whichever backend `auto` found on the workers.
    assert moe_run.data.tags["sweetspot.moe_backend"] == ("tutel" if tutel_backend.available() else "native")
    assert moe_run.data.metrics["params_total"] > moe_run.data.metrics["params_active"]
    assert dense_run.data.metrics["params_total"] == dense_run.data.metrics["params_active"]

    table = runner.invoke(app, ["table", str(study)])
    assert table.exit_code == 0, table.output
    lines = table.output.strip().splitlines()
    assert lines[0].startswith("| Architecture") and "Top-1 (%)" in lines[0]
    assert [line.split("|")[1].strip() for line in lines[2:]] == [dense, moe, broken]  # study order
    assert f"{moe_run.data.metrics['val_top1']:.2f}" in lines[3]
    assert lines[4].rstrip("| ").endswith("FAILED")

    started = time.monotonic()
    second = runner.invoke(app, ["run", str(study)])
    assert second.exit_code == 1, second.output
    assert "2 trials already FINISHED in MLflow: skipped" in second.output
    assert "1 trials FAILED before: skipped" in second.output
    assert "0 finished, 0 failed" in second.output
    assert time.monotonic() - started < 15  # nothing was launched
    assert len(client.search_runs([experiment.experiment_id])) == len(runs)
