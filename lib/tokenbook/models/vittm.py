"""ViTTM: "Token Turing Machines are Efficient Vision Models" (Jajal et al., WACV 2025), registered with timm.

Reference: ``../shared/papers/vittm.md`` (official code: github.com/pjjajal/EfficientTTMs, ``models/vittm/*``).

The model keeps two token streams of width ``d``:

- **memory** tokens ``M``: a patch embedding of the image (patch ``memory_ps``) plus a learned position table.
  They never pass through self-attention or an MLP (unless ``memory_blocks="mlp"``); they change only through the
  per-layer write.
- **process** tokens ``P``: a second, separate patch embedding (patch ``process_ps``) plus its own position table.
  They go through the ``depth`` standard timm ViT ``Block``s.

Layer ``i`` (as in the official forward, including its quirk that the normalized tensors *replace* the streams)::

    M, P = LN_r[i](M), LN_r[i](P)
    P = fuse_read(read_head[i](source=M, queries=P), P)
    P = Block[i](P)
    M, P = LN_w[i](M), LN_w[i](P)
    M = fuse_write(write_head[i](source=P, queries=M), M)
    M = memory_block[i](M)

After the last layer ``P = process_norm(P)`` (the memory stream's final norm is Identity, as timm sets it for
``global_pool="avg"``). There is no class token: each stream is mean-pooled, normalized (``fc_norm`` /
``fc_norm_process``) and classified by its own zero-initialized linear head. The official training loss is the sum
of the criterion on both heads, and the official training script (``train_lt.py``) picks its best checkpoints
(``best_performing.pth``, ``best_ema.pth``) by the memory head's top-1.

Outputs follow timm's convention for two-head models (distilled DeiT):

- ``eval()``: **one tensor**, the ``eval_head`` (default ``"memory"``, the official checkpoint-selection head, so
  timm's validation of a released checkpoint measures the head it was selected by; ``eval_head="process"`` picks
  the other). ``forward_features`` then returns that stream's tokens ``[B, N, d]`` and ``forward_head`` its logits
  (``pre_logits=True``: its pooled, normalized features ``[B, d]``).
- training mode, or ``set_all_heads(True)`` (attribute ``return_all_heads``): both, memory first:
  ``forward`` -> ``(memory_logits, process_logits)``, ``forward_features`` -> ``(memory tokens, process tokens)``.
  ``tokenbook.train.fit`` / ``evaluate`` use this switch to report both heads.

Feature extraction follows timm's ViT: ``forward_intermediates`` returns the **process tokens** after each layer (the
stream the blocks process, as the official segmentation backbone takes them; ``stream="memory"`` / ``"both"`` on
request), ``feature_info`` describes them (``num_chs`` d, ``reduction`` process_ps), ``prune_intermediate_layers``
drops later layers and ``timm.create_model(name, features_only=True, out_indices=...)`` wraps the model in timm's
``FeatureGetterNet``. ``group_matcher`` groups the stem, one group per layer and the classifiers.

Module and parameter names are the official ones (including ``la``'s ``norm``/``norm_q``/``mlp``/``mlp2`` and
``mem_blocks``), and so are the LayerNorm epsilons and the train-mode dropouts (``pos_drop`` on both streams,
``proj_drop_rate`` in the memory MLP blocks, ``drop_rate`` in the ``tl`` heads' MLPs), so official checkpoints of
every head, fusion and memory-block option load strictly and compute the same function.

Where this implementation differs from the official code (all on purpose, none changes the math of the released
configuration):

- Parameters the official model creates but never uses in ``forward`` are not created: timm's ``cls_token``,
  ``pos_embed``, the 16x16 ``patch_embed`` and the ``lin`` heads' ``proj``. ``checkpoint_filter_fn`` drops them from
  official state dicts, so the used-parameter counts equal the official ones (ViTTM-S 29,262,800; ViTTM-B 111,607,760)
  and training needs no ``find_unused_parameters``.
- The ``latent`` process embedder (learned process tokens, not computed from the image) works; in the official code it
  cannot be constructed (TypeError). The official ``downsample`` embedder, ``dyna`` head and ``conv`` memory block
  cannot be built in the official code either; they are rejected here with a ValueError.
- Bad input raises ``ValueError`` naming the fix (patch sizes that do not divide the image, unknown option strings,
  a ``latent_size_scale`` that does not split across heads, checkpoints that do not match the model).

Read/write maps, memory diagnostics and the ablation settings of the notebook ``01_vittm`` are in
:mod:`tokenbook.experiments.vittm`.

Size: about 1000 lines, over the 800-line guide: one architecture with five read/write heads, three fusions and two
memory-block kinds, timm's two-head and feature-extraction APIs, its checkpoint filter and nine registered variants.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm, Mlp, PatchEmbed, resample_abs_pos_embed, to_2tuple, trunc_normal_, use_fused_attn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block

from ..constants import FASHION_MNIST_MEAN, FASHION_MNIST_STD

__all__ = [
    "ViTTM", "LinearAttentionHead", "TokenLearnerHead", "CrossAttentionHead", "LatentAttentionHead",
    "LatentCrossAttentionHead", "Fusion", "MemoryMlpBlock", "RW_HEAD_TYPES", "FUSION_TYPES", "MEMORY_BLOCK_TYPES",
    "PROCESS_EMBEDDER_TYPES", "PAPER_CONFIG", "checkpoint_filter_fn", "load_official_checkpoint", "vittm_loss",
    "MODEL_NAMES",
]

RW_HEAD_TYPES = ("lin", "tl", "ca", "la", "lca")
FUSION_TYPES = ("residual", "erase", "add_erase")
MEMORY_BLOCK_TYPES = ("none", "mlp")
PROCESS_EMBEDDER_TYPES = ("patch", "latent")

#: Options that exist in the official code but cannot be constructed there (reference sheet §1.3, §1.7, §1.10).
_OFFICIAL_BROKEN = {
    "rw_head_type": {"dyna": "the official 'dyna' head cannot be built (KeyError 'dyna_concat' in the official code)"},
    "memory_blocks": {"conv": "the official 'conv' memory block cannot be built (TypeError in the official code)"},
    "process_embedder_type": {
        "downsample": "the official 'downsample' embedder crashes on the NHWC tokens it receives (unpack error)"},
}

#: The README / paper architecture flags for both ViTTM-S and ViTTM-B (reference sheet §1.2, §6).
PAPER_CONFIG: dict[str, Any] = dict(
    memory_ps=28, process_ps=28, rw_head_type="lin", latent_size_scale=4, fusion_type="residual",
    memory_blocks="none", process_embedder_type="patch",
)


def _check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value in _OFFICIAL_BROKEN.get(name, {}):
        raise ValueError(f"{name}={value!r} is not supported: {_OFFICIAL_BROKEN[name][value]}; "
                         f"choose one of {tuple(choices)}")
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {tuple(choices)}")
    return value


# ----------------------------------------------------------------------------------------------------------------------
# Read / write heads. Call signature of every head: head(source X [B,N,d], queries Y [B,M,d]) -> [B,M,d].
# Read calls head(M-stream, P-stream); write calls head(P-stream, M-stream).
# ``attention_map(source, queries)`` returns the explicit mixing weights [B, heads, M, N] (tl: [B, 1, M, N+M]).
# ----------------------------------------------------------------------------------------------------------------------
class LinearAttentionHead(nn.Module):
    """``lin``: linear attention with the feature map ``phi(x) = elu(x) + 1`` (the paper's read/write head).

    ``Q = Y Wq`` and ``K = X Wk`` have width ``c = dim / latent_size_scale``; ``V = X Wv`` keeps width ``dim``. All
    three are split into ``num_heads`` heads; per head
    ``out_m = sum_n phi(q_m).phi(k_n) v_n / (sum_n phi(q_m).phi(k_n) + eps)``, computed in the associative order
    ``phi(Q) (phi(K)^T V)`` so the cost is linear in both token counts. The heads are concatenated back to ``dim``.
    As in the official code there is no scaling, no LayerNorm and **no output projection** (the official module
    creates a ``proj`` Linear that ``forward`` never uses; it is not created here).
    """

    def __init__(self, dim: int, num_heads: int, latent_size_scale: int = 1, qkv_bias: bool = True, eps: float = 1e-6):
        super().__init__()
        if dim % latent_size_scale:
            raise ValueError(f"latent_size_scale={latent_size_scale} does not divide the width {dim}; "
                             f"use a divisor of {dim} (the README uses 4)")
        latent = dim // latent_size_scale
        if latent % num_heads or dim % num_heads:
            raise ValueError(f"the lin head's Q/K width c = {dim}/{latent_size_scale} = {latent} does not split across "
                             f"{num_heads} heads; choose latent_size_scale so that "
                             "(dim / latent_size_scale) % num_heads == 0")
        self.num_heads, self.latent_dim, self.eps = num_heads, latent, eps
        self.q = nn.Linear(dim, latent, bias=qkv_bias)
        self.k = nn.Linear(dim, latent, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)

    def _features(self, source: torch.Tensor, queries: torch.Tensor):
        B, N, D = source.shape
        M, h = queries.shape[1], self.num_heads
        q = F.elu(self.q(queries)).add(1.0).view(B, M, h, -1)
        k = F.elu(self.k(source)).add(1.0).view(B, N, h, -1)
        v = self.v(source).view(B, N, h, D // h)
        return q, k, v

    def forward(self, source: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        q, k, v = self._features(source, queries)
        kv = torch.einsum("bnhc,bnhe->bhce", k, v)                        # phi(K)^T V per head
        denom = torch.einsum("bmhc,bhc->bmh", q, k.sum(dim=1)) + self.eps  # phi(q_m) . sum_n phi(k_n)
        out = torch.einsum("bmhc,bhce->bmhe", q, kv) / denom.unsqueeze(-1)
        return out.reshape(queries.shape[0], queries.shape[1], -1)

    def attention_map(self, source: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Explicit weights ``A[b, h, m, n] = phi(q_m).phi(k_n) / (sum_n' phi(q_m).phi(k_n') + eps)``.

        ``forward`` equals ``A V`` (per head, heads concatenated)."""
        q, k, _ = self._features(source, queries)
        a = torch.einsum("bmhc,bnhc->bhmn", q, k)
        return a / (a.sum(dim=-1, keepdim=True) + self.eps)


class TokenLearnerHead(nn.Module):
    """``tl``: TokenLearner-style summarization (as in Token Turing Machines).

    ``Z = [X; Y]`` (``N + M`` tokens) -> LayerNorm (eps 1e-5) -> MLP ``dim -> M -> M`` with GELU -> transpose and
    softmax over the ``N + M`` tokens -> weights ``W [M, N+M]`` -> output ``W Z`` (the un-normalized tokens). The
    output count and the bottleneck both equal the query-stream token count ``num_out``, fixed at construction
    (official code). ``drop``: dropout after both MLP layers (timm ``Mlp``); the official model passes its
    ``drop_rate``.
    """

    def __init__(self, dim: int, num_out: int, drop: float = 0.0):
        super().__init__()
        self.num_out = num_out
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, hidden_features=num_out, out_features=num_out, act_layer=nn.GELU, drop=drop)

    def attention_map(self, source: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        if queries.shape[1] != self.num_out:
            raise ValueError(f"the tl head was built for {self.num_out} output tokens but got {queries.shape[1]}; "
                             "its MLP is sized by the token count, so build the model at this image size")
        z = torch.cat([source, queries], dim=1)
        return self.mlp(self.norm(z)).transpose(1, 2).softmax(dim=-1).unsqueeze(1)  # [B, 1, M, N+M]

    def forward(self, source: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        w = self.attention_map(source, queries).squeeze(1)
        return w @ torch.cat([source, queries], dim=1)


class CrossAttentionHead(nn.Module):
    """``ca``: multi-head softmax cross-attention; q from Y, k/v from X, each a ``dim -> dim`` Linear followed by a
    LayerNorm over the full width (eps 1e-5); scale ``(dim/heads)^-0.5``; output Linear ``dim -> dim``.
    ``latent_size_scale`` is ignored, as in the official code."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} does not split across {num_heads} heads")
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.fused_attn = use_fused_attn()
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=qkv_bias) for _ in range(3))
        self.q_norm, self.k_norm, self.v_norm = (nn.LayerNorm(dim, eps=1e-5) for _ in range(3))
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, source: torch.Tensor, queries: torch.Tensor):
        B, N, D = source.shape
        M, h = queries.shape[1], self.num_heads
        q = self.q_norm(self.q(queries)).view(B, M, h, -1).transpose(1, 2)
        k = self.k_norm(self.k(source)).view(B, N, h, -1).transpose(1, 2)
        v = self.v_norm(self.v(source)).view(B, N, h, -1).transpose(1, 2)
        return q, k, v

    def attention_map(self, source: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        q, k, _ = self._qkv(source, queries)
        return ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)

    def forward(self, source: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(source, queries)
        if self.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(queries.shape[0], queries.shape[1], -1))


class LatentAttentionHead(nn.Module):
    """``la``: single-head "latent attention" with ``c = dim / latent_size_scale`` latents.

    ``A = softmax_c(mlp2(norm_q(Y))) [M, c]``, ``B = softmax_N(mlp(norm(X))^T) [c, N]``; each MLP is
    ``dim -> 64 -> c`` with GELU; the values are the raw source tokens (no projection): output ``A (B X)``; explicit
    map ``A B [M, N]``. Module names are the official ones (``norm``/``mlp`` for the source, ``norm_q``/``mlp2``
    for the queries), so official checkpoints load unchanged."""

    def __init__(self, dim: int, latent_size_scale: int = 1, hidden: int = 64):
        super().__init__()
        if dim % latent_size_scale:
            raise ValueError(f"latent_size_scale={latent_size_scale} does not divide the width {dim}")
        latent = dim // latent_size_scale
        self.norm, self.norm_q = nn.LayerNorm(dim, eps=1e-5), nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, hidden_features=hidden, out_features=latent, act_layer=nn.GELU)   # source tokens
        self.mlp2 = Mlp(dim, hidden_features=hidden, out_features=latent, act_layer=nn.GELU)  # query tokens

    def _factors(self, source: torch.Tensor, queries: torch.Tensor):
        a = self.mlp2(self.norm_q(queries)).softmax(dim=-1)                  # [B, M, c]
        b = self.mlp(self.norm(source)).transpose(1, 2).softmax(dim=-1)      # [B, c, N]
        return a, b

    def attention_map(self, source: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        a, b = self._factors(source, queries)
        return (a @ b).unsqueeze(1)

    def forward(self, source: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        a, b = self._factors(source, queries)
        return a @ (b @ source)


class LatentCrossAttentionHead(nn.Module):
    """``lca``: multi-head latent cross-attention (efficient-attention style).

    ``q = LN_c(Y Wq)``, ``k = LN_c(X Wk)`` of width ``c = dim / latent_size_scale``, ``v = LN_d(X Wv)``; per head,
    softmax of q over its ``c/h`` features and of k over the N tokens, ``out = q (k^T v)``; heads concatenated, output
    Linear."""

    def __init__(self, dim: int, num_heads: int, latent_size_scale: int = 1, qkv_bias: bool = True):
        super().__init__()
        if dim % latent_size_scale:
            raise ValueError(f"latent_size_scale={latent_size_scale} does not divide the width {dim}")
        latent = dim // latent_size_scale
        if latent % num_heads or dim % num_heads:
            raise ValueError(f"the lca head's Q/K width c = {latent} does not split across {num_heads} heads; "
                             "choose latent_size_scale so that (dim / latent_size_scale) % num_heads == 0")
        self.num_heads = num_heads
        self.q, self.k = nn.Linear(dim, latent, bias=qkv_bias), nn.Linear(dim, latent, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.q_norm, self.k_norm = nn.LayerNorm(latent, eps=1e-5), nn.LayerNorm(latent, eps=1e-5)
        self.v_norm = nn.LayerNorm(dim, eps=1e-5)
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, source: torch.Tensor, queries: torch.Tensor):
        B, N, _ = source.shape
        M, h = queries.shape[1], self.num_heads
        q = self.q_norm(self.q(queries)).view(B, M, h, -1).softmax(dim=-1)   # over each head's features
        k = self.k_norm(self.k(source)).view(B, N, h, -1).softmax(dim=1)     # over the N tokens
        v = self.v_norm(self.v(source)).view(B, N, h, -1)
        return q, k, v

    def attention_map(self, source: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        q, k, _ = self._qkv(source, queries)
        return torch.einsum("bmhc,bnhc->bhmn", q, k)

    def forward(self, source: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(source, queries)
        kv = torch.einsum("bnhc,bnhe->bhce", k, v)
        out = torch.einsum("bmhc,bhce->bmhe", q, kv)
        return self.proj(out.reshape(queries.shape[0], queries.shape[1], -1))


def _make_rw_head(kind: str, dim: int, num_heads: int, latent_size_scale: int, num_out: int,
                  qkv_bias: bool, drop: float = 0.0) -> nn.Module:
    if kind == "lin":
        return LinearAttentionHead(dim, num_heads, latent_size_scale, qkv_bias=qkv_bias)
    if kind == "tl":
        return TokenLearnerHead(dim, num_out, drop=drop)
    if kind == "ca":
        return CrossAttentionHead(dim, num_heads, qkv_bias=qkv_bias)
    if kind == "la":
        return LatentAttentionHead(dim, latent_size_scale)
    return LatentCrossAttentionHead(dim, num_heads, latent_size_scale, qkv_bias=qkv_bias)


# ----------------------------------------------------------------------------------------------------------------------
# Fusion and memory blocks
# ----------------------------------------------------------------------------------------------------------------------
class Fusion(nn.Module):
    """Combine a head's output ``rw`` with the stream it targets.

    ``residual``: ``target + rw`` (paper; "Add"). ``erase``: ``rw`` (overwrite, as in TTM). ``add_erase``: one gate per
    target token ``g = sigmoid(Linear_{d->T}(mean_tokens(rw)))``, ``(1 - g) target + g rw``; the gate Linear is sized
    by the target token count ``T`` and shared by all layers (official ``read_fusion`` / ``write_fusion``).
    """

    def __init__(self, kind: str, dim: int, num_tokens: int):
        super().__init__()
        self.kind, self.num_tokens = _check_choice("fusion_type", kind, FUSION_TYPES), num_tokens
        if kind == "add_erase":
            self.linear = nn.Linear(dim, num_tokens)

    def forward(self, rw: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.kind == "residual":
            return target + rw
        if self.kind == "erase":
            return rw
        if rw.shape[1] != self.num_tokens:
            raise ValueError(f"add_erase fusion was built for {self.num_tokens} tokens but got {rw.shape[1]}; its gate "
                             "is sized by the token count, so build the model at this image size")
        g = torch.sigmoid(self.linear(rw.mean(dim=1))).unsqueeze(-1)
        return (1.0 - g) * target + g * rw


class MemoryMlpBlock(nn.Module):
    """``memory_blocks="mlp"``: ``M + MLP(LN(M))`` with hidden ``memory_mlp_ratio * d`` (official 0.5) and GELU.

    As the official ``MemMlpBlock``: ``nn.LayerNorm`` with its default eps 1e-5 (not the blocks' 1e-6) and dropout
    ``drop`` after both MLP layers (the official model passes its ``proj_drop_rate``)."""

    def __init__(self, dim: int, mlp_ratio: float = 0.5, drop: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


# ----------------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------------
def _grid(img_size: tuple[int, int], patch: int, which: str) -> tuple[int, int]:
    H, W = img_size
    if H % patch or W % patch:
        options = [p for p in range(1, min(H, W) + 1) if H % p == 0 and W % p == 0]
        raise ValueError(f"{which}={patch} does not divide the image size {H}x{W}; choose a patch size that divides "
                         f"both sides (one of {options})")
    return H // patch, W // patch


class ViTTM(nn.Module):
    """Vision Token Turing Machine (see the module docstring for the per-layer computation and the differences).

    Args:
        img_size: nominal input size; position tables are sized for it and resampled (bicubic, antialias) for others.
        memory_ps / process_ps: patch sizes of the memory and process embedders (README: 28 / 28).
        in_chans, num_classes, embed_dim, depth, num_heads, mlp_ratio, qkv_bias: as in timm's VisionTransformer.
        rw_head_type: one of ``RW_HEAD_TYPES`` (``lin`` = paper).
        latent_size_scale: ``r``; Q/K width of lin/lca/la is ``embed_dim / r`` (README: 4; official train default 1).
        fusion_type: one of ``FUSION_TYPES`` (``residual`` = paper), used for both read and write.
        memory_blocks: ``"none"`` (or ``""``, the official spelling; paper) or ``"mlp"``.
        memory_mlp_ratio: hidden ratio of the memory MLP blocks (official 0.5).
        process_embedder_type: ``"patch"`` (paper) or ``"latent"`` (learned process tokens; fixed in this version).
        process_tokens: number of latent process tokens (``latent`` only; default ``(img_size / process_ps)^2``).
        drop_rate: dropout before both classifiers and in the ``tl`` heads' MLPs (official). pos_drop_rate: dropout
            after the position embeddings of both streams (official ``_pos_embed``).
        proj_drop_rate, attn_drop_rate, drop_path_rate: passed to the timm Blocks (drop path linearly increasing);
            ``proj_drop_rate`` also drops in the ``mlp`` memory blocks (official).
        global_pool: only ``"avg"`` (the official factory always sets it).
        eval_head: the head ``forward`` returns in ``eval()``: ``"memory"`` (default; the official training script
            selects its best checkpoints by the memory head's top-1) or ``"process"``. ``set_all_heads(True)`` makes
            ``eval()`` return both, as training always does.
    """

    #: names of the two outputs (``tokenbook.train`` reports ``val_top1_memory`` / ``val_top1_process``)
    head_names = ("memory", "process")

    def __init__(
        self,
        img_size: Union[int, tuple[int, int]] = 224,
        memory_ps: int = 28,
        process_ps: int = 28,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        rw_head_type: str = "lin",
        latent_size_scale: int = 4,
        fusion_type: str = "residual",
        memory_blocks: Optional[str] = "none",
        memory_mlp_ratio: float = 0.5,
        process_embedder_type: str = "patch",
        process_tokens: Optional[int] = None,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
        eval_head: str = "memory",
    ):
        super().__init__()
        memory_blocks = "none" if memory_blocks in (None, "", "none") else memory_blocks
        self._check_args(rw_head_type, fusion_type, memory_blocks, process_embedder_type, eval_head, global_pool,
                         embed_dim, num_heads, latent_size_scale)
        num_process = self._set_geometry(img_size, memory_ps, process_ps, process_embedder_type, process_tokens)
        self.memory_ps, self.process_ps, self.in_chans = memory_ps, process_ps, in_chans
        self.num_classes, self.global_pool = num_classes, global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_heads, self.depth = num_heads, depth
        self.rw_head_type, self.fusion_type, self.latent_size_scale = rw_head_type, fusion_type, latent_size_scale
        self.memory_blocks_type, self.process_embedder_type = memory_blocks, process_embedder_type
        self.num_prefix_tokens = 0
        self.grad_checkpointing = False
        self.eval_head = eval_head
        #: multi-head protocol of ``tokenbook.train``: True makes ``eval()`` return both heads (see set_all_heads)
        self.return_all_heads = False

        # modules in the official order (state-dict keys and the order of the random init draws)
        self._build_embedders(in_chans, embed_dim, num_process, pos_drop_rate)
        self._build_layers(mlp_ratio, qkv_bias, num_process, memory_mlp_ratio, drop_rate, proj_drop_rate,
                           attn_drop_rate, drop_path_rate)
        self._build_heads(drop_rate)
        self.init_weights()

    # -- construction (split out of __init__; called once, in this order) ------------------------------------------
    def _check_args(self, rw_head_type: str, fusion_type: str, memory_blocks: str, process_embedder_type: str,
                    eval_head: str, global_pool: str, embed_dim: int, num_heads: int, latent_size_scale: int) -> None:
        """Refuse a bad configuration before anything is built, naming the argument and the choices."""
        _check_choice("rw_head_type", rw_head_type, RW_HEAD_TYPES)
        _check_choice("fusion_type", fusion_type, FUSION_TYPES)
        _check_choice("memory_blocks", memory_blocks, MEMORY_BLOCK_TYPES)
        _check_choice("process_embedder_type", process_embedder_type, PROCESS_EMBEDDER_TYPES)
        if eval_head not in self.head_names:
            raise ValueError(f"unknown eval_head {eval_head!r}; choose one of {self.head_names}")
        if global_pool != "avg":
            raise ValueError(f"global_pool={global_pool!r} is not supported; ViTTM mean-pools each stream ('avg')")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} does not split across num_heads={num_heads}")
        if latent_size_scale < 1 or embed_dim % latent_size_scale:
            raise ValueError(f"latent_size_scale={latent_size_scale} must be a positive divisor of "
                             f"embed_dim={embed_dim}")

    def _set_geometry(self, img_size: Union[int, tuple[int, int]], memory_ps: int, process_ps: int,
                      process_embedder_type: str, process_tokens: Optional[int]) -> int:
        """``img_size``, the token grids and counts of both streams; returns the number of process tokens."""
        self.img_size = tuple(to_2tuple(img_size))
        self.memory_grid = _grid(self.img_size, memory_ps, "memory_ps")
        if process_embedder_type == "patch":
            self.process_grid: Optional[tuple[int, int]] = _grid(self.img_size, process_ps, "process_ps")
            num_process = self.process_grid[0] * self.process_grid[1]
            if process_tokens is not None and process_tokens != num_process:
                raise ValueError(f"process_tokens={process_tokens} only applies to process_embedder_type='latent'; "
                                 f"with 'patch' the count is (img/process_ps)^2 = {num_process}")
        else:
            self.process_grid = _grid(self.img_size, process_ps, "process_ps") if process_tokens is None else None
            num_process = process_tokens or self.process_grid[0] * self.process_grid[1]
        self.num_memory_tokens = self.memory_grid[0] * self.memory_grid[1]
        self.num_process_tokens = num_process
        return num_process

    def _build_embedders(self, in_chans: int, embed_dim: int, num_process: int, pos_drop_rate: float) -> None:
        """Both streams' embedders and position tables (or the latent process tokens), and the position dropout."""
        embed_kw = dict(img_size=self.img_size, in_chans=in_chans, embed_dim=embed_dim, strict_img_size=False,
                        output_fmt="NHWC")
        self.memory_embedder = PatchEmbed(patch_size=self.memory_ps, **embed_kw)
        self.memory_pos_embed = nn.Parameter(torch.zeros(1, self.num_memory_tokens, embed_dim))
        if self.process_embedder_type == "patch":
            self.process_embedder = PatchEmbed(patch_size=self.process_ps, **embed_kw)
            self.process_pos_embed = nn.Parameter(torch.zeros(1, num_process, embed_dim))
        else:
            # learned process tokens; they are free parameters, so a position table would be redundant
            self.process_latent = nn.Parameter(torch.zeros(1, num_process, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)

    def _build_layers(self, mlp_ratio: float, qkv_bias: bool, num_process: int, memory_mlp_ratio: float,
                      drop_rate: float, proj_drop_rate: float, attn_drop_rate: float, drop_path_rate: float) -> None:
        """Per layer: the process Block (drop path rising linearly), read/write norms and heads, the shared fusions,
        and the memory blocks (official names: ``blocks``, ``read_head``, ``write_head``, ``mem_blocks`` ...)."""
        dim, depth, norm_layer = self.embed_dim, self.depth, LayerNorm  # timm LayerNorm, eps 1e-6 (official)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        self.blocks = nn.Sequential(*[
            Block(dim, self.num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                  attn_drop=attn_drop_rate, drop_path=dpr[i], norm_layer=norm_layer)
            for i in range(depth)])
        self.read_norm = nn.ModuleList([norm_layer(dim) for _ in range(depth)])
        self.write_norm = nn.ModuleList([norm_layer(dim) for _ in range(depth)])
        head = (self.rw_head_type, dim, self.num_heads, self.latent_size_scale)
        self.read_head = nn.ModuleList([_make_rw_head(*head, num_process, qkv_bias, drop_rate) for _ in range(depth)])
        self.write_head = nn.ModuleList([_make_rw_head(*head, self.num_memory_tokens, qkv_bias, drop_rate)
                                         for _ in range(depth)])
        self.read_fusion = Fusion(self.fusion_type, dim, num_process)
        self.write_fusion = Fusion(self.fusion_type, dim, self.num_memory_tokens)
        self.mem_blocks = nn.ModuleList([  # official name (state dict keys mem_blocks.{i}.*)
            MemoryMlpBlock(dim, memory_mlp_ratio, proj_drop_rate) if self.memory_blocks_type == "mlp"
            else nn.Identity() for _ in range(depth)])

    def _build_heads(self, drop_rate: float) -> None:
        """Final norms and both classifiers (memory ``head``, ``process_head``), and timm's ``feature_info``."""
        dim, norm_layer = self.embed_dim, LayerNorm
        self.norm = nn.Identity()  # memory stream's final norm (Identity under global_pool="avg" in timm)
        self.process_norm = norm_layer(dim)
        self.fc_norm = norm_layer(dim)
        self.fc_norm_process = norm_layer(dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dim, self.num_classes) if self.num_classes > 0 else nn.Identity()
        self.process_head = nn.Linear(dim, self.num_classes) if self.num_classes > 0 else nn.Identity()
        #: timm feature metadata: the process tokens after each layer (see ``forward_intermediates``)
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=dim, reduction=self.process_ps)
                             for i in range(self.depth)]

    # -- init ----------------------------------------------------------------------------------------------------------
    def init_weights(self) -> None:
        """Official init: every Linear truncated-normal std 0.02 with zero bias (timm's ``init_weights("")``),
        LayerNorms (1, 0), memory conv left at PyTorch's default, process conv xavier-uniform with zero bias, position
        tables (and latent process tokens) truncated-normal 0.02, both classifier heads all zeros."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        trunc_normal_(self.memory_pos_embed, std=0.02)
        if self.process_embedder_type == "patch":
            trunc_normal_(self.process_pos_embed, std=0.02)
            nn.init.xavier_uniform_(self.process_embedder.proj.weight)
            nn.init.zeros_(self.process_embedder.proj.bias)
        else:
            trunc_normal_(self.process_latent, std=0.02)
        for head in (self.head, self.process_head):
            if isinstance(head, nn.Linear):
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)

    # -- timm model API ------------------------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Names timm's optimizer factory exempts from weight decay. The official recipe decays *every* parameter
        (torch AdamW on ``model.parameters()``); use ``filter_bias_and_bn=False`` in timm to reproduce it."""
        return {"memory_pos_embed", "process_pos_embed", "process_latent"}

    @torch.jit.ignore
    def set_all_heads(self, enable: bool = True) -> None:
        """Return both heads' outputs ``(memory, process)`` also in ``eval()`` (cf. timm's
        ``set_distilled_training``; training mode always returns both, for the official summed loss)."""
        self.return_all_heads = enable

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each layer (read, block, write, memory block) in backward to save memory while training."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for timm's layer-wise lr decay (as timm's ViT): the stem (embedders, position tables,
        latent process tokens), then one group per layer ``i`` (block, read/write heads and norms, memory block);
        what all layers share or what follows the last one (the add_erase fusion gates, ``process_norm``) joins the
        last layer's group (timm's ``MATCH_PREV_GROUP``, as timm's ViT does with its final norm); the pooling norms and
        classifiers stay unmatched (timm puts them last). ``coarse`` is accepted for the timm signature."""
        return dict(
            stem=r"^(?:memory_embedder|process_embedder|memory_pos_embed|process_pos_embed|process_latent)",
            blocks=[(r"^(?:blocks|read_head|write_head|read_norm|write_norm|mem_blocks)\.(\d+)", None),
                    (r"^(?:read_fusion|write_fusion|process_norm)", (99999,))],
        )

    def get_classifier(self) -> tuple[nn.Module, nn.Module]:
        return self.head, self.process_head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool not in (None, "avg"):
            raise ValueError(f"global_pool={global_pool!r} is not supported; ViTTM mean-pools each stream ('avg')")
        self.num_classes = num_classes
        dev = self.memory_pos_embed.device
        self.head = nn.Linear(self.embed_dim, num_classes, device=dev) if num_classes > 0 else nn.Identity()
        self.process_head = nn.Linear(self.embed_dim, num_classes, device=dev) if num_classes > 0 else nn.Identity()
        for head in (self.head, self.process_head):
            if isinstance(head, nn.Linear):
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)

    # -- forward -------------------------------------------------------------------------------------------------------
    def _embed(self, embedder: PatchEmbed, pos: torch.Tensor, grid: tuple[int, int], x: torch.Tensor, which: str,
               patch: int) -> torch.Tensor:
        H, W = x.shape[-2:]
        if H % patch or W % patch:
            raise ValueError(f"{which}={patch} does not divide the input size {H}x{W}; resize the input to a multiple "
                             f"of {patch} or build the model with a patch size that divides it")
        t = embedder(x)  # B, h, w, d
        B, h, w, d = t.shape
        if (h, w) != tuple(grid):
            pos = resample_abs_pos_embed(pos, new_size=(h, w), old_size=grid, num_prefix_tokens=0)
        return t.reshape(B, h * w, d) + pos

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Initial (memory, process) streams: patch embedding + position table (resampled for other input sizes)."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected images of shape [B, {self.in_chans}, H, W], got {tuple(x.shape)}")
        mem = self._embed(self.memory_embedder, self.memory_pos_embed, self.memory_grid, x, "memory_ps", self.memory_ps)
        if self.process_embedder_type == "patch":
            proc = self._embed(self.process_embedder, self.process_pos_embed, self.process_grid, x, "process_ps",
                               self.process_ps)
        else:
            proc = self.process_latent.expand(x.shape[0], -1, -1)
        return self.pos_drop(mem), self.pos_drop(proc)  # official: pos_drop on both streams

    def _layer(self, i: int, mem: torch.Tensor, proc: torch.Tensor, record: Optional[dict] = None):
        mem, proc = self.read_norm[i](mem), self.read_norm[i](proc)
        read = self.read_head[i](mem, proc)
        if record is not None:
            record["read"].append(read)
            if record["maps"]:
                record["read_maps"].append(self.read_head[i].attention_map(mem, proc))
        proc = self.read_fusion(read, proc)
        proc = self.blocks[i](proc)
        mem, proc = self.write_norm[i](mem), self.write_norm[i](proc)
        write = self.write_head[i](proc, mem)
        if record is not None:
            record["write"].append(write)
            record["mem_before_write"].append(mem)
            if record["maps"]:
                record["write_maps"].append(self.write_head[i].attention_map(proc, mem))
        mem = self.write_fusion(write, mem)
        mem = self.mem_blocks[i](mem)
        if record is not None:
            record["memory"].append(mem)
        return mem, proc

    def _streams(self, x: torch.Tensor, record: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
        mem, proc = self.embed(x)
        if record is not None:
            record["memory0"] = mem
        for i in range(self.depth):
            if self.grad_checkpointing and record is None and torch.is_grad_enabled() and not torch.jit.is_scripting():
                mem, proc = checkpoint(self._layer, i, mem, proc, use_reentrant=False)
            else:
                mem, proc = self._layer(i, mem, proc, record)
        return self.norm(mem), self.process_norm(proc)

    def _all_heads_mode(self) -> bool:
        return self.training or self.return_all_heads

    def forward_features(self, x: torch.Tensor) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Token features after the last layer and the final norms.

        In ``eval()`` (timm convention) one tensor: the tokens of the ``eval_head`` stream (default the memory tokens
        ``[B, Nm, d]``; ``eval_head="process"``: the process tokens ``[B, Np, d]``). In training, or after
        ``set_all_heads(True)``: ``(memory tokens, process tokens)``."""
        mem, proc = self._streams(x)
        if self._all_heads_mode():
            return mem, proc
        return mem if self.eval_head == "memory" else proc

    def _pool(self, tokens: torch.Tensor, which: str) -> torch.Tensor:
        norm = self.fc_norm if which == "memory" else self.fc_norm_process
        return self.head_drop(norm(tokens.mean(dim=1)))

    def _both_heads(self, mem: torch.Tensor, proc: torch.Tensor, pre_logits: bool = False):
        m, p = self._pool(mem, "memory"), self._pool(proc, "process")
        if pre_logits:
            return m, p
        return self.head(m), self.process_head(p)

    def forward_head(self, x: Union[torch.Tensor, Sequence[torch.Tensor]], pre_logits: bool = False):
        """Logits (or, with ``pre_logits``, the pooled and normalized features) from ``forward_features``' output.

        ``x`` may be the ``(memory, process)`` pair: both heads are returned in training or with
        ``set_all_heads(True)``, else only the ``eval_head`` one. A single tensor is taken as the ``eval_head``
        stream's tokens and gives that head's output."""
        if isinstance(x, (tuple, list)):
            mem, proc = x
            if self._all_heads_mode():
                return self._both_heads(mem, proc, pre_logits)
            x = mem if self.eval_head == "memory" else proc
        head = self.head if self.eval_head == "memory" else self.process_head
        pooled = self._pool(x, self.eval_head)
        return pooled if pre_logits else head(pooled)

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``eval()``: the ``eval_head`` logits (default memory, the official checkpoint-selection head).
        Training or ``set_all_heads(True)``: ``(memory_logits, process_logits)``, memory first (official order)."""
        return self.forward_head(self.forward_features(x))

    # -- timm feature extraction ---------------------------------------------------------------------------------
    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, Sequence[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        stream: str = "process",
        return_prefix_tokens: bool = False,
    ):
        """Features after the layers in ``indices`` (timm's ViT API; ``timm.create_model(..., features_only=True)``).

        Intermediates are the **process tokens** after each layer (after its write, i.e. the stream the next layer
        reads with), as the official segmentation backbone takes them; ``norm`` applies ``process_norm`` to them.
        ``stream="memory"`` gives the memory tokens instead; ``stream="both"`` concatenates process and memory
        channels (``2 d``; needs equal grids, as the official segmentation backbone does for 28/28).
        ``indices``: None = all layers, an int = the last n, a sequence = those (negative from the end).
        ``output_fmt``: ``"NCHW"`` (``[B, C, H/patch, W/patch]``) or ``"NLC"`` (``[B, tokens, C]``).
        ``return_prefix_tokens``: timm's ViT API; ViTTM has no prefix tokens, so each entry becomes
        ``(features, empty [B, 0, C] tensor)``.
        Returns the list, or with ``intermediates_only=False`` ``(forward_features output, list)``.
        """
        from timm.models._features import feature_take_indices

        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        if stream not in ("process", "memory", "both"):
            raise ValueError(f"stream must be 'process', 'memory' or 'both', got {stream!r}")
        take, max_index = feature_take_indices(self.depth, indices)
        H, W = x.shape[-2:]
        mgrid = (H // self.memory_ps, W // self.memory_ps)
        pgrid = (H // self.process_ps, W // self.process_ps) if self.process_embedder_type == "patch" else None
        if output_fmt == "NCHW" and stream != "memory" and pgrid is None:
            raise ValueError("NCHW process features need patch process tokens; use output_fmt='NLC' with "
                             "process_embedder_type='latent'")
        if stream == "both" and pgrid != mgrid:
            raise ValueError(f"stream='both' needs equal memory and process grids, got {mgrid} and {pgrid}; "
                             "use stream='process' or 'memory'")
        mem, proc = self.embed(x)
        out = []
        last = max_index if stop_early else self.depth - 1
        for i in range(last + 1):
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                mem, proc = checkpoint(self._layer, i, mem, proc, use_reentrant=False)
            else:
                mem, proc = self._layer(i, mem, proc)
            if i in take:
                p = self.process_norm(proc) if norm else proc
                m = self.norm(mem) if norm else mem
                out.append(p if stream == "process" else m if stream == "memory" else torch.cat([p, m], dim=-1))
        prefix = [t[:, :0] for t in out]
        if output_fmt == "NCHW":
            grid = mgrid if stream == "memory" else pgrid
            out = [t.reshape(t.shape[0], *grid, t.shape[-1]).permute(0, 3, 1, 2).contiguous() for t in out]
        if return_prefix_tokens:
            out = list(zip(out, prefix))
        if intermediates_only:
            return out
        mem, proc = self.norm(mem), self.process_norm(proc)
        if self._all_heads_mode():
            return (mem, proc), out
        return (mem if self.eval_head == "memory" else proc), out

    def prune_intermediate_layers(self, indices: Union[int, Sequence[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the layers after the last one ``indices`` needs (timm's ViT API); ``prune_norm`` drops
        ``process_norm``, ``prune_head`` both pooling norms and classifiers. Returns the kept indices."""
        from timm.models._features import feature_take_indices

        take, max_index = feature_take_indices(self.depth, indices)
        keep = max_index + 1
        for name in ("blocks", "read_head", "write_head", "read_norm", "write_norm", "mem_blocks"):
            setattr(self, name, getattr(self, name)[:keep])
        self.depth = keep
        self.feature_info = self.feature_info[:keep]
        if prune_norm:
            self.process_norm = nn.Identity()
        if prune_head:
            self.fc_norm, self.fc_norm_process = nn.Identity(), nn.Identity()
            self.reset_classifier(0)
        return take

    @torch.no_grad()
    def trace(self, x: torch.Tensor, maps: bool = True) -> dict[str, Any]:
        """Run a forward pass and return per-layer internals (for figures and diagnostics).

        Keys: ``logits`` (memory, process; both heads in every mode), ``memory0`` (initial memory stream), ``memory`` / ``read`` / ``write`` /
        ``mem_before_write`` (lists over layers of [B, tokens, d]) and, with ``maps``, ``read_maps`` [B, h, Np, Nm] and
        ``write_maps`` [B, h, Nm, Np] per layer (``tl``: the last dimension also covers the query-stream tokens).
        """
        record: dict[str, Any] = dict(maps=maps, read=[], write=[], memory=[], mem_before_write=[], read_maps=[],
                                      write_maps=[])
        mem, proc = self._streams(x, record)
        record["logits"] = self._both_heads(mem, proc)
        return record


# ----------------------------------------------------------------------------------------------------------------------
# Official checkpoints
# ----------------------------------------------------------------------------------------------------------------------
_PREFIXES = ("_orig_mod.", "module.")
_UNUSED_OFFICIAL = re.compile(r"^(cls_token|pos_embed|patch_embed\..*|(read|write)_head\.\d+\.proj\.(weight|bias))$")
_HEAD_KEYS = ("head.weight", "head.bias", "process_head.weight", "process_head.bias")


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def _unwrap(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    for k in ("state_dict", "model", "state_dict_ema", "model_ema"):
        if k in state_dict and isinstance(state_dict[k], Mapping):
            return state_dict[k]
    return state_dict


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: ViTTM, allow_head_mismatch: Optional[bool] = None
                         ) -> dict[str, torch.Tensor]:
    """Turn an official EfficientTTMs state dict into one that loads **strictly** into ``model``.

    Accepts raw ``model.state_dict()`` files, compiled runs (``_orig_mod.`` prefix), EMA files (torch AveragedModel:
    ``module.`` prefix plus an ``n_averaged`` entry) and dicts wrapping one of those under ``state_dict``/``model``.
    Drops what the official model creates but never uses (``cls_token``, ``pos_embed``, ``patch_embed.*``, the lin
    heads' ``proj``); when ``memory_ps == 16`` the official ``patch_embed`` *is* the memory embedder, so it is renamed
    if ``memory_embedder.*`` is absent. Position tables of another grid are resampled (bicubic, antialias; square
    tables).

    Raises ``ValueError`` listing missing keys, unexpected keys and shape mismatches (e.g. a checkpoint of another
    model size). Classifier shape mismatches are dropped instead when ``allow_head_mismatch`` is True, or when it is
    None and the model's ``pretrained_cfg['num_classes']`` differs from ``model.num_classes`` (timm then re-initializes
    the heads itself).
    """
    sd = {}
    for k, v in _unwrap(state_dict).items():
        if k == "n_averaged":
            continue
        sd[_strip_prefixes(k)] = v
    target = model.state_dict()
    if "memory_embedder.proj.weight" not in sd and "patch_embed.proj.weight" in sd:
        sd["memory_embedder.proj.weight"] = sd["patch_embed.proj.weight"]
        sd["memory_embedder.proj.bias"] = sd["patch_embed.proj.bias"]
    sd = {k: v for k, v in sd.items() if k in target or not _UNUSED_OFFICIAL.match(k)}

    for name, grid in (("memory_pos_embed", model.memory_grid), ("process_pos_embed", model.process_grid)):
        if name in sd and name in target and sd[name].shape != target[name].shape and grid is not None:
            pos = sd[name]
            n = pos.shape[1]
            side = math.isqrt(n)
            if pos.ndim != 3 or side * side != n or pos.shape[-1] != target[name].shape[-1]:
                continue  # reported as a shape mismatch below
            sd[name] = resample_abs_pos_embed(pos.float(), new_size=grid, old_size=(side, side),
                                              num_prefix_tokens=0).to(pos.dtype)

    if allow_head_mismatch is None:
        cfg_classes = (getattr(model, "pretrained_cfg", None) or {}).get("num_classes")
        allow_head_mismatch = cfg_classes is not None and cfg_classes != model.num_classes
    mismatched = []
    for k, v in list(sd.items()):
        if k in target and tuple(v.shape) != tuple(target[k].shape):
            if allow_head_mismatch and k in _HEAD_KEYS:
                del sd[k]
            else:
                mismatched.append(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}")
    head_dropped = [k for k in _HEAD_KEYS if k in target and k not in sd] if allow_head_mismatch else []
    missing = [k for k in target if k not in sd and k not in head_dropped]
    unexpected = [k for k in sd if k not in target]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches: " + "; ".join(mismatched[:12])
                         + (" ..." if len(mismatched) > 12 else ""))
        if missing:
            parts.append(f"{len(missing)} missing keys: " + ", ".join(missing[:20])
                         + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: " + ", ".join(unexpected[:20])
                         + (" ..." if len(unexpected) > 20 else ""))
        raise ValueError(
            "checkpoint does not match this ViTTM "
            f"(d={model.embed_dim}, depth={model.depth}, heads={model.num_heads}, rw={model.rw_head_type}, "
            f"r={model.latent_size_scale}, fusion={model.fusion_type}, memory_ps={model.memory_ps}, "
            f"process_ps={model.process_ps}, classes={model.num_classes}): " + " | ".join(parts)
            + ". Build the model with the checkpoint's configuration (size, patch sizes, head type, latent scale).")
    return sd


def load_official_checkpoint(model: ViTTM, checkpoint: Union[str, Path, Mapping[str, Any]],
                             allow_head_mismatch: bool = False) -> ViTTM:
    """Load an official checkpoint (path to ``.pth``/``.pt``/``.safetensors``, or a state dict) into ``model``.

    Everything but (optionally) the classifiers loads strictly; with ``allow_head_mismatch`` classifiers of another
    class count are left at their (zero) initialization."""
    if isinstance(checkpoint, (str, Path)):
        path = Path(checkpoint)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            checkpoint = load_file(str(path))
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    sd = checkpoint_filter_fn(checkpoint, model, allow_head_mismatch=allow_head_mismatch)
    result = model.load_state_dict(sd, strict=False)
    bad = [k for k in result.missing_keys if k not in _HEAD_KEYS] + list(result.unexpected_keys)
    if bad:  # cannot happen after the filter's checks; kept as a guard
        raise ValueError(f"checkpoint does not match the model: {bad}")
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Helpers for the notebook
# ----------------------------------------------------------------------------------------------------------------------
def vittm_loss(outputs: Sequence[torch.Tensor], target: torch.Tensor, criterion: Callable) -> torch.Tensor:
    """Official training loss: ``criterion(memory_logits, y) + criterion(process_logits, y)`` (equal weights)."""
    return sum(criterion(o, target) for o in outputs)


# ----------------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------------
def _cfg(input_size: tuple[int, int, int] = (3, 224, 224), **kwargs) -> dict[str, Any]:
    return {
        "url": "", "num_classes": 1000, "input_size": input_size, "pool_size": None, "crop_pct": 0.875,
        "interpolation": "bicubic", "fixed_input_size": False, "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD, "first_conv": ("memory_embedder.proj", "process_embedder.proj"),
        "classifier": ("head", "process_head"), "license": "mit",
        "paper_ids": "arXiv:2409.07613", "paper_name": "Token Turing Machines are Efficient Vision Models",
        "origin_url": "https://github.com/pjjajal/EfficientTTMs", **kwargs,
    }


_FM = dict(num_classes=10, crop_pct=1.0, interpolation="bilinear", mean=(FASHION_MNIST_MEAN,) * 3,
           std=(FASHION_MNIST_STD,) * 3)

default_cfgs = generate_default_cfgs({
    # The released ViTTM-B-28 IN-1k weights (README Google-Drive link): load with pretrained_cfg_overlay=dict(file=...).
    "vittm_base_m28p28_224.official_in1k": _cfg(notes=(
        "Released ViTTM-B-28 (IN-21k-P pretrain, IN-1k fine-tune); download manually, pass "
        "pretrained_cfg_overlay=dict(file=path)",)),
    "vittm_small_m28p28_224": _cfg(),
    "vittm_tiny_m28p28_224": _cfg(),
    "vittm_small_m16p32_224": _cfg(),
    "vittm_base_m16p32_224": _cfg(),
    # CPU variants for the default data (Fashion-MNIST as 3 channels, the same cfg as tokenbook.models.vit_small)
    "vittm_cpu_m4p4_32": _cfg(input_size=(3, 32, 32), **_FM),
    "vittm_cpu_m4p4_28": _cfg(input_size=(3, 28, 28), **_FM),
    "vittm_cpu_m2p4_28": _cfg(input_size=(3, 28, 28), **_FM),
    "vittm_cpu_m7p7_28": _cfg(input_size=(3, 28, 28), **_FM),
})


def _create(variant: str, pretrained: bool, defaults: dict[str, Any], **kwargs) -> ViTTM:
    out_indices = kwargs.pop("out_indices", 3)
    args = {**PAPER_CONFIG, **defaults, **kwargs}  # every option stays a keyword argument
    return build_model_with_cfg(ViTTM, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **args)


_SMALL = dict(embed_dim=384, depth=12, num_heads=6)
_BASE = dict(embed_dim=768, depth=12, num_heads=12)
_TINY = dict(embed_dim=192, depth=12, num_heads=3)
#: CPU family: d 128, depth 6, 4 heads (head dim 32), the width/depth of the ``vit_fm_small_p4_*`` baselines of
#: ``tokenbook.models.vit_small``; lin with r = 4 gives c = 32 (8 per head), the paper's d/4.
_CPU = dict(embed_dim=128, depth=6, num_heads=4)


@register_model
def vittm_small_m28p28_224(pretrained: bool = False, **kwargs) -> ViTTM:
    """ViTTM-S, README/paper config: memory & process patch 28 at 224 px (64 + 64 tokens), lin, c = d/4, residual."""
    return _create("vittm_small_m28p28_224", pretrained, dict(_SMALL, memory_ps=28, process_ps=28), **kwargs)


@register_model
def vittm_base_m28p28_224(pretrained: bool = False, **kwargs) -> ViTTM:
    """ViTTM-B, README/paper config (the released "ViTTM-B-28"): 64 + 64 tokens, lin, c = d/4, residual."""
    return _create("vittm_base_m28p28_224", pretrained, dict(_BASE, memory_ps=28, process_ps=28), **kwargs)


@register_model
def vittm_tiny_m28p28_224(pretrained: bool = False, **kwargs) -> ViTTM:
    """ViTTM-Ti (official ``vittm_tiny`` width/depth) in the README's 28/28 setting."""
    return _create("vittm_tiny_m28p28_224", pretrained, dict(_TINY, memory_ps=28, process_ps=28), **kwargs)


@register_model
def vittm_small_m16p32_224(pretrained: bool = False, **kwargs) -> ViTTM:
    """ViTTM-S 16/32 (train_lt.py / benchmark.py patch defaults): 196 memory + 49 process tokens, lin, c = d/4."""
    return _create("vittm_small_m16p32_224", pretrained, dict(_SMALL, memory_ps=16, process_ps=32), **kwargs)


@register_model
def vittm_base_m16p32_224(pretrained: bool = False, **kwargs) -> ViTTM:
    """ViTTM-B 16/32 ("ViTTM-B-16/32" of the segmentation configs): 196 memory + 49 process tokens, lin, c = d/4."""
    return _create("vittm_base_m16p32_224", pretrained, dict(_BASE, memory_ps=16, process_ps=32), **kwargs)


@register_model
def vittm_cpu_m4p4_32(pretrained: bool = False, **kwargs) -> ViTTM:
    """CPU ViTTM at 32 px with patch 4/4: exactly the paper's 64 + 64 tokens (d 128, depth 6, 4 heads)."""
    return _create("vittm_cpu_m4p4_32", pretrained, dict(_CPU, img_size=32, memory_ps=4, process_ps=4), **kwargs)


@register_model
def vittm_cpu_m4p4_28(pretrained: bool = False, **kwargs) -> ViTTM:
    """CPU ViTTM at 28 px (Fashion-MNIST) with patch 4/4: 49 + 49 tokens, the 28/28 ratio of equal counts."""
    return _create("vittm_cpu_m4p4_28", pretrained, dict(_CPU, img_size=28, memory_ps=4, process_ps=4), **kwargs)


@register_model
def vittm_cpu_m2p4_28(pretrained: bool = False, **kwargs) -> ViTTM:
    """CPU ViTTM at 28 px with patch 2/4: 196 memory + 49 process tokens, exactly the 16/32 variant's counts."""
    return _create("vittm_cpu_m2p4_28", pretrained, dict(_CPU, img_size=28, memory_ps=2, process_ps=4), **kwargs)


@register_model
def vittm_cpu_m7p7_28(pretrained: bool = False, **kwargs) -> ViTTM:
    """CPU ViTTM at 28 px with patch 7/7: 16 + 16 tokens, the workbook's cpu scale (the token grid of
    ``vit_fm_tiny_p7_28``), equal memory and process counts as in the README's 28/28."""
    return _create("vittm_cpu_m7p7_28", pretrained, dict(_CPU, img_size=28, memory_ps=7, process_ps=7), **kwargs)


MODEL_NAMES = (
    "vittm_small_m28p28_224", "vittm_base_m28p28_224", "vittm_tiny_m28p28_224", "vittm_small_m16p32_224",
    "vittm_base_m16p32_224", "vittm_cpu_m4p4_32", "vittm_cpu_m4p4_28", "vittm_cpu_m2p4_28", "vittm_cpu_m7p7_28",
)
