"""ConvNeXt backbones (hierarchical and isotropic) with MoE pointwise MLPs: shapes, placement, counts."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models.convnext import ConvNeXtBlock

from trainer.config import DataConfig, ModelConfig, MoEConfig
from trainer.data import input_spec, load_datasets
from trainer.models import InputSpec, build_model
from trainer.models.accounting import count_params
from trainer.models.convnext import SpatialMoE

IMAGENET = InputSpec(img_size=224, in_chans=3, num_classes=1000)
MNIST = InputSpec(img_size=28, in_chans=1, num_classes=10)


def config(backbone: str, placement: str | list[int] = "none", **moe: object) -> ModelConfig:
    return ModelConfig(backbone=backbone, placement=placement, moe=MoEConfig(**moe))


def millions(count: int) -> float:
    return count / 1e6


@pytest.mark.parametrize(("ours", "timm_name"), [("convnext_t", "convnext_tiny"), ("convnext_s", "convnext_small"),
                                                 ("convnext_b", "convnext_base")])  # fmt: skip
def test_dense_hierarchical_convnext_has_the_params_of_timm(ours: str, timm_name: str) -> None:
    with torch.device("meta"):
        reference = timm.create_model(timm_name, pretrained=False)
    assert count_params(config(ours), IMAGENET).total == sum(p.numel() for p in reference.parameters())


@pytest.mark.parametrize(
    ("backbone", "paper"),
    [("convnext_t", 28.6), ("convnext_s", 50.2), ("convnext_b", 88.6), ("convnext_s_iso", 22.3),
     # The paper lists ConvNeXt-B (iso.) at 82.4M; the ConvNeXt paper's own model has 87M (see README).
     ("convnext_b_iso", 87.1)],
)  # fmt: skip
def test_dense_convnext_params_match_the_papers(backbone: str, paper: float) -> None:
    assert millions(count_params(config(backbone), IMAGENET).total) == pytest.approx(paper, rel=0.01)


@pytest.mark.parametrize(
    ("backbone", "placement", "blocks"),
    [
        ("convnext_t", "stage", [2, 5, 14, 17]),
        ("convnext_t", "last2", [14, 17]),
        ("convnext_t", "last3", [10, 14, 17]),
        ("convnext_t", "every2", list(range(1, 18, 2))),
        ("convnext_s_iso", "last2", [15, 17]),
        ("convnext_s_iso", "last:3", [15, 16, 17]),
        ("convnext_mini", "last2", [4, 5]),
    ],
)
def test_moe_replaces_the_pointwise_mlp_of_exactly_the_named_blocks(
    backbone: str, placement: str, blocks: list[int]
) -> None:
    model = build_model(config(backbone, placement, experts=4), IMAGENET, device="meta")
    all_blocks = [m for m in model.modules() if isinstance(m, ConvNeXtBlock)]
    assert [i for i, b in enumerate(all_blocks) if isinstance(b.mlp, SpatialMoE)] == blocks
    assert len(model.moe_layers()) == len(blocks)


def test_stage_placement_needs_a_hierarchical_convnext() -> None:
    with pytest.raises(ValueError, match="single stage.*allowed: none, every2, last2, last3, last:L"):
        config("convnext_s_iso", "stage")


@pytest.mark.parametrize(
    ("backbone", "placement", "experts", "top_k", "mlp_ratio"),
    [("convnext_t", "last2", 4, 1, 2.0), ("convnext_t", "stage", 8, 2, 4.0), ("convnext_s_iso", "every2", 8, 1, 4.0),
     ("convnext_b", "last3", 16, 2, 1.0)],
)  # fmt: skip
def test_moe_params_from_first_principles(
    backbone: str, placement: str, experts: int, top_k: int, mlp_ratio: float
) -> None:
    # Each placed block loses its MLP (fc1 + fc2 of hidden 4·dim) and gains E experts of
    # hidden mlp_ratio·dim plus a bias-free router.
    model = build_model(config(backbone), IMAGENET, device="meta")
    blocks = [m for m in model.modules() if isinstance(m, ConvNeXtBlock)]
    moe_cfg = config(backbone, placement, experts=experts, top_k=top_k, mlp_ratio=mlp_ratio)
    total = active = count_params(config(backbone), IMAGENET).total
    for index in moe_cfg.moe_blocks:
        dim = blocks[index].norm.normalized_shape[0]
        mlp = sum(p.numel() for p in blocks[index].mlp.parameters())
        hidden = int(mlp_ratio * dim)
        expert = 2 * dim * hidden + hidden + dim
        total += experts * expert + dim * experts - mlp
        active += top_k * expert + dim * experts - mlp
    count = count_params(moe_cfg, IMAGENET)
    assert (count.total, count.active) == (total, active)


@pytest.mark.parametrize(
    ("backbone", "experts", "mlp_ratio", "paper_total", "paper_active"),
    [
        ("convnext_t", 4, 2.0, 34.5, 25.6),  # Table 1, ImageNet-1k models use mlp_ratio 2
        ("convnext_s", 4, 2.0, 56.1, 47.3),
        ("convnext_b", 4, 2.0, 99.1, 83.4),
        ("convnext_s_iso", 8, 4.0, 38.9, 22.3),
        ("convnext_t", 8, 4.0, 70.0, 28.7),  # Table 2, ImageNet-21k models
    ],
)
def test_last2_top1_params_match_the_paper(
    backbone: str, experts: int, mlp_ratio: float, paper_total: float, paper_active: float
) -> None:
    count = count_params(config(backbone, "last2", experts=experts, top_k=1, mlp_ratio=mlp_ratio), IMAGENET)
    assert millions(count.total) == pytest.approx(paper_total, rel=0.005)
    assert millions(count.active) == pytest.approx(paper_active, rel=0.005)


@pytest.mark.parametrize("backbone", ["convnext_mini", "convnext_mini_iso"])
@pytest.mark.parametrize("routing", ["token", "image"])
def test_small_convnext_with_moe_trains_a_step_on_embedded_mnist(backbone: str, routing: str) -> None:
    torch.manual_seed(0)
    cfg = config(backbone, "last2", experts=4, top_k=1, routing=routing, capacity_factor=4.0)
    model = build_model(cfg, input_spec(DataConfig()))
    images, labels = load_datasets(DataConfig(train_samples=32))[0].tensors
    logits = model(images)
    torch.nn.functional.cross_entropy(logits, labels).add(model.aux_loss()).backward()
    assert logits.shape == (32, 10) and torch.isfinite(logits).all()
    for layer in model.moe_layers():
        for name, param in layer.named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    if routing == "image":  # every position of an image reaches one expert
        assert model.routing_stats()["experts_per_image"] == 1.0


def test_image_must_survive_the_downsampling() -> None:
    with pytest.raises(ValueError, match="downsamples by 32.*28px"):
        build_model(config("convnext_t"), MNIST, device="meta")
