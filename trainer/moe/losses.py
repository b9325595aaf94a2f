"""Auxiliary load-balancing losses, unweighted (the model applies ``balance_loss_weight``).

Both take the token-choice router's view of a batch: its probabilities ``[T, E]`` (what the
loss differentiates through) and its choices ``[T, k]``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from trainer.moe.router import RoutingDecision


def switch_balance_loss(probs: Tensor, expert_index: Tensor) -> Tensor:
    """Switch/GShard loss ``E · Σ_i f_i · P_i``: 1 when routing is uniform, up to E when collapsed.

    Args:
        probs: ``[T, E]`` router probabilities; the loss is differentiable through them.
        expert_index: ``[T, k]`` choices, best first; ``f_i`` is the share of tokens whose
            first choice is expert i, before capacity is applied.
    """
    experts = probs.shape[-1]
    fraction = F.one_hot(expert_index[:, 0], experts).to(probs.dtype).mean(dim=0)
    return experts * (fraction * probs.mean(dim=0)).sum()


def _cv_squared(x: Tensor) -> Tensor:
    """Squared coefficient of variation ``(std / mean)²``, 0 for a constant vector."""
    return x.var(unbiased=False) / (x.mean() ** 2 + 1e-10)


def importance_load_loss(
    probs: Tensor, logits: Tensor, noisy_logits: Tensor, expert_index: Tensor, noise_std: float
) -> Tensor:
    """Shazeer et al. (2017) importance + load loss, in V-MoE's form: ``(CV²(imp) + CV²(load)) / 2``.

    0 when routing is uniform, growing as it collapses.

    Args:
        probs: ``[T, E]`` router probabilities; importance is their sum over tokens.
        logits: ``[T, E]`` the router's scores before noise.
        noisy_logits: ``[T, E]`` the scores the choice was made on (``logits`` plus noise).
        expert_index: ``[T, k]`` the choices.
        noise_std: the std of the gate noise. With noise, load is Shazeer's smooth estimate
            ``Σ_t P(expert i stays in token t's top-k under fresh noise)``; without noise it is
            the hard count of assignments, which only reports balance (no gradient).
    """
    importance = probs.sum(dim=0)
    experts = probs.shape[-1]
    top_k = expert_index.shape[-1]
    if noise_std > 0 and top_k < experts:
        # Expert i is chosen when its score beats the k-th best of the others: for a chosen
        # expert that is the (k+1)-th score overall, otherwise the k-th.
        kth = noisy_logits.topk(top_k + 1, dim=-1).values
        chosen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, expert_index, True)
        threshold = torch.where(chosen, kth[:, top_k : top_k + 1], kth[:, top_k - 1 : top_k])
        normal = torch.distributions.Normal(0.0, 1.0)
        load = normal.cdf((logits - threshold) / noise_std).sum(dim=0)
    else:
        load = F.one_hot(expert_index, experts).sum(dim=(0, 1)).to(probs.dtype)
    return 0.5 * (_cv_squared(importance) + _cv_squared(load))


def balance_loss(kind: str, decision: RoutingDecision, noise_std: float) -> Tensor:
    """The ``balance_loss`` a config names, for one routing decision."""
    if kind == "switch":
        return switch_balance_loss(decision.probs, decision.expert_index)
    if kind == "importance_load":
        return importance_load_loss(
            decision.probs, decision.logits, decision.noisy_logits, decision.expert_index, noise_std
        )
    raise ValueError(f"unknown balance loss {kind!r}")
