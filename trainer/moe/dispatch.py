"""How tokens move: a routing decision, under per-expert capacity, to and from the experts.

Every router's dispatcher fills an ``[experts, capacity, dim]`` buffer, so the experts run
as one batched matmul (and, under expert parallelism, the buffer is what travels by
all-to-all), then reads the experts' output back, weighted by the gates:

- :class:`TokenDispatcher` (token choice): first come first served under capacity.
- :class:`ExpertChoiceDispatcher`: each expert takes its top-C tokens.
- :class:`SoftDispatcher` (Soft MoE): each slot is a weighted average of an image's tokens.

Every index is computed with tensor ops (one-hot cumsum, top-k), never a Python loop, and
without host-device synchronisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from trainer.moe.router import RoutingDecision


def expert_capacity(tokens: int, experts: int, top_k: int, capacity_factor: float) -> int:
    """Slots per expert: ``ceil(capacity_factor · top_k · tokens / experts)``.

    Capped at ``tokens``: a token's k choices are distinct experts, so no expert can
    receive more, and a large factor ("never drop") then costs no extra memory.
    """
    if not experts >= top_k >= 1 or tokens < 1 or capacity_factor <= 0:
        raise ValueError(
            "experts >= top_k >= 1, tokens >= 1 and capacity_factor > 0, but got "
            f"experts={experts}, top_k={top_k}, tokens={tokens}, capacity_factor={capacity_factor}"
        )
    return min(math.ceil(capacity_factor * top_k * tokens / experts), tokens)


@dataclass(frozen=True)
class TokenDispatcher:
    """Moves the tokens of one routing decision to and from the experts' buffer.

    Assignments (token, choice) claim capacity choice-major in priority order: all tokens'
    1st choices, then all 2nd choices, each in ``order``. The plan is then kept in token
    order, so that dispatch and combine are one gather each.

    Attributes:
        slot: ``[k, T]`` long, row ``expert · capacity + position`` of each assignment in the
            flattened buffer, or ``experts · capacity`` when dropped.
        gate: ``[k, T]`` combine weight of each assignment, zero when dropped.
        source: ``[experts · capacity]`` long, the token each buffer row holds. Empty rows
            hold token 0: their outputs are never read, so they cost compute but change nothing.
        experts: number of experts E.
        capacity: slots per expert C.
        tokens_per_expert: ``[E]`` long, assignments each expert kept.
        dropped: scalar long, assignments over capacity.
    """

    slot: Tensor
    gate: Tensor
    source: Tensor
    experts: int
    capacity: int
    tokens_per_expert: Tensor
    dropped: Tensor

    @classmethod
    def plan(cls, decision: RoutingDecision, capacity: int, batch_prioritized: bool) -> TokenDispatcher:
        """Assign each (token, choice) a buffer slot, first come first served.

        Args:
            decision: the router's choices for T tokens.
            capacity: slots per expert.
            batch_prioritized: order tokens by top-1 probability, highest first (Batch
                Prioritized Routing, Riquelme et al. 2021); otherwise by position.
        """
        tokens, top_k = decision.expert_index.shape
        experts = decision.probs.shape[-1]
        device = decision.expert_index.device
        with torch.no_grad():
            if batch_prioritized:
                # Stable, so ties keep position order and the plan is reproducible.
                order = decision.priority.argsort(descending=True, stable=True)
                expert = decision.expert_index[order].t()
            else:
                order = None
                expert = decision.expert_index.t()
            claimed = F.one_hot(expert.reshape(-1), experts).cumsum(dim=0)
            position = claimed.gather(1, expert.reshape(-1, 1)).view(top_k, tokens) - 1
            kept = position < capacity
            slot = torch.where(kept, expert * capacity + position, experts * capacity)
            if order is not None:  # back to token order
                slot = torch.empty_like(slot).scatter_(1, order.expand(top_k, -1), slot)
                kept = slot < experts * capacity
            tokens_per_expert = claimed[-1].clamp(max=capacity)
            dropped = top_k * tokens - tokens_per_expert.sum()
            token = torch.arange(tokens, device=device).expand(top_k, -1)
            source = torch.zeros(experts * capacity + 1, dtype=torch.long, device=device)
            source = source.scatter_(0, slot.reshape(-1), token.reshape(-1))[:-1]
        gate = decision.gates.t() * kept
        return cls(slot, gate, source, experts, capacity, tokens_per_expert, dropped)

    @property
    def top_k(self) -> int:
        return self.slot.shape[0]

    @property
    def tokens(self) -> int:
        return self.slot.shape[1]

    def image_counts(self, images: int) -> Tensor:
        """``[images, E]`` long: assignments each image's tokens kept at each expert.

        Tokens are numbered image-major (``T = images × tokens per image``).
        """
        full = self.experts * self.capacity
        image = torch.arange(self.tokens, device=self.slot.device) // (self.tokens // images)
        expert = torch.div(self.slot, self.capacity, rounding_mode="floor").clamp(max=self.experts - 1)
        flat = (image * self.experts + expert).reshape(-1)
        counts = torch.zeros(images * self.experts, dtype=torch.long, device=self.slot.device)
        return counts.index_add_(0, flat, (self.slot < full).long().reshape(-1)).view(images, self.experts)

    def dispatch(self, x: Tensor) -> Tensor:
        """``[T, dim]`` tokens → ``[experts, capacity, dim]`` buffer."""
        if x.shape[0] != self.tokens:
            raise ValueError(f"planned for {self.tokens} tokens, but got x of shape {tuple(x.shape)}")
        return x.index_select(0, self.source).view(self.experts, self.capacity, x.shape[-1])

    def combine(self, y: Tensor) -> Tensor:
        """``[experts, capacity, dim]`` expert outputs → ``[T, dim]``, gate-weighted sum over choices.

        A dropped assignment has gate zero, so it contributes exactly zero.
        """
        if y.shape[:2] != (self.experts, self.capacity):
            raise ValueError(
                f"expected expert outputs of shape [{self.experts}, {self.capacity}, dim], "
                f"but got {tuple(y.shape)}"
            )
        dim = y.shape[-1]
        # Dropped assignments point one past the end; any row will do, their gate is zero.
        rows = y.reshape(-1, dim).index_select(
            0, self.slot.clamp(max=self.experts * self.capacity - 1).reshape(-1)
        )
        weighted = rows.view(self.top_k, self.tokens, dim) * self.gate.to(y.dtype).unsqueeze(-1)
        return weighted[0] if self.top_k == 1 else weighted.sum(dim=0)


@dataclass(frozen=True)
class ExpertChoiceDispatcher:
    """Expert choice (Zhou et al. 2022): each expert takes the C tokens that score it highest.

    Every expert is filled exactly to C; a token may be taken by several experts or by
    none (then its MoE output is zero and the residual carries it).

    Attributes:
        index: ``[E, C]`` long, the tokens each expert took, best first.
        gate: ``[E, C]`` float32 combine weights (the tokens' router probabilities).
        tokens: T.
    """

    index: Tensor
    gate: Tensor
    tokens: int

    @classmethod
    def plan(cls, probs: Tensor, capacity: int) -> ExpertChoiceDispatcher:
        """Args: ``probs [T, E]`` router probabilities; ``capacity`` C <= T tokens per expert."""
        gate, index = probs.t().topk(capacity, dim=1)
        return cls(index, gate, probs.shape[0])

    @property
    def experts(self) -> int:
        return self.index.shape[0]

    @property
    def capacity(self) -> int:
        return self.index.shape[1]

    @property
    def tokens_per_expert(self) -> Tensor:
        return torch.full((self.experts,), self.capacity, dtype=torch.long, device=self.index.device)

    @property
    def dropped(self) -> Tensor:
        """Tokens no expert took."""
        taken = torch.zeros(self.tokens, dtype=torch.bool, device=self.index.device)
        return self.tokens - taken.index_fill_(0, self.index.reshape(-1), True).sum()

    def image_counts(self, images: int) -> Tensor:
        image = self.index // (self.tokens // images)
        flat = image * self.experts + torch.arange(self.experts, device=image.device).unsqueeze(1)
        counts = torch.zeros(images * self.experts, dtype=torch.long, device=image.device)
        return counts.index_add_(0, flat.reshape(-1), torch.ones_like(flat).reshape(-1)).view(
            images, self.experts
        )

    def dispatch(self, x: Tensor) -> Tensor:
        """``[T, dim]`` → ``[E, C, dim]``."""
        return x[self.index]

    def combine(self, y: Tensor) -> Tensor:
        """``[E, C, dim]`` → ``[T, dim]``: each token gets the gate-weighted sum of the experts that took it."""
        dim = y.shape[-1]
        weighted = (y * self.gate.to(y.dtype).unsqueeze(-1)).reshape(-1, dim)
        return y.new_zeros(self.tokens, dim).index_add_(0, self.index.reshape(-1), weighted)


@dataclass(frozen=True)
class SoftDispatcher:
    """Soft MoE (Puigcerver et al. 2024): slots are convex combinations of an image's tokens.

    Attributes:
        dispatch_weights: ``[B, N, S]``, a softmax over the N tokens for each slot.
        combine_weights: ``[B, N, S]``, a softmax over the S slots for each token.
        experts: E; slot ``s`` belongs to expert ``s // slots_per_expert``.
    """

    dispatch_weights: Tensor
    combine_weights: Tensor
    experts: int

    @property
    def slots_per_expert(self) -> int:
        return self.dispatch_weights.shape[2] // self.experts

    @property
    def capacity(self) -> int:
        return self.dispatch_weights.shape[0] * self.slots_per_expert

    @property
    def tokens_per_expert(self) -> Tensor:
        return torch.full(
            (self.experts,), self.capacity, dtype=torch.long, device=self.dispatch_weights.device
        )

    @property
    def dropped(self) -> Tensor:
        return torch.zeros((), dtype=torch.long, device=self.dispatch_weights.device)

    def image_counts(self, images: int) -> Tensor:
        return torch.full(
            (images, self.experts),
            self.slots_per_expert,
            dtype=torch.long,
            device=self.dispatch_weights.device,
        )

    def dispatch(self, x: Tensor) -> Tensor:
        """``[B, N, dim]`` → ``[E, B · slots_per_expert, dim]`` slot inputs."""
        batch, _, dim = x.shape
        slots = torch.einsum("bns,bnd->bsd", self.dispatch_weights.to(x.dtype), x)
        return (
            slots.view(batch, self.experts, self.slots_per_expert, dim)
            .transpose(0, 1)
            .reshape(self.experts, self.capacity, dim)
        )

    def combine(self, y: Tensor) -> Tensor:
        """``[E, B · slots_per_expert, dim]`` slot outputs → ``[B, N, dim]``."""
        batch, dim = self.dispatch_weights.shape[0], y.shape[-1]
        slots = (
            y.view(self.experts, batch, self.slots_per_expert, dim).transpose(0, 1).reshape(batch, -1, dim)
        )
        return torch.einsum("bns,bsd->bnd", self.combine_weights.to(y.dtype), slots)
