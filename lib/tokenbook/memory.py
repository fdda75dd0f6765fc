"""Learnable Memory for timm Vision Transformers (Sandler et al., "Fine-tuning Image Transformers using Learnable
Memory", CVPR 2022).

Reference sheet: ``../shared/papers/learnable_memory.md``. No official code was released; the public
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
``MemoryViT`` (wrapper with ``add_task``, ``set_outputs``, ``forward_all``, ``attention_mask``, ``task_state_dict``,
``load_task``), ``create_memory_vit``, ``finetune_model``, ``set_trainable``, ``concatenate``, ``naive_concatenate``,
``build_attention_mask``, ``table1_mask``, ``task_parameter_count``, ``memory_task_params``, ``record_attention``,
``memory_attention``, ``class_token_patch_attention``, ``class_group_indices``, ``TaskSubset``,
``make_task_datasets``.

Experiments of the notebook ``05_learnable_memory``: target tasks (``load_target_tasks``: Fashion-MNIST class
groups, scikit-learn digits, real datasets; ``digits_data``), the fine-tuning table (``run_finetune_table``,
``finetune_side_by_side``, ``finetune_vs_paper``, ``parameter_table``), the paper's step budget as epochs
(``steps_to_epochs``, ``finetune_config``, ``recipe_table``), concatenation studies (``concatenation_study``,
``naive_merge_vs_paper``, ``train_extension``, ``extension_study``, ``merged_efficiency``) and figures
(``plot_accuracy_vs_cells``, ``plot_memory_attention``, ``plot_masks``, ``patch_attention_figure``).
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "MEMORY_NORMS", "ATTENTION_IMPLS", "MASK_MODES", "FINETUNE_MODES", "SOURCE",
    "MemoryTask", "MemoryViT", "create_memory_vit", "finetune_model", "set_trainable", "concatenate",
    "naive_concatenate", "build_attention_mask", "table1_mask", "task_parameter_count", "memory_task_params",
    "trainable_parameter_names", "record_attention", "AttentionRecord", "memory_attention",
    "class_token_patch_attention", "class_group_indices", "TaskSubset", "make_task_datasets",
    # experiments of the notebook
    "PAPER_DATASETS", "method_label", "parse_methods", "ArrayImageDataset", "digits_data", "TargetTask",
    "paper_dataset_for", "load_target_tasks", "backbone_norm", "load_backbone", "steps_to_epochs",
    "FINETUNE_CONFIG_KEYS", "finetune_train_config", "finetune_config",
    "FinetuneRun", "run_finetune_table", "paper_finetune_table", "finetune_side_by_side", "finetune_vs_paper",
    "parameter_table", "collect_logits", "concatenation_study", "naive_merge_vs_paper", "train_extension",
    "extension_study", "merged_efficiency", "recipe_table", "PUBLIC_TRAIN_SIZES", "paper_schedule_examples",
    "plot_accuracy_vs_cells", "plot_memory_attention", "plot_masks", "patch_attention_figure", "findings_markdown",
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
def _check_backbone(backbone: nn.Module) -> None:
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(backbone, VisionTransformer):
        raise ValueError(f"MemoryViT needs a timm VisionTransformer, got {type(backbone).__name__}; build it with "
                         "timm.create_model('vit_...') (EVA, DeiT-distilled, Swin etc. are not supported)")
    for i, blk in enumerate(backbone.blocks):
        if type(blk) is not Block or type(blk.attn) is not Attention:
            raise ValueError(f"block {i} is {type(blk).__name__} with attention {type(blk.attn).__name__}; MemoryViT "
                             "supports only timm's pre-norm Block with timm.layers.Attention (not ResPostBlock, "
                             "ParallelScalingBlock, ...)")
    if not backbone.global_pool:
        raise ValueError("the backbone has global_pool='' (no pooling), so its head is per token; create it with "
                         "global_pool='token' (class-token ViT) or 'avg' (pooled-head ViT)")


class MemoryViT(nn.Module):
    """A timm ``VisionTransformer`` with per-task learnable memory, class tokens and heads.

    Args:
        backbone: a pre-trained timm VisionTransformer (class-token or pooled head; register tokens allowed). It is
            used in place (not copied): several ``MemoryViT`` may share one frozen backbone.
        memory_norm: ``"pre"`` (paper Fig. 2a, default) or ``"post"`` (public implementations), see module doc.
        impl: ``"exact"`` (default; bit-exact source head and merged tasks), ``"split"`` (one masked attention for
            the task rows) or ``"joint"`` (one masked attention for all rows, as in the paper). See module doc.
        mask: ``"paper"`` (Table 1, default), ``"cross_task"`` or ``"none"`` (naive merges, see
            ``build_attention_mask``). ``"none"`` always runs the joint path.
        freeze_backbone: set ``requires_grad=False`` on every backbone parameter (default True).

    ``forward(x)`` returns the logits selected by ``set_outputs`` (default: a tuple with the source head first, then
    every task in order of addition); ``forward_all(x)`` returns a dict name -> logits.

    Task read-out: a task's class token after the backbone's final ``norm`` goes through the backbone's ``fc_norm``
    and ``head_drop`` (the same path as the pooled original features), then the task head. A task without class
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
        _check_backbone(backbone)
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

    def _ref_tensor(self) -> torch.Tensor:
        bb = self.backbone
        return bb.cls_token if bb.cls_token is not None else bb.patch_embed.proj.weight

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
            num_input = self.backbone.patch_embed.num_patches + self.backbone.num_prefix_tokens
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
        bb = self.backbone
        if bb.pos_embed is not None and bb.cls_token is not None and not bb.no_embed_class:
            x = x + bb.pos_embed[:, :1]
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
        x = bb.patch_embed(x)
        x = bb._pos_embed(x)
        x = bb.patch_drop(x)
        x_o = bb.norm_pre(x)
        L0 = x_o.shape[1]
        x_t = self._task_tokens(x_o.shape[0])
        if x_t is not None:
            x_t = bb.norm_pre(bb.pos_drop(x_t))
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

    def forward_heads(self, x_o: torch.Tensor, x_t: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
        bb = self.backbone
        out = {SOURCE: bb.forward_head(x_o)}
        pooled = None
        j = 0
        for name, task in self.tasks.items():
            if task.has_token:
                feat = bb.head_drop(bb.fc_norm(x_t[:, j]))
                j += 1
            else:
                if pooled is None:
                    pooled = bb.forward_head(x_o, pre_logits=True)
                feat = pooled
            out[name] = task.head(feat)
        return out

    def forward_all(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits of every head: ``{"source": ..., task: ...}``."""
        return self.forward_heads(*self.forward_features(x))

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, tuple[torch.Tensor, ...]]:
        outs = self.forward_all(x)
        if self._outputs is None:
            return tuple(outs.values())
        if isinstance(self._outputs, str):
            return outs[self._outputs]
        return tuple(outs[n] for n in self._outputs)


# ----------------------------------------------------------------------------------------------------------
# Construction, fine-tuning modes, parameter accounting
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


def set_trainable(model: MemoryViT, mode: str, task: str) -> list[str]:
    """Set ``requires_grad`` for fine-tuning mode ``mode`` of ``task``; return the trainable parameter names.

    - ``"full"``: the whole backbone except its original head, and the task's head (the task reads the original
      pooled features).
    - ``"head"``: only the task head.
    - ``"head+cls"``: the task's class token and head.
    - ``"memory"``: the task's memory, class token and head.
    Everything else (other tasks included) is frozen. The task must have the parts its mode trains.
    """
    _check_option("fine-tuning mode", mode, FINETUNE_MODES)
    model._require_task(task)
    t = model.tasks[task]
    if mode in ("head+cls", "memory") and not t.has_token:
        raise ValueError(f"mode {mode!r} trains a class token but task {task!r} has none")
    if mode == "memory" and t.memory is None:
        raise ValueError(f"mode 'memory' but task {task!r} has no memory cells")
    model.requires_grad_(False)
    if mode == "full":
        model.backbone.requires_grad_(True)
        model.backbone.get_classifier().requires_grad_(False)  # the original head is not used by the task
    t.head.requires_grad_(True)
    if mode in ("head+cls", "memory"):
        t.class_token.requires_grad_(True)
    if mode == "memory":
        t.memory.requires_grad_(True)
    return trainable_parameter_names(model)


def trainable_parameter_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def finetune_model(
    backbone: nn.Module,
    mode: str,
    num_classes: int,
    cells: int = 0,
    task: str = "task",
    memory_norm: str = "pre",
    impl: str = "exact",
    copy_backbone: Optional[bool] = None,
    **task_kwargs: Any,
) -> MemoryViT:
    """Build the model of one column of the paper's fine-tuning table, with only that column's parameters
    trainable and ``forward`` returning the new task's logits (``set_outputs(task)``).

    ``mode``: ``"full"`` (copy of the backbone, all trainable, new head on the original pooled features),
    ``"head"`` (new head on the frozen original features), ``"head+cls"`` (new class token + head), ``"memory"``
    (``cells`` >= 1 memory tokens per layer + class token + head). ``copy_backbone`` defaults to True for
    ``"full"`` (so the shared pre-trained backbone is never modified) and False otherwise (frozen, shared).
    ``task_kwargs`` go to ``MemoryViT.add_task`` (inits).
    """
    _check_option("fine-tuning mode", mode, FINETUNE_MODES)
    if mode == "memory" and cells < 1:
        raise ValueError(f"mode 'memory' needs cells >= 1, got {cells}")
    if mode != "memory" and cells:
        raise ValueError(f"mode {mode!r} has no memory; pass cells=0 or use mode='memory'")
    if copy_backbone is None:
        copy_backbone = mode == "full"
    bb = copy.deepcopy(backbone) if copy_backbone else backbone
    model = MemoryViT(bb, memory_norm=memory_norm, impl=impl, freeze_backbone=True)
    model.add_task(task, num_classes, cells=cells, class_token=mode in ("head+cls", "memory"), **task_kwargs)
    set_trainable(model, mode, task)
    return model.set_outputs(task)


def task_parameter_count(model: MemoryViT, task: str) -> dict[str, int]:
    """Per-task parameters: ``{"memory", "class_token", "head", "total"}``."""
    model._require_task(task)
    return model.tasks[task].parameter_count()


# ----------------------------------------------------------------------------------------------------------
# Concatenation
# ----------------------------------------------------------------------------------------------------------
def _backbone_differences(a: nn.Module, b: nn.Module) -> list[str]:
    if a is b:
        return []
    sa, sb = a.state_dict(), b.state_dict()
    diffs = [f"missing {k}" for k in sa.keys() - sb.keys()] + [f"unexpected {k}" for k in sb.keys() - sa.keys()]
    for k in sa.keys() & sb.keys():
        x, y = sa[k], sb[k]
        if x.shape != y.shape or x.dtype != y.dtype:
            diffs.append(f"{k} shape/dtype {tuple(x.shape)}/{x.dtype} vs {tuple(y.shape)}/{y.dtype}")
        elif x.device.type != "meta" and not torch.equal(x, y.to(x.device)):
            diffs.append(f"{k} values differ")
    return sorted(diffs)


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
# Attention read-outs for figures
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


def _key_columns(model: MemoryViT, L0: int) -> tuple[dict[str, int], dict[str, tuple[int, int]]]:
    tok, mem = {}, {}
    token_tasks = [n for n, t in model.tasks.items() if t.has_token]
    for j, n in enumerate(token_tasks):
        tok[n] = L0 + j
    off = L0 + len(token_tasks)
    for n, t in model.tasks.items():
        if t.memory is not None:
            mem[n] = (off, off + t.cells)
            off += t.cells
    return tok, mem


def _recorded_forward(model: MemoryViT, images: torch.Tensor):
    """One eval-mode forward with attention recording; returns (per-layer records, original-token output)."""
    was = model.training
    model.eval()
    try:
        with record_attention(model) as rec:
            x_o, _ = model.forward_features(images)
    finally:
        model.train(was)
    return rec, x_o


@torch.no_grad()
def memory_attention(model: MemoryViT, images: torch.Tensor, reduce: str = "mean") -> dict[str, torch.Tensor]:
    """Attention from each task's class token to each of its own memory cells, per layer and head.

    Returns ``{task: (depth, heads, cells)}`` averaged over the batch (``reduce="mean"``) or
    ``(B, depth, heads, cells)`` (``reduce="none"``). Tasks without memory are left out.
    """
    _check_option("reduce", reduce, ("mean", "none"))
    rec, x_o = _recorded_forward(model, images)
    L0 = x_o.shape[1]
    _, mem = _key_columns(model, L0)
    rows = {n: j for j, n in enumerate(n for n, t in model.tasks.items() if t.has_token)}
    out = {}
    for n, (a, b) in mem.items():
        per_layer = [r.tasks[:, :, rows[n], a:b] for r in rec]  # (B, H, cells) each
        t = torch.stack(per_layer, dim=1)  # (B, depth, H, cells)
        out[n] = t.mean(0) if reduce == "mean" else t
    return out


@torch.no_grad()
def class_token_patch_attention(model: MemoryViT, images: torch.Tensor, layer: int = -1) -> dict[str, torch.Tensor]:
    """Attention from each class token to the patches at ``layer``, as maps ``(B, heads, grid_h, grid_w)``.

    Includes ``"source"`` (the original class token) when the backbone has one, and every task with a class token.
    Probabilities are the raw softmax entries (they do not sum to 1 over patches: the rest goes to class, register,
    task and memory tokens).
    """
    bb = model.backbone
    rec, x_o = _recorded_forward(model, images)
    r = rec[layer]
    L0 = x_o.shape[1]
    npt = bb.num_prefix_tokens
    gh, gw = bb.patch_embed.dynamic_feat_size(images.shape[-2:]) if bb.dynamic_img_size else bb.patch_embed.grid_size
    B, H = r.source.shape[:2]
    out = {}
    if bb.cls_token is not None:
        out[SOURCE] = r.source[:, :, 0, npt:L0].reshape(B, H, gh, gw)
    token_tasks = [n for n, t in model.tasks.items() if t.has_token]
    for j, n in enumerate(token_tasks):
        out[n] = r.tasks[:, :, j, npt:L0].reshape(B, H, gh, gw)
    return out


# ----------------------------------------------------------------------------------------------------------
# Per-task data splits
# ----------------------------------------------------------------------------------------------------------
def class_group_indices(targets: Union[Sequence[int], np.ndarray, torch.Tensor],
                        groups: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Indices of the samples of each class group (groups must be disjoint, non-empty and present in ``targets``)."""
    t = np.asarray(targets.cpu() if torch.is_tensor(targets) else targets).reshape(-1)
    if not groups:
        raise ValueError("groups is empty; pass a list of class lists, e.g. [[0, 1, 2], [3, 4, 5]]")
    owner: dict[int, int] = {}
    present = set(np.unique(t).tolist())
    for g, classes in enumerate(groups):
        if len(classes) == 0:
            raise ValueError(f"group {g} is empty")
        if len(set(classes)) != len(classes):
            raise ValueError(f"group {g} lists a class twice: {list(classes)}")
        for c in classes:
            if c in owner:
                raise ValueError(f"class {c} is in group {owner[c]} and group {g}; groups must be disjoint")
            owner[c] = g
        missing = [c for c in classes if c not in present]
        if missing:
            raise ValueError(f"group {g}: classes {missing} do not occur in the targets (present: {sorted(present)})")
    return [np.flatnonzero(np.isin(t, np.asarray(list(classes)))) for classes in groups]


class TaskSubset(torch.utils.data.Dataset):
    """Samples ``indices`` of ``dataset`` with labels remapped to ``0..len(classes)-1`` in the order of
    ``classes``. Items are ``(input, new_label)``; ``targets`` holds the remapped labels."""

    def __init__(self, dataset: Any, indices: Sequence[int], classes: Sequence[int],
                 targets: Optional[Sequence[int]] = None) -> None:
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.classes = [int(c) for c in classes]
        self.label_map = {c: i for i, c in enumerate(self.classes)}
        src = np.asarray(targets if targets is not None else _dataset_targets(dataset)).reshape(-1)
        old = src[self.indices]
        bad = sorted(set(old.tolist()) - set(self.label_map))
        if bad:
            raise ValueError(f"indices include classes {bad} that are not in classes {self.classes}")
        self.targets = np.array([self.label_map[int(c)] for c in old], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        item = self.dataset[int(self.indices[i])]
        x, y = item[0], item[1]
        y = int(y.item() if torch.is_tensor(y) else y)
        if y not in self.label_map:
            raise ValueError(f"sample {int(self.indices[i])} has label {y}, not in {self.classes}; are the targets "
                             "passed to TaskSubset the dataset's labels?")
        return x, self.label_map[y]


def _dataset_targets(dataset: Any):
    for attr in ("targets", "labels", "y"):
        if hasattr(dataset, attr):
            t = getattr(dataset, attr)
            return t.cpu().numpy() if torch.is_tensor(t) else np.asarray(t)
    raise ValueError(f"{type(dataset).__name__} has no .targets/.labels; pass targets=... explicitly")


def make_task_datasets(dataset: Any, groups: Sequence[Sequence[int]],
                       targets: Optional[Sequence[int]] = None) -> list[TaskSubset]:
    """One ``TaskSubset`` per class group (e.g. Fashion-MNIST ``[[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]``: task ``g``
    gets the samples of ``groups[g]`` with labels ``0..len(groups[g])-1``)."""
    t = np.asarray(targets if targets is not None else _dataset_targets(dataset)).reshape(-1)
    if len(t) != len(dataset):
        raise ValueError(f"targets has {len(t)} entries but the dataset has {len(dataset)} samples")
    return [TaskSubset(dataset, idx, g, targets=t) for idx, g in zip(class_group_indices(t, groups), groups)]


# ----------------------------------------------------------------------------------------------------------
# Experiments of the notebook (05_learnable_memory): target tasks, the fine-tuning table, concatenation studies,
# the paper-scale schedule, figures
# ----------------------------------------------------------------------------------------------------------
#: our method labels, as in the reference file's model names ("ViT-B/32 <method>")
PAPER_DATASETS = ("SUN-397", "iNaturalist", "CIFAR-100", "Places-365")
PAPER_BACKBONE = "ViT-B/32"
_PAPER_SOURCE = "main fine-tuning table (results_from_paper.png, via the CENG502 repo images)"


def method_label(mode: str, cells: int = 0) -> str:
    """``"full"``, ``"head"``, ``"head+cls"`` or ``"memory-<m>"`` (the reference file's naming)."""
    _check_option("fine-tuning mode", mode, FINETUNE_MODES)
    return f"memory-{cells}" if mode == "memory" else mode


def parse_methods(text: str) -> list[tuple[str, int]]:
    """``"full,head,head+cls,memory-1,memory-5"`` -> ``[("full", 0), ..., ("memory", 5)]``."""
    out = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        if item.startswith("memory-"):
            try:
                cells = int(item.split("-", 1)[1])
            except ValueError:
                raise ValueError(f"bad method {item!r}: memory needs a cell count, e.g. memory-5") from None
            if cells < 1:
                raise ValueError(f"bad method {item!r}: cells must be >= 1")
            out.append(("memory", cells))
        elif item in ("full", "head", "head+cls"):
            out.append((item, 0))
        else:
            raise ValueError(f"unknown method {item!r}; use full, head, head+cls or memory-<m>")
    if not out:
        raise ValueError("no methods given")
    labels = [method_label(*m) for m in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"a method is listed twice: {labels}")
    return out


class ArrayImageDataset(torch.utils.data.Dataset):
    """uint8 images ``(N, H, W)`` + labels, items ``(uint8 tensor (1, H, W), label)`` for ``data.Preprocess``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = np.ascontiguousarray(images, dtype=np.uint8)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.targets = self.labels

    def __len__(self) -> int:
        return len(self.labels)

    def raw(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.images[i].copy()).unsqueeze(0)

    def __getitem__(self, i: int):
        return self.raw(i), int(self.labels[i])

    def images_tensor(self, n: Optional[int] = None) -> torch.Tensor:
        n = len(self) if n is None else min(n, len(self))
        return torch.from_numpy(self.images[:n].copy()).unsqueeze(1)


def digits_data(img_size: int = 28, channels: int = 3, train_size: Optional[int] = None, val_size: int = 597,
                mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None, seed: int = 0):
    """scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes; no download) as a ``DataBundle``.

    Pixels 0..16 are scaled to uint8 0..255; a class-stratified split with ``val_size`` validation images (seeded by
    ``seed``, independent of any model RNG) and up to ``train_size`` training images. The bundle's ``preprocess``
    resizes to ``img_size`` on the batch and normalises with ``mean``/``std`` (default: the digits' own statistics).
    """
    from sklearn.datasets import load_digits

    from .data import DataBundle, DataConfig, Preprocess

    d = load_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    y = d.target.astype(np.int64)
    if not 0 < val_size < len(y):
        raise ValueError(f"val_size must be in 1..{len(y) - 1}, got {val_size}")
    rng = np.random.RandomState(seed)
    per_class = [rng.permutation(np.flatnonzero(y == c)) for c in range(10)]
    order = [p[k] for k in range(max(len(p) for p in per_class)) for p in per_class if k < len(p)]  # round-robin
    val_idx = np.sort(np.asarray(order[:val_size]))
    train_idx = np.asarray(order[val_size:])
    if train_size is not None:
        train_idx = train_idx[:train_size]
    train_idx = np.sort(train_idx)
    if mean is None or std is None:
        v = x[train_idx].astype(np.float64) / 255.0
        mean, std = (float(v.mean()),) * channels, (float(v.std()),) * channels
    cfg = DataConfig(dataset="fashion_mnist", img_size=img_size, channels=channels)  # dataset field: placeholder
    return DataBundle(train=ArrayImageDataset(x[train_idx], y[train_idx]),
                      val=ArrayImageDataset(x[val_idx], y[val_idx]),
                      num_classes=10, class_names=[str(i) for i in range(10)], mean=tuple(mean), std=tuple(std),
                      config=cfg, source="sklearn.datasets.load_digits",
                      preprocess=Preprocess(img_size, channels, mean, std))


@dataclass
class TargetTask:
    """One target task of the fine-tuning table: a name (a valid task name), its data and the paper dataset it
    stands for (None when the paper has no such dataset)."""

    name: str
    spec: str
    bundle: Any
    paper_dataset: Optional[str] = None

    @property
    def num_classes(self) -> int:
        return self.bundle.num_classes

    def describe(self) -> dict:
        return {"task": self.name, "spec": self.spec, "source": self.bundle.source, "classes": self.num_classes,
                "class_names": ", ".join(self.bundle.class_names[:10]) + (" ..." if self.num_classes > 10 else ""),
                "train_images": len(self.bundle.train), "val_images": len(self.bundle.val),
                "paper_dataset": self.paper_dataset}


def paper_dataset_for(name: str) -> Optional[str]:
    """The paper dataset a task name stands for (``cifar100`` -> ``CIFAR-100``, ``places365`` -> ``Places-365``,
    ``sun397`` -> ``SUN-397``, ``inat...`` -> ``iNaturalist``), else None."""
    n = name.lower().replace("-", "").replace("_", "")
    if "cifar100" in n:
        return "CIFAR-100"
    if "places" in n:
        return "Places-365"
    if "sun397" in n or n.startswith("sun"):
        return "SUN-397"
    if "inat" in n or "inaturalist" in n:
        return "iNaturalist"
    return None


def _task_name(spec: str) -> str:
    import re

    kind, _, arg = spec.partition(":")
    if kind == "fm":
        return "fm_" + "_".join(c.strip() for c in arg.split(","))
    if kind == "digits":
        return "digits"
    tail = arg.rstrip("/").split("/")[-1] or arg
    name = re.sub(r"[^0-9a-zA-Z_]", "_", tail).strip("_").lower()
    return name or kind


def load_target_tasks(spec: str, img_size: int, channels: int = 3, train_subset: Optional[int] = None,
                      val_subset: Optional[int] = None, preset: str = "none", mean: Optional[Sequence[float]] = None,
                      std: Optional[Sequence[float]] = None, data_dir: Optional[str] = None, seed: int = 0,
                      cache_dir: Optional[str] = None) -> list[TargetTask]:
    """Target tasks from ``spec``: items separated by ``;``:

    - ``fm:4,5,6``: Fashion-MNIST classes 4, 5, 6 (labels remapped to 0..2), class-balanced subsets;
    - ``digits``: scikit-learn's 8x8 digits resized to ``img_size`` (another image source);
    - ``folder:<path>`` / ``hf:<id or path>``: a real dataset (``tokenbook.data``), e.g. the paper's CIFAR-100,
      Places-365, SUN-397, iNaturalist in ImageNet folder layout. The task's paper dataset is read from its name.

    ``mean``/``std`` default to each source's statistics; pass the backbone's (``backbone_norm``) so every task is
    normalised the way the pre-trained model expects.
    """
    from .data import DataConfig, load_data

    items = [s.strip() for s in spec.split(";") if s.strip()]
    if not items:
        raise ValueError("no target tasks given; e.g. 'fm:4,5,6;fm:7,8,9;digits'")
    tasks, names = [], set()
    for item in items:
        kind, _, arg = item.partition(":")
        if kind == "fm":
            try:
                classes = [int(c) for c in arg.split(",") if c.strip()]
            except ValueError:
                raise ValueError(f"bad task {item!r}: fm:<comma-separated class ids>, e.g. fm:4,5,6") from None
            if not classes:
                raise ValueError(f"bad task {item!r}: no classes")
            bundle = load_data(DataConfig(dataset="fashion_mnist", data_dir=data_dir, img_size=img_size,
                                          channels=channels, train_subset=train_subset, val_subset=val_subset,
                                          classes=classes, preset=preset, subset_seed=seed, mean=mean, std=std,
                                          cache_dir=cache_dir))
        elif kind == "digits":
            bundle = digits_data(img_size, channels, train_size=train_subset,
                                 val_size=min(val_subset or 597, 897), mean=mean, std=std, seed=seed)
        elif kind in ("folder", "hf"):
            bundle = load_data(DataConfig(dataset=item, img_size=img_size, channels=channels, train_subset=train_subset,
                                          val_subset=val_subset, preset=preset, subset_seed=seed, mean=mean, std=std,
                                          cache_dir=cache_dir))
        else:
            raise ValueError(f"unknown target task {item!r}; use fm:<classes>, digits, folder:<path> or hf:<id>")
        name = _task_name(item)
        if name in names or name == SOURCE:
            raise ValueError(f"two target tasks are both named {name!r}; give the datasets distinct folder names")
        names.add(name)
        tasks.append(TargetTask(name, item, bundle, paper_dataset_for(name)))
    return tasks


def backbone_norm(backbone: nn.Module, channels: int = 3) -> tuple[tuple, tuple]:
    """Mean and std the backbone was trained with (its timm ``pretrained_cfg``), e.g. 0.5/0.5 for the AugReg
    ImageNet-21k ViT-B/32 (CENG502 fed it un-normalised images: one of the reproduction pitfalls)."""
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None or std is None:
        raise ValueError(f"{type(backbone).__name__} has no pretrained_cfg mean/std; pass them explicitly")
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if channels == 1:
        mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
    return mean, std


def load_backbone(model_name: str, num_classes: int, img_size: Optional[int] = None, patch_size: int = 0,
                  checkpoint_file: str = "", checkpoint_num_classes: Optional[int] = None,
                  **model_kwargs: Any) -> nn.Module:
    """The backbone to adapt: ``timm.create_model(model_name, ...)``, from ``checkpoint_file`` when given (timm's
    loader and checkpoint filter: big_vision/ViT ``.npz`` or timm ``.pth``/``.safetensors``). ``num_classes`` is the
    size of the backbone's own (source) head; other keywords go to ``timm.create_model``."""
    import timm

    from . import models  # noqa: F401  (registers the workbook's small ViTs)

    kw: dict[str, Any] = {"num_classes": num_classes, **model_kwargs}
    if img_size:
        kw["img_size"] = img_size
    if patch_size:
        kw["patch_size"] = patch_size
    if checkpoint_file:
        from pathlib import Path

        if not Path(checkpoint_file).is_file():
            raise FileNotFoundError(f"backbone checkpoint {checkpoint_file} does not exist (for the paper: the "
                                    "ImageNet-21k ViT-B/32, e.g. big_vision's augreg B/32 .npz)")
        overlay = {"file": str(checkpoint_file)}
        if checkpoint_num_classes is not None:
            overlay["num_classes"] = checkpoint_num_classes
        return timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay, **kw)
    return timm.create_model(model_name, **kw)


def steps_to_epochs(total_steps: int, n_train: int, batch_size: int, drop_last: bool = True,
                    world_size: int = 1) -> dict[str, int]:
    """Turn a step budget (the paper: 20,000 steps at batch 512) into ``fit`` epochs for a dataset of ``n_train``
    images: ``epochs`` = ceil(steps / steps per epoch) and ``max_steps_per_epoch`` = ceil(steps / epochs), so that
    ``epochs * max_steps_per_epoch`` is the budget rounded up by less than one step per epoch.
    ``batch_size`` is the global batch (split over ``world_size`` devices)."""
    if total_steps < 1 or n_train < 1 or batch_size < 1:
        raise ValueError(f"total_steps, n_train and batch_size must be >= 1, got {total_steps}, {n_train}, "
                         f"{batch_size}")
    per_epoch = n_train // batch_size if drop_last else math.ceil(n_train / batch_size)
    if per_epoch < 1:
        raise ValueError(f"{n_train} training images make no full batch of {batch_size}")
    epochs = math.ceil(total_steps / per_epoch)
    cap = math.ceil(total_steps / epochs)
    return {"steps_per_epoch": per_epoch, "epochs": epochs, "max_steps_per_epoch": cap, "total_steps": epochs * cap,
            "per_device_batch": batch_size // world_size, "images_seen": epochs * cap * batch_size}


#: notebook parameters that set the fine-tuning ``TrainConfig`` (same names as its fields)
FINETUNE_CONFIG_KEYS = ("epochs", "batch_size", "opt", "lr", "momentum", "weight_decay", "clip_grad", "warmup_steps",
                        "sched", "min_lr", "accelerator", "precision", "seed")


def finetune_train_config(params: dict, **overrides: Any):
    """The fine-tuning ``TrainConfig`` from the notebook's parameters (``FINETUNE_CONFIG_KEYS``): the paper's style
    of recipe (SGD with momentum, gradient clipping, linear warm-up from 0, cosine decay), evaluation only after the
    last epoch, no progress bars. ``clip_grad`` 0 turns clipping off."""
    from .train import TrainConfig

    missing = [k for k in FINETUNE_CONFIG_KEYS if k not in params]
    if missing:
        raise ValueError(f"fine-tuning parameters missing: {missing}")
    kw = {k: params[k] for k in FINETUNE_CONFIG_KEYS}
    kw["clip_grad"] = kw["clip_grad"] or None
    kw.update(warmup_lr=0.0, eval_every=kw["epochs"], progress=False)
    kw.update(overrides)
    return TrainConfig(**kw)


def finetune_config(cfg, mode: str, n_train: int, train_steps: int = 0, full_lr: float = 0.0):
    """The ``TrainConfig`` of one fine-tuning run: ``cfg`` with the step budget turned into epochs
    (``train_steps`` > 0) and ``full_lr`` for full fine-tuning (0 keeps ``cfg.lr``)."""
    import dataclasses

    _check_option("fine-tuning mode", mode, FINETUNE_MODES)
    kw: dict[str, Any] = {}
    if train_steps:
        s = steps_to_epochs(train_steps, n_train, cfg.batch_size)
        kw.update(epochs=s["epochs"], max_steps_per_epoch=s["max_steps_per_epoch"], eval_every=s["epochs"])
    if mode == "full" and full_lr:
        kw["lr"] = full_lr
    return dataclasses.replace(cfg, **kw)


@dataclass
class FinetuneRun:
    """Output of :func:`run_finetune_table`: one row per (task, method), the trained models (None for ``full``
    unless kept) and the training histories."""

    results: Any  # DataFrame
    models: dict
    histories: dict


def run_finetune_table(backbone: nn.Module, tasks: Sequence[TargetTask], methods: Sequence[tuple[str, int]], cfg,
                       train_steps: int = 0, full_lr: float = 0.0, seed: int = 0, memory_norm: str = "pre",
                       impl: str = "exact", num_workers: int = 0, keep_full: bool = False, macs: bool = True,
                       verbose: bool = True) -> FinetuneRun:
    """The paper's main table at any scale: adapt ``backbone`` to every task with every method.

    Each run re-seeds with ``seed`` before building the task (memory and class token inits), trains with
    :func:`tokenbook.train.fit` (only the method's parameters are trainable; ``full`` works on a copy, so the shared
    backbone stays frozen and unchanged) and records top-1, trainable parameters, per-task parameters, MACs
    (attention counted) and timing.
    """
    import pandas as pd

    from . import bench
    from .data import make_loaders
    from .repro import seed_everything
    from .train import fit

    rows, models, histories = [], {}, {}
    for task in tasks:
        for mode, cells in methods:
            label = method_label(mode, cells)
            # fresh loaders per run: fit() re-seeds the loader's generator per epoch from its current seed, so a
            # shared loader would give a run a data order that depends on the runs before it
            train_loader, val_loader = make_loaders(task.bundle, cfg.batch_size, num_workers=num_workers, seed=seed)
            seed_everything(seed)
            model = finetune_model(backbone, mode, task.num_classes, cells=cells, task=task.name,
                                   memory_norm=memory_norm, impl=impl)
            tcfg = finetune_config(cfg, mode, len(task.bundle.train), train_steps, full_lr)
            res = fit(model, train_loader, val_loader, tcfg, preprocess=task.bundle.preprocess,
                      desc=f"{task.name} {label}")
            counts = bench.count_params(model)
            row = {"task": task.name, "method": label, "mode": mode, "cells": cells,
                   "top1": res.final.get("val_top1"), "trainable_params": counts["trainable"],
                   "task_params": (counts["trainable"] if mode == "full"
                                   else task_parameter_count(model, task.name)["total"]),
                   "epochs": tcfg.epochs, "steps": res.timing["steps"], "lr": tcfg.lr,
                   "train_images": len(task.bundle.train), "val_images": len(task.bundle.val),
                   "train_s": res.timing["wall_time_s"], "step_ms": res.timing["step_ms"],
                   "paper_dataset": task.paper_dataset}
            if macs:
                x = next(iter(val_loader))[0][:1].to(next(model.parameters()).device)
                mc = bench.count_macs(model, example=task.bundle.preprocess.to(x.device)(x))
                row.update(gmacs=mc["gmacs"], gflops=mc["gflops"])
            rows.append(row)
            histories[(task.name, label)] = res.history
            models[(task.name, label)] = model if (mode != "full" or keep_full) else None
            if verbose:
                print(f"{task.name:>12} {label:>10}: top-1 {row['top1']:.2f}%  trainable {row['trainable_params']:,}"
                      f"  {row['train_s']:.1f} s")
    return FinetuneRun(pd.DataFrame(rows), models, histories)


def _paper_refs() -> list:
    from . import references

    return references.load("learnable_memory")


def paper_finetune_table() -> "Any":
    """The paper's ViT-B/32 table (rows: methods, columns: the four datasets), with its source."""
    import pandas as pd

    refs = [r for r in _paper_refs() if r.kind == "paper" and r.model.startswith(PAPER_BACKBONE + " ")]
    rows = {}
    for r in refs:
        method = r.model[len(PAPER_BACKBONE) + 1:]
        rows.setdefault(method, {"method": method})[r.metric.replace("top1 ", "")] = r.value
    df = pd.DataFrame(list(rows.values()))
    df["paper_source"] = _PAPER_SOURCE + " [paper]"
    return df[["method", *PAPER_DATASETS, "paper_source"]]


def finetune_side_by_side(results) -> "Any":
    """Ours (one column per task, their mean and the mean gain over head-only) next to the paper's ViT-B/32 table
    (per dataset, mean, mean gain over head-only) for every method we ran; n/a where the paper has no value."""
    ours = results.pivot_table(index="method", columns="task", values="top1", sort=False)
    tasks = list(dict.fromkeys(results["task"]))
    ours = ours[tasks]
    ours.columns = [f"ours {t}" for t in tasks]
    ours["ours mean"] = ours.mean(axis=1)
    head_mean = ours["ours mean"].get("head")
    ours["ours gain vs head"] = ours["ours mean"] - head_mean if head_mean is not None else float("nan")
    params = results.groupby("method", sort=False)["task_params"].mean().rename("ours task params (mean)")
    paper = paper_finetune_table().set_index("method")
    paper_cols = {d: f"paper {d}" for d in PAPER_DATASETS}
    paper = paper.rename(columns=paper_cols)
    paper["paper mean"] = paper[list(paper_cols.values())].mean(axis=1)
    paper["paper gain vs head"] = paper["paper mean"] - paper.loc["head", "paper mean"]
    out = ours.join(params).join(paper, how="left").reset_index().rename(columns={"index": "method"})
    out["diff gain vs head"] = out["ours gain vs head"] - out["paper gain vs head"]
    out["paper_source"] = out["paper_source"].fillna("n/a")
    return out


def _number(v) -> Optional[float]:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def finetune_vs_paper(results) -> "Any":
    """Long table (paper, source, ours, diff) per (task, method): the paper value when the task is one of the
    paper's datasets (``full`` profile), else n/a; plus per method the mean gain over head-only fine-tuning, the
    scale-free comparison (paper: mean over its four datasets, computed from its table; ours: mean over our tasks)."""
    import pandas as pd

    refs = {(r.model, r.metric): r for r in _paper_refs()}
    rows = []
    for _, r in results.iterrows():
        key = (f"{PAPER_BACKBONE} {r['method']}", f"top1 {r['paper_dataset']}")
        ref = refs.get(key) if r["paper_dataset"] else None
        v = ref.value if ref is not None else None
        rows.append({"task": r["task"], "method": r["method"], "metric": "top1", "paper": v,
                     "paper_dataset": r["paper_dataset"] or "n/a", "ours": r["top1"],
                     "diff": (r["top1"] - v) if v is not None else None,
                     "paper_source": f"{ref.source} [{ref.kind}]" if ref is not None else "n/a"})
    side = finetune_side_by_side(results)
    for _, r in side.iterrows():
        p, o = _number(r.get("paper gain vs head")), _number(r.get("ours gain vs head"))
        rows.append({"task": "mean over tasks", "method": r["method"], "metric": "gain vs head (points)",
                     "paper": p, "paper_dataset": "mean of " + ", ".join(PAPER_DATASETS) if p is not None else "n/a",
                     "ours": o, "diff": (o - p) if (p is not None and o is not None) else None,
                     "paper_source": (f"computed from the {_PAPER_SOURCE} [computed]" if p is not None else "n/a")})
    return pd.DataFrame(rows)


def parameter_table(num_classes: int = 100, cells: Sequence[int] = (1, 5, 10, 20)) -> "Any":
    """Trainable parameters per method for ViT-B/32 with a ``num_classes`` head (built on the meta device: no
    memory, no weights), with the analytic per-task count ``9,216*m + 768 + 769*C``."""
    import pandas as pd
    import timm

    from . import bench

    bb = timm.create_model("vit_base_patch32_224", device="meta")
    rows = []
    for mode, m in [("full", 0), ("head", 0), ("head+cls", 0), *[("memory", c) for c in cells]]:
        model = finetune_model(bb, mode, num_classes, cells=m, task="t")
        trainable = bench.count_params(model)["trainable"]
        task = trainable if mode == "full" else task_parameter_count(model, "t")["total"]
        formula = None if mode == "full" else memory_task_params(12, 768, m, num_classes, class_token=mode != "head")
        rows.append({"model": f"{PAPER_BACKBONE} {method_label(mode, m)}", "method": method_label(mode, m),
                     f"trainable params C={num_classes}": trainable, f"task params C={num_classes}": task,
                     "formula": formula,
                     "pct of backbone": 100.0 * trainable / sum(p.numel() for p in bb.parameters())})
    return pd.DataFrame(rows)


# -- concatenation studies ----------------------------------------------------------------------------------
@torch.no_grad()
def collect_logits(model: nn.Module, output: str, loader, preprocess: Optional[nn.Module] = None,
                   max_batches: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of one head (``output``: ``"source"`` or a task name; for a plain timm model pass ``"source"``) over
    a loader, and the labels, on the CPU in float32."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    outs, ys = [], []
    try:
        for i, (x, y) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x = x.to(dev)
            if preprocess is not None:
                x = preprocess.to(dev)(x)
            o = model.forward_all(x)[output] if isinstance(model, MemoryViT) else model(x)
            outs.append(o.float().cpu())
            ys.append(torch.as_tensor(y))
    finally:
        model.train(was)
    return torch.cat(outs), torch.cat(ys)


def _top1(logits: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * float((logits.argmax(-1) == y).float().mean())


def _val_loader(bundle, batch_size: int):
    return torch.utils.data.DataLoader(bundle.val, batch_size=batch_size, shuffle=False)


def concatenation_study(backbone: nn.Module, models: Sequence[MemoryViT], tasks: Sequence[TargetTask],
                        source_bundle=None, batch_size: int = 256, max_batches: Optional[int] = None) -> dict:
    """Non-destructive fine-tuning and exact concatenation, measured on the validation sets.

    ``models[i]`` is task ``tasks[i]``'s stand-alone model (same frozen ``backbone``). Returns DataFrames:

    - ``"non_destructive"``: the source head after merging the first k task models (k = 0..T): its accuracy on
      the source task (when ``source_bundle`` is given) and the max |difference| of its logits from the plain
      backbone's (0.0 = bit-identical);
    - ``"merged_vs_separate"``: per task, the stand-alone and the merged model's accuracy, the max |difference|
      of their logits, and whether every prediction is the same;
    - ``"naive_merge"``: merges of the first k models without the Table-1 mask (``"no mask"``: every token sees
      every task token and memory, as in the paper's Sec. 4.4; ``"tasks see each other"``: only the task rows
      unmasked, the source kept intact), per task the accuracy in the merge vs stand-alone, and the source head.
    """
    import pandas as pd

    if len(models) != len(tasks):
        raise ValueError(f"{len(models)} models for {len(tasks)} tasks")
    loaders = {t.name: _val_loader(t.bundle, batch_size) for t in tasks}
    alone = {t.name: collect_logits(m, t.name, loaders[t.name], t.bundle.preprocess, max_batches)
             for t, m in zip(tasks, models)}
    src_loader = _val_loader(source_bundle, batch_size) if source_bundle is not None else None
    probe = src_loader or loaders[tasks[0].name]
    probe_pre = (source_bundle or tasks[0].bundle).preprocess
    base = MemoryViT(backbone, freeze_backbone=False)
    ref_src, ref_y = collect_logits(base, SOURCE, probe, probe_pre, max_batches)
    plain_src, _ = collect_logits(backbone, SOURCE, probe, probe_pre, max_batches)

    nd_rows = [{"tasks_merged": 0, "tasks": "(backbone alone)",
                "source_top1": _top1(plain_src, ref_y) if source_bundle is not None else None,
                "source_max_abs_diff": float((ref_src - plain_src).abs().max()),
                "source_predictions_same_pct": 100.0 * float((ref_src.argmax(-1) == plain_src.argmax(-1))
                                                             .float().mean())}]
    merged = None
    for k in range(1, len(models) + 1):
        merged = concatenate(models[:k])
        src, _ = collect_logits(merged, SOURCE, probe, probe_pre, max_batches)
        nd_rows.append({"tasks_merged": k, "tasks": ", ".join(t.name for t in tasks[:k]),
                        "source_top1": _top1(src, ref_y) if source_bundle is not None else None,
                        "source_max_abs_diff": float((src - plain_src).abs().max()),
                        "source_predictions_same_pct": 100.0 * float((src.argmax(-1) == plain_src.argmax(-1))
                                                                     .float().mean())})
    mv_rows = []
    for t in tasks:
        lo, y = alone[t.name]
        lm, _ = collect_logits(merged, t.name, loaders[t.name], t.bundle.preprocess, max_batches)
        mv_rows.append({"task": t.name, "standalone_top1": _top1(lo, y), "merged_top1": _top1(lm, y),
                        "diff_top1": _top1(lm, y) - _top1(lo, y), "max_abs_logit_diff": float((lm - lo).abs().max()),
                        "same_predictions": bool((lm.argmax(-1) == lo.argmax(-1)).all()),
                        "merged_tasks": len(tasks)})
    nv_rows = []
    for variant, protect in (("no mask", False), ("tasks see each other", True)):
        for k in range(1, len(models) + 1):
            nm = naive_concatenate(models[:k], protect_source=protect)
            row = {"variant": variant, "tasks_merged": k}
            src, _ = collect_logits(nm, SOURCE, probe, probe_pre, max_batches)
            row["source_max_abs_diff"] = float((src - plain_src).abs().max())
            row["source_top1"] = _top1(src, ref_y) if source_bundle is not None else None
            accs = []
            for t in tasks[:k]:
                lm, y = collect_logits(nm, t.name, loaders[t.name], t.bundle.preprocess, max_batches)
                row[f"top1 {t.name}"] = _top1(lm, y)
                accs.append(_top1(lm, y) - _top1(*alone[t.name]))
            row["first_task_top1"] = row[f"top1 {tasks[0].name}"]
            row["first_task_standalone_top1"] = _top1(*alone[tasks[0].name])
            row["mean_change_vs_standalone"] = float(np.mean(accs))
            nv_rows.append(row)
    return {"non_destructive": pd.DataFrame(nd_rows), "merged_vs_separate": pd.DataFrame(mv_rows),
            "naive_merge": pd.DataFrame(nv_rows), "merged_model": merged}


def naive_merge_vs_paper(naive) -> "Any":
    """The naive-merge decay next to the secondary source's numbers (first task's accuracy as tasks are added,
    absolute and as a fraction of the un-merged accuracy): the only comparable quantity across scales is the
    retained fraction."""
    import pandas as pd

    refs = [r for r in _paper_refs() if r.model.startswith("naive merge")]
    base = refs[0].value if refs else None
    ours = naive[naive["variant"] == "no mask"].reset_index(drop=True)
    rows = []
    for k in range(max(len(refs), len(ours))):
        r = refs[k] if k < len(refs) else None
        o = ours.iloc[k] if k < len(ours) else None
        p_ret = 100.0 * r.value / base if r is not None else None
        o_ret = 100.0 * o["first_task_top1"] / o["first_task_standalone_top1"] if o is not None else None
        rows.append({"tasks_merged": k + 1, "paper_model": r.model if r is not None else "n/a",
                     "paper_top1_first_task": r.value if r is not None else None,
                     "ours_top1_first_task": o["first_task_top1"] if o is not None else None,
                     "paper_retained_pct": p_ret, "ours_retained_pct": o_ret,
                     "diff_retained_pct": (o_ret - p_ret) if (p_ret is not None and o_ret is not None) else None,
                     "paper_source": f"{r.source} [{r.kind}]" if r is not None else "n/a"})
    return pd.DataFrame(rows)


def train_extension(backbone: nn.Module, base_model: MemoryViT, base_task: str, task: TargetTask, cells: int, cfg,
                    seed: int = 0, train_steps: int = 0, num_workers: int = 0):
    """Model *extension*: task ``task`` trained on top of ``base_task`` (loaded from ``base_model``, frozen) with
    the starred cells of Table 1 open (it reads the earlier task's class token and memory). Returns
    ``(model, FitResult)``; the model computes source, ``base_task`` and ``task``."""
    from .data import make_loaders
    from .repro import seed_everything
    from .train import fit

    seed_everything(seed)
    model = MemoryViT(backbone, memory_norm=base_model.memory_norm, impl=base_model.impl)
    model.load_task(base_task, base_model.task_state_dict(base_task))
    model.add_task(task.name, task.num_classes, cells=cells, extend=True)
    set_trainable(model, "memory", task.name)
    model.set_outputs(task.name)
    train_loader, val_loader = make_loaders(task.bundle, cfg.batch_size, num_workers=num_workers, seed=seed)
    tcfg = finetune_config(cfg, "memory", len(task.bundle.train), train_steps)
    res = fit(model, train_loader, val_loader, tcfg, preprocess=task.bundle.preprocess, desc=f"{task.name} extension")
    return model.set_outputs(None), res


def extension_study(backbone: nn.Module, ext_model: MemoryViT, base_model: MemoryViT, new_model: MemoryViT,
                    base_task: TargetTask, new_task: TargetTask, batch_size: int = 256) -> "Any":
    """Extension vs concatenation for two tasks: accuracies of both tasks in the extended model, in the
    concatenation of the stand-alone models and stand-alone, and the max |logit difference| from stand-alone."""
    import pandas as pd

    concat = concatenate([base_model, new_model])
    rows = []
    for t, alone_model in ((base_task, base_model), (new_task, new_model)):
        loader = _val_loader(t.bundle, batch_size)
        lo, y = collect_logits(alone_model, t.name, loader, t.bundle.preprocess)
        le, _ = collect_logits(ext_model, t.name, loader, t.bundle.preprocess)
        lc, _ = collect_logits(concat, t.name, loader, t.bundle.preprocess)
        rows.append({"task": t.name, "role": "earlier task" if t is base_task else "later task",
                     "reads": ", ".join(ext_model.tasks[t.name].reads) or "-",
                     "standalone_top1": _top1(lo, y), "concatenation_top1": _top1(lc, y),
                     "extension_top1": _top1(le, y), "extension_minus_standalone": _top1(le, y) - _top1(lo, y),
                     "concat_max_abs_diff": float((lc - lo).abs().max()),
                     "extension_max_abs_diff": float((le - lo).abs().max())})
    return pd.DataFrame(rows)


@torch.no_grad()
def merged_efficiency(models: Sequence[MemoryViT], example: torch.Tensor, latency: bool = True,
                      min_run_time: float = 0.5) -> "Any":
    """One concatenated model vs running the stand-alone task models one after another: MACs (attention counted)
    and, optionally, latency measured in this run on ``example``."""
    import pandas as pd

    from . import bench

    merged = concatenate(models)
    sep_macs = sum(bench.count_macs(m.set_outputs(None), example=example)["macs"] for m in models)
    mrg_macs = bench.count_macs(merged, example=example)["macs"]
    rows = [{"setting": f"{len(models)} separate models", "forward_passes": len(models), "gmacs": sep_macs / 1e9,
             "gflops": 2 * sep_macs / 1e9},
            {"setting": "concatenated model", "forward_passes": 1, "gmacs": mrg_macs / 1e9,
             "gflops": 2 * mrg_macs / 1e9}]
    if latency:
        dev = next(merged.parameters()).device
        x = example.to(dev)
        sep = sum(bench.measure_latency(m, example=x, min_run_time=min_run_time, device=dev).median_ms for m in models)
        mrg = bench.measure_latency(merged, example=x, min_run_time=min_run_time, device=dev).median_ms
        rows[0]["latency_ms"], rows[1]["latency_ms"] = sep, mrg
    df = pd.DataFrame(rows)
    df["macs_ratio_vs_separate"] = df["gmacs"] / df["gmacs"].iloc[0]
    if latency:
        df["latency_ratio_vs_separate"] = df["latency_ms"] / df["latency_ms"].iloc[0]
    df["batch"] = example.shape[0]
    return df


def recipe_table(tasks: Sequence[TargetTask], cfg, train_steps: int = 0, full_lr: float = 0.0) -> "Any":
    """The schedule each task gets in this run: optimiser, lr, momentum, clipping, warm-up, batch, epochs and
    steps (from the step budget when ``train_steps`` > 0)."""
    import pandas as pd

    rows = []
    for t in tasks:
        c = finetune_config(cfg, "memory", len(t.bundle.train), train_steps)
        steps = c.epochs * (min(len(t.bundle.train) // c.batch_size, c.max_steps_per_epoch or 10**12))
        rows.append({"task": t.name, "train_images": len(t.bundle.train), "opt": c.opt, "lr": c.lr,
                     "lr_full": full_lr or c.lr, "momentum": c.momentum, "weight_decay": c.weight_decay,
                     "clip_grad": c.clip_grad, "warmup_steps": c.warmup_steps, "sched": c.sched, "batch": c.batch_size,
                     "epochs": c.epochs, "max_steps_per_epoch": c.max_steps_per_epoch, "total_steps": steps})
    return pd.DataFrame(rows)


#: public training-set sizes (dataset documentation, not the paper) for the paper-scale schedule examples;
#: SUN-397's split is not stated by the paper (reference sheet 7.3), so it has no entry
PUBLIC_TRAIN_SIZES = {"CIFAR-100": 50_000, "iNaturalist 2017": 579_184, "Places-365-Standard": 1_803_460}


def paper_schedule_examples(total_steps: int = 20_000, batch_size: int = 512) -> "Any":
    """What 20k steps at batch 512 mean in epochs for the paper's datasets with a public training-set size."""
    import pandas as pd

    rows = [{"dataset": d, "train_images": n, **steps_to_epochs(total_steps, n, batch_size)}
            for d, n in PUBLIC_TRAIN_SIZES.items()]
    rows.append({"dataset": "SUN-397", "train_images": None})
    df = pd.DataFrame(rows)
    return df.astype({c: "Int64" for c in df.columns if c != "dataset"})


# -- figures --------------------------------------------------------------------------------------------------
def plot_accuracy_vs_cells(results, title: str = ""):
    """Top-1 vs memory cells per task (0 cells = head + class token), with full and head-only as dashed lines."""
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(results["task"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.4 * len(tasks), 3.0), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        d = results[results["task"] == t]
        pts = d[d["mode"].isin(["head+cls", "memory"])].sort_values("cells")
        ax.plot(pts["cells"], pts["top1"], marker="o", label="memory (0 = head+cls)")
        for mode, style in (("full", "--"), ("head", ":")):
            v = d.loc[d["mode"] == mode, "top1"]
            if len(v):
                ax.axhline(float(v.iloc[0]), ls=style, color="gray" if mode == "head" else "k", label=mode)
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("memory cells per layer")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("val top-1 (%)")
    axes[0, 0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_memory_attention(att: dict[str, torch.Tensor], title: str = ""):
    """Heat maps (layer x head) of the attention mass each task's class token puts on its own memory cells
    (``memory_attention`` output, summed over cells)."""
    import matplotlib.pyplot as plt

    names = list(att)
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names) + 0.8, 2.9), squeeze=False)
    vmax = max(float(a.sum(-1).max()) for a in att.values()) if att else 1.0
    im = None
    for ax, n in zip(axes[0], names):
        a = att[n].sum(-1).cpu().numpy()  # (depth, heads)
        im = ax.imshow(a, vmin=0, vmax=vmax, cmap="viridis", aspect="auto")
        for (i, j), v in np.ndenumerate(a):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < vmax / 2 else "k")
        ax.set_title(f"{n} ({att[n].shape[-1]} cells)", fontsize=9)
        ax.set_xlabel("head")
        ax.set_xticks(range(a.shape[1]))
        ax.set_yticks(range(a.shape[0]))
    axes[0, 0].set_ylabel("layer")
    if im is not None:
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="attention on own memory")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_masks(num_input: int, cells: Sequence[int], num_prefix: int = 1, title: str = ""):
    """The paper's Table 1 drawn for ``len(cells)`` tasks: concatenation and extension side by side (white =
    attends), with the token groups labelled (INP, CLS, C_t, M_t)."""
    import matplotlib.pyplot as plt

    T = len(cells)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, kind in zip(axes, ("concatenation", "extension")):
        m = table1_mask(num_input, cells, kind).numpy()
        ax.imshow(m, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        # group boundaries
        col_groups = [("CLS", 0, num_prefix), ("INP", num_prefix, num_input)]
        col_groups += [(f"C{t + 1}", num_input + t, num_input + t + 1) for t in range(T)]
        off = num_input + T
        for t, c in enumerate(cells):
            col_groups.append((f"M{t + 1}", off, off + c))
            off += c
        for _, a, b in col_groups:
            ax.axvline(b - 0.5, color="tab:red", lw=0.6)
        for _, a, b in col_groups[:2 + T]:
            ax.axhline(b - 0.5, color="tab:red", lw=0.6)
        ax.set_xticks([(a + b - 1) / 2 for _, a, b in col_groups])
        ax.set_xticklabels([g for g, _, _ in col_groups], fontsize=7)
        ax.set_yticks([(a + b - 1) / 2 for _, a, b in col_groups[:2 + T]])
        ax.set_yticklabels([g for g, _, _ in col_groups[:2 + T]], fontsize=7)
        ax.set_title(f"{kind}: queries (rows) x keys (columns)", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def patch_attention_figure(model: MemoryViT, tasks: Sequence[TargetTask], per_task: int = 2, source_bundle=None,
                           layer: int = -1, title: str = ""):
    """Class-token -> patch attention (mean over heads, at ``layer``) of the source class token and every task's
    class token in one (merged) model, on ``per_task`` validation images of each task (and of the source task)."""
    from . import viz

    groups = ([("source", source_bundle)] if source_bundle is not None else []) + [(t.name, t.bundle) for t in tasks]
    images, maps, titles = [], [], []
    dev = next(model.parameters()).device
    for gname, b in groups:
        x = torch.stack([b.val[i][0] for i in range(min(per_task, len(b.val)))]).to(dev)
        xb = b.preprocess.to(dev)(x)
        att = class_token_patch_attention(model, xb, layer=layer)
        for i in range(xb.shape[0]):
            images.append(viz.to_display(xb[i].cpu(), b.mean, b.std))
            maps.append([att[k][i].mean(0).cpu() for k in att])
            titles.append(f"{gname}: {b.class_names[int(b.val[i][1])]}"[:22])
    cols = [f"{k} cls" for k in class_token_patch_attention(model, xb[:1], layer=layer)]
    return viz.plot_maps(images, maps, row_titles=titles, col_titles=cols, suptitle=title)


def findings_markdown(results, study: dict, extension=None) -> str:
    """A short, number-backed summary of this run for the notebook (what was measured, not what the paper claims)."""
    side = finetune_side_by_side(results).set_index("method")
    lines = []
    gains = side["ours gain vs head"].dropna()
    if len(gains):
        order = ", ".join(f"{m} {g:+.1f}" for m, g in gains.sort_values(ascending=False).items())
        lines.append(f"- Mean top-1 gain over head-only fine-tuning, per method (points): {order}.")
        mem = [m for m in gains.index if m.startswith("memory-")]
        if mem and "head+cls" in gains:
            best = max(mem, key=lambda m: gains[m])
            pg = side["paper gain vs head"]
            paper_delta = pg.get(best, float("nan")) - pg.get("head+cls", float("nan"))
            paper_txt = (f"paper, mean of its four datasets: {paper_delta:+.1f}" if not math.isnan(paper_delta)
                         else "the paper has no such column")
            lines.append(f"- Best memory size {best}: {gains[best] - gains['head+cls']:+.1f} points vs head + class "
                         f"token ({paper_txt}).")
    nd, mv, nv = study["non_destructive"], study["merged_vs_separate"], study["naive_merge"]
    lines.append(f"- Source head after merging up to {int(nd['tasks_merged'].max())} tasks: max |logit difference| "
                 f"{nd['source_max_abs_diff'].max():.3g}; merged vs stand-alone tasks: max |logit difference| "
                 f"{mv['max_abs_logit_diff'].max():.3g}, identical predictions: {bool(mv['same_predictions'].all())}.")
    nm = nv[nv["variant"] == "no mask"]
    if len(nm):
        last = nm.iloc[-1]
        lines.append(f"- Naive merge without the mask, {int(last['tasks_merged'])} tasks: first task "
                     f"{last['first_task_standalone_top1']:.1f}% -> {last['first_task_top1']:.1f}%, mean change "
                     f"{last['mean_change_vs_standalone']:+.1f} points; source max |logit difference| "
                     f"{last['source_max_abs_diff']:.3g}.")
    if extension is not None and len(extension) == 2:
        e = extension.set_index("role")
        lines.append(f"- Extension: the later task {e.loc['later task', 'task']} reads the earlier one and reaches "
                     f"{e.loc['later task', 'extension_top1']:.1f}% vs {e.loc['later task', 'standalone_top1']:.1f}% "
                     f"stand-alone; the earlier task is unchanged (max |logit difference| "
                     f"{e.loc['earlier task', 'extension_max_abs_diff']:.3g}).")
    return "\n".join(lines)
