"""Expert parallelism over two gloo ranks equals the single-process layer with the same weights.

Each test spawns two CPU processes (see ``two_ranks.py``). Rank r holds experts
``[r · E/2, (r+1) · E/2)`` and routes its own batch; tokens travel by all-to-all.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from timm.optim import create_optimizer_v2
from torch.nn.parallel import DistributedDataParallel
from two_ranks import WORLD, run_on_two_ranks

from trainer.config import MoEConfig, TrialConfig
from trainer.data import input_spec
from trainer.models import build_model
from trainer.moe import parallel
from trainer.moe.layer import MoE

DIM = 8
ATOL = 1e-5

LAYER_CASES: dict[str, dict[str, Any]] = {
    "linear top-1, tokens dropped": {"top_k": 1, "capacity_factor": 1.0},
    "linear top-2, BPR off": {"top_k": 2, "capacity_factor": 1.0, "batch_prioritized": False},
    "cosine": {"router": "cosine", "router_dim": 4},
    "l2 + importance/load loss": {"router": "l2", "balance_loss": "importance_load"},
    "expert choice": {"router": "expert_choice", "capacity_factor": 0.75},
    "soft": {"router": "soft", "slots_per_expert": 2},
    "image routing": {"routing": "image", "top_k": 1, "capacity_factor": 1.0},
    "shared expert": {"shared_expert": True, "top_k": 1},
}


def _check_layers(rank: int) -> None:
    group = dist.group.WORLD
    for name, overrides in LAYER_CASES.items():
        cfg = MoEConfig(**{"experts": 4, "mlp_ratio": 2.0, **overrides})
        torch.manual_seed(0)
        reference = MoE(DIM, cfg)
        torch.manual_seed(0)
        sharded = MoE(DIM, cfg, group=group)
        inputs = [
            torch.randn(3, 6, DIM, generator=torch.Generator().manual_seed(10 + r)) for r in range(WORLD)
        ]
        targets = [
            torch.randn(3, 6, DIM, generator=torch.Generator().manual_seed(20 + r)) for r in range(WORLD)
        ]

        x = inputs[rank].clone().requires_grad_()
        out = sharded(x)
        ((out * targets[rank]).sum() + sharded.aux_loss).backward()

        expert_grads: dict[str, torch.Tensor] = {}
        for r in range(WORLD):
            reference.zero_grad()
            x_ref = inputs[r].clone().requires_grad_()
            out_ref = reference(x_ref)
            ((out_ref * targets[r]).sum() + reference.aux_loss).backward()
            for key, param in reference.experts.named_parameters():
                expert_grads[key] = expert_grads.get(key, 0) + param.grad / WORLD
            if r == rank:
                torch.testing.assert_close(out, out_ref, atol=ATOL, rtol=0, msg=f"{name}: output")
                torch.testing.assert_close(x.grad, x_ref.grad, atol=ATOL, rtol=0, msg=f"{name}: input grad")
                torch.testing.assert_close(sharded.aux_loss, reference.aux_loss, msg=f"{name}: aux loss")
                for (key, p), p_ref in zip(
                    sharded.router.named_parameters(), reference.router.parameters(), strict=True
                ):
                    torch.testing.assert_close(
                        p.grad, p_ref.grad, atol=ATOL, rtol=0, msg=f"{name}: router {key}"
                    )
        local = slice(rank * 2, rank * 2 + 2)
        for key, param in sharded.experts.named_parameters():
            assert param.shape[0] == 2, name
            torch.testing.assert_close(
                param.grad, expert_grads[key][local], atol=ATOL, rtol=0, msg=f"{name}: expert grad {key}"
            )


def test_sharded_layer_equals_single_process_layer_for_every_router() -> None:
    run_on_two_ranks(_check_layers)


def _trial() -> TrialConfig:
    # Room for every token, so the two ranks' batches together route exactly like one batch.
    return TrialConfig.model_validate(
        {
            "model": {
                "placement": "last2",
                "moe": {"experts": 4, "top_k": 2, "capacity_factor": 4.0, "balance_loss_weight": 0.0},
            }
        }
    )


def _train_step(
    model: torch.nn.Module,
    ddp: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    group: dist.ProcessGroup | None,
) -> torch.optim.Optimizer:
    optimizer = create_optimizer_v2(model, opt="adamw", lr=1e-2, weight_decay=0.05)
    loss = torch.nn.functional.cross_entropy(ddp(images), labels)
    loss.backward()
    parallel.clip_grad_norm_(model, 0.05, group)  # small enough to clip
    optimizer.step()
    return optimizer


def _check_training_step_and_checkpoints(rank: int) -> None:
    trial, group = _trial(), dist.group.WORLD
    inputs = input_spec(trial.data)
    images = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(8) % 10

    torch.manual_seed(0)
    reference = build_model(trial.model, inputs)
    reference_opt = _train_step(reference, reference, images, labels, None)

    torch.manual_seed(0)
    model = build_model(trial.model, inputs, expert_group=group)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, parallel.expert_parallel_names(model)
    )
    ddp = DistributedDataParallel(model)
    half = slice(rank * 4, rank * 4 + 4)
    optimizer = _train_step(model, ddp, images[half], labels[half], group)

    # One step of DDP + expert parallel training == one step on the whole batch.
    state = parallel.full_model_state(model, group)
    expected = reference.state_dict()
    assert state.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(state[key], expected[key], atol=ATOL, rtol=0, msg=key)
    opt_state = parallel.full_optimizer_state(optimizer, group)["state"]
    for index, per_param in reference_opt.state_dict()["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt_state[index][key], per_param[key], atol=1e-6, rtol=1e-4)
    # Taking a checkpoint leaves the live optimizer state sharded.
    for param in model.parameters():
        assert optimizer.state[param]["exp_avg"].shape == param.shape

    # The gathered checkpoint loads on two ranks (sliced) and on one (whole).
    torch.manual_seed(1)
    resharded = build_model(trial.model, inputs, expert_group=group)
    parallel.load_full_model_state(resharded, state, group)
    for (key, p), p_now in zip(resharded.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p, p_now, msg=key)
    resharded_opt = create_optimizer_v2(resharded, opt="adamw", lr=1e-2, weight_decay=0.05)
    parallel.load_full_optimizer_state(resharded_opt, parallel.full_optimizer_state(optimizer, group), group)
    for p, p_now in zip(resharded.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(resharded_opt.state[p]["exp_avg"], optimizer.state[p_now]["exp_avg"])

    whole = build_model(trial.model, inputs)
    parallel.load_full_model_state(whole, state, None)
    torch.testing.assert_close(whole(images), reference(images), atol=ATOL, rtol=0)


def test_training_step_and_checkpoints_are_world_size_independent() -> None:
    run_on_two_ranks(_check_training_step_and_checkpoints)


def _check_clipping_and_divisibility(rank: int) -> None:
    group = dist.group.WORLD
    layer = MoE(DIM, MoEConfig(experts=4, top_k=1), group=group)
    # Replicated gradients are equal on both ranks; each rank's expert shard has its own.
    for param in layer.router.parameters():
        param.grad = torch.full_like(param, 0.1)
    for param in layer.experts.parameters():
        param.grad = torch.full_like(param, float(rank + 1))
    replicated = sum(p.numel() * 0.1**2 for p in layer.router.parameters())
    per_rank_shard = sum(p.numel() for p in layer.experts.parameters())
    expected = (replicated + per_rank_shard * (1**2 + 2**2)) ** 0.5
    norm = parallel.clip_grad_norm_(layer, 1.0, group)
    assert norm.item() == pytest.approx(expected, rel=1e-5)
    router_grad = next(layer.router.parameters()).grad
    torch.testing.assert_close(router_grad, torch.full_like(router_grad, 0.1 / expected))

    with pytest.raises(ValueError, match="multiple of 2 experts.*expert_parallel: false"):
        MoE(DIM, MoEConfig(experts=3, top_k=1), group=group)


def test_global_gradient_norm_counts_every_shard_and_experts_must_divide_over_ranks() -> None:
    run_on_two_ranks(_check_clipping_and_divisibility)
