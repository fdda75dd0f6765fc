"""Figures shared by the notebooks: attention maps, attention rollout, token overlays, training curves.

Attention probabilities of timm ViTs are captured from each attention module's ``attn_drop`` input while the module
runs its explicit (non-fused) path, so nothing in the model changes. All plotting returns matplotlib figures; the
notebooks save them with ``RunContext.save_figure``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .bench import explicit_attention

__all__ = ["attention_maps", "attention_rollout", "cls_attention", "plot_maps", "plot_curves", "overlay",
           "to_display", "grid_side"]


def grid_side(n_tokens: int) -> int:
    g = int(round(math.sqrt(n_tokens)))
    if g * g != n_tokens:
        raise ValueError(f"{n_tokens} tokens do not form a square grid")
    return g


@torch.no_grad()
def attention_maps(model: nn.Module, x: torch.Tensor, blocks: Optional[Sequence[nn.Module]] = None) -> list[torch.Tensor]:
    """Self-attention probabilities (B, heads, N, N) of every block of a timm ViT for input ``x``."""
    blocks = list(blocks if blocks is not None else getattr(model, "blocks", []))
    if not blocks:
        raise ValueError("model has no .blocks; pass the blocks whose attention to capture")
    maps: list[Optional[torch.Tensor]] = [None] * len(blocks)
    handles = []
    for i, blk in enumerate(blocks):
        attn = getattr(blk, "attn", None)
        if attn is None or not hasattr(attn, "attn_drop"):
            raise ValueError(f"block {i} has no timm-style attention module with attn_drop")

        def hook(mod, inp, out, i=i):
            maps[i] = out.detach().float().cpu()

        handles.append(attn.attn_drop.register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        with explicit_attention(model):
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    if any(m is None for m in maps):
        raise RuntimeError("some blocks did not produce an attention map (custom attention without attn_drop?)")
    return maps  # type: ignore[return-value]


def attention_rollout(maps: Sequence[torch.Tensor], head_fusion: str = "mean", residual: float = 0.5) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020): fuse heads, mix in the identity for the residual path,
    renormalize rows and multiply through the layers. Returns (B, N, N)."""
    out = None
    for a in maps:
        if head_fusion == "mean":
            a = a.mean(1)
        elif head_fusion == "max":
            a = a.amax(1)
        elif head_fusion == "min":
            a = a.amin(1)
        else:
            raise ValueError(f"head_fusion must be mean, max or min, got {head_fusion!r}")
        eye = torch.eye(a.shape[-1], dtype=a.dtype)
        a = residual * eye + (1 - residual) * a
        a = a / a.sum(-1, keepdim=True)
        out = a if out is None else a @ out
    return out


def cls_attention(attn: torch.Tensor, num_prefix: int = 1, query: int = 0) -> torch.Tensor:
    """Attention of token ``query`` (the class token) to the patch tokens as (B, [heads,] g, g) grids."""
    patches = attn[..., query, num_prefix:]
    g = grid_side(patches.shape[-1])
    return patches.reshape(*patches.shape[:-1], g, g)


def to_display(img: torch.Tensor, mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,)) -> np.ndarray:
    """(C, H, W) normalized tensor -> (H, W[, 3]) array in [0, 1] for imshow."""
    img = img.detach().float().cpu()
    m = torch.tensor(mean).view(-1, 1, 1)
    s = torch.tensor(std).view(-1, 1, 1)
    img = (img * s + m).clamp(0, 1)
    if img.shape[0] == 1:
        return img[0].numpy()
    if img.shape[0] == 3 and torch.allclose(img[0], img[1]) and torch.allclose(img[1], img[2]):
        return img[0].numpy()
    return img.permute(1, 2, 0).numpy()


def overlay(ax, image: np.ndarray, heat: torch.Tensor | np.ndarray, alpha: float = 0.55, cmap: str = "inferno"):
    """Draw ``image`` with ``heat`` (any grid size) upsampled on top."""
    h = torch.as_tensor(np.asarray(heat), dtype=torch.float32)[None, None]
    H, W = image.shape[:2]
    h = F.interpolate(h, size=(H, W), mode="nearest")[0, 0].numpy()
    h = (h - h.min()) / (h.max() - h.min() + 1e-12)
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
    ax.imshow(h, cmap=cmap, alpha=alpha)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_maps(images: Sequence[np.ndarray], maps: Sequence[Sequence], row_titles: Optional[Sequence[str]] = None,
              col_titles: Optional[Sequence[str]] = None, suptitle: str = "", size: float = 1.6, alpha: float = 0.55):
    """A grid: one row per image, the image first and then one overlay per map in ``maps[row]``."""
    import matplotlib.pyplot as plt

    rows, cols = len(images), 1 + max(len(m) for m in maps)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    for r, (img, ms) in enumerate(zip(images, maps)):
        axes[r, 0].imshow(img, cmap="gray" if img.ndim == 2 else None)
        axes[r, 0].set_xticks([])
        axes[r, 0].set_yticks([])
        if row_titles:
            axes[r, 0].set_ylabel(row_titles[r], fontsize=8)
        for c in range(1, cols):
            if c - 1 < len(ms):
                overlay(axes[r, c], img, ms[c - 1], alpha=alpha)
            else:
                axes[r, c].axis("off")
    if col_titles:
        for c, t in enumerate(["image", *col_titles][:cols]):
            axes[0, c].set_title(t, fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def plot_curves(histories: dict, metrics: Sequence[str] = ("train_loss", "val_top1"), title: str = ""):
    """Training curves of one or more runs (``{label: history DataFrame}``), one panel per metric."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.2), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        for label, h in histories.items():
            if m in h.columns:
                d = h[["epoch", m]].dropna()
                ax.plot(d["epoch"], d[m], marker="o", ms=3, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(m)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
