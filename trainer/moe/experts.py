"""What experts compute: E MLPs of the shape they replace, run as one batched matmul."""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from torch import Tensor, nn


class Experts(nn.Module):
    """E two-layer MLPs (fc1 → act → drop → fc2 → drop, as timm's ``Mlp``) with stacked weights.

    Parameters: ``w1 [E, dim, hidden]``, ``b1 [E, hidden]``, ``w2 [E, hidden, dim]``, ``b2 [E, dim]``.
    """

    def __init__(
        self,
        experts: int,
        dim: int,
        hidden: int,
        act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
    ) -> None:
        """
        Args:
            experts: number of experts E.
            dim: input and output width.
            hidden: hidden width of each expert.
            act_layer: activation between the two layers (default ``nn.GELU``).
            drop: dropout after the activation and after the output (default 0.0).
        """
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(experts, dim, hidden))
        self.b1 = nn.Parameter(torch.empty(experts, hidden))
        self.w2 = nn.Parameter(torch.empty(experts, hidden, dim))
        self.b2 = nn.Parameter(torch.empty(experts, dim))
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.drop2 = nn.Dropout(drop)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm's ViT init for linear layers; timm's ``init_weights`` also calls this."""
        trunc_normal_(self.w1, std=0.02)
        trunc_normal_(self.w2, std=0.02)
        nn.init.zeros_(self.b1)
        nn.init.zeros_(self.b2)

    def forward(self, x: Tensor) -> Tensor:
        """``[E, capacity, dim]`` → ``[E, capacity, dim]``; expert e sees only ``x[e]``."""
        experts, dim = self.w1.shape[:2]
        if x.ndim != 3 or x.shape[0] != experts or x.shape[2] != dim:
            raise ValueError(f"expected x of shape [{experts}, capacity, {dim}], but got {tuple(x.shape)}")
        h = self.drop1(self.act(torch.baddbmm(self.b1.unsqueeze(1), x, self.w1)))
        return self.drop2(torch.baddbmm(self.b2.unsqueeze(1), h, self.w2))
