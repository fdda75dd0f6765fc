"""Experiments of the notebook ``05_memory`` (Learnable Memory, CVPR 2022): target tasks (Fashion-MNIST class
groups, scikit-learn digits, real datasets), the fine-tuning table beside the paper's, the paper's step budget as
epochs, concatenation and extension studies, parameter accounting and figures.

The model itself (``MemoryViT``, masks, concatenation) is :mod:`tokenbook.models.memory`, its fine-tuning modes
:mod:`tokenbook.methods.memory_finetune`; task splits and the digits data are :mod:`tokenbook.data.tasks`. The
attention read-outs of the figures (``memory_attention``, ``class_token_patch_attention``) are in
:mod:`tokenbook.experiments.memory_report`.

Seeds and claims (issue 12): :func:`run_finetune_seeds` repeats the table for every seed, paired by seed (each
run of seed ``s`` starts from ``seed_everything(s)`` and sees the loader order of seed ``s``); :func:`seed_summary`,
:func:`per_seed_table` and :func:`claims_evidence` turn it into mean / 95 % CI tables and the evidence of the
reference sheet's claims.

Public API: ``__all__`` (the notebook's functions, then the model and task-data names re-exported for it).

The reporting half (labels and configs, floors, seed summaries, claims evidence, tables, studies, figures, attention
read-outs) is :mod:`tokenbook.experiments.memory_report`, re-exported here: import everything from this module.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Sequence

import torch.nn as nn

from tokenbook.data.tasks import (ArrayImageDataset, TargetTask, class_group_indices, digits_data,
                                  load_target_tasks, make_task_datasets, paper_dataset_for)
from tokenbook.methods.memory_finetune import finetune_model, set_trainable, trainable_parameter_names
from tokenbook.models.memory import (FINETUNE_MODES, SOURCE, MemoryViT, build_attention_mask,
                                     concatenate, create_memory_vit, memory_task_params, naive_concatenate,
                                     table1_mask, task_parameter_count)
from tokenbook.params import LaunchParams, SeedPlanParams
# the stored runs' specs, trainers and rebuilds live in memory_runs (re-exported): their code version leaves this
# module and the reports out
from tokenbook.experiments.memory_runs import (  # noqa: F401
    _build_backbone, _finetune_one, _fit_source, backbone_ref, finetune_spec, load_ref_backbone, load_task,
    pretrain_spec, rebuild_finetune, task_args, train_finetune_run, train_source_run,
)
from tokenbook.params import param

from tokenbook.experiments.memory_report import (  # noqa: F401  (the reporting half, re-exported)
    PAPER_DATASETS, PAPER_BACKBONE, _PAPER_SOURCE, method_label, parse_methods, backbone_norm, load_backbone,
    steps_to_epochs, FINETUNE_CONFIG_KEYS, eval_every, finetune_train_config, finetune_config, task_floors,
    finetune_beside_floors, pretrain_beside_floors, _ci, arm_means, seed_summary, per_seed_table, val_curves,
    source_head_max_diff, claims_scale, claims_evidence, claims_markdown, _paper_refs, paper_finetune_table,
    finetune_side_by_side, _number, finetune_vs_paper, parameter_table, collect_logits, _top1, _val_loader,
    concatenation_study, naive_merge_vs_paper, train_extension, extension_study, merged_efficiency, recipe_table,
    PUBLIC_TRAIN_SIZES, paper_schedule_examples, plot_accuracy_vs_cells, plot_memory_attention, plot_masks,
    patch_attention_figure, findings_markdown, _key_columns, _recorded_forward, memory_attention,
    class_token_patch_attention, _gpu_classes, _gpu_build, gpu_loops, PROOF_BACKBONE, proof_data)

# ----------------------------------------------------------------------------------------------------------
# parameters: the notebook's parameters cell is generated from this class (python -m tokenbook.params --sync)
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Params(SeedPlanParams, LaunchParams):  # seed plan and launcher fields: the bases (tokenbook.params)
    """The parameters of notebooks/05_memory.ipynb (its parameters cell is generated from this class)."""

    NOTEBOOK: ClassVar[str] = "05_memory"
    #: run_all.sh --proof: two seeds, a CPU batch, the shortest latency timing; every target task and method kept
    PROOF: ClassVar[dict] = {"seeds": [0, 1], "batch_size": 4, "eval_batch_size": 8, "num_workers": 0,
                             "latency_min_run_time": 0.05, "num_figure_images": 2,
                             "executor": "kernel", "floor_cnn_epochs": 1}

    seed: int = param(0, "seed of the source pre-training and of the data subsets [0, inf)")
    seeds: list[int] = param([0, 1, 2], "fine-tuning seeds: every method runs once per seed, paired by seed; "
                                        "seed_pilot may add the next ones")
    model_name: str = param("vit_fm_tiny_p4_28", "timm backbone; full profile: vit_base_patch32_224.augreg_in21k")
    patch_size: int = param(7, "patch size override; 0 keeps the model's own [0, inf)")
    img_size: int = param(28, "input side of the backbone [1, inf)")
    backbone_checkpoint: str = param("", "pre-trained backbone file; empty means pre-train it here on the source task")
    checkpoint_num_classes: int = param(
        0, "head size of backbone_checkpoint, kept as the source head; 0 means the checkpoint's own [0, inf)", none=0)
    data_dir: str = param("", "Fashion-MNIST IDX folder; empty: $TOKENBOOK_FASHION_MNIST, Debian package, hub", none="")
    source_classes: list[int] = param([0, 1, 2, 3],
                                      "Fashion-MNIST classes of the source task; empty means no source task")
    pretrain_subset: int = param(6000, "source training images, class-balanced; 0 means all [0, inf)", none=0)
    pretrain_epochs: int = param(6, "source pre-training epochs, AdamW [0, inf)")
    pretrain_lr: float = param(0.002, "source pre-training peak learning rate (0, inf)")
    pretrain_batch_size: int = param(128, "source pre-training batch size [1, inf)")
    pretrain_label_smoothing: float = param(0.0, "label smoothing of the source pre-training [0, 1)")
    pretrain_warmup_epochs: float = param(1.0, "linear warm-up epochs of the source pre-training [0, inf)")
    fit_floors: bool = param(True, "fit the reference floors (logistic regression on pixels, small CNN) on the "
                                   "source split and on every target task's split")
    floor_cnn_epochs: int = param(5, "epochs of the small-CNN floor [1, inf)")
    targets: list[str] = param(["fm:4,5,6", "fm:7,8,9", "digits"],
                               "target tasks fm:<classes>, digits, folder:<path>, hf:<id>")
    train_subset: int = param(1200, "training images per target task; 0 means all [0, inf)", none=0)
    val_subset: int = param(600, "validation images per target task and for the source; 0 means all [0, inf)", none=0)
    preset: str = param("none", "per-sample augmentation of the target tasks, see tokenbook.data.PRESETS")
    methods: list[str] = param(["full", "head", "head+cls", "memory-1", "memory-5", "memory-10"],
                               "columns of the fine-tuning table")
    memory_norm: str = param("pre",
                             "memory through the pre-attention LayerNorm - pre, paper Fig. 2a - or after it - post")
    opt: str = param("sgd", "optimiser of the fine-tuning runs, SGD with momentum as in the paper")
    lr: float = param(0.1, "peak learning rate of head, head+cls and memory runs (0, inf)")
    full_lr: float = param(0.02, "peak learning rate of full fine-tuning; 0 uses lr [0, inf)")
    momentum: float = param(0.9, "SGD momentum [0, 1)")
    weight_decay: float = param(0.0, "weight decay of the fine-tuning runs [0, inf)")
    clip_grad: float = param(1.0, "gradient-norm clipping; 0 turns it off [0, inf)")
    warmup_steps: int = param(30, "linear warm-up steps [0, inf)")
    sched: str = param("cosine", "learning-rate schedule after warm-up - cosine, step or none")
    min_lr: float = param(1e-05, "final learning rate of the cosine schedule [0, inf)")
    batch_size: int = param(64, "fine-tuning batch size [1, inf)")
    epochs: int = param(5, "fine-tuning epochs per run, used when train_steps is 0 [1, inf)")
    train_steps: int = param(0, "step budget per run, the paper uses 20000 at batch 512; 0 means use epochs [0, inf)")
    val_evals: int = param(0,
                           "validation passes per fine-tuning run, evenly spaced, for the plateau check; 0 means "
                           "every epoch [0, inf)")
    concat_cells: int = param(5, "memory cells of the task models used for concatenation and figures [1, inf)")
    eval_batch_size: int = param(256, "batch of the evaluation passes [1, inf)")
    num_workers: int = param(0, "DataLoader workers [0, inf)")
    accelerator: str = param("auto", "cpu, cuda or auto")
    precision: str = param("32-true", "32-true or bf16-mixed")
    latency: bool = param(True, "measure merged vs separate latency")
    latency_min_run_time: float = param(0.5, "seconds of timing per measurement (0, inf)")
    num_figure_images: int = param(2, "validation images per task in the patch-attention figure [1, inf)")

__all__ = [
    "PAPER_DATASETS", "method_label", "parse_methods", "TargetTask", "paper_dataset_for", "load_target_tasks",
    "backbone_norm", "load_backbone", "steps_to_epochs", "eval_every", "FINETUNE_CONFIG_KEYS", "finetune_train_config",
    "finetune_config", "FinetuneRun", "run_finetune_table", "run_finetune_seeds", "seed_summary", "per_seed_table",
    "arm_means", "val_curves", "source_head_max_diff", "claims_scale", "claims_evidence", "claims_markdown", "paper_finetune_table", "finetune_side_by_side",
    "finetune_vs_paper", "parameter_table", "collect_logits", "concatenation_study", "naive_merge_vs_paper",
    "train_extension", "extension_study", "Pretrained", "pretrain_spec", "train_source_run", "pretrain_backbone",
    "backbone_ref", "load_ref_backbone", "task_args", "load_task", "finetune_spec", "train_finetune_run",
    "rebuild_finetune", "launch_finetune_seeds", "pretrain_config", "finetune_seeds", "task_floors", "finetune_beside_floors", "pretrain_beside_floors", "merged_efficiency", "recipe_table", "PUBLIC_TRAIN_SIZES",
    "paper_schedule_examples", "plot_accuracy_vs_cells", "plot_memory_attention", "plot_masks",
    "patch_attention_figure", "findings_markdown",
    # re-exported for the notebook (one import): the model API and the task data
    "MemoryViT", "create_memory_vit", "finetune_model", "set_trainable", "concatenate", "naive_concatenate",
    "build_attention_mask", "table1_mask", "task_parameter_count", "memory_task_params", "trainable_parameter_names",
    "memory_attention", "class_token_patch_attention", "SOURCE", "FINETUNE_MODES", "ArrayImageDataset",
    "digits_data", "class_group_indices", "make_task_datasets",
]


@dataclass
class FinetuneRun:
    """Output of :func:`run_finetune_table`: one row per (task, method), the trained models (None for ``full``
    unless kept) and the training histories."""

    results: Any  # DataFrame
    models: dict
    histories: dict


def _finetune_row(model: nn.Module, task: TargetTask, mode: str, cells: int, tcfg, final: dict, timing: dict,
                  macs: bool = True) -> dict:
    """The result row of one fine-tuning run (top-1, trainable and per-task parameters, schedule, timing; MACs with
    attention counted when ``macs``)."""
    from tokenbook import bench

    counts = bench.count_params(model)
    row = {"task": task.name, "method": method_label(mode, cells), "mode": mode, "cells": cells,
           "top1": final.get("val_top1"), "trainable_params": counts["trainable"],
           "task_params": (counts["trainable"] if mode == "full" else task_parameter_count(model, task.name)["total"]),
           "epochs": tcfg.epochs, "steps": timing["steps"], "lr": tcfg.lr,
           "train_images": len(task.bundle.train), "val_images": len(task.bundle.val),
           "train_s": timing["wall_time_s"], "step_ms": timing["step_ms"], "paper_dataset": task.paper_dataset}
    if macs:
        x = task.bundle.val[0][0].unsqueeze(0).to(next(model.parameters()).device)
        mc = bench.count_macs(model, example=task.bundle.preprocess.to(x.device)(x))
        row.update(gmacs=mc["gmacs"], gflops=mc["gflops"])
    return row


def run_finetune_table(backbone: nn.Module, tasks: Sequence[TargetTask], methods: Sequence[tuple[str, int]], cfg,
                       train_steps: int = 0, full_lr: float = 0.0, seed: int = 0, memory_norm: str = "pre",
                       impl: str = "exact", num_workers: int = 0, keep_full: bool = False, macs: bool = True,
                       verbose: bool = True, val_evals: int = 0) -> FinetuneRun:
    """The paper's main table at any scale: adapt ``backbone`` to every task with every method.

    Each run re-seeds with ``seed`` before building the task (memory and class token inits), trains with
    :func:`tokenbook.train.fit` (only the method's parameters are trainable; ``full`` works on a copy, so the shared
    backbone stays frozen and unchanged) and records top-1, trainable parameters, per-task parameters, MACs
    (attention counted) and timing.
    """
    import pandas as pd

    rows, models, histories = [], {}, {}
    for task in tasks:
        for mode, cells in methods:
            label = method_label(mode, cells)
            tcfg = finetune_config(cfg, mode, len(task.bundle.train), train_steps, full_lr, val_evals)
            model, res = _finetune_one(backbone, task, mode, cells, tcfg, seed, memory_norm, impl, num_workers)
            row = _finetune_row(model, task, mode, cells, tcfg, res.final, res.timing, macs=macs)
            rows.append(row)
            histories[(task.name, label)] = res.history
            models[(task.name, label)] = model if (mode != "full" or keep_full) else None
            if verbose:
                print(f"{task.name:>12} {label:>10}: top-1 {row['top1']:.2f}%  trainable {row['trainable_params']:,}"
                      f"  {row['train_s']:.1f} s")
    return FinetuneRun(pd.DataFrame(rows), models, histories)


def run_finetune_seeds(backbone: nn.Module, tasks: Sequence[TargetTask], methods: Sequence[tuple[str, int]], cfg,
                       seeds: Sequence[int], **kw: Any) -> FinetuneRun:
    """:func:`run_finetune_table` once per seed, paired by seed: for seed ``s`` every (task, method) run starts from
    ``seed_everything(s)`` (same initial head / class token / memory draws wherever the shapes allow), trains with
    ``cfg.seed = s`` and sees the training batches of the loader seeded with ``s``; the backbone is shared (the
    fixed starting point of fine-tuning). ``results`` has a ``seed`` column; ``models`` and ``histories`` are keyed
    ``(seed, task, method)``."""
    import dataclasses

    import pandas as pd

    if not len(seeds):
        raise ValueError("no seeds given")
    frames, models, histories = [], {}, {}
    macs = kw.pop("macs", True)
    for i, s in enumerate(seeds):
        # MACs do not depend on the seed: counted for the first seed, copied to the others
        run = run_finetune_table(backbone, tasks, methods, dataclasses.replace(cfg, seed=int(s)), seed=int(s),
                                 macs=macs and i == 0, **kw)
        res = run.results.assign(seed=int(s))
        if macs and i > 0:
            first = frames[0].set_index(["task", "method"])
            for col in ("gmacs", "gflops"):
                res[col] = [first.loc[(t, m), col] for t, m in zip(res["task"], res["method"])]
        frames.append(res)
        models.update({(int(s), *k): m for k, m in run.models.items()})
        histories.update({(int(s), *k): h for k, h in run.histories.items()})
    res = pd.concat(frames, ignore_index=True)
    return FinetuneRun(res[["seed", *[c for c in res.columns if c != "seed"]]], models, histories)


# ----------------------------------------------------------------------------------------------------------
# the same runs through the workbook's run store (tokenbook.runs): the source pre-training is one stored run, every
# fine-tuning run (task, method, seed) another, keyed by everything that decides it, the backbone's spec included
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Pretrained:
    """The backbone of the fine-tuning runs: ``backbone`` (frozen, eval mode), the pre-training's ``history`` /
    ``final`` / ``timing`` (None for a checkpoint file), and ``ref``: what a fine-tuning run's spec names as its
    backbone (:func:`backbone_ref`; None on the kernel path, where the fine-tuning runs are not stored); ``launched``
    the run store's records."""

    backbone: nn.Module
    history: Any = None
    final: Optional[dict] = None
    timing: Optional[dict] = None
    ref: Optional[dict] = None
    launched: list = dataclasses.field(default_factory=list)


def pretrain_backbone(model_name: str, model_kwargs: dict, bundle: Any, cfg, batch_size: int, num_workers: int = 0,
                      executor: str = "kernel", via_store: Optional[bool] = None, **launch: Any) -> Pretrained:
    """Pre-train the backbone on the source task ``bundle`` with ``cfg`` (``model_kwargs``: ``num_classes``, the
    source head, and ``timm.create_model`` keywords such as ``img_size`` / ``patch_size``).

    ``executor="kernel"`` (``via_store`` None or False): ``fit`` in this process, nothing stored. Any other executor
    (or ``via_store=True``): one run of the run store (:func:`pretrain_spec`, :func:`train_source_run`), trained once
    by :func:`tokenbook.runs.launch` (``launch``: ``store``, ``workers``, ``threads``, ... as there) and read back by
    every later execution; the returned ``ref`` names it for the fine-tuning runs' specs."""
    from tokenbook import runs as R

    if via_store is None:
        via_store = executor != "kernel"
    if not via_store:
        if executor != "kernel":
            raise ValueError(f"executor {executor!r} trains through the run store; via_store=False needs 'kernel'")
        model, res = _fit_source(model_name, model_kwargs, bundle, cfg, batch_size, num_workers)
        return Pretrained(model.eval().requires_grad_(False), res.history, dict(res.final), dict(res.timing))
    spec = pretrain_spec(model_name, model_kwargs, bundle.config, cfg, batch_size, num_workers)
    done = R.launch([spec], executor=executor, **launch)
    run = done[0]
    model = run.output.load_into(_build_backbone(model_name, model_kwargs, cfg.seed))
    ref = {"kind": "stored", **R.stored_ref(run.key, spec, launch.get("store"))}
    return Pretrained(model.eval().requires_grad_(False), run.output.history, dict(run.output.final),
                      dict(run.output.timing), ref, done)


def launch_finetune_seeds(pretrained: Pretrained, tasks: Sequence[TargetTask], task_arguments: Sequence[dict],
                          methods: Sequence[tuple[str, int]], cfg, seeds: Sequence[int], train_steps: int = 0,
                          full_lr: float = 0.0, memory_norm: str = "pre", impl: str = "exact", num_workers: int = 0,
                          keep_full: bool = False, macs: bool = True, val_evals: int = 0, executor: str = "kernel",
                          **launch: Any) -> FinetuneRun:
    """:func:`run_finetune_seeds` through the run store: every (seed, task, method) run is one stored run
    (:func:`finetune_spec`, its backbone ``pretrained.ref``), trained once by :func:`tokenbook.runs.launch`
    (``executor`` and ``launch`` as there) and read back by every later execution; the models are rebuilt on
    ``pretrained.backbone`` and the rows written as the kernel path writes them. ``task_arguments[i]`` is
    ``tasks[i]``'s :func:`task_args` (the tasks are loaded here too, for the rows and the rebuilt models). The
    result's ``launched`` attribute holds the Run records."""
    import pandas as pd

    from tokenbook import runs as R

    if pretrained.ref is None:
        raise ValueError("the backbone has no ref: pre-train it through the store (pretrain_backbone with "
                         "via_store=True) or name its checkpoint file (backbone_ref)")
    if len(tasks) != len(task_arguments):
        raise ValueError(f"{len(tasks)} tasks but {len(task_arguments)} task arguments")
    if not len(seeds):
        raise ValueError("no seeds given")
    plan = []
    for s in seeds:
        for task, targs in zip(tasks, task_arguments):
            for mode, cells in methods:
                tcfg = finetune_config(dataclasses.replace(cfg, seed=int(s)), mode, len(task.bundle.train),
                                       train_steps, full_lr, val_evals)
                plan.append((int(s), task, mode, cells, tcfg,
                             finetune_spec(pretrained.ref, targs, mode, cells, tcfg, int(s), memory_norm, impl,
                                           num_workers)))
    done = R.launch([q[-1] for q in plan], executor=executor, **launch)
    rows, models, histories, first = [], {}, {}, {}
    for (s, task, mode, cells, tcfg, spec), run in zip(plan, done):
        label = method_label(mode, cells)
        model = rebuild_finetune(spec.args, run.output, pretrained.backbone, task)
        need_macs = macs and (task.name, label) not in first
        row = _finetune_row(model, task, mode, cells, tcfg, run.output.final, run.output.timing, macs=need_macs)
        if macs and not need_macs:
            row.update(first[(task.name, label)])
        elif macs:
            first[(task.name, label)] = {"gmacs": row["gmacs"], "gflops": row["gflops"]}
        rows.append({"seed": s, **row})
        histories[(s, task.name, label)] = run.output.history
        models[(s, task.name, label)] = model if (mode != "full" or keep_full) else None
    out = FinetuneRun(pd.DataFrame(rows), models, histories)
    out.launched = done
    return out

def pretrain_config(params: dict, **overrides: Any):
    """The source pre-training's ``TrainConfig`` from the notebook's parameters: AdamW (weight decay 0.05), peak
    ``pretrain_lr``, ``pretrain_warmup_epochs`` of linear warm-up, cosine decay, ``pretrain_label_smoothing``,
    batch ``pretrain_batch_size``, seed ``seed``, no progress bars (``max_steps``: run_all.sh --proof)."""
    from tokenbook.train import TrainConfig

    kw = dict(epochs=params["pretrain_epochs"], batch_size=params["pretrain_batch_size"], lr=params["pretrain_lr"],
              warmup_epochs=float(params.get("pretrain_warmup_epochs", 1.0)),
              label_smoothing=float(params.get("pretrain_label_smoothing", 0.0)), accelerator=params["accelerator"],
              precision=params["precision"], seed=params["seed"], progress=False,
              max_steps=params.get("max_steps") or None)
    kw.update(overrides)
    return TrainConfig(**kw)


def finetune_seeds(pretrained: Pretrained, tasks: Sequence[TargetTask], task_arguments: Sequence[dict],
                   methods: Sequence[tuple[str, int]], cfg, seeds: Sequence[int], executor: str = "kernel",
                   **kw: Any) -> FinetuneRun:
    """The fine-tuning table over the seeds, where the backbone says: through the run store
    (:func:`launch_finetune_seeds`) when ``pretrained`` has a ref (pre-trained through the store, or a checkpoint
    file named with :func:`backbone_ref`), else in this process (:func:`run_finetune_seeds`, ``executor`` must be
    ``kernel``). ``kw``: ``train_steps``, ``full_lr``, ``memory_norm``, ``num_workers``, ``val_evals``, and for the
    store path the launcher's keywords."""
    if pretrained.ref is not None:
        return launch_finetune_seeds(pretrained, tasks, task_arguments, methods, cfg, seeds, executor=executor, **kw)
    if executor != "kernel":
        raise ValueError(f"executor {executor!r} trains through the run store; the backbone needs a ref")
    launch_keys = {"store", "workers", "threads", "cluster", "resources", "wait"}
    run = run_finetune_seeds(pretrained.backbone, tasks, methods, cfg, seeds, verbose=False,
                             **{k: v for k, v in kw.items() if k not in launch_keys})
    run.launched = []
    return run


__all__ += ["proof_data"]  # the runner's --proof hook (tokenbook.experiments.memory_report)
