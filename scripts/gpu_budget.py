"""ESTIMATE how long a profile (default: gpu) of the workbook takes on one H100/H200-class GPU, without a GPU.

A thin command line over :mod:`tokenbook.gpu_budget`: every notebook's training loops are derived from its profile
(parameter-cell defaults + notebooks/params/<notebook>/<profile>.yaml), each step is counted on this CPU (MACs and
ATen operators of one real step) and costed at --peak-tflops x --mfu and --kernel-us per operator; the data loader is
measured on Fashion-MNIST when it is installed (else the module's documented default). Prints a Markdown table and
the total. What is and is not charged: see the module's docstring.

    PYTHONPATH=lib python scripts/gpu_budget.py                      # the gpu profile, every notebook
    PYTHONPATH=lib python scripts/gpu_budget.py --notebooks 01_vittm 03_toe --kernel-us 5
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

from tokenbook import gpu_budget as G


def loader_rate(override: float | None) -> tuple[float | None, str]:
    """The pixel loader's us/image: ``override``, else measured on full Fashion-MNIST, else None (the default)."""
    if override is not None:
        return override, f"{override:.2f} us/image (--loader-us)"
    from tokenbook import data

    try:  # local files only (an explicit directory, $TOKENBOOK_FASHION_MNIST or the Debian package): no download
        local = data.find_fashion_mnist(allow_hub=False)
        bundle = data.load_data(data.DataConfig(dataset="fashion_mnist", data_dir=local, img_size=32, channels=3,
                                                train_subset=None, val_subset=None))
    except (data.DatasetNotFoundError, OSError) as e:
        return None, f"{G.DEFAULT_LOADER_SOURCE}; Fashion-MNIST not available ({type(e).__name__})"
    us = G.measure_loader_us(bundle, batch=256, n_batches=20)
    return us, f"{us:.2f} us/image, measured now on full Fashion-MNIST ({len(bundle.train):,} images, batch 256)"


def markdown(df) -> str:
    def cell(v, col):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        if col in ("runs", "steps", "kernels_per_step"):
            return f"{v:,.0f}"
        if isinstance(v, float):
            return f"{v:.3f}" if col == "train_gmacs_per_image" else f"{v:.2f}"
        return str(v).replace("|", "/")

    cols = list(df.columns)
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---:" if c not in ("notebook", "part", "bound", "note")
                                                         else "---" for c in cols) + "|"]
    for _, r in df.iterrows():
        row = [cell(r[c], c) for c in cols]
        if r["part"] in ("subtotal", "total (ESTIMATE)"):
            row = [f"**{v}**" if v else v for v in row]
        out.append("| " + " | ".join(row) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="gpu", help="run profile (default gpu)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM / H200: 989)")
    ap.add_argument("--fp32-tflops", type=float, default=67.0, help="fp32 peak for 32-true runs (H100 SXM: 67)")
    ap.add_argument("--mfu", type=float, default=0.3, help="fraction of the peak a compute-bound step reaches")
    ap.add_argument("--kernel-us", type=float, default=8.0, help="host time per ATen operator of an eager step (us)")
    ap.add_argument("--loader-us", type=float, default=None, help="pixel loader us/image (default: measured)")
    ap.add_argument("--notebooks", nargs="+", default=None, help="notebook stems (default: every notebook)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    us, source = loader_rate(a.loader_us)
    df = G.workbook_estimate(a.profile, notebooks=a.notebooks, peak_tflops=a.peak_tflops, fp32_tflops=a.fp32_tflops,
                             mfu=a.mfu, kernel_us=a.kernel_us, loader_us_per_image=us, loader_source=source)
    print(f"ESTIMATE of the '{a.profile}' profile on one H100/H200-class GPU (not a measurement)\n")
    print(markdown(df))
    sub = df[df["part"] == "subtotal"]
    total = float(df["minutes"].iloc[-1])
    print(f"\n{df.attrs['settings']}.")
    print(f"\nTotal (ESTIMATE): {total:.1f} min; per notebook: "
          + ", ".join(f"{nb} {m:.1f}" for nb, m in zip(sub["notebook"], sub["minutes"])))
    return 0 if math.isfinite(total) else 1


if __name__ == "__main__":
    sys.exit(main())
