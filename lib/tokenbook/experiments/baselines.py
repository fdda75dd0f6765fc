"""Experiments of the notebook ``00_baselines`` (the template every paper notebook follows): the efficiency table of
timm's reference ViTs beside their published params/MACs, the summary of a small ViT trained on the default data, and
the attention-map figure.

- :func:`efficiency` / :func:`vs_published`: params, MACs (attention counted) and same-run latency of timm models,
  and the published numbers of ``references/baselines.yaml`` beside them.
- :func:`small_vit_summary`: one row with the trained model's accuracy, size, compute and training speed.
- :func:`attention_figure`: class-token attention per head in the last block and attention rollout.
- :func:`throughput`: training throughput of ``fit()`` against a plain PyTorch loop on the same model and data, and
  what helps on this machine (threads, seeds side by side, ``torch.compile``, bf16 autocast): the measurements
  behind the workbook's choice of how to run its seeded experiments (issue 12).
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from tokenbook import bench, viz
from tokenbook.results import paper_vs_ours
from tokenbook.params import Params as _Params
from tokenbook.params import as_list, param
from tokenbook.experiments.baselines_runs import (  # noqa: F401  (re-exported: the plain classifier run)
    canonical_model_kwargs, classifier_spec, train_classifier)


# ----------------------------------------------------------------------------------------------------------
# parameters: the notebook's parameters cell is generated from this class (python -m tokenbook.params --sync)
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Params(_Params):
    """The parameters of notebooks/00_baselines.ipynb (its parameters cell is generated from this class)."""

    NOTEBOOK: ClassVar[str] = "00_baselines"
    #: run_all.sh --proof: a few hundred images, the shortest latency timing; the two training benchmarks are off
    #: (the same code in every profile: the committed cpu profile runs them)
    PROOF: ClassVar[dict] = {"train_subset": 500, "val_subset": 250, "num_workers": 0, "latency_batch": 1,
                             "latency_min_run_time": 0.05, "bench_throughput": False, "bench_seeds": False}

    seed: int = param(0, "seed of the floors, the benchmarks and the figures' images [0, inf)")
    seeds: list[int] = param([0], "training seeds of the small ViT, each one stored run; the first is the model "
                                  "shown, several give its seed-to-seed spread (the noise the power rule uses)")
    executor: str = param("kernel", "where the small ViT's runs train: kernel (one after the other) or processes "
                                    "(side by side, one thread each: the same stored runs as 01's ViT and 03's "
                                    "full-token arm)", choices=("kernel", "processes"))
    dataset: str = param("fashion_mnist", "fashion_mnist | folder:<path> | hf:<id>")
    data_dir: str = param(
        "", "Fashion-MNIST IDX folder; empty: $TOKENBOOK_FASHION_MNIST, Debian package, then the hub", none="")
    img_size: int = param(28, "input side of the small model [1, inf)")
    train_subset: int = param(10000, "training images, class-balanced; 0 means all 60k [0, inf)", none=0)
    val_subset: int = param(2000, "validation images; 0 means all 10k [0, inf)", none=0)
    preset: str = param("none", "per-sample augmentation preset, see tokenbook.data.PRESETS")
    model_name: str = param("vit_fm_tiny_p4_28", "small ViT trained on the default data")
    epochs: int = param(5, "training epochs [1, inf)")
    batch_size: int = param(128, "training batch size [1, inf)")
    lr: float = param(0.002, "peak learning rate of AdamW (0, inf)")
    weight_decay: float = param(0.05, "AdamW weight decay [0, inf)")
    label_smoothing: float = param(0.0, "label smoothing of the cross-entropy [0, 1)")
    warmup_epochs: float = param(1.0, "linear warmup, in epochs [0, inf)")
    ema_decay: float = param(0.0, "EMA decay of the weights; 0 turns EMA off [0, 1)")
    max_steps_per_epoch: int = param(0, "cut epochs short; 0 means full epochs [0, inf)", none=0)
    num_workers: int = param(0, "DataLoader workers [0, inf)")
    accelerator: str = param("auto", "cpu | cuda | auto")
    precision: str = param("32-true", "32-true | bf16-mixed")
    eff_img_size: int = param(224, "input size of the efficiency table [1, inf)")
    eff_models: list[str] = param(["vit_small_patch16_224", "deit_small_patch16_224", "vit_base_patch32_224", "vit_base_patch16_224"],
                                  "timm models of the efficiency table")
    latency: bool = param(True, "measure latency; False gives counts only")
    latency_batch: int = param(1, "batch of the latency measurement [1, inf)")
    latency_min_run_time: float = param(1.0,
                                        "seconds of timing per model with torch.utils.benchmark blocked_autorange "
                                        "(0, inf)")
    num_figure_images: int = param(4, "images in the attention figures [1, inf)")
    bench_throughput: bool = param(True,
                                   "measure training throughput: fit() against a plain PyTorch loop, threads, seeds "
                                   "side by side, compile, bf16")
    bench_steps: int = param(8, "batches per timed epoch of the throughput benchmark [1, inf)")
    bench_repeats: int = param(3,
                               "round-robin repeats of the cheap throughput variants (median, min and max shown) [1,"
                               " inf)")
    bench_compile: bool = param(True,
                                "include torch.compile in the throughput benchmark (tens of seconds of compilation)")
    bench_processes: int = param(2,
                                 "fits side by side in separate processes (one thread each); 1 leaves the row out "
                                 "[1, inf)")
    fit_floors: bool = param(True,
                             "also fit the reference floors on the same split: logistic regression on pixels, a "
                             "small CNN")
    floor_cnn_epochs: int = param(10, "epochs of the small-CNN floor (01-03's, so the workbook fits the split's "
                                      "floors once) [1, inf)")
    bench_seeds: bool = param(True, "seeds-per-hour benchmark: one seed after another vs processes vs a vmap ensemble")
    seeds_bench_steps: int = param(2, "timed steps per way and repeat of the seeds-per-hour benchmark [1, inf)")
    seeds_bench_repeats: int = param(3, "interleaved repeats of the seeds-per-hour benchmark (median and IQR) [3, inf)")

__all__ = ["parse_models", "efficiency", "vs_published", "small_vit_summary", "attention_figure", "throughput",
           "throughput_decision", "small_vit_spec", "seed_spread", "classifier_spec",
           "train_classifier", "canonical_model_kwargs", "floor_comparison", "seeds_decision"]

PAPER = "baselines"


def parse_models(text: Sequence[str]) -> list[str]:
    """The notebook's model list (``eff_models``), checked: a list of names, not empty."""
    names = [n.strip() for n in as_list(text, "eff_models") if n.strip()]
    if not names:
        raise ValueError("no model names given (eff_models is empty)")
    return names


def efficiency(names: Sequence[str], img_size: int = 224, latency: bool = True, batch_size: int = 1,
               device: str = "cpu", min_run_time: float = 1.0) -> pd.DataFrame:
    """:func:`tokenbook.bench.efficiency_table` of timm models by name; ratios against the last one."""
    import timm

    return bench.efficiency_table({n: timm.create_model(n) for n in names}, input_size=(3, img_size, img_size),
                                  latency=latency, batch_size=batch_size, device=device, min_run_time=min_run_time,
                                  baseline=names[-1])


def vs_published(eff: pd.DataFrame) -> pd.DataFrame:
    """Params (M) and GMACs of :func:`efficiency` beside the published values, with sources and differences."""
    return paper_vs_ours(eff, PAPER, metrics=["params_m", "gmacs"])


def small_vit_summary(model: nn.Module, model_name: str, dataset: str, bundle: Any, result: Any, epochs: int,
                      img_size: int) -> pd.DataFrame:
    """One row: the trained small ViT's top-1/top-5 (raw and EMA), params, MACs and training speed."""
    return pd.DataFrame([{
        "model": model_name, "dataset": dataset, "train_images": len(bundle.train), "val_images": len(bundle.val),
        "epochs": epochs, "top1": result.final.get("val_top1"), "top5": result.final.get("val_top5"),
        "ema_top1": result.final.get("ema_top1"), "params_m": bench.count_params(model)["total"] / 1e6,
        "gmacs": bench.count_macs(model, input_size=(3, img_size, img_size))["gmacs"],
        "train_wall_s": result.timing["wall_time_s"], "train_step_s": result.timing["step_time_s"],
        "step_ms": result.timing["step_ms"], "train_img_s": result.timing["train_img_s"],
        "device": result.timing["device"],
        **({"cut_at_step": result.timing["capped_at_step"]} if result.timing.get("capped_at_step") else {}),
    }])


def small_vit_spec(model_name: str, data_config: Any, train_config: Any, num_workers: int = 0,
                   num_classes: Optional[int] = None):
    """The run description (:class:`tokenbook.runs.RunSpec`) of the small ViT of section 2: the workbook's plain
    classifier run (:func:`classifier_spec`), so that the store trains it once for every notebook that
    uses the same model, recipe, data and seed (01's ViT baseline, 03's full-token arm at the cpu scale).
    ``num_classes``: the data's (default: the model's own)."""
    
    kw = {"img_size": data_config.img_size, **({"num_classes": num_classes} if num_classes else {})}
    return classifier_spec(model_name, kw, data_config, train_config, train_config.batch_size, num_workers)


def attention_figure(model: nn.Module, bundle: Any, num_images: int, title: str):
    """Class-token attention per head of the last block and attention rollout on the first validation images."""
    x = torch.stack([bundle.val[i][0] for i in range(num_images)])
    xb = bundle.preprocess(x)
    maps = viz.attention_maps(model.cpu(), xb)
    last = viz.cls_attention(maps[-1])  # (B, heads, g, g)
    roll = viz.cls_attention(viz.attention_rollout(maps)[:, None])[:, 0]
    imgs = [viz.to_display(im, bundle.mean, bundle.std) for im in xb]
    return viz.plot_maps(imgs, [[*last[i], roll[i]] for i in range(len(imgs))],
                         row_titles=[bundle.class_names[int(bundle.val[i][1])] for i in range(len(imgs))],
                         col_titles=[f"head {h}" for h in range(last.shape[1])] + ["rollout"],
                         suptitle=f"{title}: class-token attention (last block) and rollout")


def throughput(model_name: str, bundle: Any, loader: Any, batch_size: int, steps: int = 8, repeats: int = 3,
               compile: bool = True, processes: int = 2, lr: float = 1e-3) -> pd.DataFrame:
    """:func:`tokenbook.bench.train_throughput_table` for ``model_name`` on ``steps`` batches of the notebook's
    training data (preprocessed once, held in memory), plus fit() on the notebook's own ``loader``."""
    n = steps * batch_size
    if len(bundle.train) < n:
        raise ValueError(f"throughput needs {n} training images ({steps} x {batch_size}), the data has "
                         f"{len(bundle.train)}: lower bench_steps")
    xs, ys = zip(*(bundle.train[i] for i in range(n)))
    x = bundle.preprocess(torch.stack(xs)) if bundle.preprocess is not None else torch.stack(xs)
    y = torch.as_tensor(ys)
    few = torch.utils.data.DataLoader(torch.utils.data.Subset(loader.dataset, range(n)), batch_size=batch_size,
                                      shuffle=False, num_workers=loader.num_workers)
    cpu_bf16 = "amx_bf16" in _cpu_flags() or "avx512_bf16" in _cpu_flags()
    return bench.train_throughput_table(model_name, x, y, batch_size,
                                        model_kwargs={"num_classes": bundle.num_classes,
                                                      "img_size": bundle.config.img_size},
                                        loader=few, preprocess=bundle.preprocess, lr=lr, repeats=repeats,
                                        compile=compile, bf16=cpu_bf16, processes=processes,
                                        register_modules=("tokenbook.models",))


def _cpu_flags() -> set:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def throughput_decision(tp: pd.DataFrame, gain_needed: float = 1.1, run_s: float = 60.0) -> pd.DataFrame:
    """What the measured table says about how to run the seeded cpu-profile experiments. The cpu profile runs every
    experiment with fit(), fp32, all threads, one process, no compilation; an option that beats fit() by at least
    ``gain_needed``x (``torch.compile``: also repaying its setup within a ``run_s`` seconds run) is reported as worth
    adopting, anything else as not used, with the measured reason."""
    rows = []
    base = tp.loc[tp["variant"] == "fit()"].iloc[0]
    floor = tp.loc[tp["variant"].str.startswith("plain")].iloc[0]
    rows.append({"question": "fit() against the plain loop",
                 "measured": f"{base['img_s']:.0f} vs {floor['img_s']:.0f} img/s ({base['vs_plain_loop']:.2f}x)",
                 "decision": "used for every run (scheduler, finite checks, timing and history for the price of "
                             "this ratio)"})
    for _, r in tp.iterrows():
        v, gain = r["variant"], float(r["vs_fit"])
        if v == "fit()" or v.startswith("plain") or "DataLoader" in v:
            continue
        if v == "fit(), 1 thread":
            dec = (f"not used: all threads are {1 / gain:.2f}x faster" if gain < 1 else
                   "worth adopting: one thread is as fast (the cpu profile uses all threads)")
            rows.append({"question": v, "measured": f"{gain:.2f}x fit()", "decision": dec})
            continue
        if "compile" in v:
            worth = gain >= gain_needed and float(r["setup_s"]) < run_s * (1 - 1 / gain)
            rows.append({"question": v, "measured": f"{gain:.2f}x fit() after {r['setup_s']:.0f} s of compilation",
                         "decision": "worth adopting (not used by the cpu profile yet)" if worth else
                         f"not used: does not repay its compilation within a {run_s:.0f} s run"})
            continue
        if "side by side" in v:
            dec = ("worth adopting for seeded runs (the cpu profile runs its seeds one after another, with all "
                   "threads, so far)" if gain >= gain_needed else f"not used: below {gain_needed:g}x")
        else:
            dec = ("worth adopting (not used by the cpu profile yet)" if gain >= gain_needed else
                   f"not used: below {gain_needed:g}x")
        rows.append({"question": v, "measured": f"{gain:.2f}x fit()", "decision": dec})
    real = tp.loc[tp["variant"].str.contains("DataLoader")]
    if len(real):
        r = real.iloc[0]
        rows.append({"question": "data loading (the notebook's DataLoader instead of batches in memory)",
                     "measured": f"{float(r['vs_fit']):.2f}x fit() on batches in memory",
                     "decision": "kept: the runs read the Arrow-backed dataset as a user's would"})
    return pd.DataFrame(rows)


def seed_spread(runs: Sequence[Any]) -> pd.DataFrame:
    """The small ViT's runs over its seeds (:class:`tokenbook.runs.Run`, one per seed): one row per seed (final
    top-1/top-5, best top-1, the gain over the last 20 % of the evaluations by the library's plateau criterion,
    training seconds, where the run came from), then the mean, the sample standard deviation and a Student-t 95 %
    interval of the final top-1 (one row each; with one seed only the mean)."""
    from tokenbook.claims import mean_ci, plateau

    rows = []
    for r in runs:
        h, out = r.output.history, r.output
        done, gain = plateau(list(h["val_top1"].dropna()))
        rows.append({"seed": str(r.spec.args["train"]["seed"]),
                     "top1": float(out.final["val_top1"]), "top5": float(out.final.get("val_top5", float("nan"))),
                     "best_top1": float(h["val_top1"].max()), "last_20pct_gain_pts": gain,
                     "plateaued": "yes" if done else "no", "train_wall_s": float(out.timing["wall_time_s"]),
                     "source": r.source})
    top1 = [row["top1"] for row in rows]
    df = pd.DataFrame(rows)
    if len(top1) >= 2:
        m, lo, hi = mean_ci(top1)
        sd = float(np.std(top1, ddof=1))
        extra = [{"seed": "mean", "top1": m}, {"seed": "sd (ddof 1)", "top1": sd},
                 {"seed": "95 % CI low", "top1": lo}, {"seed": "95 % CI high", "top1": hi}]
        df = pd.concat([df, pd.DataFrame(extra)], ignore_index=True)
    return df


def floor_comparison(summary: pd.DataFrame, floor_table: pd.DataFrame) -> pd.DataFrame:
    """The small ViT beside the reference floors (:func:`tokenbook.floors.floors_table`) on the same split: top-1,
    parameters, training seconds, and how far each is above the logistic-regression floor."""
    from tokenbook.floors import beside_floors

    vit = summary.iloc[0]
    return beside_floors([{"model": vit["model"], "kind": "from-scratch baseline", "top1": float(vit["top1"]),
                           "params": int(round(float(vit["params_m"]) * 1e6)),
                           "train_s": float(vit["train_wall_s"])}], floor_table)


def seeds_decision(table: pd.DataFrame, target: float = 1.5) -> str:
    """One Markdown paragraph from :func:`tokenbook.bench.seeds_per_hour`: the fastest way against one seed after
    the other (median ratio and IQR of the interleaved repeats) and whether it reaches ``target``."""
    t = table[table["way"] != "sequential"]
    if t.empty:
        return "Only the sequential way was measured."
    best = t.loc[t["ratio_vs_sequential"].idxmax()]
    seq = table.loc[table["way"] == "sequential", "seeds_per_hour"].iloc[0]
    met = float(best["q1"]) >= target
    return (f"**Fastest way here:** {best['way']} (K = {int(best['K'])}, {int(best['processes'])} process(es) x "
            f"{int(best['threads'])} thread(s)): {float(best['seeds_per_hour']):.1f} seeds per hour against "
            f"{float(seq):.1f} one after the other, **{float(best['ratio_vs_sequential']):.2f}x** (IQR "
            f"{float(best['q1']):.2f}-{float(best['q3']):.2f} over {int(best['repeats'])} interleaved repeats). "
            f"Target {target:g}x: **{'met' if met else 'not met'}** (the IQR's lower end decides). Measured in this "
            "run on this machine; a busy machine favours the one-thread processes.")


# ----------------------------------------------------------------------------------------------------------
# GPU budget: this notebook's loops for tokenbook.gpu_budget (an ESTIMATE; the engine is in the core)
# ----------------------------------------------------------------------------------------------------------
def gpu_loops(params: dict) -> list:
    """The small ViT's training run (and the timed parts) under ``params`` as :class:`tokenbook.gpu_budget.Loop`
    rows, what :func:`tokenbook.gpu_budget.estimate` costs."""
    import tokenbook.models  # noqa: F401  (registers the small ViTs)
    from tokenbook import gpu_budget as G
    from tokenbook.train import TrainConfig

    p, nb = params, "00_baselines"
    img, (n, nv) = p["img_size"], G.fm_sizes(p)
    cfg = TrainConfig.from_params(p, max_steps_per_epoch=p["max_steps_per_epoch"] or None)
    loops = [G.timm_loop(nb, f"small ViT {p['model_name']}", p["model_name"], dict(num_classes=10, img_size=img), img,
                         **G.fit_fields(cfg, n, nv, p["num_workers"]))]
    if p["latency"]:
        models = len(p["eff_models"])
        loops.append(G.latency_loop(nb, "efficiency table", models, p["latency_min_run_time"]))
    if p["bench_throughput"]:
        loops.append(G.not_charged(nb, "training-throughput benchmark", "fit() on the CPU (accelerator 'cpu')"))
    return loops
