"""The T2T-ViT notebook's training runs (``notebooks/02_t2t_vit.ipynb``), re-exported by
:mod:`tokenbook.experiments.t2t_vit`: every variant of the small-scale ablations trained with one budget and seed
(:func:`train_variants`, in the calling process), repeated over seeds and paired by seed (:func:`train_seeds`), in the
kernel or through the workbook's run store (:func:`variant_spec` / :func:`train_variant_run`, one stored run per
variant and seed), and the parameter counts as the paper reports them (:func:`param_counts`, incl. the frozen tables).
Imports nothing of :mod:`~tokenbook.experiments.t2t_vit` (the trainer runs in launcher processes and jobs too).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch.nn as nn

from tokenbook.models import t2t_vit as tv

__all__ = ["TrainedVariants", "train_variants", "variant_spec", "train_variant_run", "SeededRuns", "train_seeds",
           "frozen_tables", "param_counts"]

# ----------------------------------------------------------------------------------------------------------
# From scratch at small scale
# ----------------------------------------------------------------------------------------------------------
@dataclass
class TrainedVariants:
    """What :func:`train_variants` returns: one summary row per variant, histories and the trained models."""

    summary: "Any"
    histories: dict = field(default_factory=dict)
    models: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)


def _summary_row(key: str, name: str, model: nn.Module, res: Any, cfg: Any, n_train: int, chans: int,
                 size: int) -> dict:
    """One row of :func:`train_variants`' summary for a trained ``model`` and its ``fit`` result (``res``: a
    ``FitResult`` or a :class:`tokenbook.runs.TrainedRun`)."""
    from tokenbook import bench

    pc = param_counts(model)  # T2T-ViT: + frozen tables as the paper counts; other models: count_params
    mc = bench.count_macs(model.cpu() if next(model.parameters()).is_cuda else model, input_size=(chans, size, size))
    return dict(variant=key, model=name, embed_dim=getattr(model, "embed_dim", None),
                depth=len(getattr(model, "blocks", [])), top1=res.final.get("val_top1"),
                top5=res.final.get("val_top5"), ema_top1=res.final.get("ema_top1"), params=pc["total"],
                params_m=pc["total"] / 1e6, mmacs=mc["gmacs"] * 1e3, gmacs=mc["gmacs"], gflops=mc["gflops"],
                epochs=cfg.epochs, train_images=n_train, train_wall_s=res.timing["wall_time_s"],
                train_step_s=res.timing["step_time_s"], step_ms=res.timing["step_ms"],
                train_img_s=res.timing["train_img_s"], device=res.timing["device"], same_run_as="")


def _variant_kwargs(variants: dict[str, tuple[str, dict]], key: str, bundle, model_kwargs: Optional[dict]) -> dict:
    name, kw = variants[key]
    c = bundle.config
    return {**kw, **(model_kwargs or {}), "num_classes": bundle.num_classes, "img_size": c.img_size,
            "in_chans": c.channels}


def _fit_variant(name: str, kw: dict, bundle, cfg, batch_size: int, seed: int, num_workers: int = 0,
                 hooks: Sequence = (), desc: str = "") -> Any:
    """``fit`` one variant: the model built right after ``seed_everything(seed)``, loaders seeded with ``seed``
    (so every variant of a seed sees the same batches). The one training body of :func:`train_variants` and of the
    store's trainer :func:`train_variant_run`."""
    import timm

    import tokenbook.models  # noqa: F401  (registers the workbook's models with timm)
    from tokenbook import data, repro
    from tokenbook.train import fit_launched

    repro.seed_everything(seed)
    model = timm.create_model(name, **kw)
    train_loader, val_loader = data.make_loaders(bundle, batch_size, num_workers=num_workers, seed=seed)
    return fit_launched(model, train_loader, val_loader, cfg, hooks=list(hooks), preprocess=bundle.preprocess,
               desc=desc or name)


def _reuse(out: "TrainedVariants", rows: list, key: str, first: str) -> None:
    """Variant ``key`` is the same model as the earlier ``first`` (``deep_narrow`` = ``t2t_performer``): share its
    run and copy its summary row."""
    out.histories[key], out.models[key], out.results[key] = out.histories[first], out.models[first], out.results[first]
    rows.append({**next(r for r in rows if r["variant"] == first), "variant": key, "same_run_as": first})


def _check_keys(variants: dict, keys: Sequence[str]) -> None:
    unknown = [k for k in keys if k not in variants]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; available: {sorted(variants)}")


def train_variants(variants: dict[str, tuple[str, dict]], bundle, cfg, keys: Sequence[str], batch_size: int,
                   seed: int = 0, num_workers: int = 0, model_kwargs: Optional[dict] = None,
                   hooks_factory: Optional[Callable[[], Sequence]] = None, log: Callable = print) -> TrainedVariants:
    """Train ``variants[k]`` for each ``k`` in ``keys`` with one budget (``cfg``) and one seed; same data order.

    ``variants`` maps a key to (registry name, kwargs) as :func:`fmnist_ablations` does.
    Keys naming the same model and kwargs are trained once (``deep_narrow`` = ``t2t_performer``). Each model is
    built right after ``seed_everything(seed)``, so a variant's init does not depend on which ran before. The summary
    has top-1 (and EMA top-1 when ``cfg.ema_decay``), params, MACs/FLOPs at the data's input size and the times
    measured by ``fit``: ``train_wall_s`` (end to end), ``train_step_s`` (forward + backward + optimizer step),
    ``step_ms`` per step. Times of variants trained in the same call are comparable (same machine and run).
    Trains in the calling process; :func:`train_seeds` with an ``executor`` trains through the run store instead.
    """
    import pandas as pd

    _check_keys(variants, keys)
    chans, size = bundle.config.channels, bundle.config.img_size
    out = TrainedVariants(summary=None)
    done: dict[tuple, str] = {}
    rows = []
    for key in keys:
        name = variants[key][0]
        kw = _variant_kwargs(variants, key, bundle, model_kwargs)
        sig = (name, tuple(sorted((k, str(v)) for k, v in kw.items())))
        if sig in done:  # same model as an earlier key: reuse its run
            _reuse(out, rows, key, done[sig])
            continue
        res = _fit_variant(name, kw, bundle, cfg, batch_size, seed, num_workers,
                           hooks=hooks_factory() if hooks_factory else (), desc=key)
        model = res.model
        row = _summary_row(key, name, model, res, cfg, len(bundle.train), chans, size)
        rows.append(row)
        done[sig] = key
        out.histories[key], out.models[key], out.results[key] = res.history, model, res
        log(f"{key:16s} {name:28s} top1 {row['top1']:.2f}  {row['mmacs']:.1f} MMACs  {row['train_wall_s']:.1f} s")
    out.summary = pd.DataFrame(rows)
    return out


# ----------------------------------------------------------------------------------------------------------
# the same runs through the workbook's run store (tokenbook.runs): trained once, read back by every later execution
# ----------------------------------------------------------------------------------------------------------
def variant_spec(name: str, model_kwargs: dict, data_config: Any, train_config: Any, batch_size: int,
                 num_workers: int = 0, label: str = ""):
    """The :class:`tokenbook.runs.RunSpec` of one variant run: model, data, recipe, batch and seed
    (``train_config.seed``), everything that decides it. Two keys naming the same model give the same spec, so
    the store trains it once (``deep_narrow`` = ``t2t_performer``)."""
    from tokenbook.runs import RunSpec, fit_args

    return RunSpec("tokenbook.experiments.t2t_vit_runs:train_variant_run",
                   fit_args(name, model_kwargs, data_config, train_config, batch_size, num_workers),
                   label=label or f"{name} seed {train_config.seed}")


def train_variant_run(model_name: str, model_kwargs: dict, data: dict, train: dict, batch_size: int,
                      num_workers: int = 0):
    """Trainer of :func:`variant_spec` (runs in the kernel or in a launcher process): load the data, build the model
    right after ``seed_everything(seed)``, ``fit`` it on loaders seeded with the same seed (the order of
    :func:`train_variants`), and return a :class:`tokenbook.runs.TrainedRun` whose ``extra["row"]`` is the
    summary row (params and MACs counted on the trained model)."""
    from tokenbook import data as D
    from tokenbook.runs import TrainedRun
    from tokenbook.train import TrainConfig

    dcfg, tcfg = D.DataConfig(**data), TrainConfig(**train)
    bundle = D.load_data(dcfg)
    res = _fit_variant(model_name, model_kwargs, bundle, tcfg, batch_size, tcfg.seed, num_workers)
    row = _summary_row("", model_name, res.model, res, tcfg, len(bundle.train), dcfg.channels, dcfg.img_size)
    return TrainedRun.from_fit(res, row=row)


def _rebuild(name: str, kw: dict, run: Any) -> nn.Module:
    """The trained model of a store run (weights from ``run.state_dict``), on the CPU, in eval mode."""
    import timm

    import tokenbook.models  # noqa: F401

    return run.load_into(timm.create_model(name, **kw)).eval()  # on the CPU: buffers outside the state dict too


@dataclass
class SeededRuns:
    """What :func:`train_seeds` returns: ``summary`` (one row per seed and variant, ``seed`` first) and the
    :class:`TrainedVariants` of each seed."""

    seeds: list
    summary: "Any"
    runs: dict = field(default_factory=dict)
    launched: list = field(default_factory=list)  # the tokenbook.runs.Run records when trained through the store

    def curves(self, variant: str, metric: str = "val_top1") -> list[list[float]]:
        """The validation curve of ``variant`` in every seed's run."""
        return [self.runs[s].histories[variant][metric].dropna().tolist() for s in self.seeds
                if variant in self.runs[s].histories and metric in self.runs[s].histories[variant]]


def train_seeds(variants: dict[str, tuple[str, dict]], bundle, cfg, keys: Sequence[str], batch_size: int,
                seeds: Sequence[int], executor: Optional[str] = None, workers: Optional[int] = None,
                store: Optional[str] = None, cluster: Optional[str] = None, resources: Optional[dict] = None,
                wait: bool = True, **kw: Any) -> SeededRuns:
    """:func:`train_variants` once per seed, paired by seed: for seed ``s`` every variant is built right after
    ``seed_everything(s)``, trained with ``cfg.seed = s`` and sees the same batches (the loader's generator is
    seeded with ``s``).

    ``executor=None``: in the calling process, one run after the other (hooks allowed). ``executor="kernel"`` or
    ``"processes"``: through the workbook's run store (:func:`tokenbook.runs.launch`): every (variant, seed) run is
    trained once, ``processes`` trains the missing ones side by side (``workers`` processes, the cores divided among
    them), and a later execution with nothing changed reads them all back; the models are rebuilt from the stored
    weights. ``"submitit"``: a job per missing run (``cluster``, ``resources``, ``wait`` as in
    :func:`tokenbook.runs.launch`). The ``data`` config of the runs is ``bundle.config``."""
    import dataclasses

    import pandas as pd

    if not seeds:
        raise ValueError("seeds is empty")
    out = SeededRuns(seeds=list(seeds), summary=None)
    if executor is not None:
        launch = dict(executor=executor, workers=workers, store=store, cluster=cluster, resources=resources, wait=wait)
        return _train_seeds_stored(out, variants, bundle, cfg, keys, batch_size, launch, **kw)
    frames = []
    for s in seeds:
        run = train_variants(variants, bundle, dataclasses.replace(cfg, seed=int(s)), keys, batch_size=batch_size,
                             seed=int(s), **kw)
        out.runs[s] = run
        frames.append(run.summary.assign(seed=int(s))[["seed", *run.summary.columns]])
    out.summary = pd.concat(frames, ignore_index=True)
    return out


def _train_seeds_stored(out: SeededRuns, variants: dict, bundle, cfg, keys: Sequence[str], batch_size: int,
                        launch: dict, num_workers: int = 0,
                        model_kwargs: Optional[dict] = None, hooks_factory: Optional[Callable] = None,
                        log: Callable = print) -> SeededRuns:
    """:func:`train_seeds` through the run store (see there)."""
    import dataclasses

    import pandas as pd

    from tokenbook import runs as R

    if hooks_factory is not None:
        raise ValueError("training hooks are live objects and cannot be part of a stored run; use executor=None")
    _check_keys(variants, keys)
    plan = []  # (seed, key, name, kwargs, spec)
    for s in out.seeds:
        scfg = dataclasses.replace(cfg, seed=int(s))
        for key in keys:
            kw = _variant_kwargs(variants, key, bundle, model_kwargs)
            spec = variant_spec(variants[key][0], kw, bundle.config, scfg, batch_size, num_workers,
                                label=f"{key} seed {s}")
            plan.append((int(s), key, variants[key][0], kw, spec))
    done = R.launch([q[-1] for q in plan], **launch)
    frames = []
    for s in out.seeds:
        tv_ = TrainedVariants(summary=None)
        rows, first_of = [], {}
        for (seed, key, name, kw, spec), run in zip(plan, done):
            if seed != int(s):
                continue
            sig = spec.canonical()
            if sig in first_of:  # the same run as an earlier key of this seed
                _reuse(tv_, rows, key, first_of[sig])
                continue
            first_of[sig] = key
            res = run.output
            rows.append({**res.extra["row"], "variant": key, "same_run_as": ""})
            tv_.histories[key], tv_.models[key], tv_.results[key] = res.history, _rebuild(name, kw, res), res
            log(f"seed {s} {key:16s} {name:28s} top1 {rows[-1]['top1']:.2f}  ({run.source}, {run.seconds:.1f} s)")
        tv_.summary = pd.DataFrame(rows)
        out.runs[s] = tv_
        frames.append(tv_.summary.assign(seed=int(s))[["seed", *tv_.summary.columns]])
    out.summary = pd.concat(frames, ignore_index=True)
    out.launched = done
    return out


# ----------------------------------------------------------------------------------------------------------
# Parameter counts as the paper reports them (reporting, moved out of tokenbook.models.t2t_vit)
# ----------------------------------------------------------------------------------------------------------
def frozen_tables(model: nn.Module) -> list[str]:
    """Names (as in ``model.named_buffers()``) of the fixed tables the paper and the official code count as
    parameters: every T2T-ViT ``pos_embed`` (sinusoid table) and every performer's random features ``w``.

    The official code holds them as ``requires_grad=False`` parameters; here they are persistent buffers (same
    state-dict keys, so official checkpoints load strictly; no parameter without a gradient, as timm expects). Works
    on any module (a whole model, ``model.tokens_to_token``, a block); empty for models without them.
    """
    names = []
    for prefix, m in model.named_modules():
        pre = prefix + "." if prefix else ""
        if isinstance(m, tv.T2TViT):
            names.append(pre + "pos_embed")
        elif isinstance(m, tv.TokenPerformer):
            names.append(pre + "w")
    return names


def param_counts(model: nn.Module) -> dict[str, int]:
    """Parameter counts as the paper / official code report them: ``total`` = parameters + :func:`frozen_tables`
    (e.g. T2T-ViT-14 21,545,550), ``trainable`` = parameters only (21,465,806). Any module; for models without
    frozen tables this is ``bench.count_params``."""
    from tokenbook.bench import count_params

    return count_params(model, include_buffers=frozen_tables(model))
