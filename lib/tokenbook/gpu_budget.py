"""ESTIMATE (not a measurement) of a profile's wall time on one H100/H200-class GPU, counted on the CPU.

Each notebook's training loops are :class:`Loop` rows derived from its parameters (:data:`NOTEBOOK_LOOPS`, through the
notebook's own experiment module: no hand-written counts). :func:`estimate` charges, per loop:

- training steps = runs x (``steps``, else epochs x floor(images / batch)). One real step is run at a small batch and
  counted in one dispatch pass: the batch work on the device (``Preprocess``, batch hooks), the forward (CPU bf16
  autocast for ``bf16-mixed``, all heads), a loss, the backward, gradient clipping, timm's optimizer (``foreach``, as
  on CUDA), ``zero_grad`` and the EMA update. A step costs the largest of compute (counted MACs x batch x 2 FLOPs at
  ``mfu`` of ``peak_tflops`` for bf16, of ``fp32_tflops`` for ``32-true``), launch (ATen operators x ``kernel_us``,
  eager PyTorch's host cost per operator, views included) and the data loader (batch x measured us per image /
  workers, which load in parallel); with 0 workers the loader is serial and is added. Operators that grow with the
  batch (per-sample Python loops of batch hooks: ``per_sample``) are counted at two batches and extrapolated.
  Every epoch also pays one batch of loading before its first step (the pipeline starts empty).
- evaluation: the forward alone under ``no_grad``, per evaluated epoch (twice with EMA), at 2 x batch.
- fixed seconds: parts measured by time (latency benchmarks: models x ``min_run_time``), a lower bound.

Not charged: compilation and warm-up, Python between steps (scheduler, logging, syncs), host-to-device copies,
checkpoints, model construction, figures, CPU-side tables, and the rows marked "not charged". Loader rates are measured
on this machine's CPU (:func:`measure_loader_us`; without the data :data:`DEFAULT_LOADER_US`), not the GPU machine's.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn

from tokenbook import bench

__all__ = ["Loop", "Costable", "from_registry", "timm_loop", "token_costable", "step_cost", "estimate", "measure_loader_us",
           "measure_token_loader_us", "notebook_loops", "workbook_estimate", "NOTEBOOK_LOOPS", "DEFAULT_LOADER_US"]

#: us per image of the pixel loader when Fashion-MNIST is not at hand: measure_loader_us on full Fashion-MNIST (32 px,
#: batch 256, best of 3 x 20 batches, num_workers 0) on 2026-12-01, "Intel(R) Xeon(R) Processor", 2 shared cores,
#: one thread: 5.4-6.1 (the first, single-run measurement: 8.2; the issue's: 10-15).
DEFAULT_LOADER_US = 5.5
DEFAULT_LOADER_SOURCE = "default 5.5 us/image (measured 2026-12-01 on full Fashion-MNIST, Intel Xeon, 1 thread)"
FM_TRAIN, FM_VAL = 6000, 1000  # Fashion-MNIST images per class


@dataclass
class Costable:
    """One step's inputs: ``model``, a raw ``example`` batch as the loader yields it, ``pre`` (device-side batch work
    before the training forward) and ``eval_pre`` (before the evaluation forward; None: ``pre``)."""

    model: nn.Module
    example: torch.Tensor
    pre: Optional[Callable] = None
    eval_pre: Optional[Callable] = None


@dataclass
class Loop:
    """One model trained ``runs`` times by a notebook, or a part without steps (``build`` None: ``fixed_s``)."""

    notebook: str
    part: str
    build: Optional[Callable[[], Any]] = None  # () -> Costable or (model, example[, pre[, eval_pre]])
    runs: int = 1  # arms x seeds
    epochs: int = 1
    images: int = 0  # training images per epoch
    batch: int = 256
    val_images: int = 0  # per evaluation pass
    eval_batch: int = 0  # 0: 2 x batch, as tokenbook.data.make_loaders
    workers: int = 0  # DataLoader num_workers
    steps: Optional[int] = None  # optimizer steps per run (step loops); overrides epochs x images // batch
    evals: Optional[int] = None  # evaluation passes per run; None: one per epoch
    fixed_s: float = 0.0  # seconds measured by time: a lower bound
    fixed_label: str = "timed (lower bound)"
    precision: str = "bf16-mixed"
    opt: str = "adamw"
    ema: bool = False
    clip_grad: bool = False
    data: str = "pixels"  # loader: pixels, tokens (Token-EDA), memory (tensors), none
    per_sample: bool = False  # operators grow with the batch: counted at two batch sizes
    key: Optional[tuple] = None  # step-cost cache key (None: not shared)
    note: str = ""

    def steps_per_run(self) -> int:
        return self.steps if self.steps is not None else self.epochs * _batches(self.images, self.batch)


def _batches(n: int, b: int, cap: Optional[int] = None) -> int:
    """Batches per epoch of ``make_loaders`` (drop_last when a full batch exists), capped at ``cap``."""
    k = n // b if n >= b else int(n > 0)
    return min(k, cap) if cap else k


def _identity(x):
    return x


def _freeze(d: dict) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in d.items()))


def from_registry(name: str, kwargs: Optional[dict] = None, input_chw: Sequence[int] = (3, 32, 32)):
    """A ``build`` of ``timm.create_model(name, **kwargs)`` on a float input of ``input_chw``."""
    def build():
        import timm

        import tokenbook.models  # noqa: F401  (registers the workbook's models)
        return Costable(timm.create_model(name, **(kwargs or {})), torch.randn(2, *input_chw))
    return build


def _pixel_build(make: Callable[[], nn.Module], img_size: int, channels: int = 3, raw=(1, 28, 28)):
    """A ``build`` on the uint8 batch path: raw images, ``tokenbook.data.Preprocess`` on the device, the model."""
    def build():
        from tokenbook.data import Preprocess

        return Costable(make(), torch.randint(0, 256, (2, *raw), dtype=torch.uint8),
                        Preprocess(img_size, channels, (0.5,) * channels, (0.5,) * channels))
    return build


def timm_loop(notebook: str, part: str, name: str, kwargs: dict, img_size: int, channels: int = 3, raw=(1, 28, 28),
              **loop: Any) -> Loop:
    """A :class:`Loop` of timm model ``name`` on uint8 images ``raw`` preprocessed to ``img_size`` (cached by all)."""
    make = from_registry(name, kwargs)
    return Loop(notebook, part, _pixel_build(lambda: make().model, img_size, channels, raw),
                key=("timm", name, _freeze(kwargs), img_size, channels, tuple(raw)), **loop)


# ----------------------------------------------------------------------------------------------------------
# counting one step
# ----------------------------------------------------------------------------------------------------------
_COSTS: dict = {}
_RATES: dict = {}


def _outputs(out) -> list:
    outs = out if isinstance(out, (tuple, list)) else [out]
    return [o for o in outs if torch.is_tensor(o) and o.is_floating_point()]


def _train_step(c: Costable, x: torch.Tensor, loop: Loop, amp: bool) -> Callable[[], None]:
    from timm.optim import create_optimizer_v2
    from timm.utils import ModelEmaV3

    from tokenbook.train import all_heads

    model, pre = c.model.train(), c.pre or _identity
    params = [p for p in model.parameters() if p.requires_grad]
    opt = create_optimizer_v2(model, opt=loop.opt, lr=1e-4, weight_decay=0.05, foreach=True)
    ema = ModelEmaV3(model, decay=0.999) if loop.ema else None
    for p in params:  # the optimizer's state exists after the first step: allocate it outside the counted step
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)

    def step():  # tokenbook.train.fit's step
        inp = pre(x)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp), all_heads(model):
            outs = _outputs(model(inp))
        sum(o.float().logsumexp(-1).mean() if o.ndim else o.float() for o in outs).backward()
        if loop.clip_grad:
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(model)
    return step


def _eval_step(c: Costable, x: torch.Tensor, amp: bool) -> Callable[[], None]:
    from tokenbook.train import all_heads

    model, pre = c.model, (c.pre or _identity) if c.eval_pre is None else c.eval_pre

    @torch.no_grad()
    def step():  # tokenbook.train.evaluate: forward, then top-1 / top-5 / loss per head
        model.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp), all_heads(model):
            outs = _outputs(model(pre(x)))
        y = torch.zeros(x.shape[0], dtype=torch.long)
        for o in outs:
            hit = o.float().topk(min(5, o.shape[-1]), dim=-1).indices.eq(y[:, None])
            hit[:, 0].sum(), hit.any(dim=-1).sum(), nn.functional.cross_entropy(o.float(), y, reduction="sum")
        model.train()
    return step


def _count(fn: Callable[[], None]) -> tuple[int, float]:
    """``(ATen operators, MACs)`` of ``fn()`` in one pass: :func:`tokenbook.bench.count_kernels` inside
    ``torch.utils.flop_counter``, the CPU's fused attention counted by the flash formulas (as it runs on the GPU: its
    backward recomputes the scores)."""
    from torch.utils.flop_counter import FlopCounterMode, flop_registry

    aten, mapping = torch.ops.aten, {}
    for cpu, gpu in (("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention"),
                     ("_scaled_dot_product_flash_attention_for_cpu_backward",
                      "_scaled_dot_product_flash_attention_backward")):
        if hasattr(aten, cpu) and getattr(aten, gpu) in flop_registry:
            formula = functools.partial(flop_registry[getattr(aten, gpu)])
            formula._get_raw = True  # the registry's formula already takes the raw arguments
            mapping[getattr(aten, cpu)] = formula
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with counter:
        n = bench.count_kernels(fn)
    return n, counter.get_total_flops() / 2


def step_cost(loop: Loop) -> dict:
    """``train_macs`` / ``eval_macs`` per image, ``kernels`` (fixed part), ``kernels_per_image`` (``per_sample``
    loops) and ``eval_kernels`` of one training / evaluation step of ``loop``; cached by ``loop.key`` and recipe."""
    key = loop.key and (loop.key, loop.precision, loop.opt, loop.ema, loop.clip_grad, loop.per_sample,
                        loop.val_images > 0)
    if key in _COSTS:
        return _COSTS[key]
    c = loop.build()
    c = c if isinstance(c, Costable) else Costable(*c)
    amp, x = loop.precision.startswith(("bf16", "16")), c.example
    n = int(x.shape[0])
    torch.manual_seed(0)
    kernels, macs = _count(_train_step(c, x, loop, amp))
    per_image = 0.0
    if loop.per_sample:
        per_image = (_count(_train_step(c, torch.cat([x] * 16), loop, amp))[0] - kernels) / (15 * n)
    out = {"train_macs": macs / n, "kernels": kernels - per_image * n, "kernels_per_image": per_image,
           "eval_macs": 0.0, "eval_kernels": 0}
    if loop.val_images > 0:
        ek, em = _count(_eval_step(c, x, amp))
        out.update(eval_macs=em / n, eval_kernels=ek)
    if key:
        _COSTS[key] = out
    return out


# ----------------------------------------------------------------------------------------------------------
# data loader rates, measured on this CPU
# ----------------------------------------------------------------------------------------------------------
def _time_loader(loader, n_batches: int, repeats: int = 3) -> float:
    """us per image over ``n_batches`` batches, best of ``repeats`` (a shared CPU only adds time)."""
    best = math.inf
    for _ in range(repeats):
        it = iter(loader)
        next(it)  # iterator start-up: charged once per epoch by the estimate
        n, t0 = 0, time.perf_counter()
        for _ in range(n_batches):
            try:
                batch = next(it)
            except StopIteration:
                it = iter(loader)
                batch = next(it)
            n += len(batch[-1])
        best = min(best, (time.perf_counter() - t0) / max(1, n) * 1e6)
    return best


def measure_loader_us(bundle, batch: int = 256, n_batches: int = 20) -> float:
    """us per image of the project's training loader ``make_loaders(bundle, batch, num_workers=0, device="cpu")``
    (the uint8 batch path: dataset indexing and collate) on this CPU."""
    from tokenbook.data import make_loaders

    return _time_loader(make_loaders(bundle, batch, num_workers=0, device="cpu")[0], n_batches)


def measure_token_loader_us(grid: int = 14, batch: int = 256, n_batches: int = 10, val: bool = False,
                            codebook_size: int = 391, n: int = 4096) -> float:
    """us per image of SeiT's loaders (``experiments.seit.token_loaders``; training: Token-EDA per sample, ``val``:
    plain ids) on synthetic ids (the cost does not depend on their values), on this CPU."""
    import numpy as np

    from tokenbook.data.tokens import TokenSet
    from tokenbook.experiments.seit import TokenData, token_loaders
    from tokenbook.methods.token_aug import build_synonyms

    ts = TokenSet(np.random.RandomState(0).randint(0, codebook_size, (n, grid, grid)).astype(np.uint16),
                  np.arange(n) % 10)
    cb = torch.randn(codebook_size, 32)
    td = TokenData(ts, ts, cb, build_synonyms(cb), 10, "synthetic", None)
    return _time_loader(token_loaders(td, batch)[int(val)], n_batches)


def _rate(kind: str, pixels_us: float) -> float:
    if kind in ("pixels", "none"):
        return pixels_us if kind == "pixels" else 0.0
    if kind not in _RATES:
        memory = torch.utils.data.TensorDataset(torch.zeros(8192, 1, 28, 28, dtype=torch.uint8))
        _RATES[kind] = {"tokens": measure_token_loader_us, "tokens (val)": lambda: measure_token_loader_us(val=True),
                        "memory": lambda: _time_loader(torch.utils.data.DataLoader(memory, 256, shuffle=True), 20)
                        }[kind]()
    return _RATES[kind]


# ----------------------------------------------------------------------------------------------------------
# the estimate
# ----------------------------------------------------------------------------------------------------------
COLUMNS = ["notebook", "part", "runs", "steps", "train_gmacs_per_image", "kernels_per_step", "compute_ms",
           "launch_ms", "loader_ms", "bound", "minutes", "note"]


def _row(lp: Loop, part: str, steps: int, macs: float, kernels: float, batch: int, us: float, peak: float, mfu: float,
         kernel_us: float, starts: int, note: str) -> dict:
    """One row: ``steps`` of ``max(compute, launch, loader)`` (workers) or ``max(compute, launch) + loader`` (no
    workers), plus ``starts`` loader start-ups of one batch each."""
    t_c, t_l = bench.estimated_step_s(macs, kernels, batch, peak, mfu, kernel_us)
    t_d = batch * us * 1e-6 / max(1, lp.workers)
    if lp.workers > 0:
        parts = {"compute": t_c, "launch": t_l, "loader": t_d}
        t, bound = max(parts.values()), max(parts, key=parts.get)
    else:
        t, bound = max(t_c, t_l) + t_d, ("compute" if t_c > t_l else "launch") + " + loader"
    return dict(notebook=lp.notebook, part=part, runs=lp.runs, steps=steps, train_gmacs_per_image=macs / 1e9,
                kernels_per_step=kernels, compute_ms=t_c * 1e3, launch_ms=t_l * 1e3, loader_ms=t_d * 1e3, bound=bound,
                minutes=(steps * t + starts * batch * us * 1e-6) / 60, note=note)


def estimate(loops: Sequence[Loop], peak_tflops: float = 989.0, mfu: float = 0.3, kernel_us: float = 8.0,
             loader_us_per_image: Optional[float] = None, fp32_tflops: float = 67.0, group: bool = True,
             loader_source: str = ""):
    """ESTIMATE of the GPU minutes of ``loops`` (see the module doc): a row per loop (loops sharing notebook and part
    merged when ``group``: steps and minutes summed, per-step columns step-weighted), an evaluation row per loop that
    evaluates, a ``subtotal`` per notebook and a ``total (ESTIMATE)``. ``loader_us_per_image`` (the pixel path)
    None: :data:`DEFAULT_LOADER_US`; token and in-memory loaders are measured here. ``attrs["settings"]``: the rates."""
    import pandas as pd

    pix = DEFAULT_LOADER_US if loader_us_per_image is None else float(loader_us_per_image)
    rows = []
    for lp in loops:
        if lp.build is None:
            rows.append(dict(notebook=lp.notebook, part=lp.part, runs=lp.runs, steps=0, bound=lp.fixed_label,
                             minutes=lp.fixed_s / 60, note=lp.note))
            continue
        c, us = step_cost(lp), _rate(lp.data, pix)
        peak = peak_tflops if lp.precision.startswith(("bf16", "16")) else fp32_tflops
        rows.append(_row(lp, lp.part, lp.runs * lp.steps_per_run(), c["train_macs"],
                         c["kernels"] + c["kernels_per_image"] * lp.batch, lp.batch, us, peak, mfu, kernel_us,
                         lp.runs * lp.epochs, lp.note))
        if lp.val_images > 0:
            eb = lp.eval_batch or 2 * lp.batch
            passes = lp.runs * (lp.epochs if lp.evals is None else lp.evals) * (2 if lp.ema else 1)
            us = _rate("tokens (val)", pix) if lp.data == "tokens" else us
            rows.append(_row(lp, f"{lp.part}: evaluation", passes * math.ceil(lp.val_images / eb), c["eval_macs"],
                             c["eval_kernels"], eb, us, peak, mfu, kernel_us, passes,
                             f"forward only, batch {eb}, {passes} passes"))
    df = pd.DataFrame(rows, columns=COLUMNS)
    if group and len(df):
        df = pd.DataFrame([_merge(g) for _, g in df.groupby(["notebook", "part"], sort=False)], columns=COLUMNS)
    out = []
    for nb, g in df.groupby("notebook", sort=False):
        out += g.to_dict("records") + [dict(notebook=nb, part="subtotal", steps=int(g["steps"].sum()),
                                            minutes=float(g["minutes"].sum()))]
    out.append(dict(notebook="all", part="total (ESTIMATE)", steps=int(df["steps"].sum()),
                    minutes=float(df["minutes"].sum())))
    res = pd.DataFrame(out, columns=COLUMNS)
    src = loader_source or (DEFAULT_LOADER_SOURCE if loader_us_per_image is None else f"{pix:.2f} us/image (given)")
    rates = "".join(f"; {k} loader {v:.2f} us/image (measured here)" for k, v in _RATES.items())
    res.attrs["settings"] = (f"ESTIMATE: {peak_tflops:g} TFLOP/s bf16 / {fp32_tflops:g} fp32 at MFU {mfu:g}, "
                             f"{kernel_us:g} us per ATen operator; pixel loader {src}{rates}")
    return res


def _merge(g) -> dict:
    if len(g) == 1:
        return g.iloc[0].to_dict()
    w = g["steps"].clip(lower=1)
    row = dict(notebook=g["notebook"].iloc[0], part=g["part"].iloc[0], runs=int(g["runs"].sum()),
               steps=int(g["steps"].sum()), minutes=float(g["minutes"].sum()),
               bound=g.groupby("bound")["steps"].sum().idxmax(),
               note="; ".join(dict.fromkeys(n for n in g["note"] if n)))
    row.update({c: float((g[c] * w).sum() / w.sum()) for c in COLUMNS[4:9]})
    return row


# ----------------------------------------------------------------------------------------------------------
# what each notebook trains, from its parameters (mirrors the notebook's cells and its experiments module)
# ----------------------------------------------------------------------------------------------------------
def _fm(n: int, classes: int = 10, per_class: int = FM_TRAIN) -> int:
    """Images of a Fashion-MNIST subset of ``n`` (0 = all) over ``classes`` classes."""
    return min(int(n), per_class * classes) if n else per_class * classes


def _sizes(p: dict, train: str = "train_subset", val: str = "val_subset") -> tuple[int, int]:
    if p.get("dataset", "fashion_mnist") != "fashion_mnist":
        raise ValueError(f"the GPU estimate knows Fashion-MNIST's image counts only, not {p['dataset']!r}")
    return _fm(p[train]), _fm(p[val], per_class=FM_VAL)


def _seeds(text: str) -> list[int]:
    from tokenbook.claims import parse_seeds

    return list(parse_seeds(text))


def _recipe(cfg) -> dict:
    """The Loop fields a ``TrainConfig`` decides."""
    return dict(precision=cfg.precision, opt=cfg.opt, ema=cfg.ema_decay > 0, clip_grad=bool(cfg.clip_grad))


def _fit(cfg, n: int, nv: int, workers: int, runs: int = 1, batch: int = 0) -> dict:
    """Loop fields of ``runs`` fit() calls with ``cfg`` on ``n`` / ``nv`` images in loaders of ``batch`` (0: the
    config's): epochs, steps, evaluation passes and the recipe."""
    b = batch or cfg.batch_size
    evals = sum(1 for e in range(cfg.epochs) if (e + 1) % cfg.eval_every == 0 or e + 1 == cfg.epochs)
    return dict(runs=runs, epochs=cfg.epochs, images=n, batch=b, val_images=nv, workers=workers,
                steps=cfg.epochs * _batches(n, b, cfg.max_steps_per_epoch), evals=evals, **_recipe(cfg))


def _cfg(p: dict, **kw):
    from tokenbook.train import TrainConfig

    return TrainConfig.from_params(p, **kw)


def _latency(nb: str, what: str, n: int, t: float) -> Loop:
    return Loop(nb, f"latency: {what} ({n} x {t:g} s)", runs=n, fixed_s=n * t)


def _not_charged(nb: str, part: str, note: str) -> Loop:
    return Loop(nb, part, fixed_label="not charged", note=note)


def _models(text: str) -> int:
    return len([m for m in text.split(",") if m.strip()])


def _loops_00(p: dict) -> list[Loop]:
    nb, img, (n, nv) = "00_baselines", p["img_size"], _sizes(p)
    cfg = _cfg(p, max_steps_per_epoch=p["max_steps_per_epoch"] or None)
    loops = [timm_loop(nb, f"small ViT {p['model_name']}", p["model_name"], dict(num_classes=10, img_size=img), img,
                       **_fit(cfg, n, nv, p["num_workers"]))]
    if p["latency"]:
        loops.append(_latency(nb, "efficiency table", _models(p["eff_models"]), p["latency_min_run_time"]))
    if p["bench_throughput"]:
        loops.append(_not_charged(nb, "training-throughput benchmark", "fit() on the CPU (accelerator 'cpu')"))
    return loops


def _loops_01(p: dict) -> list[Loop]:
    from tokenbook.experiments import vittm as X

    nb, img, name, (n, nv), seeds = "01_vittm", p["img_size"], p["model_name"], _sizes(p), _seeds(p["seeds"])
    S, w, b = len(seeds), p["num_workers"], p["batch_size"]  # the loaders' batch, also under a recipe
    cfg = X.make_train_config(p, p["recipe"])
    dp = dict(drop_path_rate=p["drop_path_rate"], num_classes=10, img_size=img)
    loops = [timm_loop(nb, f"section 2: {name} x {S} seeds", name, dict(dp, **({"embed_dim": p["embed_dim"]} if
                       p["embed_dim"] else {})), img, **_fit(cfg, n, nv, w, S, b)),
             timm_loop(nb, f"section 2: {p['vit_name']} x {S} seeds", p["vit_name"], dp, img,
                       **_fit(cfg, n, nv, w, S, b))]
    if p["pretrain_dataset"]:
        loops.append(_not_charged(nb, "pre-training stage", "its dataset's size is unknown here"))
    # ablations: the claim arms for every seed, the studies' other settings with the first seed; a configuration
    # already trained for a seed is reused (the notebook's shared cache, keyed by vittm._config_key)
    ab = X.make_train_config(p, "", epochs=p["ablation_epochs"], lr=p["ablation_lr"], ema_decay=0.0, progress=False)
    base, seen, todo = dict(embed_dim=p["ablation_embed_dim"], depth=p["ablation_depth"], img_size=img,
                            num_classes=10), set(), {}
    studies = [s.strip() for s in p["ablation_studies"].split(",") if s.strip()]
    labels = {"head_fusion": [f"{h.strip()}+{f.strip()}" for h in p["ablation_heads"].split(",")
                              for f in p["ablation_fusions"].split(",")],
              "patch_sizes": [s.strip() for s in p["ablation_patch_sizes"].split(",") if s.strip()] or None}

    def add(kw: dict, seed: int, part: str) -> None:
        args = {**base, **kw}
        key = (X._config_key(X.create(name, **args)), seed)
        if key not in seen:
            seen.add(key)
            todo.setdefault((part, _freeze(args)), [args, 0])[1] += 1
    for s in seeds if p["ablation_claims"] else []:
        for study, setting in X.CLAIM_ARMS.values():
            add(X.ablation_configs(study, img)[setting], s, f"ablations: claim arms x {S} seeds")
    for study in studies:
        cfgs = X.ablation_configs(study, img)
        for label in labels.get(study) or list(cfgs):
            add(cfgs[label], seeds[0], f"ablations: other settings of {', '.join(studies)} (seed {seeds[0]})")
    na, nva = _sizes(p, "ablation_train_subset", "ablation_val_subset")
    loops += [timm_loop(nb, part, name, args, img, **_fit(ab, na, nva, w, runs, b)) for (part, _), (args, runs) in
              todo.items()]
    if p["latency"]:
        loops += [_latency(nb, "efficiency table", _models(p["eff_models"]), p["latency_min_run_time"]),
                  _latency(nb, "section 2 models, first seed", 2, p["latency_min_run_time"])]
    if p["latency_repeats"]:
        loops.append(_not_charged(nb, "latency claim: ViT-B/16 vs ViTTM-B interleaved",
                                  f"2 x {p['latency_repeats']} fp32 forwards at batch {p['latency_batch']}: seconds"))
    return loops


def _loops_02(p: dict) -> list[Loop]:
    from tokenbook.experiments import t2t_vit as T

    if p["scale"] != "fmnist":
        raise ValueError("the GPU estimate covers the fmnist scale of 02_t2t_vit")
    nb, img, ch, (n, nv), S = "02_t2t_vit", p["img_size"], p["channels"], _sizes(p), len(_seeds(p["seeds"]))
    cfg = _cfg(p, max_steps_per_epoch=p["max_steps_per_epoch"] or None)
    variants = T.fmnist_ablations(img_size=img, in_chans=ch, num_classes=10, embed_dim=p["embed_dim"] or None,
                                  depth=p["depth"] or None, num_heads=p["num_heads"] or None)
    runs: dict = {}  # t2t_vit.train_variants trains keys naming the same model and kwargs once
    for key in [k.strip() for k in p["train_variants"].split(",") if k.strip()]:
        name, kw = variants[key]
        kw = {**kw, "drop_path_rate": p["drop_path_rate"], "num_classes": 10, "img_size": img, "in_chans": ch}
        runs.setdefault((name, _freeze(kw)), [name, kw, []])[2].append(key)
    return [timm_loop(nb, f"{' = '.join(keys)} x {S} seeds", name, kw, img, ch, **_fit(cfg, n, nv, p["num_workers"], S))
            for name, kw, keys in runs.values()]


def _toe_build(p: dict, kw: dict, toe_cfg: Optional[dict], epoch: int = 0, pre: bool = True):
    def make():
        from tokenbook.experiments import toe as E
        from tokenbook.methods import toe as M

        m = E.build_model(p["model_name"], 0, toe_cfg, p["toe_block_index"], **kw)
        if toe_cfg is not None:
            M.ToEStageHook().on_epoch_start(epoch, m)  # the stage of that epoch, as in training
        return m
    img = p["img_size"]
    return _pixel_build(make, img) if pre else lambda: Costable(make(), torch.randn(2, 3, img, img))


def _loops_03(p: dict) -> list[Loop]:
    from tokenbook.experiments import toe as E
    from tokenbook.methods import toe as M

    nb, (n, nv), S, name = "03_toe", _sizes(p), len(_seeds(p["seeds"])), p["model_name"]
    toe_cfg, cfg = E.toe_config(p), E.train_config(p)
    kw = dict(num_classes=10, img_size=p["img_size"], drop_path_rate=p["drop_path_rate"])
    fit, key = _fit(cfg, n, nv, p["num_workers"], S), ("toe", name, _freeze(kw), p["toe_block_index"])
    loops = [Loop(nb, f"full-token {name} x {S} seeds", _toe_build(p, kw, None), key=key, **fit)] \
        if p["run_baseline"] else []
    stages = [M.stage_for_epoch(toe_cfg["expansion_step"], e) for e in range(cfg.epochs)]
    for s in dict.fromkeys(stages):  # ToE charged per stage at its kept tokens; evaluation is full-token
        k = stages.count(s)
        loops.append(Loop(nb, f"ToE stage {s} ({k} epochs) x {S} seeds", _toe_build(p, kw, toe_cfg, stages.index(s)),
                          key=key + ("stage", s), **{**fit, "epochs": k, "evals": k,
                                                     "steps": fit["steps"] // cfg.epochs * k}))
    ts = M.TokenSelect(**toe_cfg)
    active = sum(ts.stage_active(s) for s in range(1, ts.num_stages + 1))
    loops.append(Loop(nb, f"token-select overhead timing ({active} stages x 3 variants)",
                      _toe_build(p, kw, None, pre=False), batch=p["overhead_batch"], precision="32-true", opt="sgd",
                      steps=active * 3 * (p["overhead_warmup"] + p["overhead_steps"]), data="none",
                      key=key + ("overhead",), note="fp32, synthetic batches; every variant at the full-token step "
                                                    "(an upper bound)"))
    return loops


def _loops_04(p: dict) -> list[Loop]:
    from tokenbook.experiments import seit as X

    if p["token_source"] != "train":
        raise ValueError("the GPU estimate covers token_source 'train' (the tokenizer trained in the notebook)")
    nb, (n, nv), S = "04_seit", _sizes(p), len(_seeds(p["seeds"]))
    grid, K, D, crop = 28 // p["tokenizer_downsample"], p["codebook_size"], p["code_dim"], p["crop"]
    cpu = "on the GPU (experiments.seit.token_device)"
    tok = dict(in_chans=1, image_size=28, downsample=p["tokenizer_downsample"], codebook_size=K, code_dim=D,
               hidden=p["tokenizer_hidden"])
    ta = dict(code_dim=D, codebook_size=K, in_grid=grid, out_grid=crop, dim=p["ta_dim"], heads=p["ta_heads"],
              dim_head=p["ta_dim_head"])
    loops = [Loop(nb, f"VQ tokenizer training ({p['tokenizer_steps']} steps)", lambda: _tokenizer(tok),
                  steps=p["tokenizer_steps"], batch=p["tokenizer_batch"], precision="32-true", opt="adam",
                  data="memory", key=("vq", _freeze(tok)), note=cpu + "; tokenizing every image after: not charged")]
    variants = X.parse_variants(p["variants"])
    if any(X.VARIANTS[v][2] for v in variants) and not p["tokenadapt_ckpt"]:
        loops.append(Loop(nb, f"TokenAdapt f/g training ({p['ta_steps']} steps)",
                          lambda: _ta_train(tok, ta, p["ta_per_sample"]), steps=p["ta_steps"], batch=p["ta_batch"],
                          precision="32-true", data="memory", per_sample=True,
                          key=("ta", _freeze(tok), _freeze(ta), p["ta_per_sample"]),
                          note=cpu + "; its Mixup/CutMix not charged"))
    for v in variants:
        fit = _fit(X.train_config(p, v), n, nv, p["num_workers"], S)
        if X.VARIANTS[v][0] == "pixels":
            loops.append(timm_loop(nb, f"{v}: {p['pixel_model']} x {S} seeds", p["pixel_model"],
                                   dict(num_classes=10, img_size=p["img_size"], drop_path_rate=p["drop_path"]),
                                   p["img_size"], **fit))
            continue
        tm = dict(num_classes=10, img_size=crop, in_chans=D, drop_path_rate=p["drop_path"])
        loops.append(Loop(nb, f"{v}: {p['token_model']} + batch hook x {S} seeds",
                          lambda v=v, tm=tm: _token_classifier(p, v, tm, ta, grid), data="tokens", per_sample=True,
                          key=("seit", v, _freeze(tm), _freeze(ta), p["rrc_scale_min"], p["ta_per_sample"]), **fit))
    return loops


def _tokenizer(kw: dict) -> Costable:
    from tokenbook.data.tokens import VQTokenizer

    return Costable(VQTokenizer(**kw), torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8), lambda x: x / 255.0)


class _TokenAdaptStep(nn.Module):
    """The step of ``methods.token_aug.train_tokenadapt``: tokens of the images and of their spatially augmented
    copies (no grad), then f, the same augmentation in f-space, and g's code logits."""

    def __init__(self, ta: nn.Module, tok: nn.Module, per_sample: bool):
        super().__init__()
        self.ta, self.tok, self.per_sample = ta.set_trainable(True), tok.eval().requires_grad_(False), per_sample
        self.cb = tok.export_codebook().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from tokenbook.methods.token_aug import apply_spatial, embed_ids, sample_spatial_params

        m, g = self.ta.out_grid, self.ta.in_grid
        with torch.no_grad():
            ids = self.tok.encode(x)
            sp = sample_spatial_params(x.shape[0], 2 * g, 2 * g, per_sample=self.per_sample)
            self.tok.encode(apply_spatial(x, sp, m * (x.shape[-1] // g)).clamp(0, 1))
        return self.ta.forward_logits(apply_spatial(self.ta.forward_conversion(embed_ids(ids, self.cb)), sp, 2 * m))


def _ta_train(tok: dict, ta: dict, per_sample: bool) -> Costable:
    from tokenbook.data.tokens import VQTokenizer
    from tokenbook.models.seit import TokenAdapt

    return Costable(_TokenAdaptStep(TokenAdapt(**ta), VQTokenizer(**tok), per_sample),
                    torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8), lambda x: x / 255.0)


def token_costable(model: nn.Module, variant: str, ta: dict, num_classes: int, crop: int, rrc_scale_min: float,
                   per_sample: bool = True, grid: int = 14) -> Costable:
    """A token classifier ``model`` with the variant's batch hook (``experiments.seit.make_hook``; TokenAdapt of
    ``ta``'s sizes for the TokenAdapt variants) as its device-side batch work, on the ids the token loader yields."""
    from tokenbook.experiments import seit as X
    from tokenbook.models.seit import TokenAdapt

    cb = torch.randn(ta["codebook_size"], ta["code_dim"])
    model.set_codebook(cb)
    hook = X.make_hook(variant, cb, num_classes, crop, TokenAdapt(**ta) if X.VARIANTS[variant][2] else None,
                       rrc_scale_min, per_sample)
    return Costable(model, torch.randint(0, ta["codebook_size"], (4, grid, grid)),
                    lambda x: hook(x, torch.arange(x.shape[0]) % num_classes)[0], _identity)


def _token_classifier(p: dict, v: str, tm: dict, ta: dict, grid: int) -> Costable:
    """04's token ViT (``token_model``) with the variant's batch hook."""
    import timm

    import tokenbook.models  # noqa: F401

    return token_costable(timm.create_model(p["token_model"], **tm), v, ta, 10, p["crop"], p["rrc_scale_min"],
                          p["ta_per_sample"], grid)


def _classes(text: str) -> list[int]:
    return [int(c) for c in text.split(",") if c.strip()]


def _memory_build(p: dict, mode: str, cells: int, classes: int, raw: tuple, extend_from: int = 0):
    def make():
        from tokenbook.experiments import memory as X

        bb = X.load_backbone(p["model_name"], len(_classes(p["source_classes"])) or p["checkpoint_num_classes"],
                             img_size=p["img_size"], patch_size=p["patch_size"]).eval().requires_grad_(False)
        if not extend_from:
            return X.finetune_model(bb, mode, classes, cells=cells, task="t", memory_norm=p["memory_norm"])
        base = X.finetune_model(bb, "memory", extend_from, cells=cells, task="a", memory_norm=p["memory_norm"])
        m = X.MemoryViT(bb, memory_norm=base.memory_norm, impl=base.impl)  # as experiments.memory.train_extension
        m.load_task("a", base.task_state_dict("a"))
        m.add_task("t", classes, cells=cells, extend=True)
        X.set_trainable(m, "memory", "t")
        return m.set_outputs("t")
    return _pixel_build(make, p["img_size"], 3, raw)


def _loops_05(p: dict) -> list[Loop]:
    from tokenbook.experiments import memory as X

    nb, img, S, w = "05_memory", p["img_size"], len(_seeds(p["seeds"])), p["num_workers"]
    src = _classes(p["source_classes"])
    bb = dict(num_classes=len(src), img_size=img, **({"patch_size": p["patch_size"]} if p["patch_size"] else {}))
    loops = []
    if not p["backbone_checkpoint"]:
        from tokenbook.train import TrainConfig  # the notebook's pre-training config: AdamW, no clipping, no EMA

        cfg = TrainConfig(epochs=p["pretrain_epochs"], batch_size=p["pretrain_batch_size"], precision=p["precision"])
        loops.append(timm_loop(nb, f"source pre-training on classes {p['source_classes']}", p["model_name"], bb, img,
                               **_fit(cfg, _fm(p["pretrain_subset"], len(src)), _fm(p["val_subset"], len(src), FM_VAL),
                                      w)))
    tasks = []  # (spec, train images, val images, classes, raw image shape)
    for item in [s.strip() for s in p["targets"].split(";") if s.strip()]:
        kind, _, arg = item.partition(":")
        if kind == "fm":
            c = len(_classes(arg))
            tasks.append((item, _fm(p["train_subset"], c), _fm(p["val_subset"], c, FM_VAL), c, (1, 28, 28)))
        elif kind == "digits":  # tokenbook.data.tasks.digits_data: 1,797 8x8 images
            nv = min(p["val_subset"] or 597, 897)
            tasks.append((item, min(p["train_subset"] or 1797, 1797 - nv), nv, 10, (1, 8, 8)))
        else:
            raise ValueError(f"the GPU estimate knows fm:<classes> and digits targets, not {item!r}")
    cfg = X.finetune_train_config(p)
    for mode, cells in X.parse_methods(p["methods"]):
        label = X.method_label(mode, cells)
        for _, n, nv, c, raw in tasks:
            t = X.finetune_config(cfg, mode, n, p["train_steps"], p["full_lr"], p["val_evals"])
            loops.append(Loop(nb, f"fine-tuning {label} ({len(tasks)} tasks x {S} seeds)",
                              _memory_build(p, mode, cells, c, raw), key=("memory", label, c, raw, _freeze(bb),
                                                                          p["memory_norm"]), **_fit(t, n, nv, w, S)))
    if len(tasks) >= 2:
        (_, _, _, c0, _), (spec, n, nv, c, raw) = tasks[:2]
        t = X.finetune_config(cfg, "memory", n, p["train_steps"])
        loops.append(Loop(nb, f"extension: memory-{p['concat_cells']} on {spec}",
                          _memory_build(p, "memory", p["concat_cells"], c, raw, extend_from=c0), **_fit(t, n, nv, w)))
    if p["latency"]:
        loops.append(_latency(nb, "merged vs separate models", len(tasks) + 1, p["latency_min_run_time"]))
    return loops + [_not_charged(nb, "concatenation study, source-head checks",
                                 "forward passes of the merged models over the validation sets")]


def _loops_06(p: dict) -> list[Loop]:
    from tokenbook.experiments.cross_paper import gpu_loops

    return gpu_loops(p)


#: notebook stem -> ``loops(params) -> list[Loop]`` (params: parameter-cell defaults merged with a profile); other
#: notebooks register theirs here
NOTEBOOK_LOOPS: dict[str, Callable[[dict], list[Loop]]] = {
    "00_baselines": _loops_00, "01_vittm": _loops_01, "02_t2t_vit": _loops_02, "03_toe": _loops_03,
    "04_seit": _loops_04, "05_memory": _loops_05, "06_cross_paper": _loops_06,
}


def notebook_loops(stem: str, params: dict) -> list[Loop]:
    """The training loops (and timed parts) of notebook ``stem`` run with ``params``."""
    if stem not in NOTEBOOK_LOOPS:
        raise ValueError(f"no GPU-estimate loops for {stem!r}; known: {', '.join(NOTEBOOK_LOOPS)}")
    return NOTEBOOK_LOOPS[stem](params)


def workbook_estimate(profile: str = "gpu", root=None, notebooks: Optional[Sequence[str]] = None, **kw):
    """:func:`estimate` (``kw``) of every notebook, or of ``notebooks``, under ``profile``: an ESTIMATE."""
    from pathlib import Path

    from tokenbook.results import repo_root
    from tokenbook.runner import profile_parameters

    root = Path(root) if root is not None else repo_root()
    return estimate([lp for stem in (notebooks or list(NOTEBOOK_LOOPS))
                     for lp in notebook_loops(stem, profile_parameters(root, stem, profile))], **kw)
