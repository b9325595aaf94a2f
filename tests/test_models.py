"""Models: MoE placement in timm ViTs, parameter accounting against the paper, a training step."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import Mlp
from torch.nn import functional as F

from trainer.config import DataConfig, ModelConfig, MoEConfig
from trainer.data import input_spec, load_datasets
from trainer.models import InputSpec, MoEModel, build_model
from trainer.models.accounting import ParamCount, count_params
from trainer.moe.layer import MoE

IMAGENET = InputSpec(img_size=224, in_chans=3, num_classes=1000)
MNIST = InputSpec(img_size=28, in_chans=1, num_classes=10)


def moe_config(backbone: str, placement: str | list[int], **moe: object) -> ModelConfig:
    return ModelConfig(backbone=backbone, placement=placement, moe=MoEConfig(**moe))


def millions(count: int) -> float:
    return count / 1e6


@pytest.mark.parametrize(
    ("backbone", "placement", "moe_blocks"),
    [
        ("vit_s", "every2", [1, 3, 5, 7, 9, 11]),
        ("vit_s", "last2", [9, 11]),
        ("vit_s", "last3", [7, 9, 11]),
        ("vit_s", "last:3", [9, 10, 11]),
        ("vit_s", [0, 4], [0, 4]),
        ("vit_mini", "every2", [1, 3, 5]),
        ("vit_mini", "last2", [3, 5]),
        ("vit_mini", "none", []),
    ],
)
def test_placement_puts_moe_in_exactly_the_named_blocks(
    backbone: str, placement: str | list[int], moe_blocks: list[int]
) -> None:
    inputs = IMAGENET if backbone == "vit_s" else MNIST
    model = build_model(moe_config(backbone, placement), inputs, device="meta")
    kinds = [type(block.mlp) for block in model.backbone.blocks]
    assert kinds == [MoE if i in moe_blocks else Mlp for i in range(len(kinds))]
    assert len(model.moe_layers()) == len(moe_blocks)


def test_meta_build_allocates_no_memory() -> None:
    model = build_model(moe_config("vit_b", "every2"), IMAGENET, device="meta")
    assert all(p.is_meta for p in model.parameters())


def test_dense_vit_s_has_the_params_of_timm_vit_small() -> None:
    with torch.device("meta"):
        reference = timm.create_model("vit_small_patch16_224", pretrained=False)
    timm_count = sum(p.numel() for p in reference.parameters())
    count = count_params(moe_config("vit_s", "none"), IMAGENET)
    assert count == ParamCount(total=timm_count, active=timm_count)
    assert millions(count.total) == pytest.approx(22.0, rel=0.01)


def test_dense_vit_b_has_86_6m_params() -> None:
    count = count_params(moe_config("vit_b", "none"), IMAGENET)
    assert millions(count.total) == pytest.approx(86.6, abs=0.05)


# Total params of the paper's Tables 1 and 4 (ImageNet-1k, 224px, 8 experts unless named).
@pytest.mark.parametrize(
    ("backbone", "placement", "experts", "paper_total"),
    [
        ("vit_s", "every2", 8, 71.7),
        ("vit_s", "last2", 8, 38.6),
        ("vit_s", "last2", 4, 29.1),
        ("vit_s", "last2", 16, 57.5),
        ("vit_b", "every2", 8, 284.9),
    ],
)
def test_total_params_match_the_paper(
    backbone: str, placement: str, experts: int, paper_total: float
) -> None:
    count = count_params(moe_config(backbone, placement, experts=experts, top_k=2), IMAGENET)
    assert millions(count.total) == pytest.approx(paper_total, rel=0.015)


def test_top1_active_params_match_the_paper() -> None:
    # Table 4: ViT-S-8 Last 2 Top 1 uses 22.0M params per sample, as the dense model.
    # (The paper's top-2 figures, 25.0M / 33.1M, exceed every formula we tried; see the report.)
    count = count_params(moe_config("vit_s", "last2", experts=8, top_k=1), IMAGENET)
    assert millions(count.active) == pytest.approx(22.0, rel=0.015)


@pytest.mark.parametrize(
    ("placement", "experts", "top_k", "mlp_ratio"),
    [("every2", 8, 2, 4.0), ("last3", 4, 1, 2.0), ("last:2", 16, 4, 1.0)],
)
def test_accounting_from_first_principles(placement: str, experts: int, top_k: int, mlp_ratio: float) -> None:
    dim, dense_hidden = 384, 4 * 384
    dense = count_params(moe_config("vit_s", "none"), IMAGENET).total
    layers = len(moe_config("vit_s", placement).moe_blocks)
    mlp = 2 * dim * dense_hidden + dense_hidden + dim
    hidden = int(mlp_ratio * dim)
    expert = 2 * dim * hidden + hidden + dim
    router = dim * experts

    count = count_params(
        moe_config("vit_s", placement, experts=experts, top_k=top_k, mlp_ratio=mlp_ratio), IMAGENET
    )
    assert count.total == dense - layers * mlp + layers * (experts * expert + router)
    assert count.active == dense - layers * mlp + layers * (top_k * expert + router)


def test_expert_params_are_found_by_name() -> None:
    model = build_model(moe_config("vit_s", "last2", experts=8), IMAGENET, device="meta")
    by_name = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    in_layers = sum(p.numel() for layer in model.moe_layers() for p in layer.expert_parameters())
    assert by_name == in_layers == 2 * 8 * (2 * 384 * 1536 + 1536 + 384)


def test_moe_vit_mini_trains_a_step_on_embedded_mnist() -> None:
    torch.manual_seed(0)
    cfg = moe_config("vit_mini", "last2", experts=4, top_k=2)
    model = build_model(cfg, input_spec(DataConfig()))
    images, labels = load_datasets(DataConfig(train_samples=32))[0].tensors

    logits = model(images)
    aux = model.aux_loss()
    F.cross_entropy(logits, labels).add(aux).backward()

    assert logits.shape == (32, 10)
    assert torch.isfinite(logits).all() and torch.isfinite(aux)
    expected_aux = cfg.moe.balance_loss_weight * torch.stack([m.aux_loss for m in model.moe_layers()]).mean()
    torch.testing.assert_close(aux, expected_aux)
    for layer in model.moe_layers():  # router and experts, on whichever backend `auto` chose
        for name, param in layer.named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    stats = model.routing_stats()
    assert set(stats) == {"dropped_fraction", "expert_load_cv", "experts_per_image"}
    assert 0.0 <= stats["dropped_fraction"] < 1.0 and stats["expert_load_cv"] >= 0.0


def test_routing_stats_average_over_layers() -> None:
    model = build_model(moe_config("vit_mini", "every2", experts=4, top_k=1), MNIST)
    model(torch.randn(4, 1, 28, 28))
    loads = [layer.last_stats["tokens_per_expert"].float() for layer in model.moe_layers()]
    dropped = [layer.last_stats["dropped_fraction"].item() for layer in model.moe_layers()]
    stats = model.routing_stats()
    assert stats["dropped_fraction"] == pytest.approx(sum(dropped) / 3)
    cvs = [(load.std(unbiased=False) / load.mean()).item() for load in loads]
    assert stats["expert_load_cv"] == pytest.approx(sum(cvs) / 3, rel=1e-5)


def test_dense_model_has_zero_aux_loss_and_no_routing_stats() -> None:
    model = build_model(moe_config("vit_mini", "none"), MNIST)
    model(torch.randn(2, 1, 28, 28))
    assert model.moe_layers() == []
    assert model.aux_loss().item() == 0.0
    assert model.routing_stats() == {}


def test_images_must_tile_into_patches() -> None:
    with pytest.raises(ValueError, match="16px patches.*28px"):
        build_model(moe_config("vit_s", "last2"), MNIST, device="meta")


def test_vit_mini_cuts_digits_into_16_patches_of_7px_and_average_pools() -> None:
    model = build_model(moe_config("vit_mini", "last2"), MNIST, device="meta")
    assert isinstance(model, MoEModel)
    assert model.backbone.patch_embed.num_patches == 4 * 4
    assert model.backbone.embed_dim == 64
    assert model.backbone.global_pool == "avg"


def test_patch_size_overrides_the_backbones() -> None:
    model = build_model(ModelConfig(backbone="vit_s", placement="none", patch_size=32), IMAGENET, device="meta")
    assert model.backbone.patch_embed.patch_size == (32, 32)
    assert model.backbone.patch_embed.num_patches == 49
    iso = build_model(ModelConfig(backbone="convnext_s_iso", placement="none", patch_size=8), IMAGENET, device="meta")
    assert iso.backbone.stem.stride == (8, 8)
    with pytest.raises(ValueError, match="42px patches.*28px"):
        build_model(ModelConfig(backbone="vit_mini", placement="none", patch_size=14 * 3), MNIST, device="meta")
