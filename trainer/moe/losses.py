"""Auxiliary load-balancing losses, unweighted (the model applies ``balance_loss_weight``)."""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F


def switch_balance_loss(probs: Tensor, top1: Tensor) -> Tensor:
    """Switch/GShard loss ``E · Σ_i f_i · P_i``: 1.0 when routing is uniform, up to E when collapsed.

    Args:
        probs: ``[T, E]`` router probabilities; the loss is differentiable through them.
        top1: ``[T]`` each token's first-choice expert, before capacity is applied.
    """
    experts = probs.shape[-1]
    fraction = F.one_hot(top1, experts).to(probs.dtype).mean(dim=0)
    return experts * (fraction * probs.mean(dim=0)).sum()
