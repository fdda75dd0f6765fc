"""ViTTM experiments for ``notebooks/01_vittm.ipynb``: efficiency table, small-scale training, ablations, figures.

The model family lives in :mod:`tokenbook.models.vittm`; this module holds what the notebook runs with it, so that the
notebook stays a thin driver:

- :func:`efficiency_table`: ViT-S/16, ViT-B/16, ViTTM-S, ViTTM-B and the 16/32 variants at 224 px: parameters (total and
  used in ``forward``, counted on the meta device), MACs/FLOPs with attention counted, latency the way the official
  ``benchmark.py`` measures it (fp32, ``eval``, ``no_grad``, random input, median of ``torch.utils.benchmark``
  blocked autorange; batch 128 on a GPU, a smaller batch on a CPU), throughput.
- :func:`headline_ratios` and :func:`compare_with_references`: our numbers next to the paper's (abstract) and the
  numbers measured from the official code, kept in separate columns; unknown values are ``n/a``.
- :func:`train_models`: several models trained with the same engine, data and budget; one summary row each with the
  top-1 of both ViTTM heads.
- :func:`run_ablation` / :func:`plot_ablation`: the issue's ablations (head x fusion, latent scale, patch sizes,
  memory blocks) as short training runs, identical configurations trained once.
- :func:`plot_read_write_maps`, :func:`plot_head_maps`, :func:`plot_memory_diagnostics`: the figures.
- :func:`make_train_config`, :func:`recipe_table`, :data:`OFFICIAL_PITFALLS`: the paper-scale recipes and the official
  code's pitfalls with how this implementation avoids them.
- The claims ledger (``references/vittm.yaml``): :func:`train_seeds` / :func:`seed_means` (section 2 once per seed),
  :data:`CLAIM_ARMS` / :func:`run_claim_arms` / :func:`plot_claim_arms` (the eight ablation trainings the claims
  compare, once per seed; :data:`CLAIM_ARM_SETS` / :func:`claim_arm_names` which arms each claim needs),
  :func:`interleaved_latency` (ViT-B/16 vs ViTTM-B timed A/B) and the evidence builders
  :func:`efficiency_evidence`, :func:`beats_vit_evidence`, :func:`ablation_evidence`.
- The run store (``executor``): section 2's runs, the claim arms and the other ablation settings are trained once
  and read back by later executions (:func:`train_seeds`, :func:`run_claim_arms`, :func:`run_ablation` with an
  ``executor``; :func:`ablation_setup`, :func:`claim_arm_specs`). The store's trainer and specs, the model factory
  :func:`create` and the summary rows live in :mod:`tokenbook.experiments.vittm_runs` (re-exported here), which
  launcher processes import without this module. The released checkpoint: :mod:`~tokenbook.experiments.vittm_released`.

Size: about 1150 lines, over the 800-line guide: the notebook's five sections and its claims share the same model
factory, reference loading and ablation runner, and splitting them further would scatter one paper's experiments.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import replace
from typing import Any, ClassVar, Iterable, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenbook import bench, references
from tokenbook.experiments.vittm_runs import (  # noqa: F401  (re-exported: the model factory, the run store's parts)
    _RECIPE_OVERRIDES, _cache_entry, _config_key, _model_latency, _model_row, _tokens, _train_seeds_stored,
    PretrainedRefs, canonical_kwargs, create, finetune_run, finetune_spec, global_batch, launch_problems,
    make_train_config, pretrain_data_config, pretrain_runs, run_spec, store_runs_into_cache, train_run)
from tokenbook.experiments.vittm_released import RELEASED, released_table  # noqa: F401  (re-exported)
from tokenbook.models import vittm as V
from tokenbook.repro import seed_everything
from tokenbook.results import NA
from tokenbook.train import TrainConfig, all_heads, fit, recipe
from tokenbook.params import LaunchParams, ParamsError, ReleasedParams, SeedPlanParams
from tokenbook.params import param


# ----------------------------------------------------------------------------------------------------------
# parameters: the notebook's parameters cell is generated from this class (python -m tokenbook.params --sync)
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Params(ReleasedParams, SeedPlanParams, LaunchParams):  # released, seed-plan, launcher fields: bases
    """The parameters of notebooks/01_vittm.ipynb (its parameters cell is generated from this class)."""

    NOTEBOOK: ClassVar[str] = "01_vittm"
    #: run_all.sh --proof: one CPU process (the recipes' bf16-mixed kept), a CPU batch, the shortest timings
    PROOF: ClassVar[dict] = {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "strategy": "auto", "batch_size": 4,
                             "num_workers": 0, "latency_batch": 1, "latency_min_run_time": 0.05, "latency_repeats": 3,
                             "train_latency_batch": 2, "num_figure_images": 2, "executor": "kernel"}

    def __post_init__(self) -> None:  # the launcher's pairing rules on each stage's resolved recipe, too
        super().__post_init__()
        problems = launch_problems(self)
        if problems:
            raise ParamsError("; ".join(problems))

    seed: int = param(0, "seed of the data subsets and of the figures' random inputs [0, inf)")
    seeds: list[int] = param([0, 1, 2],
                             "training seeds of section 2 and of the claim arms of section 3 (paired by seed); the "
                             "first also runs the other ablation settings and drives the figures; seed_pilot may add "
                             "the next ones, and the claim arms train only the seeds their claims need")
    dataset: str = param("fashion_mnist", "fashion_mnist | folder:<path> | hf:<id>")
    data_dir: str = param(
        "", "Fashion-MNIST IDX folder; empty: $TOKENBOOK_FASHION_MNIST, Debian package, then the hub", none="")
    img_size: int = param(28, "model input side for sections 2 to 4 [1, inf)")
    train_subset: int = param(6000, "training images of section 2, class-balanced; 0 means all [0, inf)", none=0)
    val_subset: int = param(2000, "validation images of section 2; 0 means all [0, inf)", none=0)
    preset: str = param("none", "per-sample augmentation preset, see tokenbook.data.PRESETS")
    model_name: str = param("vittm_cpu_m4p4_28", "ViTTM of section 2; its width is set by embed_dim")
    vit_name: str = param("vit_fm_tiny_p4_28", "ViT of the same width and depth trained alongside")
    embed_dim: int = param(64, "ViTTM width, to match the ViT; 0 keeps the registered width [0, inf)", none=0)
    drop_path_rate: float = param(0.0,
                                  "stochastic depth of both models; README fine-tune 0.1 for S and 0.2 for B [0, 1)")
    recipe: str = param("", "tokenbook.train.RECIPES name such as vittm_b_ft_in1k; empty uses the values below")
    epochs: int = param(3, "training epochs; with a recipe 0 keeps the recipe value [0, inf)")
    batch_size: int = param(128, "training batch size per device; over several devices the global batch is "
                                 "batch_size x devices x nodes [1, inf)")
    lr: float = param(0.002, "peak learning rate of AdamW, without a recipe (0, inf)")
    weight_decay: float = param(0.05, "AdamW weight decay, without a recipe [0, inf)")
    warmup_epochs: float = param(0.5, "linear warmup in epochs, without a recipe [0, inf)")
    ema_decay: float = param(0.0, "EMA decay of the weights, without a recipe; 0 turns EMA off [0, 1)")
    label_smoothing: float = param(0.0, "label smoothing of both heads' cross-entropy, without a recipe [0, 1)")
    max_steps_per_epoch: int = param(0, "cut epochs short; 0 means full epochs [0, inf)", none=0)
    num_workers: int = param(0, "DataLoader workers [0, inf)")
    accelerator: str = param("auto", "cpu | cuda | auto")
    precision: str = param("32-true", "32-true | bf16-mixed; with a recipe 32-true keeps the recipe value bf16-mixed")
    devices: int = param(1, "devices per node; with a recipe 0 keeps the recipe value [0, inf)")
    num_nodes: int = param(1, "nodes; with a recipe 0 keeps the recipe value [0, inf)")
    strategy: str = param("auto", "strategy of a run over several devices: ddp (ranks started by executor torchrun "
                                  "or submitit) or ddp_notebook (started from the kernel); auto means ddp there, one "
                                  "process on one device")
    keep_global_batch: bool = param(True, "with a recipe, fewer devices x nodes than it names accumulate gradients "
                                          "to keep its global batch (and so its learning rate and schedule)")
    pretrain_dataset: str = param("",
                                  "IN-21k-P style folder or hub id for a pre-training stage before section 2 (one "
                                  "stored run per model, fine-tuned from the store by section 2's runs); empty "
                                  "skips it")
    pretrain_recipe: str = param("vittm_pt_in21k", "recipe of the pre-training stage")
    pretrain_preset: str = param("vittm_pt", "augmentation preset of the pre-training stage")
    eff_models: list[str] = param(["ViT-S/16", "ViT-B/16", "ViTTM-S", "ViTTM-B", "ViTTM-S 16/32", "ViTTM-B 16/32"],
                                  "rows of the efficiency table")
    eff_img_size: int = param(224, "input side of the efficiency table [1, inf)")
    latency: bool = param(True, "measure latency; False gives counts only")
    latency_batch: int = param(4, "batch of the efficiency latency; the official benchmark uses 128 on a GPU [1, inf)")
    latency_min_run_time: float = param(1.0,
                                        "seconds of torch.utils.benchmark blocked autorange per model; official 8 "
                                        "(0, inf)")
    latency_repeats: int = param(9,
                                 "interleaved repeats of the ViT-B/16 vs ViTTM-B timing of the latency claim (batch "
                                 "latency_batch, even with latency False); 0 skips it [0, inf)")
    train_latency_batch: int = param(64, "batch of the latency of the section 2 models [1, inf)")
    judge_heldout: bool = param(False, "judge section 2's and the claim arms' top-1, floors and claims on every "
                                       "held-out image of the classes (tokenbook.heldout: each stored run evaluated "
                                       "once more); the curves stay on val_subset; needs the run store")
    fit_floors: bool = param(True, "also fit the reference floors on section 2's split and on the ablations' split: "
                                   "logistic regression on pixels, a small CNN")
    floor_cnn_epochs: int = param(10, "epochs of the small-CNN floor [1, inf)")
    ablation_claims: bool = param(True, "train the ablation arms of the claims once per seed in seeds")
    ablation_claim_ids: list[str] = param(["vittm.linear_heads", "vittm.add_fusion", "vittm.no_memory_processing"],
                                          "claims whose arms are trained (their union; a claim left out gets no "
                                          "evidence and shows as failed: not run)")
    ablation_studies: list[str] = param(["head_fusion", "latent_scale", "patch_sizes", "memory_blocks"],
                                        "studies whose other settings run with the first seed only; empty: only the "
                                        "claim arms")
    ablation_embed_dim: int = param(64, "width of the ablation models [1, inf)")
    ablation_depth: int = param(4, "depth of the ablation models [1, inf)")
    ablation_train_subset: int = param(2560, "training images of each ablation run; 0 means all [0, inf)", none=0)
    ablation_val_subset: int = param(1000, "validation images of each ablation run; 0 means all [0, inf)", none=0)
    ablation_epochs: int = param(1, "epochs of each ablation run [1, inf)")
    ablation_lr: float = param(0.002, "peak learning rate of the ablation runs (0, inf)")
    ablation_heads: list[str] = param(["lin", "tl", "ca", "la", "lca"], "read/write heads in the head x fusion study")
    ablation_fusions: list[str] = param(["residual", "erase", "add_erase"], "fusion types in the head x fusion study")
    ablation_patch_sizes: list[str] = param([],
                                            "patch-size settings such as m4p4,m2p4; empty runs all that fit the "
                                            "image")
    map_layers: list[int] = param([0, 2, 5], "layers of the read/write figure")
    head_map_layer: int = param(-1, "layer of the per-head figure; negative counts from the end")
    num_figure_images: int = param(3, "images in the figures [1, inf)")

__all__ = [
    "attention_maps", "judge_heldout", "memory_diagnostics", "ablation_configs",
    "EFFICIENCY_MODELS", "OFFICIAL_PITFALLS", "efficiency_table", "headline_ratios", "compare_with_references",
    "create", "train_models", "run_ablation", "plot_ablation", "plot_read_write_maps", "plot_head_maps",
    "plot_memory_diagnostics", "make_train_config", "global_batch", "small_scale_vs_paper", "recipe_table",
    "pitfalls_table",
    "REFERENCE_ALIASES",
    "pretrain_then_finetune", "pretrain_data_config", "pretrain_runs", "PretrainedRefs", "finetune_spec",
    "finetune_run",
    "launch_problems", "CLAIM_ARMS", "train_seeds", "seed_means", "run_claim_arms", "plot_claim_arms",
    "interleaved_latency", "efficiency_evidence", "beats_vit_evidence", "ablation_evidence", "floor_rows",
    "CLAIM_ARM_SETS", "claim_arm_names", "canonical_kwargs", "run_spec", "train_run", "store_runs_into_cache",
    "ablation_setup", "claim_arm_specs", "claim_arm_seeds", "RELEASED", "released_table",
]

#: Efficiency-table rows: label (as in the reference file) -> (timm name, kwargs).
EFFICIENCY_MODELS: dict[str, tuple[str, dict]] = {
    "ViT-S/16": ("vit_small_patch16_224", {}),
    "ViT-B/16": ("vit_base_patch16_224", {}),
    "ViTTM-S": ("vittm_small_m28p28_224", {}),
    "ViTTM-B": ("vittm_base_m28p28_224", {}),
    "ViTTM-S 16/32": ("vittm_small_m16p32_224", {}),
    "ViTTM-B 16/32": ("vittm_base_m16p32_224", {}),
}

#: Our row label -> other labels the reference file uses for the same model (the abstract says only "ViT-B").
REFERENCE_ALIASES: dict[str, tuple[str, ...]] = {"ViT-B/16": ("ViT-B",), "ViT-S/16": ("ViT-S",)}

# metrics whose difference to a reference is meaningful (same definition); latency/throughput depend on the machine
_COMPARABLE = ("top1", "params_total", "params_used", "gmacs", "gmacs_ratio_vit_b_over_vittm_b",
               "flops_ratio_vit_b_over_vittm_b", "memory_tokens", "process_tokens", "latency_speedup_vs_vit_b",
               "latency_reduction_vs_vit_b")


# ----------------------------------------------------------------------------------------------------------------------
# Efficiency
# ----------------------------------------------------------------------------------------------------------------------
def efficiency_table(labels: Optional[Sequence[str]] = None, img_size: int = 224, latency: bool = True,
                     batch_size: int = 128, device: str = "cpu", min_run_time: float = 8.0, warmup: int = 1,
                     models: Optional[Mapping[str, tuple[str, dict]]] = None) -> pd.DataFrame:
    """One row per model: token counts, ``params_total`` / ``params_used`` (meta device, so free), ``gmacs`` /
    ``gflops`` (attention counted, batch 1), and with ``latency`` the median / IQR of one batched fp32 forward
    (official ``benchmark.py`` method), throughput and the settings. Models are measured one after the other in this
    call, so ratios between rows come from the same run."""
    models = dict(models or EFFICIENCY_MODELS)
    labels = list(labels) if labels is not None else list(models)
    unknown = [l for l in labels if l not in models]
    if unknown:
        raise ValueError(f"unknown efficiency models {unknown}; choose from {list(models)}")
    rows = []
    for label in labels:
        name, kw = models[label]
        m = create(name, meta=True, **kw)
        mem, proc = _tokens(m, img_size)
        ex = torch.empty(1, 3, img_size, img_size, device="meta")
        row = {"model": label, "timm_name": name, "img_size": img_size, "memory_tokens": mem, "process_tokens": proc,
               "params_total": bench.count_params(m)["total"], "params_used": bench.count_used_params(m, ex)}
        with all_heads(m):  # both heads, as the official forward (and its fvcore count) computes them
            mc = bench.count_macs(m, input_size=(3, img_size, img_size))
        row.update(gmacs=mc["gmacs"], gflops=mc["gflops"])
        del m
        if latency:
            seed_everything(0)
            real = create(name, **kw)
            with all_heads(real):  # the official benchmark times the forward that computes both heads
                r = bench.measure_latency(real, input_size=(3, img_size, img_size), batch_size=batch_size,
                                          device=device, min_run_time=min_run_time, warmup=warmup, name=label)
            row.update(latency_ms=r.median_ms, latency_iqr_ms=r.iqr_ms, throughput_img_s=r.throughput_img_s,
                       batch=r.batch_size, device=r.device, dtype=r.dtype, threads=r.threads, runs=r.runs,
                       peak_mem_mb=r.peak_mem_mb)
            del real
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        rows.append(row)
    return pd.DataFrame(rows)


def headline_ratios(eff: pd.DataFrame, pairs: Sequence[tuple[str, str]] = (
        ("ViT-B/16", "ViTTM-B"), ("ViT-B/16", "ViTTM-B 16/32"), ("ViT-S/16", "ViTTM-S"),
        ("ViT-S/16", "ViTTM-S 16/32"))) -> pd.DataFrame:
    """The abstract's headline as ratios from one run: GMACs and latency of ViT over ViTTM, and the latency reduction
    in %. One row per (pair, metric) with the paper's value where the abstract states one (ViT-B vs ViTTM-B only),
    the official-code value where one was measured, ours and the difference."""
    refs = references.load("vittm")

    def ref(model, metric, kinds):
        for r in refs:
            if r.model == model and r.metric == metric and _ref_group(r) in kinds:
                return r
        return None

    e = eff.set_index("model")
    rows = []
    for vit, ttm in pairs:
        if vit not in e.index or ttm not in e.index:
            continue
        ours = {"gmacs_ratio": e.at[vit, "gmacs"] / e.at[ttm, "gmacs"]}
        if "latency_ms" in e.columns and pd.notna(e.at[ttm, "latency_ms"]):
            ours["latency_speedup"] = e.at[vit, "latency_ms"] / e.at[ttm, "latency_ms"]
            ours["latency_reduction_pct"] = 100.0 * (1.0 - e.at[ttm, "latency_ms"] / e.at[vit, "latency_ms"])
        headline = vit == "ViT-B/16" and ttm == "ViTTM-B"
        spec = {
            "gmacs_ratio": ("flops_ratio_vit_b_over_vittm_b", "gmacs_ratio_vit_b_over_vittm_b", "x"),
            "latency_speedup": ("latency_speedup_vs_vit_b", None, "x"),
            "latency_reduction_pct": ("latency_reduction_vs_vit_b", None, "%"),
        }
        for metric, (paper_metric, official_metric, unit) in spec.items():
            p = ref("ViTTM-B", paper_metric, ("paper",)) if headline else None
            o = ref("ViTTM-B", official_metric, ("official",)) if headline and official_metric else None
            v = ours.get(metric)
            rows.append({
                "pair": f"{vit} / {ttm}", "metric": metric, "unit": unit,
                "paper": p.value if p else None, "paper_source": f"{p.source} [{p.kind}]" if p else NA,
                "official_code": o.value if o else None, "official_source": f"{o.source} [{o.kind}]" if o else NA,
                "ours": v, "diff_vs_paper": (v - p.value) if (p and v is not None) else None,
                "pass": p.passes(v) if (p and v is not None) else None,
            })
    return pd.DataFrame(rows)


def _ref_group(r: references.Reference) -> str:
    """'paper' for what the paper states (and arithmetic on it), 'official' for official-code numbers."""
    if r.kind == "paper" or (r.kind == "computed" and "abstract" in r.source):
        return "paper"
    if r.kind in ("official_code", "official_code_measured", "computed"):
        return "official"
    return "other"


def compare_with_references(ours: pd.DataFrame, metrics: Sequence[str], model_col: str = "model") -> pd.DataFrame:
    """Long table, one row per (model, metric): the paper's value and source (``paper`` column: only what the paper
    states; else ``n/a``), the value measured from the official code and its source (``official_code``), ours, the
    difference to the paper's value, else to the official one, and pass/fail where the reference has a tolerance.
    Differences are left out for machine-dependent metrics (latency, throughput): the paper's hardware and batch are
    unknown."""
    refs = references.load("vittm")
    rows = []
    for _, row in ours.iterrows():
        model = row[model_col]
        names = (model, *REFERENCE_ALIASES.get(model, ()))
        for m in metrics:
            if m not in row.index:
                continue
            v = row[m]
            v = None if v is None or (isinstance(v, float) and math.isnan(v)) else v
            found = {"paper": None, "official": None}
            for r in refs:
                if r.model in names and r.metric == m and found.get(_ref_group(r), 1) is None:
                    found[_ref_group(r)] = r
            p, o = found["paper"], found["official"]
            base = p or o
            comparable = m in _COMPARABLE and base is not None and v is not None
            diff = (float(v) - base.value) if comparable else None
            rows.append({
                "model": model, "metric": m, "unit": (base.unit if base else ""),
                "paper": p.value if p else None, "paper_source": f"{p.source} [{p.kind}]" if p else NA,
                "official_code": o.value if o else None, "official_source": f"{o.source} [{o.kind}]" if o else NA,
                "ours": v, "diff": diff,
                "rel_diff_pct": 100.0 * diff / base.value if diff is not None and base.value else None,
                "pass": (base.passes(float(v)) if comparable and not (m == "params_total" and model.startswith("ViTTM"))
                         else None),
                "note": base.note if base else "",
            })
    return pd.DataFrame(rows)


def small_scale_vs_paper(summary: pd.DataFrame, vittm: str, vit: str) -> pd.DataFrame:
    """The small-scale run against the paper's claims, as differences between the two models (absolute numbers on
    another dataset and size are not comparable): top-1 of ViTTM (headline memory head, and the process head) minus
    ViT (paper: 82.9 - 81.0 = +1.9 points for B on IN-1k, abstract), ViT over ViTTM GMACs (paper: 2.4x) and ViT over
    ViTTM latency (paper: 529.5 / 234.1 = 2.26x)."""
    s = summary.set_index("model")
    t, b = s.loc[vittm], s.loc[vit]
    refs = {r.id: r for r in references.load("vittm")}
    p_top1 = refs["vittm_b.in1k.top1"].value - refs["vit_b.in1k.top1"].value
    rows = [
        ("top1 ViTTM memory head - ViT", float(t["top1_memory"]) - float(b["top1"]), round(p_top1, 2),
         "abstract: 82.9 - 81.0 (ViTTM-B vs ViT-B, IN-1k; head not stated)"),
        ("top1 ViTTM process head - ViT", float(t["top1_process"]) - float(b["top1"]), None, NA),
        ("GMACs ViT / ViTTM", float(b["gmacs"]) / float(t["gmacs"]), refs["vittm_b.flops_ratio"].value,
         "abstract: 2.4x fewer FLOPs (B at 224 px)"),
    ]
    if "latency_ms" in s.columns:
        rows.append(("latency ViT / ViTTM", float(b["latency_ms"]) / float(t["latency_ms"]),
                     refs["vittm_b.latency_speedup"].value, "abstract: 529.5 ms / 234.1 ms (B; hardware not stated)"))
    return pd.DataFrame([{"quantity": q, "ours": o, "paper": p, "diff": (o - p) if p is not None else None,
                          "paper_source": src, "scale": f"ours: {vittm} vs {vit} on the notebook's data"}
                         for q, o, p, src in rows])


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------
def train_models(models: Mapping[str, tuple[str, dict]], train_loader, val_loader, cfg: TrainConfig, bundle,
                 seed: int = 0, latency: bool = True, latency_batch: int = 64, latency_device: str = "cpu",
                 min_run_time: float = 1.0, initial: Optional[Mapping[str, nn.Module]] = None
                 ) -> tuple[pd.DataFrame, dict[str, pd.DataFrame], dict[str, nn.Module]]:
    """Train each ``label -> (timm name, kwargs)`` with the same engine, data, config and seed.

    Returns ``(summary, histories, trained models)``. The summary has one row per model: token counts, parameters,
    GMACs (attention counted), ``top1_memory`` / ``top1_process`` (ViTTM heads; n/a for a ViT), ``top1`` (the headline:
    the ViTTM memory head, see the notebook; the only head of a ViT), EMA top-1 when EMA is on, train wall time, step
    time and, with ``latency``, the median inference latency at ``latency_batch`` measured right after training.
    ``initial`` maps labels to models to continue from (e.g. :func:`pretrain_then_finetune`) instead of new ones.
    """
    img = bundle.config.img_size
    rows, hist, trained = [], {}, {}
    for label, (name, kw) in models.items():
        seed_everything(seed)
        model = initial[label] if initial and label in initial else create(name, num_classes=bundle.num_classes, **kw)
        res = fit(model, train_loader, val_loader, cfg, preprocess=bundle.preprocess, desc=label)
        row = _model_row(label, name, model, res.final, res.timing, cfg.epochs, img)
        if latency:
            row.update(_model_latency(res.model, label, img, latency_batch, latency_device, min_run_time))
        rows.append(row)
        hist[label], trained[label] = res.history, res.model
    return pd.DataFrame(rows), hist, trained


def pretrain_then_finetune(name: str, model_kwargs: dict, pretrain_bundle, pretrain_cfg: TrainConfig,
                           finetune_bundle, batch_size: int, num_workers: int = 0, seed: int = 0) -> nn.Module:
    """The README's two-stage recipe: train ``name`` on the pre-training data (IN-21k-P, 10450 classes), then replace
    both classifiers (zero-initialized, as the official ``--replace-head``) for the fine-tuning classes. Returns the
    model, ready for the fine-tuning run."""
    from tokenbook.data import make_loaders

    seed_everything(seed)
    model = create(name, num_classes=pretrain_bundle.num_classes, **model_kwargs)
    tl, vl = make_loaders(pretrain_bundle, batch_size, num_workers=num_workers, seed=seed)
    fit(model, tl, vl, pretrain_cfg, preprocess=pretrain_bundle.preprocess, desc=f"{name} pretrain")
    model.reset_classifier(finetune_bundle.num_classes)
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Ablations
# ----------------------------------------------------------------------------------------------------------------------
#: The paper's (README's) choice in each study, for marking it in tables and plots.
#: For patch sizes: equal memory and process counts (README 28/28); m4p4 gives 49 + 49 tokens at 28 px, 64 + 64 at 32.
PAPER_CHOICE = {"head_fusion": "lin+residual", "latent_scale": "r=4", "memory_blocks": "none", "patch_sizes": "m4p4"}


def run_ablation(study: str, base_model: str, base_kwargs: dict, train_loader, val_loader, cfg: TrainConfig, bundle,
                 labels: Optional[Iterable[str]] = None, seed: int = 0, cache: Optional[dict] = None,
                 curves: Optional[dict] = None, executor: Optional[str] = None, batch_size: Optional[int] = None,
                 num_workers: int = 0, launched: Optional[list] = None, **launch_kw: Any) -> pd.DataFrame:
    """Train one short run per setting of ``study`` (see :func:`ablation_configs`) on top of
    ``base_model`` + ``base_kwargs``; ``labels`` picks a subset (in the study's order). ``seed`` seeds the model's
    initialization and the run (the loaders carry their own seed). Configurations that resolve to the same model
    (e.g. lin+residual and r=4 on the paper's base) are trained once per seed when a shared ``cache`` dict is passed.
    One row per setting: the options, the seed, token counts, parameters, GMACs, top-1 of both heads, train time,
    whether it is the paper's choice and whether the result came from the cache. ``curves``, a dict, receives the
    memory head's validation top-1 per evaluation under ``(seed, study, setting)``.

    ``executor`` (``"kernel"`` / ``"processes"``): the runs missing from ``cache`` come from the run store
    (:func:`store_runs_into_cache`, trained there when missing, with ``batch_size`` and ``num_workers``; the loaders
    are then not used), the same numbers as training them here; ``launched`` receives the store's records."""
    configs = ablation_configs(study, img_size=bundle.config.img_size)
    if labels is not None:
        wanted = [l.strip() for l in labels if l.strip()]
        bad = [l for l in wanted if l not in configs]
        if bad:
            raise ValueError(f"unknown labels {bad} for ablation {study!r}; choose from {list(configs)}")
        configs = {l: configs[l] for l in configs if l in wanted}
    cache = {} if cache is None else cache
    img = bundle.config.img_size
    if executor is not None:
        if batch_size is None:
            raise ValueError("run_ablation through the run store needs batch_size")
        jobs = [(f"{study} {label}", {**base_kwargs, **kw, "num_classes": bundle.num_classes}, seed)
                for label, kw in configs.items()]
        store_runs_into_cache(cache, base_model, jobs, bundle.config, cfg, batch_size, num_workers, executor,
                              launched=launched, **launch_kw)
    rows = []
    for label, kw in configs.items():
        args = {**base_kwargs, **kw, "num_classes": bundle.num_classes}
        seed_everything(seed)
        model = create(base_model, **args)
        key = (_config_key(model), seed)
        cached = key in cache and not cache[key].pop("_fresh", False)  # a run the store just gave is not a reuse
        if key not in cache:
            res = fit(model, train_loader, val_loader, replace(cfg, progress=False, seed=seed),
                      preprocess=bundle.preprocess, desc=f"{study} {label}")
            cache[key] = _cache_entry(res.final, res.timing, res.history)
        r = {k: v for k, v in cache[key].items() if not k.startswith("_")}
        if curves is not None:
            curves[(seed, study, label)] = list(cache[key]["_curve"])
        paper_choice = PAPER_CHOICE.get(study) == label
        with all_heads(model):
            gmacs = bench.count_macs(model, input_size=(3, img, img))["gmacs"]
        rows.append({"study": study, "setting": label, "seed": seed, "rw_head_type": model.rw_head_type,
                     "fusion_type": model.fusion_type, "latent_size_scale": model.latent_size_scale,
                     "memory_blocks": model.memory_blocks_type, "memory_ps": model.memory_ps,
                     "process_ps": model.process_ps, "memory_tokens": model.num_memory_tokens,
                     "process_tokens": model.num_process_tokens, "params_total": bench.count_params(model)["total"],
                     "gmacs": gmacs, **r,
                     "paper_choice": bool(paper_choice), "paper_top1": None,
                     "paper_source": "n/a: the paper's ablation tables are not in the public sources (reference §4.4)",
                     "reused": cached})
    return pd.DataFrame(rows)


def plot_ablation(df: pd.DataFrame, title: str = ""):
    """Bars: top-1 of the memory and process heads per setting (the paper's choice marked with *), GMACs as a line
    on the right axis."""
    import matplotlib.pyplot as plt

    n = len(df)
    fig, ax = plt.subplots(figsize=(max(4.5, 0.55 * n + 2.5), 3.4))
    x = np.arange(n)
    w = 0.38
    ax.bar(x - w / 2, df["top1_memory"].astype(float), w, label="memory head")
    ax.bar(x + w / 2, df["top1_process"].astype(float), w, label="process head")
    vals = pd.concat([df["top1_memory"], df["top1_process"]]).astype(float)
    lo = max(0.0, float(vals.min()) - 5.0) if len(vals) else 0.0
    ax.set_ylim(lo, min(100.0, float(vals.max()) + 3.0) if len(vals) else 100.0)
    ax.set_ylabel("val top-1 (%)")
    ax.set_xticks(x, [f"{s}*" if c else s for s, c in zip(df["setting"], df["paper_choice"])],
                  rotation=45 if n > 5 else 0, ha="right" if n > 5 else "center", fontsize=8)
    ax2 = ax.twinx()
    ax2.plot(x, df["gmacs"].astype(float) * 1e3, "k.--", label="MMACs")
    ax2.set_ylabel("MMACs per image")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title or f"ablation: {df['study'].iloc[0] if n else ''} (* = paper's choice)", fontsize=9)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------------------------
def _center(grid: tuple[int, int]) -> int:
    return (grid[0] // 2) * grid[1] + grid[1] // 2


def _mark(ax, index: int, grid: tuple[int, int], img_hw: tuple[int, int], color: str = "cyan") -> None:
    import matplotlib.patches as patches

    r, c = divmod(index, grid[1])
    ph, pw = img_hw[0] / grid[0], img_hw[1] / grid[1]
    ax.add_patch(patches.Rectangle((c * pw - 0.5, r * ph - 0.5), pw, ph, fill=False, edgecolor=color, lw=1.2))


def plot_read_write_maps(model: V.ViTTM, x: torch.Tensor, layers: Sequence[int], images: Sequence[np.ndarray],
                         row_titles: Optional[Sequence[str]] = None, process_token: Optional[int] = None,
                         memory_token: Optional[int] = None):
    """Per image (rows) and chosen layer (column pairs): **read** = which memory tokens the marked process token reads
    from (its read weights over the memory grid, mean over heads); **write** = which process tokens the marked memory
    token is written from (its write weights over the process grid). The marked token is the grid centre by default.
    ``images`` are the display versions of ``x`` (``viz.to_display``)."""
    import matplotlib.pyplot as plt

    from tokenbook.viz import overlay

    maps = attention_maps(model, x, layers)
    mg, pg = maps["memory_grid"], maps["process_grid"]
    if pg is None:
        raise ValueError("read/write maps over the image need patch process tokens (process_embedder_type='patch')")
    p_tok = _center(pg) if process_token is None else process_token
    m_tok = _center(mg) if memory_token is None else memory_token
    nm, npr = mg[0] * mg[1], pg[0] * pg[1]
    cols = 1 + 2 * len(maps["read"])
    fig, axes = plt.subplots(len(images), cols, figsize=(1.7 * cols, 1.8 * len(images)), squeeze=False)
    for b, img in enumerate(images):
        hw = img.shape[:2]
        axes[b, 0].imshow(img, cmap="gray" if img.ndim == 2 else None)
        axes[b, 0].set_xticks([])
        axes[b, 0].set_yticks([])
        if row_titles:
            axes[b, 0].set_ylabel(row_titles[b], fontsize=8)
        for j, l in enumerate(maps["read"]):
            rd = maps["read"][l][b, :, p_tok, :nm].float().mean(0).reshape(mg)
            wr = maps["write"][l][b, :, m_tok, :npr].float().mean(0).reshape(pg)
            ax_r, ax_w = axes[b, 1 + 2 * j], axes[b, 2 + 2 * j]
            overlay(ax_r, img, rd)
            _mark(ax_r, p_tok, pg, hw)
            overlay(ax_w, img, wr)
            _mark(ax_w, m_tok, mg, hw, color="lime")
            if b == 0:
                ax_r.set_title(f"L{l} read\nP-token <- memory", fontsize=7)
                ax_w.set_title(f"L{l} write\nM-token <- process", fontsize=7)
    axes[0, 0].set_title("image", fontsize=8)
    fig.suptitle(f"{maps['rw_head_type']} read/write maps (cyan: the reading process token, "
                 "lime: the written memory token)", fontsize=8)
    fig.tight_layout()
    return fig


def plot_head_maps(model: V.ViTTM, x: torch.Tensor, layer: int, image: np.ndarray,
                   process_token: Optional[int] = None, memory_token: Optional[int] = None):
    """One image, one layer: per head (columns) the read map of the marked process token (top row) and the write map
    of the marked memory token (bottom row)."""
    import matplotlib.pyplot as plt

    from tokenbook.viz import overlay

    maps = attention_maps(model, x[:1], [layer])
    mg, pg = maps["memory_grid"], maps["process_grid"]
    l = layer % model.depth
    rd, wr = maps["read"][l][0], maps["write"][l][0]
    p_tok = _center(pg) if process_token is None else process_token
    m_tok = _center(mg) if memory_token is None else memory_token
    heads = rd.shape[0]
    fig, axes = plt.subplots(2, heads, figsize=(1.7 * heads, 3.6), squeeze=False)
    for h in range(heads):
        overlay(axes[0, h], image, rd[h, p_tok, :mg[0] * mg[1]].float().reshape(mg))
        _mark(axes[0, h], p_tok, pg, image.shape[:2])
        overlay(axes[1, h], image, wr[h, m_tok, :pg[0] * pg[1]].float().reshape(pg))
        _mark(axes[1, h], m_tok, mg, image.shape[:2], color="lime")
        axes[0, h].set_title(f"head {h}", fontsize=8)
    axes[0, 0].set_ylabel("read", fontsize=8)
    axes[1, 0].set_ylabel("write", fontsize=8)
    fig.suptitle(f"layer {l}: per-head read (top) and write (bottom) maps", fontsize=9)
    fig.tight_layout()
    return fig


def plot_memory_diagnostics(diag: pd.DataFrame, title: str = ""):
    """Two panels over layers: (a) norms of the writes and reads and the write relative to the memory it is added
    to; (b) cosine similarity of the memory with the initial memory and with the previous layer's memory."""
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(8.4, 3.2))
    for c in ("write_norm", "read_norm", "memory_norm"):
        a.plot(diag["layer"], diag[c], marker="o", ms=3, label=c)
    a2 = a.twinx()
    a2.plot(diag["layer"], diag["write_rel_norm"], "k--", marker="x", ms=3, label="write_rel_norm (right)")
    a.set_xlabel("layer")
    a.set_ylabel("mean token L2 norm")
    a2.set_ylabel("write / memory norm")
    h1, l1 = a.get_legend_handles_labels()
    h2, l2 = a2.get_legend_handles_labels()
    a.legend(h1 + h2, l1 + l2, fontsize=7)
    for c in ("cos_to_initial", "cos_to_previous"):
        b.plot(diag["layer"], diag[c], marker="o", ms=3, label=c)
    b.set_xlabel("layer")
    b.set_ylabel("cosine similarity")
    b.legend(fontsize=7)
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.suptitle(title or "memory stream across layers", fontsize=9)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------------------------------
# Recipes and pitfalls
# ----------------------------------------------------------------------------------------------------------------------
# make_train_config and its recipe overrides: tokenbook.experiments.vittm_runs (re-exported above)


def recipe_table() -> pd.DataFrame:
    """The README's pre-training and fine-tuning hyper-parameters as this workbook runs them: one row per setting,
    one column per stage (``tokenbook.train.RECIPES['vittm_*']``, data presets, architecture flags)."""
    from tokenbook.data import PRESETS

    stages = {"IN-21k-P pretrain (S, B)": ("vittm_pt_in21k", "vittm_pt", 0.0),
              "IN-1k fine-tune ViTTM-S": ("vittm_s_ft_in1k", "vittm_s_ft", 0.1),
              "IN-1k fine-tune ViTTM-B": ("vittm_b_ft_in1k", "vittm_b_ft", 0.2)}
    keys = ("epochs", "batch_size", "devices", "num_nodes", "opt", "lr", "weight_decay", "filter_bias_and_bn",
            "warmup_steps", "warmup_lr", "min_lr", "clip_grad", "mixup", "cutmix", "loss", "bce_sum_classes",
            "ema_decay", "precision", "strategy")
    cols = {}
    for stage, (rname, preset, dpr) in stages.items():
        cfg = recipe(rname)
        col = {k: getattr(cfg, k) for k in keys}
        col["effective_batch"] = global_batch(cfg)
        pr = PRESETS[preset]
        col.update(recipe=rname, preset=preset, auto_augment=pr.get("auto_augment"), random_erasing=pr.get("re_prob"),
                   rrc_scale=str(pr.get("scale")), drop_path_rate=dpr, img_size=224,
                   architecture=", ".join(f"{k}={v}" for k, v in V.PAPER_CONFIG.items()))
        cols[stage] = col
    df = pd.DataFrame(cols)
    df.index.name = "setting"
    return df.reset_index().astype(str)


#: The official code's pitfalls (reference sheet §1.3, §1.7, §1.10, §1.11, §4.3, §5, §6) and what this workbook
#: does about each.
OFFICIAL_PITFALLS: list[dict[str, str]] = [
    {"pitfall": "--process-embedded-type is ignored (the model reads process_embedder_type)",
     "effect": "the flag silently has no effect; 'patch' is always used",
     "here": "one keyword, process_embedder_type, checked against ('patch', 'latent'); unknown values raise"},
    {"pitfall": "process embedders 'downsample' and 'latent' crash",
     "effect": "unpack error / TypeError at construction",
     "here": "'latent' works (learned process tokens); 'downsample' raises a ValueError that says why"},
    {"pitfall": "rw head 'dyna' and memory block 'conv' crash", "effect": "KeyError / TypeError at construction",
     "here": "rejected with a ValueError naming the supported options"},
    {"pitfall": "--no-pretrained is inverted: timm hub weights load by default",
     "effect": "needs internet; blocks start from IN-21k->1k ViT weights unless the flag is given",
     "here": "models start from random init; pretrained weights only when asked (pretrained_cfg_overlay file)"},
    {"pitfall": "Shampoo imports are commented out", "effect": "--optimizer shampoo fails",
     "here": "not offered; the paper's models used AdamW (train.RECIPES vittm_*)"},
    {"pitfall": "README fine-tune does not load the IN-21k checkpoint; --checkpoint-profile ...-ls2 vs "
                "--latent-size-scale 4",
     "effect": "the two-stage recipe is not reproducible from the README alone",
     "here": "pretrain_then_finetune: same model object, both heads replaced (zero init) for the fine-tune classes; "
             "r = 4 throughout"},
    {"pitfall": "checkpoints of --compile runs carry _orig_mod. and the load is non-strict",
     "effect": "a fine-tune may silently start from random weights",
     "here": "checkpoint_filter_fn strips _orig_mod./module., drops n_averaged and loads strictly (clear error)"},
    {"pitfall": "parameters never used in forward (cls_token, pos_embed, 16x16 patch_embed, lin proj)",
     "effect": "+14.9M (B) / +3.9M (S) in parameter counts; DDP needs find_unused_parameters",
     "here": "not created; used = total = 111,607,760 (B) / 29,262,800 (S); filter drops them from official files; "
             "plain DDP (make_train_config)"},
    {"pitfall": "weight decay on every parameter (norms, biases, position tables)",
     "effect": "differs from timm/DeiT practice; easy to lose when porting",
     "here": "kept on purpose: RECIPES vittm_* set filter_bias_and_bn=False"},
    {"pitfall": "segmentation normalizes with mean = std = 127.5, classification with ImageNet mean/std",
     "effect": "backbone sees other input statistics in segmentation",
     "here": "classification only in this workbook; pretrained_cfg records ImageNet mean/std"},
    {"pitfall": "fvcore does not count fused attention (benchmark.py FLOPs)",
     "effect": "official GMACs omit the blocks' attention matmuls (ViT-B 16.87 vs 17.58)",
     "here": "tokenbook.bench counts attention; both official numbers are shown for comparison"},
]


def pitfalls_table() -> pd.DataFrame:
    """:data:`OFFICIAL_PITFALLS` as a table."""
    return pd.DataFrame(OFFICIAL_PITFALLS)


# ----------------------------------------------------------------------------------------------------------
# Read/write maps, memory diagnostics and the ablation settings
# ----------------------------------------------------------------------------------------------------------
def attention_maps(model: V.ViTTM, x: torch.Tensor, layers: Optional[Sequence[int]] = None) -> dict[str, Any]:
    """Explicit read and write maps for a batch.

    Returns ``{"read": {layer: [B, h, Np, Nm]}, "write": {layer: [B, h, Nm, Np]}, "memory_grid", "process_grid",
    "rw_head_type"}``: ``read[l][b, h, p, m]`` is how much process token ``p`` reads from memory token ``m``;
    ``write[l][b, h, m, p]`` how much memory token ``m`` is written from process token ``p``. For ``tl`` the last
    dimension is ``Nm + Np`` (source tokens first, then the query-stream tokens it also summarizes).
    Grids give the (rows, cols) of each stream at this input size (process grid None for latent process tokens).
    """
    was_training = model.training
    model.eval()
    try:
        rec = model.trace(x, maps=True)
    finally:
        model.train(was_training)
    layers = list(range(model.depth)) if layers is None else list(layers)
    for l in layers:
        if not -model.depth <= l < model.depth:
            raise ValueError(f"layer {l} out of range for a model with depth {model.depth}")
    H, W = x.shape[-2:]
    pgrid = (H // model.process_ps, W // model.process_ps) if model.process_embedder_type == "patch" else None
    return {"read": {l % model.depth: rec["read_maps"][l] for l in layers},
            "write": {l % model.depth: rec["write_maps"][l] for l in layers},
            "memory_grid": (H // model.memory_ps, W // model.memory_ps), "process_grid": pgrid,
            "rw_head_type": model.rw_head_type}


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.float(), b.float(), dim=-1).mean().item()


@torch.no_grad()
def memory_diagnostics(model: V.ViTTM, x: torch.Tensor):
    """How the memory stream changes across layers, one row per layer (a pandas DataFrame).

    Columns: ``layer``; ``write_norm`` (mean L2 norm of the write head's output per memory token); ``read_norm`` (same
    for the read into the process stream); ``write_rel_norm`` (write_norm / norm of the memory it is fused into);
    ``memory_norm`` (mean token norm after the layer); ``cos_to_initial`` (mean token-wise cosine similarity of the
    memory after the layer with the initial memory, i.e. embedding + position); ``cos_to_previous`` (with the memory
    before the layer).
    """
    import pandas as pd

    was_training = model.training
    model.eval()
    try:
        rec = model.trace(x, maps=False)
    finally:
        model.train(was_training)
    rows, prev = [], rec["memory0"]
    for i in range(model.depth):
        w, mem, before = rec["write"][i], rec["memory"][i], rec["mem_before_write"][i]
        wn = w.float().norm(dim=-1).mean().item()
        rows.append(dict(
            layer=i, write_norm=wn, read_norm=rec["read"][i].float().norm(dim=-1).mean().item(),
            write_rel_norm=wn / max(before.float().norm(dim=-1).mean().item(), 1e-12),
            memory_norm=mem.float().norm(dim=-1).mean().item(),
            cos_to_initial=_cos(mem, rec["memory0"]), cos_to_previous=_cos(mem, prev)))
        prev = mem
    return pd.DataFrame(rows)


def ablation_configs(study: Optional[str] = None, img_size: int = 28) -> dict[str, Any]:
    """Model kwargs for the ablations of the issue (apply on top of a small variant, e.g. ``vittm_cpu_m4p4_28``).

    Studies (the official code's ablation space, reference sheet §4.4):
    ``head_fusion``: every rw head type x fusion type (labels ``"lin+residual"``...);
    ``latent_scale``: r in {1, 2, 4} with lin;
    ``patch_sizes``: (memory_ps, process_ps) pairs that divide ``img_size``, memory patch <= process patch (the
    official settings never have fewer memory than process tokens) and at least a 4x4 process grid (labels
    ``"m4p4"``...; at 28 px: m2p2, m2p4, m2p7, m4p4, m4p7, m7p7);
    ``memory_blocks``: none vs mlp.
    Returns ``{study: {label: kwargs}}`` or, with ``study``, ``{label: kwargs}``.
    """
    studies: dict[str, dict[str, dict[str, Any]]] = {
        "head_fusion": {f"{h}+{f}": dict(rw_head_type=h, fusion_type=f) for h in V.RW_HEAD_TYPES for f in V.FUSION_TYPES},
        "latent_scale": {f"r={r}": dict(rw_head_type="lin", latent_size_scale=r) for r in (1, 2, 4)},
        "memory_blocks": {m: dict(memory_blocks=m) for m in V.MEMORY_BLOCK_TYPES},
    }
    divisors = [p for p in range(2, img_size) if img_size % p == 0]
    if len(divisors) < 2:
        raise ValueError(f"img_size={img_size} has fewer than two patch sizes that divide it; use e.g. 28 or 32")
    pairs = []
    for m in divisors:
        for p in divisors:
            if p >= m and (img_size // p) >= 4:
                pairs.append((m, p))
    studies["patch_sizes"] = {f"m{m}p{p}": dict(memory_ps=m, process_ps=p, img_size=img_size) for m, p in pairs}
    if study is None:
        return studies
    if study not in studies:
        raise ValueError(f"unknown ablation study {study!r}; choose one of {tuple(studies)}")
    return studies[study]


# ----------------------------------------------------------------------------------------------------------
# The claims ledger: several seeds, the ablation arms the claims compare, interleaved latency, evidence
# ----------------------------------------------------------------------------------------------------------
#: The ablation arms of the sheet's claims (``references/vittm.yaml``): arm -> (study, setting). ``memory_blocks none``
#: is the same model as ``lin+residual`` and is trained once per seed (8 trainings per seed).
CLAIM_ARMS: dict[str, tuple[str, str]] = {
    **{f"{h}+residual": ("head_fusion", f"{h}+residual") for h in V.RW_HEAD_TYPES},
    "lin+erase": ("head_fusion", "lin+erase"), "lin+add_erase": ("head_fusion", "lin+add_erase"),
    "memory_blocks none": ("memory_blocks", "none"), "memory_blocks mlp": ("memory_blocks", "mlp"),
}


#: The arms each ablation claim compares: claim -> (a, candidates for b). See :func:`ablation_evidence`.
CLAIM_ARM_SETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "vittm.linear_heads": ("lin+residual", ("tl+residual", "ca+residual", "la+residual", "lca+residual")),
    "vittm.add_fusion": ("lin+residual", ("lin+erase", "lin+add_erase")),
    "vittm.no_memory_processing": ("memory_blocks none", ("memory_blocks mlp",)),
}


def claim_arm_seeds(plan: Any, run_seeds: Sequence[int], claim_ids: Iterable[str], base: int) -> dict[str, list[int]]:
    """``{arm: seeds}`` of the claim arms under a :func:`tokenbook.claims.plan_seeds` plan: an arm trains the seeds
    of the claim using it that needs the most (:func:`tokenbook.claims.arm_seeds`); a claim the pilot has no paired
    seeds of trains the ``base`` first seeds."""
    from tokenbook.claims import arm_seeds

    ids = list(claim_ids)
    return arm_seeds(plan, run_seeds, {c: (CLAIM_ARM_SETS[c][0], *CLAIM_ARM_SETS[c][1]) for c in ids},
                     claim_arm_names(ids), unplanned=base)


def claim_arm_names(claim_ids: Optional[Iterable[str]] = None) -> list[str]:
    """The arms of :data:`CLAIM_ARMS` that the claims ``claim_ids`` compare (None: every ablation claim), in the
    order of :data:`CLAIM_ARMS`."""
    ids = list(CLAIM_ARM_SETS) if claim_ids is None else list(claim_ids)
    bad = [c for c in ids if c not in CLAIM_ARM_SETS]
    if bad:
        raise ValueError(f"unknown ablation claims {bad}; choose from {list(CLAIM_ARM_SETS)}")
    need = {arm for c in ids for arm in (CLAIM_ARM_SETS[c][0], *CLAIM_ARM_SETS[c][1])}
    return [a for a in CLAIM_ARMS if a in need]


def train_seeds(models: Mapping[str, tuple[str, dict]], bundle, batch_size: int, cfg: TrainConfig,
                seeds: Sequence[int], num_workers: int = 0, latency: bool = True, latency_batch: int = 64,
                latency_device: str = "cpu", min_run_time: float = 1.0,
                initial: Optional[Mapping[str, nn.Module]] = None, executor: Optional[str] = None,
                also: Sequence[Any] = (), launched: Optional[list] = None,
                pretrained: Optional[Mapping[str, dict]] = None, **launch_kw: Any
                ) -> tuple[pd.DataFrame, dict[int, dict[str, pd.DataFrame]], dict[str, nn.Module]]:
    """:func:`train_models` once per seed: the seed sets the initialization, the run and the data order (the
    images are the same for every seed, so the models are paired by seed). Latency (independent of the weights) is
    measured for the first seed only. Returns ``(summary of every seed with a seed column, {seed: histories}, the
    first seed's trained models)``. ``initial`` (pre-trained models) needs a single seed.

    ``executor=None``: trained here, one after the other. ``"kernel"`` or ``"processes"``: every (model, seed) run
    through the workbook's run store (:func:`tokenbook.runs.launch`, trainer :func:`train_run`): trained once
    (``processes``: side by side, the cores divided among the processes) and read back by every later execution
    with nothing changed; the same numbers as ``None`` (:func:`train_run` repeats :func:`train_models`' steps). The
    models are rebuilt from the stored weights (CPU, eval mode). ``also``: more run specs launched in the same call
    (e.g. :func:`claim_arm_specs`, so that the processes stay busy); ``launched`` receives the store's records;
    ``launch_kw`` (``workers``, ``store``, submitit's ``cluster``, ``resources``, ``wait``) go to the launcher.
    ``pretrained`` (label -> :func:`pretrain_runs`' ref): those models are fine-tuned from their stored pre-training,
    one stored run per seed (:func:`finetune_spec`). Pre-trained ``initial`` models are live objects and train here
    whatever ``executor`` says."""
    from tokenbook.data import make_loaders

    if initial and len(seeds) > 1:
        raise ValueError(f"pre-trained initial models are one training; use one seed, not {list(seeds)}")
    if pretrained and (executor is None or initial):
        raise ValueError("stored pre-trainings are fine-tuned through the run store: pass an executor, not initial")
    if executor is not None and not initial:
        return _train_seeds_stored(models, bundle, batch_size, cfg, seeds, num_workers, latency, latency_batch,
                                   latency_device, min_run_time, executor, also, launched, launch_kw, pretrained)
    frames, hist, first = [], {}, {}
    for i, s in enumerate(seeds):
        tl, vl = make_loaders(bundle, batch_size, num_workers=num_workers, seed=s)
        summary, h, trained = train_models(models, tl, vl, replace(cfg, seed=s), bundle, seed=s,
                                           latency=latency and i == 0, latency_batch=latency_batch,
                                           latency_device=latency_device, min_run_time=min_run_time,
                                           initial=initial)
        frames.append(summary.assign(seed=s))
        hist[s] = h
        if i == 0:
            first = trained
    return pd.concat(frames, ignore_index=True), hist, first


def seed_means(runs: pd.DataFrame, by: str = "model") -> pd.DataFrame:
    """One row per ``by`` value: the mean over seeds of every numeric column (``seed`` dropped), the number of seeds
    and the standard deviation of the top-1 columns; text columns from the first row."""
    keys = [by] if isinstance(by, str) else list(by)
    num = [c for c in runs.select_dtypes("number").columns if c != "seed" and c not in keys]
    rows = []
    for _, g in runs.groupby(keys, sort=False):
        row = g.iloc[0].drop(labels=["seed"], errors="ignore").to_dict()
        row.update({c: g[c].mean() for c in num})
        row["n_seeds"] = len(g)
        for c in ("top1", "top1_memory", "top1_process"):
            if c in g and g[c].notna().any():
                row[f"{c}_sd"] = float(g[c].std(ddof=1)) if g[c].notna().sum() > 1 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def run_claim_arms(base_model: str, base_kwargs: dict, bundle, batch_size: int, cfg: TrainConfig,
                   seeds: Sequence[int] | Mapping[str, Sequence[int]], num_workers: int = 0,
                   cache: Optional[dict] = None, arms: Optional[Sequence[str]] = None, executor: Optional[str] = None,
                   launched: Optional[list] = None, **launch_kw: Any
                   ) -> tuple[pd.DataFrame, dict[tuple[int, str], list[float]]]:
    """Every arm of :data:`CLAIM_ARMS` (or the subset ``arms``, e.g. :func:`claim_arm_names` of some claims)
    trained once per seed (seeded loaders, init and run; same images for every seed; ``seeds`` may be ``{arm:
    seeds}``, :func:`claim_arm_seeds`, for an arm to train only its own). Returns the long table, one
    row per (seed, arm) with the :func:`run_ablation` columns, and the validation curves of the memory head
    ``{(seed, arm): [top-1 per evaluation]}``. Pass the ``cache`` on to :func:`run_ablation` so that the other
    settings of one seed reuse these runs. ``executor`` (``"kernel"`` / ``"processes"``): every (arm, seed) run
    comes from the run store, all seeds in one launch (:func:`store_runs_into_cache`); ``launched`` receives the
    store's records."""
    from tokenbook.data import make_loaders

    cache = {} if cache is None else cache
    chosen = list(CLAIM_ARMS) if arms is None else list(arms)
    unknown = [a for a in chosen if a not in CLAIM_ARMS]
    if unknown:
        raise ValueError(f"unknown claim arms {unknown}; choose from {list(CLAIM_ARMS)}")
    arms_of: dict[str, dict[str, str]] = {}
    for arm, (study, setting) in CLAIM_ARMS.items():
        if arm in chosen:
            arms_of.setdefault(study, {})[setting] = arm
    if executor is not None:
        store_runs_into_cache(cache, base_model, _claim_jobs(base_kwargs, bundle.config.img_size, bundle.num_classes,
                                                             seeds, chosen),
                              bundle.config, cfg, batch_size, num_workers, executor, launched=launched, **launch_kw)
    per = _per_arm_seeds(seeds, chosen)
    frames, got = [], {}
    for s in sorted({s for a in chosen for s in per[a]}):
        tl, vl = (None, None) if executor is not None else make_loaders(bundle, batch_size, num_workers=num_workers,
                                                                         seed=s)
        for study, arms_ in arms_of.items():
            here = {setting: arm for setting, arm in arms_.items() if s in per[arm]}
            if here:
                df = run_ablation(study, base_model, base_kwargs, tl, vl, cfg, bundle, labels=list(here), seed=s,
                                  cache=cache, curves=got)
                df.insert(0, "arm", df["setting"].map(here))
                frames.append(df)
    curves = {(seed, arms_of[study][setting]): c for (seed, study, setting), c in got.items()}
    return pd.concat(frames, ignore_index=True), curves


def judge_heldout(runs: Optional[pd.DataFrame], arm_runs: Optional[pd.DataFrame], launched: Sequence[Any],
                  heldout_bundle, arm_jobs: Sequence[tuple[str, dict, int]] = (), base_model: str = ""
                  ) -> tuple[Optional[pd.DataFrame], Optional[pd.DataFrame]]:
    """Section 2's rows (``runs`` of :func:`train_seeds`, found by their run label) and the claim arms' rows
    (``arm_runs`` of :func:`run_claim_arms`, found by ``arm_jobs``' model config and seed, :func:`_claim_jobs`)
    with every stored run (``launched``) evaluated once more on every held-out image: ``top1`` (ViTTM: the memory
    head), ``top1_memory`` and ``top1_process`` become the held-out values, the subset's move to ``val_subset_*``
    columns. Returns the two new tables; the curves are untouched."""
    from tokenbook.experiments.vittm_runs import _rebuild
    from tokenbook.heldout import evaluate_runs

    def build(run):
        return _rebuild(run.spec.args["model_name"], run.spec.args["model_kwargs"], run.output)

    label = {r.spec.label: r.key for r in launched}
    cfg = {}
    for r in launched:
        if r.spec.args.get("model_name") == base_model:
            cfg.setdefault((_config_key(create(base_model, meta=True, **r.spec.args["model_kwargs"])),
                            int(r.spec.args["train"]["seed"])), r.key)
    run_keys = [] if runs is None else [label.get(f"{m} seed {s}") for m, s in zip(runs["model"], runs["seed"])]
    arm_keys = []
    if arm_runs is not None and len(arm_runs):
        job = {(a, s): (_config_key(create(base_model, meta=True, **kw)), s) for a, kw, s in arm_jobs}
        arm_keys = [cfg.get(job.get((a, int(s)))) for a, s in zip(arm_runs["arm"], arm_runs["seed"])]
    if None in run_keys + arm_keys:
        raise ValueError(f"no stored run for {(run_keys + arm_keys).count(None)} row(s): the held-out judgement "
                         "needs every row's run in the store")
    need = set(run_keys + arm_keys)
    got = evaluate_runs([r for r in launched if r.key in need], heldout_bundle, build)
    cols = ["top1", "top1_memory", "top1_process"]

    def swap(df: pd.DataFrame, keys: list) -> pd.DataFrame:
        df = df.copy()
        for c in cols:
            if c in df:
                df[f"val_subset_{c}"] = df[c]
                df[c] = [got[k].get(c) for k in keys]  # a single-head ViT has no top1_memory
        if "top1_memory" in df and "headline_head" in df:  # ViTTM rows: the headline is the memory head
            df["top1"] = [m if h == "memory" else t for m, t, h in zip(df["top1_memory"], df["top1"],
                                                                        df["headline_head"])]
        return df

    if runs is not None:
        runs = swap(runs, run_keys)
    if arm_keys:
        arm_runs = swap(arm_runs, arm_keys)
    return runs, arm_runs


def _per_arm_seeds(seeds: Sequence[int] | Mapping[str, Sequence[int]], arms: Sequence[str]) -> dict[str, list[int]]:
    """``{arm: seeds}`` from one seed list for every arm or from a mapping that names every arm."""
    per = seeds if isinstance(seeds, Mapping) else dict.fromkeys(arms, seeds)
    if any(a not in per for a in arms):
        raise ValueError(f"no seeds given for the claim arms {[a for a in arms if a not in per]}")
    return {a: [int(s) for s in per[a]] for a in arms}


def _claim_jobs(base_kwargs: dict, img_size: int, num_classes: int, seeds: Sequence[int] | Mapping[str, Sequence[int]],
                arms: Sequence[str]) -> list[tuple[str, dict, int]]:
    """``(label, model kwargs, seed)`` of every claim-arm run of :func:`run_claim_arms`, seeds outermost."""
    per = _per_arm_seeds(seeds, [a for a in CLAIM_ARMS if a in arms])
    return [(f"{arm}", {**base_kwargs, **ablation_configs(study, img_size)[setting], "num_classes": num_classes}, s)
            for s in sorted({s for v in per.values() for s in v}) for arm, (study, setting) in CLAIM_ARMS.items()
            if arm in per and s in per[arm]]


def plot_claim_arms(summary: pd.DataFrame, title: str = ""):
    """Bars: mean top-1 of both heads per claim arm over the seeds, with the standard deviation as error bars."""
    import matplotlib.pyplot as plt

    n = len(summary)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * n + 2.5), 3.4))
    x = np.arange(n)
    w = 0.38
    for off, head in ((-w / 2, "memory"), (w / 2, "process")):
        ax.bar(x + off, summary[f"top1_{head}"].astype(float), w, yerr=summary[f"top1_{head}_sd"].astype(float),
               capsize=2, label=f"{head} head")
    vals = pd.concat([summary["top1_memory"], summary["top1_process"]]).astype(float)
    ax.set_ylim(max(0.0, float(vals.min()) - 8.0), min(100.0, float(vals.max()) + 5.0))
    ax.set_xticks(x, summary["arm"], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("val top-1 (%), mean +- sd over seeds")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title or f"claim arms, {int(summary['n_seeds'].min())} seeds each", fontsize=9)
    fig.tight_layout()
    return fig


def interleaved_latency(vit: str = "ViT-B/16", ttm: str = "ViTTM-B", img_size: int = 224, batch_size: int = 4,
                        device: str = "cpu", repeats: int = 9, warmup: int = 1, inner: int = 1,
                        models: Optional[Mapping[str, tuple[str, dict]]] = None) -> dict:
    """Latency of ``vit`` over ``ttm`` timed interleaved (:func:`tokenbook.bench.interleaved_ratio`): fp32,
    ``eval``, ``no_grad``, random input, both ViTTM heads computed (as the official ``benchmark.py`` and
    :func:`efficiency_table`). Returns the median ratio, its IQR, each model's median ms and the settings."""
    models = dict(models or EFFICIENCY_MODELS)
    seed_everything(0)
    a = create(models[vit][0], **models[vit][1]).to(device).eval()
    b = create(models[ttm][0], **models[ttm][1]).to(device).eval()
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    with torch.no_grad(), all_heads(b):
        r = bench.interleaved_ratio(lambda: a(x), lambda: b(x), repeats=repeats, warmup=warmup, inner=inner,
                                    device=device)
    del a, b
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
    return {"pair": f"{vit} / {ttm}", **r, "img_size": img_size, "batch": batch_size, "device": str(device),
            "threads": torch.get_num_threads(), "dtype": "fp32"}


def _per_seed(runs: pd.DataFrame, key: str, value: str) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for _, r in runs.iterrows():
        if pd.notna(r[value]):
            out.setdefault(int(r["seed"]), {})[r[key]] = float(r[value])
    return out


def efficiency_evidence(eff: pd.DataFrame, latency: Optional[Mapping[str, Any]] = None) -> list:
    """Evidence of ``vittm.macs_ratio`` (GMACs of ViT-B/16 over ViTTM-B, efficiency table) and, with ``latency``
    (:func:`interleaved_latency`), of ``vittm.latency_ratio``."""
    from tokenbook.claims import Evidence

    out = []
    e = eff.set_index("model")
    if {"ViT-B/16", "ViTTM-B"} <= set(e.index):
        out.append(Evidence("vittm.macs_ratio", value=float(e.at["ViT-B/16", "gmacs"] / e.at["ViTTM-B", "gmacs"]),
                            scale="224 px, batch 1, attention counted (architecture: no training)",
                            detail=f"{e.at['ViT-B/16', 'gmacs']:.3f} / {e.at['ViTTM-B', 'gmacs']:.3f} GMACs"))
    if latency:
        r = latency
        out.append(Evidence("vittm.latency_ratio", ratio=float(r["ratio"]), q1=float(r["q1"]), q3=float(r["q3"]),
                            scale=f"{r['device']}, {r['threads']} threads, batch {r['batch']}, {r['img_size']} px, "
                                  f"{r['dtype']}; {r['repeats']} interleaved repeats",
                            detail=f"{r['pair']}: {r['a_ms']:.1f} ms / {r['b_ms']:.1f} ms (medians)"))
    return out


def floor_rows(runs: pd.DataFrame, key: str = "model", value: str = "top1") -> list[dict]:
    """One row per model (``key``) of :func:`train_seeds` or :func:`run_claim_arms` for
    :func:`tokenbook.floors.beside_floors`: mean and worst-seed ``value`` (the memory head for a ViTTM), parameters
    and mean training seconds."""
    from tokenbook.floors import arm_row

    return [arm_row(name, g[value].tolist(), int(g["params_total"].iloc[0]), g["train_wall_s"].tolist())
            for name, g in runs.groupby(key, sort=False)]


def beats_vit_evidence(runs: pd.DataFrame, histories: Mapping[int, Mapping[str, pd.DataFrame]], vittm: str, vit: str,
                       scale: str, floors: Any = None) -> list:
    """Evidence of ``vittm.beats_vit`` from :func:`train_seeds`: the ViTTM's ``top1`` (memory head) against the
    ViT's, paired by seed; the plateau note from both models' validation curves (ViTTM: memory head)."""
    from tokenbook.claims import paired_evidence

    curves = [h[m][col].dropna().tolist() for h in histories.values()
              for m, col in ((vittm, "val_top1_memory"), (vit, "val_top1")) if m in h and col in h[m]]
    return [paired_evidence("vittm.beats_vit", _per_seed(runs, "model", "top1"), vittm, vit, scale=scale,
                            curves=curves, detail=f"{vittm} (memory head) vs {vit}", floors=floors)]


def ablation_evidence(runs: pd.DataFrame, curves: Mapping[tuple[int, str], Sequence[float]], scale: str,
                      floors: Any = None) -> list:
    """Evidence of ``vittm.linear_heads``, ``vittm.add_fusion`` and ``vittm.no_memory_processing`` from
    :func:`run_claim_arms` (memory head, paired by seed). Where the claim's b is "the best of" several arms, the arm
    with the highest mean top-1 over the same seeds is taken (named in ``detail``). Plateau notes from every run
    behind the claim."""
    from tokenbook.claims import paired_evidence

    per_seed = _per_seed(runs, "arm", "top1_memory")
    means = runs.groupby("arm")["top1_memory"].mean()
    out = []
    for claim, (a, candidates) in CLAIM_ARM_SETS.items():
        have = [c for c in candidates if c in means.index]
        if a not in means.index or not have:
            continue
        b = max(have, key=lambda c: means[c])
        detail = "b = " + b + (" (best mean of " + ", ".join(f"{c} {means[c]:.2f}" for c in have) + ")"
                               if len(have) > 1 else "") + f"; a mean {means[a]:.2f}"
        used = [c for (s, arm), c in curves.items() if arm in (a, *have)]
        out.append(paired_evidence(claim, per_seed, a, b, scale=scale, curves=used, detail=detail, floors=floors))
    return out


# ----------------------------------------------------------------------------------------------------------
# The runs the notebook asks the run store for (the store's trainer and specs: tokenbook.experiments.vittm_runs)
# ----------------------------------------------------------------------------------------------------------
def ablation_setup(params: Mapping[str, Any]) -> tuple[Any, TrainConfig, dict]:
    """The ablation runs' data config (``ablation_train_subset`` / ``ablation_val_subset`` of the notebook's data;
    equal to section 2's when the sizes are), train config (``ablation_epochs``, ``ablation_lr``, no EMA) and base
    model kwargs (``ablation_embed_dim``, ``ablation_depth``)."""
    p = params
    dcfg = p.data_config(train_subset=p["ablation_train_subset"] or None, val_subset=p["ablation_val_subset"] or None)
    cfg = make_train_config(p, "", epochs=p["ablation_epochs"], lr=p["ablation_lr"], ema_decay=0.0, progress=False)
    return dcfg, cfg, dict(embed_dim=p["ablation_embed_dim"], depth=p["ablation_depth"], img_size=p["img_size"])


def claim_arm_specs(params: Mapping[str, Any], num_classes: int, seeds: Sequence[int]) -> list:
    """The run specs of the claim arms that :func:`run_claim_arms` asks the store for under ``params``
    (``ablation_claims``, ``ablation_claim_ids``, :func:`ablation_setup`), for launching them early together with
    section 2's runs (:func:`train_seeds` ``also``); empty without ``ablation_claims``."""
    p = params
    if not p["ablation_claims"]:
        return []
    dcfg, cfg, base = ablation_setup(p)
    return [run_spec(p["model_name"], args, dcfg, replace(cfg, seed=seed), p["batch_size"], p["num_workers"],
                     label=f"{label} seed {seed}")
            for label, args, seed in _claim_jobs(base, p["img_size"], num_classes, seeds,
                                                 claim_arm_names(p["ablation_claim_ids"]))]


# ----------------------------------------------------------------------------------------------------------
# GPU budget: this notebook's loops for tokenbook.gpu_budget (an ESTIMATE; the engine is in the core)
# ----------------------------------------------------------------------------------------------------------
def gpu_loops(params: Mapping[str, Any]) -> list:
    """This notebook's training loops under ``params`` as :class:`tokenbook.gpu_budget.Loop` rows (what
    :func:`tokenbook.gpu_budget.estimate` costs): section 2's two models x seeds, the ablations' claim arms x seeds
    and their other settings with the first seed (each configuration once per seed), the latency benchmarks."""
    import tokenbook.models  # noqa: F401  (registers vittm_* and the ViTs)
    from tokenbook import gpu_budget as G
    from tokenbook.claims import parse_seeds

    p, nb = params, "01_vittm"
    img, name, (n, nv), seeds = p["img_size"], p["model_name"], G.fm_sizes(p), list(parse_seeds(p["seeds"]))
    S, w, b = len(seeds), p["num_workers"], p["batch_size"]  # the loaders' batch, also under a recipe
    cfg = make_train_config(p, p["recipe"])
    dp = dict(drop_path_rate=p["drop_path_rate"], num_classes=10, img_size=img)
    loops = [G.timm_loop(nb, f"section 2: {name} x {S} seeds", name, dict(dp, **({"embed_dim": p["embed_dim"]} if
                         p["embed_dim"] else {})), img, **G.fit_fields(cfg, n, nv, w, S, b)),
             G.timm_loop(nb, f"section 2: {p['vit_name']} x {S} seeds", p["vit_name"], dp, img,
                         **G.fit_fields(cfg, n, nv, w, S, b))]
    if p["pretrain_dataset"]:
        loops.append(G.not_charged(nb, "pre-training stage", "its dataset's size is unknown here"))
    # ablations: the claim arms for every seed, the studies' other settings with the first seed; a configuration
    # already trained for a seed is reused (the notebook's shared cache, keyed by _config_key)
    ab = make_train_config(p, "", epochs=p["ablation_epochs"], lr=p["ablation_lr"], ema_decay=0.0, progress=False)
    base, seen, todo = dict(embed_dim=p["ablation_embed_dim"], depth=p["ablation_depth"], img_size=img,
                            num_classes=10), set(), {}
    studies = list(p["ablation_studies"])
    labels = {"head_fusion": [f"{h}+{f}" for h in p["ablation_heads"] for f in p["ablation_fusions"]],
              "patch_sizes": list(p["ablation_patch_sizes"]) or None}

    def add(kw: dict, seed: int, part: str) -> None:
        args = {**base, **kw}
        key = (_config_key(create(name, **args)), seed)
        if key not in seen:
            seen.add(key)
            todo.setdefault((part, G.freeze(args)), [args, 0])[1] += 1
    arms = claim_arm_names(p.get("ablation_claim_ids")) if p["ablation_claims"] else []
    for s in seeds:
        for arm in arms:
            study, setting = CLAIM_ARMS[arm]
            add(ablation_configs(study, img)[setting], s, f"ablations: claim arms x {S} seeds")
    for study in studies:
        cfgs = ablation_configs(study, img)
        for label in labels.get(study) or list(cfgs):
            add(cfgs[label], seeds[0], f"ablations: other settings of {', '.join(studies)} (seed {seeds[0]})")
    na, nva = G.fm_sizes(p, "ablation_train_subset", "ablation_val_subset")
    loops += [G.timm_loop(nb, part, name, args, img, **G.fit_fields(ab, na, nva, w, runs, b))
              for (part, _), (args, runs) in todo.items()]
    if p["latency"]:
        models = len(p["eff_models"])
        loops += [G.latency_loop(nb, "efficiency table", models, p["latency_min_run_time"]),
                  G.latency_loop(nb, "section 2 models, first seed", 2, p["latency_min_run_time"])]
    if p["latency_repeats"]:
        loops.append(G.not_charged(nb, "latency claim: ViT-B/16 vs ViTTM-B interleaved",
                                   f"2 x {p['latency_repeats']} fp32 forwards at batch {p['latency_batch']}: seconds"))
    return loops
