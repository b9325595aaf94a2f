"""Routers: who goes where.

A router looks at tokens and returns a :class:`RoutingDecision`; it moves nothing.
Capacity, dropping and token movement belong to :mod:`trainer.moe.dispatch`, the
expert computation to :mod:`trainer.moe.experts`. New token-choice routers (cosine,
l2) return the same decision, so the rest of the layer does not change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers import trunc_normal_
from torch import Tensor, nn

from trainer.config import MoEConfig


@dataclass(frozen=True)
class RoutingDecision:
    """Token-choice routing of T tokens, each to k of E experts.

    Attributes:
        expert_index: ``[T, k]`` long, the chosen experts, best first.
        gates: ``[T, k]`` float32 combine weights of the chosen experts; differentiable
            w.r.t. the router, which is how the task loss trains it.
        probs: ``[T, E]`` float32 router distribution over all experts (balance loss).
        priority: ``[T]`` float32, detached: each token's top-1 probability, the score
            Batch Prioritized Routing orders tokens by.
    """

    expert_index: Tensor
    gates: Tensor
    probs: Tensor
    priority: Tensor


class LinearRouter(nn.Module):
    """The paper's conv1x1 gate: bias-free linear → softmax over experts → top-k."""

    def __init__(self, dim: int, experts: int, top_k: int, normalize_gates: bool = True) -> None:
        """
        Args:
            dim: token width.
            experts: number of experts E to choose from.
            top_k: experts per token k.
            normalize_gates: renormalise the k chosen probabilities to sum to one (default True).
        """
        super().__init__()
        if not experts >= top_k >= 1:
            raise ValueError(f"experts >= top_k >= 1, but got experts={experts}, top_k={top_k}")
        self.top_k = top_k
        self.normalize_gates = normalize_gates
        self.gate = nn.Linear(dim, experts, bias=False)
        # What timm's ViT init gives every nn.Linear; the model's init has already run
        # when the MoE layer replaces the MLP, so the router initialises itself.
        trunc_normal_(self.gate.weight, std=0.02)

    def forward(self, x: Tensor) -> RoutingDecision:
        """Route ``x`` of shape ``[tokens, dim]``."""
        # Under bf16 autocast, near-tied logits would flip top-k choices between steps.
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = nn.functional.linear(x.float(), self.gate.weight.float())
        probs = logits.softmax(dim=-1)
        top_probs, expert_index = probs.topk(self.top_k, dim=-1)
        # With k = 1 a renormalised gate is always 1 and the task loss would never reach the
        # router; V-MoE keeps the raw probability there, and so do we.
        renormalise = self.normalize_gates and self.top_k > 1
        gates = top_probs / top_probs.sum(dim=-1, keepdim=True) if renormalise else top_probs
        return RoutingDecision(expert_index, gates, probs, top_probs[:, 0].detach())


def build_router(dim: int, cfg: MoEConfig) -> LinearRouter:
    """The router ``cfg.router`` names, for tokens of width ``dim``."""
    if cfg.router == "linear":
        return LinearRouter(dim, cfg.experts, cfg.top_k, normalize_gates=cfg.normalize_gates)
    raise ValueError(f"unknown router {cfg.router!r}")
