"""Fine-tuning and linear probing from another trial's checkpoint, and how ``init_from`` resolves."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from orchestrator.expand import expand
from orchestrator.lineage import LineageError, resolve_inits, train_run_name
from orchestrator.spec import load_study
from orchestrator.tracking import StudyStore
from trainer.config import TrialConfig
from trainer.loop import CHECKPOINT_FILE, train
from trainer.report import LocalReporter

MODEL = {"backbone": "vit_mini", "placement": "last2", "moe": {"experts": 4, "top_k": 2}}
PRETRAIN = {
    "model": MODEL,
    "data": {"train_samples": 512},
    "recipe": {"epochs": 2, "batch_size": 64, "lr": 0.003},
}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 2-epoch MoE trial's checkpoint folder."""
    out = tmp_path_factory.mktemp("pretrain")
    train(TrialConfig.model_validate(PRETRAIN), LocalReporter(out))
    return out / "checkpoint"


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / CHECKPOINT_FILE, map_location="cpu", weights_only=False)["model"]


def _trial(mode: str, init: str) -> TrialConfig:
    return TrialConfig.model_validate(
        {**PRETRAIN, "recipe": {"epochs": 1, "batch_size": 64, "lr": 0.003, "mode": mode, "init_from": init}}
    )


def test_linear_probe_trains_only_the_head_from_the_checkpoint(pretrained: Path, tmp_path: Path) -> None:
    before = _weights(pretrained)
    reporter = LocalReporter(tmp_path)
    train(_trial("linear_probe", str(pretrained)), reporter, pretrained)
    after = _weights(tmp_path / "checkpoint")
    head = {"backbone.head.weight", "backbone.head.bias"}
    for name, value in after.items():
        if name in head:
            assert not torch.equal(value, before[name]), name
        else:
            assert torch.equal(value, before[name]), name  # frozen, experts included
    # The frozen features already separate digits (ten classes: chance is 10%).
    assert reporter.history[0]["val_top1"] > 30


def test_finetune_starts_from_the_checkpoint_and_replaces_a_head_of_another_shape(
    pretrained: Path, tmp_path: Path
) -> None:
    # A checkpoint whose head has 21 classes (as ImageNet-21k → 1k): every other weight is reused.
    state = torch.load(pretrained / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    state["model"]["backbone.head.weight"] = torch.zeros(21, state["model"]["backbone.head.weight"].shape[1])
    state["model"]["backbone.head.bias"] = torch.zeros(21)
    other = tmp_path / "in21k"
    other.mkdir()
    torch.save(state, other / CHECKPOINT_FILE)
    reporter = LocalReporter(tmp_path / "out")
    train(_trial("finetune", str(other)), reporter, other)
    scratch = LocalReporter(tmp_path / "scratch")
    train(TrialConfig.model_validate({**PRETRAIN, "recipe": {**PRETRAIN["recipe"], "epochs": 1}}), scratch)
    # One epoch from the pretrained body beats one epoch of the same schedule from scratch.
    assert reporter.history[0]["val_top1"] > scratch.history[0]["val_top1"] + 5


def test_a_checkpoint_of_another_model_is_a_clear_error(pretrained: Path, tmp_path: Path) -> None:
    dense = TrialConfig.model_validate(
        {
            **PRETRAIN,
            "model": {**MODEL, "placement": "none"},
            "recipe": {"epochs": 1, "batch_size": 64, "mode": "finetune", "init_from": str(pretrained)},
        }
    )
    with pytest.raises(ValueError, match="does not fit model vit_mini .*unexpected .*experts"):
        train(dense, LocalReporter(tmp_path), pretrained)
    with pytest.raises(ValueError, match="needs the checkpoint of recipe.init_from"):
        train(_trial("finetune", "x.yaml"), LocalReporter(tmp_path / "b"), None)


STAGE1 = """
name: stage1
base:
  model: {{backbone: vit_mini, placement: last2, moe: {{experts: 4, top_k: 2}}, drop_path: 0.0}}
  data: {{train_samples: 512}}
  recipe: {{epochs: 2, batch_size: 64}}
grid:
  experts: [4, 8]
output: {out}
"""
STAGE2 = """
name: stage2
base:
  model: {{backbone: vit_mini, placement: last2, moe: {{experts: 4, top_k: 2}}, drop_path: 0.1}}
  recipe: {{epochs: 1, batch_size: 64, mode: finetune, init_from: {stage1}}}
grid:
  experts: [4, 8]
output: {out}
"""


def test_init_from_a_study_finds_the_finished_trial_with_the_same_model_and_seed(
    pretrained: Path, tmp_path: Path
) -> None:
    stage1 = tmp_path / "stage1.yaml"
    stage1.write_text(STAGE1.format(out=tmp_path / "s1"))
    stage2 = tmp_path / "stage2.yaml"
    stage2.write_text(STAGE2.format(stage1=stage1, out=tmp_path / "s2"))
    spec1, source1 = load_study(stage1)
    first = {t.config.model.moe.experts: t for t in expand(spec1, source1)}
    second = expand(*load_study(stage2))

    with pytest.raises(LineageError, match="is not run; run `sweetspot run .*stage1.yaml` first"):
        resolve_inits(second)

    # Stage 1's 4-expert trial FINISHED in MLflow with a checkpoint where Ray Train leaves them.
    store = StudyStore.open(spec1)
    parent = store.study_run(spec1)
    run_id = store.start_trial(first[4], parent)
    store.finish(run_id, "FINISHED")
    folder = Path(spec1.train_storage) / train_run_name(first[4].hash) / "checkpoint_2026-11-23_00-00-00.000000"
    shutil.copytree(pretrained, folder)

    with pytest.raises(LineageError, match="ViT-Mini-8 Last 2 Top 2 seed 0 is not run"):
        resolve_inits(second)
    inits = resolve_inits([t for t in second if t.config.model.moe.experts == 4])
    (source,) = inits.values()
    # drop_path differs between the stages (as between the paper's 21k and 1k recipes): still a match.
    assert source.trial_hash == first[4].hash and source.study == "stage1"
    assert source.checkpoint == folder / CHECKPOINT_FILE

    missing = tmp_path / "nowhere"
    bad = TrialConfig.model_validate({"recipe": {"mode": "finetune", "init_from": str(missing)}})
    with pytest.raises(LineageError, match="no checkpoint at"):
        resolve_inits([type(second[0])(index=0, config=bad, name="x", axes={})])
