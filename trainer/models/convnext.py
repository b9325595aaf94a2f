"""ConvNeXt backbones, hierarchical (timm's ``ConvNeXt``) and isotropic, with MoE pointwise MLPs.

In a ConvNeXt block the MoE layer replaces the pointwise MLP (the two 1x1 convolutions, run
by timm as linear layers over channels-last positions) and the block keeps its depthwise
convolution, layer scale and skip connection: every spatial position is a token, so the
experts are spatially distributed (Videau et al. 2025, Fig. 1b).
"""

from __future__ import annotations

import torch.distributed as dist
from timm.layers import LayerNorm
from timm.models.convnext import ConvNeXt, ConvNeXtBlock, _init_weights
from torch import Tensor, nn

from trainer.config import ModelConfig
from trainer.models import InputSpec
from trainer.models.registry import BackboneSpec
from trainer.moe.layer import MoELayer, build_moe


class SpatialMoE(nn.Module):
    """Runs an MoE layer over the positions of a channels-last feature map ``[B, H, W, C]``.

    It tells the layer the map's (H, W) grid (``MoELayer.grid``, read by the routing analysis)
    at every forward: the stage's resolution follows from the input, so it is taken from the
    map itself rather than re-derived from timm's strides at build time.
    """

    def __init__(self, moe: MoELayer) -> None:
        super().__init__()
        self.moe = moe

    def forward(self, x: Tensor) -> Tensor:
        batch, height, width, channels = x.shape
        self.moe.grid = (height, width)
        return self.moe(x.reshape(batch, height * width, channels)).view(batch, height, width, channels)


class IsotropicConvNeXt(nn.Module):
    """ConvNeXt (iso.) of Liu et al. 2022: a patchify stem, one stage of blocks, no downsampling.

    Built from timm's ``ConvNeXtBlock``, with timm's ConvNeXt initialisation.
    """

    def __init__(
        self,
        depth: int,
        dim: int,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        ls_init_value: float = 1e-6,
    ) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        # Stochastic depth grows linearly with depth (computed in Python: this may run on meta).
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.Sequential(
            *(
                ConvNeXtBlock(dim, mlp_ratio=mlp_ratio, ls_init_value=ls_init_value, drop_path=rate)
                for rate in rates
            )
        )
        self.norm = LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        for name, module in self.named_modules():
            _init_weights(module, name)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem(x))
        return self.head(self.norm(x.mean(dim=(2, 3))))


def _blocks(model: nn.Module) -> list[ConvNeXtBlock]:
    """The model's blocks in network order (block indices of placements count over all stages)."""
    return [module for module in model.modules() if isinstance(module, ConvNeXtBlock)]


def build_convnext(
    cfg: ModelConfig, spec: BackboneSpec, inputs: InputSpec, expert_group: dist.ProcessGroup | None = None
) -> nn.Module:
    """A randomly initialised ConvNeXt shaped by ``spec`` whose ``cfg.moe_blocks`` MLPs are MoE layers.

    Raises:
        ValueError: the image is too small for the backbone's downsampling.
    """
    # timm's ConvNeXt downsamples by 2 between stages, and also in the first stage after a
    # stride-2 stem.
    stride = spec.patch_size * 2 ** (len(spec.depths) - 1) * (2 if spec.patch_size == 2 else 1)
    if inputs.img_size < stride:
        raise ValueError(
            f"{spec.name} downsamples by {stride}, but the dataset's images are {inputs.img_size}px"
        )
    if spec.hierarchical:
        model: nn.Module = ConvNeXt(
            in_chans=inputs.in_chans,
            num_classes=inputs.num_classes,
            depths=spec.depths,
            dims=spec.dims,
            patch_size=spec.patch_size,
            drop_path_rate=cfg.drop_path,
        )
    else:
        model = IsotropicConvNeXt(
            spec.depth,
            spec.dims[0],
            patch_size=spec.patch_size,
            in_chans=inputs.in_chans,
            num_classes=inputs.num_classes,
            mlp_ratio=spec.mlp_ratio,
            drop_path_rate=cfg.drop_path,
        )
    blocks = _blocks(model)
    for index in cfg.moe_blocks:
        block = blocks[index]
        if block.use_conv_mlp:
            raise ValueError("MoE placement needs ConvNeXt blocks with linear (channels-last) MLPs")
        dim = block.norm.normalized_shape[0]
        # The MoE is built with the block's activation (GELU) and routes images by their mean
        # position under `routing: image`: ConvNeXt has no [CLS] token.
        moe = build_moe(dim, cfg.moe, image_token="mean", group=expert_group)
        moe.block_index = index
        block.mlp = SpatialMoE(moe)
    return model

