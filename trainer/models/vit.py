"""ViT backbones: timm's ``VisionTransformer`` with MoE layers in place of chosen MLPs."""

from __future__ import annotations

import torch.distributed as dist
from timm.models.vision_transformer import VisionTransformer

from trainer.config import ModelConfig
from trainer.models import InputSpec
from trainer.models.registry import BackboneSpec
from trainer.moe.layer import build_moe


def build_vit(
    cfg: ModelConfig, spec: BackboneSpec, inputs: InputSpec, expert_group: dist.ProcessGroup | None = None
) -> VisionTransformer:
    """A randomly initialised ViT shaped by ``spec`` whose ``cfg.moe_blocks`` MLPs are MoE layers.

    Under ``routing: image`` the [CLS] token represents the image (ViMoE), or the mean token
    when the model has none.

    Raises:
        ValueError: the image does not tile into whole patches.
    """
    if inputs.img_size % spec.patch_size:
        raise ValueError(
            f"{spec.name} cuts images into {spec.patch_size}px patches, "
            f"but the dataset's images are {inputs.img_size}px"
        )
    dim = spec.dims[0]
    model = VisionTransformer(
        img_size=inputs.img_size,
        patch_size=spec.patch_size,
        in_chans=inputs.in_chans,
        num_classes=inputs.num_classes,
        embed_dim=dim,
        depth=spec.depth,
        num_heads=spec.heads,
        mlp_ratio=spec.mlp_ratio,
        drop_path_rate=cfg.drop_path,
        global_pool=spec.global_pool,
    )
    image_token = "first" if model.num_prefix_tokens else "mean"
    height, width = model.patch_embed.grid_size
    for index in cfg.moe_blocks:
        moe = build_moe(dim, cfg.moe, image_token=image_token, group=expert_group)
        # Where its tokens sit, for the routing analysis: [CLS] first, then the patch grid.
        moe.block_index = index
        moe.prefix_tokens = model.num_prefix_tokens
        moe.grid = (height, width)
        model.blocks[index].mlp = moe
    return model
