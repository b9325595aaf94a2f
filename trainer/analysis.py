"""Routing analysis of a trained model over the validation set (Videau et al. 2025, section 5.6).

The paper inspects, for every MoE layer, each token's **top expert** only: the expert its router
prefers most, the first of the two under top-2 (:meth:`trainer.moe.layer.MoELayer._record`
defines it for every router: token choice, image routing, expert choice, Soft MoE, Tutel).
Tokens are image positions: ViT's [CLS] is left out, ConvNeXt's H×W positions are the tokens.
Over the validation images, per layer with E experts, C classes and a grid of H×W = T positions:

- ``class_counts`` ``[C, E]`` int64: how often each expert is the top expert of a token of an
  image of each class (Fig. 9, top).
- ``similarity`` ``[E, E]`` float64: the paper's Jaccard-like expert similarity (Fig. 9, bottom),
  see :func:`similarity_sums`; ``S_ii = 1``, and 0 where neither expert is ever a top expert.
- ``experts_per_image`` ``()`` float64: mean number of distinct top experts per image (the
  paper's "experts contributing to processing an image"). Not ``RoutingStats``'
  ``experts_per_image``, which counts every expert that kept any of the k choices.
- ``patch_histogram`` ``[E, T + 1]`` int64: ``[e, c]`` is the number of images in which expert e
  is the top expert of exactly c tokens; :func:`patch_cdf` turns it into Fig. 8's CDF.
- ``spatial_map`` ``[E, H, W]`` float64: at each position, the fraction of images whose token
  there has expert e as top expert (Fig. 7); it sums to one over experts.

File format (:func:`save_routing`, one ``np.savez_compressed`` ``.npz``, no pickled objects;
read it with :func:`load_routing`):

- ``layers``: ``[L]`` str, the MoE layers in network order, named ``block<i>`` after the
  0-based block whose MLP they replace (the index of ``model.placement``), or by module path
  for a layer no builder placed.
- ``images``: ``()`` int64, validation images counted (padding excluded), the same for all layers.
- ``<layer>/class_counts``, ``<layer>/similarity``, ``<layer>/experts_per_image``,
  ``<layer>/patch_histogram``, ``<layer>/spatial_map``: the arrays above.

A dense model has no MoE layer and no analysis: :func:`analyze_routing` returns ``{}``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from trainer.models.build import MoEModel
from trainer.moe.layer import MoELayer

LAYER_ARRAYS = ("class_counts", "similarity", "experts_per_image", "patch_histogram", "spatial_map")


# ---- The accumulated quantities, as functions of per-image counts ---------------------------------------


def expert_counts(top: Tensor, experts: int) -> Tensor:
    """``[B, T]`` long top experts → ``[B, E]`` long ``c``: each image's tokens per top expert."""
    counts = torch.zeros(top.shape[0], experts, dtype=torch.long, device=top.device)
    return counts.scatter_add_(1, top, torch.ones_like(top))


def similarity_sums(counts: Tensor) -> tuple[Tensor, Tensor]:
    """Numerator and denominator ``[E, E]`` of the paper's expert similarity over these images.

    With ``c_i`` the tokens of an image whose top expert is i, the paper defines

        S_ij = Σ_{images where i and j appear} (c_i + c_j − |c_i − c_j|)
               / Σ_{images where i or j appears} (c_i + c_j).

    Where both appear, ``c_i + c_j − |c_i − c_j| = 2 min(c_i, c_j)``; where only one appears,
    ``2 min(c_i, c_j) = 0``; where neither does, ``c_i + c_j = 0`` too. So both sums may run
    over all images:

        S_ij = Σ_images 2 min(c_i, c_j) / Σ_images (c_i + c_j),

    and sums over disjoint sets of images (batches, ranks) simply add up; :func:`similarity`
    divides at the end.

    Args:
        counts: ``[B, E]`` long, :func:`expert_counts` of B images.

    Returns:
        ``(Σ 2 min(c_i, c_j), Σ (c_i + c_j))``, both ``[E, E]`` long.
    """
    numerator = 2 * torch.minimum(counts.unsqueeze(2), counts.unsqueeze(1)).sum(dim=0)
    totals = counts.sum(dim=0)
    return numerator, totals.unsqueeze(1) + totals.unsqueeze(0)


def similarity(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``[E, E]`` float64 ``S = numerator / denominator``, 0 where 0/0 (neither expert ever on top).

    The diagonal is 1 by definition, also for an expert that is never on top.
    """
    ratio = numerator.double() / denominator.double().clamp(min=1)
    return ratio.fill_diagonal_(1.0)


def patch_cdf(histogram: np.ndarray) -> np.ndarray:
    """Fig. 8: ``[E, T + 1]`` ``patch_histogram`` → ``[E, T]`` CDF of tokens per image, where active.

    ``[e, c − 1]`` is the fraction of the images in which expert e is the top expert of at least
    one token where it is top expert of at most c tokens (c = 1..T); NaN for an expert that is
    never a top expert (it has no such images).
    """
    active = np.asarray(histogram, dtype=np.float64)[:, 1:]
    cumulative = np.cumsum(active, axis=1)
    total = cumulative[:, -1:]
    return np.divide(cumulative, total, out=np.full_like(cumulative, np.nan), where=total > 0)


# ---- Accumulation over a validation pass -----------------------------------------------------------------


class _LayerAccumulator:
    """The running sums of one MoE layer, int64 on the model's device (exact, and summable over ranks)."""

    def __init__(self, experts: int, classes: int, grid: tuple[int, int], device: torch.device) -> None:
        self.experts = experts
        self.grid = grid
        tokens = grid[0] * grid[1]
        self.tokens = tokens

        def zeros(*shape: int) -> Tensor:
            return torch.zeros(shape, dtype=torch.long, device=device)

        self.class_counts = zeros(classes, experts)
        self.overlap = zeros(experts, experts)  # Σ 2 min(c_i, c_j)
        self.mass = zeros(experts, experts)  # Σ (c_i + c_j)
        self.distinct = zeros()  # Σ over images of the number of distinct top experts
        self.patch_histogram = zeros(experts, tokens + 1)
        self.position_counts = zeros(experts, tokens)  # images whose token at each position picks e

    def add(self, top: Tensor, labels: Tensor) -> None:
        """Count images: ``top`` ``[n, T]`` long top experts of their tokens, ``labels`` ``[n]`` long."""
        counts = expert_counts(top, self.experts)
        self.class_counts.index_add_(0, labels, counts)
        overlap, mass = similarity_sums(counts)
        self.overlap += overlap
        self.mass += mass
        self.distinct += (counts > 0).sum()
        expert = torch.arange(self.experts, device=top.device)
        self.patch_histogram.view(-1).index_add_(
            0, (expert * (self.tokens + 1) + counts).reshape(-1), torch.ones_like(counts).reshape(-1)
        )
        position = torch.arange(self.tokens, device=top.device)
        self.position_counts.view(-1).index_add_(
            0, (top * self.tokens + position).reshape(-1), torch.ones_like(top).reshape(-1)
        )

    def tensors(self) -> list[Tensor]:
        """Every running sum, in a fixed order (the order ranks reduce them in)."""
        return [
            self.class_counts,
            self.overlap,
            self.mass,
            self.distinct,
            self.patch_histogram,
            self.position_counts,
        ]

    def result(self, images: int) -> dict[str, np.ndarray]:
        """The layer's arrays (see the module docstring) over ``images`` counted images."""
        height, width = self.grid
        return {
            "class_counts": self.class_counts.cpu().numpy(),
            "similarity": similarity(self.overlap, self.mass).cpu().numpy(),
            "experts_per_image": np.asarray(self.distinct.item() / images, dtype=np.float64),
            "patch_histogram": self.patch_histogram.cpu().numpy(),
            "spatial_map": (self.position_counts.double() / images).view(-1, height, width).cpu().numpy(),
        }


def named_moe_layers(model: MoEModel) -> list[tuple[str, MoELayer]]:
    """The model's MoE layers in network order, named ``block<i>`` (module path where no block is known)."""
    named = [
        (f"block{module.block_index}" if module.block_index is not None else path, module)
        for path, module in model.named_modules()
        if isinstance(module, MoELayer)
    ]
    names = [name for name, _ in named]
    if len(set(names)) != len(names):
        raise ValueError(f"MoE layer names are not unique: {names}")
    return named


def _positions(top: Tensor, layer: MoELayer, name: str) -> tuple[Tensor, tuple[int, int]]:
    """A layer's recorded ``[B, T_all]`` top experts → ``[B, H·W]`` of the image positions only, and (H, W)."""
    if layer.grid is None:
        raise ValueError(f"MoE layer {name} does not know the grid of its tokens (set MoELayer.grid)")
    height, width = layer.grid
    spatial = top[:, layer.prefix_tokens :]
    if spatial.shape[1] != height * width:
        raise ValueError(
            f"MoE layer {name} routed {top.shape[1]} tokens, but {layer.prefix_tokens} prefix tokens "
            f"and a {height}x{width} grid make {layer.prefix_tokens + height * width}"
        )
    return spatial, (height, width)


def _clear(layer: MoELayer) -> None:
    layer.routing_record.clear()
    layer.top_expert_record.clear()


def _sum_over_ranks(tensors: list[Tensor]) -> None:
    """Sum int64 ``tensors`` in place over all ranks, in one collective (a no-op without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    for tensor, chunk in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
        tensor.copy_(chunk.view_as(tensor))


@torch.no_grad()
def analyze_routing(
    model: MoEModel,
    loader: Iterable[tuple[Tensor, Tensor, Tensor]],
    device: torch.device,
    num_classes: int,
) -> dict[str, np.ndarray]:
    """The routing analysis of ``model`` over the validation images of ``loader`` (see the module docstring).

    The model runs in eval mode (as :func:`trainer.loop.evaluate` runs it: bf16 autocast on
    CUDA) with ``record_routing`` on; its mode, ``record_routing`` flags and (emptied) records are
    restored afterwards. Each batch's records are folded into running sums and dropped, so
    memory does not grow with the validation set.

    Under torch.distributed every rank passes its own shard; all ranks must yield the same
    number of batches (expert-parallel layers exchange tokens in every forward), which is why
    shards are padded with items marked not ``real``. The sums are reduced over ranks, and every
    rank returns the same arrays.

    Args:
        model: the trained model (not wrapped in DDP).
        loader: ``(images, labels, real)`` batches; items with ``real`` False are not counted.
        device: where the model lives.
        num_classes: number of classes C (rows of ``class_counts``).

    Returns:
        The arrays of the module docstring's file format; ``{}`` for a dense model.

    Raises:
        ValueError: the loader yielded no batch or no real image, or a layer's tokens do not
            match its grid.
    """
    named = named_moe_layers(model)
    if not named:
        return {}
    was_training = model.training
    was_recording = [layer.record_routing for _, layer in named]
    model.eval()
    for _, layer in named:
        _clear(layer)
        layer.record_routing = True
    sums: dict[str, _LayerAccumulator] = {}
    images = torch.zeros((), dtype=torch.long, device=device)
    try:
        for inputs, labels, real in loader:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                model(inputs.to(device))
            keep = torch.as_tensor(real, dtype=torch.bool, device=device).nonzero().squeeze(1)
            labels = torch.as_tensor(labels, dtype=torch.long, device=device)[keep]
            for name, layer in named:
                for top in layer.top_expert_record:
                    spatial, grid = _positions(top, layer, name)
                    if name not in sums:  # the grid of a ConvNeXt stage is known after a forward
                        sums[name] = _LayerAccumulator(layer.cfg.experts, num_classes, grid, device)
                    elif sums[name].grid != grid:
                        raise ValueError(
                            f"MoE layer {name} routed a {grid} grid after a {sums[name].grid} one: "
                            "the analysis needs validation images of one size"
                        )
                    sums[name].add(spatial[keep], labels)
                _clear(layer)
            images += keep.numel()
    finally:
        for (_, layer), recording in zip(named, was_recording, strict=True):
            layer.record_routing = recording
            _clear(layer)
        model.train(was_training)
    if not sums:
        raise ValueError("the validation loader yielded no batch: there is no routing to analyse")
    missing = [name for name, _ in named if name not in sums]
    if missing:
        raise ValueError(f"MoE layers {missing} never ran in the model's forward")
    _sum_over_ranks([images, *(t for accumulator in sums.values() for t in accumulator.tensors())])
    total = int(images.item())
    if total == 0:
        raise ValueError("the validation loader yielded no real image: there is no routing to analyse")
    arrays = {"layers": np.array(list(sums)), "images": np.asarray(total, dtype=np.int64)}
    for name, accumulator in sums.items():
        arrays.update({f"{name}/{key}": value for key, value in accumulator.result(total).items()})
    return arrays


# ---- Storage -------------------------------------------------------------------------------------------------


def save_routing(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write :func:`analyze_routing`'s arrays to ``path`` (exactly that name) as one compressed ``.npz``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as file:
        np.savez_compressed(file, **arrays)


@dataclass(frozen=True, eq=False)
class LayerRouting:
    """One MoE layer's routing analysis (see the module docstring for each array)."""

    name: str
    class_counts: np.ndarray
    similarity: np.ndarray
    experts_per_image: float
    patch_histogram: np.ndarray
    spatial_map: np.ndarray

    @property
    def experts(self) -> int:
        return self.similarity.shape[0]

    @property
    def grid(self) -> tuple[int, int]:
        """(H, W) of the layer's token positions."""
        return self.spatial_map.shape[1], self.spatial_map.shape[2]

    def patch_cdf(self) -> np.ndarray:
        """``[E, T]``, see :func:`patch_cdf`."""
        return patch_cdf(self.patch_histogram)


@dataclass(frozen=True, eq=False)
class RoutingAnalysis:
    """A saved routing analysis: the counted images and the layers in network order."""

    images: int
    layers: tuple[LayerRouting, ...]

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> RoutingAnalysis:
        """From :func:`analyze_routing`'s arrays (or a loaded ``.npz``); empty for a dense model."""
        if "layers" not in arrays:
            return cls(images=0, layers=())
        layers = tuple(
            LayerRouting(
                name=name,
                class_counts=arrays[f"{name}/class_counts"],
                similarity=arrays[f"{name}/similarity"],
                experts_per_image=float(arrays[f"{name}/experts_per_image"]),
                patch_histogram=arrays[f"{name}/patch_histogram"],
                spatial_map=arrays[f"{name}/spatial_map"],
            )
            for name in (str(n) for n in arrays["layers"])
        )
        return cls(images=int(arrays["images"]), layers=layers)

    def layer(self, name: str) -> LayerRouting:
        """The layer called ``name`` (``block<i>``)."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no MoE layer {name!r}; layers: {[layer.name for layer in self.layers]}")


def load_routing(path: Path) -> RoutingAnalysis:
    """Read a :func:`save_routing` file."""
    with np.load(path, allow_pickle=False) as arrays:
        return RoutingAnalysis.from_arrays({key: arrays[key] for key in arrays.files})
