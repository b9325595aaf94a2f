"""The native MoE layer: capacity, priority, dropping, exactness, gradients, balance loss."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from trainer.config import MoEConfig
from trainer.moe.dispatch import expert_capacity
from trainer.moe.layer import MoE
from trainer.moe.losses import switch_balance_loss
from trainer.moe.router import LinearRouter

DIM = 8


def make_layer(seed: int = 0, **moe: object) -> MoE:
    torch.manual_seed(seed)
    return MoE(DIM, MoEConfig(**{"mlp_ratio": 2.0, **moe}))


def reference_moe(
    layer: MoE, x: torch.Tensor, skip: frozenset[tuple[int, int]] = frozenset()
) -> torch.Tensor:
    """Slow, obviously-correct MoE: one token at a time; ``skip`` lists dropped (token, expert) pairs."""
    cfg, ex = layer.cfg, layer.experts
    tokens = x.reshape(-1, x.shape[-1])
    rows = []
    for t, token in enumerate(tokens):
        probs = torch.softmax(layer.router.gate.weight @ token, dim=-1)
        top = probs.topk(cfg.top_k)
        gates = top.values / top.values.sum() if cfg.normalize_gates and cfg.top_k > 1 else top.values
        row = torch.zeros_like(token)
        for gate, e in zip(gates, top.indices.tolist(), strict=True):
            if (t, e) not in skip:
                row = row + gate * (F.gelu(token @ ex.fc1.weight[e] + ex.fc1.bias[e]) @ ex.fc2.weight[e] + ex.fc2.bias[e])
        rows.append(row)
    return torch.stack(rows).view_as(x)


def all_prefer_expert_zero(layer: MoE, tokens: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs whose feature 0 (positive, distinct, shuffled) is all the router looks at.

    Every token's first choice is expert 0, with a probability that grows with feature 0.
    Returns ``(x [1, tokens, DIM], feature 0 per token)``.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[0, 0] = 5.0
    x = torch.randn(1, tokens, DIM, generator=generator)
    score = torch.randperm(tokens, generator=generator).float() / tokens + 0.1
    x[0, :, 0] = score
    return x, score


def served(out: torch.Tensor) -> torch.Tensor:
    """Which tokens got any expert output (a dropped top-1 token's output is exactly zero)."""
    return out[0].abs().sum(dim=-1) > 0


def test_capacity_is_ceil_of_factor_times_k_times_tokens_over_experts() -> None:
    assert expert_capacity(tokens=100, experts=8, top_k=2, capacity_factor=1.25) == math.ceil(31.25)
    assert expert_capacity(tokens=10, experts=4, top_k=1, capacity_factor=1.0) == 3
    # An expert never receives more than every token once.
    assert expert_capacity(tokens=10, experts=2, top_k=2, capacity_factor=10.0) == 10


def test_capacity_counts_every_token_of_the_batch() -> None:
    layer = make_layer(experts=4, top_k=2, capacity_factor=1.0)
    layer(torch.randn(3, 10, DIM))
    assert layer.last_stats["capacity"] == math.ceil(1.0 * 2 * 30 / 4)


def test_tokens_over_capacity_are_dropped_and_counted() -> None:
    layer = make_layer(experts=4, top_k=1, capacity_factor=1.0)
    x, _ = all_prefer_expert_zero(layer, tokens=16)
    out = layer(x)
    capacity = layer.last_stats["capacity"]
    assert capacity == 4
    assert served(out).sum() == capacity
    assert layer.last_stats["tokens_per_expert"].tolist() == [4, 0, 0, 0]
    assert layer.last_stats["dropped_fraction"].item() == pytest.approx(12 / 16)


def test_capacity_drops_lowest_priority_tokens_under_bpr() -> None:
    layer = make_layer(experts=4, top_k=1, capacity_factor=1.0, batch_prioritized=True)
    x, score = all_prefer_expert_zero(layer, tokens=16)
    out = layer(x)
    highest = torch.zeros(16, dtype=torch.bool)
    highest[score.topk(4).indices] = True
    assert torch.equal(served(out), highest)


def test_capacity_keeps_first_positions_without_bpr() -> None:
    layer = make_layer(experts=4, top_k=1, capacity_factor=1.0, batch_prioritized=False)
    x, _ = all_prefer_expert_zero(layer, tokens=16)
    out = layer(x)
    assert served(out).tolist() == [True] * 4 + [False] * 12


@pytest.mark.parametrize("batch_prioritized", [True, False])
def test_first_choices_claim_capacity_before_second_choices(batch_prioritized: bool) -> None:
    # Tokens 0-3 rank experts (0, 1, 2), tokens 4-7 rank (1, 2, 0). Expert 1 has room
    # for 4: it must keep tokens 4-7 (1st choice), not tokens 0-3 (2nd choice, earlier).
    layer = make_layer(experts=3, top_k=2, capacity_factor=0.75, batch_prioritized=batch_prioritized)
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[:, :2] = torch.tensor([[3.0, 0.0], [1.5, 3.0], [0.0, 1.5]])
    x = torch.randn(1, 8, DIM)
    x[0, :4, :2] = torch.tensor([1.0, 0.0])
    x[0, 4:, :2] = torch.tensor([0.0, 1.0])
    out = layer(x)
    assert layer.last_stats["capacity"] == 4
    dropped = frozenset((t, 1) for t in range(4))
    torch.testing.assert_close(out, reference_moe(layer, x, skip=dropped))


@pytest.mark.parametrize(
    ("top_k", "normalize_gates", "batch_prioritized"),
    [(1, True, True), (2, True, True), (2, False, False), (3, True, False)],
)
def test_without_drops_output_and_gradients_equal_dense_reference(
    top_k: int, normalize_gates: bool, batch_prioritized: bool
) -> None:
    layer = make_layer(
        experts=4,
        top_k=top_k,
        capacity_factor=100.0,
        normalize_gates=normalize_gates,
        batch_prioritized=batch_prioritized,
    )
    x = torch.randn(2, 5, DIM, requires_grad=True)
    out = layer(x)
    assert layer.last_stats["dropped_fraction"].item() == 0.0

    expected = reference_moe(layer, x)
    torch.testing.assert_close(out, expected)
    params = [x, *layer.parameters()]
    grads = torch.autograd.grad(out.square().sum(), params)
    expected_grads = torch.autograd.grad(expected.square().sum(), params, allow_unused=True)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, torch.zeros_like(got) if want is None else want)


def test_gradients_reach_router_and_every_expert() -> None:
    layer = make_layer(experts=4, top_k=2, capacity_factor=2.0)
    out = layer(torch.randn(4, 16, DIM))
    assert (layer.last_stats["tokens_per_expert"] > 0).all()
    (out.square().mean() + layer.aux_loss).backward()
    assert layer.router.gate.weight.grad.abs().sum() > 0
    for name, param in layer.experts.named_parameters():
        per_expert = param.grad.flatten(1).abs().sum(dim=1)
        assert (per_expert > 0).all(), f"{name}: an expert got no gradient"


def test_each_token_is_served_by_top_k_experts_when_nothing_is_dropped() -> None:
    for top_k in (1, 2):
        layer = make_layer(experts=4, top_k=top_k, capacity_factor=100.0)
        layer(torch.randn(2, 7, DIM))
        assert layer.last_stats["tokens_per_expert"].sum().item() == top_k * 14


def test_normalized_gates_sum_to_one() -> None:
    torch.manual_seed(0)
    x = torch.randn(32, DIM)
    router = LinearRouter(DIM, experts=4, top_k=2, normalize_gates=True)
    torch.testing.assert_close(router(x).gates.sum(dim=-1), torch.ones(32))

    router.normalize_gates = False
    raw = router(x)
    torch.testing.assert_close(raw.gates, raw.probs.gather(1, raw.expert_index))
    assert (raw.gates.sum(dim=-1) < 1).all()


def test_top1_keeps_raw_probability_so_the_task_loss_trains_the_router() -> None:
    torch.manual_seed(0)
    router = LinearRouter(DIM, experts=4, top_k=1, normalize_gates=True)
    decision = router(torch.randn(16, DIM))
    torch.testing.assert_close(decision.gates[:, 0], decision.probs.max(dim=-1).values)
    decision.gates.sum().backward()
    assert router.gate.weight.grad is not None and router.gate.weight.grad.abs().sum() > 0


def test_router_computes_in_float32_under_autocast() -> None:
    router = LinearRouter(DIM, experts=4, top_k=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        decision = router(torch.randn(8, DIM))
    assert decision.probs.dtype == decision.gates.dtype == torch.float32


def test_balance_loss_is_one_for_uniform_routing_and_larger_when_imbalanced() -> None:
    experts = 4
    top1 = torch.arange(8) % experts
    uniform = F.one_hot(top1, experts).float()
    assert switch_balance_loss(uniform, top1[:, None]).item() == pytest.approx(1.0)

    collapsed = F.one_hot(torch.zeros(8, dtype=torch.long), experts).float()
    assert switch_balance_loss(collapsed, torch.zeros(8, 1, dtype=torch.long)).item() == pytest.approx(experts)


def test_layer_balance_loss_penalises_collapse_and_trains_the_router() -> None:
    layer = make_layer(experts=4, top_k=1)
    x, _ = all_prefer_expert_zero(layer, tokens=16)
    layer(x)
    assert layer.aux_loss.item() > 1.5
    layer.aux_loss.backward()
    assert layer.router.gate.weight.grad.abs().sum() > 0


def test_expert_weights_have_the_shape_of_the_mlp_they_replace() -> None:
    layer = MoE(DIM, MoEConfig(experts=4, mlp_ratio=4.0))
    shapes = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    assert shapes == {
        "router.gate.weight": (4, DIM),
        "experts.fc1.weight": (4, DIM, 4 * DIM),
        "experts.fc1.bias": (4, 4 * DIM),
        "experts.fc2.weight": (4, 4 * DIM, DIM),
        "experts.fc2.bias": (4, DIM),
    }


def test_rejects_input_of_the_wrong_width() -> None:
    layer = make_layer()
    with pytest.raises(ValueError, match=rf"\[batch, tokens, {DIM}\].*\(2, 3, 5\)"):
        layer(torch.randn(2, 3, 5))
