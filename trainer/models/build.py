"""Build a model from its config, and the wrapper the training loop talks to."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import Tensor, nn

from trainer.config import ModelConfig
from trainer.models import InputSpec
from trainer.models.convnext import build_convnext
from trainer.models.registry import BackboneSpec
from trainer.models.vit import build_vit
from trainer.moe.layer import MoELayer

_BUILDERS: dict[str, Callable[[ModelConfig, BackboneSpec, InputSpec, dist.ProcessGroup | None], nn.Module]] = {
    "vit": build_vit,
    "convnext": build_convnext,
    "convnext_iso": build_convnext,
}


class MoEModel(nn.Module):
    """A backbone with (or, for dense baselines, without) MoE layers.

    The backbone is ``self.backbone``; its MoE layers are found by type, so the
    loop needs no knowledge of where they sit.
    """

    def __init__(self, backbone: nn.Module, cfg: ModelConfig) -> None:
        """
        Args:
            backbone: the network, images → logits.
            cfg: the config it was built from.
        """
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def moe_layers(self) -> list[MoELayer]:
        return [module for module in self.modules() if isinstance(module, MoELayer)]

    def aux_loss(self) -> Tensor:
        """``balance_loss_weight`` × the mean of the last forward's per-layer balance losses."""
        layers = self.moe_layers()
        if not layers:
            return torch.zeros((), device=next(self.parameters()).device)
        losses = [layer.aux_loss for layer in layers]
        if any(loss is None for loss in losses):
            raise RuntimeError("aux_loss() needs a forward pass first")
        return self.cfg.moe.balance_loss_weight * torch.stack(losses).mean()

    def routing_stats(self) -> dict[str, float]:
        """The last forward's routing, averaged over MoE layers (empty for dense models).

        ``dropped_fraction``: share of (token, choice) assignments over capacity.
        ``expert_load_cv``: coefficient of variation (std / mean) of tokens kept per
        expert; 0 is perfectly balanced.
        ``experts_per_image``: distinct experts an image's tokens reached, per layer.
        """
        stats = [layer.last_stats for layer in self.moe_layers()]
        if not stats:
            return {}
        if any(s is None for s in stats):
            raise RuntimeError("routing_stats() needs a forward pass first")
        dropped = torch.stack([s["dropped_fraction"] for s in stats]).float().mean()
        loads = torch.stack([s["tokens_per_expert"] for s in stats]).float()
        cv = (loads.std(dim=1, unbiased=False) / loads.mean(dim=1)).mean()
        per_image = torch.stack([s["experts_per_image"] for s in stats]).float().mean()
        # One transfer for all numbers: this runs every step.
        dropped_fraction, expert_load_cv, experts_per_image = torch.stack([dropped, cv, per_image]).tolist()
        return {
            "dropped_fraction": dropped_fraction,
            "expert_load_cv": expert_load_cv,
            "experts_per_image": experts_per_image,
        }


def build_model(
    cfg: ModelConfig,
    inputs: InputSpec,
    device: torch.device | str | None = None,
    expert_group: dist.ProcessGroup | None = None,
) -> MoEModel:
    """A randomly initialised model (nothing is downloaded).

    Args:
        cfg: backbone, placement and MoE settings.
        inputs: image size, channels and classes of the dataset.
        device: where to allocate parameters (default: torch's default device);
            ``"meta"`` builds shapes only, for accounting, always with the native MoE layer
            (Tutel's has the same parameters but cannot be built without memory).
        expert_group: shard every MoE layer's experts over this process group.
    """
    spec = cfg.backbone_spec
    builder = _BUILDERS[spec.family]
    if device is not None and torch.device(device).type == "meta":
        cfg = cfg.model_copy(update={"moe": cfg.moe.model_copy(update={"backend": "native"})})
    with torch.device(device) if device is not None else nullcontext():
        return MoEModel(builder(cfg, spec, inputs, expert_group), cfg)
