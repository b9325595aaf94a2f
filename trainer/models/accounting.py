"""What a model costs before it trains: parameters, FLOPs per image, inference throughput.

Parameters and FLOPs are counted on the meta device, so nothing is allocated and a ViT-B-8
study plans in seconds. FLOPs follow the convention of the papers' tables (fvcore / timm):
one multiply-add is one FLOP, and only matrix products and convolutions count.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import lru_cache

import torch
from timm.layers import set_fused_attn, use_fused_attn
from torch.utils.flop_counter import FlopCounterMode

from trainer.config import ModelConfig
from trainer.models import InputSpec
from trainer.models.build import MoEModel, build_model


@dataclass(frozen=True)
class ParamCount:
    """Parameters of a model.

    Attributes:
        total: every parameter.
        active: parameters one sample uses: everything but the routed experts, plus
            top_k of each MoE layer's experts (a shared expert is always active; Soft MoE
            sends slots of every image to every expert, so all of them are).
    """

    total: int
    active: int


def count_params(cfg: ModelConfig, inputs: InputSpec) -> ParamCount:
    return _count_params(build_model(cfg, inputs, device="meta"))


def _count_params(model: MoEModel) -> ParamCount:
    total = sum(p.numel() for p in model.parameters())
    active = total
    for layer in model.moe_layers():
        if layer.cfg.router == "soft":
            continue
        routed = sum(p.numel() for p in layer.expert_parameters())
        # Experts are equal in size, so k of E experts are exactly k/E of the routed params.
        active -= routed - routed // layer.cfg.experts * layer.cfg.top_k
    return ParamCount(total=total, active=active)


@dataclass(frozen=True)
class ModelCost:
    """What :func:`model_cost` reports: parameters and forward FLOPs (multiply-adds) per image."""

    params_total: int
    params_active: int
    flops: int


def model_cost(cfg: ModelConfig, inputs: InputSpec) -> ModelCost:
    """Params and FLOPs from one meta-device build, cached: a study repeats models across seeds."""
    return _model_cost(cfg.model_dump_json(), inputs)


@lru_cache(maxsize=1024)
def _model_cost(cfg_json: str, inputs: InputSpec) -> ModelCost:
    model = _meta_model(ModelConfig.model_validate_json(cfg_json), inputs)
    params = _count_params(model)
    return ModelCost(params.total, params.active, _count_flops(model, inputs))


@contextmanager
def _unfused_attention() -> Iterator[None]:
    # FlopCounterMode counts fused scaled_dot_product_attention as zero on CPU; timm reads the
    # flag when it builds a model, so build with explicit attention.
    fused = use_fused_attn()
    set_fused_attn(False)
    try:
        yield
    finally:
        set_fused_attn(fused)


def count_flops(cfg: ModelConfig, inputs: InputSpec) -> int:
    """FLOPs (multiply-adds) of one image's forward pass at the expected routing.

    Token choice counts the router and k expert evaluations per token (the experts' capacity
    slack is not compute the model needs); expert choice counts its capacity, Soft MoE its
    slots, as they run.
    """
    return _count_flops(_meta_model(cfg, inputs), inputs)


def _meta_model(cfg: ModelConfig, inputs: InputSpec) -> MoEModel:
    with _unfused_attention():
        return build_model(cfg, inputs, device="meta")


def _count_flops(model: MoEModel, inputs: InputSpec) -> int:
    for layer in model.moe_layers():
        layer.expected_routing = True
    image = torch.empty(1, inputs.in_chans, inputs.img_size, inputs.img_size, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(image)
    for layer in model.moe_layers():
        layer.expected_routing = False
    return counter.get_total_flops() // 2


THROUGHPUT_BATCH = 64


def measure_throughput(
    cfg: ModelConfig,
    inputs: InputSpec,
    device: torch.device | str = "cpu",
    batch_size: int = THROUGHPUT_BATCH,
    steps: int = 10,
    warmup: int = 3,
) -> float:
    """Inference images/s of a randomly initialised model (see :func:`time_inference`)."""
    device = torch.device(device)
    model = build_model(cfg, inputs, device=device)
    return time_inference(model, inputs, device, batch_size, steps, warmup)


def time_inference(
    model: torch.nn.Module,
    inputs: InputSpec,
    device: torch.device,
    batch_size: int = THROUGHPUT_BATCH,
    steps: int = 10,
    warmup: int = 3,
) -> float:
    """Inference images/s at a fixed batch, bf16 autocast on GPU: the median of ``steps`` timed
    batches after ``warmup`` untimed ones, as in DeiT's throughput measurement.

    With expert parallelism every rank must call this together (the layers exchange tokens).
    """
    was_training = model.training
    model.eval()
    images = torch.randn(batch_size, inputs.in_chans, inputs.img_size, inputs.img_size, device=device)
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    times = []
    with torch.inference_mode(), autocast:
        for step in range(warmup + steps):
            if cuda:
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            model(images)
            if cuda:
                torch.cuda.synchronize(device)
            if step >= warmup:
                times.append(time.perf_counter() - started)
    model.train(was_training)
    return batch_size / sorted(times)[len(times) // 2]
