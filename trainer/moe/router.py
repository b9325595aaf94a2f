"""Routers: who goes where.

A router scores tokens against experts; it moves nothing. Capacity, dropping and token
movement belong to :mod:`trainer.moe.dispatch`, the expert computation to
:mod:`trainer.moe.experts`.

Token-choice routers (``linear``, ``cosine``, ``l2``) differ only in how they score a token
against each expert (:meth:`TopKRouter.logits`); turning scores into a
:class:`RoutingDecision` (noise, softmax, top-k, gate normalisation) is shared. Expert
choice uses the linear scorer with its own selection, and Soft MoE has its own slot
parameters (:class:`SoftRouter`).
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from timm.layers import trunc_normal_
from torch import Tensor, nn
from torch.nn import functional as F

from trainer.config import MoEConfig

# Cosine and L2 routers, as in Tutel's cosine gate (and X-MoE): the temperature is learned in
# log space, starts at 0.5 and may not fall below 0.01.
_INIT_TEMPERATURE = 0.5
_MIN_TEMPERATURE = 0.01
DEFAULT_ROUTER_DIM = 256


def full_precision(x: Tensor) -> AbstractContextManager[object]:
    """Autocast off for ``x``'s device: near-tied logits in bf16 would flip choices between steps.

    (The meta device, used for cost accounting, has no autocast to turn off.)
    """
    return nullcontext() if x.device.type == "meta" else torch.autocast(x.device.type, enabled=False)


@dataclass(frozen=True)
class RoutingDecision:
    """Token-choice routing of T tokens, each to k of E experts.

    Attributes:
        expert_index: ``[T, k]`` long, the chosen experts, best first.
        gates: ``[T, k]`` float32 combine weights of the chosen experts; differentiable
            w.r.t. the router, which is how the task loss trains it.
        probs: ``[T, E]`` float32 router distribution over all experts (balance losses).
        logits: ``[T, E]`` float32 scores, before noise.
        noisy_logits: ``[T, E]`` float32 scores the choice was made on (``logits`` in eval
            or without gate noise).
        priority: ``[T]`` float32, detached: each token's top-1 probability, the score
            Batch Prioritized Routing orders tokens by.
    """

    expert_index: Tensor
    gates: Tensor
    probs: Tensor
    logits: Tensor
    noisy_logits: Tensor
    priority: Tensor


class TopKRouter(nn.Module):
    """Token choice: scores → (noise) → softmax over experts → top-k → gates."""

    def __init__(
        self, experts: int, top_k: int, normalize_gates: bool = True, gate_noise: float = 0.0
    ) -> None:
        """
        Args:
            experts: number of experts E to choose from.
            top_k: experts per token k.
            normalize_gates: renormalise the k chosen probabilities to sum to one (k > 1 only).
            gate_noise: in training, add Gaussian noise of std ``gate_noise / E`` to the scores.
        """
        super().__init__()
        if not experts >= top_k >= 1:
            raise ValueError(f"experts >= top_k >= 1, but got experts={experts}, top_k={top_k}")
        self.experts = experts
        self.top_k = top_k
        self.normalize_gates = normalize_gates
        self.gate_noise = gate_noise

    def logits(self, x: Tensor) -> Tensor:
        """``[T, dim]`` float32 tokens → ``[T, E]`` float32 scores."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> RoutingDecision:
        """Route ``x`` of shape ``[tokens, dim]``."""
        with full_precision(x):
            logits = self.logits(x.float())
        noisy_logits = logits
        if self.training and self.gate_noise > 0:
            noisy_logits = logits + torch.randn_like(logits) * self.noise_std
        probs = noisy_logits.softmax(dim=-1)
        top_probs, expert_index = probs.topk(self.top_k, dim=-1)
        # With k = 1 a renormalised gate is always 1 and the task loss would never reach the
        # router; V-MoE keeps the raw probability there, and so do we.
        renormalise = self.normalize_gates and self.top_k > 1
        gates = top_probs / top_probs.sum(dim=-1, keepdim=True) if renormalise else top_probs
        return RoutingDecision(expert_index, gates, probs, logits, noisy_logits, top_probs[:, 0].detach())

    @property
    def noise_std(self) -> float:
        """Std of the training-time gate noise (0 in eval)."""
        return self.gate_noise / self.experts if self.training else 0.0


class LinearRouter(TopKRouter):
    """The paper's conv1x1 gate: a bias-free linear map to one score per expert."""

    def __init__(
        self, dim: int, experts: int, top_k: int, normalize_gates: bool = True, gate_noise: float = 0.0
    ):
        super().__init__(experts, top_k, normalize_gates, gate_noise)
        self.gate = nn.Linear(dim, experts, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # What timm's ViT init gives every nn.Linear; the model's init has already run when
        # the MoE layer replaces the MLP, so the router initialises itself.
        trunc_normal_(self.gate.weight, std=0.02)

    def logits(self, x: Tensor) -> Tensor:
        return F.linear(x, self.gate.weight.float())


class _ProjectedRouter(TopKRouter):
    """Project tokens to a small space and compare them with one learned embedding per expert."""

    def __init__(
        self,
        dim: int,
        experts: int,
        top_k: int,
        router_dim: int | None = None,
        normalize_gates: bool = True,
        gate_noise: float = 0.0,
    ) -> None:
        """
        Args:
            router_dim: width of the routing space (default ``min(256, dim)``).
        """
        super().__init__(experts, top_k, normalize_gates, gate_noise)
        router_dim = router_dim or min(DEFAULT_ROUTER_DIM, dim)
        self.proj = nn.Linear(dim, router_dim)
        self.expert_embeddings = nn.Parameter(torch.empty(experts, router_dim))
        self.log_inv_temperature = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        trunc_normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)
        nn.init.normal_(self.expert_embeddings, std=0.32)
        nn.init.constant_(self.log_inv_temperature, math.log(1 / _INIT_TEMPERATURE))

    def inverse_temperature(self) -> Tensor:
        return self.log_inv_temperature.float().clamp(max=math.log(1 / _MIN_TEMPERATURE)).exp()


class CosineRouter(_ProjectedRouter):
    """Cosine similarity between the projected token and each expert embedding, over a temperature."""

    def logits(self, x: Tensor) -> Tensor:
        h = F.normalize(F.linear(x, self.proj.weight.float(), self.proj.bias.float()), dim=-1)
        e = F.normalize(self.expert_embeddings.float(), dim=-1)
        return (h @ e.t()) * self.inverse_temperature()


class L2Router(_ProjectedRouter):
    """Negative L2 distance between the projected token and each expert embedding, over a temperature."""

    def logits(self, x: Tensor) -> Tensor:
        h = F.linear(x, self.proj.weight.float(), self.proj.bias.float())
        return -torch.cdist(h, self.expert_embeddings.float()) * self.inverse_temperature()


class ExpertChoiceRouter(nn.Module):
    """Expert choice's scorer: the linear gate's softmax over experts, for every token.

    Selection (each expert's top-C tokens) is the dispatcher's job, because it needs C.
    """

    def __init__(self, dim: int, experts: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, experts, bias=False)
        trunc_normal_(self.gate.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        """``[T, dim]`` → ``[T, E]`` float32 probabilities."""
        with full_precision(x):
            return F.linear(x.float(), self.gate.weight.float()).softmax(dim=-1)


class SoftRouter(nn.Module):
    """Soft MoE's slot parameters Φ and the dispatch/combine weights they give.

    Logits are computed between l2-normalised tokens and ``scale`` × l2-normalised slot
    parameters (the paper's normalisation, which keeps the softmaxes from collapsing as the
    width grows); ``scale`` is learned.
    """

    def __init__(self, dim: int, experts: int, slots_per_expert: int) -> None:
        super().__init__()
        self.experts = experts
        self.slots_per_expert = slots_per_expert
        self.phi = nn.Parameter(torch.empty(dim, experts * slots_per_expert))
        self.scale = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # LeCun normal, as the reference implementation initialises Φ.
        nn.init.normal_(self.phi, std=self.phi.shape[0] ** -0.5)
        nn.init.ones_(self.scale)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, N, dim]`` → (dispatch ``[B, N, S]`` softmax over tokens, combine ``[B, N, S]``
        softmax over slots), float32, ``S = experts · slots_per_expert`` slots, expert-major."""
        with full_precision(x):
            tokens = F.normalize(x.float(), dim=-1, eps=1e-6)
            phi = self.scale.float() * F.normalize(self.phi.float(), dim=0, eps=1e-6)
            logits = tokens @ phi
        return logits.softmax(dim=1), logits.softmax(dim=2)


def build_router(dim: int, cfg: MoEConfig) -> nn.Module:
    """The router ``cfg.router`` names, for tokens of width ``dim``."""
    if cfg.router == "linear":
        return LinearRouter(dim, cfg.experts, cfg.top_k, cfg.normalize_gates, cfg.gate_noise)
    if cfg.router in ("cosine", "l2"):
        cls = CosineRouter if cfg.router == "cosine" else L2Router
        return cls(dim, cfg.experts, cfg.top_k, cfg.router_dim, cfg.normalize_gates, cfg.gate_noise)
    if cfg.router == "expert_choice":
        return ExpertChoiceRouter(dim, cfg.experts)
    if cfg.router == "soft":
        return SoftRouter(dim, cfg.experts, cfg.slots_per_expert)
    raise ValueError(f"unknown router {cfg.router!r}")
