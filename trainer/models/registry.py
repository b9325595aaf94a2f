"""Backbones by name, and what a placement name means for each.

Plain data, cheap to import: the config schema validates against it and the
orchestrator names trials from it without building a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Family = Literal["vit", "convnext", "convnext_iso"]


@dataclass(frozen=True)
class BackboneSpec:
    """Shape of a backbone.

    Attributes:
        name: registry key used in YAML (``vit_s``).
        display: name used in tables (``ViT-S``); trial names add "(iso.)" for isotropic ConvNeXts.
        family: ``vit``, ``convnext`` (hierarchical stages) or ``convnext_iso`` (one stage).
        depths: blocks per stage; isotropic models have a single stage.
        dims: width per stage.
        heads: attention heads (ViT only).
        patch_size: patch size of the stem.
        mlp_ratio: hidden/width ratio of the dense MLPs.
        global_pool: ViT head input: ``token`` ([CLS]) or ``avg`` (mean of patch tokens).
    """

    name: str
    display: str
    family: Family
    depths: tuple[int, ...]
    dims: tuple[int, ...]
    heads: int = 0
    patch_size: int = 16
    mlp_ratio: float = 4.0
    global_pool: Literal["token", "avg"] = "token"

    @property
    def depth(self) -> int:
        return sum(self.depths)

    @property
    def hierarchical(self) -> bool:
        return len(self.depths) > 1


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        # DeiT III sizes (12 blocks, patch 16).
        BackboneSpec("vit_ti", "ViT-Ti", "vit", (12,), (192,), heads=3),
        BackboneSpec("vit_s", "ViT-S", "vit", (12,), (384,), heads=6),
        BackboneSpec("vit_b", "ViT-B", "vit", (12,), (768,), heads=12),
        # Trains on a laptop CPU in seconds per epoch on 28x28 digits: 16 patches of 7x7, and
        # average pooling, which learns several times faster than [CLS] on 4,000 images.
        BackboneSpec("vit_mini", "ViT-Mini", "vit", (6,), (64,), heads=2, patch_size=7, global_pool="avg"),
        # Liu et al. 2022: patch-4 stem, four stages.
        BackboneSpec("convnext_t", "ConvNeXt-T", "convnext", (3, 3, 9, 3), (96, 192, 384, 768), patch_size=4),
        BackboneSpec("convnext_s", "ConvNeXt-S", "convnext", (3, 3, 27, 3), (96, 192, 384, 768), patch_size=4),
        BackboneSpec("convnext_b", "ConvNeXt-B", "convnext", (3, 3, 27, 3), (128, 256, 512, 1024), patch_size=4),
        # The isotropic variants of the same paper: a patch-16 stem and 18 blocks at one width.
        BackboneSpec("convnext_s_iso", "ConvNeXt-S", "convnext_iso", (18,), (384,), patch_size=16),
        BackboneSpec("convnext_b_iso", "ConvNeXt-B", "convnext_iso", (18,), (768,), patch_size=16),
        # For 28x28 digits: a 1x1 stem keeps four stages above 1x1 (28, 14, 7, 3 px) ...
        BackboneSpec("convnext_mini", "ConvNeXt-Mini", "convnext", (1, 1, 3, 1), (16, 32, 64, 128), patch_size=1),
        # ... and the isotropic one sees 16 positions of 7x7, like vit_mini.
        BackboneSpec("convnext_mini_iso", "ConvNeXt-Mini", "convnext_iso", (6,), (64,), patch_size=7),
    )
}


def allowed_placements(spec: BackboneSpec) -> list[str]:
    names = ["none", "every2", "last2", "last3", "last:L", "[indices]"]
    if spec.hierarchical:
        names.insert(4, "stage")
    return names


def resolve_placement(placement: str | list[int], spec: BackboneSpec) -> list[int]:
    """Block indices (0-based, over the whole network) that get an MoE layer.

    Isotropic (ViT, isotropic ConvNeXt): ``every2`` = odd blocks; ``last2``/``last3`` = the
    last 2/3 odd-indexed blocks; ``last:L`` = the last L blocks.
    Hierarchical ConvNeXt: ``every2`` = every second block over the network; ``stage`` =
    last block of every stage; ``last2`` = last block of each of the last two stages;
    ``last3`` = ``last2`` plus the middle block of the third stage.

    Raises:
        ValueError: the placement does not fit this backbone; the message names the allowed ones.
    """
    depth = spec.depth
    allowed = ", ".join(allowed_placements(spec))

    def misfit(why: str) -> ValueError:
        return ValueError(f"placement {placement!r} does not fit {spec.name}: {why} (allowed: {allowed})")

    if isinstance(placement, list):
        if len(set(placement)) != len(placement):
            raise misfit("duplicate block indices")
        bad = [i for i in placement if not 0 <= i < depth]
        if bad:
            raise misfit(f"block indices {bad} outside 0..{depth - 1}")
        return sorted(placement)
    if placement == "none":
        return []
    if placement.startswith("last:"):
        count = int(placement.split(":", 1)[1])
        if count > depth:
            raise misfit(f"it has only {depth} blocks")
        return list(range(depth - count, depth))
    odd = list(range(1, depth, 2))
    if placement == "every2":
        return odd
    if not spec.hierarchical:
        if placement == "stage":
            raise misfit("it has a single stage")
        count = {"last2": 2, "last3": 3}[placement]
        return odd[-count:]
    stage_ends = [sum(spec.depths[: i + 1]) - 1 for i in range(len(spec.depths))]
    if placement == "stage":
        return stage_ends
    if placement == "last2":
        return stage_ends[-2:]
    if placement == "last3":
        if len(spec.depths) < 3:
            raise misfit("it has fewer than three stages")
        stage3_start = sum(spec.depths[:2])
        middle = stage3_start + spec.depths[2] // 2
        return sorted({middle, *stage_ends[-2:]})
    raise misfit("unknown placement")
