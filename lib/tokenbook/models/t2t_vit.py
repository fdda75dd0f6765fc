"""T2T-ViT (Tokens-to-Token ViT, Yuan et al., ICCV 2021), registered with timm.

Reference sheet: ``../shared/papers/t2t_vit.md`` (official repo ``yitu-opensource/T2T-ViT`` at ``0f63dc9``).
Written from the sheet's description; key names, shapes and the math follow the official code so that released
``state_dict_ema`` checkpoints load strictly and give the same outputs.

What the official code computes (and this module reproduces by default)
-----------------------------------------------------------------------
- **T2T module**: soft split ``unfold(k=7, s=4, p=2)`` on the image, a T2T layer (width ``token_dim`` = 64),
  re-structurization to an image, ``unfold(3, 2, 1)``, a second T2T layer, ``unfold(3, 2, 1)``, then
  ``project = Linear(64*9 -> D)``. Unfold's feature order is channel-major (``c*k*k + i*k + j``).
- **Performer T2T layer** (``tokens_type='performer'``): ``kqv`` Linear with bias split in the order k | q | v,
  ``m = token_dim * kernel_ratio = 32`` fixed orthogonal random features ``w`` (rows of norm sqrt(m), a frozen
  ``nn.Parameter`` officially; a persistent buffer here, see below), feature map
  ``phi(x) = exp(w x - |x|^2 / 2) / sqrt(m)``, linear
  attention with epsilon 1e-8, residual through v, and two **hard-coded** dropouts of 0.1.
- **Transformer T2T layer** (``tokens_type='transformer'``): one head, qkv without bias, scale
  ``(input width)^-1/2`` (147^-1/2, 576^-1/2; not 64^-1/2), residual through v, MLP ratio 1.
- **Backbone**: pre-norm timm ``Block`` with qkv without bias, ``nn.LayerNorm`` eps 1e-5, a frozen 1-D sinusoid
  position table (a ``requires_grad=False`` parameter officially, counted in the parameter totals as the paper
  does), class token head. Stochastic depth linear over the blocks.

Where we differ (all documented, options where behaviour changes)
----------------------------------------------------------------
- ``qk_scale``: every official registry function except ``t2t_vit_dense`` sets ``qk_scale = embed_dim^-1/2`` when
  called with ``pretrained=True`` (a leftover; that path loads nothing). The released weights were trained and are
  evaluated with the standard ``head_dim^-1/2``, which we always use. The quirk is deliberately not reproduced.
- **Any image size**: the official code hard-codes ``num_patches = (img_size // 16)^2`` and reshapes with
  ``sqrt(L)``, so it fails at e.g. 200 px and for non-square inputs. We compute the token grid from the soft-split
  arithmetic, for square and non-square sizes. ``dynamic_img_size=True`` also accepts inputs of another size at run
  time (position table regenerated or interpolated, ``pos_embed_mode``).
- **Position tables at another size** when loading: ``pos_embed_mode='interpolate'`` (default) resizes the
  checkpoint table bicubically (cls entry kept), which is what the official ``utils.resize_pos_embed`` intends
  (it raises ``NameError`` as released); ``'regenerate'`` keeps the model's own sinusoid table.
- **Autocast**: the official performer casts ``x.float()`` but its einsums still run in half precision under
  autocast and ``|x|^2`` is computed in the input dtype; ``exp`` overflows in fp16 and the losses become NaN
  (official issues #19, #65). ``performer_fp32=True`` (default) computes the random-feature map and the linear
  attention in float32 with autocast disabled. In float32 the two paths are the same math.
  ``performer_fp32=False`` reproduces the official dtype behaviour.
- **Convolution T2T** (``tokens_type='convolution'``, paper Table 7 "T2T-ViT_c-14"): the official constructor
  defines ``soft_split0 = Conv(3->64, 7, 4, 2)``, ``soft_split1 = Conv(64->64, 3, 2, 1)``,
  ``project = Conv(64->D, 3, 2, 1)`` but its ``forward`` is not adapted, so it cannot run. We run the three convs in
  sequence with ``conv_act`` (default GELU, an assumption: the paper does not say) between them.
- **No T2T** (``tokens_type='none'``, Table 7 "T2T-ViT-14 w/o T2T"): the paper does not describe it in the
  available text; we use a ViT hard split (``Conv2d`` with kernel = stride = product of the soft-split strides,
  16 at 224 px), i.e. the plain ViT with the same backbone.
- **Fixed tables as buffers**: ``pos_embed`` and the performers' ``w`` are persistent buffers, not frozen
  parameters (timm expects every parameter to get a gradient). The state-dict keys are the official ones, so
  released checkpoints still load strictly; the paper's / official parameter totals include them:
  ``tokenbook.experiments.t2t_vit.param_counts`` (``total`` = parameters + ``frozen_tables``) gives T2T-ViT-14
  21,545,550 as the paper.
  ``model.parameters()`` alone is 79,744 smaller for T2T-ViT-14 (197 x 384 table + 2 x 32 x 64 features).
- ``forward_features`` returns the normalized token sequence (timm convention); the official one returns the class
  token only. ``forward`` outputs are identical. timm's ``forward_intermediates`` / ``prune_intermediate_layers`` /
  ``feature_info`` (so ``features_only=True`` works, on the final token grid, reduction = product of the soft-split
  strides) are added; ``pretrained_cfg['first_conv']`` is the first layer with weights on the pixels
  (:data:`FIRST_CONV`), ``pool_size`` is None as for timm's ViTs (the features are a token sequence).
- ``T2TViTDense.reset_classifier`` uses the final width (the official one uses the start width, a bug).

Table 6 variants: ``t2t_vit_14_se`` (SE gate after the attention projection), ``t2t_vit_16_ghost`` (ghost q/k/v and
MLP with depthwise 1x1 "cheap" convs), ``t2t_vit_dense`` (dense connections, growth 64, blocks (3, 6, 6, 4)),
``t2t_vit_14_resnext`` (32 heads), ``t2t_vit_14_wide`` (768 wide, 4 deep). Table 7: ``t2t_vit_14_wo_t2t``,
``t2t_vit_c_14``. Small CPU variants for 28/32 px inputs: ``t2t_vit_tiny_fmnist`` and friends (see
``FMNIST_SOFT_SPLIT``).

The paper's ablation sets and the feature / attention read-outs of the notebook ``02_t2t_vit`` are in
:mod:`tokenbook.experiments.t2t_vit`.

Size: about 1,150 lines, over the project's 800-line guide on purpose: one architecture family (the T2T module in
four token types, the backbone with timm's feature API) with 22 registered models and one checkpoint filter; all
variants share the constructor and the key layout the filter relies on. The Table-6 block variants live in
:mod:`tokenbook.models._t2t_vit_blocks` (re-exported here).
"""
from __future__ import annotations

import contextlib
import math
from functools import partial
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Mlp, resample_abs_pos_embed, trunc_normal_, use_fused_attn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Block

from ._t2t_vit_blocks import DenseBlock, GhostAttention, GhostMlp, SEAttention, Transition, _attend

__all__ = [
    "OFFICIAL_SOFT_SPLIT", "FMNIST_SOFT_SPLIT", "FMNIST_SOFT_SPLIT_16", "TOKENS_TYPES", "OFFICIAL_CONFIGS",
    "TokenPerformer", "TokenTransformer", "T2TModule", "T2TViT", "T2TViTDense",
    "SEAttention", "GhostAttention", "GhostMlp", "DenseBlock", "Transition",
    "sinusoid_table", "soft_split_grids", "soft_split_receptive_fields", "token_receptive_field",
    "checkpoint_filter_fn", "load_official_checkpoint",
]

SoftSplit = tuple[int, int, int]  # (kernel, stride, padding)

#: soft splits of the official T2T module: (kernel, stride, padding) of SS0, SS1, SS2
OFFICIAL_SOFT_SPLIT: tuple[SoftSplit, ...] = ((7, 4, 2), (3, 2, 1), (3, 2, 1))

#: soft splits for 28 or 32 px inputs (Fashion-MNIST): total stride 4 like a ViT with 4 px patches.
#: 28 -> 14 -> 7 -> 7 (49 tokens), 32 -> 16 -> 8 -> 8 (64 tokens). SS0 overlaps by 3 px (k5 s2), SS1 by 1
#: (k3 s2), SS2 keeps the grid (k3 s1) and only mixes each token with its 3x3 neighbourhood, as the paper's last
#: soft split does.
FMNIST_SOFT_SPLIT: tuple[SoftSplit, ...] = ((5, 2, 2), (3, 2, 1), (3, 1, 1))

#: coarser soft splits for 28 or 32 px inputs: a 4 x 4 grid of 16 tokens into the backbone (the token count of a ViT
#: with 7 px patches at 28 px), the official SS0/SS1 (k7 s4, k3 s2) followed by a grid-keeping SS2 (k3 s1):
#: 28 -> 7 -> 4 -> 4, 32 -> 8 -> 4 -> 4. The workbook's cpu scale (issue 19): a third of the backbone's tokens, so the
#: ablations train to convergence within the CPU budget.
FMNIST_SOFT_SPLIT_16: tuple[SoftSplit, ...] = ((7, 4, 2), (3, 2, 1), (3, 1, 1))

TOKENS_TYPES = ("performer", "transformer", "convolution", "none")
POS_EMBED_MODES = ("interpolate", "regenerate")
GLOBAL_POOLS = ("token", "avg")
BLOCK_TYPES = ("standard", "se", "ghost")

LayerNorm5 = partial(nn.LayerNorm, eps=1e-5)


def _pair(v: Union[int, Sequence[int]]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(a) for a in v)
    if len(v) != 2:
        raise ValueError(f"img_size must be an int or (height, width), got {v!r}")
    return v  # type: ignore[return-value]


def _check_soft_split(soft_split: Sequence[Sequence[int]]) -> tuple[SoftSplit, ...]:
    out = []
    for i, s in enumerate(soft_split):
        if len(s) != 3 or any(int(a) != a for a in s):
            raise ValueError(f"soft_split[{i}] must be (kernel, stride, padding) integers, got {s!r}")
        k, st, p = (int(a) for a in s)
        if k < 1 or st < 1 or p < 0:
            raise ValueError(f"soft_split[{i}] = {s!r}: need kernel >= 1, stride >= 1, padding >= 0")
        out.append((k, st, p))
    if not out:
        raise ValueError("soft_split needs at least one (kernel, stride, padding) entry")
    return tuple(out)


def soft_split_grids(
    img_size: Union[int, Sequence[int]], soft_split: Sequence[SoftSplit] = OFFICIAL_SOFT_SPLIT
) -> list[tuple[int, int]]:
    """Token grid (h, w) after each soft split: ``n_out = floor((n_in + 2p - k) / s) + 1`` per side.

    Official at 224: [(56, 56), (28, 28), (14, 14)]; at 384: 96, 48, 24; at 200: 50, 25, 13 (the official code
    assumes 200 // 16 = 12 and fails). Raises ValueError when an input is too small for a split.
    """
    h, w = _pair(img_size)
    grids = []
    for i, (k, s, p) in enumerate(_check_soft_split(soft_split)):
        nh, nw = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        if h + 2 * p < k or w + 2 * p < k:
            raise ValueError(
                f"input of {h}x{w} before soft split {i} (kernel {k}, padding {p}) is smaller than the kernel; "
                f"use a larger img_size or smaller soft_split kernels")
        h, w = nh, nw
        grids.append((h, w))
    return grids


def soft_split_receptive_fields(soft_split: Sequence[SoftSplit] = OFFICIAL_SOFT_SPLIT) -> list[dict[str, int]]:
    """Receptive field of one token after each soft split, in input pixels (geometry of the unfolds only).

    Each entry: ``kernel, stride, padding`` of the split, ``rf`` (side of the pixel window a token sees),
    ``jump`` (pixel distance between neighbouring tokens) and ``offset`` (pixel row/col where token 0's window
    starts; negative = inside the padding). Official: rf 7 / 15 / 31, jump 4 / 8 / 16, offset -2 / -6 / -14.
    The T2T layers' attention between soft splits is global, so this is the *local* structure the soft splits add.
    """
    rf, jump, offset, out = 1, 1, 0, []
    for k, s, p in _check_soft_split(soft_split):
        rf = rf + (k - 1) * jump
        offset = offset - p * jump
        jump = jump * s
        out.append(dict(kernel=k, stride=s, padding=p, rf=rf, jump=jump, offset=offset))
    return out


def token_receptive_field(
    row: int, col: int, img_size: Union[int, Sequence[int]], soft_split: Sequence[SoftSplit] = OFFICIAL_SOFT_SPLIT,
    stage: int = -1,
) -> tuple[slice, slice]:
    """Pixel window (rows, cols slices, clipped to the image) that token ``(row, col)`` of soft split ``stage``
    covers. Useful to draw the soft-split receptive fields over an image."""
    h, w = _pair(img_size)
    info = soft_split_receptive_fields(soft_split)[stage]
    gh, gw = soft_split_grids((h, w), soft_split)[stage]
    if not (0 <= row < gh and 0 <= col < gw):
        raise ValueError(f"token ({row}, {col}) is outside the {gh}x{gw} grid of soft split {stage}")
    r0, c0 = info["offset"] + row * info["jump"], info["offset"] + col * info["jump"]
    return slice(max(r0, 0), min(r0 + info["rf"], h)), slice(max(c0, 0), min(c0 + info["rf"], w))


def sinusoid_table(n_position: int, dim: int, device: Any = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Fixed 1-D sinusoid table (1, n_position, dim) as the official ``get_sinusoid_encoding``:
    ``PE[pos, j] = sin(pos / 10000^(2*(j//2)/dim))`` for even j, ``cos(...)`` for odd j (computed in float64)."""
    pos = torch.arange(n_position, dtype=torch.float64, device=device)[:, None]
    j = torch.arange(dim, dtype=torch.float64, device=device)
    base = torch.tensor(10000.0, dtype=torch.float64, device=device)
    angle = pos / torch.pow(base, 2 * torch.div(j, 2, rounding_mode="floor") / dim)
    table = torch.where(j.long() % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.to(dtype).unsqueeze(0)


def _no_autocast(device_type: str):
    """Context that disables autocast on ``device_type`` when it is active (no-op otherwise, e.g. on meta)."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.autocast(device_type=device_type, enabled=False)
    except (RuntimeError, TypeError):  # device types autocast does not know (meta)
        pass
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------------
# T2T layers
# ----------------------------------------------------------------------------------------------------------
class TokenPerformer(nn.Module):
    """Performer T2T layer (official ``Token_performer``; key names ``kqv, proj, norm1, norm2, mlp.0, mlp.2, w``).

    ``dim``: input token width (3*7*7 = 147 or 64*3*3 = 576); ``in_dim``: output width (token_dim, 64).
    Computes ``y = v + drop(proj(linear_attn(LN(x))))``, ``out = y + MLP(LN(y))`` with ``m = in_dim*kernel_ratio``
    positive orthogonal random features. ``dropout`` (0.1 officially, hard-coded there) is applied after ``proj``
    and at the end of the MLP. ``fp32=True`` evaluates the feature map and linear attention in float32 with autocast
    off (safe under AMP); ``False`` reproduces the official dtype behaviour (NaN-prone in fp16).
    """

    def __init__(self, dim: int, in_dim: int = 64, kernel_ratio: float = 0.5, dropout: float = 0.1,
                 fp32: bool = True, eps: float = 1e-8) -> None:
        super().__init__()
        self.emb = in_dim
        self.m = int(in_dim * kernel_ratio)
        if self.m < 1:
            raise ValueError(f"kernel_ratio {kernel_ratio} gives {self.m} random features; use kernel_ratio >= "
                             f"{1 / in_dim:.3g} (the authors recommend >= 0.5)")
        self.fp32 = fp32
        self.epsilon = eps
        self.kqv = nn.Linear(dim, 3 * in_dim)
        self.dp = nn.Dropout(dropout)
        self.proj = nn.Linear(in_dim, in_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(in_dim)
        self.mlp = nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, in_dim), nn.Dropout(dropout))
        # fixed random features: a persistent buffer (official key ``w`` in the state dict; the official code keeps a
        # frozen parameter and counts it, see ``experiments.t2t_vit.frozen_tables``)
        self.register_buffer("w", torch.empty(self.m, in_dim), persistent=True)
        self.reset_random_features()

    @torch.no_grad()
    def reset_random_features(self, generator: Optional[torch.Generator] = None) -> None:
        """Draw ``w``: Gaussian -> orthogonal rows -> scaled by sqrt(m) (row norms sqrt(m)), as the official code."""
        if self.w.is_meta:
            return
        w = torch.randn(self.m, self.emb, generator=generator)
        nn.init.orthogonal_(w)
        self.w.copy_(w * math.sqrt(self.m))

    def prm_exp(self, x: torch.Tensor) -> torch.Tensor:
        """Positive random features ``exp(w x - |x|^2/2) / sqrt(m)`` of (B, T, emb) -> (B, T, m)."""
        if self.fp32:
            x = x.float()
            return torch.exp(x @ self.w.float().t() - 0.5 * (x * x).sum(-1, keepdim=True)) / math.sqrt(self.m)
        # official: |x|^2 in the input dtype, w x via einsum (autocast may run it in half precision)
        xd = (x * x).sum(dim=-1, keepdim=True) / 2
        wtx = torch.einsum("bti,mi->btm", x.float(), self.w)
        return torch.exp(wtx - xd) / math.sqrt(self.m)

    def _kqv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k, q, v = torch.split(self.kqv(x), self.emb, dim=-1)  # official order k | q | v
        return k, q, v

    def _linear_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kp, qp = self.prm_exp(k), self.prm_exp(q)  # (B, T, m)
        vf = v.float()
        # D_t = phi(q_t) . sum_s phi(k_s);  y_t = phi(q_t)^T (sum_s phi(k_s) v_s^T) / (D_t + eps)
        d = torch.einsum("bti,bi->bt", qp, kp.sum(dim=1)).unsqueeze(2)
        kptv = torch.einsum("bin,bim->bnm", vf, kp)  # (B, emb, m)
        return torch.einsum("bti,bni->btn", qp, kptv) / (d + self.epsilon)

    def single_attn(self, x: torch.Tensor) -> torch.Tensor:
        k, q, v = self._kqv(x)
        if self.fp32:
            with _no_autocast(x.device.type):
                y = self._linear_attention(q.float(), k.float(), v.float())
            y = y.to(v.dtype)  # back to the activation dtype (a bf16 model, or what autocast would cast to anyway)
        else:
            y = self._linear_attention(q, k, v)
        return v + self.dp(self.proj(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.single_attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    @torch.no_grad()
    def attention_matrix(self, x: torch.Tensor) -> torch.Tensor:
        """The implicit (B, T, T) attention ``phi(q_t).phi(k_s) / D_t`` for input tokens ``x`` (before norm1)."""
        k, q, _ = self._kqv(self.norm1(x))
        with _no_autocast(x.device.type):
            kp, qp = self.prm_exp(k.float()), self.prm_exp(q.float())
            a = qp @ kp.transpose(1, 2)
            return a / (a.sum(-1, keepdim=True) + self.epsilon)


class TokenTransformerAttention(nn.Module):
    """Single-head attention of the transformer T2T layer: qkv ``dim -> 3*in_dim`` (no bias), scale from the
    *input* width ``(dim // num_heads)^-1/2`` (official quirk), output ``v + proj(attn v)`` (residual through v)."""

    def __init__(self, dim: int, in_dim: int = 64, num_heads: int = 1, qkv_bias: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if in_dim % num_heads:
            raise ValueError(f"token_dim {in_dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.in_dim = num_heads, in_dim
        self.scale = (dim // num_heads) ** -0.5
        self.fused_attn = use_fused_attn()
        self.qkv = nn.Linear(dim, in_dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(in_dim, in_dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.in_dim // self.num_heads).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self._qkv(x)
        y = _attend(q, k, v, self.scale, self.fused_attn, self.attn_drop, self.training)
        y = self.proj_drop(self.proj(y.transpose(1, 2).reshape(b, n, self.in_dim)))
        return v.transpose(1, 2).reshape(b, n, self.in_dim) + y

    @torch.no_grad()
    def attention_matrix(self, x: torch.Tensor) -> torch.Tensor:
        q, k, _ = self._qkv(x)
        return ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1)


class TokenTransformer(nn.Module):
    """Transformer T2T layer (official ``Token_transformer``): ``y = attn(LN(x))``, ``out = y + MLP(LN(y))``.
    Keys ``norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2``. Dropouts are 0 (the official T2T module does not
    forward the model's drop rates)."""

    def __init__(self, dim: int, in_dim: int = 64, num_heads: int = 1, mlp_ratio: float = 1.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TokenTransformerAttention(dim, in_dim=in_dim, num_heads=num_heads)
        self.norm2 = nn.LayerNorm(in_dim)
        self.mlp = Mlp(in_features=in_dim, hidden_features=int(in_dim * mlp_ratio), out_features=in_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    @torch.no_grad()
    def attention_matrix(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, T) attention of the single head for input tokens ``x`` (before norm1)."""
        return self.attn.attention_matrix(self.norm1(x))[:, 0]


_ACTS: dict[str, Callable[[], nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "none": nn.Identity}


class T2TModule(nn.Module):
    """Tokens-to-Token module: soft splits with T2T layers in between, then a projection to ``embed_dim``.

    ``tokens_type``: ``'performer'`` | ``'transformer'`` (official), ``'convolution'`` (paper Table 7, made
    runnable; ``conv_act`` between the convs), ``'none'`` (ViT hard split with patch = product of the strides).
    ``soft_split``: (kernel, stride, padding) per split (``OFFICIAL_SOFT_SPLIT`` by default); n splits give n - 1
    T2T layers named ``attention1 .. attention{n-1}`` and unfolds ``soft_split0 ..``, as the official names.
    ``performer_dropout`` is the official hard-coded 0.1. The token grid follows the input (any size, non-square).
    """

    def __init__(
        self,
        img_size: Union[int, Sequence[int]] = 224,
        tokens_type: str = "performer",
        in_chans: int = 3,
        embed_dim: int = 768,
        token_dim: int = 64,
        soft_split: Sequence[SoftSplit] = OFFICIAL_SOFT_SPLIT,
        kernel_ratio: float = 0.5,
        performer_dropout: float = 0.1,
        performer_fp32: bool = True,
        conv_act: str = "gelu",
    ) -> None:
        super().__init__()
        if tokens_type not in TOKENS_TYPES:
            raise ValueError(f"unknown tokens_type {tokens_type!r}; use one of {TOKENS_TYPES}")
        if conv_act not in _ACTS:
            raise ValueError(f"unknown conv_act {conv_act!r}; use one of {tuple(_ACTS)}")
        self.tokens_type = tokens_type
        self.soft_split = _check_soft_split(soft_split)
        self.in_chans, self.embed_dim, self.token_dim = in_chans, embed_dim, token_dim
        self.img_size = _pair(img_size)
        n = len(self.soft_split)
        if tokens_type in ("performer", "transformer"):
            for i, (k, s, p) in enumerate(self.soft_split):
                setattr(self, f"soft_split{i}", nn.Unfold(kernel_size=k, stride=s, padding=p))
            for i in range(1, n):
                dim = (in_chans if i == 1 else token_dim) * self.soft_split[i - 1][0] ** 2
                if tokens_type == "performer":
                    layer = TokenPerformer(dim, token_dim, kernel_ratio, performer_dropout, performer_fp32)
                else:
                    layer = TokenTransformer(dim, token_dim, num_heads=1, mlp_ratio=1.0)
                setattr(self, f"attention{i}", layer)
            self.project = nn.Linear((in_chans if n == 1 else token_dim) * self.soft_split[-1][0] ** 2, embed_dim)
        elif tokens_type == "convolution":
            for i, (k, s, p) in enumerate(self.soft_split[:-1]):
                setattr(self, f"soft_split{i}", nn.Conv2d(in_chans if i == 0 else token_dim, token_dim, k, s, p))
            k, s, p = self.soft_split[-1]
            self.project = nn.Conv2d(in_chans if n == 1 else token_dim, embed_dim, k, s, p)
            self.act = _ACTS[conv_act]()
        else:
            patch = math.prod(s for _, s, _ in self.soft_split)
            self.project = nn.Conv2d(in_chans, embed_dim, patch, patch)
        self.grid_size = self.grid_for(self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    @property
    def reduction(self) -> int:
        """Total stride of the module in pixels (product of the soft-split strides; 16 officially, 4 for
        ``FMNIST_SOFT_SPLIT``): one final token per ``reduction x reduction`` pixels."""
        return math.prod(s for _, s, _ in self.soft_split)

    @property
    def num_layers(self) -> int:
        """Number of T2T layers (2 officially; 0 for convolution / none)."""
        return len(self.soft_split) - 1 if self.tokens_type in ("performer", "transformer") else 0

    def grid_for(self, img_size: Union[int, Sequence[int]]) -> tuple[int, int]:
        """Final token grid (h, w) for an input of ``img_size``."""
        h, w = _pair(img_size)
        if self.tokens_type == "none":
            patch = math.prod(s for _, s, _ in self.soft_split)
            if h < patch or w < patch:
                raise ValueError(f"input {h}x{w} is smaller than the {patch}px patch of tokens_type='none'")
            return (h // patch, w // patch)
        return soft_split_grids((h, w), self.soft_split)[-1]

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"T2T module expects images (B, {self.in_chans}, H, W), got {tuple(x.shape)}; "
                             f"build the model with in_chans={x.shape[1] if x.ndim == 4 else '?'}")

    def forward_stages(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every intermediate as an image-like tensor (B, C, h, w): ``soft_split{i}`` (unfold output: C = c*k*k in
        unfold's feature order; conv output for 'convolution'), ``attention{i}`` (T2T layer output) and
        ``project`` (final tokens, C = embed_dim). Keys are in data-flow order."""
        self._check_input(x)
        out: dict[str, torch.Tensor] = {}
        b = x.shape[0]
        if self.tokens_type == "none":
            out["project"] = self.project(x)
            return out
        if self.tokens_type == "convolution":
            for i in range(len(self.soft_split) - 1):
                x = self.act(getattr(self, f"soft_split{i}")(x))
                out[f"soft_split{i}"] = x
            out["project"] = self.project(x)
            return out
        grids = soft_split_grids(tuple(x.shape[-2:]), self.soft_split)
        n = len(self.soft_split)
        for i in range(n):
            tokens = getattr(self, f"soft_split{i}")(x)  # (B, C*k*k, L)
            h, w = grids[i]
            out[f"soft_split{i}"] = tokens.reshape(b, -1, h, w)
            tokens = tokens.transpose(1, 2)
            if i < n - 1:
                tokens = getattr(self, f"attention{i + 1}")(tokens)
                x = tokens.transpose(1, 2).reshape(b, -1, h, w)
                out[f"attention{i + 1}"] = x
            else:
                out["project"] = self.project(tokens).transpose(1, 2).reshape(b, -1, h, w)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> tokens (B, h*w, embed_dim), row-major over the final grid."""
        self._check_input(x)
        b = x.shape[0]
        if self.tokens_type == "none":
            return self.project(x).flatten(2).transpose(1, 2)
        if self.tokens_type == "convolution":
            for i in range(len(self.soft_split) - 1):
                x = self.act(getattr(self, f"soft_split{i}")(x))
            return self.project(x).flatten(2).transpose(1, 2)
        grids = soft_split_grids(tuple(x.shape[-2:]), self.soft_split)
        n = len(self.soft_split)
        tokens = x
        for i in range(n):
            tokens = getattr(self, f"soft_split{i}")(x).transpose(1, 2)
            if i < n - 1:
                tokens = getattr(self, f"attention{i + 1}")(tokens)
                x = tokens.transpose(1, 2).reshape(b, -1, *grids[i])
        return self.project(tokens)

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Attention (B, T, T) of each T2T layer (``attention{i}``), T = tokens of the preceding soft split.
        Empty for convolution / none. At 224 px layer 1 has T = 3136 (39 MB per image in fp32)."""
        self._check_input(x)
        if self.tokens_type not in ("performer", "transformer"):
            return {}
        b = x.shape[0]
        grids = soft_split_grids(tuple(x.shape[-2:]), self.soft_split)
        maps = {}
        for i in range(len(self.soft_split) - 1):
            tokens = getattr(self, f"soft_split{i}")(x).transpose(1, 2)
            layer = getattr(self, f"attention{i + 1}")
            maps[f"attention{i + 1}"] = layer.attention_matrix(tokens)
            x = layer(tokens).transpose(1, 2).reshape(b, -1, *grids[i])
        return maps


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------
class T2TViT(nn.Module):
    """T2T-ViT: T2T module + class token + fixed sinusoid table (a persistent buffer) + pre-norm ViT blocks +
    class-token head.

    Args (beyond the usual timm ones):
        tokens_type: 'performer' | 'transformer' | 'convolution' | 'none' (see ``T2TModule``).
        token_dim: width of the T2T layers (64).
        soft_split: (kernel, stride, padding) per soft split (``OFFICIAL_SOFT_SPLIT``; ``FMNIST_SOFT_SPLIT`` at 28/32
            px).
        block_type: 'standard' | 'se' (T2T-ViT-SE) | 'ghost' (T2T-ViT-Ghost).
        kernel_ratio, performer_dropout, performer_fp32: performer options (0.5, 0.1 hard-coded officially, fp32 fix).
        conv_act: activation between convs of tokens_type='convolution'.
        dynamic_img_size: accept inputs whose token grid differs from the built one (table adapted per forward);
            False raises a ValueError naming the fix.
        pos_embed_mode: how a table of another size is adapted, at load and in dynamic forward:
            'interpolate' (bicubic on the grid, cls entry kept, like the official resize helper) or 'regenerate'
            (a fresh sinusoid table for the new length, what building the official model at that size gives).
        drop_rate, attn_drop_rate, drop_path_rate: backbone dropout / attention dropout / stochastic depth (linear).
    """

    def __init__(
        self,
        img_size: Union[int, Sequence[int]] = 224,
        tokens_type: str = "performer",
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        token_dim: int = 64,
        soft_split: Sequence[SoftSplit] = OFFICIAL_SOFT_SPLIT,
        block_type: str = "standard",
        kernel_ratio: float = 0.5,
        performer_dropout: float = 0.1,
        performer_fp32: bool = True,
        conv_act: str = "gelu",
        dynamic_img_size: bool = False,
        pos_embed_mode: str = "interpolate",
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"unknown global_pool {global_pool!r}; use one of {GLOBAL_POOLS}")
        if pos_embed_mode not in POS_EMBED_MODES:
            raise ValueError(f"unknown pos_embed_mode {pos_embed_mode!r}; use one of {POS_EMBED_MODES}")
        if block_type not in BLOCK_TYPES:
            raise ValueError(f"unknown block_type {block_type!r}; use one of {BLOCK_TYPES}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.dynamic_img_size = dynamic_img_size
        self.pos_embed_mode = pos_embed_mode
        self.grad_checkpointing = False
        self.drop_rate = drop_rate
        ctx = torch.device(device) if device is not None else contextlib.nullcontext()
        with ctx:
            self.tokens_to_token = T2TModule(
                img_size=img_size, tokens_type=tokens_type, in_chans=in_chans, embed_dim=embed_dim,
                token_dim=token_dim, soft_split=soft_split, kernel_ratio=kernel_ratio,
                performer_dropout=performer_dropout, performer_fp32=performer_fp32, conv_act=conv_act)
            self.grid_size = self.tokens_to_token.grid_size
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
            # fixed sinusoid table: a persistent buffer (official key ``pos_embed``; counted by
            # ``experiments.t2t_vit.frozen_tables``)
            self.register_buffer("pos_embed", sinusoid_table(self.tokens_to_token.num_patches + 1, embed_dim),
                                 persistent=True)
            self.pos_drop = nn.Dropout(p=drop_rate)
            self._build_blocks(embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                               qkv_bias=qkv_bias, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                               drop_path_rate=drop_path_rate, block_type=block_type)
            self.norm = LayerNorm5(self.num_features)
            self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        # one entry per element of ``blocks`` (timm ViT convention: module, channels, pixel stride)
        r = self.tokens_to_token.reduction
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=c, reduction=r)
                             for i, c in enumerate(self._block_widths)]
        self.init_weights()
        if dtype is not None:
            self.to(dtype)

    def _build_blocks(self, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float, qkv_bias: bool,
                      drop_rate: float, attn_drop_rate: float, drop_path_rate: float, block_type: str) -> None:
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        extra: dict[str, Any] = {}
        if block_type == "se":
            extra["attn_layer"] = SEAttention
        elif block_type == "ghost":
            extra.update(attn_layer=GhostAttention, mlp_layer=GhostMlp)
        self.blocks = nn.ModuleList([
            Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=drop_rate,
                  attn_drop=attn_drop_rate, drop_path=dpr[i], norm_layer=LayerNorm5, **extra)
            for i in range(depth)])
        self._block_widths = [embed_dim] * depth  # output width of each element of ``blocks``

    # -- init / timm plumbing ---------------------------------------------------------------------------
    def init_weights(self) -> None:
        """Official init: trunc_normal(0.02) for every Linear weight and the class token, zero biases, LayerNorm
        1/0; convolutions keep PyTorch's default; the performer's ``w`` is drawn in its constructor."""
        trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^cls_token|pos_embed|tokens_to_token",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            if global_pool not in GLOBAL_POOLS:
                raise ValueError(f"unknown global_pool {global_pool!r}; use one of {GLOBAL_POOLS}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        dev = self.cls_token.device
        self.head = nn.Linear(self.num_features, num_classes, device=dev) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    # -- forward ----------------------------------------------------------------------------------------
    def _pos_embed_for(self, grid: tuple[int, int], x: torch.Tensor) -> torch.Tensor:
        if grid == tuple(self.grid_size):
            return self.pos_embed
        if not self.dynamic_img_size:
            raise ValueError(
                f"input gives a {grid[0]}x{grid[1]} token grid but the model was built for "
                f"{self.grid_size[0]}x{self.grid_size[1]} (img_size={self.tokens_to_token.img_size}); build it with "
                f"img_size=<input size> or dynamic_img_size=True")
        if self.pos_embed_mode == "regenerate":
            return sinusoid_table(grid[0] * grid[1] + 1, self.embed_dim, device=x.device, dtype=self.pos_embed.dtype)
        return resample_abs_pos_embed(self.pos_embed, new_size=list(grid), old_size=list(self.grid_size),
                                      num_prefix_tokens=1, interpolation="bicubic", antialias=False)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> (B, 1 + h*w, D) tokens with class token and position table added (before the blocks)."""
        grid = self.tokens_to_token.grid_for(tuple(x.shape[-2:]))
        x = self.tokens_to_token(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1)
        return self.pos_drop(x + self._pos_embed_for(grid, x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_tokens(x)
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting() and self.training:
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.norm(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, list[int]]] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[list[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]:
        """Outputs of elements of ``blocks`` as timm's ``VisionTransformer.forward_intermediates``.

        ``indices``: an int n takes the last n, a sequence takes those indices, None all. ``output_fmt``: 'NCHW'
        (patch tokens as a (B, C, h, w) map on the final token grid) or 'NLC' (B, h*w, C); the class token is split
        off (returned beside each intermediate with ``return_prefix_tokens``). ``norm`` applies the final norm to
        the intermediates. Returns ``(forward_features output, intermediates)``, or the list only with
        ``intermediates_only``. ``T2TViTDense``: widths differ per element (see ``feature_info``); ``norm=True``
        only applies to elements of the final width and raises ValueError for others.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        if norm:
            bad = [i for i in take_indices if self.feature_info[i]["num_chs"] != self.norm_width]
            if bad:
                raise ValueError(f"norm=True: the final norm is {self.norm_width} wide but blocks {bad} output "
                                 f"{[self.feature_info[i]['num_chs'] for i in bad]} channels (T2TViTDense widths "
                                 f"grow per block); use norm=False for those indices")
        b, _, height, width = x.shape
        gh, gw = self.tokens_to_token.grid_for((height, width))
        x = self.forward_tokens(x)
        blocks = self.blocks if torch.jit.is_scripting() or not stop_early else self.blocks[:max_index + 1]
        intermediates = []
        for i, blk in enumerate(blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting() and self.training:
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        p = self.num_prefix_tokens
        prefix_tokens = [y[:, :p] for y in intermediates]
        intermediates = [y[:, p:] for y in intermediates]
        if output_fmt == "NCHW":
            intermediates = [y.reshape(b, gh, gw, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    @property
    def norm_width(self) -> int:
        """Width of the final norm (``num_features`` unless the model was pruned)."""
        return self.norm.normalized_shape[0] if isinstance(self.norm, nn.LayerNorm) else self.num_features

    def prune_intermediate_layers(self, indices: Union[int, list[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the elements of ``blocks`` after the last of ``indices`` (and the norm / head); returns the kept
        indices (timm convention, used by ``features_only=True``)."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        kept_width = self.feature_info[max_index]["num_chs"]
        if not prune_norm and kept_width != self.norm_width:
            raise ValueError(f"pruning after block {max_index} leaves width {kept_width} but the final norm is "
                             f"{self.norm_width} wide (T2TViTDense); use prune_norm=True (features_only with "
                             f"norm=False)")
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take_indices

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0] if self.global_pool == "token" else x[:, self.num_prefix_tokens:].mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class T2TViTDense(T2TViT):
    """T2T-ViT-Dense (official ``t2t_vit_dense.py``): stages of dense blocks (``block_config``), width growing by
    ``growth_rate`` per block, ``Transition`` (Linear w->w/2 + GELU) between stages; blocks and transitions share
    the ``blocks`` list (official key layout). Final width 584 for the official (128, 64, (3, 6, 6, 4)).

    ``drop_path_mode='official'`` reproduces the official quirk: rates ``linspace(0, drop_path_rate, 12)`` indexed by
    the *stage* (the constructor's unused ``depth`` default is 12); ``'per_block'`` spreads them over all blocks.

    timm features: ``feature_info`` has one entry per element of ``blocks`` with its output width (dense blocks and
    transitions: 192, 256, 320, 160, ... for the official model), so ``features_only=True`` maps have different
    channels per index. ``forward_intermediates(norm=True)`` applies only to elements of the final width and
    ``prune_intermediate_layers`` needs ``prune_norm=True`` when the kept width is not the final norm's (ValueError
    otherwise; ``features_only`` with the default ``norm=False`` always works).
    """

    def __init__(self, growth_rate: int = 64, block_config: Sequence[int] = (3, 6, 6, 4),
                 drop_path_mode: str = "official", **kwargs: Any) -> None:
        if drop_path_mode not in ("official", "per_block"):
            raise ValueError(f"unknown drop_path_mode {drop_path_mode!r}; use 'official' or 'per_block'")
        if kwargs.get("block_type", "standard") != "standard":
            raise ValueError("T2TViTDense supports only block_type='standard'")
        # set before nn.Module.__init__ (read by _build_blocks during the base constructor)
        object.__setattr__(self, "_dense", (int(growth_rate), tuple(int(b) for b in block_config), drop_path_mode))
        super().__init__(**kwargs)

    def _build_blocks(self, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float, qkv_bias: bool,
                      drop_rate: float, attn_drop_rate: float, drop_path_rate: float, block_type: str) -> None:
        growth, config, mode = self._dense
        total = sum(config)
        if mode == "official":
            rates = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        else:
            rates = [x.item() for x in torch.linspace(0, drop_path_rate, total, device="cpu")]
        self.blocks = nn.ModuleList()
        widths: list[int] = []  # output width of each element of ``blocks`` (dense blocks and transitions)
        width, b = embed_dim, 0
        for stage, n in enumerate(config):
            for _ in range(n):
                if width % num_heads:
                    raise ValueError(f"dense width {width} is not divisible by num_heads {num_heads}")
                dp = rates[stage] if mode == "official" else rates[b]
                self.blocks.append(DenseBlock(width, growth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                                              qkv_bias=qkv_bias, proj_drop=drop_rate, attn_drop=attn_drop_rate,
                                              drop_path=dp, norm_layer=LayerNorm5))
                width += growth
                b += 1
                widths.append(width)
            if stage != len(config) - 1:
                self.blocks.append(Transition(width, width // 2))
                width //= 2
                widths.append(width)
        self.num_features = self.head_hidden_size = width
        self._block_widths = widths


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------
_WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "net")


def checkpoint_filter_fn(state_dict: dict[str, Any], model: T2TViT) -> dict[str, torch.Tensor]:
    """Prepare an official T2T-ViT checkpoint for ``model`` and check it matches.

    - unwraps ``state_dict_ema`` (released files) / ``state_dict`` / ``model`` / ``net`` (CIFAR transfer files),
      strips a ``module.`` prefix;
    - adapts ``pos_embed`` of another length (224 weights into a 384 model or any other size) with the model's
      ``pos_embed_mode``;
    - raises ``ValueError`` listing missing keys, unexpected keys and shape mismatches (the classifier ``head.*``
      may differ in shape: timm drops it when ``num_classes`` differs from the checkpoint's 1000).
    """
    for key in _WRAPPER_KEYS:
        if isinstance(state_dict, dict) and key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
            break
    out = {}
    for k, v in state_dict.items():
        if not torch.is_tensor(v):
            continue
        out[k[7:] if k.startswith("module.") else k] = v
    own = model.state_dict()
    pe = out.get("pos_embed")
    if pe is not None and pe.shape != own["pos_embed"].shape:
        n_old = pe.shape[1] - 1 if pe.ndim == 3 else -1
        side = int(round(math.sqrt(max(n_old, 0))))
        if pe.ndim != 3 or pe.shape[-1] != own["pos_embed"].shape[-1] or side * side != n_old:
            pass  # not adaptable (other width, non-square grid): reported below as a shape mismatch
        elif model.pos_embed_mode == "regenerate":
            out["pos_embed"] = own["pos_embed"].clone()
        else:
            out["pos_embed"] = resample_abs_pos_embed(pe, new_size=list(model.grid_size), old_size=[side, side],
                                                      num_prefix_tokens=1, interpolation="bicubic", antialias=False)
    missing = [k for k in own if k not in out]
    unexpected = [k for k in out if k not in own]
    wrong = [f"{k}: checkpoint {tuple(out[k].shape)} vs model {tuple(own[k].shape)}" for k in own
             if k in out and not k.startswith("head.") and out[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        def short(items: list[str], n: int = 12) -> str:
            return str(items[:n])[:-1] + (f", ... ({len(items) - n} more)]" if len(items) > n else "]")
        raise ValueError(
            f"checkpoint does not match {type(model).__name__} (tokens_type="
            f"{model.tokens_to_token.tokens_type!r}, embed_dim={model.embed_dim}): "
            f"missing keys {short(missing)}; unexpected keys {short(unexpected)}; shape mismatches {short(wrong)}. "
            f"Check the model name "
            f"(performer checkpoints have 'attention1.kqv', transformer ones 'attention1.attn.qkv') and the size "
            f"arguments (img_size, in_chans, kernel_ratio, token_dim)")
    return out


def load_official_checkpoint(model: T2TViT, checkpoint: Union[str, dict], weights_only: bool = True) -> T2TViT:
    """Load an official checkpoint (path or dict) into ``model`` strictly, through ``checkpoint_filter_fn``.

    Same result as ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path))`` but also
    for a model built already. Raw training checkpoints of the official ``main.py`` also pickle ``args``
    (an ``argparse.Namespace``); those need ``weights_only=False`` (only for files you trust).
    """
    if isinstance(checkpoint, str):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=weights_only)
    model.load_state_dict(checkpoint_filter_fn(checkpoint, model), strict=True)
    return model


# ----------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------
#: the first layer with weights that sees the pixels, per tokens_type (timm ``first_conv``): the first T2T
#: layer's qkv projection of the unfolded 7x7 patches (after its LayerNorm), the first conv, or the hard-split conv
FIRST_CONV = {"performer": "tokens_to_token.attention1.kqv", "transformer": "tokens_to_token.attention1.attn.qkv",
              "convolution": "tokens_to_token.soft_split0", "none": "tokens_to_token.project"}


def _cfg(**kwargs: Any) -> dict[str, Any]:
    # pool_size None: timm's convention for ViTs (forward_features is a (B, 1 + h*w, D) token sequence, no map)
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.9,
        "interpolation": "bicubic", "fixed_input_size": True, "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD, "first_conv": FIRST_CONV["performer"], "classifier": "head",
        "license": "bsd-3-clause-clear", **kwargs,
    }


def _released(file: str, top1: float, **kwargs: Any) -> dict[str, Any]:
    return _cfg(notes=(f"official release asset {file} (top-1 {top1}); load with "
                       f"pretrained_cfg_overlay=dict(file=<path>)",), **kwargs)


def _fmnist_cfg(**kwargs: Any) -> dict[str, Any]:
    # ours, untrained: the project's licence
    return _cfg(num_classes=10, input_size=(1, 28, 28), crop_pct=1.0, interpolation="bilinear",
                mean=(0.2860,), std=(0.3530,), license="mit", **kwargs)


default_cfgs = generate_default_cfgs({
    "t2t_vit_7.in1k": _released("71.7_T2T_ViT_7.pth.tar", 71.7),
    "t2t_vit_10.in1k": _released("75.2_T2T_ViT_10.pth.tar", 75.2),
    "t2t_vit_12.in1k": _released("76.5_T2T_ViT_12.pth.tar", 76.5),
    "t2t_vit_14.in1k": _released("81.5_T2T_ViT_14.pth.tar", 81.5),
    "t2t_vit_14.in1k_384": _released("83.3_T2T_ViT_14.pth.tar", 83.3, input_size=(3, 384, 384)),
    "t2t_vit_19.in1k": _released("81.9_T2T_ViT_19.pth.tar", 81.9),
    "t2t_vit_24.in1k": _released("82.3_T2T_ViT_24.pth.tar", 82.3),
    "t2t_vit_t_14.in1k": _released("81.7_T2T_ViTt_14.pth.tar", 81.7, first_conv=FIRST_CONV["transformer"]),
    "t2t_vit_t_19.in1k": _released("82.4_T2T_ViTt_19.pth.tar", 82.4, first_conv=FIRST_CONV["transformer"]),
    "t2t_vit_t_24.in1k": _released("82.6_T2T_ViTt_24.pth.tar", 82.6, first_conv=FIRST_CONV["transformer"]),
    "t2t_vit_14_resnext": _cfg(),
    "t2t_vit_14_wide": _cfg(),
    "t2t_vit_14_se": _cfg(),
    "t2t_vit_dense": _cfg(),
    "t2t_vit_16_ghost": _cfg(),
    "t2t_vit_14_wo_t2t": _cfg(first_conv=FIRST_CONV["none"]),
    "t2t_vit_c_14": _cfg(first_conv=FIRST_CONV["convolution"]),
    "t2t_vit_tiny_fmnist": _fmnist_cfg(),
    "t2t_vit_t_tiny_fmnist": _fmnist_cfg(first_conv=FIRST_CONV["transformer"]),
    "t2t_vit_c_tiny_fmnist": _fmnist_cfg(first_conv=FIRST_CONV["convolution"]),
    "t2t_vit_tiny_fmnist_wo_t2t": _fmnist_cfg(first_conv=FIRST_CONV["none"]),
    "t2t_vit_sw_tiny_fmnist": _fmnist_cfg(),
})

#: registry name -> architecture kwargs (the paper's Tables 1, 6, 7 and the small CPU variants)
OFFICIAL_CONFIGS: dict[str, dict[str, Any]] = {
    "t2t_vit_7": dict(tokens_type="performer", embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0),
    "t2t_vit_10": dict(tokens_type="performer", embed_dim=256, depth=10, num_heads=4, mlp_ratio=2.0),
    "t2t_vit_12": dict(tokens_type="performer", embed_dim=256, depth=12, num_heads=4, mlp_ratio=2.0),
    "t2t_vit_14": dict(tokens_type="performer", embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0),
    "t2t_vit_19": dict(tokens_type="performer", embed_dim=448, depth=19, num_heads=7, mlp_ratio=3.0),
    "t2t_vit_24": dict(tokens_type="performer", embed_dim=512, depth=24, num_heads=8, mlp_ratio=3.0),
    "t2t_vit_t_14": dict(tokens_type="transformer", embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0),
    "t2t_vit_t_19": dict(tokens_type="transformer", embed_dim=448, depth=19, num_heads=7, mlp_ratio=3.0),
    "t2t_vit_t_24": dict(tokens_type="transformer", embed_dim=512, depth=24, num_heads=8, mlp_ratio=3.0),
    "t2t_vit_14_resnext": dict(tokens_type="performer", embed_dim=384, depth=14, num_heads=32, mlp_ratio=3.0),
    "t2t_vit_14_wide": dict(tokens_type="performer", embed_dim=768, depth=4, num_heads=12, mlp_ratio=3.0),
    "t2t_vit_14_se": dict(tokens_type="performer", embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0,
                          block_type="se"),
    "t2t_vit_dense": dict(tokens_type="performer", embed_dim=128, depth=12, num_heads=8, mlp_ratio=2.0,
                          growth_rate=64, block_config=(3, 6, 6, 4)),
    "t2t_vit_16_ghost": dict(tokens_type="performer", embed_dim=384, depth=16, num_heads=6, mlp_ratio=3.0,
                             block_type="ghost"),
    "t2t_vit_14_wo_t2t": dict(tokens_type="none", embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0),
    "t2t_vit_c_14": dict(tokens_type="convolution", embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0),
    # small CPU variants for 28/32 px single-channel inputs (deep-narrow default and its ablations)
    "t2t_vit_tiny_fmnist": dict(tokens_type="performer", embed_dim=128, depth=8, num_heads=4, mlp_ratio=2.0,
                                token_dim=32, soft_split=FMNIST_SOFT_SPLIT),
    "t2t_vit_t_tiny_fmnist": dict(tokens_type="transformer", embed_dim=128, depth=8, num_heads=4, mlp_ratio=2.0,
                                  token_dim=32, soft_split=FMNIST_SOFT_SPLIT),
    "t2t_vit_c_tiny_fmnist": dict(tokens_type="convolution", embed_dim=128, depth=8, num_heads=4, mlp_ratio=2.0,
                                  token_dim=32, soft_split=FMNIST_SOFT_SPLIT),
    "t2t_vit_tiny_fmnist_wo_t2t": dict(tokens_type="none", embed_dim=128, depth=8, num_heads=4, mlp_ratio=2.0,
                                       token_dim=32, soft_split=FMNIST_SOFT_SPLIT),
    "t2t_vit_sw_tiny_fmnist": dict(tokens_type="performer", embed_dim=256, depth=2, num_heads=8, mlp_ratio=2.0,
                                   token_dim=32, soft_split=FMNIST_SOFT_SPLIT),
}


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> T2TViT:
    args = dict(OFFICIAL_CONFIGS[variant])
    args.update(kwargs)
    cls = T2TViTDense if variant == "t2t_vit_dense" else T2TViT
    # features_only=True: timm's FeatureGetterNet over forward_intermediates (as timm's ViTs; default last 3 blocks)
    out_indices = args.pop("out_indices", 3)
    return build_model_with_cfg(cls, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **args)


@register_model
def t2t_vit_7(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-7: performer T2T, 256 wide, 7 deep, 4 heads, MLP 512 (4,310,222 params; paper 4.3M, 1.1G)."""
    return _create("t2t_vit_7", pretrained, **kwargs)


@register_model
def t2t_vit_10(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-10: performer T2T, 256 wide, 10 deep (5,889,230 params; README 5.9M, 1.5G)."""
    return _create("t2t_vit_10", pretrained, **kwargs)


@register_model
def t2t_vit_12(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-12: performer T2T, 256 wide, 12 deep (6,941,902 params; paper 6.9M, 1.8G)."""
    return _create("t2t_vit_12", pretrained, **kwargs)


@register_model
def t2t_vit_14(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-14: performer T2T, 384 wide, 14 deep, 6 heads (21,545,550 params; paper 21.5M, 4.8G).
    The tag ``t2t_vit_14.in1k_384`` builds it at 384 px for the 83.3 % checkpoint."""
    return _create("t2t_vit_14", pretrained, **kwargs)


@register_model
def t2t_vit_19(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-19: performer T2T, 448 wide, 19 deep, 7 heads (39,177,422 params; paper 39.2M, 8.5G)."""
    return _create("t2t_vit_19", pretrained, **kwargs)


@register_model
def t2t_vit_24(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-24: performer T2T, 512 wide, 24 deep, 8 heads (64,105,934 params; paper 64.1M, 13.8G)."""
    return _create("t2t_vit_24", pretrained, **kwargs)


@register_model
def t2t_vit_t_14(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT_t-14: transformer T2T, backbone of T2T-ViT-14 (21,541,070 params; paper 21.5M, 6.1G)."""
    return _create("t2t_vit_t_14", pretrained, **kwargs)


@register_model
def t2t_vit_t_19(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT_t-19: transformer T2T, backbone of T2T-ViT-19 (39,172,942 params; paper 39.2M, 9.8G)."""
    return _create("t2t_vit_t_19", pretrained, **kwargs)


@register_model
def t2t_vit_t_24(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT_t-24: transformer T2T, backbone of T2T-ViT-24 (64,101,454 params; paper 64.1M, 15.0G)."""
    return _create("t2t_vit_t_24", pretrained, **kwargs)


@register_model
def t2t_vit_14_resnext(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-ResNeXt (Table 6): T2T-ViT-14 with 32 heads of width 12 (21,545,550 params)."""
    return _create("t2t_vit_14_resnext", pretrained, **kwargs)


@register_model
def t2t_vit_14_wide(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-Wide / T2T-ViT-d768-4 (Tables 6, 7): 768 wide, 4 deep, 12 heads (25,156,302 params)."""
    return _create("t2t_vit_14_wide", pretrained, **kwargs)


@register_model
def t2t_vit_14_se(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-SE (Table 6): T2T-ViT-14 with an SE gate in every attention (21,803,598 params)."""
    return _create("t2t_vit_14_se", pretrained, **kwargs)


@register_model
def t2t_vit_dense(pretrained: bool = False, **kwargs: Any) -> T2TViTDense:
    """T2T-ViT-Dense (Table 6): dense blocks (3, 6, 6, 4), width 128 -> 584, 8 heads (23,647,062 params)."""
    return _create("t2t_vit_dense", pretrained, **kwargs)  # type: ignore[return-value]


@register_model
def t2t_vit_16_ghost(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-Ghost (Table 6): ghost attention and MLP, 384 wide, 16 deep (16,253,262 params)."""
    return _create("t2t_vit_16_ghost", pretrained, **kwargs)


@register_model
def t2t_vit_14_wo_t2t(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-14 without T2T (Table 7): ViT 16x16 hard split + the T2T-ViT-14 backbone (our reading)."""
    return _create("t2t_vit_14_wo_t2t", pretrained, **kwargs)


@register_model
def t2t_vit_c_14(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT_c-14 (Table 7): three convs (kernels 7/3/3, strides 4/2/2) as T2T + the T2T-ViT-14 backbone."""
    return _create("t2t_vit_c_14", pretrained, **kwargs)


@register_model
def t2t_vit_tiny_fmnist(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """Small CPU T2T-ViT for 28/32 px: ``FMNIST_SOFT_SPLIT``, token_dim 32, 128 wide, 8 deep, 4 heads (deep-narrow)."""
    return _create("t2t_vit_tiny_fmnist", pretrained, **kwargs)


@register_model
def t2t_vit_t_tiny_fmnist(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """``t2t_vit_tiny_fmnist`` with transformer T2T layers."""
    return _create("t2t_vit_t_tiny_fmnist", pretrained, **kwargs)


@register_model
def t2t_vit_c_tiny_fmnist(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """``t2t_vit_tiny_fmnist`` with the convolutional T2T (same kernels/strides as the soft splits)."""
    return _create("t2t_vit_c_tiny_fmnist", pretrained, **kwargs)


@register_model
def t2t_vit_tiny_fmnist_wo_t2t(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """``t2t_vit_tiny_fmnist`` without T2T: a plain ViT (4 px hard split) with the same backbone."""
    return _create("t2t_vit_tiny_fmnist_wo_t2t", pretrained, **kwargs)


@register_model
def t2t_vit_sw_tiny_fmnist(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """Shallow-wide counterpart of ``t2t_vit_tiny_fmnist``: 256 wide, 2 deep, 8 heads (same block parameters)."""
    return _create("t2t_vit_sw_tiny_fmnist", pretrained, **kwargs)
