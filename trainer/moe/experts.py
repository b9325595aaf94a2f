"""What experts compute: E MLPs of the shape they replace, run as one batched matmul.

Under expert parallelism (a process group of W ranks) each rank holds ``E / W`` of the
experts. The ``[E, capacity, dim]`` buffer every rank fills is exchanged with
``all_to_all_single`` so that each rank receives, from every rank, the slots of its own
experts; the outputs go back the same way. Autograd flows through both exchanges.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from timm.layers import trunc_normal_
from torch import Tensor, nn

# Marks the parameters that live on one rank only: excluded from DDP's all-reduce, and
# handled by trainer.moe.parallel for gradient clipping and checkpoints.
EXPERT_PARALLEL_ATTR = "expert_parallel"


class BatchedLinear(nn.Module):
    """E independent linear maps ``x[e] @ weight[e] + bias[e]``, one ``baddbmm``.

    Named ``weight``/``bias`` so that timm's optimizer factory exempts the bias from weight
    decay, as it does for every other linear layer.
    """

    def __init__(self, experts: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(experts, out_features))

    def forward(self, x: Tensor) -> Tensor:
        return torch.baddbmm(self.bias.unsqueeze(1).to(x.dtype), x, self.weight.to(x.dtype))

    def extra_repr(self) -> str:
        experts, fan_in, fan_out = self.weight.shape
        return f"experts={experts}, in_features={fan_in}, out_features={fan_out}"


class Experts(nn.Module):
    """E two-layer MLPs (fc1 → act → drop → fc2 → drop, as timm's ``Mlp``), optionally sharded.

    Parameters (local experts ``E_l = E / W``): ``fc1.weight [E_l, dim, hidden]``,
    ``fc1.bias [E_l, hidden]``, ``fc2.weight [E_l, hidden, dim]``, ``fc2.bias [E_l, dim]``.
    """

    def __init__(
        self,
        experts: int,
        dim: int,
        hidden: int,
        act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        """
        Args:
            experts: number of experts E, over all ranks.
            dim: input and output width.
            hidden: hidden width of each expert.
            act_layer: activation between the two layers (default ``nn.GELU``).
            drop: dropout after the activation and after the output (default 0.0).
            group: shard the experts over this process group (expert parallelism); None
                keeps all of them here.
        """
        super().__init__()
        self.num_experts = experts
        self.world = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        if experts % self.world:
            raise ValueError(
                f"expert parallelism over {self.world} ranks needs a multiple of {self.world} experts, "
                f"but got {experts}; change experts or set expert_parallel: false"
            )
        self.group = group if self.world > 1 else None
        self.local_experts = experts // self.world
        self.fc1 = BatchedLinear(self.local_experts, dim, hidden)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = BatchedLinear(self.local_experts, hidden, dim)
        self.drop2 = nn.Dropout(drop)
        self.reset_parameters()
        if self.group is not None:
            for param in self.parameters():
                setattr(param, EXPERT_PARALLEL_ATTR, True)
                # Each rank's loss is the mean over its own batch and DDP averages the other
                # gradients over ranks; the all-to-all backward instead *sums* every rank's
                # contribution here, so scale to the same objective, the mean over ranks.
                param.register_hook(lambda grad: grad / self.world)

    @property
    def first_expert(self) -> int:
        """Global index of this rank's first expert."""
        return self.rank * self.local_experts

    def reset_parameters(self) -> None:
        """timm's ViT init for linear layers, drawn for all E experts and sliced to this rank's.

        Drawing the whole set makes a sharded layer hold exactly the weights the unsharded
        layer would, from the same seed.
        """
        local = slice(self.first_expert, self.first_expert + self.local_experts)
        for layer in (self.fc1, self.fc2):
            full = torch.empty((self.num_experts, *layer.weight.shape[1:]), device=layer.weight.device)
            trunc_normal_(full, std=0.02)
            with torch.no_grad():
                layer.weight.copy_(full[local])
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``[E, capacity, dim]`` → ``[E, capacity, dim]``; expert e sees only ``x[e]``.

        Under expert parallelism every rank must call this with the same capacity (the
        training loop gives every rank batches of one size).
        """
        if x.ndim != 3 or x.shape[0] != self.num_experts or x.shape[2] != self.fc1.weight.shape[1]:
            raise ValueError(
                f"expected x of shape [{self.num_experts}, capacity, {self.fc1.weight.shape[1]}], "
                f"but got {tuple(x.shape)}"
            )
        if self.group is None:
            return self._compute(x)
        experts, capacity, dim = x.shape
        # Row block r of the input goes to rank r: the slots of rank r's experts.
        received = self._exchange(x.reshape(self.world, self.local_experts, capacity, dim))
        # [source rank, local expert, slot] → [local expert, source rank · slot]
        local_in = received.transpose(0, 1).reshape(self.local_experts, self.world * capacity, dim)
        local_out = self._compute(local_in)
        back = local_out.view(self.local_experts, self.world, capacity, -1).transpose(0, 1)
        return self._exchange(back).reshape(experts, capacity, -1)

    def expected(self, x: Tensor) -> Tensor:
        """``[n, dim]`` → ``[n, dim]`` through one expert: the compute of n routed assignments.

        For cost accounting (FLOP counting on the meta device): the work of n assignments at
        the expected routing, without the capacity buffer's empty slots.
        """
        return self._compute_one(x.unsqueeze(0)).squeeze(0)

    def _compute_one(self, x: Tensor) -> Tensor:
        h = torch.baddbmm(self.fc1.bias[:1].unsqueeze(1), x, self.fc1.weight[:1])
        return torch.baddbmm(self.fc2.bias[:1].unsqueeze(1), self.act(h), self.fc2.weight[:1])

    def _compute(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))

    def _exchange(self, x: Tensor) -> Tensor:
        x = x.contiguous()
        return dist_fn.all_to_all_single(torch.empty_like(x), x, group=self.group)

    def extra_repr(self) -> str:
        sharding = (
            f", local_experts={self.local_experts}, world={self.world}" if self.group is not None else ""
        )
        return f"experts={self.num_experts}{sharding}"
