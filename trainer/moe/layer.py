"""The native MoE layer: a drop-in replacement for timm's ``Mlp``.

router (who goes where) → dispatcher (capacity, token movement) → experts (compute).
Pure PyTorch and vectorised: no loop over tokens or experts.
"""

from __future__ import annotations

from typing import TypedDict

from torch import Tensor, nn

from trainer.config import MoEConfig
from trainer.moe.dispatch import TokenDispatcher, expert_capacity
from trainer.moe.experts import Experts
from trainer.moe.losses import switch_balance_loss
from trainer.moe.router import build_router


class RoutingStats(TypedDict):
    """What the last forward did, detached.

    Attributes:
        tokens_per_expert: ``[E]`` long, (token, choice) assignments each expert kept.
        dropped_fraction: scalar float, assignments over capacity / all assignments.
        capacity: slots per expert.
    """

    tokens_per_expert: Tensor
    dropped_fraction: Tensor
    capacity: int


class MoE(nn.Module):
    """Token-choice Mixture of Experts over ``[batch, tokens, dim]`` inputs.

    Every token of the call (batch × tokens) competes for the same per-expert capacity.
    After each forward, ``aux_loss`` holds the unweighted load-balancing loss and
    ``last_stats`` the :class:`RoutingStats`.
    """

    def __init__(
        self,
        dim: int,
        cfg: MoEConfig,
        act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
    ) -> None:
        """
        Args:
            dim: token width, in and out.
            cfg: experts, top-k, expert mlp_ratio, router, capacity and priority settings.
            act_layer: expert activation (default ``nn.GELU``, as timm's ViT).
            drop: expert dropout after the activation and after the output (default 0.0).
        """
        super().__init__()
        # This class is the native backend; ``auto`` means native until tutel is wired in.
        if cfg.backend not in ("auto", "native"):
            raise ValueError(f"the native MoE layer serves backends 'auto' and 'native', not {cfg.backend!r}")
        self.dim = dim
        self.cfg = cfg
        self.router = build_router(dim, cfg)
        self.experts = Experts(cfg.experts, dim, int(round(cfg.mlp_ratio * dim)), act_layer, drop)
        self.aux_loss: Tensor | None = None
        self.last_stats: RoutingStats | None = None

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"expected x of shape [batch, tokens, {self.dim}], but got {tuple(x.shape)}")
        batch, tokens, dim = x.shape
        flat = x.reshape(batch * tokens, dim)

        decision = self.router(flat)
        capacity = expert_capacity(batch * tokens, self.cfg.experts, self.cfg.top_k, self.cfg.capacity_factor)
        dispatcher = TokenDispatcher.plan(decision, capacity, self.cfg.batch_prioritized)
        out = dispatcher.combine(self.experts(dispatcher.dispatch(flat)))

        self.aux_loss = switch_balance_loss(decision.probs, decision.expert_index[:, 0])
        self.last_stats = RoutingStats(
            tokens_per_expert=dispatcher.tokens_per_expert,
            dropped_fraction=dispatcher.dropped / (self.cfg.top_k * batch * tokens),
            capacity=capacity,
        )
        return out.view(batch, tokens, dim)

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"dim={self.dim}, experts={c.experts}, top_k={c.top_k}, capacity_factor={c.capacity_factor}, "
            f"batch_prioritized={c.batch_prioritized}"
        )
