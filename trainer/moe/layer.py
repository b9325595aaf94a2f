"""The MoE layer: a drop-in replacement for timm's ``Mlp`` over ``[batch, tokens, dim]``.

router (who goes where) → dispatcher (capacity, token movement) → experts (compute, possibly
sharded over ranks) → dispatcher (combine) [+ shared expert]. Pure PyTorch and vectorised: no
loop over tokens or experts. :func:`build_moe` picks the backend (this one, or Tutel's).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, TypedDict

import torch
import torch.distributed as dist
from timm.layers import Mlp
from torch import Tensor, nn

from trainer.config import MoEConfig
from trainer.moe.dispatch import ExpertChoiceDispatcher, SoftDispatcher, TokenDispatcher, expert_capacity
from trainer.moe.experts import Experts
from trainer.moe.losses import balance_loss
from trainer.moe.router import build_router

ImageToken = Literal["first", "mean"]


class RoutingStats(TypedDict):
    """What the last forward did, detached, on this rank.

    Attributes:
        tokens_per_expert: ``[E]`` long, tokens each expert processed (counting a token once
            per expert that took it; Soft MoE: slots).
        dropped_fraction: scalar float. Token choice: (token, choice) assignments over capacity
            / all assignments. Expert choice: tokens no expert took / tokens. Soft MoE: 0.
        experts_per_image: scalar float, mean number of distinct experts an image's tokens reached.
        image_counts: ``[B, E]`` long, how many of each image's tokens (or, under image routing,
            choices) each expert kept: the per-image routing the paper's section 5.6 analyses.
        capacity: slots per expert (images under image routing).
    """

    tokens_per_expert: Tensor
    dropped_fraction: Tensor
    experts_per_image: Tensor
    image_counts: Tensor
    capacity: int


@torch.no_grad()
def routing_stats(
    plan: TokenDispatcher | ExpertChoiceDispatcher | SoftDispatcher,
    images: int,
    assignments: int,
    tokens_per_item: int = 1,
    capacity: int | None = None,
) -> RoutingStats:
    """Statistics of one dispatch plan over ``images`` images and ``assignments`` routed items.

    ``tokens_per_item`` converts routed items to tokens (image routing); ``capacity`` reports a
    capacity other than the plan's (Tutel's, before it is capped at the number of tokens).
    """
    image_counts = plan.image_counts(images)
    return RoutingStats(
        tokens_per_expert=plan.tokens_per_expert * tokens_per_item,
        dropped_fraction=plan.dropped.float() / assignments,
        experts_per_image=(image_counts > 0).sum(dim=1).float().mean(),
        image_counts=image_counts,
        capacity=plan.capacity if capacity is None else capacity,
    )


def shared_expert(dim: int, hidden: int, act_layer: type[nn.Module], drop: float = 0.0) -> Mlp:
    """The always-on expert (ViMoE): timm's ``Mlp``, the shape of the routed experts, ViT init."""
    mlp = Mlp(dim, hidden, act_layer=act_layer, drop=drop)
    for linear in (mlp.fc1, mlp.fc2):
        nn.init.trunc_normal_(linear.weight, std=0.02)
        nn.init.zeros_(linear.bias)
    return mlp


class MoELayer(nn.Module):
    """What the model and the training loop need of an MoE layer, whatever its backend.

    After each forward, ``aux_loss`` holds the unweighted load-balancing loss (zero for
    routers that need none) and ``last_stats`` the :class:`RoutingStats`. With
    ``record_routing`` set, every forward also appends its ``image_counts`` to
    ``routing_record`` (an evaluation pass's routing, image by image) and its ``[B, T]`` long
    top expert of every token to ``top_expert_record`` (what :mod:`trainer.analysis` reads;
    see :meth:`_record` for what "top expert" means for each router). Without it nothing is
    kept, and the top experts are not even computed.

    Where the tokens sit in the image, for the analysis' spatial maps: the first
    ``prefix_tokens`` tokens are not image positions (ViT's [CLS]), and the others are the
    positions of a row-major ``grid`` of (height, width). The ViT builder sets both (and
    ``block_index``, the block the layer replaces the MLP of); a ConvNeXt ``SpatialMoE`` tells
    its layer the grid of every feature map it runs on, since stages differ in resolution.

    With ``expected_routing`` set (cost accounting only), a token-choice forward computes the
    router and exactly k expert evaluations per token: the FLOPs of the expected routing,
    without the capacity buffer's empty slots. Its output is not the layer's function.
    """

    expected_routing: bool = False
    block_index: int | None = None
    prefix_tokens: int = 0
    grid: tuple[int, int] | None = None

    cfg: MoEConfig
    aux_loss: Tensor | None
    last_stats: RoutingStats | None
    record_routing: bool
    routing_record: list[Tensor]
    top_expert_record: list[Tensor]

    def expert_parameters(self) -> list[nn.Parameter]:
        """Parameters of the routed experts (what top-k selects among)."""
        raise NotImplementedError

    def _record(self, stats: RoutingStats, aux_loss: Tensor, top_expert: Callable[[], Tensor]) -> None:
        """Keep the forward's loss and statistics; under ``record_routing`` also its routing.

        ``top_expert`` computes, only when recording, the ``[B, T]`` long expert each token's
        router prefers most (the paper's section 5.6 shows only it, the first of a top-2 choice):
        token choice, the first choice (the argmax of the router's probabilities, whether or
        not capacity then dropped it); image routing, the image's first choice for all its
        tokens; expert choice, the argmax of the token's probabilities over experts, whichever
        experts then took it; Soft MoE, the expert owning the slot that gives the token its
        largest dispatch weight (the expert whose input is most made of it).
        """
        self.aux_loss = aux_loss
        self.last_stats = stats
        if self.record_routing:
            self.routing_record.append(stats["image_counts"])
            self.top_expert_record.append(top_expert().detach())


class MoE(MoELayer):
    """The native backend: every router of :mod:`trainer.moe.router`, expert parallel over a group."""

    def __init__(
        self,
        dim: int,
        cfg: MoEConfig,
        act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
        image_token: ImageToken = "first",
        group: dist.ProcessGroup | None = None,
    ) -> None:
        """
        Args:
            dim: token width, in and out.
            cfg: the layer's settings.
            act_layer: expert activation (default ``nn.GELU``, as timm's ViT).
            drop: expert dropout after the activation and after the output (default 0.0).
            image_token: what represents an image under ``routing: image``: its ``first``
                token ([CLS]) or the ``mean`` of its tokens (a pooled feature map).
            group: shard the experts over this process group (expert parallelism).
        """
        super().__init__()
        self.dim = dim
        self.cfg = cfg
        self.image_token = image_token
        hidden = round(cfg.mlp_ratio * dim)
        self.router = build_router(dim, cfg)
        self.experts = Experts(cfg.experts, dim, hidden, act_layer, drop, group)
        self.shared_expert = shared_expert(dim, hidden, act_layer, drop) if cfg.shared_expert else None
        self.aux_loss = None
        self.last_stats = None
        self.record_routing = False
        self.routing_record = []
        self.top_expert_record = []

    def expert_parameters(self) -> list[nn.Parameter]:
        return list(self.experts.parameters())

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"expected x of shape [batch, tokens, {self.dim}], but got {tuple(x.shape)}")
        if self.expected_routing and self.cfg.is_token_choice:
            out = self._expected_cost(x)
        elif self.cfg.router == "soft":
            out = self._soft(x)
        elif self.cfg.router == "expert_choice":
            out = self._expert_choice(x)
        elif self.cfg.routing == "image":
            out = self._image_choice(x)
        else:
            out = self._token_choice(x)
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)
        return out

    def _expected_cost(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        summary = x.reshape(-1, dim) if self.cfg.routing == "token" else x[:, 0]
        self.router(summary)
        assignments = x.reshape(-1, dim).repeat(self.cfg.top_k, 1)
        out = self.experts.expected(assignments).view(self.cfg.top_k, batch, tokens, dim).sum(dim=0)
        self.aux_loss = None
        self.last_stats = None
        return out

    def _token_choice(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        flat = x.reshape(batch * tokens, dim)
        decision = self.router(flat)
        capacity = expert_capacity(batch * tokens, self.cfg.experts, self.cfg.top_k, self.cfg.capacity_factor)
        plan = TokenDispatcher.plan(decision, capacity, self.cfg.batch_prioritized)
        out = plan.combine(self.experts(plan.dispatch(flat)))
        self._record(
            routing_stats(plan, batch, self.cfg.top_k * batch * tokens, tokens_per_item=1),
            balance_loss(self.cfg.balance_loss, decision, self.router.noise_std),
            lambda: decision.expert_index[:, 0].view(batch, tokens),
        )
        return out.view(batch, tokens, dim)

    def _image_choice(self, x: Tensor) -> Tensor:
        # Whole images are the routed items: capacity counts images, and an image's tokens
        # travel together as one [tokens · dim] row of the dispatch buffer.
        batch, tokens, dim = x.shape
        summary = x[:, 0] if self.image_token == "first" else x.mean(dim=1)
        decision = self.router(summary)
        capacity = expert_capacity(batch, self.cfg.experts, self.cfg.top_k, self.cfg.capacity_factor)
        plan = TokenDispatcher.plan(decision, capacity, self.cfg.batch_prioritized)
        experts, rows = self.cfg.experts, plan.capacity
        buffer = plan.dispatch(x.reshape(batch, tokens * dim)).view(experts, rows * tokens, dim)
        out = plan.combine(self.experts(buffer).view(experts, rows, tokens * dim))
        self._record(
            routing_stats(plan, batch, self.cfg.top_k * batch, tokens_per_item=tokens),
            balance_loss(self.cfg.balance_loss, decision, self.router.noise_std),
            lambda: decision.expert_index[:, :1].expand(batch, tokens),
        )
        return out.view(batch, tokens, dim)

    def _expert_choice(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        flat = x.reshape(batch * tokens, dim)
        capacity = expert_capacity(batch * tokens, self.cfg.experts, self.cfg.top_k, self.cfg.capacity_factor)
        probs = self.router(flat)
        plan = ExpertChoiceDispatcher.plan(probs, capacity)
        out = plan.combine(self.experts(plan.dispatch(flat)))
        self._record(
            routing_stats(plan, batch, batch * tokens, tokens_per_item=1),
            x.new_zeros((), dtype=torch.float32),
            lambda: probs.argmax(dim=-1).view(batch, tokens),
        )
        return out.view(batch, tokens, dim)

    def _soft(self, x: Tensor) -> Tensor:
        dispatch_weights, combine_weights = self.router(x)
        plan = SoftDispatcher(dispatch_weights, combine_weights, self.cfg.experts)
        out = plan.combine(self.experts(plan.dispatch(x)))
        self._record(
            routing_stats(plan, x.shape[0], 1, tokens_per_item=1),
            x.new_zeros((), dtype=torch.float32),
            lambda: torch.div(dispatch_weights.argmax(dim=2), plan.slots_per_expert, rounding_mode="floor"),
        )
        return out

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"dim={self.dim}, router={c.router}, routing={c.routing}, top_k={c.top_k}, "
            f"capacity_factor={c.capacity_factor}, batch_prioritized={c.batch_prioritized}, "
            f"shared_expert={c.shared_expert}"
        )


def resolve_backend(cfg: MoEConfig) -> Literal["native", "tutel"]:
    """The backend ``cfg.backend`` means here: ``auto`` is tutel when importable and able."""
    from trainer.moe import tutel_backend

    if cfg.backend == "native":
        return "native"
    if cfg.backend == "tutel":
        if not tutel_backend.available():
            raise RuntimeError(
                "backend 'tutel' was requested but tutel is not installed on this worker "
                "(build it from github.com/microsoft/tutel, or use backend 'auto' or 'native')"
            )
        return "tutel"
    return "tutel" if tutel_backend.available() and tutel_backend.supports(cfg) else "native"


def build_moe(
    dim: int,
    cfg: MoEConfig,
    act_layer: type[nn.Module] = nn.GELU,
    drop: float = 0.0,
    image_token: ImageToken = "first",
    group: dist.ProcessGroup | None = None,
) -> MoELayer:
    """The MoE layer ``cfg`` asks for, on the backend :func:`resolve_backend` picks."""
    if resolve_backend(cfg) == "tutel":
        from trainer.moe.tutel_backend import TutelMoE

        return TutelMoE(dim, cfg, act_layer, drop, group)
    return MoE(dim, cfg, act_layer, drop, image_token, group)
