"""Notebook helpers for ``03_toe`` (ToE, Token Expansion): schedule/compute tables, the with/without-ToE training
comparison, overhead tables, figures. The method itself lives in :mod:`tokenbook.methods.toe`, the
registered ``toe_deit_*`` models in :mod:`tokenbook.models.toe`.

- :func:`trace_token_selection` / :class:`SelectionTrace`: which patches one forward selected, added and merged.
- :func:`measure_token_select_overhead`: interleaved timing of a stage step with and without the selection.

- :func:`schedule_tables` / :func:`efficienttrain_table`: kept tokens and MACs per stage for DeiT-T/S/B (and LV-ViT-S)
  under the official configurations, epoch-weighted savings (sheet sections 1.4 and 3.3).
- :func:`headline_comparison`: our computed or measured speed-ups next to the paper's "about 1.3x".
- :func:`toe_config` / :func:`train_config`: notebook parameters -> ``TokenSelect`` arguments (stage boundaries scaled
  to the run's epochs) and a :class:`~tokenbook.train.TrainConfig`.
- :func:`train_pair`: the same model trained with and without ToE from the same seed (same init, same data order),
  ToE stages switched by :class:`~tokenbook.methods.toe.ToEStageHook`, evaluation always full-token.
- :func:`run_summary`, :func:`speedup_table`, :func:`stage_step_table`, :func:`overhead_table`: the measured numbers.
- claims ledger (issue 12): :func:`train_seeds` (``train_pair`` per seed, paired by seed; in the kernel, or one
  run-store entry per (arm, seed) through :mod:`tokenbook.runs`: :func:`arm_spec`, :func:`train_arm_run`,
  :func:`rebuild_arm`, :func:`launch_options`), :func:`per_seed`,
  :func:`top1_seeds_table` (mean and 95 % t-interval over the seeds), :func:`val_curves` (for the plateau note),
  :func:`interleaved_step_speedup` / :func:`overhead_repeats_table` (per-repeat epoch-weighted speed-up, median and
  IQR), :func:`removable_at_test` (ToE model in ``eval()`` vs. the plain ViT).
- :func:`plot_token_selection`, :func:`plot_keep_schedule`: the figures.

Size: about 1,050 lines, over the ~800 guide: one notebook's helpers (tables, timing, figures, the selection trace,
the claims evidence) that share the ToERun/overhead structures. One arm's training body (``_fit_arm``, ``_fit``), its
store spec, trainer and rebuild are :mod:`tokenbook.experiments.toe_runs` (re-exported), so that the runs' code
version leaves this module out; split the rest by the notebook's sections if it grows.
"""
from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Sequence

import pandas as pd
import torch
import torch.nn as nn

from tokenbook.methods import toe
from tokenbook.methods.toe import _forced_stage, find_token_selects
from tokenbook.results import NA
from tokenbook.params import LaunchParams, SeedPlanParams
from tokenbook.params import as_list, param


# ----------------------------------------------------------------------------------------------------------
# parameters: the notebook's parameters cell is generated from this class (python -m tokenbook.params --sync)
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Params(LaunchParams, SeedPlanParams):  # launcher and seed-plan fields from the bases (tokenbook.params)
    """The parameters of notebooks/03_toe.ipynb (its parameters cell is generated from this class)."""

    NOTEBOOK: ClassVar[str] = "03_toe"
    #: run_all.sh --proof: one CPU process (bf16-mixed: 16-mixed needs CUDA), two seeds, a CPU batch, the shortest
    #: overhead timing (3 repeats: its IQR needs them), the runs in the kernel
    PROOF: ClassVar[dict] = {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "strategy": "auto",
                             "precision": "bf16-mixed", "seeds": [3407, 0], "batch_size": 4, "num_workers": 0,
                             "overhead_batch": 2, "overhead_steps": 3, "overhead_warmup": 0, "num_figure_images": 2,
                             "executor": "kernel"}

    seed: int = param(0, "seed of the data subset (fixed for all seeds) and of the set-up cells [0, inf)")
    seeds: list[int] = param([0, 1, 2], "training seeds; per seed both runs share init weights and batches")
    dataset: str = param("fashion_mnist", "fashion_mnist | folder:<path> | hf:<id>")
    data_dir: str = param(
        "", "Fashion-MNIST IDX folder; empty: $TOKENBOOK_FASHION_MNIST, Debian package, then the hub", none="")
    img_size: int = param(32, "model input side; 32 px with patch 4 gives 64 patch tokens [1, inf)")
    train_subset: int = param(6000, "training images, class-balanced; 0 means all [0, inf)", none=0)
    val_subset: int = param(2000, "validation images; 0 means all [0, inf)", none=0)
    preset: str = param("none", "per-sample augmentation preset, see tokenbook.data.PRESETS; deit for ImageNet")
    model_name: str = param("vit_fm_tiny_p4_32", "timm model trained with and without ToE")
    drop_path_rate: float = param(0.0, "stochastic depth of the model [0, 1)")
    epochs: int = param(6, "training epochs of each run [1, inf)")
    batch_size: int = param(128, "per-device batch size [1, inf)")
    lr: float = param(0.002, "peak learning rate of AdamW (0, inf)")
    weight_decay: float = param(0.05, "AdamW weight decay [0, inf)")
    warmup_epochs: float = param(1.0, "linear warmup, in epochs [0, inf)")
    warmup_lr: float = param(1e-06, "learning rate at the start of the warmup [0, inf)")
    min_lr: float = param(1e-05, "final learning rate of the cosine schedule [0, inf)")
    mixup: float = param(0.0, "mixup alpha; 0 is off [0, inf)")
    cutmix: float = param(0.0, "cutmix alpha; 0 is off [0, inf)")
    label_smoothing: float = param(0.0, "label smoothing [0, 1)")
    clip_grad: float = param(0.0, "max gradient norm; 0 is off [0, inf)")
    ema_decay: float = param(0.0, "EMA decay of the weights; 0 turns EMA off [0, 1)")
    max_steps_per_epoch: int = param(0, "cut epochs short; 0 means full epochs [0, inf)", none=0)
    num_workers: int = param(0, "DataLoader workers [0, inf)")
    accelerator: str = param("auto", "cpu | cuda | auto")
    devices: int = param(1, "devices for training [1, inf)")
    num_nodes: int = param(1, "nodes for training [1, inf)")
    strategy: str = param("auto", "Fabric strategy; ddp_notebook for several GPUs from a notebook kernel")
    precision: str = param("32-true", "32-true | bf16-mixed | 16-mixed")
    run_baseline: bool = param(True, "also train the full-token baseline; needed for the speed-up")
    fit_floors: bool = param(True, "also fit the reference floors on the same split: logistic regression on pixels, "
                             "a small CNN")
    floor_cnn_epochs: int = param(10, "epochs of the small-CNN floor [1, inf)")
    judge_heldout: bool = param(False, "judge the claims and the floors on every held-out image of the classes "
                                       "(tokenbook.heldout: each stored model evaluated once more, full tokens); the "
                                       "curves stay on val_subset; no effect when val_subset is all")
    expansion_step: list[int] = param([0, 100, 200], "stage start epochs of an official_epochs run")
    official_epochs: int = param(300, "run length expansion_step refers to; stages are scaled to epochs [1, inf)")
    keep_rate: list[float] = param([0.5, 0.75, 1.0], "kept fraction of patch tokens per stage")
    initialization_keep_rate: float = param(0.25, "r0, fraction of seed tokens (0, 1]")
    expansion_multiple_stage: int = param(2, "k, greedy sub-steps per stage [1, inf)")
    distance: str = param("cosine", "cosine | euclidean | manhattan | euclidean_corrected | manhattan_corrected")
    seed_stride: str = param("official", "official int of 1 floor-divided by r0 | corrected | uniform")
    toe_block_index: int = param(0, "ToE runs on the output of this block [0, inf)")
    overhead_batch: int = param(128, "batch of the interleaved overhead timing [1, inf)")
    overhead_steps: int = param(5, "timed steps per variant in the overhead timing [1, inf)")
    overhead_warmup: int = param(2, "untimed warmup steps per variant [0, inf)")
    num_figure_images: int = param(4, "images in the token-selection figure [1, inf)")

__all__ = [
    "SelectionTrace", "trace_token_selection", "measure_token_select_overhead",
    "MODEL_LABELS", "parse_list", "rates_label", "toe_config", "train_config", "schedule_tables",
    "efficienttrain_table", "reference_comparison", "headline_comparison", "ToERun", "train_pair", "run_summary", "speedup_table",
    "stage_step_table", "overhead_table", "expected_step_speedup", "interleaved_step_speedup",
    "overhead_repeats_table", "removable_at_test", "floor_rows", "judge_heldout", "train_seeds", "SeededToERuns", "arm_spec",
    "train_arm_run", "rebuild_arm", "launch_options", "per_seed", "val_curves", "top1_seeds_table",
    "plot_token_selection", "plot_keep_schedule", "verdict",
]

MODEL_LABELS = {"deit_tiny": "DeiT-T", "deit_small": "DeiT-S", "deit_base": "DeiT-B", "lvvit_small": "LV-ViT-S"}
#: official configuration name -> the run script it comes from (sheet section 2)
CONFIG_SOURCES = {"deit_small": "ToE/deit/run/imagenet_small_run1.sh", "lvvit_small": "ToE/lvvit/run/imagenet_small_run1.sh",
                  "efficienttrain": "ToE/EfficientTrain/run/imagenet_small_run1.sh"}


# ----------------------------------------------------------------------------------------------------------
# parameters
# ----------------------------------------------------------------------------------------------------------
def parse_list(values: Sequence, typ: type = float, what: str = "the list") -> list:
    """``[0, 100, 200]`` typed with ``typ``; clear error on bad input (a string is refused: use a list)."""
    items = as_list(values, what)
    try:
        out = [typ(float(s)) if typ is int else typ(s) for s in items]
    except (TypeError, ValueError) as e:
        raise ValueError(f"cannot read {what} {values!r} as a list of {typ.__name__}") from e
    if not out:
        raise ValueError(f"{what} is empty")
    return out


def rates_label(keep_rate: Sequence[float]) -> str:
    """``(0.5, 0.75, 1.0)`` -> ``"0.5/0.75/1.0"`` (the labels of the references file)."""
    return "/".join(str(float(r)) for r in keep_rate)


def toe_config(params: dict, epochs: Optional[int] = None) -> dict[str, Any]:
    """``TokenSelect`` keyword arguments from notebook parameters.

    ``expansion_step`` is given in epochs of an ``official_epochs`` run (``"0,100,200"`` of 300) and scaled to
    ``epochs`` (default ``params["epochs"]``) with :func:`tokenbook.methods.toe.scale_expansion_step`; equal epochs keep it.
    """
    epochs = int(params["epochs"] if epochs is None else epochs)
    steps = parse_list(params["expansion_step"], int, "expansion_step")
    official = int(params.get("official_epochs", epochs))
    if official != epochs:
        steps = toe.scale_expansion_step(steps, epochs, official)
    cfg = dict(expansion_step=steps, keep_rate=parse_list(params["keep_rate"], float, "keep_rate"),
               initialization_keep_rate=float(params["initialization_keep_rate"]),
               expansion_multiple_stage=int(params["expansion_multiple_stage"]),
               distance=str(params.get("distance", "cosine")), seed_stride=str(params.get("seed_stride", "official")))
    toe.TokenSelect(**cfg)  # validates
    return cfg


def train_config(params: dict, **overrides: Any):
    """A :class:`~tokenbook.train.TrainConfig` from notebook parameters (0 means off for ``clip_grad`` and
    ``max_steps_per_epoch``)."""
    from tokenbook.train import TrainConfig

    kw = dict(params)
    for k in ("clip_grad", "max_steps_per_epoch"):
        if k in kw and not kw[k]:
            kw[k] = None
    kw.setdefault("progress", False)
    return TrainConfig.from_params(kw, **overrides)


def launch_options(p: "Params") -> dict:
    """The :func:`train_seeds` keywords that say where the runs train
    (:meth:`tokenbook.params.LaunchParams.launch_options`: ``executor`` and, for submitit, the job resources)."""
    return p.launch_options()


# ----------------------------------------------------------------------------------------------------------
# schedule and compute (analytic, sheet 1.4 and 3.3)
# ----------------------------------------------------------------------------------------------------------
def _cfg(name: str) -> dict[str, Any]:
    c = dict(toe.OFFICIAL_CONFIGS[name])
    c.pop("distance", None)
    return c


def schedule_tables(models: Sequence[str] = ("deit_tiny", "deit_small", "deit_base"),
                    configs: Sequence[str] = ("deit_small", "efficienttrain", "lvvit_small"),
                    extra: Sequence[tuple[str, str]] = (("lvvit_small", "lvvit_small"),),
                    num_patches: int = 196) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Kept tokens and forward MACs per stage for every (model, official configuration), 224 px (N = 196).

    Returns ``(stages, summary)``. ``stages``: one row per stage (epochs, seeds, sub-steps, kept patches, sequence
    length after the insertion point, merged tokens, block GMACs, whole-model GMACs and GFLOPs, MACs relative to
    full). ``summary``: one row per (model, configuration) with the columns the references use
    (``kept_patches_stage{s}``, ``block_gmacs_stage{s}``, ``epoch_avg_saving``) plus whole-model values.
    Blocks only is the sheet's convention; the whole model adds patch embedding and head.
    """
    pairs = [(m, c) for m in models for c in configs] + [p for p in extra if p not in [(m, c) for m in models
                                                                                     for c in configs]]
    srows, wrows = [], []
    for model, cname in pairs:
        cfg = _cfg(cname)
        epochs = cfg.pop("epochs")
        dims = toe.ViTDims.preset(model)
        rows = toe.toe_stage_macs(dims=dims, num_patches=num_patches, total_epochs=epochs, **cfg)
        full_block = max(r["block_macs"] for r in rows)
        label = f"{MODEL_LABELS[model]} ToE {rates_label(cfg['keep_rate'])}"
        wide = {"model": label, "config": cname, "source": CONFIG_SOURCES[cname], "r0": cfg["initialization_keep_rate"],
                "k": cfg["expansion_multiple_stage"]}
        for r in rows:
            srows.append({
                "model": label, "config": cname, "stage": r["stage"], "epochs": f"{r['first_epoch']}-{r['last_epoch']}",
                "n_epochs": r["epochs"], "active": r["active"], "seeds": r["seeds"] if r["active"] else NA,
                "substeps": "+".join(str(a) for a in r["substeps"]) if r["active"] else NA,
                "kept_patches": r["kept_patches"], "seq_len": r["seq_len"], "merged": r["merged"],
                "block_gmacs": r["block_macs"] / 1e9, "gmacs": r["macs"] / 1e9, "gflops": 2 * r["macs"] / 1e9,
                "rel_block_macs": r["block_macs"] / full_block})
            wide[f"kept_patches_stage{r['stage']}"] = r["kept_patches"]
            wide[f"block_gmacs_stage{r['stage']}"] = r["block_macs"] / 1e9
            wide[f"gmacs_stage{r['stage']}"] = r["macs"] / 1e9
        blocks = toe.epoch_weighted_saving(rows, "block_macs")
        whole = toe.epoch_weighted_saving(rows, "macs")
        wide.update(avg_block_gmacs=blocks["average"] / 1e9, epoch_avg_saving=blocks["saving"],
                    avg_gflops=2 * whole["average"] / 1e9, epoch_avg_saving_whole_model=whole["saving"])
        wrows.append(wide)
    return pd.DataFrame(srows), pd.DataFrame(wrows)


def efficienttrain_table(models: Sequence[str] = ("deit_tiny", "deit_small")) -> pd.DataFrame:
    """EfficientTrain (ET) alone, ET + ToE and ToE on top of ET: epoch-weighted block-MAC savings vs. full-token
    224 px training (sheet 3.3), rows labelled as in the references file."""
    cfg = {k: v for k, v in _cfg("efficienttrain").items() if k in ("keep_rate", "initialization_keep_rate")}
    rows = []
    for m in models:
        dims, lab = toe.ViTDims.preset(m), MODEL_LABELS[m]
        full = toe.segment_weighted_macs(dims, [(300, 224, 0)], **cfg)["average"]
        plain = toe.segment_weighted_macs(dims, [(180, 160, 0), (60, 192, 0), (60, 224, 0)], **cfg)["average"]
        both = toe.segment_weighted_macs(dims, toe.EFFICIENTTRAIN_SEGMENTS, **cfg)["average"]
        rows.append({"model": f"{lab} EfficientTrain", "avg_block_gmacs": plain / 1e9, "epoch_avg_saving": full / plain,
                     "saving_vs_efficienttrain": None})
        rows.append({"model": f"{lab} EfficientTrain+ToE", "avg_block_gmacs": both / 1e9,
                     "epoch_avg_saving": full / both, "saving_vs_efficienttrain": plain / both})
    return pd.DataFrame(rows)


def reference_comparison(ours: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """``paper_vs_ours`` against the ToE references plus a ``reference_kind`` column: ``computed`` values are the
    reference sheet's arithmetic from the official code (the paper's tables are not available), ``paper`` values are
    quoted from the paper."""
    from tokenbook.results import paper_vs_ours

    out = paper_vs_ours(ours, "toe", metrics=[m for m in metrics if m in ours.columns])
    out["reference_kind"] = [s[s.rfind("[") + 1:-1] if isinstance(s, str) and s.endswith("]") else NA
                             for s in out["paper_source"]]
    return out


def headline_comparison(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Our speed-ups next to the paper's "about 1.3x" (``paper_vs_ours`` on model ``ToE``, metric
    ``train_speedup``). ``rows``: ``{"what": description, "train_speedup": value}``."""
    from tokenbook.results import paper_vs_ours

    ours = pd.DataFrame([{"model": "ToE", **r} for r in rows])
    return paper_vs_ours(ours, "toe", metrics=["train_speedup"], label_col="what")


# ----------------------------------------------------------------------------------------------------------
# training with and without ToE
# ----------------------------------------------------------------------------------------------------------
# one arm of one seed, its store spec, trainer and rebuild live in toe_runs (re-exported): their code version
# leaves this module and the reports out
from tokenbook.experiments.toe_runs import (  # noqa: E402,F401
    TRAINER as ARM_TRAINER, ToERun, _fit, _fit_arm, arm_spec, build_model, rebuild_arm, train_arm_run,
)


def train_pair(model_name: str, train_loader: Any, val_loader: Any, cfg: Any, toe_kwargs: dict, *,
               preprocess: Optional[nn.Module] = None, block_index: int = 0, run_baseline: bool = True,
               model_kwargs: Optional[dict] = None) -> dict[str, ToERun]:
    """Train ``model_name`` without (``"full-token"``) and with ToE (``"ToE"``), one after the other in this process.

    Both runs start from the same seeded initialization (``cfg.seed``) and see the same batches (the engine seeds the
    data order per epoch); ToE's stage follows the epoch through :class:`~tokenbook.methods.toe.ToEStageHook`, and evaluation
    is full-token (ToE is off in ``eval()`` and in the EMA copy). Returns ``{label: ToERun}``.
    """
    kw = dict(preprocess=preprocess, block_index=block_index, model_kwargs=model_kwargs)
    runs: dict[str, ToERun] = {}
    if run_baseline:
        runs["full-token"] = _fit_arm(model_name, train_loader, val_loader, cfg, None, **kw)
    runs["ToE"] = _fit_arm(model_name, train_loader, val_loader, cfg, toe_kwargs, **kw)
    return runs


def run_summary(runs: dict[str, ToERun]) -> pd.DataFrame:
    """One row per run: final full-token top-1/top-5, losses, step time, training wall time (evaluation excluded),
    evaluation time and end-to-end wall time, all measured in this process."""
    rows = []
    for label, run in runs.items():
        f, t = run.result.final, run.result.timing
        rows.append({"run": label, "epochs": run.result.config.epochs, "steps": t["steps"],
                     "top1": f.get("val_top1"), "top5": f.get("val_top5"), "ema_top1": f.get("ema_top1"),
                     "final_train_loss": f.get("train_loss"), "step_time_s": t["step_time_s"], "step_ms": t["step_ms"],
                     "train_wall_s": t["wall_time_s"] - t["eval_time_s"], "eval_time_s": t["eval_time_s"],
                     "wall_time_s": t["wall_time_s"], "train_img_s": t["train_img_s"], "device": t["device"]})
    return pd.DataFrame(rows)


def speedup_table(summary: pd.DataFrame, target_speedup: float = 1.2, max_top1_drop: float = 0.5) -> pd.DataFrame:
    """Ratios full-token / ToE measured in the same run, the top-1 difference, and whether the issue's target
    (speed-up >= ``target_speedup`` at <= ``max_top1_drop`` points lost) is met for each time measure."""
    s = summary.set_index("run")
    if not {"full-token", "ToE"} <= set(s.index):
        return pd.DataFrame(columns=["measure", "full_token", "toe", "speedup", "top1_diff", "target_met"])
    full, t = s.loc["full-token"], s.loc["ToE"]
    diff = None if pd.isna(full["top1"]) or pd.isna(t["top1"]) else float(t["top1"] - full["top1"])
    rows = []
    for measure, col in (("step time (forward+backward+update, paper's convention)", "step_time_s"),
                         ("training wall time (data loading included, evaluation excluded)", "train_wall_s"),
                         ("end-to-end wall time (evaluation included)", "wall_time_s")):
        sp = float(full[col] / t[col]) if t[col] else None
        rows.append({"measure": measure, "full_token_s": float(full[col]), "toe_s": float(t[col]), "speedup": sp,
                     "top1_full": float(full["top1"]), "top1_toe": float(t["top1"]), "top1_diff": diff,
                     "target": f">= {target_speedup}x at <= {max_top1_drop} pt lost",
                     "target_met": bool(sp is not None and diff is not None and sp >= target_speedup
                                        and diff >= -max_top1_drop)})
    return pd.DataFrame(rows)


def stage_step_table(runs: dict[str, ToERun], macs_rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Per ToE stage of the run: epochs, kept tokens, analytic MAC ratio, and the measured ms per step of both runs
    (from the per-epoch step times) with their ratio."""
    toe_run = runs["ToE"]
    hist_t = toe_run.result.history.set_index("epoch")
    hist_f = runs["full-token"].result.history.set_index("epoch") if "full-token" in runs else None
    full_macs = max(r["macs"] for r in macs_rows)
    rows = []
    for r in macs_rows:
        epochs = [e for e, s, _ in toe_run.hook.history if s == r["stage"]]
        if not epochs:
            continue
        ep1 = [e + 1 for e in epochs]  # history epochs are 1-based

        def ms(h: Optional[pd.DataFrame]) -> Optional[float]:
            if h is None:
                return None
            sub = h.loc[[e for e in ep1 if e in h.index]]
            return 1e3 * float(sub["step_time_s"].sum()) / max(1, int(sub["steps"].sum()))

        mf, mt = ms(hist_f), ms(hist_t)
        rows.append({"stage": r["stage"], "epochs": ",".join(str(e) for e in ep1), "active": r["active"],
                     "kept_patches": r["kept_patches"], "seq_len": r["seq_len"], "gmacs": r["macs"] / 1e9,
                     "mac_ratio_full_over_stage": full_macs / r["macs"], "ms_per_step_full": mf, "ms_per_step_toe": mt,
                     "measured_ratio": (mf / mt) if mf and mt else None})
    return pd.DataFrame(rows)


def overhead_table(model: nn.Module, stages: Optional[Sequence[int]] = None, batch_size: int = 128, steps: int = 5,
                   warmup: int = 2, device: str = "cpu", input_size: Optional[Sequence[int]] = None) -> pd.DataFrame:
    """:func:`measure_token_select_overhead` for every active stage (interleaved timing of full-token,
    ToE and a truncation to the same token count, in one run): step times, selection share, speed-up per stage.
    The per-repeat step times are kept in ``df.attrs["times_ms"]`` (stage -> variant -> list, see
    :func:`interleaved_step_speedup` and :func:`overhead_repeats_table`)."""
    ts = toe.find_token_selects(model)[0]
    stages = [s for s in (stages or range(1, ts.num_stages + 1)) if ts.stage_active(s)]
    rows = []
    repeats: dict[int, dict[str, list[float]]] = {}
    for s in stages:
        r = measure_token_select_overhead(model, input_size=input_size, batch_size=batch_size, steps=steps,
                                              warmup=warmup, device=device, stage=s)
        rows.append({"stage": s, "keep_rate": ts.keep_rate[s - 1],
                     **{k: v for k, v in r.items() if k not in ("stage", "times_ms")}})
        repeats[s] = r["times_ms"]
    df = pd.DataFrame(rows)
    df.attrs["times_ms"] = repeats
    return df


def expected_step_speedup(overhead: pd.DataFrame, stage_epochs: dict[int, int]) -> Optional[float]:
    """Epoch-weighted step-time speed-up from the interleaved per-stage timings: full / mean over epochs of the
    stage's ToE step time (inactive stages count as full-token). ``stage_epochs``: stage -> epochs in it."""
    if overhead.empty:
        return None
    full = float(overhead["step_ms_full"].median())
    per = dict(zip(overhead["stage"], overhead["step_ms_toe"]))
    total = sum(stage_epochs.values())
    avg = sum(n * per.get(s, full) for s, n in stage_epochs.items()) / total
    return full / avg


def interleaved_step_speedup(overhead: pd.DataFrame, stage_epochs: dict[int, int]) -> Optional[dict[str, Any]]:
    """The epoch-weighted step-time speed-up for every interleaved repeat, with its median and interquartile range
    (the evidence of the hardware claim ``toe.train_speedup``).

    For repeat ``i``: each active stage's relative step time ``toe_i / full_i`` (both timed back to back in that
    repeat), weighted by the epochs in the stage (inactive stages count 1), gives ``1 / mean`` as that repeat's
    speed-up. ``overhead``: :func:`overhead_table` (its ``attrs["times_ms"]``). Returns ``{ratio, q1, q3,
    per_repeat, repeats}`` or None without timings; needs at least 3 repeats."""
    times = overhead.attrs.get("times_ms") if overhead is not None else None
    if not times:
        return None
    n = min(len(v["full"]) for v in times.values())
    if n < 3:
        raise ValueError(f"an interquartile range needs at least 3 interleaved repeats, got {n}")
    total = sum(stage_epochs.values())
    per_repeat = []
    for i in range(n):
        rel = {s: v["toe"][i] / v["full"][i] for s, v in times.items()}
        per_repeat.append(total / sum(k * rel.get(s, 1.0) for s, k in stage_epochs.items()))
    q1, med, q3 = statistics.quantiles(per_repeat, n=4, method="inclusive")
    return {"ratio": statistics.median(per_repeat), "q1": q1, "q3": q3, "per_repeat": per_repeat, "repeats": n}


def overhead_repeats_table(overhead: pd.DataFrame, stage_epochs: dict[int, int]) -> pd.DataFrame:
    """One row per interleaved repeat: each stage's full-token and ToE step time (ms) and the repeat's
    epoch-weighted speed-up (:func:`interleaved_step_speedup`)."""
    times = overhead.attrs.get("times_ms") or {}
    sp = interleaved_step_speedup(overhead, stage_epochs) if times else None
    if sp is None:
        return pd.DataFrame(columns=["repeat", "epoch_weighted_speedup"])
    rows = []
    for i in range(sp["repeats"]):
        row: dict[str, Any] = {"repeat": i + 1}
        for s, v in sorted(times.items()):
            row[f"stage{s}_full_ms"] = v["full"][i]
            row[f"stage{s}_toe_ms"] = v["toe"][i]
        row["epoch_weighted_speedup"] = sp["per_repeat"][i]
        rows.append(row)
    return pd.DataFrame(rows)


def removable_at_test(toe_model: nn.Module, model_name: str, x: torch.Tensor, stage: int = 1,
                      **model_kwargs: Any) -> dict[str, Any]:
    """Is the ToE model in ``eval()`` the original ViT? Builds a plain ``model_name`` (no ToE), loads the ToE
    model's state dict into it (strict: ToE adds no parameters or buffers) and compares the logits on ``x``.

    ToE is set to ``stage`` with ``sparse_inference`` on (as in training) for the comparison, so the check is not
    vacuous: ``train_mode_max_abs_diff`` (both models in train mode, no dropout) shows the selection was active.
    Returns ``max_abs_diff`` (eval, must be 0), ``param_diff`` (parameter count difference), the state-dict key
    difference, the sequence lengths the block after ToE saw, and the check's stage. The ToE model's mode, stage
    and flag are restored."""
    import timm

    from tokenbook import models as _models  # noqa: F401  (registers the workbook's models)

    ts = find_token_selects(toe_model)
    if not ts:
        raise ValueError("no TokenSelect in the model; call tokenbook.methods.toe.attach_token_select(model) first")
    ts = ts[0]
    if not ts.stage_active(stage):
        raise ValueError(f"stage {stage} is not an active ToE stage; the check would be vacuous")
    was_training = toe_model.training
    device = next(toe_model.parameters()).device
    plain = timm.create_model(model_name, **model_kwargs).to(device)
    sd = toe_model.state_dict()
    missing, unexpected = plain.load_state_dict(sd, strict=False)
    n_toe = sum(p.numel() for p in toe_model.parameters())
    n_plain = sum(p.numel() for p in plain.parameters())
    x = x.to(device)
    seen: list[tuple[str, int]] = []
    nxt = getattr(ts, "block_index", 0) + 1
    blk = toe_model.blocks[nxt] if nxt < len(toe_model.blocks) else None
    handle = blk.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1])) if blk is not None else None
    saved = (ts.expansion_stage, ts.sparse_inference)
    ts.expansion_stage, ts.sparse_inference = stage, True
    try:
        with torch.no_grad():
            toe_model.train()
            plain.train()
            diff_train = float((toe_model(x) - plain(x)).abs().max())
            toe_model.eval()
            plain.eval()
            diff_eval = float((toe_model(x) - plain(x)).abs().max())
    finally:
        ts.expansion_stage, ts.sparse_inference = saved
        if handle is not None:
            handle.remove()
        toe_model.train(was_training)
    return {"model": model_name, "stage": stage, "max_abs_diff": diff_eval, "param_diff": n_toe - n_plain,
            "params": n_toe, "state_dict_key_diff": len(missing) + len(unexpected),
            "train_mode_max_abs_diff": diff_train, "seq_len_train": seen[0] if seen else None,
            "seq_len_eval": seen[1] if len(seen) > 1 else None}


# ----------------------------------------------------------------------------------------------------------
# several seeds, paired by seed
# ----------------------------------------------------------------------------------------------------------
class SeededToERuns(dict):
    """What :func:`train_seeds` returns: ``{seed: {label: ToERun}}`` (a dict), with ``launched``, the
    :class:`tokenbook.runs.Run` records of the runs that went through the run store (empty in the kernel path)."""

    def __init__(self, *args: Any, launched: Sequence = (), **kw: Any):
        super().__init__(*args, **kw)
        self.launched = list(launched)


def train_seeds(model_name: str, bundle: Any, batch_size: int, cfg: Any, toe_kwargs: dict, seeds: Sequence[int], *,
                num_workers: int = 0, block_index: int = 0, run_baseline: bool = True,
                model_kwargs: Optional[dict] = None, executor: str = "kernel", via_store: Optional[bool] = None,
                store: Optional[str] = None, workers: Optional[int] = None, threads: Optional[int] = None,
                cluster: Optional[str] = None, resources: Optional[dict] = None, wait: bool = True) -> SeededToERuns:
    """:func:`train_pair` for every seed: for seed ``s`` both runs start from ``seed_everything(s)`` (same initial
    weights) and read a train loader seeded with ``s`` (same batches in both runs, a different order per seed); the
    data subset (``bundle``) is the same for every seed. Returns ``{seed: {label: ToERun}}``.

    ``executor="kernel"`` (``via_store`` None or False): in this process, one run after the other, nothing stored.
    Any other executor (``processes``, ``torchrun``, ``submitit``; or ``kernel`` with ``via_store=True``): every
    (arm, seed) run is one entry of the workbook's run store (:func:`arm_spec`, :func:`train_arm_run`), trained once
    by :func:`tokenbook.runs.launch` (``store``, ``workers``, ``threads``, ``cluster``, ``resources``, ``wait`` as
    there) and read back by every later execution; the models are rebuilt from the stored weights
    (:func:`rebuild_arm`). The runs' data config is ``bundle.config``; ``launched`` holds the Run records."""
    from tokenbook import data

    if via_store is None:
        via_store = executor != "kernel"
    if via_store:
        return _train_seeds_stored(model_name, bundle, batch_size, cfg, toe_kwargs, seeds, num_workers=num_workers,
                                   block_index=block_index, run_baseline=run_baseline, model_kwargs=model_kwargs,
                                   launch=dict(executor=executor, store=store, workers=workers, threads=threads,
                                               cluster=cluster, resources=resources, wait=wait))
    if executor != "kernel":
        raise ValueError(f"executor {executor!r} trains through the run store; via_store=False needs 'kernel'")
    out = SeededToERuns()
    for s in seeds:
        tl, vl = data.make_loaders(bundle, batch_size, num_workers=num_workers, seed=int(s))
        out[int(s)] = train_pair(model_name, tl, vl, dataclasses.replace(cfg, seed=int(s)), toe_kwargs,
                                 preprocess=bundle.preprocess, block_index=block_index, run_baseline=run_baseline,
                                 model_kwargs=model_kwargs)
    return out


# ----------------------------------------------------------------------------------------------------------
# the same runs through the workbook's run store (tokenbook.runs): one stored run per (arm, seed)
# ----------------------------------------------------------------------------------------------------------


def _train_seeds_stored(model_name: str, bundle: Any, batch_size: int, cfg: Any, toe_kwargs: dict,
                        seeds: Sequence[int], *, num_workers: int, block_index: int, run_baseline: bool,
                        model_kwargs: Optional[dict], launch: dict) -> SeededToERuns:
    """:func:`train_seeds` through the run store (see there)."""
    from tokenbook import runs as R

    arms = ([("full-token", None)] if run_baseline else []) + [("ToE", toe_kwargs)]
    plan = [(int(s), label, arm_spec(model_name, model_kwargs, kw, block_index, bundle.config, cfg, batch_size, int(s),
                                     num_workers)) for s in seeds for label, kw in arms]
    done = R.launch([spec for _, _, spec in plan], **launch)
    out = SeededToERuns(launched=done)
    for (s, label, spec), run in zip(plan, done):
        out.setdefault(s, {})[label] = rebuild_arm(spec.args, run.output, label)
    return out


def per_seed(tables: dict[int, pd.DataFrame]) -> pd.DataFrame:
    """``{seed: table}`` -> one table with a leading ``seed`` column."""
    return pd.concat([t.assign(seed=s)[["seed", *t.columns]] for s, t in tables.items()], ignore_index=True)


def val_curves(runs_by_seed: dict[int, dict[str, ToERun]]) -> list[list[float]]:
    """The validation top-1 curve of every run (all seeds, all arms), for :func:`tokenbook.claims.plateau_note`."""
    return [list(r.result.history["val_top1"].dropna()) for runs in runs_by_seed.values() for r in runs.values()
            if "val_top1" in r.result.history]


def top1_seeds_table(runs_by_seed: dict[int, dict[str, ToERun]], level: float = 0.95) -> pd.DataFrame:
    """Final full-token top-1 of each arm over the seeds, and the paired difference ToE - full-token: one row per
    arm (and one for the difference) with the seeds, ``n``, mean, a Student-t ``level`` confidence interval and the
    per-seed values (``top1_seed<s>`` columns). The interval needs 2 seeds; with one it is left empty."""
    from tokenbook.claims import mean_ci

    seeds = sorted(runs_by_seed)
    labels = [lab for lab in ("full-token", "ToE") if all(lab in runs_by_seed[s] for s in seeds)]
    vals = {lab: [float(runs_by_seed[s][lab].result.final.get("val_top1")) for s in seeds] for lab in labels}
    if len(labels) == 2:
        vals["ToE - full-token (paired)"] = [t - f for t, f in zip(vals["ToE"], vals["full-token"])]
    rows = []
    for lab, v in vals.items():
        m, lo, hi = mean_ci(v, level=level) if len(v) >= 2 else (float(v[0]), None, None)
        rows.append({"run": lab, "seeds": ",".join(map(str, seeds)), "n": len(v), "top1_mean": m,
                     f"ci{int(level * 100)}_low": lo, f"ci{int(level * 100)}_high": hi,
                     **{f"top1_seed{s}": x for s, x in zip(seeds, v)}})
    return pd.DataFrame(rows)


def verdict(speedups: pd.DataFrame, expected: Optional[float] = None, mac_saving: Optional[float] = None,
            per_stage: Optional[pd.DataFrame] = None) -> str:
    """A short markdown paragraph stating what this run measured, written from the numbers.

    ``speedups``: :func:`speedup_table`, one seed or several (:func:`per_seed`, a ``seed`` column): with several
    seeds the speed-ups are the medians over the seeds and the top-1 difference the mean. ``per_stage``
    (:func:`stage_step_table`, same convention): its full-token stage does the same work in both runs, so its
    measured ratio (ideally 1.0) shows how much the machine's speed drifted between the two sequential runs.
    """
    if speedups.empty:
        return "Only the ToE run was trained (run_baseline is False): no speed-up measured."
    n = speedups["seed"].nunique() if "seed" in speedups.columns else 1
    g = speedups.groupby("measure", sort=False)
    sp = g["speedup"].median()
    diff = float(g["top1_diff"].mean().iloc[0])
    met = bool((g["target_met"].mean() == 1.0).iloc[1])
    what = "median over {n} seeds".format(n=n) if n > 1 else "one seed"
    parts = [f"**Measured in this run** ({what}): step-time speed-up {sp.iloc[0]:.2f}x, training wall-clock "
             f"{sp.iloc[1]:.2f}x (end to end with evaluation {sp.iloc[2]:.2f}x); full-token top-1 "
             f"{float(g['top1_full'].mean().iloc[0]):.2f} vs. {float(g['top1_toe'].mean().iloc[0]):.2f} with ToE "
             f"({diff:+.2f} pt{', mean' if n > 1 else ''})."]
    if mac_saving is not None:
        parts.append(f"The analytic epoch-average MAC saving of this run's schedule is {mac_saving:.2f}x")
        if expected is not None:
            parts[-1] += f", and the interleaved per-stage timings predict {expected:.2f}x for the step time."
        else:
            parts[-1] += "."
    if per_stage is not None and not per_stage.empty:
        same = per_stage[~per_stage["active"].astype(bool)]["measured_ratio"].dropna()
        if len(same):
            rng = (f"{float(same.min()):.2f}-{float(same.max()):.2f} over the seeds" if len(same) > 1
                   else f"{float(same.iloc[0]):.2f}")
            parts.append(f"In the final full-token stage both runs do identical work; the measured ratio there is "
                         f"{rng} (1.00 on a steady machine), a direct read of the machine-load "
                         f"drift between the two runs, which the wall-clock ratios also carry.")
    parts.append("Target (>= 1.2x wall-clock at <= 0.5 pt lost" + (", every seed" if n > 1 else "") + "): **"
                 + ("met" if met else "not met") + "** here.")
    return " ".join(parts)


def claims_evidence(*, deit_row: Any, removable: pd.DataFrame, runs_by_seed: dict[int, dict[str, ToERun]],
                    scale_train: str, model_name: str, img_size: int, n_patches: int,
                    interleaved: Optional[dict[str, Any]] = None, overhead_batch: int = 0, overhead_warmup: int = 0,
                    stage_epochs: Optional[dict[int, int]] = None, expected: Optional[float] = None,
                    device: str = "cpu", deit_name: str = "deit_small_patch16_224", floors: Any = None) -> list:
    """Evidence for the sheet's testable claims from what the notebook measured: ``toe.compute_saving`` from the
    DeiT-S row of the schedule summary (``deit_row``), ``toe.removable_at_test`` from :func:`removable_at_test`'s
    rows (the worst logit, parameter and state-dict difference, a bound of 0), ``toe.train_speedup`` from
    :func:`interleaved_step_speedup` (median and IQR; absent without a baseline) and ``toe.lossless`` from the
    final full-token top-1 of both arms per seed, with every run's validation curve for the plateau criterion; with
    ``floors`` (:func:`tokenbook.floors.floors_table` on the same split) a run of either arm below the logistic floor
    makes it a failed run (both arms are trained from scratch)."""
    from tokenbook import claims

    ev = [
        claims.Evidence(
            "toe.compute_saving", value=float(deit_row["epoch_avg_saving"]),
            scale="analytic: DeiT-S 224 px (N = 196), official schedule 0/100/200 of 300 epochs, keep 0.5/0.75/1.0, "
                  "r0 0.25, k 2, forward MACs of the blocks",
            detail=f"kept patches {deit_row['kept_patches_stage1']}/{deit_row['kept_patches_stage2']}/"
                   f"{deit_row['kept_patches_stage3']}; whole model {deit_row['epoch_avg_saving_whole_model']:.3f}x"),
        claims.Evidence(
            "toe.removable_at_test",
            value=float(removable["max_abs_diff"].max() + removable["param_diff"].abs().max()
                        + removable["state_dict_key_diff"].max()),
            scale=f"{model_name} trained here (seed {next(iter(runs_by_seed))}) on 2 val images, and {deit_name} (random "
                  f"init) on 2 random 224 px images; ToE stage 1 on, eval() mode",
            detail="; ".join(f"{r.model}: eval max|diff| {r.max_abs_diff:.3g}, train-mode max|diff| "
                             f"{r.train_mode_max_abs_diff:.3g}, block after ToE saw {r.seq_len_train} tokens in train "
                             f"vs {r.seq_len_eval} in eval, params {r.params} (diff {r.param_diff})"
                             for r in removable.itertuples())),
    ]
    if interleaved is not None:
        ev.append(claims.Evidence(
            "toe.train_speedup", ratio=interleaved["ratio"], q1=interleaved["q1"], q3=interleaved["q3"],
            scale=f"{model_name} ({n_patches} patch tokens, {img_size} px), training step (forward + backward + "
                  f"update) at batch {overhead_batch} on {device} ({torch.get_num_threads()} threads), stages "
                  f"weighted by this run's epochs {stage_epochs}",
            detail=f"{interleaved['repeats']} interleaved repeats (full-token, ToE, truncated per repeat, per stage), "
                   f"{overhead_warmup} warm-up; median-based prediction {expected:.3f}x"))
    top1 = {s: {lab: float(run.result.final["val_top1"]) for lab, run in r.items()} for s, r in runs_by_seed.items()}
    ev.append(claims.paired_evidence("toe.lossless", top1, "ToE", "full-token", scale=scale_train,
                                     curves=val_curves(runs_by_seed), floors=floors))
    return ev


def judge_heldout(runs_by_seed: dict[int, dict[str, ToERun]], heldout_bundle: Any) -> dict[tuple, float]:
    """Evaluate every run's model once more, with all tokens (ToE is removable at test), on every held-out image
    (:func:`tokenbook.heldout.heldout_bundle`) and make that the run's final top-1: ``result.final["val_top1"]``
    becomes the held-out top-1 and the validation subset's value moves to ``"val_subset_top1"``, so that the top-1
    tables, the floors and the claims read the held-out number; the per-epoch curves (and the plateau rule) stay on
    the subset. Returns ``{(seed, label): held-out top-1}``."""
    from tokenbook.heldout import heldout_top1

    out = {}
    for s, r in runs_by_seed.items():
        got = heldout_top1({lab: run.result.model for lab, run in r.items()}, heldout_bundle)
        for lab, run in r.items():
            final = run.result.final
            if "val_subset_top1" not in final:  # once: a second call keeps the subset's number
                final["val_subset_top1"] = final.get("val_top1")
            final["val_top1"] = out[(s, lab)] = got[lab]
    return out


def floor_rows(runs_by_seed: dict[int, dict[str, ToERun]]) -> list[dict]:
    """One row per arm for :func:`tokenbook.floors.beside_floors` (:func:`tokenbook.floors.arm_row`): final
    full-token top-1 (mean over the seeds and the worst seed), parameters and mean training seconds."""
    from tokenbook.floors import arm_row

    rows = []
    for label in next(iter(runs_by_seed.values())):
        res = [r[label].result for r in runs_by_seed.values() if label in r]
        rows.append(arm_row(label, [float(x.final["val_top1"]) for x in res],
                            sum(q.numel() for q in res[0].model.parameters()),
                            [x.timing["wall_time_s"] for x in res]))
    return rows


# ----------------------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------------------
def _show(ax, img) -> None:
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, extent=(0, 1, 1, 0), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_token_selection(model: nn.Module, images: torch.Tensor, display: Sequence[Any],
                         stages: Sequence[int] = (1, 2), row_titles: Optional[Sequence[str]] = None, size: float = 1.9):
    """For each image (row) and each stage: which patches were seeds (green) and which were added in each greedy
    sub-step (colour = sub-step), merged patches grey; and where each merged patch went (colour = the kept
    token it was averaged into, white dots = kept tokens, lines = merged patch -> its kept token).

    ``images``: the preprocessed batch for the model; ``display``: the same images for ``imshow``.
    """
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib import colormaps

    traces = {s: trace_token_selection(model, images, stage=s) for s in stages}
    B = images.shape[0]
    fig, axes = plt.subplots(B, 1 + 2 * len(stages), figsize=(size * (1 + 2 * len(stages)), size * B), squeeze=False)
    n_sub = max(len(tr.steps) for tr in traces.values()) or 1
    sub_cmap = colormaps["plasma"]
    group_cmap = colormaps["tab20"]
    for b in range(B):
        _show(axes[b, 0], display[b])
        if row_titles:
            axes[b, 0].set_ylabel(row_titles[b], fontsize=8)
        for j, s in enumerate(stages):
            tr = traces[s]
            if tr.grid_size is None:
                raise ValueError("the model's patch grid is unknown; cannot draw the selection")
            gh, gw = tr.grid_size
            step = tr.as_grid(tr.step_map())[b].numpy()
            rgba = np.zeros((gh, gw, 4))
            rgba[step == 0] = (0.0, 0.9, 0.2, 0.85)
            for k in range(1, n_sub + 1):
                rgba[step == k] = (*sub_cmap(0.1 + 0.8 * (k - 1) / max(1, n_sub - 1))[:3], 0.7)
            rgba[step == -1] = (0.6, 0.6, 0.6, 0.25)
            ax = axes[b, 1 + 2 * j]
            _show(ax, display[b])
            ax.imshow(rgba, extent=(0, 1, 1, 0), interpolation="nearest")
            owner = tr.owner_map()[b]
            kept = tr.kept[b].tolist()
            rank = {p: i for i, p in enumerate(sorted(kept))}
            grp = np.zeros((gh, gw, 4))
            for pos in range(tr.num_patches):
                o = int(owner[pos])
                grp[pos // gw, pos % gw] = (*group_cmap(rank[o] % 20)[:3], 0.65 if o == pos else 0.45)
            ax2 = axes[b, 2 + 2 * j]
            _show(ax2, display[b])
            ax2.imshow(grp, extent=(0, 1, 1, 0), interpolation="nearest")

            def centre(p: int) -> tuple[float, float]:
                return ((p % gw) + 0.5) / gw, ((p // gw) + 0.5) / gh

            for src, dst in zip(tr.merged[b].tolist(), tr.merged_into[b].tolist()):
                (x0, y0), (x1, y1) = centre(src), centre(dst)
                ax2.plot([x0, x1], [y0, y1], color="white", lw=0.5, alpha=0.7)
            kx, ky = zip(*(centre(p) for p in kept))
            ax2.scatter(kx, ky, s=6, c="white", edgecolors="black", linewidths=0.3, zorder=3)
            ax2.set_xlim(0, 1)
            ax2.set_ylim(1, 0)
            if b == 0:
                ax.set_title(f"stage {s}: seeds (green),\nsub-steps 1-{len(tr.steps)} (dark->light)", fontsize=7)
                ax2.set_title(f"stage {s}: {tr.kept.shape[1]} kept,\n{tr.merged.shape[1]} merged -> owner", fontsize=7)
    axes[0, 0].set_title("image", fontsize=7)
    fig.tight_layout()
    return fig


def plot_keep_schedule(run_cfg: dict, run_epochs: int, num_patches: int, official: str = "deit_small",
                       official_patches: int = 196, dims: Optional[toe.ViTDims] = None):
    """Kept-token fraction per epoch (step plot) for the official schedule (300 epochs, DeiT-S) and for this run
    (stages scaled to its epochs), with the relative MACs of each stage."""
    import matplotlib.pyplot as plt

    cfg_off = _cfg(official)
    off_epochs = cfg_off.pop("epochs")
    panels = [(f"official {MODEL_LABELS.get(official, official)} script ({off_epochs} epochs, N={official_patches})",
               cfg_off, off_epochs, official_patches, toe.ViTDims.preset(official)),
              (f"this run ({run_epochs} epochs, N={num_patches})",
               {k: run_cfg[k] for k in ("expansion_step", "keep_rate", "initialization_keep_rate",
                                         "expansion_multiple_stage")}, run_epochs, num_patches, dims)]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.0), squeeze=False)
    for ax, (title, cfg, epochs, n, d) in zip(axes[0], panels):
        rows = toe.toe_schedule(n, total_epochs=epochs, **cfg)
        xs, kept = [], []
        for e in range(epochs):
            s = toe.stage_for_epoch(cfg["expansion_step"], e)
            row = next(r for r in rows if r["stage"] == s)
            xs.append(e)
            kept.append(row["kept_patches"] / n)
        ax.step(xs + [epochs], kept + [kept[-1]], where="post", label="kept patch tokens / N")
        if d is not None:
            mrows = toe.toe_stage_macs(dims=d, num_patches=n, total_epochs=epochs, **cfg)
            full = max(r["block_macs"] for r in mrows)
            rel = [next(r for r in mrows if r["stage"] == toe.stage_for_epoch(cfg["expansion_step"], e))["block_macs"]
                   / full for e in range(epochs)]
            ax.step(xs + [epochs], rel + [rel[-1]], where="post", ls="--", label="block MACs / full")
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("epoch")
        ax.set_title(title, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------------------
# Visualization trace
# ----------------------------------------------------------------------------------------------------------
@dataclass
class SelectionTrace:
    """Which patches were seeds, which were added at each sub-step, where each merged patch went (one batch).

    Positions are patch indices in raster order (prefix tokens excluded); ``grid_size`` (rows, cols) reshapes maps.
    ``steps[j]`` (B, a_j) are the patches added in sub-step ``j + 1`` (stage ``step_stage[j]``); ``kept`` (B, n)
    in output order; ``merged`` (B, R) the patches merged away and ``merged_into`` (B, R) the patch position of the
    kept token each one was averaged into.
    """
    stage: int
    num_patches: int
    grid_size: Optional[tuple[int, int]]
    seeds: torch.Tensor
    steps: list[torch.Tensor]
    step_stage: list[int]
    kept: torch.Tensor
    merged: torch.Tensor
    merged_into: torch.Tensor
    active: bool = True

    @property
    def batch_size(self) -> int:
        return self.kept.shape[0]

    def step_map(self) -> torch.Tensor:
        """(B, N): 0 = seed, j >= 1 = added in sub-step j, -1 = merged away (all 0 when ToE was inactive)."""
        out = torch.full((self.batch_size, self.num_patches), -1, dtype=torch.long)
        out[:, self.seeds] = 0
        for j, s in enumerate(self.steps, start=1):
            out.scatter_(1, s, j)
        return out

    def owner_map(self) -> torch.Tensor:
        """(B, N): the patch position of the kept token that represents each patch (itself when kept)."""
        out = torch.arange(self.num_patches).repeat(self.batch_size, 1)
        if self.merged.shape[1]:
            out.scatter_(1, self.merged, self.merged_into)
        return out

    def as_grid(self, m: torch.Tensor) -> torch.Tensor:
        """Reshape a (B, N) map to (B, rows, cols)."""
        if self.grid_size is None:
            raise ValueError("grid size unknown; reshape the (B, N) map yourself")
        return m.view(m.shape[0], *self.grid_size)


@torch.no_grad()
def trace_token_selection(model: nn.Module, images: torch.Tensor, stage: Optional[int] = None) -> SelectionTrace:
    """Run ``model`` on ``images`` (eval mode, no grad) with ToE forced to ``stage`` (default: the current stage, or
    1 when that is 0) and record the selection of the batch. The model's state is restored afterwards."""
    found = find_token_selects(model)
    if not found:
        raise ValueError("no TokenSelect in the model; call tokenbook.methods.toe.attach_token_select(model) first")
    ts = found[0]
    stage = stage if stage is not None else (ts.expansion_stage or 1)
    if not 0 <= stage <= ts.num_stages:
        raise ValueError(f"stage must be in [0, {ts.num_stages}], got {stage}")
    was_training = model.training
    ts._trace = []
    model.eval()
    try:
        with _forced_stage(ts, stage):
            model(images)
    finally:
        rec, ts._trace = ts._trace, None
        model.train(was_training)
    grid = tuple(model.patch_embed.grid_size) if hasattr(model, "patch_embed") else None
    if not rec:  # inactive stage: every patch kept, nothing selected
        n = grid[0] * grid[1] if grid else 0
        B = images.shape[0]
        kept = torch.arange(n).repeat(B, 1)
        return SelectionTrace(stage, n, grid, torch.arange(n), [], [], kept, kept[:, :0], kept[:, :0], active=False)
    r = rec[0]
    plan = ts.plan(r["num_patches"], stage)
    step_stage = [t + 1 for t, s in enumerate(plan.substeps) for a in s if a > 0]
    n_patches = r["num_patches"]
    if grid is not None and grid[0] * grid[1] != n_patches:
        grid = None
    kept, rest, target = r["kept"].cpu(), r["rest"].cpu(), r["target"].cpu()
    merged_into = kept.gather(1, target) if rest.shape[1] else rest
    return SelectionTrace(stage=stage, num_patches=n_patches, grid_size=grid, seeds=r["chunks"][0].cpu(),
                          steps=[c.cpu() for c in r["chunks"][1:]], step_stage=step_stage, kept=kept, merged=rest,
                          merged_into=merged_into, active=True)


# ----------------------------------------------------------------------------------------------------------
# Overhead measurement
# ----------------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_token_select_overhead(model: nn.Module, input_size: Optional[Sequence[int]] = None, batch_size: int = 32,
                                  steps: int = 5, warmup: int = 2, device: str | torch.device = "cpu",
                                  stage: Optional[int] = None) -> dict[str, Any]:
    """Share of a training step (forward + backward + SGD step with lr 0) spent in the ToE selection.

    Three variants are timed interleaved in the same run (median over ``steps``): ``full`` (ToE off),
    ``toe`` (real selection at ``stage``, default the current stage or 1) and ``truncated`` (the same kept token
    count without any selection work). ``overhead_ms = toe - truncated`` (selection forward and backward, merge
    included) and ``overhead_share = overhead_ms / toe``; ``select_forward_ms`` times the selection alone on a
    captured block output. ``speedup_vs_full = full / toe``; ``times_ms``: every timed step per variant, in repeat
    order (repeat ``i`` of the three variants ran back to back). The model's weights and modes are left unchanged.
    """
    device = torch.device(device)
    found = find_token_selects(model)
    if not found:
        raise ValueError("no TokenSelect in the model; call tokenbook.methods.toe.attach_token_select(model) first")
    ts = found[0]
    stage = stage if stage is not None else (ts.expansion_stage or 1)
    if not ts.stage_active(stage):
        raise ValueError(f"stage {stage} is not an active ToE stage; nothing to measure")
    if input_size is None:
        input_size = (model.patch_embed.proj.in_channels, *model.patch_embed.img_size)
    was_training = model.training
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)
    x = torch.randn(batch_size, *input_size, device=device)
    captured: dict[str, torch.Tensor] = {}

    def step(mode: str) -> float:
        ctx = contextlib.nullcontext() if mode == "full" else _forced_stage(ts, stage, truncate=mode == "truncated")
        if mode == "full":
            saved = ts.sparse_inference
            ts.sparse_inference = False
        try:
            _sync(device)
            t0 = time.perf_counter()
            with ctx:
                out = model(x)
            outs = out if isinstance(out, (tuple, list)) else [out]
            loss = sum(o.float().mean() for o in outs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            _sync(device)
            return time.perf_counter() - t0
        finally:
            if mode == "full":
                ts.sparse_inference = saved

    def grab(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        captured["x"] = output.detach()

    blk = model.blocks[getattr(ts, "block_index", 0)]
    handle = blk.register_forward_hook(grab)
    times: dict[str, list[float]] = {"full": [], "toe": [], "truncated": []}
    try:
        for i in range(warmup + steps):
            for mode in times:
                t = step(mode)
                if i >= warmup:
                    times[mode].append(t)
    finally:
        handle.remove()
        opt.zero_grad(set_to_none=True)
        model.train(was_training)
    sel = []
    with torch.no_grad():
        for i in range(warmup + steps):
            _sync(device)
            t0 = time.perf_counter()
            ts.select(captured["x"], stage)
            _sync(device)
            if i >= warmup:
                sel.append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    over = med["toe"] - med["truncated"]
    return {"device": str(device), "batch_size": batch_size, "stage": stage, "step_ms_full": med["full"],
            "step_ms_toe": med["toe"], "step_ms_truncated": med["truncated"],
            "select_forward_ms": statistics.median(sel) * 1e3, "overhead_ms": over,
            "overhead_share": over / med["toe"], "speedup_vs_full": med["full"] / med["toe"],
            "threads": torch.get_num_threads(),
            "times_ms": {k: [t * 1e3 for t in v] for k, v in times.items()}}


# ----------------------------------------------------------------------------------------------------------
# GPU budget: this notebook's loops for tokenbook.gpu_budget (an ESTIMATE; the engine is in the core)
# ----------------------------------------------------------------------------------------------------------
def _gpu_build(p: dict, kw: dict, toe_cfg: Optional[dict], epoch: int = 0, pre: bool = True):
    """A ``build`` of the notebook's model (ToE at the stage of ``epoch`` when ``toe_cfg``), on the uint8 batch path
    (``pre``) or on float batches."""
    from tokenbook import gpu_budget as G

    def make():
        m = build_model(p["model_name"], 0, toe_cfg, p["toe_block_index"], **kw)
        if toe_cfg is not None:
            toe.ToEStageHook().on_epoch_start(epoch, m)  # the stage of that epoch, as in training
        return m
    img = p["img_size"]
    return G.pixel_build(make, img) if pre else lambda: G.Costable(make(), torch.randn(2, 3, img, img))


def gpu_loops(params: dict) -> list:
    """This notebook's training loops under ``params`` as :class:`tokenbook.gpu_budget.Loop` rows (what
    :func:`tokenbook.gpu_budget.estimate` costs): the full-token baseline x seeds, ToE per stage at its kept tokens
    x seeds (evaluation full-token), the token-select overhead timing."""
    from tokenbook import gpu_budget as G
    from tokenbook.claims import parse_seeds

    p, nb = params, "03_toe"
    (n, nv), S, name = G.fm_sizes(p), len(parse_seeds(p["seeds"])), p["model_name"]
    toe_cfg, cfg = toe_config(p), train_config(p)
    kw = dict(num_classes=10, img_size=p["img_size"], drop_path_rate=p["drop_path_rate"])
    fit, key = G.fit_fields(cfg, n, nv, p["num_workers"], S), ("toe", name, G.freeze(kw), p["toe_block_index"])
    loops = [G.Loop(nb, f"full-token {name} x {S} seeds", _gpu_build(p, kw, None), key=key, **fit)] \
        if p["run_baseline"] else []
    stages = [toe.stage_for_epoch(toe_cfg["expansion_step"], e) for e in range(cfg.epochs)]
    for s in dict.fromkeys(stages):  # ToE charged per stage at its kept tokens; evaluation is full-token
        k = stages.count(s)
        loops.append(G.Loop(nb, f"ToE stage {s} ({k} epochs) x {S} seeds", _gpu_build(p, kw, toe_cfg, stages.index(s)),
                            key=key + ("stage", s), **{**fit, "epochs": k, "evals": k,
                                                       "steps": fit["steps"] // cfg.epochs * k}))
    ts = toe.TokenSelect(**toe_cfg)
    active = sum(ts.stage_active(s) for s in range(1, ts.num_stages + 1))
    loops.append(G.Loop(nb, f"token-select overhead timing ({active} stages x 3 variants)",
                        _gpu_build(p, kw, None, pre=False), batch=p["overhead_batch"], precision="32-true", opt="sgd",
                        steps=active * 3 * (p["overhead_warmup"] + p["overhead_steps"]), data="none",
                        key=key + ("overhead",), note="fp32, synthetic batches; every variant at the full-token step "
                                                      "(an upper bound)"))
    return loops


# ------------------------------------------------------------------------------------------------------------
# Released checkpoints vs the paper (issue 20), evaluated by tokenbook.released. ToE publishes no weights and the
# reference sheet holds none of the paper's top-1 values: these rows evaluate a DeiT checkpoint trained with ToE's
# DeiT main.py (``{'model': ..., 'args': ...}``; ToE adds no parameters) given with paths={name: file}
# ------------------------------------------------------------------------------------------------------------
RELEASED = [dict(model=f"toe_deit_{s}_patch16_224", file=None, ref=None, paper_name=f"DeiT-{s[0].upper()} + ToE",
                 url="none released (github.com/Osilly/TokenExpansion README at 01e52fe lists no ToE weights)",
                 note="no released weights: pass paths={'toe_deit_%s_patch16_224': '<ToE/deit main.py "
                      "checkpoint.pth>'}; the paper's top-1 tables were not available to the reference sheet "
                      "(toe.md, 'Missing')" % s)
            for s in ("tiny", "small", "base")]


def released_table(params: Optional[dict] = None, **kw: Any):
    """:data:`RELEASED` evaluated on the user's ImageNet val folder (:func:`tokenbook.released.released_table`;
    arguments from ``params`` by :func:`tokenbook.released.params_kwargs`, ``kw`` win)."""
    import tokenbook.models  # noqa: F401  (registers the ToE DeiTs)
    from tokenbook import released as R

    return R.released_table(RELEASED, **R.params_kwargs(params, **kw))


__all__ += ["RELEASED", "released_table"]
