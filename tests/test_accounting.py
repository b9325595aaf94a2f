"""FLOPs per image at the expected routing, and inference throughput."""

from __future__ import annotations

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from trainer.config import ModelConfig, MoEConfig
from trainer.models import InputSpec, build_model
from trainer.models.accounting import count_flops, measure_throughput

IMAGENET = InputSpec(img_size=224, in_chans=3, num_classes=1000)
MNIST = InputSpec(img_size=28, in_chans=1, num_classes=10)


def config(backbone: str, placement: str = "none", **moe: object) -> ModelConfig:
    return ModelConfig(backbone=backbone, placement=placement, moe=MoEConfig(**moe))


def timm_macs(name: str) -> int:
    """Multiply-adds of timm's own model, counted with explicit attention."""
    timm.layers.set_fused_attn(False)
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
            image = torch.empty(1, 3, 224, 224)
        with FlopCounterMode(display=False) as counter:
            model(image)
    finally:
        timm.layers.set_fused_attn(True)
    return counter.get_total_flops() // 2


@pytest.mark.parametrize(
    ("ours", "timm_name", "paper"),
    [("vit_s", "vit_small_patch16_224", 4.6), ("vit_b", "vit_base_patch16_224", 17.5),
     ("convnext_t", "convnext_tiny", 4.5), ("convnext_s", "convnext_small", 8.7), ("convnext_b", "convnext_base", 15.4)],
)  # fmt: skip
def test_dense_flops_match_timm_and_the_paper(ours: str, timm_name: str, paper: float) -> None:
    flops = count_flops(config(ours), IMAGENET)
    assert flops == pytest.approx(timm_macs(timm_name), rel=0.02)
    assert flops / 1e9 == pytest.approx(paper, rel=0.02)


@pytest.mark.parametrize(("backbone", "paper"), [("convnext_s_iso", 4.3), ("convnext_b_iso", 16.9)])
def test_isotropic_convnext_flops_match_the_paper(backbone: str, paper: float) -> None:
    assert count_flops(config(backbone), IMAGENET) / 1e9 == pytest.approx(paper, rel=0.02)


@pytest.mark.parametrize(
    ("backbone", "placement"), [("vit_s", "every2"), ("convnext_t", "last2"), ("vit_mini", "last2")]
)
def test_top1_moe_costs_the_dense_model_plus_the_router(backbone: str, placement: str) -> None:
    inputs = MNIST if backbone == "vit_mini" else IMAGENET
    moe = config(backbone, placement, experts=8, top_k=1, mlp_ratio=4.0)
    model = build_model(moe, inputs, device="meta")
    router_flops = []  # tokens × width × experts, read off each MoE layer's input
    for layer in model.moe_layers():
        layer.register_forward_pre_hook(
            lambda m, args: router_flops.append(args[0].shape[1] * args[0].shape[2] * m.cfg.experts)
        )
    model(torch.empty(1, inputs.in_chans, inputs.img_size, inputs.img_size, device="meta"))
    assert len(router_flops) == len(moe.moe_blocks)
    assert count_flops(moe, inputs) == count_flops(config(backbone), inputs) + sum(router_flops)


def test_top_k_adds_k_minus_one_mlps_per_token_and_ignores_capacity_slack() -> None:
    dense = count_flops(config("vit_s"), IMAGENET)
    top1 = count_flops(config("vit_s", "last2", experts=8, top_k=1), IMAGENET)
    top2 = count_flops(config("vit_s", "last2", experts=8, top_k=2, capacity_factor=2.0), IMAGENET)
    mlp = 197 * 2 * 384 * 1536  # one ViT-S MLP over 197 tokens
    assert top1 - dense == 2 * 197 * 384 * 8  # two routers
    assert top2 - top1 == 2 * mlp  # one more expert per token, in each of the two layers


def test_soft_moe_costs_its_slots() -> None:
    dense = count_flops(config("vit_s"), IMAGENET)
    soft = count_flops(config("vit_s", "last2", router="soft", experts=8, slots_per_expert=2), IMAGENET)
    slots, tokens, dim, hidden = 16, 197, 384, 1536
    per_layer = (
        slots * 2 * dim * hidden + 2 * tokens * slots * dim + tokens * dim * slots - tokens * 2 * dim * hidden
    )
    assert soft - dense == 2 * per_layer


def test_throughput_is_measured_on_a_real_model() -> None:
    images_per_s = measure_throughput(
        config("vit_mini", "last2", experts=4), MNIST, batch_size=16, steps=3, warmup=1
    )
    assert 10 < images_per_s < 1e6
