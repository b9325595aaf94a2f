"""ViT backbones: timm's ``VisionTransformer`` with MoE layers in place of chosen MLPs."""

from __future__ import annotations

from timm.models.vision_transformer import VisionTransformer

from trainer.config import ModelConfig
from trainer.models import InputSpec
from trainer.models.registry import BackboneSpec
from trainer.moe.layer import MoE


def build_vit(cfg: ModelConfig, spec: BackboneSpec, inputs: InputSpec) -> VisionTransformer:
    """A randomly initialised ViT shaped by ``spec`` whose ``cfg.moe_blocks`` MLPs are MoE layers.

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
    for index in cfg.moe_blocks:
        model.blocks[index].mlp = MoE(dim, cfg.moe)
    return model
