"""Honest measurement: parameter counts, MACs/FLOPs with attention counted, latency, throughput, memory.

Conventions
-----------
- ``macs`` are multiply-accumulates (what ViT papers call "FLOPs"); ``flops`` = 2 x MACs, as counted by
  ``torch.utils.flop_counter.FlopCounterMode``. Tables show both.
- Attention is always counted: timm modules are switched to their explicit attention path while counting, and
  the fused ``scaled_dot_product_attention`` kernels that the counter does not know on CPU get a formula.
- Every timing row records its settings (device, dtype, batch, threads, torch version); comparisons between models
  are ratios of numbers measured in the same run (``compare_latency``).
"""
from __future__ import annotations

import contextlib
import logging
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

# torch.utils.benchmark imports torch.utils.cpp_extension, which logs "No CUDA runtime is found" on a CUDA build of
# torch without a GPU. It does not affect timing and is noise in every report; real errors still show.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

__all__ = [
    "count_params", "count_used_params", "count_macs", "count_train_macs", "count_call_macs", "count_kernels",
    "estimated_step_s",
    "explicit_attention", "measure_latency",
    "measure_train_step", "compare_latency", "LatencyResult", "peak_memory_mb",
]


# ----------------------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------------------
def _unique_params(model: nn.Module) -> list[nn.Parameter]:
    seen, out = set(), []
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def count_params(model: nn.Module, include_buffers: Sequence[str] = ()) -> dict[str, int]:
    """Total and trainable parameter counts (shared tensors counted once).

    ``include_buffers``: names of buffers to add to the total (e.g. frozen position tables that a paper counts).
    """
    params = _unique_params(model)
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    bufs = dict(model.named_buffers())
    extra = sum(bufs[n].numel() for n in include_buffers)
    return {"total": total + extra, "trainable": trainable}


def count_used_params(model: nn.Module, example: Any, forward: Optional[Callable] = None) -> int:
    """Parameters that receive a gradient from one forward/backward on ``example``.

    A parameter created but never used in ``forward`` (a common artefact of subclassing timm models) is not
    counted. ``forward(model, example)`` may be given for models whose output needs reducing.
    """
    model = model
    was_training = model.training
    model.train()
    params = _unique_params(model)
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    try:
        out = forward(model, example) if forward else model(example)
        outs = out if isinstance(out, (tuple, list)) else [out]
        loss = sum(o.float().sum() for o in outs if torch.is_tensor(o))
        loss.backward()
        used = 0
        for p in params:
            # a used parameter gets a grad tensor even if it happens to be all zeros
            if p.grad is not None:
                used += p.numel()
        return used
    finally:
        for p, f in zip(params, flags):
            p.grad = None
            p.requires_grad_(f)
        model.train(was_training)


# ----------------------------------------------------------------------------------------------------------
# MACs / FLOPs
# ----------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def explicit_attention(model: nn.Module):
    """Temporarily switch every timm attention module (anything with ``fused_attn``) to its explicit path."""
    changed = []
    for m in model.modules():
        if hasattr(m, "fused_attn") and isinstance(getattr(m, "fused_attn"), bool):
            changed.append((m, m.fused_attn))
            m.fused_attn = False
    try:
        yield model
    finally:
        for m, v in changed:
            m.fused_attn = v


def _sdpa_flops(q_shape, k_shape, v_shape) -> int:
    # q: (..., L, E), k: (..., S, E), v: (..., S, Ev) -> 2*L*S*E (q k^T) + 2*L*S*Ev (attn v)
    batch = math.prod(q_shape[:-2])
    L, E = q_shape[-2], q_shape[-1]
    S, Ev = k_shape[-2], v_shape[-1]
    return 2 * batch * L * S * E + 2 * batch * L * S * Ev


def _custom_mapping() -> dict:
    """Formulas for fused attention ops that some torch versions' FlopCounterMode does not register."""
    mapping = {}
    from torch.utils.flop_counter import flop_registry

    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable"):
        op = getattr(torch.ops.aten, name, None)
        if op is None or op in flop_registry or getattr(op, "default", None) in flop_registry:
            continue

        def fn(query, key, value, *args, out_shape=None, **kwargs):
            # FlopCounterMode passes shapes (torch.Size) for tensor arguments
            return _sdpa_flops(*(getattr(t, "shape", t) for t in (query, key, value)))

        mapping[op] = fn
    return mapping


@torch.no_grad()
def count_macs(
    model: nn.Module,
    example: Any = None,
    input_size: Sequence[int] = (3, 224, 224),
    batch_size: int = 1,
    per_module: bool = False,
    depth: int = 2,
) -> dict[str, Any]:
    """Count MACs and FLOPs of one forward pass, attention included.

    Returns ``{"macs", "flops", "gmacs", "gflops"}`` for the whole batch (per_module adds a dict of module name ->
    MACs at ``depth``). ``example`` (a tensor or tuple of tensors) overrides ``input_size``/``batch_size``.
    """
    was_training = model.training
    model.eval()
    if example is None:
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        example = torch.randn(batch_size, *input_size, device=dev)
    args = example if isinstance(example, tuple) else (example,)
    counter = FlopCounterMode(display=False, depth=depth, custom_mapping=_custom_mapping())
    try:
        with explicit_attention(model), counter:
            model(*args)
    finally:
        model.train(was_training)
    flops = int(counter.get_total_flops())
    out = {"macs": flops // 2, "flops": flops, "gmacs": flops / 2e9, "gflops": flops / 1e9}
    if per_module:
        out["per_module"] = {k: sum(v.values()) // 2 for k, v in counter.get_flop_counts().items()}
    return out



def count_train_macs(model: nn.Module, example: torch.Tensor, target: Optional[torch.Tensor] = None,
                     loss_fn: Optional[Callable] = None) -> dict[str, Any]:
    """Count the MACs of one training step's forward + backward (optimizer update excluded), attention included.

    The model runs in ``train()`` mode (so training-only behaviour such as ToE's token selection counts) on
    ``example``; the loss is cross-entropy on ``target`` (default: class 0) summed over the outputs of a multi-head
    model. Only what autograd really computes is counted: frozen parameters get no weight gradient, so a frozen
    backbone's backward is cheaper than a full one. Returns ``{"macs", "flops", "macs_per_image",
    "forward_macs", "backward_macs"}`` for the batch.
    """
    was_training = model.training
    model.train()
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    params = [p for p in model.parameters() if p.requires_grad]
    counter = FlopCounterMode(display=False, custom_mapping=_custom_mapping())
    try:
        with explicit_attention(model), counter:
            out = model(example)
            outs = list(out) if isinstance(out, (tuple, list)) else [out]
            y = target if target is not None else torch.zeros(example.shape[0], dtype=torch.long,
                                                               device=outs[0].device)
            fwd = int(counter.get_total_flops())
            loss = sum(loss_fn(o.float(), y) for o in outs)
            if params:
                torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        model.train(was_training)
    flops = int(counter.get_total_flops())
    n = int(example.shape[0])
    return {"macs": flops // 2, "flops": flops, "macs_per_image": flops / 2 / n, "forward_macs": fwd // 2,
            "backward_macs": (flops - fwd) // 2}


def count_call_macs(fn: Callable[[], Any]) -> int:
    """MACs of everything ``fn()`` computes (``torch.utils.flop_counter``, fused attention by its formula)."""
    counter = FlopCounterMode(display=False, custom_mapping=_custom_mapping())
    with counter:
        fn()
    return int(counter.get_total_flops()) // 2


def count_kernels(fn: Callable[[], Any]) -> int:
    """Number of ATen operator calls ``fn()`` dispatches (each is about one GPU kernel launch in eager mode)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    with _Count() as counter:
        fn()
    return counter.n


def estimated_step_s(macs_per_image: float, kernels: int, batch_size: int, peak_tflops: float = 989.0,
                     mfu: float = 0.3, kernel_us: float = 8.0) -> tuple[float, float]:
    """``(compute s, launch s)`` of one training step on a GPU: counted MACs x batch x 2 FLOPs at ``mfu`` of
    ``peak_tflops``, and ``kernels`` launches of ``kernel_us`` each (eager PyTorch). The step costs the larger one."""
    return macs_per_image * batch_size * 2 / (peak_tflops * 1e12 * mfu), kernels * kernel_us * 1e-6


# ----------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> Optional[float]:
    """Peak allocated memory on a CUDA device since the last reset (None on CPU, where torch does not track it)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


@dataclass
class LatencyResult:
    model: str
    device: str
    dtype: str
    batch_size: int
    input_size: tuple
    threads: int
    median_ms: float
    iqr_ms: float
    mean_ms: float
    runs: int
    throughput_img_s: float
    peak_mem_mb: Optional[float]
    torch_version: str = field(default_factory=lambda: torch.__version__)
    cpu: str = field(default_factory=platform.processor)
    compiled: bool = False

    def as_row(self) -> dict:
        return asdict(self)


def _dtype_name(dtype: Optional[torch.dtype]) -> str:
    return "fp32" if dtype in (None, torch.float32) else str(dtype).replace("torch.", "")


def measure_latency(
    model: nn.Module,
    input_size: Sequence[int] = (3, 224, 224),
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    dtype: Optional[torch.dtype] = None,
    min_run_time: float = 1.0,
    threads: Optional[int] = None,
    name: str = "",
    warmup: int = 2,
    compile: bool = False,
    example: Any = None,
) -> LatencyResult:
    """Median and IQR latency of one batched forward with ``torch.utils.benchmark`` (blocked autorange).

    Mirrors the ViTTM benchmark: ``eval()``, ``no_grad``, random input, ``blocked_autorange(min_run_time)``;
    ``dtype`` (e.g. ``torch.bfloat16``) runs under autocast. Throughput = batch / median.
    """
    import torch.utils.benchmark as tbench

    device = torch.device(device)
    threads = threads or torch.get_num_threads()
    model = model.to(device).eval()
    fwd = torch.compile(model) if compile else model
    x = example if example is not None else torch.randn(batch_size, *input_size, device=device)
    ctx = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype not in (None, torch.float32) else contextlib.nullcontext
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def run():
        with torch.no_grad(), ctx():
            fwd(x)

    for _ in range(warmup):
        run()
    _sync(device)
    timer = tbench.Timer(stmt="run()", globals={"run": run}, num_threads=threads)
    m = timer.blocked_autorange(min_run_time=min_run_time)
    median = m.median * 1e3
    return LatencyResult(
        model=name or type(model).__name__, device=str(device), dtype=_dtype_name(dtype), batch_size=batch_size,
        input_size=tuple(input_size), threads=threads, median_ms=median, iqr_ms=m.iqr * 1e3, mean_ms=m.mean * 1e3,
        runs=len(m.times), throughput_img_s=batch_size / (median / 1e3), peak_mem_mb=peak_memory_mb(device),
        compiled=compile,
    )


def measure_train_step(
    model: nn.Module,
    input_size: Sequence[int] = (3, 224, 224),
    batch_size: int = 32,
    num_classes: Optional[int] = None,
    device: str | torch.device = "cpu",
    steps: int = 5,
    warmup: int = 2,
    loss_fn: Optional[Callable] = None,
) -> dict:
    """Training-step throughput: forward + backward + optimizer step (SGD), synchronized, median over ``steps``."""
    device = torch.device(device)
    model = model.to(device).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randn(batch_size, *input_size, device=device)
    out = model(x)
    outs = out if isinstance(out, (tuple, list)) else [out]
    nc = num_classes or outs[0].shape[-1]
    y = torch.randint(0, nc, (batch_size,), device=device)
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        out = model(x)
        outs = out if isinstance(out, (tuple, list)) else [out]
        loss = sum(loss_fn(o, y) for o in outs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    return {"device": str(device), "batch_size": batch_size, "step_ms": med * 1e3,
            "train_img_s": batch_size / med, "peak_mem_mb": peak_memory_mb(device), "threads": torch.get_num_threads()}


def interleaved_ratio(fn_a: Callable[[], Any], fn_b: Callable[[], Any], repeats: int = 15, warmup: int = 2,
                      inner: int = 1, device: str | torch.device = "cpu") -> dict:
    """Time two callables interleaved (A B, then B A, alternating, so that drift and frequency changes hit both
    arms alike) and return the median of the per-repeat ratios ``time(A) / time(B)`` with its interquartile range:
    the evidence of a hardware claim (``ratio``, ``q1``, ``q3``), plus each arm's median milliseconds. ``inner``
    calls per timing; ``device`` is synchronised around each timing (CUDA)."""
    import statistics

    if repeats < 3:
        raise ValueError(f"repeats must be >= 3 for an interquartile range, got {repeats}")
    device = torch.device(device)

    def once(fn):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        _sync(device)
        return (time.perf_counter() - t0) / inner

    for _ in range(warmup):
        fn_a(), fn_b()
    ta, tb = [], []
    for i in range(repeats):
        if i % 2 == 0:
            ta.append(once(fn_a)), tb.append(once(fn_b))
        else:
            tb.append(once(fn_b)), ta.append(once(fn_a))
    ratios = [a / b for a, b in zip(ta, tb)]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return {"ratio": statistics.median(ratios), "q1": q1, "q3": q3, "a_ms": statistics.median(ta) * 1e3,
            "b_ms": statistics.median(tb) * 1e3, "repeats": repeats, "inner": inner}


def compare_latency(models: dict[str, nn.Module], baseline: str, **kwargs) -> list[dict]:
    """Measure every model in one run and add ``speedup_vs_<baseline>`` = baseline median / model median."""
    rows = [measure_latency(m, name=n, **kwargs).as_row() for n, m in models.items()]
    base = next(r for r in rows if r["model"] == baseline)["median_ms"]
    for r in rows:
        r[f"speedup_vs_{baseline}"] = base / r["median_ms"]
    return rows


def efficiency_table(
    models: dict[str, nn.Module],
    input_size: Sequence[int] = (3, 224, 224),
    latency: bool = True,
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    dtype: Optional[torch.dtype] = None,
    min_run_time: float = 1.0,
    used_params: bool = False,
    baseline: Optional[str] = None,
    forward: Optional[Callable] = None,
):
    """One row per model: params (total, used), MACs/FLOPs with attention, latency and throughput, settings.

    All models are measured in this one call, so ``speedup_vs_<baseline>`` and ``macs_ratio_vs_<baseline>`` are
    ratios from the same run. ``latency=False`` skips timing (counts only).
    """
    import pandas as pd

    rows = []
    for name, m in models.items():
        m = m.eval()
        row = {"model": name, "img_size": input_size[-1]}
        pc = count_params(m)
        row["params_m"] = pc["total"] / 1e6
        if used_params:
            ex = torch.randn(2, *input_size)
            row["used_params_m"] = count_used_params(m, ex, forward) / 1e6
            m.eval()
        mc = count_macs(m, input_size=input_size)
        row["gmacs"], row["gflops"] = mc["gmacs"], mc["gflops"]
        if latency:
            lr = measure_latency(m, input_size=input_size, batch_size=batch_size, device=device, dtype=dtype,
                                 min_run_time=min_run_time, name=name)
            row.update({"latency_ms": lr.median_ms, "latency_iqr_ms": lr.iqr_ms, "throughput_img_s": lr.throughput_img_s,
                        "batch": lr.batch_size, "device": lr.device, "dtype": lr.dtype, "threads": lr.threads,
                        "runs": lr.runs, "peak_mem_mb": lr.peak_mem_mb})
        rows.append(row)
    df = pd.DataFrame(rows)
    if baseline is not None:
        if baseline not in models:
            raise ValueError(f"baseline {baseline!r} is not among the models {list(models)}")
        b = df.set_index("model").loc[baseline]
        df[f"macs_ratio_vs_{baseline}"] = b["gmacs"] / df["gmacs"]
        if latency:
            df[f"speedup_vs_{baseline}"] = b["latency_ms"] / df["latency_ms"]
    return df


# ----------------------------------------------------------------------------------------------------------
# training throughput: fit() against a plain PyTorch loop, and what helps on this machine (issue 12, item 3)
# ----------------------------------------------------------------------------------------------------------
def _plain_loop_epoch_s(model: nn.Module, loader, preprocess, lr: float) -> tuple[float, int]:
    """The floor: the loop one writes by hand (AdamW, cross-entropy, no scheduler, no bookkeeping). Two epochs
    over ``loader``; returns the second (warm) epoch's wall seconds and its number of images."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    t = n = 0
    for epoch in range(2):
        t0, n = time.perf_counter(), 0
        for x, y in loader:
            if preprocess is not None:
                x = preprocess(x)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += len(y)
        t = time.perf_counter() - t0
    return t, n


def _fit_epoch_s(model: nn.Module, loader, preprocess, lr: float, **cfg) -> tuple[float, int, float]:
    """``fit()`` for two epochs on ``loader`` (no validation, no progress bars); the second epoch's wall seconds,
    its images, and the first epoch's extra seconds (compilation, lazy initialisation)."""
    from .train import TrainConfig, fit

    tc = TrainConfig(epochs=2, lr=lr, warmup_epochs=0.0, progress=False, accelerator="cpu", **cfg)
    # Fabric announces mixed precision on stderr ("Using bfloat16 Automatic Mixed Precision"): in a benchmark that
    # tries bf16 on purpose it is noise in the report
    fabric_log = logging.getLogger("lightning_fabric.utilities.rank_zero")
    level = fabric_log.level
    fabric_log.setLevel(logging.WARNING)
    try:
        r = fit(model, loader, None, tc, preprocess=preprocess)
    finally:
        fabric_log.setLevel(level)
    h = r.history
    steps = int(h["steps"].iloc[-1])
    return float(h["epoch_time_s"].iloc[-1]), steps * loader.batch_size, \
        float(h["epoch_time_s"].iloc[0] - h["epoch_time_s"].iloc[-1])


def _throughput_worker(args: tuple) -> float:
    """One process of the side-by-side measurement (spawned: a fresh interpreter): registers the models by importing
    ``modules``, builds the model with seed ``seed`` and returns fit()'s warm-epoch images per second."""
    import importlib

    modules, name, kwargs, x, y, batch, lr, threads, seed = args
    torch.set_num_threads(threads)
    for m in modules:
        importlib.import_module(m)
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(name, **kwargs)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)
    t, n, _ = _fit_epoch_s(model, loader, None, lr)
    return n / t


def train_throughput_table(model_name: str, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                           model_kwargs: Optional[dict] = None, loader=None, preprocess: Optional[nn.Module] = None,
                           lr: float = 1e-3, repeats: int = 3, compile: bool = True, bf16: bool = True,
                           processes: int = 2, register_modules: Sequence[str] = ()) -> "Any":
    """Training throughput (images/s of a warm epoch, forward + backward + AdamW step, data in memory) of timm model
    ``model_name`` on the batches ``x``/``y`` (already preprocessed) under: a plain PyTorch loop (the floor), the
    workbook's ``fit()`` with all threads, with one thread, with bf16 autocast, with ``torch.compile`` (its extra
    first-epoch seconds in ``setup_s``), ``processes`` fits side by side in separate processes with one thread each
    (seeds in parallel; aggregate images/s), and fit() on ``loader`` (the notebook's own DataLoader with
    ``preprocess``, when given). The cheap variants are measured ``repeats`` times round-robin (median, min and max
    shown); every ratio is against the plain loop and against fit() measured in the same run. ``register_modules``
    are imported in the spawned processes (e.g. ``"tokenbook.models"``, so that they know the workbook's names)."""
    import multiprocessing as mp
    import statistics

    import pandas as pd
    import timm

    kwargs = dict(model_kwargs or {})
    threads = torch.get_num_threads()
    mem = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)

    def fresh():
        torch.manual_seed(0)
        return timm.create_model(model_name, **kwargs)

    def plain():
        t, n = _plain_loop_epoch_s(fresh(), mem, None, lr)
        return n / t, 0.0

    def with_fit(**cfg):
        def run():
            t, n, extra = _fit_epoch_s(fresh(), mem, None, lr, **cfg)
            return n / t, extra
        return run

    def one_thread():
        torch.set_num_threads(1)
        try:
            return with_fit()()
        finally:
            torch.set_num_threads(threads)

    cheap = {"plain PyTorch loop (floor)": plain, "fit()": with_fit(), "fit(), 1 thread": one_thread}
    if bf16:
        cheap["fit(), bf16 autocast"] = with_fit(precision="bf16-mixed")
    if loader is not None:
        def real():
            t, n, _ = _fit_epoch_s(fresh(), loader, preprocess, lr)
            return n / t, 0.0
        cheap["fit(), the notebook's DataLoader"] = real
    got: dict[str, list] = {k: [] for k in cheap}
    for _ in range(repeats):
        for k, fn in cheap.items():
            got[k].append(fn())
    rows = []
    for k, vals in got.items():
        ips = [v[0] for v in vals]
        rows.append({"variant": k, "threads": 1 if "1 thread" in k else threads, "processes": 1,
                     "img_s": statistics.median(ips), "img_s_min": min(ips), "img_s_max": max(ips),
                     "repeats": len(ips), "setup_s": 0.0})
    if compile:
        ips, extra = with_fit(compile=True)()
        rows.append({"variant": "fit(), torch.compile", "threads": threads, "processes": 1, "img_s": ips,
                     "img_s_min": ips, "img_s_max": ips, "repeats": 1, "setup_s": extra})
    if processes > 1:
        ctx = mp.get_context("spawn")
        args = [(tuple(register_modules), model_name, kwargs, x, y, batch_size, lr, 1, s) for s in range(processes)]
        t0 = time.perf_counter()
        with ctx.Pool(processes) as pool:
            per = pool.map(_throughput_worker, args)
        rows.append({"variant": f"fit(), {processes} seeds side by side ({processes} processes x 1 thread)",
                     "threads": 1, "processes": processes, "img_s": sum(per), "img_s_min": sum(per),
                     "img_s_max": sum(per), "repeats": 1, "setup_s": time.perf_counter() - t0})
    df = pd.DataFrame(rows)
    floor = float(df.loc[df["variant"] == "plain PyTorch loop (floor)", "img_s"].iloc[0])
    base = float(df.loc[df["variant"] == "fit()", "img_s"].iloc[0])
    df["vs_plain_loop"] = df["img_s"] / floor
    df["vs_fit"] = df["img_s"] / base
    df.insert(1, "model", model_name)
    df.insert(2, "batch", batch_size)
    return df


# ----------------------------------------------------------------------------------------------------------
# seeds per hour: sequential fit() against seeds in parallel processes and the batched ensemble (issue 19, item 5)
# ----------------------------------------------------------------------------------------------------------
_SEEDS_STATE: dict = {}


def _seeds_init(modules: Sequence[str], data_kwargs: dict, threads: int, barrier) -> None:
    """Initialiser of a spawned worker: its threads, the registered model names, the data and the start barrier."""
    import importlib

    torch.set_num_threads(threads)
    for m in modules:
        importlib.import_module(m)
    _SEEDS_STATE.clear()
    _SEEDS_STATE["barrier"] = barrier
    _SEEDS_STATE["data_kwargs"] = data_kwargs


class _StartTogether:
    """fit() hook: wait for the other processes before the timed epoch, so that the processes' timed steps overlap."""

    def __init__(self, barrier):
        self.barrier = barrier

    def on_epoch_start(self, epoch, model):
        if epoch == 1 and self.barrier is not None:
            self.barrier.wait()


def _seeds_task(kind: str, model_name: str, members: int, seed0: int, batch: int, steps: int) -> float:
    """One measurement: ``fit`` (kind 'fit', one seed) or ``fit_ensemble`` (``members`` seeds) for two epochs of
    ``steps`` steps on the Fashion-MNIST loaders; returns member-steps per second of the second (timed) epoch's pure
    steps (data loading excluded, as ``fit``'s ``step_time_s``)."""
    import timm

    from .data import DataConfig, load_data, make_loaders
    from .ensemble import fit_ensemble
    from .train import TrainConfig, fit

    if "bundle" not in _SEEDS_STATE:
        _SEEDS_STATE["bundle"] = load_data(DataConfig(**_SEEDS_STATE["data_kwargs"]))
    bundle = _SEEDS_STATE["bundle"]
    cfg = TrainConfig(epochs=2, max_steps_per_epoch=steps, lr=1e-3, warmup_epochs=0.0, progress=False,
                      accelerator="cpu", batch_size=batch)
    seeds = [seed0 + k for k in range(members)]
    models = []
    for s in seeds:
        torch.manual_seed(s)
        models.append(timm.create_model(model_name, num_classes=bundle.num_classes))
    loaders = [make_loaders(bundle, batch, seed=s, device="cpu")[0] for s in seeds]
    barrier = _SEEDS_STATE.get("barrier")
    if kind == "fit":
        fabric_log = logging.getLogger("lightning_fabric.utilities.rank_zero")
        level = fabric_log.level
        fabric_log.setLevel(logging.WARNING)
        try:
            hooks = [_StartTogether(barrier)] if barrier is not None else []
            h = fit(models[0], loaders[0], None, cfg, hooks=hooks, preprocess=bundle.preprocess).history
        finally:
            fabric_log.setLevel(level)
    else:
        if barrier is not None:  # fit_ensemble takes no hooks: wait after its set-up (one warm-up step longer)
            barrier.wait()
        h = fit_ensemble(models, loaders, None, cfg, preprocess=bundle.preprocess, seeds=seeds)[0].history
    return members * int(h["steps"].iloc[-1]) / float(h["step_time_s"].iloc[-1])


def seeds_per_hour(model_names: Sequence[str] = ("vit_fm_tiny_p4_28", "vit_fm_tiny_p4_32"),
                   img_sizes: Sequence[int] = (28, 32), ensemble_sizes: Sequence[int] = (2, 4),
                   processes: int = 2, ensemble_in_processes: bool = True, batch_size: int = 128, steps: int = 2,
                   repeats: int = 3, steps_per_seed: int = 390, train_subset: int = 2048,
                   register_modules: Sequence[str] = ("tokenbook.models",), data_dir: Optional[str] = None) -> "Any":
    """Seeds trained per hour on this machine by each way of training independent seeds of ``model_names`` (timm
    names, one per entry of ``img_sizes``) at ``batch_size`` on Fashion-MNIST (the first ``train_subset`` images):

    - ``sequential``: ``fit()`` in this process with all its threads, one seed after the other (the reference);
    - ``processes``: ``processes`` seeds side by side in spawned processes with 1 thread each (each builds its model
      from its name and seed), all released together into the timed epoch;
    - ``ensemble``: :func:`tokenbook.ensemble.fit_ensemble` with K = ``ensemble_sizes`` members in this process;
    - ``ensemble x processes``: K members split over ``processes`` processes (1 thread each).

    Each measurement is two short epochs of ``steps`` steps: the first is warm-up (untimed), the second's pure step
    time is the measurement. The ways run interleaved, their order reversed every other repeat, so that the load
    of a shared machine hits them alike; ``ratio_vs_sequential`` is the median over the repeats of each repeat's
    throughput over the sequential throughput of the same repeat (``q1``/``q3`` its interquartile range).
    ``seeds_per_hour`` = member-steps per second x 3600 / ``steps_per_seed`` (default 390: the 00_baselines cpu
    profile, 5 epochs of 10 000 images at batch 128); evaluation and data loading are not in it.
    Returns a tidy DataFrame (model, img_size, way, K, threads, processes, seeds_per_hour, ratio_vs_sequential, q1,
    q3, repeats)."""
    import multiprocessing as mp
    import statistics
    import warnings
    from concurrent.futures import ProcessPoolExecutor

    import pandas as pd

    if repeats < 3:
        raise ValueError(f"repeats must be >= 3 for an interquartile range, got {repeats}")
    if len(model_names) != len(img_sizes):
        raise ValueError(f"{len(model_names)} model names but {len(img_sizes)} image sizes (one per model)")
    threads = torch.get_num_threads()
    rows = []
    ctx = mp.get_context("spawn")
    for name, px in zip(model_names, img_sizes):
        data_kwargs = dict(dataset="fashion_mnist", img_size=px, train_subset=train_subset, val_subset=256,
                           data_dir=data_dir)
        ways: list[tuple[str, int, int, int]] = [("sequential", 1, threads, 1)]  # (way, K, threads, processes)
        if processes > 1:
            ways.append(("processes", processes, 1, processes))
        ways += [("ensemble", k, threads, 1) for k in ensemble_sizes]
        if ensemble_in_processes and processes > 1:
            ways += [("ensemble x processes", k, 1, processes) for k in ensemble_sizes if k % processes == 0
                     and k > processes]
        barrier = ctx.Barrier(processes) if processes > 1 else None
        _seeds_init(register_modules, data_kwargs, threads, None)
        got: dict[tuple, list[float]] = {w: [] for w in ways}
        pool_cm = ProcessPoolExecutor(processes, mp_context=ctx, initializer=_seeds_init,
                                      initargs=(tuple(register_modules), data_kwargs, 1, barrier)) \
            if processes > 1 else contextlib.nullcontext()
        with warnings.catch_warnings(), pool_cm as pool:
            warnings.filterwarnings("ignore", message=".*batching rule.*")

            def measure(way):
                kind, k, _, procs = way
                if procs == 1:
                    return _seeds_task("fit" if kind == "sequential" else "ensemble", name, k, 0, batch_size, steps)
                per = k // procs
                futs = [pool.submit(_seeds_task, "fit" if kind == "processes" else "ensemble", name, per,
                                    100 * p, batch_size, steps) for p in range(procs)]
                return sum(f.result() for f in futs)

            for r in range(repeats):
                for way in (ways if r % 2 == 0 else ways[::-1]):
                    got[way].append(measure(way))
        seq = got[ways[0]]
        for way, vals in got.items():
            ratios = [v / s for v, s in zip(vals, seq)]
            q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
            rows.append({"model": name, "img_size": px, "way": way[0], "K": way[1], "threads": way[2],
                         "processes": way[3], "seeds_per_hour": statistics.median(vals) * 3600 / steps_per_seed,
                         "ratio_vs_sequential": statistics.median(ratios), "q1": q1, "q3": q3, "repeats": repeats})
    return pd.DataFrame(rows)
