"""Small timm ViTs sized for the default data (Fashion-MNIST, 28 or 32 px) on a CPU.

They are plain timm ``VisionTransformer`` configurations registered under their own names so that notebooks and the
paper families (ViTTM, ToE, Learnable Memory) can share the same baselines: ``timm.create_model("vit_fm_tiny_p4_28")``.
Every keyword of ``VisionTransformer`` can still be overridden.
"""
from __future__ import annotations

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from ..constants import FASHION_MNIST_MEAN, FASHION_MNIST_STD


def _cfg(size: int, **kw):
    return {"url": "", "num_classes": 10, "input_size": (3, size, size), "pool_size": None, "crop_pct": 1.0,
            "interpolation": "bilinear", "mean": (FASHION_MNIST_MEAN,) * 3, "std": (FASHION_MNIST_STD,) * 3,
            "first_conv": "patch_embed.proj", "classifier": "head", "license": "mit", **kw}


default_cfgs = generate_default_cfgs({
    "vit_fm_tiny_p4_28.untrained": _cfg(28),
    "vit_fm_tiny_p7_28.untrained": _cfg(28),
    "vit_fm_small_p4_28.untrained": _cfg(28),
    "vit_fm_tiny_p4_32.untrained": _cfg(32),
    "vit_fm_small_p4_32.untrained": _cfg(32),
})


def _create(variant: str, pretrained: bool = False, **kwargs) -> VisionTransformer:
    # features_only=True: timm's FeatureGetterNet over forward_intermediates, as timm's own ViTs (default: the last
    # 3 blocks; timm's generic default assumes 12 blocks)
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(VisionTransformer, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs)


def _args(img_size: int, embed_dim: int, depth: int, num_heads: int, **kwargs):
    return {"img_size": img_size, "patch_size": 4, "embed_dim": embed_dim, "depth": depth, "num_heads": num_heads,
            "num_classes": 10, **kwargs}


@register_model
def vit_fm_tiny_p4_28(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT, width 64, depth 6, 4 heads, patch 4 at 28 px (49 patches + class token)."""
    return _create("vit_fm_tiny_p4_28", pretrained, **{**_args(28, 64, 6, 4), **kwargs})


@register_model
def vit_fm_tiny_p7_28(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT, width 64, depth 6, 4 heads, patch 7 at 28 px (16 patches + class token): the workbook's cpu scale, about
    3x the training throughput of ``vit_fm_tiny_p4_28`` on a CPU, so that its runs train to a plateau."""
    return _create("vit_fm_tiny_p7_28", pretrained, **{**_args(28, 64, 6, 4), "patch_size": 7, **kwargs})


@register_model
def vit_fm_small_p4_28(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT, width 128, depth 6, 4 heads, patch 4 at 28 px (49 patches + class token)."""
    return _create("vit_fm_small_p4_28", pretrained, **{**_args(28, 128, 6, 4), **kwargs})


@register_model
def vit_fm_tiny_p4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT, width 64, depth 6, 4 heads, patch 4 at 32 px (64 patches + class token)."""
    return _create("vit_fm_tiny_p4_32", pretrained, **{**_args(32, 64, 6, 4), **kwargs})


@register_model
def vit_fm_small_p4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT, width 128, depth 6, 4 heads, patch 4 at 32 px (64 patches + class token)."""
    return _create("vit_fm_small_p4_32", pretrained, **{**_args(32, 128, 6, 4), **kwargs})
