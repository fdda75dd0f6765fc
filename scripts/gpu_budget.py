"""Estimate how long the `gpu` profile of the whole workbook takes on one H100/H200-class GPU, without a GPU.

An ESTIMATE, not a measurement. For every training loop of every notebook under its gpu profile (the numbers of runs,
seeds, epochs, images and batch sizes below are read from notebooks/params/*/gpu.yaml and the notebooks' parameter
defaults; each is written out in RUNS so that a reader can check it), the per-step cost is counted on this CPU at the
profile's model size: forward + backward MACs per image (torch.utils.flop_counter) and ATen kernel launches of forward +
backward + AdamW (a dispatch-mode counter). A step costs the larger of its compute time (MACs x batch x 2 FLOPs at
`--mfu` of `--peak-tflops` dense bf16) and its launch time (`--kernel-us` per launch, eager PyTorch). Not charged:
data loading, validation passes, latency benchmarks, tokenizer / TokenAdapt training, compilation and Python overhead
between steps. 06_cross_paper has its own, finer estimate in its notebook (table gpu_budget_estimate).

    python scripts/gpu_budget.py            # prints a Markdown table
"""
from __future__ import annotations

import argparse
import math
import sys

import torch
import timm

import tokenbook.models  # noqa: F401  (registers the workbook's models)
from tokenbook import bench

FM_TRAIN = 60_000  # Fashion-MNIST training images (train_subset 0 = all)

# notebook, part, registry name, model kwargs, input (C, H, W), runs (arms x seeds), epochs, images per epoch, batch
RUNS = [
    ("00_baselines", "small ViT", "vit_fm_small_p4_32", {}, (3, 32, 32), 1, 30, FM_TRAIN, 256),
    ("01_vittm", "ViTTM + ViT, 3 seeds", "vittm_cpu_m4p4_32", {}, (3, 32, 32), 3, 30, FM_TRAIN, 256),
    ("01_vittm", "(the ViT of section 2)", "vit_fm_small_p4_32", {}, (3, 32, 32), 3, 30, FM_TRAIN, 256),
    # 8 claim arms x 3 seeds + the other 26 - 8 settings of the four studies with the first seed: 42 runs
    ("01_vittm", "ablations (42 runs)", "vittm_cpu_m4p4_32", dict(embed_dim=128, depth=6), (3, 32, 32), 42, 5,
     20_000, 256),
    ("02_t2t_vit", "7 variants x 5 seeds", "t2t_vit_tiny_fmnist", dict(img_size=32, in_chans=1), (1, 32, 32), 35, 30,
     FM_TRAIN, 256),
    ("03_toe", "DeiT-S 224 px, full-token + ToE, 5 seeds", "deit_small_patch16_224", dict(in_chans=3), (3, 224, 224),
     10, 30, FM_TRAIN, 256),
    ("04_seit", "5 variants x 5 seeds (token arms as the token ViT)", "deit_fm_nano_token_32", {}, (32, 12, 12), 25,
     50, FM_TRAIN, 256),
    ("05_memory", "source pre-training (classes 0-3)", "vit_fm_small_p4_28", {}, (3, 28, 28), 1, 30, 24_000, 256),
    # 2 Fashion-MNIST target tasks of 3 classes (18,000 images each) x 7 methods x 5 seeds, 20 epochs of batch 128
    ("05_memory", "fine-tuning, 2 fm tasks x 7 methods x 5 seeds", "vit_fm_small_p4_28", {}, (3, 28, 28), 70, 20,
     18_000, 128),
    ("05_memory", "fine-tuning on digits x 7 methods x 5 seeds", "vit_fm_small_p4_28", {}, (3, 28, 28), 35, 20, 1_200,
     128),
]


def step_cost(name: str, kwargs: dict, size: tuple) -> tuple[float, int]:
    return bench.train_step_cost(timm.create_model(name, **kwargs), torch.randn(2, *size))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM / H200: 989)")
    ap.add_argument("--mfu", type=float, default=0.3, help="fraction of the peak a compute-bound step reaches")
    ap.add_argument("--kernel-us", type=float, default=8.0, help="time per kernel launch of an eager step (us)")
    ap.add_argument("--cross-paper-min", type=float, default=12.0, help="06_cross_paper's own estimate (minutes)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    print("| notebook | part | steps | train GMACs/img | kernels/step | compute ms | launch ms | bound | minutes |")
    print("|---|---|---:|---:|---:|---:|---:|---|---:|")
    total = {}
    cache = {}
    for nb, part, name, kw, size, runs, epochs, images, batch in RUNS:
        key = (name, tuple(sorted(kw.items())), size)
        if key not in cache:
            cache[key] = step_cost(name, kw, size)
        macs, kernels = cache[key]
        steps = runs * epochs * (images // batch)
        t_c, t_l = bench.estimated_step_s(macs, kernels, batch, a.peak_tflops, a.mfu, a.kernel_us)
        minutes = steps * max(t_c, t_l) / 60
        total[nb] = total.get(nb, 0.0) + minutes
        print(f"| {nb} | {part} | {steps:,} | {macs / 1e9:.3f} | {kernels} | {t_c * 1e3:.2f} | {t_l * 1e3:.2f} | "
              f"{'compute' if t_c > t_l else 'launch'} | {minutes:.1f} |")
    total["06_cross_paper"] = a.cross_paper_min
    print(f"| 06_cross_paper | its notebook's estimate | | | | | | | {a.cross_paper_min:.1f} |")
    print(f"\nTotal (estimate): {sum(total.values()):.0f} min; per notebook: "
          + ", ".join(f"{k} {v:.0f}" for k, v in total.items()))
    return 0 if math.isfinite(sum(total.values())) else 1


if __name__ == "__main__":
    sys.exit(main())
