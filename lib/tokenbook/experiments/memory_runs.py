"""05_memory's runs, kept apart from the notebook's report code so that their code version is small
(:func:`tokenbook.runs.code_version` hashes a trainer's import closure): the source pre-training
(:func:`pretrain_spec` / :func:`train_source_run`) and one fine-tuning run (:func:`finetune_spec` /
:func:`train_finetune_run`, the kernel path's body :func:`_finetune_one`), the backbone a run names
(:func:`backbone_ref`, :func:`load_ref_backbone`, :func:`load_backbone`) and its task (:func:`task_args`,
:func:`load_task`). Imports nothing of the reports, the ledger or :mod:`tokenbook.results`. Re-exported by
:mod:`tokenbook.experiments.memory` (import them from there).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import torch.nn as nn

from tokenbook.data.tasks import TargetTask, load_target_tasks
from tokenbook.methods.memory_finetune import finetune_model, trainable_parameter_names
from tokenbook.models.memory import FINETUNE_MODES, _check_option


def method_label(mode: str, cells: int = 0) -> str:
    """``"full"``, ``"head"``, ``"head+cls"`` or ``"memory-<m>"`` (the reference file's naming)."""
    _check_option("fine-tuning mode", mode, FINETUNE_MODES)
    return f"memory-{cells}" if mode == "memory" else mode


def load_backbone(model_name: str, num_classes: int, img_size: Optional[int] = None, patch_size: int = 0,
                  checkpoint_file: str = "", checkpoint_num_classes: Optional[int] = None,
                  **model_kwargs: Any) -> nn.Module:
    """The backbone to adapt: ``timm.create_model(model_name, ...)``, from ``checkpoint_file`` when given (timm's
    loader and checkpoint filter: big_vision/ViT ``.npz`` or timm ``.pth``/``.safetensors``). ``num_classes`` is the
    size of the backbone's own (source) head; other keywords go to ``timm.create_model``."""
    import timm

    from tokenbook import models  # noqa: F401  (registers the workbook's small ViTs)

    kw: dict[str, Any] = {"num_classes": num_classes or 0, **model_kwargs}
    if img_size:
        kw["img_size"] = img_size
    if patch_size:
        kw["patch_size"] = patch_size
    if checkpoint_file:
        from pathlib import Path

        if not Path(checkpoint_file).is_file():
            raise FileNotFoundError(f"backbone checkpoint {checkpoint_file} does not exist (for the paper: the "
                                    "ImageNet-21k ViT-B/32, e.g. big_vision's augreg B/32 .npz)")
        overlay: dict[str, Any] = {"file": str(checkpoint_file)}
        if str(checkpoint_file).endswith(".npz"):  # the original JAX format: timm's own reader (model.load_pretrained);
            overlay["custom_load"] = True          # a local file otherwise resets custom_load and goes to torch.load
        if checkpoint_num_classes is not None:
            overlay["num_classes"] = checkpoint_num_classes
        return timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay, **kw)
    return timm.create_model(model_name, **kw)


def _finetune_one(backbone: nn.Module, task: TargetTask, mode: str, cells: int, tcfg, seed: int,
                  memory_norm: str = "pre", impl: str = "exact", num_workers: int = 0):
    """One fine-tuning run (the body shared by the kernel path and the store trainer :func:`train_finetune_run`):
    fresh loaders seeded with ``seed`` (``fit`` re-seeds the loader's generator per epoch from its current seed, so
    a shared loader would give a run a data order that depends on the runs before it), the task model built right
    after ``seed_everything(seed)``, then ``fit`` with the run's own ``TrainConfig`` ``tcfg``. Returns
    ``(model, FitResult)``."""
    from tokenbook.data import make_loaders
    from tokenbook.repro import seed_everything
    from tokenbook.train import fit

    train_loader, val_loader = make_loaders(task.bundle, tcfg.batch_size, num_workers=num_workers, seed=seed)
    seed_everything(seed)
    model = finetune_model(backbone, mode, task.num_classes, cells=cells, task=task.name, memory_norm=memory_norm,
                           impl=impl)
    res = fit(model, train_loader, val_loader, tcfg, preprocess=task.bundle.preprocess,
              desc=f"{task.name} {method_label(mode, cells)}")
    return model, res


def pretrain_spec(model_name: str, model_kwargs: dict, data_config: Any, train_config: Any, batch_size: int,
                  num_workers: int = 0, label: str = ""):
    """The :class:`tokenbook.runs.RunSpec` of the source pre-training (:func:`train_source_run`): model, data, recipe,
    batch, loader workers (``runs.fit_args``)."""
    from tokenbook.runs import RunSpec, fit_args

    args = fit_args(model_name, model_kwargs, data_config, train_config, batch_size, num_workers)
    return RunSpec("tokenbook.experiments.memory_runs:train_source_run", args,
                   label=label or f"source pre-training {model_name}")


def _build_backbone(model_name: str, model_kwargs: dict, seed: int) -> nn.Module:
    from tokenbook.repro import seed_everything

    kw = dict(model_kwargs)
    seed_everything(seed)
    return load_backbone(model_name, kw.pop("num_classes"), **kw)


def _fit_source(model_name: str, model_kwargs: dict, bundle: Any, cfg, batch_size: int, num_workers: int = 0):
    """The pre-training body shared by the kernel path and :func:`train_source_run`: the backbone built after
    ``seed_everything(cfg.seed)``, loaders seeded with ``cfg.seed``, ``fit``. Returns ``(model, FitResult)``."""
    from tokenbook.data import make_loaders
    from tokenbook.train import fit

    model = _build_backbone(model_name, model_kwargs, cfg.seed)
    tl, vl = make_loaders(bundle, batch_size, num_workers=num_workers, seed=cfg.seed)
    return model, fit(model, tl, vl, cfg, preprocess=bundle.preprocess, desc="source")


def train_source_run(model_name: str, model_kwargs: dict, data: dict, train: dict, batch_size: int,
                     num_workers: int = 0):
    """Trainer of :func:`pretrain_spec` (in the kernel, a launcher process or a job): the source data, then
    :func:`_fit_source`. Returns a :class:`tokenbook.runs.TrainedRun`."""
    from tokenbook import data as D
    from tokenbook.runs import TrainedRun
    from tokenbook.train import TrainConfig

    bundle = D.load_data(D.DataConfig(**data))
    _, res = _fit_source(model_name, model_kwargs, bundle, TrainConfig(**train), batch_size, num_workers)
    return TrainedRun.from_fit(res)


def backbone_ref(model_name: str, num_classes: int, img_size: int = 0, patch_size: int = 0,
                 checkpoint_file: str = "", checkpoint_num_classes: Optional[int] = None) -> dict:
    """What a fine-tuning run's spec names as its backbone when it is a checkpoint file (the ``full`` profile;
    :func:`pretrain_backbone` gives the ref of a pre-training of the run store): model, head size, file."""
    return {"kind": "checkpoint", "model_name": model_name, "num_classes": int(num_classes), "img_size": int(img_size),
            "patch_size": int(patch_size), "checkpoint_file": str(checkpoint_file),
            "checkpoint_num_classes": checkpoint_num_classes}


def load_ref_backbone(ref: dict) -> nn.Module:
    """The frozen backbone a fine-tuning spec names (:func:`backbone_ref` or :func:`pretrain_backbone`'s ``ref``):
    the checkpoint file, or the stored pre-training read from the run store (``ref["store"]``, else the default
    store) by the key its launch computed (:func:`tokenbook.runs.read`: a job on another node reads the same run,
    and a missing one is a clear error, never trained here)."""
    from tokenbook import runs as R

    if ref.get("kind") == "checkpoint":
        bb = load_backbone(ref["model_name"], ref["num_classes"], img_size=ref["img_size"] or None,
                           patch_size=ref["patch_size"], checkpoint_file=ref["checkpoint_file"],
                           checkpoint_num_classes=ref["checkpoint_num_classes"])
    elif ref.get("kind") == "stored":
        if not ref.get("key"):
            raise ValueError("a stored backbone ref names its pre-training's key (pretrain_backbone's ref)")
        out = R.read_ref(ref, "backbone pre-training", "pretrain_backbone launches the pre-training")
        a = ref["args"]
        bb = out.load_into(_build_backbone(a["model_name"], a["model_kwargs"], a["train"]["seed"]))
    else:
        raise ValueError(f"unknown backbone ref kind {ref.get('kind')!r}; use pretrain_backbone or backbone_ref")
    return bb.eval().requires_grad_(False)


def task_args(spec: str, img_size: int, train_subset: Optional[int], val_subset: Optional[int], mean: Sequence[float],
              std: Sequence[float], preset: str = "none", data_dir: Optional[str] = "", seed: int = 0,
              channels: int = 3) -> dict:
    """One target task as JSON-able arguments of :func:`load_target_tasks` (what a fine-tuning spec names)."""
    return {"spec": str(spec), "img_size": int(img_size), "channels": int(channels),
            "train_subset": int(train_subset or 0) or None, "val_subset": int(val_subset or 0) or None,
            "preset": str(preset), "mean": [float(v) for v in mean], "std": [float(v) for v in std],
            "data_dir": str(data_dir or ""), "seed": int(seed)}


def load_task(args: dict) -> TargetTask:
    """The target task of :func:`task_args`."""
    a = dict(args)
    return load_target_tasks([a.pop("spec")], a.pop("img_size"), data_dir=a.pop("data_dir") or None, **a)[0]


def finetune_spec(backbone: dict, task: dict, mode: str, cells: int, train_config: Any, seed: int,
                  memory_norm: str = "pre", impl: str = "exact", num_workers: int = 0, label: str = ""):
    """The :class:`tokenbook.runs.RunSpec` of one fine-tuning run: the backbone's ref (a changed pre-training
    re-runs the fine-tuning), the task (:func:`task_args`), the method, the run's own ``TrainConfig`` (its ``seed``
    set to ``seed``; :func:`finetune_config` already applied), memory placement and loader workers."""
    from tokenbook.runs import RunSpec

    _check_option("fine-tuning mode", mode, FINETUNE_MODES)
    train = dataclasses.asdict(train_config) if not isinstance(train_config, dict) else dict(train_config)
    train["seed"] = int(seed)
    args = {"backbone": backbone, "task": task, "mode": mode, "cells": int(cells), "train": train,
            "batch_size": int(train["batch_size"]), "seed": int(seed), "memory_norm": memory_norm, "impl": impl,
            "num_workers": int(num_workers)}
    return RunSpec("tokenbook.experiments.memory_runs:train_finetune_run", args,
                   label=label or f"{task['spec']} {method_label(mode, cells)} seed {seed}")


def train_finetune_run(backbone: dict, task: dict, mode: str, cells: int, train: dict, batch_size: int, seed: int,
                       memory_norm: str = "pre", impl: str = "exact", num_workers: int = 0):
    """Trainer of :func:`finetune_spec`: the backbone (:func:`load_ref_backbone`), the task (:func:`load_task`),
    then the kernel path's body (:func:`_finetune_one`). Returns a :class:`tokenbook.runs.TrainedRun` holding only
    the trainable tensors (the frozen backbone is the ref's; ``extra["keys"]``: the model's state-dict keys)."""
    from tokenbook.runs import TrainedRun
    from tokenbook.train import TrainConfig

    bb = load_ref_backbone(backbone)
    t = load_task(task)
    cfg = TrainConfig(**{**train, "seed": int(seed), "batch_size": int(batch_size)})
    model, res = _finetune_one(bb, t, mode, cells, cfg, int(seed), memory_norm, impl, num_workers)
    out = TrainedRun.from_fit(res)
    if mode != "full":  # the frozen backbone's tensors are the ref's: keep only what was trained
        names = set(trainable_parameter_names(model))
        out.state_dict = {k: v for k, v in out.state_dict.items() if k in names}
    return out


def rebuild_finetune(args: dict, out: Any, backbone: nn.Module, task: TargetTask) -> nn.Module:
    """The model of a stored fine-tuning run (``args``: its spec's arguments, ``out``: its TrainedRun) on
    ``backbone`` (the ref's, already loaded) and ``task``, as ``fit`` leaves it (training mode)."""
    model = finetune_model(backbone, args["mode"], task.num_classes, cells=args["cells"], task=task.name,
                           memory_norm=args["memory_norm"], impl=args["impl"])
    if args["mode"] == "full":
        return out.load_into(model)
    missing = set(trainable_parameter_names(model)) - set(out.state_dict)
    if missing:
        raise ValueError(f"stored run {args['task']['spec']} {method_label(args['mode'], args['cells'])} lacks "
                         f"{sorted(missing)[:3]}")
    model.load_state_dict(out.state_dict, strict=False)
    return model
