"""ToE models: DeiT-T/S/B with ToE's token selection attached (``toe_deit_{tiny,small,base}_patch16_224``), the
official checkpoint reader and the timm registration. The method (``TokenSelect``, the stage hook, schedules) is
:mod:`tokenbook.methods.toe`; importing this module registers the models with timm."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
from timm.models import VisionTransformer, build_model_with_cfg, generate_default_cfgs, register_model

from tokenbook.methods.toe import OFFICIAL_CONFIGS, attach_token_select

__all__ = ["ToEVisionTransformer", "official_state_dict", "toe_deit_tiny_patch16_224", "toe_deit_small_patch16_224",
           "toe_deit_base_patch16_224"]


class ToEVisionTransformer(VisionTransformer):
    """timm ``VisionTransformer`` with ToE attached (``model.token_select``, a hook on one block; no parameters,
    plain DeiT state dict).

    timm conventions: ToE selects tokens only while training with an active stage (``TokenSelect.is_active``), so in
    ``eval()`` (and at stage 0) ``forward_features`` gives the plain ViT's (B, 1 + N, D) and ``forward_head`` pools
    as timm. While a stage is active the blocks after ``block_index`` see fewer tokens: ``forward_features`` returns
    (B, 1 + kept, D) and ``forward_intermediates`` works with ``output_fmt='NLC'`` (kept tokens); 'NCHW' (also used
    by ``features_only=True``) raises ValueError for those blocks, since the kept tokens no longer fill the grid.
    """

    def __init__(self, toe: Optional[dict] = None, block_index: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if toe is None:
            toe = {k: v for k, v in OFFICIAL_CONFIGS["deit_small"].items() if k != "epochs"}
        attach_token_select(self, block_index=block_index, **toe)

    def forward_intermediates(self, x: torch.Tensor, indices: Any = None, *args: Any, **kwargs: Any) -> Any:
        ts = getattr(self, "token_select", None)
        fmt = kwargs.get("output_fmt", args[3] if len(args) > 3 else "NCHW")
        if ts is not None and ts.is_active() and fmt == "NCHW":
            from timm.models._features import feature_take_indices

            take, _ = feature_take_indices(len(self.blocks), indices)
            late = [i for i in take if i >= ts.block_index]
            if late:
                raise ValueError(
                    f"ToE keeps a subset of the tokens after block {ts.block_index} in this training stage "
                    f"(stage {ts.expansion_stage}), so blocks {late} have no full {self.patch_embed.grid_size} "
                    f"grid for output_fmt='NCHW'; use output_fmt='NLC', eval() mode, or indices < {ts.block_index}")
        return super().forward_intermediates(x, indices, *args, **kwargs)


def official_state_dict(checkpoint: Any, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The model state dict of an official ToE (DeiT ``main.py``) checkpoint: a path or the loaded dict.

    The official checkpoint is ``{'model', 'optimizer', 'lr_scheduler', 'epoch', 'model_ema', 'scaler', 'args'}``;
    ``args`` is an ``argparse.Namespace``, which ``torch.load(weights_only=True)`` refuses, so it is allow-listed
    here. ``use_ema`` picks ``model_ema``. ToE adds no parameters: the result is a plain DeiT state dict.
    """
    if not isinstance(checkpoint, dict):
        import argparse

        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    key = "model_ema" if use_ema else "model"
    if key in checkpoint and isinstance(checkpoint[key], dict):
        return dict(checkpoint[key])
    if use_ema:
        raise ValueError(f"checkpoint has no 'model_ema' entry (keys: {sorted(checkpoint)})")
    if all(torch.is_tensor(v) for v in checkpoint.values()):
        return dict(checkpoint)
    raise ValueError(f"checkpoint has no 'model' entry and is not a state dict (keys: {sorted(checkpoint)})")


def _toe_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """timm ``pretrained_filter_fn``: official checkpoint -> timm keys, then an exact key check (ValueError)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    out = checkpoint_filter_fn(official_state_dict(state_dict), model)
    want = set(model.state_dict())
    missing, unexpected = sorted(want - set(out)), sorted(set(out) - want)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match {type(model).__name__}: missing keys {missing}, "
                         f"unexpected keys {unexpected}")
    return out


def _cfg(**kwargs: Any) -> dict[str, Any]:
    # DeiT's evaluation settings; pool_size None as timm's ViTs (forward_features is a token sequence);
    # untrained registrations of this project (MIT); official ToE checkpoints carry their own terms
    return dict(url="", num_classes=1000, input_size=(3, 224, 224), pool_size=None, crop_pct=0.875,
                interpolation="bicubic", fixed_input_size=True, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                first_conv="patch_embed.proj", classifier="head", license="mit", **kwargs)


default_cfgs = generate_default_cfgs({
    "toe_deit_tiny_patch16_224.untrained": _cfg(),
    "toe_deit_small_patch16_224.untrained": _cfg(),
    "toe_deit_base_patch16_224.untrained": _cfg(),
})

_DEIT_ARGS = {"tiny": dict(embed_dim=192, depth=12, num_heads=3), "small": dict(embed_dim=384, depth=12, num_heads=6),
              "base": dict(embed_dim=768, depth=12, num_heads=12)}


def _create_toe_deit(size: str, pretrained: bool, toe: Optional[dict], block_index: int,
                     **kwargs: Any) -> ToEVisionTransformer:
    variant = f"toe_deit_{size}_patch16_224"
    # features_only=True: timm's FeatureGetterNet over forward_intermediates (default: the last 3 blocks)
    out_indices = kwargs.pop("out_indices", 3)
    model = build_model_with_cfg(ToEVisionTransformer, variant, pretrained, pretrained_filter_fn=_toe_filter_fn,
                                 feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), toe=toe,
                                 block_index=block_index, **dict(dict(patch_size=16, **_DEIT_ARGS[size]), **kwargs))
    return model


@register_model
def toe_deit_tiny_patch16_224(pretrained: bool = False, toe: Optional[dict] = None, block_index: int = 0,
                              **kwargs: Any) -> ToEVisionTransformer:
    """DeiT-T with ToE after ``blocks[block_index]``; ``toe`` = TokenSelect arguments (default: official DeiT-S
    script). An official checkpoint loads with ``pretrained=True, pretrained_cfg_overlay=dict(file=path)``."""
    return _create_toe_deit("tiny", pretrained, toe, block_index, **kwargs)


@register_model
def toe_deit_small_patch16_224(pretrained: bool = False, toe: Optional[dict] = None, block_index: int = 0,
                               **kwargs: Any) -> ToEVisionTransformer:
    """DeiT-S with ToE (official run-script configuration by default); see :func:`toe_deit_tiny_patch16_224`."""
    return _create_toe_deit("small", pretrained, toe, block_index, **kwargs)


@register_model
def toe_deit_base_patch16_224(pretrained: bool = False, toe: Optional[dict] = None, block_index: int = 0,
                              **kwargs: Any) -> ToEVisionTransformer:
    """DeiT-B with ToE (DeiT-S run-script configuration by default); see :func:`toe_deit_tiny_patch16_224`."""
    return _create_toe_deit("base", pretrained, toe, block_index, **kwargs)
