"""The ImageNet-style folder dataset: config rules, shapes, sizes, and a real training epoch."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from trainer.config import DataConfig, TrialConfig
from trainer.data import input_spec, load_datasets, train_size
from trainer.loop import train
from trainer.models import InputSpec
from trainer.report import LocalReporter


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/train and root/validation, 3 classes of coloured 40x40 squares (8 train, 2 val each)."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("validation", 2)):
        for label, colour in enumerate(((255, 0, 0), (0, 255, 0), (0, 0, 255))):
            directory = root / split / f"class_{label}"
            directory.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(rng.normal(0, 30, (40, 40, 3)) + colour, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(directory / f"{i}.png")
    return root


def test_folder_needs_a_root_and_classes_and_mnist_takes_neither() -> None:
    with pytest.raises(ValidationError, match="dataset 'folder' needs root and num_classes"):
        DataConfig(dataset="folder")
    with pytest.raises(ValidationError, match=r"root only apply to image-file datasets \('folder', 'hf'\)"):
        DataConfig(root="/data")


def test_folder_shapes_and_sizes_come_from_the_config_and_the_tree(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATA_ROOT", str(folder))
    cfg = DataConfig(dataset="folder", root="$DATA_ROOT", img_size=28, num_classes=3)
    assert input_spec(cfg) == InputSpec(img_size=28, in_chans=3, num_classes=3)
    assert train_size(cfg) == 24
    assert train_size(DataConfig(dataset="folder", root="/nowhere", num_classes=3)) is None
    train_set, val_set = load_datasets(cfg)
    assert (len(train_set), len(val_set)) == (24, 6)
    image, label = train_set[0]
    assert tuple(image.shape) == (3, 28, 28) and 0 <= label < 3


def test_folder_mismatches_are_clear_errors(folder: Path) -> None:
    with pytest.raises(ValueError, match="num_classes is 5, but .* has 3 class folders"):
        load_datasets(DataConfig(dataset="folder", root=str(folder), num_classes=5))
    with pytest.raises(FileNotFoundError, match="missing'.* is not a folder"):
        load_datasets(DataConfig(dataset="folder", root=str(folder / "missing"), num_classes=3))
    with pytest.raises(FileNotFoundError, match="has no train/ folder"):
        load_datasets(DataConfig(dataset="folder", root=str(folder / "train"), num_classes=3))


def _folder_trial(folder: Path, data: dict, recipe: dict) -> TrialConfig:
    """A 4-expert ViT-Mini MoE trial on the 3-class folder dataset at 28 px."""
    return TrialConfig.model_validate(
        {
            "model": {"backbone": "vit_mini", "placement": "last2", "moe": {"experts": 4, "top_k": 1}},
            "data": {"dataset": "folder", "root": str(folder), "img_size": 28, "num_classes": 3, **data},
            "recipe": recipe,
        }
    )


def test_a_moe_trial_trains_on_a_folder_dataset(folder: Path, tmp_path: Path) -> None:
    trial = _folder_trial(folder, {"train_samples": 16}, {"epochs": 1, "batch_size": 8})
    reporter = LocalReporter(tmp_path)
    train(trial, reporter)
    [metrics] = reporter.history
    assert 0 <= metrics["val_top1"] <= 100 and metrics["train_loss"] > 0


def test_a_paper_recipe_trains_on_images_and_scores_an_ood_subset_with_routing_analysis(
    folder: Path, tmp_path: Path
) -> None:
    """The convnext-in1k preset's real image pipeline (RandAugment, erasing, mixup/cutmix), then an
    OOD set holding 2 of the 3 classes, scored with logits restricted to those 2."""
    shifted = tmp_path / "shifted"
    for name in ("class_1", "class_2"):
        shutil.copytree(folder / "validation" / name, shifted / name)
    trial = _folder_trial(
        folder,
        {"ood": [{"kind": "folder", "root": str(shifted), "name": "shifted"}]},
        {"preset": "convnext-in1k", "epochs": 2, "batch_size": 8, "warmup_epochs": 0},
    )
    reporter = LocalReporter(tmp_path / "out")
    train(trial, reporter)
    first, last = reporter.history
    assert "ood_shifted_top1" not in first  # scored once, after the last epoch
    assert 0 <= last["ood_shifted_top1"] <= 100
    # Two classes present: the two surviving logits are the whole top-5.
    assert last["ood_shifted_top5"] == 100
    with np.load(tmp_path / "out" / "checkpoint" / "routing.npz") as routing:
        assert list(routing["layers"]) == ["block3", "block5"]  # vit_mini (6 blocks): Last 2
        assert routing["block5/class_counts"].shape == (3, 4)
        assert int(routing["images"]) == 6  # the validation split
