"""Native vs Tutel: the same weights and capacity give the same outputs, gradients and statistics.

Tutel is not on PyPI; these tests skip where it is not installed (build it from
github.com/microsoft/tutel with ``pip install --no-build-isolation <checkout>`` to run them).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from two_ranks import WORLD, run_on_two_ranks

from trainer.config import MoEConfig
from trainer.moe import tutel_backend
from trainer.moe.dispatch import expert_capacity
from trainer.moe.layer import MoE, build_moe, resolve_backend

pytestmark = pytest.mark.skipif(
    not tutel_backend.available(),
    reason="tutel is not installed (it is not on PyPI; build it from its source)",
)

DIM = 16
# 2 images × 20 tokens over 4 experts at capacity factor 1: both backends give k · 10 slots,
# and the routers below are made to overflow some experts, so tokens are dropped.
CASES: dict[str, dict[str, Any]] = {
    "linear top-1": {"top_k": 1},
    "linear top-2": {"top_k": 2},
    "linear top-2, BPR off": {"top_k": 2, "batch_prioritized": False},
    "linear top-2, raw gates": {"top_k": 2, "normalize_gates": False},
    "cosine top-2": {"router": "cosine", "top_k": 2, "router_dim": 8},
    "shared expert": {"top_k": 1, "shared_expert": True},
}


def pair(
    overrides: dict[str, Any], group: dist.ProcessGroup | None = None
) -> tuple[MoE, tutel_backend.TutelMoE]:
    cfg = MoEConfig(**{"experts": 4, "mlp_ratio": 2.0, "capacity_factor": 1.0, **overrides})
    torch.manual_seed(0)
    native = MoE(DIM, cfg, group=group)
    torch.manual_seed(0)
    tutel = tutel_backend.TutelMoE(DIM, cfg, group=group)
    return native, tutel


def skewed_tokens(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 20, DIM, generator=generator)
    x[..., 0] += 2.0  # a shared direction, so some experts are over-subscribed
    return x


def run_both(native: torch.nn.Module, tutel: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    outputs = []
    for layer in (native, tutel):
        xi = x.clone().requires_grad_()
        out = layer(xi)
        (out.square().sum() + layer.aux_loss).backward()
        outputs += [out, xi.grad]
    return outputs


@pytest.mark.parametrize("name", list(CASES))
def test_same_weights_and_capacity_give_the_same_layer(name: str) -> None:
    native, tutel = pair(CASES[name])
    x = skewed_tokens()
    out_n, grad_n, out_t, grad_t = run_both(native, tutel, x)
    assert native.last_stats["capacity"] == tutel.last_stats["capacity"]
    assert native.last_stats["dropped_fraction"].item() > 0 or name == "linear top-2, BPR off"
    torch.testing.assert_close(out_t, out_n, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad_t, grad_n, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(tutel.aux_loss, native.aux_loss)
    for key in ("tokens_per_expert", "dropped_fraction", "image_counts"):
        torch.testing.assert_close(tutel.last_stats[key], native.last_stats[key], msg=key)
    native_w1 = native.experts.fc1.weight.grad
    torch.testing.assert_close(
        tutel.layer.experts.batched_fc1_w.grad, native_w1.transpose(1, 2), atol=1e-5, rtol=1e-4
    )


def test_capacity_rounding_is_documented_where_the_backends_differ() -> None:
    # 40 tokens, 4 experts, top-2, factor 1.25: native ⌈1.25·2·40/4⌉ = 25, Tutel 2·⌊1.25·10⌋ = 24.
    assert expert_capacity(40, 4, 2, 1.25) == 25
    assert tutel_backend.tutel_capacity(40, 4, 2, 1.25) == 24


def test_auto_picks_tutel_for_what_it_supports_and_native_otherwise() -> None:
    assert resolve_backend(MoEConfig()) == "tutel"
    assert resolve_backend(MoEConfig(router="soft")) == "native"
    assert resolve_backend(MoEConfig(balance_loss="importance_load")) == "native"
    assert resolve_backend(MoEConfig(backend="native")) == "native"
    assert isinstance(build_moe(DIM, MoEConfig(experts=4)), tutel_backend.TutelMoE)


def _check_sharded(rank: int) -> None:
    group = dist.group.WORLD
    for name in ("linear top-2", "cosine top-2"):
        native, tutel = pair(CASES[name], group)
        out_n, grad_n, out_t, grad_t = run_both(native, tutel, skewed_tokens(seed=rank))
        torch.testing.assert_close(out_t, out_n, atol=1e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(grad_t, grad_n, atol=1e-5, rtol=1e-4, msg=name)
        assert tutel.layer.experts.batched_fc1_w.shape[0] == 4 // WORLD
        torch.testing.assert_close(
            tutel.layer.experts.batched_fc2_w.grad,
            native.experts.fc2.weight.grad,
            atol=1e-5,
            rtol=1e-4,
            msg=name,
        )


def test_sharded_tutel_layer_equals_sharded_native_layer() -> None:
    run_on_two_ranks(_check_sharded)
