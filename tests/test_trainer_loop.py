"""The training loop without Ray: what ``python -m trainer`` runs, on the embedded digits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import TrialConfig
from trainer.loop import train
from trainer.report import LocalReporter

TINY = {
    "model": {"backbone": "vit_mini", "placement": "last2", "moe": {"experts": 4, "top_k": 2}},
    "data": {"train_samples": 256},
    "recipe": {"epochs": 2, "batch_size": 64, "lr": 0.003},
}


def test_each_epoch_reports_metrics_and_leaves_a_checkpoint(tmp_path: Path) -> None:
    reporter = LocalReporter(tmp_path)
    train(TrialConfig.model_validate(TINY), reporter)
    assert [m["epoch"] for m in reporter.history] == [1, 2]
    last = reporter.history[-1]
    assert last["epochs_total"] == 2
    assert 0 <= last["val_top1"] <= last["val_top5"] <= 100
    assert 0 <= last["dropped_fraction"] <= 1 and last["expert_load_cv"] >= 0
    assert last["aux_loss"] > 0 and last["images_per_s"] > 0
    # Measured once, after the last epoch, as `plan --measure` does.
    assert last["inference_images_per_s"] > 0 and "inference_images_per_s" not in reporter.history[0]
    assert last["moe_backend"] in ("native", "tutel")
    assert (tmp_path / "checkpoint" / "state.pt").is_file()


def test_a_restarted_trial_resumes_after_its_last_checkpoint(tmp_path: Path) -> None:
    one_epoch = TrialConfig.model_validate({**TINY, "recipe": {**TINY["recipe"], "epochs": 1}})
    first = LocalReporter(tmp_path)
    train(one_epoch, first)
    # Same folder, longer schedule: only the missing epoch is trained, each epoch recorded once.
    resumed = LocalReporter(tmp_path)
    train(TrialConfig.model_validate(TINY), resumed)
    assert [m["epoch"] for m in resumed.history] == [1, 2]
    assert resumed.history[0] == first.history[0]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_metrics_of_a_checkpointed_epoch_that_never_reached_the_tracker_are_reported_on_resume(
    tmp_path: Path,
) -> None:
    one_epoch = TrialConfig.model_validate({**TINY, "recipe": {**TINY["recipe"], "epochs": 1}})
    train(one_epoch, LocalReporter(tmp_path))
    (tmp_path / "metrics.jsonl").write_text("")  # interrupted between checkpoint and report
    resumed = LocalReporter(tmp_path)
    train(TrialConfig.model_validate(TINY), resumed)
    assert [m["epoch"] for m in resumed.history] == [1, 2]


def test_dense_trial_reports_no_routing_metrics(tmp_path: Path) -> None:
    dense = TrialConfig.model_validate({**TINY, "model": {"placement": "none"}, "recipe": {**TINY["recipe"], "epochs": 1}})
    reporter = LocalReporter(tmp_path)
    train(dense, reporter)
    assert "dropped_fraction" not in reporter.history[0]
    assert reporter.history[0]["aux_loss"] == 0


def test_batch_larger_than_the_training_split_is_a_clear_error(tmp_path: Path) -> None:
    too_big = TrialConfig.model_validate({**TINY, "recipe": {**TINY["recipe"], "batch_size": 512}})
    with pytest.raises(ValueError, match="batch_size 512 is larger than the 256 training images"):
        train(too_big, LocalReporter(tmp_path))


def test_standalone_entry_point_trains_from_a_trial_json(tmp_path: Path) -> None:
    trial = tmp_path / "trial.json"
    trial.write_text(TrialConfig.model_validate({**TINY, "recipe": {**TINY["recipe"], "epochs": 1}}).model_dump_json())
    done = subprocess.run(
        [sys.executable, "-m", "trainer", "--trial", str(trial), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["epoch"] == 1


def test_torchrun_trains_one_trial_on_two_gloo_processes_with_sharded_experts(tmp_path: Path) -> None:
    trial = tmp_path / "trial.json"
    trial.write_text(TrialConfig.model_validate({**TINY, "recipe": {**TINY["recipe"], "epochs": 1}}).model_dump_json())
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "trainer", "--trial", str(trial), "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1  # rank 0 reports, once per epoch
    metrics = json.loads(lines[0])
    assert metrics["epoch"] == 1 and 0 <= metrics["val_top1"] <= 100
    assert (out / "checkpoint" / "state.pt").is_file() and (out / "checkpoint" / "routing.npz").is_file()
