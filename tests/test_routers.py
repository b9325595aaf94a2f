"""Each router's defining property, the balance losses, the shared expert and routing statistics."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from trainer.config import MoEConfig, TrialConfig
from trainer.moe.layer import MoE
from trainer.moe.losses import importance_load_loss, switch_balance_loss
from trainer.moe.router import CosineRouter, L2Router

DIM = 8


def make_layer(seed: int = 0, image_token: str = "first", **moe: object) -> MoE:
    torch.manual_seed(seed)
    return MoE(DIM, MoEConfig(**{"mlp_ratio": 2.0, **moe}), image_token=image_token)


def expert(layer: MoE, e: int, x: torch.Tensor) -> torch.Tensor:
    ex = layer.experts
    return F.gelu(x @ ex.fc1.weight[e] + ex.fc1.bias[e]) @ ex.fc2.weight[e] + ex.fc2.bias[e]


# ---- Soft MoE ------------------------------------------------------------------------------


def test_soft_moe_dispatch_columns_and_combine_rows_sum_to_one() -> None:
    layer = make_layer(router="soft", experts=4, slots_per_expert=2)
    dispatch, combine = layer.router(torch.randn(3, 10, DIM))
    assert dispatch.shape == combine.shape == (3, 10, 8)
    torch.testing.assert_close(dispatch.sum(dim=1), torch.ones(3, 8))  # each slot: a mix of tokens
    torch.testing.assert_close(combine.sum(dim=2), torch.ones(3, 10))  # each token: a mix of slots


def test_soft_moe_equals_its_definition_image_by_image() -> None:
    layer = make_layer(router="soft", experts=4, slots_per_expert=2)
    x = torch.randn(3, 10, DIM)
    out = layer(x)
    phi = layer.router.scale * F.normalize(layer.router.phi, dim=0)
    for b in range(3):
        logits = F.normalize(x[b], dim=-1) @ phi  # [tokens, slots]
        slots_in = logits.softmax(dim=0).t() @ x[b]  # [slots, dim]
        slots_out = torch.stack([expert(layer, s // 2, slots_in[s]) for s in range(8)])
        torch.testing.assert_close(out[b], logits.softmax(dim=1) @ slots_out, atol=1e-5, rtol=1e-4)
    stats = layer.last_stats
    assert stats["dropped_fraction"].item() == 0.0
    assert stats["tokens_per_expert"].tolist() == [6, 6, 6, 6]  # 3 images × 2 slots
    assert layer.aux_loss.item() == 0.0


def test_soft_moe_trains_its_slot_parameters_and_scale() -> None:
    layer = make_layer(router="soft", experts=4)
    layer(torch.randn(2, 6, DIM)).square().sum().backward()
    assert layer.router.phi.grad.abs().sum() > 0 and layer.router.scale.grad.abs() > 0


# ---- Expert choice ---------------------------------------------------------------------------


def test_expert_choice_fills_every_expert_exactly_to_capacity_with_its_top_tokens() -> None:
    layer = make_layer(router="expert_choice", experts=4, top_k=1, capacity_factor=1.0)
    x = torch.randn(2, 10, DIM)
    out = layer(x)
    capacity = math.ceil(1.0 * 1 * 20 / 4)
    assert layer.last_stats["capacity"] == capacity
    assert layer.last_stats["tokens_per_expert"].tolist() == [capacity] * 4

    tokens = x.reshape(20, DIM)
    probs = (tokens @ layer.router.gate.weight.t()).softmax(dim=-1)
    expected = torch.zeros_like(tokens)
    taken = set()
    for e in range(4):
        top = probs[:, e].topk(capacity).indices.tolist()
        taken.update(top)
        for t in top:
            expected[t] += probs[t, e] * expert(layer, e, tokens[t])
    torch.testing.assert_close(out.reshape(20, DIM), expected, atol=1e-5, rtol=1e-4)
    assert layer.last_stats["dropped_fraction"].item() == pytest.approx((20 - len(taken)) / 20)


def test_expert_choice_capacity_scales_with_factor_and_top_k() -> None:
    layer = make_layer(router="expert_choice", experts=4, top_k=2, capacity_factor=0.5)
    layer(torch.randn(2, 10, DIM))
    assert layer.last_stats["capacity"] == math.ceil(0.5 * 2 * 20 / 4)


# ---- Image routing ------------------------------------------------------------------------------


@pytest.mark.parametrize("router", ["linear", "cosine", "l2"])
def test_image_routing_sends_every_token_of_an_image_to_the_same_experts(router: str) -> None:
    layer = make_layer(router=router, routing="image", experts=4, top_k=1, capacity_factor=4.0)
    x = torch.randn(6, 5, DIM)
    out = layer(x)
    counts = layer.last_stats["image_counts"]
    assert counts.shape == (6, 4)
    assert ((counts > 0).sum(dim=1) == 1).all()  # one expert per image
    assert layer.last_stats["experts_per_image"].item() == 1.0
    decision = layer.router(x[:, 0])
    for b in range(6):
        e, gate = decision.expert_index[b, 0].item(), decision.gates[b, 0]
        torch.testing.assert_close(out[b], gate * expert(layer, e, x[b]), atol=1e-5, rtol=1e-4)


def test_image_routing_decides_on_the_cls_token_alone() -> None:
    layer = make_layer(routing="image", experts=4, top_k=2, capacity_factor=4.0)
    x = torch.randn(4, 5, DIM)
    layer(x)
    before = layer.last_stats["image_counts"] > 0
    x[:, 1:] = torch.randn(4, 4, DIM)
    layer(x)
    assert torch.equal(layer.last_stats["image_counts"] > 0, before)


def test_image_routing_without_cls_token_uses_the_mean_token() -> None:
    layer = make_layer(image_token="mean", routing="image", experts=4, top_k=1, capacity_factor=4.0)
    x = torch.randn(4, 5, DIM)
    layer(x)
    chosen = layer.router(x.mean(dim=1)).expert_index[:, 0]
    assert torch.equal(layer.last_stats["image_counts"].argmax(dim=1), chosen)


def test_image_routing_capacity_counts_images() -> None:
    layer = make_layer(routing="image", experts=4, top_k=1, capacity_factor=1.0)
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[0, 0] = 5.0
    x = torch.randn(8, 3, DIM)
    x[:, 0, 0] = torch.linspace(0.1, 1.0, 8)  # every image prefers expert 0
    out = layer(x)
    assert layer.last_stats["capacity"] == 2  # ceil(1.0 · 1 · 8 images / 4)
    served = out.abs().sum(dim=(1, 2)) > 0
    # Batch Prioritized Routing keeps the two most confident images, whole.
    assert served.tolist() == [False] * 6 + [True] * 2
    assert layer.last_stats["dropped_fraction"].item() == pytest.approx(6 / 8)


# ---- Cosine and L2 routers -------------------------------------------------------------------


def test_cosine_router_scores_are_cosines_over_the_temperature() -> None:
    torch.manual_seed(0)
    router = CosineRouter(DIM, experts=4, top_k=1, router_dim=4)
    with torch.no_grad():
        router.proj.bias.zero_()
    x = torch.randn(16, DIM)
    logits = router.logits(x)
    assert logits.abs().max() <= router.inverse_temperature() + 1e-5
    # Cosine similarity ignores the token's scale.
    torch.testing.assert_close(router.logits(3 * x), logits)
    assert router.inverse_temperature().item() == pytest.approx(2.0)  # temperature starts at 0.5


def test_temperature_is_learned_and_bounded() -> None:
    torch.manual_seed(0)
    router = CosineRouter(DIM, experts=4, top_k=2)
    router(torch.randn(16, DIM)).gates.sum().backward()
    assert router.log_inv_temperature.grad is not None
    with torch.no_grad():
        router.log_inv_temperature.fill_(50.0)
    assert router.inverse_temperature().item() == pytest.approx(100.0)  # temperature >= 0.01


def test_l2_router_sends_a_token_to_the_nearest_expert_embedding() -> None:
    torch.manual_seed(0)
    router = L2Router(DIM, experts=4, top_k=1, router_dim=DIM)
    with torch.no_grad():
        router.proj.weight.copy_(torch.eye(DIM))
        router.proj.bias.zero_()
    tokens = router.expert_embeddings.detach()[[2, 0, 3, 1]] + 0.01
    decision = router(tokens)
    assert decision.expert_index[:, 0].tolist() == [2, 0, 3, 1]
    assert (decision.logits <= 0).all()


def test_router_dim_defaults_to_min_of_256_and_width() -> None:
    assert CosineRouter(DIM, experts=4, top_k=1).proj.out_features == DIM
    assert CosineRouter(384, experts=4, top_k=1).proj.out_features == 256


# ---- Gate noise -----------------------------------------------------------------------------------


def test_gate_noise_has_std_noise_over_experts_in_training_only() -> None:
    layer = make_layer(experts=4, gate_noise=1.0)
    x = torch.randn(4000, DIM)
    decision = layer.router(x)
    noise = decision.noisy_logits - decision.logits
    assert noise.std().item() == pytest.approx(1.0 / 4, rel=0.05)
    layer.eval()
    decision = layer.router(x)
    assert torch.equal(decision.noisy_logits, decision.logits)


# ---- Balance losses ------------------------------------------------------------------------------


def uniform_and_collapsed(experts: int = 4, tokens: int = 8) -> tuple[tuple[torch.Tensor, ...], ...]:
    index = (torch.arange(tokens) % experts)[:, None]
    uniform = torch.full((tokens, experts), 1.0 / experts)
    collapsed_index = torch.zeros(tokens, 1, dtype=torch.long)
    collapsed = F.one_hot(collapsed_index[:, 0], experts).float() * 0.9 + 0.1 / experts
    return (uniform, index), (collapsed, collapsed_index)


def test_switch_loss_is_one_at_uniform_routing_and_grows_under_collapse() -> None:
    (uniform, index), (collapsed, collapsed_index) = uniform_and_collapsed()
    assert switch_balance_loss(uniform, index).item() == pytest.approx(1.0)
    assert switch_balance_loss(collapsed, collapsed_index).item() > 3.0


def test_importance_load_loss_is_zero_at_uniform_routing_and_grows_under_collapse() -> None:
    (uniform, index), (collapsed, collapsed_index) = uniform_and_collapsed()
    logits = uniform.log()
    assert importance_load_loss(uniform, logits, logits, index, noise_std=0.0).item() == pytest.approx(0.0)
    collapsed_loss = importance_load_loss(collapsed, collapsed.log(), collapsed.log(), collapsed_index, 0.0)
    assert collapsed_loss.item() > 1.0


@pytest.mark.parametrize("kind", ["switch", "importance_load"])
def test_layer_balance_loss_weight_scales_the_model_loss(kind: str) -> None:
    from trainer.data import input_spec
    from trainer.models import build_model

    trial = TrialConfig.model_validate(
        {
            "model": {
                "placement": "last2",
                "moe": {"experts": 4, "balance_loss": kind, "balance_loss_weight": 0.5},
            }
        }
    )
    torch.manual_seed(0)
    model = build_model(trial.model, input_spec(trial.data))
    model(torch.randn(4, 1, 28, 28))
    per_layer = torch.stack([layer.aux_loss for layer in model.moe_layers()])
    torch.testing.assert_close(model.aux_loss(), 0.5 * per_layer.mean())


def test_importance_load_with_gate_noise_gives_the_load_a_gradient() -> None:
    layer = make_layer(experts=4, top_k=1, gate_noise=1.0, balance_loss="importance_load")
    x = torch.randn(64, DIM)
    decision = layer.router(x)
    importance_only = importance_load_loss(
        decision.probs.detach(),
        decision.logits,
        decision.noisy_logits,
        decision.expert_index,
        layer.router.noise_std,
    )
    importance_only.backward()
    assert layer.router.gate.weight.grad.abs().sum() > 0  # only the smooth load estimate can give it


def test_collapsed_routing_raises_both_layer_losses() -> None:
    for kind in ("switch", "importance_load"):
        layer = make_layer(experts=4, top_k=1, balance_loss=kind)
        x = torch.randn(1, 32, DIM)
        layer(x)
        balanced = layer.aux_loss.item()
        with torch.no_grad():
            layer.router.gate.weight.zero_()
            layer.router.gate.weight[0, 0] = 50.0
        x[..., 0] = x[..., 0].abs() + 0.5
        layer(x)
        assert layer.aux_loss.item() > balanced + 0.5, kind


def test_expert_choice_and_soft_have_no_balance_loss() -> None:
    for router in ("expert_choice", "soft"):
        layer = make_layer(router=router, experts=4)
        layer(torch.randn(2, 6, DIM))
        assert layer.aux_loss.item() == 0.0


# ---- Shared expert ----------------------------------------------------------------------------------


def test_shared_expert_is_added_to_the_routed_output() -> None:
    routed_only = make_layer(seed=3, experts=4, top_k=1, capacity_factor=4.0)
    with_shared = make_layer(seed=3, experts=4, top_k=1, capacity_factor=4.0, shared_expert=True)
    x = torch.randn(2, 5, DIM)
    shared = with_shared.shared_expert
    assert shared.fc1.out_features == 2 * DIM  # the shape of the experts
    torch.testing.assert_close(with_shared(x), routed_only(x) + shared(x))


def test_shared_expert_serves_tokens_that_were_dropped() -> None:
    layer = make_layer(experts=4, top_k=1, capacity_factor=0.01, shared_expert=True)
    x = torch.randn(1, 40, DIM)
    out = layer(x)
    assert layer.last_stats["dropped_fraction"].item() == pytest.approx(36 / 40)  # 1 slot per expert
    assert (out.abs().sum(dim=-1) > 0).all()


# ---- Routing statistics ---------------------------------------------------------------------------------


def test_image_counts_account_for_every_kept_assignment() -> None:
    layer = make_layer(experts=4, top_k=2, capacity_factor=0.5)
    layer(torch.randn(3, 10, DIM))
    stats = layer.last_stats
    kept = stats["image_counts"].sum().item()
    assert kept == stats["tokens_per_expert"].sum().item()
    assert kept == pytest.approx(2 * 30 * (1 - stats["dropped_fraction"].item()))
    assert 1.0 <= stats["experts_per_image"].item() <= 4.0


def test_routing_record_is_opt_in() -> None:
    layer = make_layer(experts=4)
    layer(torch.randn(2, 5, DIM))
    assert layer.routing_record == []
    layer.record_routing = True
    layer(torch.randn(2, 5, DIM))
    layer(torch.randn(3, 5, DIM))
    assert [tuple(c.shape) for c in layer.routing_record] == [(2, 4), (3, 4)]


# ---- Config rules ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("moe", "message"),
    [
        ({"router": "soft", "routing": "image"}, "routing 'image' needs a token-choice router"),
        ({"router": "expert_choice", "routing": "image"}, "routing 'image' needs a token-choice router"),
        ({"router": "l2", "backend": "tutel"}, "backend 'tutel' cannot build router 'l2'"),
        ({"routing": "image", "backend": "tutel"}, "backend 'tutel' cannot build routing 'image'"),
    ],
)
def test_impossible_combinations_are_config_errors(moe: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MoEConfig(**moe)


def test_settings_a_router_ignores_do_not_change_the_trial_identity() -> None:
    def trial_hash(**moe: object) -> str:
        return TrialConfig.model_validate({"model": {"moe": moe}}).trial_hash

    assert trial_hash(router="soft", top_k=1) == trial_hash(router="soft", top_k=2)
    assert trial_hash(router="linear", slots_per_expert=4) == trial_hash(router="linear")
    assert trial_hash(router="linear", expert_parallel=False, backend="native") == trial_hash()
    assert trial_hash(router="cosine", router_dim=16) != trial_hash(router="cosine")
    assert trial_hash(router="soft", slots_per_expert=2) != trial_hash(router="soft")
