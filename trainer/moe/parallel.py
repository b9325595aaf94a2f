"""What data parallel training must do differently when experts are sharded over ranks.

Expert-parallel parameters (marked by :data:`~trainer.moe.experts.EXPERT_PARALLEL_ATTR`) hold
``E / W`` experts on each rank along dimension 0. They must be kept out of DDP's all-reduce,
counted once per rank in the global gradient norm, and gathered to their full size in
checkpoints (so that a checkpoint loads on any number of ranks). Every function here that
takes a ``group`` is a collective: all ranks call it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from trainer.moe.experts import EXPERT_PARALLEL_ATTR


def is_expert_parallel(param: Tensor) -> bool:
    return bool(getattr(param, EXPERT_PARALLEL_ATTR, False))


def expert_parallel_names(model: nn.Module) -> list[str]:
    """Names of the parameters DDP must not all-reduce."""
    return [name for name, param in model.named_parameters() if is_expert_parallel(param)]


def clip_grad_norm_(model: nn.Module, max_norm: float, group: dist.ProcessGroup | None) -> Tensor:
    """Clip to a global norm that counts every rank's experts once; returns that norm.

    Replicated gradients are identical on every rank after DDP's all-reduce; sharded expert
    gradients differ, so their squared norms are summed over ranks. Every rank then applies
    the same coefficient, which keeps the replicated parameters identical.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    replicated = [p.grad for p in params if not is_expert_parallel(p)]
    sharded = [p.grad for p in params if is_expert_parallel(p)]
    device = params[0].grad.device if params else torch.device("cpu")
    squares = torch.zeros(2, device=device, dtype=torch.float32)
    if replicated:
        squares[0] = torch.nn.utils.get_total_norm(replicated).float() ** 2
    if sharded:
        squares[1] = torch.nn.utils.get_total_norm(sharded).float() ** 2
    if group is not None and dist.get_world_size(group) > 1:
        shard_square = squares[1].clone()
        dist.all_reduce(shard_square, group=group)
        squares[1] = shard_square
    total = squares.sum().sqrt()
    torch.nn.utils.clip_grads_with_norm_([p for p in params], max_norm, total)
    return total


def _gather(tensor: Tensor, group: dist.ProcessGroup) -> Tensor:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts).cpu()


def _shard(tensor: Tensor, local: int, group: dist.ProcessGroup | None) -> Tensor:
    if tensor.shape[0] == local:
        return tensor
    rank = dist.get_rank(group) if group is not None else 0
    if tensor.shape[0] != local * (dist.get_world_size(group) if group is not None else 1):
        raise ValueError(
            f"a checkpoint tensor with {tensor.shape[0]} experts does not split into {local} experts per rank"
        )
    return tensor[rank * local : (rank + 1) * local].clone()


def full_model_state(model: nn.Module, group: dist.ProcessGroup | None) -> dict[str, Tensor]:
    """``model.state_dict()`` with every sharded tensor gathered to all E experts (on CPU)."""
    state = model.state_dict()
    if group is None:
        return state
    for name in expert_parallel_names(model):
        state[name] = _gather(state[name], group)
    return state


def load_full_model_state(
    model: nn.Module, state: dict[str, Tensor], group: dist.ProcessGroup | None
) -> None:
    """Load a state of any world size: sharded tensors are sliced to this rank's experts."""
    params = dict(model.named_parameters())
    state = dict(state)
    for name in expert_parallel_names(model):
        state[name] = _shard(state[name], params[name].shape[0], group)
    model.load_state_dict(state)


def _expert_state_ids(optimizer: torch.optim.Optimizer) -> dict[int, Tensor]:
    """Optimizer state-dict ids (its numbering of parameters) of the sharded parameters."""
    ids: dict[int, Tensor] = {}
    index = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            if is_expert_parallel(param):
                ids[index] = param
            index += 1
    return ids


def full_optimizer_state(optimizer: torch.optim.Optimizer, group: dist.ProcessGroup | None) -> dict[str, Any]:
    """``optimizer.state_dict()`` with per-parameter tensors of sharded parameters gathered."""
    state = optimizer.state_dict()
    if group is None:
        return state
    for index, param in _expert_state_ids(optimizer).items():
        # Every rank has state for its shard, or none has (before the first step). The dicts
        # are the optimizer's own (state_dict does not copy them): replace, never mutate.
        per_param = state["state"][index] = dict(state["state"].get(index, {}))
        for key, value in sorted(per_param.items()):
            if isinstance(value, Tensor) and value.shape == param.shape:
                per_param[key] = _gather(value, group)
    return state


def load_full_optimizer_state(
    optimizer: torch.optim.Optimizer, state: dict[str, Any], group: dist.ProcessGroup | None
) -> None:
    """Load an optimizer state of any world size (sharded tensors sliced to this rank)."""
    state = {**state, "state": dict(state["state"])}  # leave the caller's dicts as they are
    for index, param in _expert_state_ids(optimizer).items():
        per_param = state["state"][index] = dict(state["state"].get(index, {}))
        for key, value in per_param.items():
            if isinstance(value, Tensor) and value.ndim == param.ndim and value.shape[1:] == param.shape[1:]:
                per_param[key] = _shard(value, param.shape[0], group)
    optimizer.load_state_dict(state)
