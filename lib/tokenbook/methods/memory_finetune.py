"""Learnable Memory's fine-tuning modes (Sandler et al., CVPR 2022; notebook ``05_memory``): which parameters of a
:class:`~tokenbook.models.memory.MemoryViT` train for one column of the paper's fine-tuning table, and the model of
each column built from any timm backbone (``full``, ``head``, ``head+cls``, ``memory``).

The architecture (``MemoryViT``, masks, concatenation, parameter accounting) is :mod:`tokenbook.models.memory`.
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch.nn as nn

from tokenbook.models.memory import FINETUNE_MODES, MemoryViT, _check_option

__all__ = ["FINETUNE_MODES", "set_trainable", "trainable_parameter_names", "finetune_model"]


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
