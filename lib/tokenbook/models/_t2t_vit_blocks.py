"""Backbone block variants of T2T-ViT's Table 6 (SE, Ghost, Dense) and the shared attention kernel.

Split from :mod:`tokenbook.models.t2t_vit` (which re-exports every name here) to keep that module under the
project's size limit; key names follow the official ``t2t_vit_se.py``, ``t2t_vit_ghost.py`` and ``t2t_vit_dense.py``
so released-style state dicts load strictly.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import use_fused_attn
from timm.models.vision_transformer import Attention, Block

__all__ = ["SEAttention", "GhostAttention", "GhostMlp", "DenseBlock", "Transition"]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, fused: bool, attn_drop: nn.Dropout,
            training: bool) -> torch.Tensor:
    """softmax(scale q k^T) v with optional fused SDPA (the explicit path is what FLOP counters see)."""
    if fused:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=attn_drop.p if training else 0.0, scale=scale)
    attn = (q * scale) @ k.transpose(-2, -1)
    attn = attn_drop(attn.softmax(dim=-1))
    return attn @ v


class SEAttention(Attention):
    """timm ``Attention`` plus the official SE gate after the output projection (``t2t_vit_se.py``):
    mean over tokens -> Linear(D, D/16, no bias) -> ReLU -> Linear(D/16, D, no bias) -> sigmoid -> channel scale.
    Keys ``se_layer.fc.0.weight``, ``se_layer.fc.2.weight``."""

    def __init__(self, dim: int, num_heads: int = 8, reduction: int = 16, **kwargs: Any) -> None:
        super().__init__(dim, num_heads=num_heads, **kwargs)
        if dim // reduction < 1:
            raise ValueError(f"SE reduction {reduction} is larger than the width {dim}")
        self.se_layer = nn.Module()
        self.se_layer.fc = nn.Sequential(nn.Linear(dim, dim // reduction, bias=False), nn.ReLU(inplace=True),
                                         nn.Linear(dim // reduction, dim, bias=False), nn.Sigmoid())

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        y = _attend(q, k, v, self.scale, self.fused_attn, self.attn_drop, self.training)
        y = self.proj(y.transpose(1, 2).reshape(b, n, self.attn_dim))
        y = y * self.se_layer.fc(y.mean(dim=1)).unsqueeze(1)
        return self.proj_drop(y)


class GhostAttention(nn.Module):
    """Ghost attention (official ``Attention_ghost``): q, k, v = Linear(D, D/2) each plus a depthwise 1x1 Conv1d
    "cheap operation" producing the other half (concatenated), then standard multi-head attention and ``proj``."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, **_: Any) -> None:
        super().__init__()
        if dim % num_heads or dim % 2:
            raise ValueError(f"ghost attention needs an even width divisible by num_heads, got {dim}/{num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = use_fused_attn()
        half = dim // 2
        self.q = nn.Linear(dim, half, bias=qkv_bias)
        self.k = nn.Linear(dim, half, bias=qkv_bias)
        self.v = nn.Linear(dim, half, bias=qkv_bias)
        self.cheap_operation_q = nn.Conv1d(half, half, kernel_size=1, groups=half, bias=False)
        self.cheap_operation_k = nn.Conv1d(half, half, kernel_size=1, groups=half, bias=False)
        self.cheap_operation_v = nn.Conv1d(half, half, kernel_size=1, groups=half, bias=False)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _ghost(self, lin: nn.Linear, cheap: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        y = lin(x)
        y = torch.cat((y, cheap(y.transpose(1, 2)).transpose(1, 2)), dim=2)
        return y.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self._ghost(self.q, self.cheap_operation_q, x), self._ghost(self.k, self.cheap_operation_k, x),
                self._ghost(self.v, self.cheap_operation_v, x))

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv_heads(x)
        y = _attend(q, k, v, self.scale, self.fused_attn, self.attn_drop, self.training)
        return self.proj_drop(self.proj(y.transpose(1, 2).reshape(b, n, c)))


class GhostMlp(nn.Module):
    """Ghost MLP (official ``Mlp_ghost``): fc1 D->D, GELU; two depthwise 1x1 Conv1d cheap ops on it, each GELU;
    concatenation to 3D; fc2 3D->D. Requires mlp_ratio 3 (the official code breaks otherwise)."""

    def __init__(self, in_features: int, hidden_features: Optional[int] = None, out_features: Optional[int] = None,
                 act_layer: Callable[[], nn.Module] = nn.GELU, drop: float = 0.0, **_: Any) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        if hidden_features != 3 * in_features:
            raise ValueError(f"ghost MLP needs mlp_ratio 3 (hidden {3 * in_features}), got hidden {hidden_features}")
        self.fc1 = nn.Linear(in_features, in_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)
        self.cheap_operation2 = nn.Conv1d(in_features, in_features, kernel_size=1, groups=in_features, bias=False)
        self.cheap_operation3 = nn.Conv1d(in_features, in_features, kernel_size=1, groups=in_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.act(self.fc1(x))
        x2 = self.act(self.cheap_operation2(x1.transpose(1, 2)).transpose(1, 2))
        x3 = self.act(self.cheap_operation3(x1.transpose(1, 2)).transpose(1, 2))
        return self.drop(self.fc2(self.drop(torch.cat((x1, x2, x3), dim=2))))


class DenseBlock(Block):
    """Dense block (official ``t2t_vit_dense.Block``): a standard block at the current width w, then
    ``dense_linear`` Linear(w -> growth_rate) and concatenation to the input (width w + growth_rate)."""

    def __init__(self, dim: int, growth_rate: int, **kwargs: Any) -> None:
        super().__init__(dim, **kwargs)
        self.dense_linear = nn.Linear(dim, growth_rate)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        return torch.cat([x, self.dense_linear(super().forward(x))], dim=2)


class Transition(nn.Module):
    """Between dense stages: Linear(w -> w/2) + GELU (official ``Transition``, key ``linear``)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.act = nn.GELU()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.linear(x))
