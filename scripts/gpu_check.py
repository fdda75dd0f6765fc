"""GPU check (issue 13): what a person with one CUDA GPU runs once (<= 10 minutes) to show the GPU path is right.

Writes one table, ``results/gpu_check/gpu_check.csv`` and ``.md`` (atomically), one row per check:

- ``notebooks``: every notebook with the ``smoke`` profile on CUDA (``run_all.sh --profile smoke -p accelerator cuda``,
  into ``results/gpu_check/notebooks`` so the normal results are not touched);
- ``bf16`` / ``compile``: one model of each family, eval logits under ``bf16-mixed`` autocast and under
  ``torch.compile`` against fp32 (relative L2 error of the logits, see ``BF16_RTOL`` / ``COMPILE_RTOL``), plus one
  bf16 training step with a finite loss and finite gradients;
- ``latency``: ViTTM-B / ViT-B latency ratio at batch 128 the official way (ViTTM repo ``benchmark.py``: fp32, eval,
  no_grad, no AMP, no compile, ``torch.utils.benchmark`` ``blocked_autorange(min_run_time=8)``, median);
- ``train_peak``: ViT-B/16 bf16 training images/s and the share of the GPU's dense bf16 peak it reaches;
- ``ddp``: one 2-process DDP fit when two GPUs are present (skipped with the reason otherwise);
- ``launcher``: the run launcher's torchrun path (``tokenbook.runs.launch(executor="torchrun")``): a probe run as a
  ``torchrun --standalone`` DDP job on the GPU(s) (1 rank, 2 with two GPUs) into a fresh run store, then read back
  from it.

Every check is a function taking a device, so the logic is tested on the CPU with tiny settings
(``tests/test_gpu_check.py``); ``main()`` refuses to run without CUDA.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]

#: one model of each family (``import tokenbook.models`` registers them with timm)
FAMILY_MODELS = ("vit_fm_tiny_p4_28", "vittm_cpu_m4p4_28", "t2t_vit_tiny_fmnist", "toe_deit_tiny_patch16_224",
                 "deit_fm_micro_token_32")
#: bf16 keeps 8 significant bits (unit roundoff 2^-8 = 0.4 %); with fp32 accumulation the rounding of inputs,
#: weights and activations through 6-12 blocks gives a relative L2 logit error of ~1 % at random init. 5 % leaves
#: room for that and still catches a real fault (a wrong cast, overflow, a head computed in the wrong dtype: >= 30 %).
BF16_RTOL = 0.05
#: torch.compile of an fp32 model only re-orders / fuses fp32 arithmetic: differences are ~1e-6 relative;
#: 1e-3 allows for different reduction orders in fused kernels and nothing more.
COMPILE_RTOL = 1e-3
#: dense (no sparsity) bf16 tensor-core peak in TFLOP/s, by a substring of torch.cuda.get_device_name (first match)
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("GH200", 989.0),
                    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0), ("RTX 4090", 165.0))
#: the ViTTM abstract: ViTTM-B 234.1 ms vs ViT-B 529.5 ms median latency (GPU and batch not stated)
PAPER_LATENCY_RATIO = 234.1 / 529.5
COLUMNS = ("check", "subject", "status", "value", "reference", "tolerance", "device", "note")


def row(check: str, subject: str, status: str, value="", reference="", tolerance="", device="", note="") -> dict:
    return dict(check=check, subject=subject, status=status, value=value, reference=reference, tolerance=tolerance,
                device=str(device), note=note)


# ----------------------------------------------------------------------------------------------------------
# table
# ----------------------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_table(rows: list[dict], out_dir: str | Path) -> tuple[Path, Path]:
    """``gpu_check.csv`` and ``gpu_check.md`` in ``out_dir``, each written atomically."""
    from tokenbook.results import atomic_write

    out_dir = Path(out_dir)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt(r.get(k, "")) for k in COLUMNS})
    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(_fmt(r.get(k, "")).replace("|", "/").replace("\n", " ") for k in COLUMNS) + " |"
           for r in rows]
    return (atomic_write(out_dir / "gpu_check.csv", buf.getvalue()),
            atomic_write(out_dir / "gpu_check.md", "\n".join(md) + "\n"))


# ----------------------------------------------------------------------------------------------------------
# arithmetic
# ----------------------------------------------------------------------------------------------------------
def peak_bf16_tflops(device_name: str) -> Optional[float]:
    """The dense bf16 peak of a GPU by name (None = unknown)."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def train_peak_share(macs_per_image: float, images_per_s: float, peak_tflops: Optional[float]) -> Optional[float]:
    """Share of the peak a training run reaches: 2 FLOPs per MAC, x3 for forward + backward (the backward costs
    about twice the forward), x images/s, over the peak FLOP/s. None when the peak is unknown."""
    if not peak_tflops:
        return None
    return 3 * 2 * macs_per_image * images_per_s / (peak_tflops * 1e12)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against the reference ``b``."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


# ----------------------------------------------------------------------------------------------------------
# checks (each takes a device)
# ----------------------------------------------------------------------------------------------------------
def _first(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _all_logits(out) -> torch.Tensor:
    outs = out if isinstance(out, (tuple, list)) else [out]
    return torch.cat([o.float().flatten() for o in outs if torch.is_tensor(o)])


def make_model(name: str, **kwargs) -> tuple[torch.nn.Module, tuple]:
    import timm
    import tokenbook.models  # noqa: F401  (registers the notebooks' models)

    m = timm.create_model(name, **kwargs)
    return m, tuple(m.pretrained_cfg.get("input_size", (3, 224, 224)))


def precision_check(name: str, device, batch: int = 8, compile: bool = False, model_kwargs: Optional[dict] = None,
                    seed: int = 0) -> list[dict]:
    """bf16-mixed (and, with ``compile``, torch.compile) against fp32 for one model: eval logits within tolerance,
    and one bf16 training step with finite loss and gradients."""
    device = torch.device(device)
    torch.manual_seed(seed)
    m, shape = make_model(name, **(model_kwargs or {}))
    with torch.no_grad():  # zero-initialized heads (ViTTM) give all-zero logits: the comparison would be vacuous
        for mod in m.modules():
            if isinstance(mod, torch.nn.Linear) and not mod.weight.any():
                mod.weight.normal_(0, 0.02)
    m = m.to(device).eval()
    x = torch.randn(batch, *shape, device=device)
    rows = []
    with torch.no_grad():
        ref = _all_logits(m(x))
        with torch.autocast(device.type, dtype=torch.bfloat16):
            lo = _all_logits(m(x))
    e = rel_err(lo, ref)
    ok = bool(torch.isfinite(lo).all()) and e <= BF16_RTOL and bool(ref.any())
    rows.append(row("bf16", name, "pass" if ok else "fail", e, "fp32 logits", f"rel L2 <= {BF16_RTOL}", device,
                    f"eval logits, batch {batch}, input {shape}"))
    # one bf16 training step: finite loss and gradients
    m.train()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = m(x)
        outs = out if isinstance(out, (tuple, list)) else [out]
        y = torch.zeros(batch, dtype=torch.long, device=device)
        loss = sum(torch.nn.functional.cross_entropy(o.float(), y) for o in outs if torch.is_tensor(o))
    loss.backward()
    finite = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(p.grad).all()) for p in m.parameters()
                                                  if p.grad is not None)
    rows.append(row("bf16_train_step", name, "pass" if finite else "fail", float(loss.detach()), "finite", "", device,
                    "loss and every gradient finite"))
    if compile:
        m.eval().zero_grad(set_to_none=True)
        cm = torch.compile(m)
        with torch.no_grad():
            co = _all_logits(cm(x))
        e = rel_err(co, ref)
        ok = bool(torch.isfinite(co).all()) and e <= COMPILE_RTOL
        rows.append(row("compile", name, "pass" if ok else "fail", e, "eager fp32 logits",
                        f"rel L2 <= {COMPILE_RTOL}", device, "torch.compile, fp32, eval"))
    return rows


def latency_check(device, batch: int = 128, min_run_time: float = 8.0,
                  models: tuple[str, ...] = ("vittm_base_m16p32_224", "vittm_base_m28p28_224"),
                  baseline: str = "vit_base_patch16_224") -> list[dict]:
    """ViTTM-B / ViT-B median latency ratio the ViTTM repo's way (``benchmark.py``: fp32, eval, no_grad, no AMP, no
    compile, ``blocked_autorange(min_run_time=8)``, median). Both ViTTM-B patch settings: 16/32 is the default of
    ``benchmark.py``, 28/28 the README's configs (which one the abstract's 234.1 ms used is not stated)."""
    from tokenbook.bench import measure_latency

    device = torch.device(device)
    res = {}
    for n in (baseline, *models):
        m, shape = make_model(n)
        res[n] = measure_latency(m, input_size=shape, batch_size=batch, device=device, dtype=None,
                                 min_run_time=min_run_time, threads=1, name=n).median_ms
        del m
        if device.type == "cuda":
            torch.cuda.empty_cache()
    b = res[baseline]
    return [row("latency", f"{n} / {baseline}", "info", res[n] / b, f"paper {PAPER_LATENCY_RATIO:.3f}", "", device,
                f"fp32, batch {batch}, median {res[n]:.1f} ms / {b:.1f} ms (paper 234.1 / 529.5 ms, GPU unknown)")
            for n in models]


def train_throughput_check(device, name: str = "vit_base_patch16_224", batch: int = 128, steps: int = 10,
                           warmup: int = 3, device_name: Optional[str] = None) -> list[dict]:
    """bf16 training images/s (AdamW, autocast) and its share of the GPU's dense bf16 peak."""
    from tokenbook.bench import count_macs

    device = torch.device(device)
    m, shape = make_model(name)
    macs = count_macs(m, input_size=shape, batch_size=1)["macs"]
    m = m.to(device).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(_first(m(x)).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()  # one sync for the whole timed window
    img_s = batch * steps / (time.perf_counter() - t0)
    if device_name is None:
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_bf16_tflops(device_name)
    share = train_peak_share(macs, img_s, peak)
    return [row("train_peak", name, "info", share if share is not None else "unknown",
                f"peak {peak} TFLOP/s" if peak else "peak unknown", "", device,
                f"{device_name}: {img_s:.1f} img/s bf16-mixed, batch {batch}, {macs / 1e9:.2f} GMACs/img, "
                "FLOPs = 2 x MACs x 3 (fwd + bwd)")]


DDP_SCRIPT = textwrap.dedent('''
    import torch, timm
    from lightning_fabric import Fabric
    from tokenbook.train import TrainConfig, fit
    fabric = Fabric(accelerator="cuda", devices=2, strategy="ddp", precision="bf16-mixed")
    fabric.launch()
    x = torch.randn(256, 3, 28, 28); y = torch.arange(256) % 10
    tl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, drop_last=True)
    m = timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=4, num_classes=10, depth=2)
    r = fit(m, tl, tl, TrainConfig(epochs=1, lr=1e-3, progress=False), fabric=fabric)
    w = sum(p.double().sum().item() for p in r.model.parameters())
    print("RESULT", fabric.global_rank, fabric.world_size, r.timing["steps"], repr(w), flush=True)
''')


def ddp_check(device, n_gpus: Optional[int] = None, timeout: int = 300) -> list[dict]:
    """One 2-process DDP fit; weights must agree across ranks. Skipped (with the reason) on fewer than 2 GPUs."""
    n = torch.cuda.device_count() if n_gpus is None else n_gpus
    if n < 2:
        return [row("ddp", "2-process fit", "skip", "", "", "", device, f"needs 2 GPUs, this machine has {n}")]
    out = subprocess.run([sys.executable, "-c", DDP_SCRIPT], capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "lib")})
    res = [l.split()[1:] for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    ok = out.returncode == 0 and len(res) == 2 and res[0][3] == res[1][3]
    return [row("ddp", "2-process fit", "pass" if ok else "fail", len(res), "2 ranks, equal weights", "", device,
                "" if ok else (out.stderr[-300:] or out.stdout[-300:]))]


def launcher_check(device, store: Optional[Path] = None, nproc: Optional[int] = None) -> list[dict]:
    """The launcher's torchrun path (``tokenbook.runs.launch(executor="torchrun")``): one probe run as a
    ``torchrun --standalone`` DDP job of ``nproc`` ranks (default: the GPUs, at most 2) on ``device``'s kind, into a
    fresh run store, then launched again (it must come from the store)."""
    import tempfile

    from tokenbook import runs

    kind = torch.device(device).type
    n = nproc or (max(1, min(2, torch.cuda.device_count())) if kind == "cuda" else 1)
    train = dict(epochs=2, lr=1e-2, warmup_epochs=0.0, accelerator=kind, devices=n, strategy="ddp", progress=False)
    spec = runs.RunSpec("tokenbook.runs:probe_trainer", {"train": train}, label="launcher probe")
    with tempfile.TemporaryDirectory() as tmp:
        where = store or Path(tmp)
        t0 = time.perf_counter()
        (first,) = runs.launch([spec], executor="torchrun", store=where, verbose=False)
        dt = time.perf_counter() - t0
        (again,) = runs.launch([spec], executor="torchrun", store=where, verbose=False)
    loss = float(first.output.history["train_loss"].iloc[-1])
    ok = (first.source == "trained" and again.source == "store" and first.output.timing["world_size"] == n
          and loss == loss and abs(loss) != float("inf"))
    return [row("launcher", f"torchrun, {n} rank(s)", "pass" if ok else "fail", f"{dt:.0f} s",
                "trained, then read from the store", "", device,
                f"world size {first.output.timing['world_size']}, final train loss {loss:.3f}, "
                f"then {again.source}")]


def notebooks_check(device, results: Path, runner: Optional[list[str]] = None, timeout: int = 480) -> list[dict]:
    """Every notebook with the smoke profile on CUDA, into ``results`` (one row per notebook)."""
    cmd = runner or [str(ROOT / "run_all.sh"), "--profile", "smoke", "-p", "accelerator", "cuda",
                     "--results", str(results)]
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        rc, tail = out.returncode, (out.stderr or out.stdout)[-300:]
    except subprocess.TimeoutExpired:
        rc, tail = "timeout", f"over {timeout} s"
    dt = time.perf_counter() - t0
    nbs = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    rows = []
    for nb in nbs:
        ok = (results / nb / "smoke" / "status.json").is_file()
        rows.append(row("notebooks", nb, "pass" if ok else "fail", "smoke ok" if ok else "no status.json", "", "",
                        device, "" if ok else f"run_all rc {rc}: {tail}"))
    rows.append(row("notebooks", "run_all.sh --profile smoke", "pass" if rc == 0 else "fail", f"{dt:.0f} s", "",
                    "", device, f"rc {rc}"))
    return rows


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------
def _guarded(fn: Callable[[], list[dict]], check: str, subject: str, device) -> list[dict]:
    try:
        return fn()
    except Exception as e:  # one broken check must not hide the others' rows
        return [row(check, subject, "error", "", "", "", device, f"{type(e).__name__}: {e}"[:300])]


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="gpu_check.sh", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "results" / "gpu_check"), help="folder for gpu_check.csv/.md")
    ap.add_argument("--skip-notebooks", action="store_true", help="skip the smoke run of every notebook")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile comparisons")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: refusing to run: no CUDA device is visible to torch (torch.cuda.is_available() is False). "
              "Run it on a machine with an NVIDIA GPU and a CUDA build of torch.", file=sys.stderr)
        return 2
    dev = torch.device("cuda", 0)
    name = torch.cuda.get_device_name(dev)
    out = Path(args.out)
    rows: list[dict] = []
    t0 = time.perf_counter()
    for n in FAMILY_MODELS:
        rows += _guarded(lambda: precision_check(n, dev, compile=not args.no_compile), "bf16/compile", n, dev)
        write_table(rows, out)
    rows += _guarded(lambda: latency_check(dev), "latency", "vittm_b / vit_b", dev)
    rows += _guarded(lambda: train_throughput_check(dev, device_name=name), "train_peak", "vit_base_patch16_224", dev)
    rows += _guarded(lambda: ddp_check(dev), "ddp", "2-process fit", dev)
    rows += _guarded(lambda: launcher_check(dev), "launcher", "torchrun", dev)
    write_table(rows, out)
    if not args.skip_notebooks:
        rows += _guarded(lambda: notebooks_check(dev, out / "notebooks"), "notebooks", "smoke", dev)
    rows.append(row("total", name, "info", f"{time.perf_counter() - t0:.0f} s", "<= 600 s", "", dev,
                    f"torch {torch.__version__}"))
    csv_path, md_path = write_table(rows, out)
    print(md_path.read_text())
    print(f"gpu_check: wrote {csv_path} and {md_path}")
    return 1 if any(r["status"] in ("fail", "error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
