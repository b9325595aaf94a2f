"""`sweetspot plan`: per-trial params, FLOPs and training compute, without running anything."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from orchestrator.cli import app
from trainer.config import TrialConfig
from trainer.data import input_spec
from trainer.models.accounting import count_flops, count_params

STUDY = """
name: plan
base:
  data: {train_samples: 1000}
  recipe: {epochs: 2}
grid:
  placement: [none, last2]
  router: [linear, soft]
seeds: [0, 1]
"""


def plan(tmp_path: Path, *args: str) -> str:
    study = tmp_path / "plan.yaml"
    study.write_text(STUDY)
    result = CliRunner().invoke(app, ["plan", str(study), *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_plan_reports_params_flops_and_training_compute_per_trial(tmp_path: Path) -> None:
    rows = json.loads(plan(tmp_path, "--format", "json"))
    # The dense baseline collapses over routers: 1 dense + 2 MoE configurations, 2 seeds each.
    assert len(rows) == 6
    for row in rows:
        trial = TrialConfig.model_validate(row["trial"])
        inputs = input_spec(trial.data)
        params = count_params(trial.model, inputs)
        assert (row["params_total"], row["params_active"]) == (params.total, params.active)
        assert row["flops"] == count_flops(trial.model, inputs)
        assert row["train_pflop"] == 3 * row["flops"] * 1000 * 2 / 1e15
        assert row["images_per_s"] is None
    soft = next(r for r in rows if " Soft" in r["name"])
    assert soft["params_active"] == soft["params_total"]  # every expert sees slots of every image


def test_plan_table_has_one_line_per_configuration_with_its_seeds(tmp_path: Path) -> None:
    output = plan(tmp_path)
    assert "plan: 6 trials" in output
    assert "GFLOPs" in output and "Train PFLOP" in output
    assert output.count("│     2 │") == 3  # three configurations, two seeds each
    assert "total training compute" in output


def test_plan_measure_times_each_model_and_estimates_hours(tmp_path: Path) -> None:
    rows = json.loads(plan(tmp_path, "--format", "json", "--measure"))
    for row in rows:
        assert row["images_per_s"] > 0
        assert row["train_hours"] == 3 * 1000 * 2 / row["images_per_s"] / 3600
