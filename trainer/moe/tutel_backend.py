"""The Tutel backend: our config and initialisation, Tutel's fused dispatch kernels.

Tutel (github.com/microsoft/tutel) is not on PyPI; where a user has built it, ``backend: auto``
picks it for the configurations it can compute exactly as the native layer defines them:
linear or cosine token-choice routing with the Switch/GShard balance loss. The adapter

- maps :class:`~trainer.config.MoEConfig` onto Tutel's gate and expert dicts (a fresh dict per
  layer: Tutel pops keys from them; ``activation_fn`` always given: its ffn module needs it);
- initialises the router and experts exactly as the native layer does from the same seed, so
  which backend ran changes the kernels, not the starting point;
- shards experts like the native layer (rank r holds experts ``[r·E/W, (r+1)·E/W)``), marks
  them for DDP to ignore and scales their gradients to the mean over ranks.

One difference remains: Tutel rounds capacity as ``k · ⌊capacity_factor · ⌈T/E⌉⌋`` where the
native layer uses ``⌈capacity_factor · k · T / E⌉``; the two agree whenever ``capacity_factor ·
⌈T/E⌉`` is a whole number and otherwise differ by fewer than k slots per expert. Runs record
the backend that computed them (MLflow tag ``sweetspot.moe_backend``).
"""

from __future__ import annotations

import importlib.util
import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from trainer.config import TUTEL_ROUTERS, MoEConfig
from trainer.moe.dispatch import TokenDispatcher
from trainer.moe.experts import EXPERT_PARALLEL_ATTR, Experts
from trainer.moe.layer import MoELayer, RoutingStats, routing_stats, shared_expert
from trainer.moe.router import CosineRouter, LinearRouter, RoutingDecision, build_router


def available() -> bool:
    """Whether tutel can be imported here (it is not on PyPI; users build it themselves)."""
    return importlib.util.find_spec("tutel") is not None


def supports(cfg: MoEConfig) -> bool:
    """Whether Tutel's layer computes what ``cfg`` asks for."""
    return cfg.router in TUTEL_ROUTERS and cfg.routing == "token" and cfg.balance_loss == "switch"


def tutel_capacity(tokens: int, experts: int, top_k: int, capacity_factor: float) -> int:
    """Slots per expert as Tutel computes them for a positive capacity factor."""
    return top_k * int(capacity_factor * math.ceil(tokens / experts))


class TutelMoE(MoELayer):
    """An MoE layer computed by ``tutel.moe.moe_layer``, with the native layer's interface."""

    def __init__(
        self,
        dim: int,
        cfg: MoEConfig,
        act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        """
        Args:
            dim: token width, in and out (even: Tutel requires it).
            cfg: the layer's settings; :func:`supports` must accept them.
            act_layer: expert activation.
            drop: expert dropout; Tutel's experts have none, so it must be 0.
            group: shard experts over this process group; None keeps all of them on this rank.
        """
        super().__init__()
        from tutel import moe as tutel_moe

        if not supports(cfg):
            raise ValueError(
                "the tutel backend computes linear or cosine token-choice routing with the 'switch' "
                f"balance loss, not router={cfg.router!r}, routing={cfg.routing!r}, "
                f"balance_loss={cfg.balance_loss!r}"
            )
        if drop:
            raise ValueError(f"tutel's experts have no dropout, but drop={drop}")
        self.dim = dim
        self.cfg = cfg
        hidden = round(cfg.mlp_ratio * dim)
        # Draw the weights exactly as the native layer would, then hand them to Tutel.
        router = build_router(dim, cfg)
        experts = Experts(cfg.experts, dim, hidden, act_layer, group=group)
        self.shared_expert = shared_expert(dim, hidden, act_layer) if cfg.shared_expert else None

        self.world = experts.world
        self.activation = act_layer()
        gate: dict[str, object] = {
            "type": "top" if cfg.router == "linear" else "cosine_top",
            "k": cfg.top_k,
            "capacity_factor": cfg.capacity_factor,
            "gate_noise": cfg.gate_noise,
            "fp32_gate": True,
        }
        if isinstance(router, CosineRouter):
            gate["proj_dim"] = router.proj.out_features
        with torch.random.fork_rng(devices=[]):  # Tutel's own init must not shift our RNG stream
            self.layer = tutel_moe.moe_layer(
                gate_type=gate,
                model_dim=dim,
                experts={
                    "type": "ffn",
                    "count_per_node": experts.local_experts,
                    "hidden_size_per_expert": hidden,
                    "activation_fn": self.activation,
                },
                scan_expert_func=lambda name, param: setattr(param, "skip_allreduce", True),
                group=self._group(group),
                batch_prioritized_routing=cfg.batch_prioritized,
                normalize_gate=cfg.normalize_gates,
                is_gshard_loss=True,
            )
        self._copy_weights(router, experts)
        if experts.group is not None:
            for param in self.expert_parameters():
                setattr(param, EXPERT_PARALLEL_ATTR, True)
                param.register_hook(lambda grad: grad / self.world)  # as the native layer, see Experts
        self.aux_loss = None
        self.last_stats = None
        self.record_routing = False
        self.routing_record = []
        self.top_expert_record = []

    @staticmethod
    def _group(group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
        """Tutel shards over WORLD when given no group; replicated experts need a group of one."""
        if group is not None or not dist.is_initialized() or dist.get_world_size() == 1:
            return group
        own, _ = dist.new_subgroups(group_size=1)  # a collective: every rank builds its layers
        return own

    @property
    def gate(self) -> nn.Module:
        return self.layer.gates[0]

    def expert_parameters(self) -> list[nn.Parameter]:
        return list(self.layer.experts.parameters())

    @torch.no_grad()
    def _copy_weights(self, router: nn.Module, experts: Experts) -> None:
        ffn = self.layer.experts
        ffn.batched_fc1_w.copy_(experts.fc1.weight.transpose(1, 2))
        ffn.batched_fc1_bias.copy_(experts.fc1.bias)
        ffn.batched_fc2_w.copy_(experts.fc2.weight)
        ffn.batched_fc2_bias.copy_(experts.fc2.bias)
        if isinstance(router, LinearRouter):
            self.gate.wg.weight.copy_(router.gate.weight)
        elif isinstance(router, CosineRouter):
            self.gate.cosine_projector.weight.copy_(router.proj.weight)
            self.gate.cosine_projector.bias.copy_(router.proj.bias)
            self.gate.sim_matrix.copy_(router.expert_embeddings.t())
            self.gate.temperature.copy_(router.log_inv_temperature.reshape(self.gate.temperature.shape))

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"expected x of shape [batch, tokens, {self.dim}], but got {tuple(x.shape)}")
        out = self.layer(x)
        stats, first_choice = self._stats(x)
        self._record(stats, out.l_aux, lambda: first_choice)
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)
        return out

    @torch.no_grad()
    def _stats(self, x: Tensor) -> tuple[RoutingStats, Tensor]:
        """The forward's statistics, and each token's first choice ``[B, T]`` (its top expert).

        Tutel keeps no per-token routing, so it is replayed from the gate: exact in eval and
        without gate noise; with training noise, the noise-free routing of the same tokens.
        """
        batch, tokens, dim = x.shape
        flat = x.reshape(-1, dim).float()
        probs = self.gate(flat).float().softmax(dim=-1)
        top_probs, expert_index = probs.topk(self.cfg.top_k, dim=-1)
        decision = RoutingDecision(expert_index, top_probs, probs, probs, probs, top_probs[:, 0])
        capacity = tutel_capacity(batch * tokens, self.cfg.experts, self.cfg.top_k, self.cfg.capacity_factor)
        plan = TokenDispatcher.plan(decision, min(capacity, batch * tokens), self.cfg.batch_prioritized)
        stats = routing_stats(plan, batch, self.cfg.top_k * batch * tokens, capacity=capacity)
        return stats, expert_index[:, 0].view(batch, tokens)
