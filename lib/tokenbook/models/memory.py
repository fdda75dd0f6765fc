"""Learnable Memory for timm Vision Transformers and other backbones of timm pre-norm Blocks (Sandler et al.,
"Fine-tuning Image Transformers using Learnable Memory", CVPR 2022).

Reference sheet: ``../shared/papers/learnable_memory.md``; notebook ``05_memory``, experiments in
:mod:`tokenbook.experiments.memory`, task splits in :mod:`tokenbook.data.tasks`. No official code was released; the public
re-implementations are CENG502 (``necrashter/transformers-learnable-memory``, HF ``transformers`` based) and
lucidrains' ``learnable_memory_vit.py``. This module follows the paper (Fig. 1, 2a, 3 and Table 1) and says where it
deviates from the public code.

The method
----------
- Every encoder layer ``l`` gets, per task, ``m`` fresh memory tokens ``E_mem^l`` (initialised ``N(0, 0.02)``).
  They are appended to that layer's **keys and values only**: memory never queries, is never propagated to the
  next layer and never goes through the MLP.
- ``memory_norm="pre"`` (default, paper Fig. 2a): the memory goes through the layer's pre-attention LayerNorm
  (``norm1``) together with the input tokens. ``memory_norm="post"``: the memory is appended after the LayerNorm,
  as both public implementations do. The two are different functions of the same parameters.
- Each new task adds its own class token (with the original class token's position embedding), its own memory and
  its own head; the backbone, the original class token and the original head stay frozen.
- The attention mask of the paper's Table 1: original tokens (patches, class/register tokens) see only original
  tokens; a task's class token sees the original tokens, itself and its own memory, and in **extension** also the
  class tokens and memories of the tasks it was trained on top of (``reads``); in **concatenation** it does not.

Token layout: queries are ``[original tokens (timm order: cls, registers, patches), task class tokens]``; keys and
values are ``[original tokens, task class tokens, memories of every task in task order]`` (Fig. 3, Table 1).
Per task the trainable parameters are ``depth*m*D`` (memory) + ``D`` (class token) + head, i.e.
``9,216*m + 768 + 769*C`` for ViT-B/32 with ``C`` classes.

Backbones
---------
A stateless adapter chosen by type gives the backbone-specific steps (embedding, the class token's position row,
task read-out, token count and grid); the layers are always computed here from timm's ``Block``/``Attention`` parts.

- **timm ``VisionTransformer``** (class-token or pooled head, register tokens allowed): ``patch_embed``,
  ``_pos_embed``, ``patch_drop``, ``norm_pre``; task class tokens get ``pos_embed[:, :1]`` (unless
  ``no_embed_class``), ``pos_drop`` and ``norm_pre``; a task token is read out through ``fc_norm`` and
  ``head_drop``.
- **Token-sequence backbones**, first of all tokenbook's ``T2TViT``
  (``MemoryViT(timm.create_model("t2t_vit_tiny_fmnist", ...))``). The contract: ``forward_tokens(x)`` returns the
  tokens that enter ``blocks[0]`` (class token at index 0 when ``cls_token`` is not None, position table and
  ``pos_drop`` applied), ``forward_features(x) == norm(blocks(forward_tokens(x)))``, ``blocks`` is a ModuleList /
  Sequential of timm pre-norm ``Block`` with ``timm.layers.Attention``, all ``embed_dim`` wide, ``norm`` is the
  final norm, ``num_prefix_tokens``, ``cls_token`` (or None), ``global_pool`` ``'token'`` or ``'avg'``,
  ``forward_head(x, pre_logits)`` and ``get_classifier()``. Task class tokens get the class token's position row
  ``pos_embed[:, :1]`` when the backbone has a 3-D ``pos_embed`` of length ``num_prefix_tokens + num_patches``
  (T2T-ViT's fixed sinusoid table; row 0 is the same under ``dynamic_img_size`` with either ``pos_embed_mode``),
  then ``pos_drop``. A task token's read-out is what ``forward_head(..., pre_logits=True)`` does to a class token
  (handed a sequence made of that token only; for T2T-ViT the token itself after the final norm). Masks use the
  actual token count; ``class_token_patch_attention`` uses ``tokens_to_token.grid_for``. A non-identity
  ``norm_pre`` is refused (whether ``forward_tokens`` applies it cannot be told).
- **Refused** with a ValueError that names what is supported: other block or attention types (T2T-ViT-SE's
  ``SEAttention``, T2T-ViT-Ghost's ``GhostAttention``/``GhostMlp``, T2T-ViT-Dense's ``DenseBlock``/``Transition``,
  timm's ``ResPostBlock`` etc.: the memory joins the keys and values inside exactly timm ``Attention``'s
  computation), ``global_pool=''``, and **ViTTM** (out of scope: no class token, and its timm Blocks see only the
  process stream while the memory stream is read and written by separate heads, so there is no single token
  sequence to add task tokens and memory to).

Everything else (exactness, masks, ``concatenate``, ``set_trainable``, ``finetune_model``, counts, attention read-outs)
is the same on both kinds.

Choices the paper leaves open, and differences from the public code
-------------------------------------------------------------------
- New class tokens: ``token_init="auto"`` copies the original class token (CENG502 and lucidrains draw std-1
  normals; ``token_init="normal", token_std=1.0`` reproduces that). Heads start at zero (``head_init="zeros"``;
  CENG502 uses PyTorch's default ``nn.Linear`` init, ``head_init="default"``).
- lucidrains gives the new class token no position embedding; we follow the paper's figures (index 0's).
- A quirk of ``memory_norm="pre"``: the LayerNorm removes each memory cell's mean and scale over channels, so a
  cell's output depends only on its direction (adding a constant to a cell changes nothing).
- Training: stochastic depth (``drop_path``) draws its per-sample mask separately for the original-token stream
  and each task stream in ``impl="exact"``/``"split"`` (one mask for all tokens in ``"joint"``). It is 0 in the
  usual frozen fine-tuning setting.

Exactness
---------
Three implementations of the same function (``impl``):

- ``"exact"`` (default): the original tokens are computed with exactly the operations of timm's ``Block`` on
  exactly the tensors the plain backbone sees (no mask needed: by Table 1 they read only original tokens), and each
  task's class token is computed on its own tensors and attends over exactly the keys its Table-1 row allows
  (original tokens, its own token and memory, plus those of the tasks it ``reads``), gathered in model order.
  The original head is **bit-identical** to the plain backbone, and a merged task is bit-identical to its
  stand-alone model (on CPU in float32).
- ``"split"``: original tokens as above (bit-identical); all task rows in one fused
  ``scaled_dot_product_attention`` call with the task rows of the Table-1 boolean mask. Merged tasks then match
  their stand-alone models only up to the kernel's rounding over the longer masked key sequence (about 1e-6).
- ``"joint"``: the paper's formulation, one masked fused attention over all queries with the full Table-1 mask;
  every output matches up to rounding (about 1e-6).

With the explicit attention path (``fused_attn=False``, used while counting MACs and recording attention) masked
entries are exact zeros after the softmax.

Public API
----------
``MemoryViT`` (wrapper with ``add_task``, ``set_outputs``, ``forward_all``, timm's ``forward_features`` /
``forward_head``, ``attention_mask``, ``task_state_dict``, ``load_task``), ``create_memory_vit``, ``concatenate``,
``naive_concatenate``, ``build_attention_mask``, ``table1_mask``, ``task_parameter_count``, ``memory_task_params``,
``record_attention``. The fine-tuning modes (``set_trainable``, ``finetune_model``) are
:mod:`tokenbook.methods.memory_finetune`; the attention read-outs for the figures (``memory_attention``,
``class_token_patch_attention``) are :mod:`tokenbook.experiments.memory`.

Size: about 1,050 lines, over the project's 800-line guide on purpose: one model (the wrapper, its backbone
adapters, its three exact / fused attention implementations, Table-1 masks and concatenation) whose
parts share private helpers and invariants (the token layout above); splitting it would spread one set of exactness
rules over files.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "MEMORY_NORMS", "ATTENTION_IMPLS", "MASK_MODES", "FINETUNE_MODES", "SOURCE",
    "MemoryTask", "MemoryViT", "create_memory_vit", "concatenate", "naive_concatenate", "build_attention_mask",
    "table1_mask", "task_parameter_count", "memory_task_params", "record_attention", "AttentionRecord",
]

#: where the memory joins: "pre" = through the pre-attention LayerNorm (paper Fig. 2a), "post" = after it
MEMORY_NORMS = ("pre", "post")
#: "exact" = original tokens and every task computed apart (bit-exact), "split" = original tokens apart + one masked
#: attention for all task rows, "joint" = one masked attention over all queries (the paper's formulation)
ATTENTION_IMPLS = ("exact", "split", "joint")
#: "paper" = Table 1; "cross_task" = originals protected, tasks see every task; "none" = no mask at all
MASK_MODES = ("paper", "cross_task", "none")
#: fine-tuning modes of the paper's main table
FINETUNE_MODES = ("full", "head", "head+cls", "memory")
#: name of the backbone's own head in the outputs
SOURCE = "source"

_TOKEN_INITS = ("auto", "copy", "normal", "zeros")
_HEAD_INITS = ("zeros", "default")


def _check_option(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(repr(a) for a in allowed)}")


# ----------------------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------------------
def build_attention_mask(
    num_input: int,
    has_token: Sequence[bool],
    cells: Sequence[int],
    reads: Sequence[Sequence[int]],
    mode: str = "paper",
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Boolean attention mask (True = attends) of the paper's Table 1, memory rows left out (memory never queries).

    Queries are ``[num_input original tokens, class tokens of the tasks with ``has_token``]``; keys are
    ``[original tokens, the same class tokens, memories of every task in task order (cells[t] each)]``.
    ``reads[t]`` lists the indices of earlier tasks whose class token and memory task ``t`` may read (extension);
    empty for concatenation. ``mode``: ``"paper"`` (Table 1), ``"cross_task"`` (original rows as in the paper, every
    task row sees every task token and memory: a naive merge that keeps the source task intact) or ``"none"``
    (all True: the naive merge of the paper's Sec. 4.4 where even the original tokens see the new tokens).

    Shape ``(num_input + T, num_input + T + sum(cells))`` with ``T = sum(has_token)``.
    """
    _check_option("mask mode", mode, MASK_MODES)
    n_tasks = len(has_token)
    if len(cells) != n_tasks or len(reads) != n_tasks:
        raise ValueError(f"has_token, cells and reads must have one entry per task, got {n_tasks}, {len(cells)}, "
                         f"{len(reads)}")
    for t, (tok, c) in enumerate(zip(has_token, cells)):
        if c < 0:
            raise ValueError(f"task {t}: cells must be >= 0, got {c}")
        if c > 0 and not tok:
            raise ValueError(f"task {t}: memory ({c} cells) needs a class token to read it")
    tok_col, mem_cols = {}, {}
    T = int(sum(bool(t) for t in has_token))
    M = int(sum(cells))
    off_t, off_m = num_input, num_input + T
    for t in range(n_tasks):
        if has_token[t]:
            tok_col[t] = off_t
            off_t += 1
        mem_cols[t] = (off_m, off_m + cells[t])
        off_m += cells[t]
    mask = torch.zeros(num_input + T, num_input + T + M, dtype=torch.bool, device=device)
    if mode == "none":
        return mask.fill_(True)
    mask[:, :num_input] = True
    for t in range(n_tasks):
        if not has_token[t]:
            continue
        row = tok_col[t]
        if mode == "cross_task":
            mask[row, num_input:] = True
            continue
        for s in (t, *reads[t]):
            if s < 0 or s >= n_tasks:
                raise ValueError(f"task {t} reads task index {s}, which does not exist")
            if s in tok_col:
                mask[row, tok_col[s]] = True
            a, b = mem_cols[s]
            mask[row, a:b] = True
    return mask


def table1_mask(num_input: int, cells: Sequence[int], kind: str = "concatenation") -> torch.Tensor:
    """The paper's Table 1 for ``len(cells)`` tasks that each have a class token: ``kind`` is
    ``"concatenation"`` (C_t sees only itself and M_t among the new tokens) or ``"extension"`` (C_t also sees every
    C_s, M_s with s < t)."""
    _check_option("kind", kind, ("concatenation", "extension"))
    n = len(cells)
    reads = [tuple(range(t)) if kind == "extension" else () for t in range(n)]
    return build_attention_mask(num_input, [True] * n, list(cells), reads)


# ----------------------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------------------
class MemoryTask(nn.Module):
    """One task's parameters: class token ``(1, 1, D)`` (or None), memory ``(depth, m, D)`` (or None), head.

    ``reads`` (names of earlier tasks this task may attend to, extension) is plain metadata, not in the state dict.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_classes: int,
        cells: int = 0,
        class_token: bool = True,
        reads: Sequence[str] = (),
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if cells < 0:
            raise ValueError(f"cells must be >= 0, got {cells}")
        if cells > 0 and not class_token:
            raise ValueError("a task with memory needs its own class token (memory is only read by it); "
                             "pass class_token=True or cells=0")
        dd = {"device": device, "dtype": dtype}
        self.cells = int(cells)
        self.reads: tuple[str, ...] = tuple(reads)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim, **dd)) if class_token else None
        self.memory = nn.Parameter(torch.zeros(depth, cells, dim, **dd)) if cells > 0 else None
        self.head = nn.Linear(dim, num_classes, **dd)

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    @property
    def has_token(self) -> bool:
        return self.class_token is not None

    def parameter_count(self) -> dict[str, int]:
        mem = 0 if self.memory is None else self.memory.numel()
        tok = 0 if self.class_token is None else self.class_token.numel()
        head = sum(p.numel() for p in self.head.parameters())
        return {"memory": mem, "class_token": tok, "head": head, "total": mem + tok + head}

    def extra_repr(self) -> str:
        return f"cells={self.cells}, class_token={self.has_token}, reads={list(self.reads)}"


def memory_task_params(depth: int, dim: int, cells: int, num_classes: int, class_token: bool = True) -> int:
    """Analytic parameter count of one task: ``depth*cells*dim`` (memory) + ``dim`` (class token) + head.

    For ViT-B/32 (depth 12, dim 768): ``9216*m + 768 + 768*C + C``.
    """
    return depth * cells * dim + (dim if class_token else 0) + dim * num_classes + num_classes


# ----------------------------------------------------------------------------------------------------------
# Attention recording (for figures)
# ----------------------------------------------------------------------------------------------------------
@dataclass
class AttentionRecord:
    """Attention probabilities of one layer. ``source``: ``(B, H, L0, L0)`` rows/cols of the original tokens.
    ``tasks``: ``(B, H, T, L0 + T + M)`` rows of the task class tokens (None without task tokens)."""

    layer: int
    source: torch.Tensor
    tasks: Optional[torch.Tensor]


# ----------------------------------------------------------------------------------------------------------
# The wrapper
# ----------------------------------------------------------------------------------------------------------
#: attributes a token-sequence backbone must have (see the module doc, "Backbones")
_TOKEN_BACKBONE_ATTRS = ("forward_tokens", "blocks", "norm", "num_prefix_tokens", "cls_token", "forward_head",
                         "global_pool", "get_classifier", "embed_dim")


def _check_blocks(blocks: Iterable[nn.Module]) -> None:
    from timm.layers import Attention
    from timm.models.vision_transformer import Block

    for i, blk in enumerate(blocks):
        attn = getattr(blk, "attn", None)
        if type(blk) is not Block or type(attn) is not Attention:
            raise ValueError(f"block {i} is {type(blk).__name__} with attention {type(attn).__name__}; MemoryViT "
                             "supports only timm's pre-norm Block with timm.layers.Attention (not ResPostBlock, "
                             "ParallelScalingBlock, ...): the memory joins the keys and values inside exactly that "
                             "computation. T2T-ViT-SE (SEAttention), T2T-ViT-Ghost (GhostAttention, GhostMlp) and "
                             "T2T-ViT-Dense (DenseBlock, Transition) compute something else and are refused")


class _TimmViTAdapter:
    """timm ``VisionTransformer`` (the original path). Stateless: every method takes the backbone."""

    name = "timm VisionTransformer"

    def check(self, backbone: nn.Module) -> None:
        _check_blocks(backbone.blocks)
        if not backbone.global_pool:
            raise ValueError("the backbone has global_pool='' (no pooling), so its head is per token; create it with "
                             "global_pool='token' (class-token ViT) or 'avg' (pooled-head ViT)")

    def ref_tensor(self, bb: nn.Module) -> torch.Tensor:
        return bb.cls_token if bb.cls_token is not None else bb.patch_embed.proj.weight

    def num_tokens(self, bb: nn.Module) -> int:
        return bb.patch_embed.num_patches + bb.num_prefix_tokens

    def embed(self, bb: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = bb.patch_embed(x)
        x = bb._pos_embed(x)
        x = bb.patch_drop(x)
        return bb.norm_pre(x)

    def class_position(self, bb: nn.Module) -> Optional[torch.Tensor]:
        if bb.pos_embed is not None and bb.cls_token is not None and not bb.no_embed_class:
            return bb.pos_embed[:, :1]
        return None

    def embed_task_tokens(self, bb: nn.Module, x_t: torch.Tensor, x_o: torch.Tensor) -> torch.Tensor:
        return bb.norm_pre(bb.pos_drop(x_t))

    def task_readout(self, bb: nn.Module, tok: torch.Tensor) -> torch.Tensor:
        return bb.head_drop(bb.fc_norm(tok))

    def grid(self, bb: nn.Module, images: torch.Tensor) -> tuple[int, int]:
        return bb.patch_embed.dynamic_feat_size(images.shape[-2:]) if bb.dynamic_img_size else bb.patch_embed.grid_size


class _TokenSequenceAdapter:
    """A token-sequence backbone such as ``T2TViT`` (contract: module doc, "Backbones"). Stateless."""

    name = "token-sequence backbone"

    def check(self, bb: nn.Module) -> None:
        if not isinstance(bb.blocks, (nn.ModuleList, nn.Sequential)) or len(bb.blocks) == 0:
            raise ValueError(f"blocks must be a non-empty ModuleList/Sequential of timm Blocks, got {bb.blocks!r}")
        _check_blocks(bb.blocks)
        D, npt, cls = bb.embed_dim, bb.num_prefix_tokens, bb.cls_token
        widths = sorted({blk.attn.qkv.in_features for blk in bb.blocks} | {D})
        if len(widths) > 1:
            raise ValueError(f"blocks of widths {widths} (embed_dim {D}): MemoryViT needs one width for all blocks")
        if bb.global_pool not in ("token", "avg") or (bb.global_pool == "token" and cls is None):
            raise ValueError(f"global_pool={bb.global_pool!r} with cls_token {'None' if cls is None else 'set'}; "
                             "MemoryViT supports 'token' (class-token read-out, needs cls_token) or 'avg'")
        if not isinstance(npt, int) or npt < (cls is not None) or (cls is not None and tuple(cls.shape) != (1, 1, D)):
            raise ValueError(f"cls_token must be None or (1, 1, {D}) at token index 0 with num_prefix_tokens >= 1; "
                             f"got {getattr(cls, 'shape', None)} and num_prefix_tokens={npt!r}")
        norm_pre = getattr(bb, "norm_pre", None)
        if norm_pre is not None and not isinstance(norm_pre, nn.Identity):
            raise ValueError(f"norm_pre is {type(norm_pre).__name__}: whether forward_tokens applies it cannot be "
                             "told, so task class tokens could be treated unlike the class token; not supported")

    @staticmethod
    def _num_patches(bb: nn.Module) -> Optional[int]:
        for owner in (getattr(bb, "tokens_to_token", None), getattr(bb, "patch_embed", None), bb):
            n = getattr(owner, "num_patches", None) if owner is not None else None
            if isinstance(n, int):
                return n
        return None

    def ref_tensor(self, bb: nn.Module) -> torch.Tensor:
        return bb.cls_token if bb.cls_token is not None else next(bb.parameters())

    def num_tokens(self, bb: nn.Module) -> int:
        n = self._num_patches(bb)
        if n is None:
            raise ValueError(f"{type(bb).__name__} does not say its number of patches (tokens_to_token.num_patches, "
                             "patch_embed.num_patches or num_patches); pass num_input")
        return n + bb.num_prefix_tokens

    def class_position(self, bb: nn.Module) -> Optional[torch.Tensor]:
        """``pos_embed[:, :1]`` when the table covers the prefix tokens (class token first), else None."""
        pe = getattr(bb, "pos_embed", None)
        if bb.cls_token is None or not isinstance(pe, torch.Tensor) or getattr(bb, "no_embed_class", False):
            return None
        n = self._num_patches(bb)
        if pe.ndim == 3 and pe.shape[-1] == bb.embed_dim and n is not None and pe.shape[1] == n + bb.num_prefix_tokens:
            return pe[:, :1]
        return None

    def embed(self, bb: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return bb.forward_tokens(x)

    def embed_task_tokens(self, bb: nn.Module, x_t: torch.Tensor, x_o: torch.Tensor) -> torch.Tensor:
        x_t = x_t.to(x_o.dtype)
        drop = getattr(bb, "pos_drop", None)
        return x_t if drop is None else drop(x_t)

    def task_readout(self, bb: nn.Module, tok: torch.Tensor) -> torch.Tensor:
        """``forward_head(pre_logits=True)`` of a class token: the token fills a ``num_prefix_tokens + 1`` sequence,
        so 'token' (index 0) and 'avg' (mean of one token) pooling both read it unchanged."""
        return bb.forward_head(tok.unsqueeze(1).expand(-1, bb.num_prefix_tokens + 1, -1), pre_logits=True)

    def grid(self, bb: nn.Module, images: torch.Tensor) -> tuple[int, int]:
        t2t = getattr(bb, "tokens_to_token", None)
        if t2t is not None and hasattr(t2t, "grid_for"):
            return tuple(t2t.grid_for(tuple(images.shape[-2:])))
        pe = getattr(bb, "patch_embed", None)
        if pe is not None and hasattr(pe, "grid_size") and not getattr(bb, "dynamic_img_size", False):
            return tuple(pe.grid_size)
        raise ValueError(f"{type(bb).__name__} does not say its token grid (tokens_to_token.grid_for or "
                         "patch_embed.grid_size), so attention maps cannot be laid out as images")


def _backbone_adapter(backbone: nn.Module):
    """The adapter for ``backbone``, after checking it (ValueError naming what is supported and why)."""
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(backbone, VisionTransformer):
        adapter = _TimmViTAdapter()
        adapter.check(backbone)
        return adapter
    try:
        from tokenbook.models.vittm import ViTTM
    except ImportError:  # pragma: no cover - the package always has it
        ViTTM = ()
    if isinstance(backbone, ViTTM):
        raise ValueError("ViTTM is not supported by MemoryViT (out of scope): it has no class token (both heads "
                         "mean-pool) and its timm Blocks see only the process stream (memory tokens are read and "
                         "written by separate heads), so there is no single token sequence with a class token to "
                         "add task class tokens and memory to")
    missing = [a for a in _TOKEN_BACKBONE_ATTRS if not hasattr(backbone, a)]
    if missing:
        raise ValueError(f"MemoryViT needs a timm VisionTransformer (timm.create_model('vit_...'); EVA, "
                         f"DeiT-distilled, Swin etc. are not supported) or a token-sequence backbone of timm "
                         f"pre-norm Blocks such as tokenbook's T2TViT (with {', '.join(_TOKEN_BACKBONE_ATTRS)}); got "
                         f"{type(backbone).__name__}, which lacks {', '.join(missing)}")
    adapter = _TokenSequenceAdapter()
    adapter.check(backbone)
    return adapter


class MemoryViT(nn.Module):
    """A timm ``VisionTransformer`` (or a token-sequence backbone such as ``T2TViT``) with per-task learnable memory,
    class tokens and heads.

    Args:
        backbone: a pre-trained timm VisionTransformer (class-token or pooled head; register tokens allowed) or a
            token-sequence backbone of timm pre-norm Blocks (module doc, "Backbones"; ``backbone_kind`` says which).
            It is used in place (not copied): several ``MemoryViT`` may share one frozen backbone.
        memory_norm: ``"pre"`` (paper Fig. 2a, default) or ``"post"`` (public implementations), see module doc.
        impl: ``"exact"`` (default; bit-exact source head and merged tasks), ``"split"`` (one masked attention for
            the task rows) or ``"joint"`` (one masked attention for all rows, as in the paper). See module doc.
        mask: ``"paper"`` (Table 1, default), ``"cross_task"`` or ``"none"`` (naive merges, see
            ``build_attention_mask``). ``"none"`` always runs the joint path.
        freeze_backbone: set ``requires_grad=False`` on every backbone parameter (default True).

    ``forward(x)`` returns the logits selected by ``set_outputs`` (default: a tuple with the source head first, then
    every task in order of addition); ``forward_all(x)`` returns a dict name -> logits.

    Task read-out: a task's class token after the backbone's final ``norm`` goes through the backbone's ``fc_norm``
    and ``head_drop`` (the same path as the pooled original features; token-sequence backbones: what
    ``forward_head(pre_logits=True)`` does to a class token), then the task head. A task without class
    token (``head`` mode) reads the original pooled features ``forward_head(pre_logits=True)``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        memory_norm: str = "pre",
        impl: str = "exact",
        mask: str = "paper",
        freeze_backbone: bool = True,
    ) -> None:
        super().__init__()
        _check_option("memory_norm", memory_norm, MEMORY_NORMS)
        _check_option("impl", impl, ATTENTION_IMPLS)
        _check_option("mask", mask, MASK_MODES)
        self._adapter = _backbone_adapter(backbone)
        self.backbone = backbone
        self.memory_norm = memory_norm
        self.impl = impl
        self.mask_mode = mask
        self.tasks = nn.ModuleDict()
        self._outputs: Optional[Union[str, tuple[str, ...]]] = None
        self._recorder: Optional[list[AttentionRecord]] = None
        self._mask_cache: dict = {}
        if freeze_backbone:
            backbone.requires_grad_(False)

    # -- properties -------------------------------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim

    @property
    def depth(self) -> int:
        return len(self.backbone.blocks)

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks.keys())

    @property
    def output_names(self) -> list[str]:
        return [SOURCE] + self.task_names

    @property
    def backbone_kind(self) -> str:
        """``"timm VisionTransformer"`` or ``"token-sequence backbone"`` (see the module doc, "Backbones")."""
        return self._adapter.name

    def _ref_tensor(self) -> torch.Tensor:
        return self._adapter.ref_tensor(self.backbone)

    # -- tasks ------------------------------------------------------------------------------------------------
    def add_task(
        self,
        name: str,
        num_classes: int,
        cells: int = 0,
        class_token: bool = True,
        extend: bool = False,
        reads: Optional[Sequence[str]] = None,
        memory_std: float = 0.02,
        token_init: str = "auto",
        token_std: float = 0.02,
        head_init: str = "zeros",
    ) -> MemoryTask:
        """Add a task and return its ``MemoryTask`` (whose parameters are the ones to train).

        Args:
            name: unique task name (not ``"source"``; a valid module name, no dots).
            num_classes: classes of the task's head.
            cells: memory tokens per layer ``m`` (0 = head + class token only).
            class_token: give the task its own class token (False: head on the original pooled features).
            extend: model *extension*: the task may read the class tokens and memories of every task already in
                the model (Table 1's starred cells). Default False (*concatenation* semantics).
            reads: explicit list of earlier task names to read instead of ``extend``.
            memory_std: memory init ``N(0, memory_std)`` (paper: 0.02; lucidrains uses 1).
            token_init: ``"copy"`` the original class token, ``"normal"`` (std ``token_std``), ``"zeros"``, or
                ``"auto"`` = copy when the backbone has a class token, else normal. The paper does not say; CENG502
                uses a standard normal (``token_init="normal", token_std=1.0``).
            head_init: ``"zeros"`` (default, big_vision's fine-tuning convention; our choice, the paper does not
                say) or ``"default"`` (PyTorch ``nn.Linear`` init, as CENG502).
        """
        _check_option("token_init", token_init, _TOKEN_INITS)
        _check_option("head_init", head_init, _HEAD_INITS)
        if not isinstance(name, str) or not name or "." in name or name == SOURCE:
            raise ValueError(f"task name must be a non-empty string without dots and not {SOURCE!r}, got {name!r}")
        if name in self.tasks:
            raise ValueError(f"task {name!r} already exists; existing tasks: {self.task_names}")
        if reads is not None and extend:
            raise ValueError("pass either extend=True or reads=[...], not both")
        if reads is None:
            reads = [n for n in self.task_names if self.tasks[n].has_token] if extend else []
        unknown = [r for r in reads if r not in self.tasks]
        if unknown:
            raise ValueError(f"reads names unknown tasks {unknown}; existing tasks: {self.task_names}")
        if reads and not class_token:
            raise ValueError("a task without class token cannot read other tasks' tokens; pass class_token=True")
        ref = self._ref_tensor()
        task = MemoryTask(self.embed_dim, self.depth, num_classes, cells=cells, class_token=class_token,
                          reads=reads, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            if task.memory is not None:
                nn.init.normal_(task.memory, std=memory_std)
            if task.class_token is not None:
                mode = token_init
                if mode == "auto":
                    mode = "copy" if self.backbone.cls_token is not None else "normal"
                if mode == "copy":
                    if self.backbone.cls_token is None:
                        raise ValueError("token_init='copy' needs a backbone with a class token; this one has none "
                                         "(pooled head), use token_init='normal'")
                    task.class_token.copy_(self.backbone.cls_token.detach())
                elif mode == "normal":
                    nn.init.normal_(task.class_token, std=token_std)
                else:
                    task.class_token.zero_()
            if head_init == "zeros":
                task.head.weight.zero_()
                task.head.bias.zero_()
        self.tasks[name] = task
        self._mask_cache.clear()
        return task

    def remove_task(self, name: str) -> MemoryTask:
        """Remove and return a task; tasks that read it lose that read (their outputs change)."""
        self._require_task(name)
        task = self.tasks[name]
        del self.tasks[name]
        for t in self.tasks.values():
            t.reads = tuple(r for r in t.reads if r != name)
        self._mask_cache.clear()
        if isinstance(self._outputs, str) and self._outputs == name:
            self._outputs = None
        elif isinstance(self._outputs, tuple) and name in self._outputs:
            self._outputs = tuple(o for o in self._outputs if o != name)
        return task

    def rename_task(self, old: str, new: str) -> None:
        """Rename a task (e.g. before ``concatenate`` when two models use the same name)."""
        self._require_task(old)
        if new in self.tasks or new == SOURCE or not new or "." in new:
            raise ValueError(f"cannot rename {old!r} to {new!r}: name taken or invalid")
        items = [(new if k == old else k, v) for k, v in self.tasks.items()]
        self.tasks = nn.ModuleDict(items)
        for t in self.tasks.values():
            t.reads = tuple(new if r == old else r for r in t.reads)
        self._mask_cache.clear()

    def _require_task(self, name: str) -> None:
        if name not in self.tasks:
            raise ValueError(f"no task {name!r}; tasks: {self.task_names}")

    def task_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The task's tensors (``class_token``, ``memory``, ``head.weight``, ``head.bias``; absent ones left out)."""
        self._require_task(name)
        return {k: v.detach().clone() for k, v in self.tasks[name].state_dict().items()}

    def load_task(self, name: str, state: dict[str, torch.Tensor], reads: Sequence[str] = ()) -> MemoryTask:
        """Add task ``name`` from a ``task_state_dict`` (shapes give cells, classes and class-token use).

        Raises ValueError listing unexpected keys, missing keys and shape mismatches.
        """
        allowed = {"class_token", "memory", "head.weight", "head.bias"}
        unexpected = sorted(set(state) - allowed)
        missing = sorted({"head.weight", "head.bias"} - set(state))
        if unexpected or missing:
            raise ValueError(f"task state for {name!r} does not match: missing keys {missing}, unexpected keys "
                             f"{unexpected}")
        D, L = self.embed_dim, self.depth
        w = state["head.weight"]
        problems = []
        if w.ndim != 2 or w.shape[1] != D:
            problems.append(f"head.weight {tuple(w.shape)} != (C, {D})")
        elif tuple(state["head.bias"].shape) != (w.shape[0],):
            problems.append(f"head.bias {tuple(state['head.bias'].shape)} != ({w.shape[0]},)")
        if "class_token" in state and tuple(state["class_token"].shape) != (1, 1, D):
            problems.append(f"class_token {tuple(state['class_token'].shape)} != (1, 1, {D})")
        cells = 0
        if "memory" in state:
            m = state["memory"]
            if m.ndim != 3 or m.shape[0] != L or m.shape[2] != D:
                problems.append(f"memory {tuple(m.shape)} != ({L}, m, {D})")
            else:
                cells = m.shape[1]
        if problems:
            raise ValueError(f"task state for {name!r} has wrong shapes: {'; '.join(problems)}")
        task = self.add_task(name, w.shape[0], cells=cells, class_token="class_token" in state, reads=list(reads))
        task.load_state_dict(state, strict=True)
        return task

    # -- outputs ----------------------------------------------------------------------------------------------
    def set_outputs(self, names: Optional[Union[str, Sequence[str]]] = None) -> "MemoryViT":
        """Select what ``forward`` returns: None = all heads (tuple), a name = that head's logits (a tensor, e.g.
        while training one task), a list = a tuple in that order."""
        if names is None:
            self._outputs = None
            return self
        wanted = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in wanted if n not in self.output_names]
        if unknown:
            raise ValueError(f"unknown outputs {unknown}; available: {self.output_names}")
        self._outputs = names if isinstance(names, str) else tuple(wanted)
        return self

    # -- masks ------------------------------------------------------------------------------------------------
    def attention_mask(self, num_input: Optional[int] = None, device: Optional[torch.device] = None) -> torch.Tensor:
        """The full boolean mask (queries: original + task tokens, keys: + memories) used by this model.

        ``num_input`` defaults to the backbone's number of original tokens at its native image size.
        """
        if num_input is None:
            num_input = self._adapter.num_tokens(self.backbone)
        key = (num_input, str(device), self.mask_mode)
        if key not in self._mask_cache:
            names = [n for n, t in self.tasks.items() if t.has_token]
            index = {n: i for i, n in enumerate(names)}
            tasks = [self.tasks[n] for n in names]
            self._mask_cache[key] = build_attention_mask(
                num_input, [True] * len(tasks), [t.cells for t in tasks],
                [[index[r] for r in t.reads if r in index] for t in tasks], mode=self.mask_mode, device=device)
        return self._mask_cache[key]

    # -- forward ----------------------------------------------------------------------------------------------
    def _task_tokens(self, batch: int) -> Optional[torch.Tensor]:
        """Task class tokens with the original class token's position embedding, ``(B, T, D)``."""
        toks = [t.class_token for t in self.tasks.values() if t.has_token]
        if not toks:
            return None
        x = torch.cat(toks, dim=1)
        pos = self._adapter.class_position(self.backbone)
        if pos is not None:
            x = x + pos
        return x.expand(batch, -1, -1)

    def _memory(self, layer: int) -> Optional[torch.Tensor]:
        mems = [t.memory[layer] for t in self.tasks.values() if t.memory is not None]
        return torch.cat(mems, dim=0) if mems else None

    @staticmethod
    def _qkv(attn: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, _ = h.shape
        qkv = attn.qkv(h).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return attn.q_norm(q), attn.k_norm(k), v

    def _attend(self, attn: nn.Module, q, k, v, mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """timm ``Attention``'s core: fused SDPA (with the boolean mask) or the explicit path (same op order)."""
        if attn.fused_attn and self._recorder is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                 dropout_p=attn.attn_drop.p if self.training else 0.0)
            return out, None
        q = q * attn.scale
        a = q @ k.transpose(-2, -1)
        if mask is not None:
            a = a.masked_fill(~mask, float("-inf"))
        a = a.softmax(dim=-1)
        probs = a.detach() if self._recorder is not None else None
        a = attn.attn_drop(a)
        return a @ v, probs

    @staticmethod
    def _attn_out(attn: nn.Module, o: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        B, _, N, _ = o.shape
        o = attn.norm(o.transpose(1, 2).reshape(B, N, attn.attn_dim))
        if attn.gate is not None:
            o = o * attn.gate(h).sigmoid()
        return attn.proj_drop(attn.proj(o))

    def _memory_kv(self, blk: nn.Module, mem: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        m = blk.norm1(mem) if self.memory_norm == "pre" else mem
        _, k, v = self._qkv(blk.attn, m.unsqueeze(0))
        return k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)

    @staticmethod
    def _residual(blk: nn.Module, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        x = x + blk.drop_path1(blk.ls1(a))
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))

    def _layer_split(self, i: int, blk, x_o, x_t, mem, task_mask):
        attn = blk.attn
        h_o = blk.norm1(x_o)
        q_o, k_o, v_o = self._qkv(attn, h_o)
        a_o, p_o = self._attend(attn, q_o, k_o, v_o, None)
        p_t = None
        if x_t is not None:
            B = x_t.shape[0]
            h_t = blk.norm1(x_t)
            q_t, k_t, v_t = self._qkv(attn, h_t)
            ks, vs = [k_o, k_t], [v_o, v_t]
            if mem is not None:
                k_m, v_m = self._memory_kv(blk, mem, B)
                ks.append(k_m)
                vs.append(v_m)
            a_t, p_t = self._attend(attn, q_t, torch.cat(ks, dim=2), torch.cat(vs, dim=2), task_mask)
            x_t = self._residual(blk, x_t, self._attn_out(attn, a_t, h_t))
        x_o = self._residual(blk, x_o, self._attn_out(attn, a_o, h_o))
        if self._recorder is not None:
            self._recorder.append(AttentionRecord(i, p_o, p_t))
        return x_o, x_t

    def _layer_joint(self, i: int, blk, x_o, x_t, mem, mask):
        attn = blk.attn
        L0 = x_o.shape[1]
        x = x_o if x_t is None else torch.cat([x_o, x_t], dim=1)
        h = blk.norm1(x)
        q, k, v = self._qkv(attn, h)
        if mem is not None:
            k_m, v_m = self._memory_kv(blk, mem, x.shape[0])
            k, v = torch.cat([k, k_m], dim=2), torch.cat([v, v_m], dim=2)
        a, p = self._attend(attn, q, k, v, mask)
        x = self._residual(blk, x, self._attn_out(attn, a, h))
        if self._recorder is not None:
            self._recorder.append(AttentionRecord(i, p[:, :, :L0, :L0], None if x_t is None else p[:, :, L0:]))
        return x[:, :L0], (None if x_t is None else x[:, L0:])

    def _visible(self) -> list[list[int]]:
        """Per token task (in order): indices of the token tasks whose class token/memory it reads, itself included,
        in model order (the nonzero task columns of its Table-1 row)."""
        names = [n for n, t in self.tasks.items() if t.has_token]
        out = []
        for n in names:
            if self.mask_mode == "cross_task":
                out.append(list(range(len(names))))
            else:
                allowed = set(self.tasks[n].reads) | {n}
                out.append([s for s, m in enumerate(names) if m in allowed])
        return out

    def _layer_exact(self, i: int, blk, x_o, xs: list, visible: list[list[int]]):
        attn = blk.attn
        h_o = blk.norm1(x_o)
        q_o, k_o, v_o = self._qkv(attn, h_o)
        a_o, p_o = self._attend(attn, q_o, k_o, v_o, None)
        tasks = [t for t in self.tasks.values() if t.has_token]
        B = x_o.shape[0]
        hs, qs, ks, vs, kms, vms = [], [], [], [], [], []
        for x_j, task in zip(xs, tasks):  # every task stream on its own tensors: same shapes as stand-alone
            h = blk.norm1(x_j)
            q, k, v = self._qkv(attn, h)
            hs.append(h), qs.append(q), ks.append(k), vs.append(v)
            if task.memory is not None:
                mem = task.memory[i]
                if not torch.is_grad_enabled():
                    # a view of a leaf made under no_grad claims requires_grad without a grad_fn, which trips module
                    # hooks (e.g. FlopCounterMode's tracker); nothing needs its gradient here
                    mem = mem.detach()
                k_m, v_m = self._memory_kv(blk, mem, B)
            else:
                k_m = v_m = None
            kms.append(k_m), vms.append(v_m)
        new_xs, probs = [], []
        for j, x_j in enumerate(xs):
            vis = visible[j]
            kk = [k_o] + [ks[s] for s in vis] + [kms[s] for s in vis if kms[s] is not None]
            vv = [v_o] + [vs[s] for s in vis] + [vms[s] for s in vis if vms[s] is not None]
            a, p = self._attend(attn, qs[j], torch.cat(kk, dim=2), torch.cat(vv, dim=2), None)
            new_xs.append(self._residual(blk, x_j, self._attn_out(attn, a, hs[j])))
            if p is not None:
                probs.append(self._scatter_probs(p, vis, x_o.shape[1]))
        x_o = self._residual(blk, x_o, self._attn_out(attn, a_o, h_o))
        if self._recorder is not None:
            self._recorder.append(AttentionRecord(i, p_o, torch.cat(probs, dim=2) if probs else None))
        return x_o, new_xs

    def _scatter_probs(self, p: torch.Tensor, vis: list[int], L0: int) -> torch.Tensor:
        """Put one task's probabilities over its visible keys into the full key layout (zeros where masked)."""
        cols = self.attention_mask(L0, device=p.device)
        token_tasks = [t for t in self.tasks.values() if t.has_token]
        T = len(token_tasks)
        idx = list(range(L0)) + [L0 + s for s in vis]
        offs, off = [], L0 + T
        for t in token_tasks:
            offs.append(off)
            off += t.cells
        for s in vis:
            idx += list(range(offs[s], offs[s] + token_tasks[s].cells))
        full = p.new_zeros(*p.shape[:-1], cols.shape[1])
        full[..., idx] = p
        return full

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Final-normed tokens: ``(original (B, L0, D), task class tokens (B, T, D) or None)``."""
        bb = self.backbone
        x_o = self._adapter.embed(bb, x)
        L0 = x_o.shape[1]
        x_t = self._task_tokens(x_o.shape[0])
        if x_t is not None:
            x_t = self._adapter.embed_task_tokens(bb, x_t, x_o)
        impl = "joint" if self.mask_mode == "none" else self.impl
        if impl == "exact":
            xs = [] if x_t is None else list(x_t.split(1, dim=1))
            visible = self._visible()
            for i, blk in enumerate(bb.blocks):
                x_o, xs = self._layer_exact(i, blk, x_o, xs, visible)
            x_t = torch.cat(xs, dim=1) if xs else None
        else:
            mask = None
            if x_t is not None and self.mask_mode != "none":
                full = self.attention_mask(L0, device=x_o.device)
                mask = full if impl == "joint" else full[L0:]
            for i, blk in enumerate(bb.blocks):
                mem = self._memory(i) if x_t is not None else None
                if impl == "joint":
                    x_o, x_t = self._layer_joint(i, blk, x_o, x_t, mem, mask)
                else:
                    x_o, x_t = self._layer_split(i, blk, x_o, x_t, mem, mask)
        x_o = bb.norm(x_o)
        if x_t is not None:
            x_t = bb.norm(x_t)
        return x_o, x_t

    def forward_head(self, x: tuple[torch.Tensor, Optional[torch.Tensor]],
                     pre_logits: bool = False) -> dict[str, torch.Tensor]:
        """timm's ``forward_head(x, pre_logits=False)`` for several heads. ``x`` is what :meth:`forward_features`
        returns, the pair ``(original tokens, task class tokens or None)``. Returns one entry per head,
        ``{"source": ..., task: ...}`` (the backbone's own head first, then the tasks in order): the logits, or with
        ``pre_logits=True`` the features each head reads (the backbone's pooled features for ``"source"`` and for
        tasks without a class token, a task token's read-out otherwise)."""
        x_o, x_t = x
        bb = self.backbone
        out = {SOURCE: bb.forward_head(x_o, pre_logits=pre_logits)}
        pooled = None
        j = 0
        for name, task in self.tasks.items():
            if task.has_token:
                feat = self._adapter.task_readout(bb, x_t[:, j])
                j += 1
            else:
                if pooled is None:
                    pooled = bb.forward_head(x_o, pre_logits=True)
                feat = pooled
            out[name] = feat if pre_logits else task.head(feat)
        return out

    def forward_all(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits of every head: ``{"source": ..., task: ...}``."""
        return self.forward_head(self.forward_features(x))

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, tuple[torch.Tensor, ...]]:
        outs = self.forward_all(x)
        if self._outputs is None:
            return tuple(outs.values())
        if isinstance(self._outputs, str):
            return outs[self._outputs]
        return tuple(outs[n] for n in self._outputs)


# ----------------------------------------------------------------------------------------------------------
# Construction, parameter accounting
# ----------------------------------------------------------------------------------------------------------
def create_memory_vit(
    model_name: str,
    pretrained: bool = False,
    checkpoint_file: Optional[str] = None,
    checkpoint_num_classes: Optional[int] = None,
    memory_norm: str = "pre",
    impl: str = "exact",
    mask: str = "paper",
    freeze_backbone: bool = True,
    **model_kwargs: Any,
) -> MemoryViT:
    """``timm.create_model(model_name, ...)`` wrapped in ``MemoryViT``.

    ``checkpoint_file`` loads a local checkpoint through timm's own loader
    (``pretrained=True, pretrained_cfg_overlay=dict(file=...)``, with timm's ``checkpoint_filter_fn``: .npz from
    big_vision/the original ViT release, .pth/.safetensors in timm format), e.g. the paper's ImageNet-21k ViT-B/32 as
    ``create_memory_vit("vit_base_patch32_224.augreg_in21k", checkpoint_file=path)``. timm drops the checkpoint's
    head when ``num_classes`` differs from the pretrained config's; ``checkpoint_num_classes`` states the head size
    of the file (so a matching head is kept).
    """
    import timm

    if checkpoint_file is not None:
        pretrained = True
        overlay = dict(model_kwargs.pop("pretrained_cfg_overlay", None) or {}, file=str(checkpoint_file))
        if checkpoint_num_classes is not None:
            overlay["num_classes"] = checkpoint_num_classes
        model_kwargs["pretrained_cfg_overlay"] = overlay
    backbone = timm.create_model(model_name, pretrained=pretrained, **model_kwargs)
    return MemoryViT(backbone, memory_norm=memory_norm, impl=impl, mask=mask, freeze_backbone=freeze_backbone)


def task_parameter_count(model: MemoryViT, task: str) -> dict[str, int]:
    """Per-task parameters: ``{"memory", "class_token", "head", "total"}``."""
    model._require_task(task)
    return model.tasks[task].parameter_count()


# ----------------------------------------------------------------------------------------------------------
# Concatenation
# ----------------------------------------------------------------------------------------------------------
def _group_keys(keys: Iterable[str]) -> list[str]:
    """State-dict keys, with whole blocks collapsed: ``blocks.2 (12 tensors)`` rather than twelve entries."""
    by_block: dict[str, list[str]] = {}
    rest = []
    for k in keys:
        parts = k.split(".")
        if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit():
            by_block.setdefault(f"blocks.{parts[1]}", []).append(k)
        else:
            rest.append(k)
    out = [f"{b} ({len(v)} tensors)" if len(v) > 1 else v[0]
           for b, v in sorted(by_block.items(), key=lambda kv: int(kv[0].split(".")[1]))]
    return out + sorted(rest)


def _backbone_differences(a: nn.Module, b: nn.Module) -> list[str]:
    """What differs between two backbones: missing, then unexpected blocks/keys, then shapes, then values."""
    if a is b:
        return []
    sa, sb = a.state_dict(), b.state_dict()
    diffs = [f"missing {k}" for k in _group_keys(sa.keys() - sb.keys())]
    diffs += [f"unexpected {k}" for k in _group_keys(sb.keys() - sa.keys())]
    shapes, values = [], []
    for k in sorted(sa.keys() & sb.keys()):
        x, y = sa[k], sb[k]
        if x.shape != y.shape or x.dtype != y.dtype:
            shapes.append(f"{k} shape/dtype {tuple(x.shape)}/{x.dtype} vs {tuple(y.shape)}/{y.dtype}")
        elif x.device.type != "meta" and not torch.equal(x, y.to(x.device)):
            values.append(f"{k} values differ")
    return diffs + shapes + values


def concatenate(models: Sequence[MemoryViT], mask: str = "paper", copy_tasks: bool = True) -> MemoryViT:
    """Merge task models that share a backbone into one model that computes every head in one forward pass.

    The merged model uses the first model's backbone (shared, not copied) and settings (``memory_norm``, ``impl``);
    the tasks keep their order (model by model) and their ``reads`` (extension links). With ``mask="paper"`` every
    merged task gives its stand-alone output and the source head is unchanged. ``copy_tasks=True`` (default) copies
    the task parameters so the donors stay usable (CENG502 moves them and the donor must not be reused).

    Raises ValueError when backbones differ (listing the differing tensors), settings differ, or task names clash.
    """
    if not models:
        raise ValueError("concatenate needs at least one model")
    for i, m in enumerate(models):
        if not isinstance(m, MemoryViT):
            raise ValueError(f"model {i} is {type(m).__name__}, not MemoryViT")
    first = models[0]
    seen: dict[str, int] = {}
    for i, m in enumerate(models):
        if m.memory_norm != first.memory_norm:
            raise ValueError(f"model {i} has memory_norm={m.memory_norm!r}, model 0 has {first.memory_norm!r}; "
                             "the merged model would change its outputs")
        diffs = _backbone_differences(first.backbone, m.backbone)
        if diffs:
            shown = ", ".join(diffs[:8]) + (f", ... ({len(diffs)} in all)" if len(diffs) > 8 else "")
            raise ValueError(f"model {i} does not share model 0's backbone ({shown}); only models fine-tuned from the "
                             "same frozen backbone can be concatenated (not 'full' fine-tuning)")
        for n in m.task_names:
            if n in seen:
                raise ValueError(f"task name {n!r} is in model {seen[n]} and model {i}; rename one with "
                                 "model.rename_task(old, new)")
            seen[n] = i
    merged = MemoryViT(first.backbone, memory_norm=first.memory_norm, impl=first.impl, mask=mask,
                       freeze_backbone=False)
    for m in models:
        for n, t in m.tasks.items():
            merged.tasks[n] = copy.deepcopy(t) if copy_tasks else t
    return merged


def naive_concatenate(models: Sequence[MemoryViT], protect_source: bool = False) -> MemoryViT:
    """Merge without the Table-1 mask (the interference experiment of the paper's Sec. 4.4): every token attends to
    every class token and memory (``mask="none"``), or with ``protect_source`` the original tokens keep their mask and
    only the tasks interfere (``mask="cross_task"``)."""
    return concatenate(models, mask="cross_task" if protect_source else "none")


# ----------------------------------------------------------------------------------------------------------
# Attention recording (the switch the read-outs in tokenbook.experiments.memory use)
# ----------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def record_attention(model: MemoryViT) -> Iterator[list[AttentionRecord]]:
    """Record every layer's attention probabilities during forwards inside the block (explicit attention path; the
    outputs can differ from the fused path in the last bits)."""
    if model._recorder is not None:
        raise ValueError("record_attention is already active on this model")
    records: list[AttentionRecord] = []
    model._recorder = records
    try:
        yield records
    finally:
        model._recorder = None
