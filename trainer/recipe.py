"""Training recipes: the paper's presets, and the timm pieces a :class:`RecipeConfig` builds.

Presets are data: Table 10 of Videau et al. (TMLR 2025) column by column, the epochs of its
section 4.1 (300 on ImageNet-1k, 90 on ImageNet-21k) and its per-backbone stochastic depth
table. ``RecipeConfig`` resolves a preset when the config is validated, so what a trial
stores, hashes and logs is always the full recipe, and any field can be overridden next to
``preset:`` in the study YAML.

Everything else here turns a resolved recipe into timm objects: the optimizer (AdamW or
LAMB, with expert weights in their own weight-decay group), the cosine schedule, the
train / eval transforms, Mixup / CutMix, the loss and the sampler.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.data import Mixup, create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import Tensor, nn
from torch.utils.data import Dataset, DistributedSampler, Sampler

from trainer.config import RecipeConfig


@dataclass(frozen=True)
class Preset:
    """A named recipe: ``RecipeConfig`` fields, and drop-path rates by backbone.

    Attributes:
        fields: recipe fields the preset sets (the YAML's own values win).
        drop_path: ``model.drop_path`` by backbone, used when the YAML sets none.
        source: where the values come from.
    """

    fields: dict[str, Any]
    drop_path: dict[str, float] = field(default_factory=dict)
    source: str = ""


_TABLE10 = "Videau et al. (TMLR 2025), Table 10 and section 4.1"
# Table 10 lists no gradient clipping, so the paper presets set grad_clip 0 (none).
_RAND_AUGMENT = "rand-m9-mstd0.5-inc1"

PRESETS: dict[str, Preset] = {
    "deit3-in1k": Preset(
        fields={
            "epochs": 300,
            "batch_size": 2048,
            "optimizer": "lamb",
            "lr": 3e-3,
            "weight_decay": 0.03,
            "expert_weight_decay": 0.06,
            "warmup_epochs": 5,
            "label_smoothing": 0.0,
            "repeated_aug": True,
            "hflip": 0.5,
            "rrc": False,
            "auto_augment": "3a",
            "color_jitter": 0.3,
            "mixup": 0.8,
            "cutmix": 1.0,
            "random_erasing": 0.0,
            "test_crop_ratio": 1.0,
            "loss": "bce",
            "grad_clip": 0.0,
        },
        drop_path={"vit_s": 0.1, "vit_b": 0.2},
        source=_TABLE10,
    ),
    "deit3-in21k": Preset(
        fields={
            "epochs": 90,
            "batch_size": 2048,
            "optimizer": "lamb",
            "lr": 2.5e-3,
            "weight_decay": 0.02,
            "expert_weight_decay": 0.04,
            "warmup_epochs": 5,
            "label_smoothing": 0.1,
            "repeated_aug": False,
            "hflip": 0.5,
            "rrc": True,
            "auto_augment": "3a",
            "color_jitter": 0.3,
            "mixup": 0.0,
            "cutmix": 1.0,
            "random_erasing": 0.0,
            "test_crop_ratio": 1.0,
            "loss": "ce",
            "grad_clip": 0.0,
        },
        drop_path={"vit_s": 0.0, "vit_b": 0.1},
        source=_TABLE10,
    ),
    "convnext-in1k": Preset(
        fields={
            "epochs": 300,
            "batch_size": 2048,
            "optimizer": "adamw",
            "lr": 2.5e-3,
            "weight_decay": 0.05,
            "expert_weight_decay": 0.05,
            "warmup_epochs": 20,
            "label_smoothing": 0.1,
            "repeated_aug": False,
            "hflip": 0.5,
            "rrc": False,
            "auto_augment": _RAND_AUGMENT,
            "color_jitter": 0.0,
            "mixup": 0.8,
            "cutmix": 1.0,
            "random_erasing": 0.25,
            "test_crop_ratio": 0.875,
            "loss": "ce",
            "grad_clip": 0.0,
        },
        drop_path={"convnext_t": 0.1, "convnext_s": 0.3, "convnext_b": 0.6},
        source=_TABLE10,
    ),
    "convnext-in21k": Preset(
        fields={
            "epochs": 90,
            "batch_size": 2048,
            "optimizer": "adamw",
            "lr": 2.5e-3,
            "weight_decay": 0.05,
            "expert_weight_decay": 0.05,
            "warmup_epochs": 5,
            "label_smoothing": 0.1,
            "repeated_aug": False,
            "hflip": 0.5,
            "rrc": False,
            "auto_augment": _RAND_AUGMENT,
            "color_jitter": 0.0,
            "mixup": 0.0,
            "cutmix": 1.0,
            "random_erasing": 0.0,
            "test_crop_ratio": 0.875,
            "loss": "ce",
            "grad_clip": 0.0,
        },
        drop_path={"convnext_t": 0.0, "convnext_s": 0.0, "convnext_b": 0.1},
        source=_TABLE10,
    ),
    # Minutes on a laptop CPU with the embedded digits: the demo study's recipe.
    "demo": Preset(
        fields={
            "epochs": 6,
            "batch_size": 64,
            "optimizer": "adamw",
            "lr": 3e-3,
            "weight_decay": 0.05,
            "warmup_epochs": 1,
            "label_smoothing": 0.0,
            "loss": "ce",
        },
        source="sweetspot",
    ),
}


def preset_drop_path(preset: str | None, backbone: str) -> float | None:
    """The preset's stochastic depth for ``backbone``, or None when it has none."""
    if preset is None or preset not in PRESETS:
        return None
    return PRESETS[preset].drop_path.get(backbone)


# ---------------------------------------------------------------------------------------------
# Optimizer and schedule


def param_groups(model: nn.Module, recipe: RecipeConfig, expert_params: list[nn.Parameter]) -> list[dict]:
    """Trainable parameters in three groups: decayed dense, decayed experts, never decayed.

    Biases, norm scales and anything the backbone lists in ``no_weight_decay()`` (ViT's
    position embedding and class token) are never decayed, as in timm. Expert biases are
    ``[E, out]``, so the rule looks at the name as well as the rank.
    """
    skip: set[str] = set()
    for name, module in model.named_modules():
        if hasattr(module, "no_weight_decay"):
            prefix = f"{name}." if name else ""
            skip |= {prefix + n for n in module.no_weight_decay()}
    experts = {id(p) for p in expert_params}
    dense: list[nn.Parameter] = []
    expert: list[nn.Parameter] = []
    none: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith("bias") or name in skip:
            none.append(param)
        elif id(param) in experts:
            expert.append(param)
        else:
            dense.append(param)
    groups = [
        {"params": dense, "weight_decay": recipe.weight_decay},
        {"params": expert, "weight_decay": recipe.expert_decay},
        {"params": none, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module, recipe: RecipeConfig, expert_params: list[nn.Parameter]
) -> torch.optim.Optimizer:
    """timm's AdamW or LAMB over :func:`param_groups`.

    LAMB's trust ratio is per parameter tensor: the experts of a layer are one stacked tensor
    (a rank's shard under expert parallelism), as in Tutel, which the paper trained with.
    """
    groups = param_groups(model, recipe, expert_params)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return create_optimizer_v2(groups, opt=recipe.optimizer, lr=recipe.lr, weight_decay=recipe.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: RecipeConfig, steps_per_epoch: int) -> Any:
    """Per-step linear warmup from ``lr / 1000``, then cosine decay to 0 at the last step."""
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched="cosine",
        num_epochs=recipe.epochs,
        warmup_epochs=recipe.warmup_epochs,
        warmup_lr=recipe.lr * 1e-3,
        step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )
    return scheduler


# ---------------------------------------------------------------------------------------------
# Data side


def build_transforms(recipe: RecipeConfig, img_size: int) -> tuple[Callable, Callable]:
    """timm ``(train, eval)`` transforms for image-file datasets."""
    train = create_transform(
        img_size,
        is_training=True,
        train_crop_mode="rrc" if recipe.rrc else "rkrr",
        hflip=recipe.hflip,
        color_jitter=recipe.color_jitter,
        auto_augment=recipe.auto_augment,
        re_prob=recipe.random_erasing,
        interpolation="bicubic",
    )
    evaluate = create_transform(img_size, crop_pct=recipe.test_crop_ratio, interpolation="bicubic")
    return train, evaluate


class _SeededRepeatAugSampler(RepeatAugSampler):
    """timm's repeated-augmentation sampler, shuffled by the trial's seed as well as the epoch."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        # selected_round=0: every epoch keeps len(dataset) / world images per rank, also for
        # datasets smaller than DeiT's rounding unit of 256.
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, selected_round=0)
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(self.seed * 100_003 + epoch)


def build_sampler(dataset: Dataset, recipe: RecipeConfig, rank: int, world: int, seed: int) -> Sampler:
    """Every rank gets the same number of images (DDP needs equal step counts)."""
    if recipe.repeated_aug:
        return _SeededRepeatAugSampler(dataset, world, rank, seed)
    return DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)


def build_mixup(recipe: RecipeConfig, num_classes: int) -> Mixup | None:
    """timm's Mixup / CutMix (per batch), or None when the recipe uses neither."""
    if recipe.mixup <= 0 and recipe.cutmix <= 0:
        return None
    return Mixup(
        mixup_alpha=recipe.mixup,
        cutmix_alpha=recipe.cutmix,
        label_smoothing=recipe.label_smoothing,
        num_classes=num_classes,
    )


class TrainLoss(nn.Module):
    """The recipe's loss on integer targets, or on soft targets from Mixup / CutMix.

    Soft targets already carry the label smoothing (Mixup applies it), so it is not applied
    twice.
    """

    def __init__(self, recipe: RecipeConfig) -> None:
        super().__init__()
        self.kind = recipe.loss
        self.smoothing = recipe.label_smoothing
        self.soft_ce = SoftTargetCrossEntropy()
        self.bce_hard = BinaryCrossEntropy(smoothing=recipe.label_smoothing)
        self.bce_soft = BinaryCrossEntropy(smoothing=0.0)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        logits = logits.float()
        soft = targets.ndim == 2
        if self.kind == "bce":
            return (self.bce_soft if soft else self.bce_hard)(logits, targets)
        if soft:
            return self.soft_ce(logits, targets)
        return nn.functional.cross_entropy(logits, targets, label_smoothing=self.smoothing)
