"""How tokens move: a routing decision, under per-expert capacity, to and from the experts.

Tokens are copied into an ``[experts, capacity, dim]`` buffer so the experts run as
one batched matmul, then gathered back and weighted by their gates. Every index is
computed with tensor ops (one-hot cumsum), never a Python loop, and without
host-device synchronisation: over-capacity assignments are sent to a scratch row
that is thrown away, rather than filtered out with a boolean mask.
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

    Assignments (token, choice) are laid out choice-major in priority order: all
    tokens' 1st choices, then all 2nd choices, each in ``order``.

    Attributes:
        order: ``[T]`` token indices in the order they claim capacity.
        restore: ``[T]`` inverse permutation of ``order``.
        slot: ``[k·T]`` row ``expert · capacity + position`` of each assignment in the
            flattened buffer, or ``experts · capacity`` (the scratch row) when dropped.
        gate: ``[k·T]`` combine weight of each assignment.
        experts: number of experts E.
        capacity: slots per expert C.
        tokens_per_expert: ``[E]`` long, assignments each expert kept.
        dropped: scalar long, assignments over capacity.
    """

    order: Tensor
    restore: Tensor
    slot: Tensor
    gate: Tensor
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
        if batch_prioritized:
            # Stable, so ties keep position order and the plan is reproducible.
            order = decision.priority.argsort(descending=True, stable=True)
        else:
            order = torch.arange(tokens, device=decision.expert_index.device)
        restore = torch.empty_like(order)
        restore[order] = torch.arange(tokens, device=order.device)

        expert = decision.expert_index[order].t().reshape(-1)
        gate = decision.gates[order].t().reshape(-1)
        with torch.no_grad():
            claimed = F.one_hot(expert, experts).cumsum(dim=0)
            position = claimed.gather(1, expert.unsqueeze(1)).squeeze(1) - 1
            kept = position < capacity
            slot = torch.where(kept, expert * capacity + position, experts * capacity)
            tokens_per_expert = claimed[-1].clamp(max=capacity)
            dropped = top_k * tokens - tokens_per_expert.sum()
        return cls(order, restore, slot, gate, experts, capacity, tokens_per_expert, dropped)

    @property
    def top_k(self) -> int:
        return self.slot.shape[0] // self.order.shape[0]

    def dispatch(self, x: Tensor) -> Tensor:
        """``[T, dim]`` tokens → ``[experts, capacity, dim]`` buffer (empty slots are zero)."""
        tokens, dim = x.shape
        if tokens != self.order.shape[0]:
            raise ValueError(f"planned for {self.order.shape[0]} tokens, but got x of shape {tuple(x.shape)}")
        rows = x[self.order].repeat(self.top_k, 1)
        # One extra scratch row absorbs every dropped assignment, then is cut off.
        buffer = x.new_zeros(self.experts * self.capacity + 1, dim).index_copy(0, self.slot, rows)
        return buffer[:-1].view(self.experts, self.capacity, dim)

    def combine(self, y: Tensor) -> Tensor:
        """``[experts, capacity, dim]`` expert outputs → ``[T, dim]``, gate-weighted sum over choices.

        A dropped assignment reads the zero scratch row, so it contributes exactly zero.
        """
        if y.shape[:2] != (self.experts, self.capacity):
            raise ValueError(
                f"expected expert outputs of shape [{self.experts}, {self.capacity}, dim], "
                f"but got {tuple(y.shape)}"
            )
        dim = y.shape[-1]
        flat = torch.cat([y.reshape(-1, dim), y.new_zeros(1, dim)])
        weighted = flat[self.slot] * self.gate.to(y.dtype).unsqueeze(-1)
        return weighted.view(self.top_k, -1, dim).sum(dim=0)[self.restore]
