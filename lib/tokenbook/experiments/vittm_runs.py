"""The ViTTM notebook's training runs (``notebooks/01_vittm.ipynb``), re-exported by
:mod:`tokenbook.experiments.vittm`: the model factory and the summary rows of a trained model, and the runs through the
workbook's run store (:mod:`tokenbook.runs`): one spec per (model, seed) (:func:`run_spec`, with the model's keywords
in one form per architecture, :func:`canonical_kwargs`, so that section 2's ViTTM and an ablation arm of the same
configuration are one run), its trainer (:func:`train_run`, the steps and numbers of training in the kernel),
section 2's seeds (:func:`_train_seeds_stored`) and the ablations' cache (:func:`store_runs_into_cache`).
The paper's two stages (the ``full`` profile) are stored runs too: one pre-training per model
(:func:`pretrain_runs`, the same trainer on the pre-training data), and section 2's runs fine-tune it, one run per
seed keyed by the pre-training's key (:func:`finetune_spec`, :func:`finetune_run`), so that every executor of the
launcher (``kernel``, ``processes``, ``torchrun``, ``submitit``) trains both. The notebook's train configs
(:func:`make_train_config`) and the launcher checks of its parameters (:func:`launch_problems`) live here too.
Imports nothing of :mod:`~tokenbook.experiments.vittm` (the trainer runs in launcher processes too).
"""
from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any, Mapping, Optional, Sequence

import pandas as pd
import torch
import torch.nn as nn

from tokenbook import bench
from tokenbook.models import vittm as V
from tokenbook.repro import seed_everything
from tokenbook.train import RECIPES, TrainConfig, all_heads, fit_launched, recipe

__all__ = ["create", "canonical_kwargs", "run_spec", "train_run", "store_runs_into_cache", "make_train_config",
           "global_batch", "launch_problems", "PretrainedRefs", "pretrain_data_config", "pretrain_runs",
           "finetune_spec", "finetune_run"]


def create(name: str, meta: bool = False, **kwargs) -> nn.Module:
    """``timm.create_model`` for the workbook's names (registers them first); ``meta`` builds on the meta device."""
    import timm

    import tokenbook.models  # noqa: F401  (registers the families)

    if meta:
        with torch.device("meta"):
            return timm.create_model(name, **kwargs)
    return timm.create_model(name, **kwargs)


def _tokens(model: nn.Module, img_size: int) -> tuple[Any, Any]:
    if isinstance(model, V.ViTTM):
        return model.num_memory_tokens, model.num_process_tokens
    return None, getattr(getattr(model, "patch_embed", None), "num_patches", None)


def _headline(final: dict, is_vittm: bool) -> tuple[Optional[float], Optional[float], float]:
    if is_vittm:
        return final.get("val_top1_memory"), final.get("val_top1_process"), final.get("val_top1_memory")
    return None, None, final.get("val_top1")


def _model_row(label: str, name: str, model: nn.Module, final: Mapping[str, Any], timing: Mapping[str, Any],
               epochs: int, img: int) -> dict:
    """One row of :func:`train_models`' summary for a trained ``model``, its final metrics and its timing."""
    is_ttm = isinstance(model, V.ViTTM)
    mem, proc, top1 = _headline(dict(final), is_ttm)
    ntok = _tokens(model, img)
    counted = copy.deepcopy(model).cpu()
    with all_heads(counted):
        gmacs = bench.count_macs(counted, input_size=(3, img, img))["gmacs"]
    return {"model": label, "timm_name": name, "memory_tokens": ntok[0], "process_tokens": ntok[1],
            "params_total": bench.count_params(model)["total"],
            "gmacs": gmacs,
            "top1": top1, "headline_head": "memory" if is_ttm else "cls",
            "top1_memory": mem, "top1_process": proc,
            "ema_top1": final.get("ema_top1_memory" if is_ttm else "ema_top1"),
            "epochs": epochs, "steps": timing["steps"], "train_wall_s": timing["wall_time_s"],
            "step_ms": timing["step_ms"], "train_img_s": timing["train_img_s"],
            "device": timing["device"]}


def _model_latency(model: nn.Module, label: str, img: int, batch: int, device: str, min_run_time: float) -> dict:
    """The latency columns of :func:`train_models` (both ViTTM heads computed)."""
    with all_heads(model):
        lat = bench.measure_latency(model, input_size=(3, img, img), batch_size=batch, device=device,
                                    min_run_time=min_run_time, name=label)
    return dict(latency_ms=lat.median_ms, latency_batch=batch, throughput_img_s=lat.throughput_img_s)


def _config_key(model: nn.Module) -> tuple:
    return (model.embed_dim, model.depth, model.num_heads, model.rw_head_type, model.fusion_type,
            model.latent_size_scale, model.memory_blocks_type, model.memory_ps, model.process_ps, model.img_size)


def _cache_entry(final: Mapping[str, Any], timing: Mapping[str, Any], history: pd.DataFrame) -> dict:
    """What :func:`run_ablation`'s cache keeps of one run (``_curve``: the memory head's validation top-1)."""
    h = history
    return {"top1_memory": final.get("val_top1_memory"), "top1_process": final.get("val_top1_process"),
            "train_loss": final.get("train_loss"), "train_wall_s": timing["wall_time_s"], "step_ms": timing["step_ms"],
            "_curve": h["val_top1_memory"].dropna().tolist() if "val_top1_memory" in h else []}


#: ViTTM constructor arguments -> the attributes that hold their resolved values (see :func:`canonical_kwargs`)
_TTM_OPTIONS = {"embed_dim": "embed_dim", "depth": "depth", "num_heads": "num_heads", "rw_head_type": "rw_head_type",
                "fusion_type": "fusion_type", "latent_size_scale": "latent_size_scale",
                "memory_blocks": "memory_blocks_type", "memory_ps": "memory_ps", "process_ps": "process_ps",
                "process_embedder_type": "process_embedder_type", "in_chans": "in_chans",
                "num_classes": "num_classes"}


def canonical_kwargs(name: str, kwargs: Mapping[str, Any]) -> dict:
    """``kwargs`` of ``create(name, **kwargs)`` in one form per model, so that two ways of asking for the same ViTTM
    (section 2's ``embed_dim`` and ``img_size``; a claim arm's ``depth``, ``rw_head_type="lin"``,
    ``memory_blocks="none"``) give the same run in the store: the resolved architecture (every option
    :func:`_config_key` compares, the classes, channels and process embedder, ``img_size``) plus each other keyword
    whose value differs from the constructor's default. Building with these gives the same model, draw for draw.
    Other models: ``kwargs`` unchanged. The model is built on the meta device (no memory, no random draws)."""
    import inspect

    m = create(name, meta=True, **kwargs)
    if not isinstance(m, V.ViTTM):
        return dict(kwargs)
    out = {k: getattr(m, a) for k, a in _TTM_OPTIONS.items()}
    h, w = m.img_size
    out["img_size"] = h if h == w else [h, w]
    defaults = inspect.signature(V.ViTTM.__init__).parameters
    for k, v in kwargs.items():
        if k not in out and not (k in defaults and defaults[k].default == v):
            out[k] = v
    return out


def run_spec(name: str, model_kwargs: Mapping[str, Any], data_config: Any, train_config: TrainConfig,
             batch_size: int, num_workers: int = 0, label: str = ""):
    """The :class:`tokenbook.runs.RunSpec` of one training run of this notebook (trainer :func:`train_run`): model
    (:func:`canonical_kwargs`), data, recipe (``train_config.seed`` is the run's seed; the progress bar is off, it
    decides nothing), batch and loader workers. A model that is not a ViTTM (the ViT baseline) is the workbook's
    plain classifier run (:func:`tokenbook.experiments.baselines_runs.classifier_spec`), the same stored run as 00's small ViT and 03's
    full-token arm where model, recipe, data and seed agree."""
    from tokenbook.experiments.baselines_runs import classifier_spec
    from tokenbook.runs import RunSpec, fit_args

    if not isinstance(create(name, meta=True, **model_kwargs), V.ViTTM):  # the ViT baseline: the workbook's one run
        return classifier_spec(name, dict(model_kwargs), data_config, train_config, batch_size, num_workers, label)
    return RunSpec("tokenbook.experiments.vittm_runs:train_run",
                   fit_args(name, canonical_kwargs(name, model_kwargs), data_config,
                            replace(train_config, progress=False), batch_size, num_workers),
                   label=label or f"{name} seed {train_config.seed}")


def train_run(model_name: str, model_kwargs: dict, data: dict, train: dict, batch_size: int, num_workers: int = 0):
    """Trainer of :func:`run_spec` (in the kernel, a launcher process or a job), the steps of :func:`train_models`
    and :func:`run_ablation`: the workbook's one classifier trainer,
    :func:`tokenbook.experiments.baselines_runs.train_classifier` (data, loaders seeded with the run's seed,
    ``seed_everything(seed)``, the model, ``fit_launched``), under this module's trainer name so that the stored
    ViTTM runs keep their keys. Returns a :class:`tokenbook.runs.TrainedRun`."""
    from tokenbook.experiments.baselines_runs import train_classifier

    return train_classifier(model_name, model_kwargs, data, train, batch_size, num_workers)


def _rebuild(name: str, kwargs: Mapping[str, Any], run: Any) -> nn.Module:
    """The trained model of a stored run (weights from ``run.state_dict``), on the CPU, in eval mode."""
    return run.load_into(create(name, **kwargs)).eval()


def _launch(specs: Sequence[Any], executor: str, launched: Optional[list] = None, **launch_kw: Any) -> list:
    from tokenbook import runs as R

    done = R.launch(list(specs), executor=executor, **launch_kw)
    if launched is not None:
        launched.extend(done)
    return done


def store_runs_into_cache(cache: dict, base_model: str, jobs: Sequence[tuple[str, dict, int]], data_config: Any,
                          cfg: TrainConfig, batch_size: int, num_workers: int, executor: str,
                          launched: Optional[list] = None, **launch_kw: Any) -> None:
    """The ablation runs ``jobs`` (``(label, model kwargs, seed)`` on ``base_model``) that ``cache`` lacks, from
    the run store in one launch (trained there when missing), as ``run_ablation``'s cache entries, marked as
    new so that the first setting asking for one is not counted as a reuse."""
    todo: dict[tuple, Any] = {}
    for label, args, seed in jobs:
        key = (_config_key(create(base_model, meta=True, **args)), seed)
        if key not in cache and key not in todo:
            todo[key] = run_spec(base_model, args, data_config, replace(cfg, seed=seed), batch_size, num_workers,
                                 label=f"{label} seed {seed}")
    if not todo:
        return
    for key, run in zip(todo, _launch(list(todo.values()), executor, launched, **launch_kw)):
        res = run.output
        cache[key] = {**_cache_entry(res.final, res.timing, res.history), "_fresh": True}


def _train_seeds_stored(models: Mapping[str, tuple[str, dict]], bundle, batch_size: int, cfg: TrainConfig,
                        seeds: Sequence[int], num_workers: int, latency: bool, latency_batch: int,
                        latency_device: str, min_run_time: float, executor: str, also: Sequence[Any],
                        launched: Optional[list], launch_kw: dict, pretrained: Optional[Mapping[str, dict]] = None
                        ) -> tuple[pd.DataFrame, dict[int, dict[str, pd.DataFrame]], dict[str, nn.Module]]:
    """``train_seeds`` of :mod:`tokenbook.experiments.vittm` through the run store (see there): one spec per (model,
    seed), launched after ``also``; a model with a ref in ``pretrained`` (:func:`pretrain_runs`) is fine-tuned from
    it (:func:`finetune_spec`); the rows of ``train_models`` from each run's final metrics and timing, the models
    rebuilt from the stored weights, latency for the first seed."""
    img = bundle.config.img_size
    plan = []  # (seed, label, name, spec)
    for s in seeds:
        for label, (name, kw) in models.items():
            ref, args = (pretrained or {}).get(label), {**kw, "num_classes": bundle.num_classes}
            spec = (finetune_spec(ref, name, args, bundle.config, replace(cfg, seed=s), batch_size, num_workers,
                                  label=f"{label} fine-tuning seed {s}") if ref else
                    run_spec(name, args, bundle.config, replace(cfg, seed=s), batch_size, num_workers,
                             label=f"{label} seed {s}"))
            plan.append((s, label, name, spec))
    also = list(also)
    after = list(getattr(pretrained, "after", []) or [])  # pre-trainings still running: their jobs first
    every = _launch(also + [q[-1] for q in plan], executor, **launch_kw,  # ``also`` (the claim arms) first
                    **({"after": after} if after else {}))
    done = every[len(also):]
    if launched is not None:  # section 2's records first: a run that is also a claim arm keeps section 2's label
        launched.extend(done + every[:len(also)])
    frames, hist, first = [], {}, {}
    for i, s in enumerate(seeds):
        rows, h, trained = [], {}, {}
        for (seed, label, name, spec), run in zip(plan, done):
            if seed != s:
                continue
            res = run.output
            model = _rebuild(name, spec.args["model_kwargs"], res)
            row = _model_row(label, name, model, res.final, res.timing, cfg.epochs, img)
            if latency and i == 0:
                row.update(_model_latency(model, label, img, latency_batch, latency_device, min_run_time))
            rows.append(row)
            h[label], trained[label] = res.history, model
        frames.append(pd.DataFrame(rows).assign(seed=s))
        hist[s] = h
        if i == 0:
            first = trained
    return pd.concat(frames, ignore_index=True), hist, first


# ----------------------------------------------------------------------------------------------------------
# train configs, the launcher checks of the notebook's parameters, and the paper's two stages as stored runs
# ----------------------------------------------------------------------------------------------------------
#: Notebook parameters that override a recipe when they are set (0 or empty keeps the recipe's value).
_RECIPE_OVERRIDES = ("epochs", "devices", "num_nodes", "max_steps_per_epoch", "max_steps", "accelerator", "precision")
#: strategies whose ranks Fabric starts itself (from the kernel or a launcher process)
_OWN_RANKS = ("ddp_notebook", "ddp_fork", "ddp_spawn")


def make_train_config(params: Mapping[str, Any], recipe_name: str = "", **overrides) -> TrainConfig:
    """The notebook's training config. With ``recipe_name`` (a :data:`tokenbook.train.RECIPES` key, e.g.
    ``vittm_b_ft_in1k``) the paper recipe is used and only these notebook parameters override it when set (non-zero /
    non-empty / not 'auto' / not '32-true'): epochs, devices, num_nodes, max_steps_per_epoch, accelerator, precision;
    the seed always comes from the notebook. Fewer devices x nodes than the recipe names (``-p num_nodes 1`` on one
    node) keep the recipe's global batch, and so its learning rate and schedule in optimizer steps, by accumulating
    gradients (``grad_accum`` = the recipe's world over this one, when it divides), unless ``keep_global_batch`` is
    False or ``overrides`` set the devices, nodes or accumulation themselves. Without a recipe every TrainConfig field is read from ``params``.
    Strategy: one process (devices x nodes = 1) trains without DDP (Fabric would otherwise wait for a launcher);
    several train with the ``strategy`` parameter, where it is ``auto`` (or absent) plain ``ddp``, because no
    parameter is left unused here (the official find_unused_parameters only covered its unused tensors).
    ``overrides`` win."""
    if recipe_name:
        if recipe_name not in RECIPES:
            raise ValueError(f"unknown recipe {recipe_name!r}; ViTTM recipes: "
                             f"{sorted(k for k in RECIPES if k.startswith('vittm'))}")
        kw = {k: params[k] for k in _RECIPE_OVERRIDES if params.get(k) not in (None, 0, "", "auto")
              and not (k == "precision" and params[k] in ("32-true", "32"))}
        kw["seed"] = params.get("seed", 0)
        kw["progress"] = params.get("progress", True)
        cfg = recipe(recipe_name, **{**kw, **overrides})
        if params.get("keep_global_batch", True) and not {"grad_accum", "devices", "num_nodes"} & overrides.keys():
            cfg = _keep_global_batch(cfg, RECIPES[recipe_name], int(params.get("batch_size") or cfg.batch_size))
    else:
        p = dict(params)
        for k in ("max_steps_per_epoch", "warmup_steps"):
            if p.get(k) == 0:
                p[k] = None
        cfg = TrainConfig.from_params(p, **overrides)
    if "strategy" in overrides:
        return cfg
    world = _world(cfg.devices, cfg.num_nodes)
    wanted = str(params.get("strategy") or "auto")
    if world == 1 and cfg.strategy.startswith("ddp"):
        return replace(cfg, strategy="auto")
    if world > 1 and (cfg.strategy.startswith("ddp") or cfg.strategy == "auto"):
        return replace(cfg, strategy="ddp" if wanted == "auto" else wanted)
    return cfg


def _world(devices: Any, num_nodes: Any) -> int:
    """Ranks of ``devices`` per node x ``num_nodes`` (a device list or 'auto' counts as one device per node)."""
    return (devices if isinstance(devices, int) else 1) * int(num_nodes or 1)


def _keep_global_batch(cfg: TrainConfig, rec: Mapping[str, Any], batch_size: int) -> TrainConfig:
    """``cfg`` with the gradient accumulation that gives it the global batch of the recipe ``rec`` (per-device batch
    x devices x nodes x accumulation) when it runs on fewer ranks than the recipe names, at the recipe's per-device
    batch (``batch_size``: the notebook's), and their ratio divides."""
    want = _world(rec.get("devices", 1), rec.get("num_nodes", 1)) * int(rec.get("grad_accum", 1))
    have = _world(cfg.devices, cfg.num_nodes) * cfg.grad_accum
    if batch_size != rec.get("batch_size", batch_size) or have >= want or want % have:
        return cfg
    return replace(cfg, grad_accum=cfg.grad_accum * (want // have))


def global_batch(cfg: TrainConfig) -> int:
    """Images per optimizer step: per-device batch x devices x nodes x gradient accumulation."""
    return cfg.batch_size * _world(cfg.devices, cfg.num_nodes) * cfg.grad_accum


def _stages(params: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(stage, recipe name)`` of the runs the notebook trains under ``params``: the pre-training when
    ``pretrain_dataset`` is set, then section 2's (fine-tuning) runs."""
    return ([("pre-training", params.get("pretrain_recipe") or "")] if params.get("pretrain_dataset") else []) + [
        ("training" if not params.get("pretrain_dataset") else "fine-tuning", params.get("recipe") or "")]


def launch_problems(params: Mapping[str, Any]) -> list[str]:
    """Why ``params`` cannot train their runs where ``executor`` says, one message per stage (empty: they can).
    Each stage's config is resolved first (:func:`make_train_config`: a recipe's devices and nodes where the
    parameters say 0), so that a recipe over several nodes is checked as it will run: ``torchrun`` starts the ranks
    of one node (the IN-21k-P pre-training is 2 nodes x 2 GPUs: ``submitit``, or ``-p num_nodes 1``); ``torchrun``
    and ``submitit`` need strategy ``ddp`` (each task is a rank); ``kernel`` and ``processes`` need a strategy that
    starts its ranks itself (``ddp_notebook``). A config that cannot be built is left to the notebook's own error."""
    ex, out = params.get("executor", "kernel"), []
    for stage, rname in _stages(params):
        try:
            cfg = make_train_config(params, rname)
        except (ValueError, TypeError):
            continue
        devices = cfg.devices if isinstance(cfg.devices, int) else 1
        if _world(cfg.devices, cfg.num_nodes) <= 1:
            continue
        what = (f"the {stage} runs ({'recipe ' + rname if rname else 'no recipe'}) are {cfg.num_nodes} node(s) x "
                f"{devices} devices, strategy {cfg.strategy!r}")
        own = cfg.strategy.startswith(_OWN_RANKS)
        if ex == "torchrun" and cfg.num_nodes > 1:
            out.append(f"{what}: executor 'torchrun' starts the ranks of one node; use executor 'submitit' (a "
                       f"cluster), or -p num_nodes 1 (the same global batch of {global_batch(cfg)}, accumulating "
                       f"gradients over {cfg.num_nodes * cfg.grad_accum} steps)")
        elif ex in ("torchrun", "submitit") and own:
            out.append(f"{what}: executor {ex!r} starts the ranks itself; use strategy 'ddp'")
        elif ex in ("kernel", "processes") and not own:
            out.append(f"{what}: executor {ex!r} cannot start their ranks; use executor 'torchrun' (this node) or "
                       "'submitit' (a cluster), or strategy 'ddp_notebook'")
    return out


def pretrain_data_config(params: Mapping[str, Any]) -> Any:
    """The pre-training stage's data: ``pretrain_dataset`` at ``img_size`` with ``pretrain_preset``."""
    from tokenbook.data import DataConfig

    return DataConfig(dataset=params["pretrain_dataset"], img_size=params["img_size"],
                      preset=params["pretrain_preset"])


class PretrainedRefs(dict):
    """label -> pre-training ref (:func:`pretrain_runs`), with ``after``: the SLURM jobs of pre-trainings still
    running, which the fine-tuning jobs must wait for (empty once they have finished)."""

    def __init__(self, refs: Mapping[str, dict], after: Sequence[str] = ()):
        super().__init__(refs)
        self.after = list(after)


def _chains_jobs(executor: str, launch_kw: Mapping[str, Any]) -> bool:
    """Do these launch options submit SLURM jobs without waiting (so later jobs can wait for them instead)?"""
    from tokenbook.runs import submitit_cluster

    return executor == "submitit" and not launch_kw.get("wait", True) and submitit_cluster(
        launch_kw.get("cluster")) == "slurm"


def pretrain_runs(models: Mapping[str, tuple[str, dict]], bundle: Any, cfg: TrainConfig, batch_size: int,
                  num_workers: int = 0, executor: str = "kernel", launched: Optional[list] = None,
                  **launch_kw: Any) -> PretrainedRefs:
    """The README's first stage: each ``label -> (name, kwargs)`` pre-trained on ``bundle`` (IN-21k-P) with ``cfg``
    (recipe ``vittm_pt_in21k``), drop path 0 (the README's pre-training value; the fine-tuning keeps its own), as
    one stored run per model (:func:`run_spec`), launched together (``executor`` and ``launch_kw`` as
    :func:`tokenbook.runs.launch`). Returns label -> the ref that :func:`finetune_spec` names: the run's key,
    trainer and arguments, and the store (a :class:`PretrainedRefs`).

    SLURM without waiting (``executor="submitit"``, ``wait=False``): pre-trainings still running do not stop the
    notebook here; their refs come back with their jobs in ``after``, and the fine-tuning jobs are submitted at once
    to start when those end well (:func:`train_seeds` passes them to the launcher), so that two executions of the
    notebook do it all: one submits both stages, the next collects them. Other clusters raise the launcher's
    :class:`tokenbook.runs.RunsPendingError` (their jobs cannot wait for each other)."""
    from tokenbook import runs as R

    specs = {label: run_spec(name, {**kw, "drop_path_rate": 0.0, "num_classes": bundle.num_classes}, bundle.config,
                             cfg, batch_size, num_workers, label=f"{label} pre-training")
             for label, (name, kw) in models.items()}
    try:
        done = _launch(list(specs.values()), executor, launched, **launch_kw)
    except R.RunsPendingError as e:
        if not _chains_jobs(executor, launch_kw):
            raise
        keys, after = e.keys, e.job_ids
    else:
        keys, after = [run.key for run in done], []
    return PretrainedRefs({label: R.stored_ref(k, spec, launch_kw.get("store"))
                           for (label, spec), k in zip(specs.items(), keys)}, after)


def finetune_spec(pretrained: Mapping[str, Any], name: str, model_kwargs: Mapping[str, Any], data_config: Any,
                  train_config: TrainConfig, batch_size: int, num_workers: int = 0, label: str = ""):
    """The :class:`tokenbook.runs.RunSpec` of one fine-tuning run (trainer :func:`finetune_run`): the arguments of
    :func:`run_spec` (model with the fine-tuning classes, data, recipe with the run's seed, batch, workers) and the
    pre-training's ref (:func:`pretrain_runs`), whose key is part of this run's: another pre-training is another
    fine-tuning."""
    from tokenbook.runs import RunSpec, fit_args

    ref = {k: pretrained[k] for k in ("key", "trainer", "args", "store")}
    return RunSpec("tokenbook.experiments.vittm_runs:finetune_run",
                   fit_args(name, canonical_kwargs(name, model_kwargs), data_config,
                            replace(train_config, progress=False), batch_size, num_workers, pretrained=ref),
                   label=label or f"{name} fine-tuning seed {train_config.seed}")


def _stored_pretraining(ref: Mapping[str, Any]) -> Any:
    """The stored output of the pre-training ``ref`` names, read by its key (the key its launch computed, so a job
    on another node or device reads the same run); an error when the store lacks it (never trained here)."""
    from tokenbook import runs as R

    return R.read_ref(dict(ref), "pre-training", "pretrain_runs launches the pre-training")


def finetune_run(model_name: str, model_kwargs: dict, data: dict, train: dict, batch_size: int, num_workers: int,
                 pretrained: dict):
    """Trainer of :func:`finetune_spec` (in the kernel, a launcher process, a torchrun rank or a job): the model
    built with ``model_kwargs`` and the pre-training's classes after ``seed_everything(seed)``, the stored
    pre-training's weights loaded strictly, both classifiers replaced for the fine-tuning classes (zero-initialised
    for a ViTTM, as the official ``--replace-head``), then the fine-tuning data and ``fit``. Returns a
    :class:`tokenbook.runs.TrainedRun`."""
    from tokenbook import data as D
    from tokenbook.runs import TrainedRun

    dcfg, tcfg = D.DataConfig(**data), TrainConfig(**train)
    pre = _stored_pretraining(pretrained)
    bundle = D.load_data(dcfg)
    tl, vl = D.make_loaders(bundle, batch_size, num_workers=num_workers, seed=tcfg.seed)
    seed_everything(tcfg.seed)
    a = pretrained["args"]  # its classes as built (a head of the registered size is not in canonical keywords)
    classes = create(a["model_name"], meta=True, **a["model_kwargs"]).num_classes
    model = pre.load_into(create(model_name, **{**model_kwargs, "num_classes": classes}))
    model.reset_classifier(model_kwargs["num_classes"])
    return TrainedRun.from_fit(fit_launched(model, tl, vl, tcfg, preprocess=bundle.preprocess,
                                            desc=f"{model_name} fine-tuning"))
