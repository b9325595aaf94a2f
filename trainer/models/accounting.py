"""Parameter accounting without allocating a model (built on the meta device)."""

from __future__ import annotations

from dataclasses import dataclass

from trainer.config import ModelConfig
from trainer.models import InputSpec
from trainer.models.build import build_model


@dataclass(frozen=True)
class ParamCount:
    """Parameters of a model.

    Attributes:
        total: every parameter.
        active: parameters one sample uses: everything but the routed experts, plus
            top_k of each MoE layer's experts (a shared expert is always active; Soft MoE
            sends slots of every image to every expert, so all of them are).
    """

    total: int
    active: int


def count_params(cfg: ModelConfig, inputs: InputSpec) -> ParamCount:
    model = build_model(cfg, inputs, device="meta")
    total = sum(p.numel() for p in model.parameters())
    active = total
    for layer in model.moe_layers():
        if layer.cfg.router == "soft":
            continue
        routed = sum(p.numel() for p in layer.expert_parameters())
        # Experts are equal in size, so k of E experts are exactly k/E of the routed params.
        active -= routed - routed // layer.cfg.experts * layer.cfg.top_k
    return ParamCount(total=total, active=active)
