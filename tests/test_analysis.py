"""The routing analysis of section 5.6 (Videau et al. 2025): its defining properties, a brute-force
reference built from router outputs and the paper's own formulas, padding, storage, ranks and Tutel.

Models are small, randomly initialised backbones routing 200 embedded-MNIST validation digits
(20 per class); every analysis takes well under a second on a CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import Tensor
from two_ranks import WORLD, run_on_two_ranks

from trainer.analysis import (
    LAYER_ARRAYS,
    RoutingAnalysis,
    analyze_routing,
    load_routing,
    patch_cdf,
    save_routing,
    similarity,
    similarity_sums,
)
from trainer.config import DataConfig, ModelConfig, MoEConfig
from trainer.data import input_spec, load_datasets
from trainer.models import MoEModel, build_model
from trainer.moe import tutel_backend
from trainer.moe.layer import MoE, MoELayer

INPUTS = input_spec(DataConfig())
CLASSES = INPUTS.num_classes
CPU = torch.device("cpu")
BATCH = 64

# name: (backbone, placement, MoE settings, the (H, W) grid of each MoE layer's tokens).
# vit_mini and convnext_mini_iso cut 28px digits into 4x4 patches of 7px; convnext_mini's
# four stages see 28, 14, 7 and 3 px (its registry entry), and "stage" puts an MoE in each.
CASES: dict[str, tuple[str, str, dict[str, Any], list[tuple[int, int]]]] = {
    "vit linear top-2": ("vit_mini", "last2", {"top_k": 2}, [(4, 4)] * 2),
    "vit cosine top-1, 8 experts": ("vit_mini", "every2", {"router": "cosine", "top_k": 1, "experts": 8},
                                    [(4, 4)] * 3),
    "vit expert choice": ("vit_mini", "last2", {"router": "expert_choice"}, [(4, 4)] * 2),
    "vit soft": ("vit_mini", "last2", {"router": "soft", "slots_per_expert": 2}, [(4, 4)] * 2),
    "vit image routing": ("vit_mini", "last2", {"routing": "image", "top_k": 1}, [(4, 4)] * 2),
    "convnext stages top-1": ("convnext_mini", "stage", {"top_k": 1}, [(28, 28), (14, 14), (7, 7), (3, 3)]),
    "convnext image routing": ("convnext_mini", "last2", {"routing": "image", "top_k": 2}, [(7, 7), (3, 3)]),
    "convnext iso l2 top-2": ("convnext_mini_iso", "last2", {"router": "l2", "top_k": 2}, [(4, 4)] * 2),
}  # fmt: skip


def build(backbone: str, placement: str | list[int], seed: int = 0, **moe: Any) -> MoEModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        backbone=backbone, placement=placement, moe=MoEConfig(**{"experts": 4, "backend": "native", **moe})
    )
    return build_model(cfg, INPUTS)


@lru_cache(maxsize=1)
def digits() -> tuple[Tensor, Tensor]:
    """Every 5th validation digit: 200 images, 20 of each class (the split is class-major)."""
    _, val = load_datasets(DataConfig())
    index = range(0, len(val), 5)
    return torch.stack([val[i][0] for i in index]), torch.tensor([int(val[i][1]) for i in index])


def batches(images: Tensor, labels: Tensor, padding: int = 0) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """``(images, labels, real)`` batches; ``padding`` noise images labelled 7 end each batch, not real."""
    generator = torch.Generator().manual_seed(5)
    for start in range(0, len(images), BATCH):
        x, y = images[start : start + BATCH], labels[start : start + BATCH]
        junk = torch.randn(padding, *x.shape[1:], generator=generator)
        real = torch.cat([torch.ones(len(x), dtype=torch.bool), torch.zeros(padding, dtype=torch.bool)])
        yield torch.cat([x, junk]), torch.cat([y, torch.full((padding,), 7)]), real


def analyze(model: MoEModel, padding: int = 0) -> dict[str, np.ndarray]:
    return analyze_routing(model, batches(*digits(), padding=padding), CPU, CLASSES)


def assert_same_arrays(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if value.dtype.kind == "f":
            np.testing.assert_allclose(actual[key], value, rtol=1e-12, atol=0, err_msg=key)
        else:
            np.testing.assert_array_equal(actual[key], value, err_msg=key)


# ---- Defining properties ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_every_layer_has_the_defining_properties(name: str) -> None:
    backbone, placement, moe, grids = CASES[name]
    model = build(backbone, placement, **moe)
    analysis = RoutingAnalysis.from_arrays(analyze(model))
    _, labels = digits()
    images, per_class = len(labels), np.bincount(labels.numpy(), minlength=CLASSES)
    assert analysis.images == images
    assert [layer.name for layer in analysis.layers] == [f"block{i}" for i in model.cfg.moe_blocks]
    for layer, grid in zip(analysis.layers, grids, strict=True):
        experts, tokens = model.cfg.moe.experts, grid[0] * grid[1]
        assert layer.grid == grid, layer.name
        assert layer.experts == experts
        # Every image position ([CLS] excluded) has exactly one top expert.
        np.testing.assert_array_equal(layer.class_counts.sum(axis=1), per_class * tokens)
        hist = layer.patch_histogram
        assert hist.shape == (experts, tokens + 1)
        np.testing.assert_array_equal(hist.sum(axis=1), np.full(experts, images))
        assert (hist * np.arange(tokens + 1)).sum() == images * tokens
        # Distinct top experts per image = (image, expert) pairs with at least one token.
        assert layer.experts_per_image == pytest.approx(hist[:, 1:].sum() / images)
        assert 1 <= layer.experts_per_image <= min(experts, tokens)
        spatial = layer.spatial_map
        assert spatial.shape == (experts, *grid)
        np.testing.assert_allclose(spatial.sum(axis=0), np.ones(grid), rtol=1e-12)
        np.testing.assert_allclose(spatial.sum(axis=(1, 2)) * images, layer.class_counts.sum(axis=0))
        sim = layer.similarity
        np.testing.assert_array_equal(sim, sim.T)
        np.testing.assert_array_equal(np.diag(sim), np.ones(experts))
        assert ((sim >= 0) & (sim <= 1)).all()
        cdf = layer.patch_cdf()
        active = hist[:, 1:].sum(axis=1) > 0
        assert np.isnan(cdf[~active]).all()
        assert (np.diff(cdf[active], axis=1) >= 0).all()
        np.testing.assert_allclose(cdf[active, -1], 1.0)


@pytest.mark.parametrize("name", ["vit image routing", "convnext image routing"])
def test_image_routing_gives_one_expert_per_image_everywhere(name: str) -> None:
    backbone, placement, moe, _ = CASES[name]
    analysis = RoutingAnalysis.from_arrays(analyze(build(backbone, placement, **moe)))
    for layer in analysis.layers:
        tokens = layer.grid[0] * layer.grid[1]
        assert layer.experts_per_image == 1.0
        spatial = layer.spatial_map
        np.testing.assert_array_equal(spatial, np.broadcast_to(spatial[:, :1, :1], spatial.shape))
        assert layer.patch_histogram[:, 1:tokens].sum() == 0  # an expert has all tokens or none
        off_diagonal = layer.similarity[~np.eye(layer.experts, dtype=bool)]
        np.testing.assert_array_equal(off_diagonal, 0.0)  # two experts never share an image


# ---- Against a brute-force reference from the routers themselves ---------------------------------------------


def reference_top_expert(layer: MoE, x: Tensor) -> Tensor:
    """``[B, T]`` top expert of the tokens ``x`` entering ``layer``, straight from its router."""
    cfg, (batch, tokens, dim) = layer.cfg, x.shape
    if cfg.router == "soft":
        dispatch, _ = layer.router(x)  # [B, N, S], a softmax over tokens for each slot
        return dispatch.argmax(dim=2) // cfg.slots_per_expert
    if cfg.router == "expert_choice":
        return layer.router(x.reshape(-1, dim)).argmax(dim=-1).view(batch, tokens)
    if cfg.routing == "image":
        summary = x[:, 0] if layer.image_token == "first" else x.mean(dim=1)
        return layer.router(summary).probs.argmax(dim=-1)[:, None].expand(batch, tokens)
    return layer.router(x.reshape(-1, dim)).probs.argmax(dim=-1).view(batch, tokens)


def paper_similarity(counts: np.ndarray) -> np.ndarray:
    """The paper's formula as written: intersections and unions of the images experts appear in."""
    experts = counts.shape[1]
    result = np.eye(experts)
    for i in range(experts):
        for j in range(experts):
            if i == j:
                continue
            ci, cj = counts[:, i], counts[:, j]
            both, either = (ci > 0) & (cj > 0), (ci > 0) | (cj > 0)
            numerator = (ci + cj - np.abs(ci - cj))[both].sum()
            denominator = (ci + cj)[either].sum()
            result[i, j] = numerator / denominator if denominator else 0.0
    return result


def reference_layer(
    top: np.ndarray, labels: np.ndarray, experts: int, grid: tuple[int, int]
) -> dict[str, Any]:
    """Every array of one layer from ``[images, H·W]`` top experts, image by image."""
    _, tokens = top.shape
    counts = np.stack([np.bincount(row, minlength=experts) for row in top])
    class_counts = np.zeros((CLASSES, experts), dtype=np.int64)
    hist = np.zeros((experts, tokens + 1), dtype=np.int64)
    for label, row in zip(labels, counts, strict=True):
        class_counts[label] += row
        hist[np.arange(experts), row] += 1
    spatial = np.stack([(top == e).mean(axis=0).reshape(grid) for e in range(experts)])
    return {
        "class_counts": class_counts,
        "similarity": paper_similarity(counts),
        "experts_per_image": np.mean([len(set(row)) for row in top]),
        "patch_histogram": hist,
        "spatial_map": spatial,
    }


@pytest.mark.parametrize("name", list(CASES))
def test_analysis_equals_a_reference_from_the_routers_and_the_papers_formulas(name: str) -> None:
    backbone, placement, moe, _ = CASES[name]
    model = build(backbone, placement, **moe)
    layers = [module for module in model.modules() if isinstance(module, MoELayer)]
    seen: dict[int, list[Tensor]] = {id(layer): [] for layer in layers}
    for layer in layers:  # the very tokens each layer routes in the analysis pass
        layer.register_forward_pre_hook(lambda module, args: seen[id(module)].append(args[0].detach()))
    # Padded noise images ride along in every batch; the reference never sees them.
    arrays = analyze(model, padding=3)
    model.eval()
    _, labels = digits()
    for layer in layers:
        top = torch.cat([reference_top_expert(layer, x)[:-3, layer.prefix_tokens :] for x in seen[id(layer)]])
        assert layer.grid is not None
        expected = reference_layer(top.numpy(), labels.numpy(), layer.cfg.experts, layer.grid)
        for key, value in expected.items():
            np.testing.assert_allclose(
                arrays[f"block{layer.block_index}/{key}"], value, rtol=1e-12, err_msg=key
            )


def test_top_expert_record_is_the_first_choice_and_opt_in() -> None:
    for router in ("linear", "cosine", "l2"):
        torch.manual_seed(0)
        layer = MoE(8, MoEConfig(experts=4, top_k=2, router=router, capacity_factor=0.5)).eval()
        x = torch.randn(3, 10, 8)
        layer(x)
        assert layer.top_expert_record == []
        layer.record_routing = True
        layer(x)
        (top,) = layer.top_expert_record
        assert top.dtype == torch.long and top.shape == (3, 10)
        # The first choice is the router's argmax, whether or not capacity dropped it.
        torch.testing.assert_close(top, layer.router(x.reshape(-1, 8)).probs.argmax(dim=-1).view(3, 10))


def test_analysis_restores_the_model_and_leaves_no_records() -> None:
    model = build("vit_mini", "last2")
    model.train()
    first, second = [m for m in model.modules() if isinstance(m, MoELayer)]
    second.record_routing = True
    analyze(model)
    assert model.training
    assert (first.record_routing, second.record_routing) == (False, True)
    assert first.routing_record == second.routing_record == second.top_expert_record == []


def test_padded_items_are_not_counted() -> None:
    # Room for every token: then a batch's padding cannot change the routing of its real images.
    model = build("vit_mini", "last2", top_k=2, capacity_factor=4.0)
    assert_same_arrays(analyze(model, padding=5), analyze(model))


def test_an_empty_validation_pass_is_an_error() -> None:
    with pytest.raises(ValueError, match="yielded no batch"):
        analyze_routing(build("vit_mini", "last2"), [], CPU, CLASSES)


def test_dense_model_has_no_analysis() -> None:
    assert analyze(build("vit_mini", "none")) == {}
    assert RoutingAnalysis.from_arrays({}).layers == ()


# ---- The similarity and the CDF on hand-made counts --------------------------------------------------------


def test_similarity_on_hand_counted_images() -> None:
    # Three images, three experts: c_i = tokens of each image whose top expert is i.
    counts = torch.tensor([[3, 1, 0], [0, 2, 2], [4, 0, 0]])
    # S_01: only image 0 has both: 3+1-|3-1| = 2; images 0, 1, 2 have either: 4 + 2 + 4 = 10.
    # S_02: no image has both. S_12: image 1 has both: 2+2-0 = 4; images 0, 1 have either: 1 + 4.
    expected = [[1.0, 0.2, 0.0], [0.2, 1.0, 0.8], [0.0, 0.8, 1.0]]
    np.testing.assert_allclose(similarity(*similarity_sums(counts)).numpy(), expected)


def test_similarity_sums_equal_the_papers_formula_and_add_over_shards() -> None:
    generator = torch.Generator().manual_seed(3)
    counts = torch.randint(0, 4, (50, 6), generator=generator)
    counts[:, 5] = 0  # an expert never on top: 0/0 → 0 off the diagonal
    counts[:, 4] *= torch.arange(50) % 3 == 0  # one that is rarely on top
    whole = similarity(*similarity_sums(counts))
    np.testing.assert_allclose(whole.numpy(), paper_similarity(counts.numpy()), rtol=1e-12)
    shards = [similarity_sums(part) for part in counts.split([20, 30])]
    summed = similarity(shards[0][0] + shards[1][0], shards[0][1] + shards[1][1])
    torch.testing.assert_close(summed, whole, rtol=0, atol=0)


def test_patch_cdf_is_over_the_images_where_the_expert_is_active() -> None:
    hist = np.array([[2, 1, 0, 3], [5, 0, 0, 0]])  # expert 1 is never a top expert
    cdf = patch_cdf(hist)
    np.testing.assert_allclose(cdf[0], [0.25, 0.25, 1.0])
    assert np.isnan(cdf[1]).all()


# ---- Storage ---------------------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    arrays = analyze(build("convnext_mini", "stage", top_k=1))
    path = tmp_path / "routing" / "val_routing.npz"
    save_routing(path, arrays)
    with np.load(path, allow_pickle=False) as stored:
        assert_same_arrays({key: stored[key] for key in stored.files}, arrays)
    loaded = load_routing(path)
    assert loaded.images == int(arrays["images"])
    assert [layer.name for layer in loaded.layers] == list(arrays["layers"])
    for layer in loaded.layers:
        for key in LAYER_ARRAYS:
            np.testing.assert_array_equal(getattr(layer, key), arrays[f"{layer.name}/{key}"], err_msg=key)
    assert loaded.layer("block5").grid == (3, 3)


# ---- Ranks -----------------------------------------------------------------------------------------------------

# vit_mini, last2 with replicated experts (the sums are the point); and one layer sharded over
# both ranks, which exchanges tokens by all-to-all in every forward (padding keeps ranks in step).
# Room for every token, so a batch's routing does not depend on the other images in it.
RANK_MODELS: dict[str, tuple[str | list[int], bool]] = {
    "replicated": ("last2", False),
    "expert parallel": ([5], True),
}
RANK_BATCH = 32


def rank_shards(images: Tensor, labels: Tensor) -> list[list[tuple[Tensor, Tensor, Tensor]]]:
    """Each rank's strided share in batches, padded with its last image to the same length (as the loop does)."""
    length = -(-len(images) // WORLD)
    shards = []
    for rank in range(WORLD):
        index = torch.arange(rank, len(images), WORLD)
        real = torch.arange(length) < len(index)
        index = torch.cat([index, index[-1:].expand(length - len(index))])
        shards.append(
            [
                (
                    images[index[s : s + RANK_BATCH]],
                    labels[index[s : s + RANK_BATCH]],
                    real[s : s + RANK_BATCH],
                )
                for s in range(0, length, RANK_BATCH)
            ]
        )
    return shards


def rank_model(placement: str | list[int], group: dist.ProcessGroup | None) -> MoEModel:
    torch.manual_seed(0)
    cfg = ModelConfig(
        placement=placement, moe=MoEConfig(experts=4, top_k=2, capacity_factor=4.0, backend="native")
    )
    return build_model(cfg, INPUTS, expert_group=group)


def _check_ranks(
    rank: int, images: Tensor, labels: Tensor, expected: dict[str, dict[str, np.ndarray]]
) -> None:
    shard = rank_shards(images, labels)[rank]
    for name, (placement, sharded) in RANK_MODELS.items():
        model = rank_model(placement, dist.group.WORLD if sharded else None)
        arrays = analyze_routing(model, shard, CPU, CLASSES)
        assert int(arrays["images"]) == len(images), name
        assert_same_arrays(arrays, expected[name])


def test_ranks_sum_to_the_single_process_analysis() -> None:
    images, labels = digits()
    images, labels = images[:-1], labels[:-1]  # an odd count: one rank pads
    # One process, the ranks' very batches one after the other (so every forward matches a rank's).
    single = [batch for shard in rank_shards(images, labels) for batch in shard]
    expected = {
        name: analyze_routing(rank_model(placement, None), single, CPU, CLASSES)
        for name, (placement, _) in RANK_MODELS.items()
    }
    run_on_two_ranks(_check_ranks, images, labels, expected)


# ---- Tutel -------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(
    not tutel_backend.available(),
    reason="tutel is not installed (it is not on PyPI; build it from its source)",
)
@pytest.mark.parametrize("router", ["linear", "cosine"])
def test_tutel_backend_gives_the_native_analysis(router: str) -> None:
    # Room for every token in both backends' capacity rounding: the same weights route alike.
    moe = {"router": router, "top_k": 2, "capacity_factor": 4.0}
    native = build("vit_mini", "last2", backend="native", **moe)
    tutel = build("vit_mini", "last2", backend="tutel", **moe)
    assert all(isinstance(m, tutel_backend.TutelMoE) for m in tutel.modules() if isinstance(m, MoELayer))
    assert_same_arrays(analyze(tutel), analyze(native))
