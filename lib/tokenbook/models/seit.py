"""SeiT token ViTs (``deit_*_token_32``) and the TokenAdapt f/g modules, registered with timm.

Reference sheet: ``../shared/papers/seit_tokenadapt.md`` (sections 1.5, 2.2, 2.3).

Token ViT (official ``models.py`` of naver-ai/seit and naver-ai/tokenadapt, a timm 0.5.4 ``VisionTransformer``)
--------------------------------------------------------------------------------------------------------------
Input: the float embedding map (B, 32, 28, 28) (codebook rows gathered at the ids, then cropped). The patch
projection is replaced by the Stem-Adapter ``Conv2d(32, D, 4, stride 2, padding 1)`` -> 14x14 = 196 tokens, a cls
token is prepended (and carried, with its position embedding) but the head averages the 196 patch tokens, applies
the final LayerNorm, then ``Linear(D, classes)``. :class:`TokenViT` is timm's ``VisionTransformer`` with
``global_pool='avg'``, ``fc_norm=True`` (pool, then norm: the same math) and that stem; the only naming difference
is the final norm, ``norm.*`` officially and ``fc_norm.*`` here, which :func:`checkpoint_filter_fn` renames.

Additions (not in the official model): the model also accepts integer ids (B, H, W) when a codebook is attached
(:meth:`TokenViT.set_codebook`); it centre-crops them to ``img_size`` (official val ``CC``) and gathers the codebook
rows, so evaluation needs no hook. The codebook is a non-persistent buffer and never enters the state dict.

TokenAdapt (Forging Tokens; official ``TokenVisionTransformer.conversion_function`` / ``.reverse_transform``)
------------------------------------------------------------------------------------------------------------
f (``conversion_function``): Linear(32, 384) + a 1-block ViT decoder (fixed 2-D sin-cos positions, pre-LN, qkv
without bias, Tanh MLP, final LN) + ConvTranspose2d(384, 32, 2, 2): (B, 32, 32, 32) tokens -> (B, 32, 64, 64).
g (``reverse_transform``): Conv2d(32, 384, 2, 2) + the same 1-block ViT + Linear(384, 391): (B, 32, 56, 56) ->
(B, 391, 28, 28) code logits; argmax gives ids. :class:`TokenAdapt` keeps the official module names and index
layout (``conversion_function.1.transformer.layers.0.0.fn.to_qkv.weight`` etc.) so a released ``tokenadapt.ckpt``
loads with :func:`load_tokenadapt`. The official code computes attention explicitly; we use
``scaled_dot_product_attention`` when timm's ``use_fused_attn()`` allows (the same math).
"""
from __future__ import annotations

import math
import os
from functools import partial
from typing import Any, Callable, Mapping, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, use_fused_attn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from .t2t_vit import T2TViT

__all__ = [
    "TokenViT", "checkpoint_filter_fn", "load_seit_checkpoint", "sincos_pos_embed_2d", "TokenAdapt",
    "load_tokenadapt", "TOKEN_MODELS", "TokenT2TViT", "TOKEN_SOFT_SPLIT", "embed_token_ids",
]


def embed_token_ids(codebook: Optional[torch.Tensor], ids: torch.Tensor, size: int) -> torch.Tensor:
    """Integer ids (B, H, W) -> centre crop to ``size`` x ``size`` -> codebook rows as a map (B, D, size, size)."""
    if codebook is None:
        raise ValueError("integer ids need a codebook: call model.set_codebook(codebook) or feed embedding maps")
    h, w = ids.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"id grid {h}x{w} is smaller than the model's input {size}x{size}")
    y0, x0 = (h - size) // 2, (w - size) // 2
    ids = ids[..., y0:y0 + size, x0:x0 + size].long()
    if int(ids.max()) >= codebook.shape[0] or int(ids.min()) < 0:
        raise ValueError(f"ids {int(ids.min())}..{int(ids.max())} outside the codebook of {codebook.shape[0]}")
    return codebook[ids].permute(0, 3, 1, 2)


def _checked_codebook(codebook: Optional[torch.Tensor], in_chans: int, device: torch.device) -> Optional[torch.Tensor]:
    if codebook is None:
        return None
    if codebook.ndim != 2 or codebook.shape[1] != in_chans:
        raise ValueError(f"codebook must be (K, {in_chans}), got {tuple(codebook.shape)}")
    return codebook.detach().float().to(device)


# ----------------------------------------------------------------------------------------------------------
# Token ViT
# ----------------------------------------------------------------------------------------------------------
class TokenViT(VisionTransformer):
    """SeiT's token ViT: timm ``VisionTransformer`` + Stem-Adapter conv + mean-pooled head.

    Args (beyond timm's): ``img_size``: side of the (cropped) embedding map (28 for ImageNet tokens); ``in_chans``:
    code dimension (32); ``stem_kernel``/``stem_stride``/``stem_padding``: the Stem-Adapter conv (4/2/1 officially;
    ``stem_stride`` must be 2 for the token count timm derives from ``patch_size=2``); ``codebook``: optional (K, D)
    tensor so that integer ids can be fed directly.
    """

    def __init__(self, img_size: int = 28, in_chans: int = 32, stem_kernel: int = 4, stem_padding: int = 1,
                 codebook: Optional[torch.Tensor] = None, **kwargs: Any) -> None:
        if img_size % 2:
            raise ValueError(f"img_size must be even (the stride-2 stem maps it to img_size/2), got {img_size}")
        if stem_kernel != 2 * stem_padding + 2:
            raise ValueError(f"stem kernel {stem_kernel} with padding {stem_padding} does not halve the map; use "
                             "kernel = 2 * padding + 2 (official: 4 / 1)")
        kwargs.setdefault("global_pool", "avg")
        kwargs.setdefault("fc_norm", True)
        kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=1e-6))
        super().__init__(img_size=img_size, patch_size=2, in_chans=in_chans, **kwargs)
        dev = self.patch_embed.proj.weight.device
        # official: model.patch_embed.proj = nn.Conv2d(32, D, (4, 4), stride=2, padding=1), default PyTorch init
        self.patch_embed.proj = nn.Conv2d(in_chans, self.embed_dim, kernel_size=stem_kernel, stride=2,
                                          padding=stem_padding, device=dev)
        self.token_img_size = img_size
        self.register_buffer("codebook", None, persistent=False)
        if codebook is not None:
            self.set_codebook(codebook)

    def set_codebook(self, codebook: Optional[torch.Tensor]) -> "TokenViT":
        """Attach a (K, in_chans) codebook so that ``forward`` accepts integer ids (None detaches it)."""
        self.codebook = _checked_codebook(codebook, self.in_chans, self.patch_embed.proj.weight.device)
        return self

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Integer ids (B, H, W) -> centre crop to ``img_size`` -> embedding map (B, D, img, img)."""
        return embed_token_ids(self.codebook, ids, self.token_img_size)

    def forward_features(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not x.dtype.is_floating_point:
            x = self.embed_ids(x)
        if x.ndim != 4 or x.shape[1] != self.in_chans or tuple(x.shape[-2:]) != (self.token_img_size,) * 2:
            raise ValueError(f"expected embedding maps (B, {self.in_chans}, {self.token_img_size}, "
                             f"{self.token_img_size}) or integer ids (B, H, W), got {tuple(x.shape)}")
        return super().forward_features(x, *args, **kwargs)

    def forward_intermediates(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """timm's ``forward_intermediates``; also accepts integer ids when a codebook is attached."""
        if not x.dtype.is_floating_point:
            x = self.embed_ids(x)
        return super().forward_intermediates(x, *args, **kwargs)


_TOKENADAPT_PREFIXES = ("conversion_function.", "reverse_transform.")


def _unwrap_state_dict(obj: Any, use_ema: bool = False) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in (("model_ema", "state_dict_ema") if use_ema else ()) + ("model", "state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint is a {type(obj).__name__}, not a state dict (or a dict with 'model')")
    out = {}
    for k, v in obj.items():
        for p in ("module.", "_orig_mod."):
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: TokenViT) -> dict[str, torch.Tensor]:
    """Map an official SeiT / TokenAdapt classifier state dict onto :class:`TokenViT`.

    Unwraps ``{'model': ...}``, strips ``module.``, renames the final ``norm.*`` to ``fc_norm.*``, drops the
    ``conversion_function.*`` / ``reverse_transform.*`` tensors that TokenAdapt's classifier carries (load them into
    :class:`TokenAdapt` with :func:`load_tokenadapt`), resamples ``pos_embed`` to the model's grid, and raises
    ``ValueError`` listing missing / unexpected / mis-shaped keys (SeiT++'s ``models_mtm.py`` checkpoints, a
    different model under the same name, are recognised and named). Classifier shape differences are left to timm.
    """
    sd = _unwrap_state_dict(state_dict)
    if any("word_embeddings" in k or k.startswith("embeddings.") for k in sd):
        raise ValueError("this looks like a SeiT++ (models_mtm.py) checkpoint: it embeds ids with a learned table "
                         "and a 2x2 stem, a different model registered under the same name; it does not fit TokenViT")
    sd = {k: v for k, v in sd.items() if not k.startswith(_TOKENADAPT_PREFIXES)}
    own = model.state_dict()
    if "fc_norm.weight" in own and "fc_norm.weight" not in sd and "norm.weight" in sd:
        sd["fc_norm.weight"] = sd.pop("norm.weight")
        sd["fc_norm.bias"] = sd.pop("norm.bias")
    if "pos_embed" in sd and sd["pos_embed"].shape != own["pos_embed"].shape:
        sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], list(model.patch_embed.grid_size),
                                                 num_prefix_tokens=model.num_prefix_tokens)
    head = ("head.weight", "head.bias")
    missing = sorted(k for k in own if k not in sd)
    unexpected = sorted(k for k in sd if k not in own)
    shapes = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in sd if k in own and k not in head and sd[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        raise ValueError(f"checkpoint does not match {type(model).__name__}: missing keys {missing}, unexpected "
                         f"keys {unexpected}, shape mismatches {shapes}")
    return sd


def load_seit_checkpoint(model: TokenViT, path: Union[str, os.PathLike], use_ema: bool = False,
                         trust_pickle: bool = False) -> TokenViT:
    """Load an official checkpoint (e.g. ``trained-vit.ckpt``, a dict with ``model``) into ``model``.

    Official training saves the non-EMA weights under ``model`` and evaluates those (``use_ema=False``; timm's own
    file loader would prefer ``model_ema``). DeiT-style checkpoints also pickle ``args``; they need
    ``trust_pickle=True`` (``torch.load(weights_only=False)``): only for files you trust.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:
        if trust_pickle:
            raise
        raise ValueError(f"{path}: cannot be read with weights_only=True ({type(e).__name__}); if you trust the "
                         "file (official checkpoints pickle argparse args), pass trust_pickle=True") from e
    sd = checkpoint_filter_fn(_unwrap_state_dict(obj, use_ema), model)
    model.load_state_dict(sd, strict=True)
    return model


def _cfg(**kw: Any) -> dict:
    return {"url": "", "num_classes": 1000, "input_size": (32, 28, 28), "pool_size": None, "crop_pct": 0.875,
            "interpolation": "bicubic", "mean": (0.0,) * 32, "std": (1.0,) * 32, "first_conv": "patch_embed.proj",
            "classifier": "head", "license": "apache-2.0", **kw}


_FM = dict(num_classes=10, input_size=(32, 12, 12), mean=(0.0,) * 32, std=(1.0,) * 32, license="mit")
default_cfgs = generate_default_cfgs({
    # official weights: SeiT release v0.0 (SeiT_weights.tar: trained-vit.ckpt); pass the local file with
    # pretrained_cfg_overlay=dict(file=path) after converting with load_seit_checkpoint (it pickles args)
    "deit_base_token_32.seit_in1k": _cfg(hf_hub_id=None, notes=("SeiT v0.0 release, ImageNet-1k tokens",)),
    "deit_base_token_32.tokenadapt_in1k": _cfg(notes=("gaviotas/tokenadapt v0.0 release",)),
    "deit_small_token_32.untrained": _cfg(),
    "deit_tiny_token_32.untrained": _cfg(),
    "deit_small_token_4.untrained": _cfg(input_size=(4, 28, 28), mean=(0.0,) * 4, std=(1.0,) * 4),
    "deit_base_token_4.untrained": _cfg(input_size=(4, 28, 28), mean=(0.0,) * 4, std=(1.0,) * 4),
    "deit_fm_micro_token_32.untrained": _cfg(**_FM),
    "deit_fm_nano_token_32.untrained": _cfg(**_FM),
    "deit_fm_tiny_token_32.untrained": _cfg(**_FM),
    "t2t_vit_fm_token_32.untrained": _cfg(**_FM, first_conv="tokens_to_token.soft_split0", classifier="head"),
})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> TokenViT:
    # features_only=True: timm's FeatureGetterNet over forward_intermediates (default: the last 3 blocks)
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(TokenViT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs)


def _args(embed_dim: int, depth: int, heads: int, in_chans: int = 32, img_size: int = 28, **kw: Any) -> dict:
    return dict(img_size=img_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth, num_heads=heads,
                mlp_ratio=4, qkv_bias=True, **kw)


@register_model
def deit_tiny_token_32(pretrained: bool = False, **kwargs: Any) -> TokenViT:
    """DeiT-Ti width (192, 12 blocks, 3 heads) on 32-d tokens; not in the official repos (their sizes are S/B)."""
    return _create("deit_tiny_token_32", pretrained, **{**_args(192, 12, 3), **kwargs})


@register_model
def deit_small_token_32(pretrained: bool = False, **kwargs: Any) -> TokenViT:
    """Official ``deit_small_token_32``: D 384, 12 blocks, 6 heads, 32x28x28 input, 4x4/s2 stem."""
    return _create("deit_small_token_32", pretrained, **{**_args(384, 12, 6), **kwargs})


@register_model
def deit_base_token_32(pretrained: bool = False, **kwargs: Any) -> TokenViT:
    """Official ``deit_base_token_32`` (SeiT / TokenAdapt ``models.py``; not SeiT++'s model of the same name)."""
    return _create("deit_base_token_32", pretrained, **{**_args(768, 12, 12), **kwargs})


@register_model
def deit_small_token_4(pretrained: bool = False, **kwargs: Any) -> TokenViT:
    """Official ``deit_small_token_4``: as ``deit_small_token_32`` for 4-d codes."""
    return _create("deit_small_token_4", pretrained, **{**_args(384, 12, 6, in_chans=4), **kwargs})


@register_model
def deit_base_token_4(pretrained: bool = False, **kwargs: Any) -> TokenViT:
    """Official ``deit_base_token_4``: as ``deit_base_token_32`` for 4-d codes."""
    return _create("deit_base_token_4", pretrained, **{**_args(768, 12, 12, in_chans=4), **kwargs})


@register_model
def deit_fm_micro_token_32(pretrained: bool = False, **kwargs: Any) -> TokenViT:
    """Default-data variant (ours) for CPU budgets: as ``deit_fm_nano_token_32`` with D 64, 6 blocks, 4 heads (the
    width/depth/heads of the pixel baseline ``vit_fm_tiny_p4_28``)."""
    return _create("deit_fm_micro_token_32", pretrained, **{**_args(64, 6, 4, img_size=12, num_classes=10), **kwargs})


@register_model
def deit_fm_nano_token_32(pretrained: bool = False, **kwargs: Any) -> TokenViT:
    """Default-data variant (ours): 14x14 token grid centre/random-cropped to 12 (12/14 ~ SeiT's 28/32) -> 6x6 = 36
    tokens; D 128, 6 blocks, 4 heads, 10 classes."""
    return _create("deit_fm_nano_token_32", pretrained, **{**_args(128, 6, 4, img_size=12, num_classes=10), **kwargs})


@register_model
def deit_fm_tiny_token_32(pretrained: bool = False, **kwargs: Any) -> TokenViT:
    """Default-data variant (ours): as ``deit_fm_nano_token_32`` with D 192, 6 blocks, 3 heads."""
    return _create("deit_fm_tiny_token_32", pretrained, **{**_args(192, 6, 3, img_size=12, num_classes=10), **kwargs})


# ----------------------------------------------------------------------------------------------------------
# T2T-ViT on tokens (ours: a composition no paper ran, for the cross-paper notebook)
# ----------------------------------------------------------------------------------------------------------
#: soft splits of a 12 x 12 embedding map: two 3x3 stride-1 re-structurizations, then stride 2 -> 6 x 6 = 36 tokens,
#: the token ViT's count at crop 12 (its stride-2 Stem-Adapter)
TOKEN_SOFT_SPLIT = ((3, 1, 1), (3, 1, 1), (3, 2, 1))


class TokenT2TViT(T2TViT):
    """T2T-ViT whose input is a SeiT embedding map (B, code_dim, S, S) or, with a codebook attached, integer ids.

    Not in any paper (SeiT trains ViTs on tokens; T2T-ViT trains on pixels): the T2T module's soft splits run on the
    embedding map instead of the image, so its progressive tokenization re-structurizes neighbouring codes instead of
    pixels. Everything else is :class:`~tokenbook.models.t2t_vit.T2TViT` (class token, sinusoid table, head). Ids are
    centre-cropped to ``img_size`` as :class:`TokenViT` does; the codebook is a non-persistent buffer.
    """

    def __init__(self, img_size: int = 12, in_chans: int = 32, codebook: Optional[torch.Tensor] = None,
                 **kwargs: Any) -> None:
        kwargs.setdefault("soft_split", TOKEN_SOFT_SPLIT)
        super().__init__(img_size=img_size, in_chans=in_chans, **kwargs)
        self.token_img_size = int(img_size)
        self.register_buffer("codebook", None, persistent=False)
        if codebook is not None:
            self.set_codebook(codebook)

    def set_codebook(self, codebook: Optional[torch.Tensor]) -> "TokenT2TViT":
        """Attach a (K, in_chans) codebook so that ``forward`` accepts integer ids (None detaches it)."""
        self.codebook = _checked_codebook(codebook, self.in_chans, self.cls_token.device)
        return self

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return embed_token_ids(self.codebook, ids, self.token_img_size)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        if not x.dtype.is_floating_point:
            x = self.embed_ids(x)
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected embedding maps (B, {self.in_chans}, H, W) or integer ids (B, H, W), got "
                             f"{tuple(x.shape)}")
        return super().forward_tokens(x)


def _create_t2t(variant: str, pretrained: bool = False, **kwargs: Any) -> TokenT2TViT:
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(TokenT2TViT, variant, pretrained,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs)


@register_model
def t2t_vit_fm_token_32(pretrained: bool = False, **kwargs: Any) -> TokenT2TViT:
    """T2T-ViT on 12 x 12 crops of the default data's 32-d token maps (ours): performer T2T module
    (``TOKEN_SOFT_SPLIT``, token_dim 32) -> 36 tokens; the backbone of ``t2t_vit_tiny_fmnist`` at width 64, depth 6,
    4 heads, MLP ratio 2; 10 classes."""
    args = dict(tokens_type="performer", embed_dim=64, depth=6, num_heads=4, mlp_ratio=2.0, token_dim=32,
                img_size=12, in_chans=32, num_classes=10)
    return _create_t2t("t2t_vit_fm_token_32", pretrained, **{**args, **kwargs})


#: registered names
TOKEN_MODELS = ("deit_tiny_token_32", "deit_small_token_32", "deit_base_token_32", "deit_small_token_4",
                "deit_base_token_4", "deit_fm_micro_token_32", "deit_fm_nano_token_32", "deit_fm_tiny_token_32",
                "t2t_vit_fm_token_32")


# ----------------------------------------------------------------------------------------------------------
# TokenAdapt f / g (official module names and layout)
# ----------------------------------------------------------------------------------------------------------
def sincos_pos_embed_2d(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fixed 2-D sin-cos table (H*W, dim), MAE formula as used by the official ``layers.py``.

    Row-major positions; the first half of the channels encodes the column index (the MAE code meshes ``w`` first
    and calls it ``h``), the second half the row; each half is ``[sin(p * w_k), cos(p * w_k)]`` with
    ``w_k = 10000^(-k / (dim/4))``. No cls slot.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def one(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([one(cols), one(rows)], dim=1).float()


class _PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class _FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _Attention(nn.Module):
    """Multi-head self-attention, qkv without bias, output Linear (Identity for 1 head of full width, as official)."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads, self.scale = heads, dim_head ** -0.5
        self.fused_attn = use_fused_attn()
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Linear(inner, dim) if not (heads == 1 and dim_head == dim) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.to_qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        if self.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1) @ v
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class _Transformer(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([
            nn.ModuleList([_PreNorm(dim, _Attention(dim, heads, dim_head)), _PreNorm(dim, _FeedForward(dim, mlp_dim))])
            for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, ff in self.layers:
            x = x + attn(x)
            x = x + ff(x)
        return self.norm(x)


class _SeqToMap(nn.Module):
    def __init__(self, h: int) -> None:
        super().__init__()
        self.h = h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.transpose(1, 2).reshape(b, c, self.h, n // self.h)


class _MapToSeq(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


def _xavier_init(m: nn.Module) -> None:
    # official layers.init_weights: xavier-uniform linears (bias 0), unit LayerNorms, xavier on flattened conv weights
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.xavier_uniform_(m.weight.data.view(m.weight.shape[0], -1))


class _ViTDecoder(nn.Module):
    """Official ``ViTDecoder``: + fixed positions, transformer, tokens -> map, ConvTranspose2d(patch, patch)."""

    def __init__(self, grid: int, patch: int, dim: int, depth: int, heads: int, mlp_dim: int, channels: int,
                 dim_head: int = 64) -> None:
        super().__init__()
        self.transformer = _Transformer(dim, depth, heads, dim_head, mlp_dim)
        self.de_pos_embedding = nn.Parameter(sincos_pos_embed_2d(dim, (grid, grid))[None], requires_grad=False)
        self.to_pixel = nn.Sequential(_SeqToMap(grid), nn.ConvTranspose2d(dim, channels, patch, stride=patch))
        self.apply(_xavier_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_pixel(self.transformer(x + self.de_pos_embedding))


class _ViTEncoder(nn.Module):
    """Official ``ViTEncoder``: Conv2d(patch, patch) to tokens, + fixed positions, transformer."""

    def __init__(self, grid: int, patch: int, dim: int, depth: int, heads: int, mlp_dim: int, channels: int,
                 dim_head: int = 64) -> None:
        super().__init__()
        self.grid = grid
        self.to_patch_embedding = nn.Sequential(nn.Conv2d(channels, dim, patch, stride=patch), _MapToSeq())
        self.en_pos_embedding = nn.Parameter(sincos_pos_embed_2d(dim, (grid, grid))[None], requires_grad=False)
        self.transformer = _Transformer(dim, depth, heads, dim_head, mlp_dim)
        self.apply(_xavier_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.transformer(self.to_patch_embedding(x) + self.en_pos_embedding)


class TokenAdapt(nn.Module):
    """TokenAdapt's f (``conversion_function``) and g (``reverse_transform``).

    Defaults are the official sizes: 32-d codes on a 32x32 grid (f output 64x64), g input 56x56 -> 28x28 ids over
    391 codes, width 384, 1 block, 6 heads of 64, MLP 1536. For the default data: ``in_grid=14, out_grid=12``.
    The position tables are parameters with ``requires_grad=False`` (as official, so they are in the state dict).
    """

    def __init__(self, code_dim: int = 32, codebook_size: int = 391, in_grid: int = 32, out_grid: int = 28,
                 dim: int = 384, depth: int = 1, heads: int = 6, dim_head: int = 64, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.code_dim, self.codebook_size, self.in_grid, self.out_grid = code_dim, codebook_size, in_grid, out_grid
        mlp = int(dim * mlp_ratio)
        self.conversion_function = nn.Sequential(
            nn.Linear(code_dim, dim),
            _ViTDecoder(in_grid, 2, dim, depth, heads, mlp, code_dim, dim_head))
        self.reverse_transform = nn.Sequential(
            _ViTEncoder(out_grid, 2, dim, depth, heads, mlp, code_dim, dim_head),
            nn.Linear(dim, codebook_size))

    def set_trainable(self, flag: bool = True) -> "TokenAdapt":
        """(Un)freeze f and g; the sin-cos position tables always stay fixed (``requires_grad=False``)."""
        for name, p in self.named_parameters():
            p.requires_grad_(flag and not name.endswith("pos_embedding"))
        return self

    def forward_conversion(self, x: torch.Tensor) -> torch.Tensor:
        """f: token embeddings (B, C, G, G) -> f-space map (B, C, 2G, 2G)."""
        if x.ndim != 4 or x.shape[1] != self.code_dim or tuple(x.shape[-2:]) != (self.in_grid,) * 2:
            raise ValueError(f"f expects (B, {self.code_dim}, {self.in_grid}, {self.in_grid}), got {tuple(x.shape)}")
        return self.conversion_function(x.flatten(2).transpose(1, 2))

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        """g without the argmax: f-space map (B, C, 2m, 2m) -> code logits (B, K, m, m)."""
        s = 2 * self.out_grid
        if x.ndim != 4 or x.shape[1] != self.code_dim or tuple(x.shape[-2:]) != (s, s):
            raise ValueError(f"g expects (B, {self.code_dim}, {s}, {s}) (crop the f-space map to 2 x out_grid), "
                             f"got {tuple(x.shape)}")
        logits = self.reverse_transform(x)                                     # (B, m*m, K)
        return logits.transpose(1, 2).reshape(x.shape[0], self.codebook_size, self.out_grid, self.out_grid)

    def forward_inversion(self, x: torch.Tensor) -> torch.Tensor:
        """g + quantization: argmax ids (B, m, m) (the official code returns their one-hot; gather = one-hot @ E)."""
        return self.forward_logits(x).argmax(dim=1)

    def forward(self, x: torch.Tensor,
                augment: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
        """ids of ``g(augment(f(x)))``; ``augment`` must output 2 x out_grid (default: centre crop)."""
        f = self.forward_conversion(x)
        if augment is None:
            s = 2 * self.out_grid
            y0 = (f.shape[-1] - s) // 2
            f = f[..., y0:y0 + s, y0:y0 + s]
        else:
            f = augment(f)
        return self.forward_inversion(f)


def load_tokenadapt(source: Union[str, os.PathLike, Mapping[str, Any]], module: Optional[TokenAdapt] = None,
                    trust_pickle: bool = False) -> TokenAdapt:
    """Load f/g weights (``tokenadapt.ckpt`` or a classifier checkpoint holding them) into a :class:`TokenAdapt`.

    Only ``conversion_function.*`` / ``reverse_transform.*`` keys are used (the official code loads the file with
    ``strict=False`` into the classifier); a mismatch raises ``ValueError`` listing missing and unexpected keys.
    """
    if isinstance(source, Mapping):
        obj = source
    else:
        try:
            obj = torch.load(source, map_location="cpu", weights_only=not trust_pickle)
        except Exception as e:
            if trust_pickle:
                raise
            raise ValueError(f"{source}: cannot be read with weights_only=True ({type(e).__name__}); pass "
                             "trust_pickle=True for a file you trust") from e
    sd = {k: v for k, v in _unwrap_state_dict(obj).items() if k.startswith(_TOKENADAPT_PREFIXES)}
    if not sd:
        raise ValueError(f"no conversion_function.* / reverse_transform.* tensors in the checkpoint; keys: "
                         f"{sorted(_unwrap_state_dict(obj))[:20]}")
    if module is None:
        # shapes are inferred from these keys: a partial checkpoint is reported like any other mismatch
        needed = ("conversion_function.0.weight", "reverse_transform.1.weight",
                  "conversion_function.1.de_pos_embedding", "reverse_transform.0.en_pos_embedding")
        if any(k not in sd for k in needed):
            with torch.device("meta"):  # key names only (they do not depend on the sizes)
                names = set(TokenAdapt().state_dict())
            raise ValueError(f"TokenAdapt checkpoint does not match: missing keys {sorted(names - set(sd))}, "
                             f"unexpected keys {sorted(set(sd) - names)} (the sizes cannot be inferred without "
                             f"{[k for k in needed if k not in sd]}; pass module= to load a known layout)")
        code_dim = sd["conversion_function.0.weight"].shape[1]
        dim = sd["conversion_function.0.weight"].shape[0]
        k = sd["reverse_transform.1.weight"].shape[0]
        g_in = int(math.isqrt(sd["conversion_function.1.de_pos_embedding"].shape[1]))
        g_out = int(math.isqrt(sd["reverse_transform.0.en_pos_embedding"].shape[1]))
        module = TokenAdapt(code_dim=code_dim, codebook_size=k, in_grid=g_in, out_grid=g_out, dim=dim)
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(f"{k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sd if k in own
                    and sd[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        raise ValueError(f"TokenAdapt checkpoint does not match: missing keys {missing}, unexpected keys {unexpected}, "
                         f"shape mismatches {shapes}")
    module.load_state_dict(sd, strict=True)
    return module
