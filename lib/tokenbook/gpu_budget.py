"""ESTIMATE (not a measurement) of a profile's wall time on one H100/H200-class GPU, counted on the CPU.

A general cost engine: it knows steps, loaders and timed parts, not the papers. Each notebook's training loops are
:class:`Loop` rows derived from its parameters by its own experiments module, ``tokenbook.experiments.<stem>.gpu_loops
(params)`` (found by :func:`notebook_loops` at call time: this module imports no paper code; no hand-written counts).
:func:`estimate` charges, per loop:

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
on this machine's CPU (:func:`measure_loader_us`; without the data :data:`DEFAULT_LOADER_US`; other loaders:
:func:`register_loader_rate`), not the GPU machine's.
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

__all__ = ["Loop", "Costable", "from_registry", "pixel_build", "timm_loop", "step_cost", "estimate", "time_loader",
           "measure_loader_us", "register_loader_rate", "fm_images", "fm_sizes", "fit_fields", "latency_loop",
           "not_charged", "freeze", "notebook_stems", "notebook_loops", "workbook_estimate", "DEFAULT_LOADER_US"]

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
    data: str = "pixels"  # loader: pixels, none, memory (tensors) or a registered kind (LOADER_RATES)
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


def freeze(d: dict) -> tuple:
    """``d`` as a hashable, ordered tuple (for step-cost cache keys)."""
    return tuple(sorted((k, repr(v)) for k, v in d.items()))


def from_registry(name: str, kwargs: Optional[dict] = None, input_chw: Sequence[int] = (3, 32, 32)):
    """A ``build`` of ``timm.create_model(name, **kwargs)`` on a float input of ``input_chw`` (a workbook model must be
    registered by then: the experiments module that makes the loop imports its models)."""
    def build():
        import timm

        return Costable(timm.create_model(name, **(kwargs or {})), torch.randn(2, *input_chw))
    return build


def pixel_build(make: Callable[[], nn.Module], img_size: int, channels: int = 3, raw=(1, 28, 28)):
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
    return Loop(notebook, part, pixel_build(lambda: make().model, img_size, channels, raw),
                key=("timm", name, freeze(kwargs), img_size, channels, tuple(raw)), **loop)




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
def time_loader(loader, n_batches: int, repeats: int = 3) -> float:
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

    return time_loader(make_loaders(bundle, batch, num_workers=0, device="cpu")[0], n_batches)


def _memory_loader_us() -> float:
    """us per image of a shuffled ``DataLoader`` over uint8 images in memory (batch 256), on this CPU."""
    memory = torch.utils.data.TensorDataset(torch.zeros(8192, 1, 28, 28, dtype=torch.uint8))
    return time_loader(torch.utils.data.DataLoader(memory, 256, shuffle=True), 20)


#: loader kind (``Loop.data``) -> ``() -> us per image``, measured once per process when a loop needs it; a kind
#: ``"<kind> (val)"`` is the evaluation loader of ``<kind>`` (else evaluation reads at the training rate). ``pixels``
#: (the given or default rate) and ``none`` (0) are built in; experiments modules register theirs.
LOADER_RATES: dict[str, Callable[[], float]] = {"memory": _memory_loader_us}


def register_loader_rate(kind: str, measure: Callable[[], float]) -> None:
    """Make loops with ``data=kind`` cost ``measure()`` us per image (measured on first use)."""
    if kind in ("pixels", "none"):
        raise ValueError(f"loader kind {kind!r} is built in")
    LOADER_RATES[kind] = measure


def _rate(kind: str, pixels_us: float) -> float:
    if kind in ("pixels", "none"):
        return pixels_us if kind == "pixels" else 0.0
    if kind not in _RATES:
        if kind not in LOADER_RATES:
            raise ValueError(f"no loader rate for data {kind!r}; known: pixels, none, {', '.join(LOADER_RATES)} "
                             "(register_loader_rate)")
        _RATES[kind] = LOADER_RATES[kind]()
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
            us = _rate(f"{lp.data} (val)", pix) if f"{lp.data} (val)" in LOADER_RATES else us
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
# helpers for the experiments modules' gpu_loops (no paper code here)
# ----------------------------------------------------------------------------------------------------------
def fm_images(n: int, classes: int = 10, per_class: int = FM_TRAIN) -> int:
    """Images of a Fashion-MNIST subset of ``n`` (0 = all) over ``classes`` classes."""
    return min(int(n), per_class * classes) if n else per_class * classes


def fm_sizes(p: dict, train: str = "train_subset", val: str = "val_subset") -> tuple[int, int]:
    """(training, validation) images of the notebook's Fashion-MNIST subsets ``p[train]`` / ``p[val]`` (10 classes)."""
    if p.get("dataset", "fashion_mnist") != "fashion_mnist":
        raise ValueError(f"the GPU estimate knows Fashion-MNIST's image counts only, not {p['dataset']!r}")
    return fm_images(p[train]), fm_images(p[val], per_class=FM_VAL)


def _recipe(cfg) -> dict:
    """The Loop fields a ``TrainConfig`` decides."""
    return dict(precision=cfg.precision, opt=cfg.opt, ema=cfg.ema_decay > 0, clip_grad=bool(cfg.clip_grad))


def fit_fields(cfg, n: int, nv: int, workers: int, runs: int = 1, batch: int = 0) -> dict:
    """Loop fields of ``runs`` fit() calls with ``cfg`` (a ``TrainConfig``) on ``n`` / ``nv`` images in loaders of
    ``batch`` (0: the config's): epochs, steps, evaluation passes and the recipe."""
    b = batch or cfg.batch_size
    evals = sum(1 for e in range(cfg.epochs) if (e + 1) % cfg.eval_every == 0 or e + 1 == cfg.epochs)
    return dict(runs=runs, epochs=cfg.epochs, images=n, batch=b, val_images=nv, workers=workers,
                steps=cfg.epochs * _batches(n, b, cfg.max_steps_per_epoch), evals=evals, **_recipe(cfg))


def latency_loop(nb: str, what: str, n: int, t: float) -> Loop:
    """A timed part: ``n`` latency benchmarks of ``t`` seconds each (a lower bound)."""
    return Loop(nb, f"latency: {what} ({n} x {t:g} s)", runs=n, fixed_s=n * t)


def not_charged(nb: str, part: str, note: str) -> Loop:
    """A row for a part the estimate does not charge, with the reason in ``note``."""
    return Loop(nb, part, fixed_label="not charged", note=note)


# ----------------------------------------------------------------------------------------------------------
# the notebooks' loops, found by stem
# ----------------------------------------------------------------------------------------------------------
def _root(root=None):
    from pathlib import Path

    from tokenbook.results import repo_root

    return Path(root) if root is not None else repo_root()


def notebook_stems(root=None) -> list[str]:
    """The workbook's notebook stems (``notebooks/NN_<stem>.ipynb``), in order."""
    return sorted(p.stem for p in (_root(root) / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def notebook_loops(stem: str, params: dict) -> list[Loop]:
    """The training loops (and timed parts) of notebook ``stem`` (``NN_<name>``) run with ``params``:
    ``tokenbook.experiments.<name>.gpu_loops(params)``, imported now (the core imports no paper code)."""
    import importlib

    name = stem.split("_", 1)[1] if stem[:2].isdigit() and "_" in stem else ""
    try:
        module = importlib.import_module(f"tokenbook.experiments.{name}") if name.isidentifier() else None
    except ModuleNotFoundError as e:
        if e.name != f"tokenbook.experiments.{name}":
            raise
        module = None
    loops = getattr(module, "gpu_loops", None)
    if loops is None:
        raise ValueError(f"no GPU-estimate loops for {stem!r}: tokenbook.experiments.{name or '<stem>'} has no "
                         "gpu_loops(params)")
    return loops(params)


def workbook_estimate(profile: str = "gpu", root=None, notebooks: Optional[Sequence[str]] = None, **kw):
    """:func:`estimate` (``kw``) of every notebook, or of ``notebooks``, under ``profile``: an ESTIMATE."""
    from tokenbook.runner import profile_parameters

    root = _root(root)
    stems = list(notebooks) if notebooks else notebook_stems(root)
    return estimate([lp for stem in stems for lp in notebook_loops(stem, profile_parameters(root, stem, profile))],
                    **kw)
