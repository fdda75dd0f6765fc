"""Cross-paper comparison (notebook ``06_cross_paper``): the five papers' methods on one engine, one data pipeline,
one recipe and one measurement layer, and the compositions none of the papers ran.

Reference sheet: ``references/cross_paper.yaml`` (the ``composition`` claims). Every arm trains with
:func:`tokenbook.train.fit` on the same data (Fashion-MNIST source classes, 28 px, one channel), the same budget
(epochs x batch, AdamW, cosine schedule, CutMix + label smoothing for pixels, SeiT's batch hook for tokens) and the same
seeds. For seed ``s`` every arm starts from ``seed_everything(s)`` and its loader is seeded with ``s``, so arms that
share an architecture (a model and the same model with ToE, which has no parameters) start from identical weights and
see identical batches: the ToE compositions are paired by seed.

Arms (:data:`ARMS`), trained from scratch on the source classes:

- ``vit``: the plain ViT baseline (``vit_fm_tiny_p4_28``: 49 patches, width/depth/heads of the notebook);
- ``vittm``: ViTTM (``vittm_cpu_m2p4_28``: 196 memory + 49 process tokens, linear heads, residual fusion);
- ``t2t``: T2T-ViT (``t2t_vit_tiny_fmnist``: performer T2T module, the same backbone size);
- ``vit_toe``: the baseline trained with ToE (stages 0/100/200 of 300 scaled to the run, keep 0.5/0.75/1.0);
- ``seit`` / ``seit_ta_ca``: SeiT's token ViT on VQ tokens of the same images, without / with TokenAdapt + ColorAdapt;
- compositions: ``t2t_toe`` and ``vittm_toe`` (ToE while training T2T-ViT and ViTTM; where the selection goes:
  :func:`tokenbook.methods.toe.attach_token_select`), ``t2t_tokens`` (T2T-ViT on SeiT tokens,
  :class:`tokenbook.models.seit.TokenT2TViT`).

Fine-tuning arms (Learnable Memory): the first seed's ``vit`` and ``t2t`` models are the pre-trained backbones; each is
fine-tuned on held-out classes (never seen in pre-training) with ``memory`` (memory tokens + class token + head) and
``full`` fine-tuning, once per seed (:func:`tokenbook.experiments.memory.run_finetune_table`). The T2T-ViT backbone is
the composition (:class:`tokenbook.models.memory.MemoryViT` on a T2T-ViT).

Measured per arm, in the same run: top-1 (mean and 95 % t-interval over seeds), training compute (MACs of one
training step's forward + backward counted by ``torch.utils.flop_counter``, per stage for ToE, x the images seen; the
token arms add their batch hook's MACs: Emb-Noise, ColorAdapt, TokenAdapt f/g), training wall time, inference MACs
and CPU latency of the trained model, trainable parameters, and storage per training image (PNG for pixels, the
gzip'd token files for tokens). ToE's training-step speed-up on each architecture is timed interleaved (with and
without ToE, back to back, per active stage) on the first seed's trained model (:func:`toe_speedups`), as 03_toe times
``toe.train_speedup``; per-run wall times stay in the tables but carry no verdict.

The arms themselves (what each row is, its recipe, model and counting) are
:mod:`tokenbook.experiments.cross_paper_arms`, re-exported here.

Size: about 1,150 lines, over the project's 800-line guide: one notebook's driver that measures nine arms and four
fine-tuning rows in the same way (training, counted MACs, latency, storage), times ToE interleaved on three
architectures, draws its two figures, builds the evidence of seven claims and lists its training loops for the GPU
estimate (:mod:`tokenbook.gpu_budget`); the parts share the arm definitions and the per-seed table.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from tokenbook import bench
from tokenbook.claims import Evidence, mean_ci, paired_evidence
from tokenbook.methods import toe as toe_method
from tokenbook.params import LaunchParams as _Params
from tokenbook.params import SeedPlanParams
from tokenbook.params import param

from tokenbook.experiments.cross_paper_arms import (  # noqa: F401  (the arms, re-exported)
    ARMS,
    Arm, FINETUNE_ROWS, parse_arms, parse_classes, source_data_config, source_bundle, pixel_config, token_params,
    arm_model, _model_kwargs, toe_kwargs, build_arm_model, _example, training_macs, inference_numbers, judge_heldout,
    CLAIM_ARMS, arm_seed_plan, ArmRun, stored_row, training_compute, own_seeds)
from tokenbook.experiments.cross_paper_tokens import (  # noqa: F401  (the token arms through the store, re-exported)
    tokenizer_params, hook_settings, token_specs, stored_token_arm, heldout_token_loader, token_grid)

# ----------------------------------------------------------------------------------------------------------
# parameters: the notebook's parameters cell is generated from this class (python -m tokenbook.params --sync)
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Params(_Params, SeedPlanParams):
    """The parameters of notebooks/06_cross_paper.ipynb (its parameters cell is generated from this class)."""

    NOTEBOOK: ClassVar[str] = "06_cross_paper"
    #: run_all.sh --proof: a few hundred images, two seeds, the tokenizer and TokenAdapt for two steps, the shortest
    #: timings, no latency of every trained model (the same code in every profile; the cpu profile runs it)
    PROOF: ClassVar[dict] = {"train_subset": 500, "val_subset": 250, "seeds": [0, 1], "tokenizer_steps": 2,
                             "ta_steps": 2, "storage_images": 20, "ft_train_subset": 100, "ft_val_subset": 50,
                             "latency_batch": 2, "latency_min_run_time": 0.05, "speedup_batch": 4,
                             "speedup_steps": 3, "speedup_warmup": 0, "batch_size": 16, "ft_batch_size": 16,
                             "tokenizer_batch": 8, "ta_batch": 8, "latency": False}

    seed: int = param(0, "seed of the data subsets, the tokenizer and TokenAdapt (trained once per notebook) [0, inf)")
    seeds: list[int] = param([0, 1, 2],
                             "training seeds, paired by seed across arms (same init for an arm and its ToE twin, "
                             "same batches)")
    data_dir: str = param(
        "", "Fashion-MNIST IDX folder; empty: $TOKENBOOK_FASHION_MNIST, Debian package, then the hub", none="")
    source_classes: list[int] = param([0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
                                      "Fashion-MNIST classes of the comparison (and of pre-training for fine-tuning)")
    ft_target: str = param("digits", "task of the fine-tuning rows, new to the backbones: digits (scikit-learn's "
                                     "8x8 digits, offline) or fm:<classes> disjoint from source_classes")
    reuse_notebook_runs: bool = param(False, "build the arms that 01_vittm, 02_t2t_vit and 03_toe train (ViTTM, "
                                             "T2T-ViT, ViT, ViT + ToE) with those notebooks' spec functions and "
                                             "parameters of the same profile, so that the run store trains each once "
                                             "(their split and epochs must equal this notebook's); the compositions "
                                             "then use their partner's data and recipe")
    vit_model: str = param("vit_fm_tiny_p4_28", "timm name of the ViT arms (with reuse: 03_toe's model_name)")
    vittm_model: str = param("vittm_cpu_m2p4_28", "timm name of the ViTTM arms (with reuse: 01_vittm's model_name)")
    t2t_tokens: int = param(49, "backbone tokens of the T2T-ViT arms at 28 px: 49 or 16 (FMNIST_SOFT_SPLIT_16) [16, 49]",
                            choices=(16, 49))
    t2t_depth: int = param(0, "blocks of the T2T-ViT arms; 0 means depth [0, inf)")
    t2t_num_heads: int = param(0, "attention heads of the T2T-ViT arms; 0 means num_heads [0, inf)")
    fit_floors: bool = param(True, "fit the reference floors (logistic regression, small CNN) on the source split")
    floor_cnn_epochs: int = param(10, "epochs of the small-CNN floor [1, inf)")
    judge_heldout: bool = param(False, "judge the source-split arms, their floors and claims on every held-out image "
                                       "of the source classes (tokenbook.heldout); curves stay on val_subset")
    train_subset: int = param(
        2048, "training images of the source classes, class-balanced; 0 means all [0, inf)", none=0)
    val_subset: int = param(1000, "validation images of the source classes; 0 means all [0, inf)", none=0)
    arms: list[str] = param(["all"], "comparison rows: keys of tokenbook.experiments.cross_paper.ARMS, or all")
    embed_dim: int = param(64, "width of every arm [1, inf)")
    depth: int = param(6, "blocks (layers) of every arm [1, inf)")
    num_heads: int = param(4, "attention heads of every arm [1, inf)")
    epochs: int = param(3, "training epochs of every arm (ToE stages at 0/100/200 of 300, scaled) [1, inf)")
    batch_size: int = param(128, "batch size of every arm [1, inf)")
    lr: float = param(0.002, "peak AdamW learning rate (0, inf)")
    weight_decay: float = param(0.05, "AdamW weight decay [0, inf)")
    warmup_epochs: float = param(0.3, "linear warm-up in epochs [0, inf)")
    min_lr: float = param(1e-05, "final cosine learning rate [0, inf)")
    pixel_cutmix: float = param(1.0, "CutMix alpha of the pixel arms (SeiT's hook mixes the token arms alike) [0, inf)")
    label_smoothing: float = param(0.1, "label smoothing of the pixel arms (the token hooks use 0.1) [0, 1)")
    max_steps_per_epoch: int = param(0, "cut epochs short; 0 means full epochs [0, inf)", none=0)
    toe_keep_rate: list[float] = param([0.5, 0.75, 1.0], "ToE keep rate per stage (official DeiT-S)")
    toe_initialization_keep_rate: float = param(0.25, "ToE r0, the fraction of seed tokens (0, 1]")
    codebook_size: int = param(391, "VQ codebook entries, as SeiT's released codebook [2, inf)")
    code_dim: int = param(32, "code dimension, as SeiT's released codebook [1, inf)")
    tokenizer_hidden: int = param(32, "channels of the small conv VQ encoder and decoder [1, inf)")
    tokenizer_steps: int = param(150, "Adam steps of tokenizer training [1, inf)")
    tokenizer_batch: int = param(64, "tokenizer batch size [1, inf)")
    tokenizer_lr: float = param(0.002, "tokenizer learning rate (0, inf)")
    tokenizer_downsample: int = param(2, "pixels per token id of the VQ tokenizer: 2 gives a 14x14 id map at 28 px, 4 "
                                         "with tokenizer_pad 2 an 8x8 one (04_seit's cpu scale) [1, inf)")
    tokenizer_pad: int = param(0, "black pixels added on each side before tokenizing [0, inf)")
    emb_noise: float = param(1.0, "std of the token arms' Emb-Noise (SeiT: 1.0; 04_seit's cpu sweep: 0.1) [0, inf)")
    token_cutmix: float = param(1.0, "CutMix alpha of the SeiT part of the token arms' batch hook (SeiT: 1.0; 0 off) "
                                     "[0, inf)")
    token_eda: bool = param(True, "Token-EDA (synonym replacement and swaps) in the token arms' loaders")
    token_dir: str = param("", "where the token files go; empty: the tokenbook cache dir, seit/cross_paper-<profile>")
    crop: int = param(12, "token-arm input side in tokens (12 of the 14x14 grid, as in 04_seit) [1, inf)")
    rrc_scale_min: float = param(0.35, "lower scale of the token arms' random resized crop (0, 1]")
    ta_steps: int = param(100, "TokenAdapt training steps [1, inf)")
    ta_batch: int = param(64, "TokenAdapt training batch size [1, inf)")
    ta_lr: float = param(0.002, "TokenAdapt AdamW learning rate (0, inf)")
    ta_dim: int = param(64, "TokenAdapt width; official 384 [1, inf)")
    ta_heads: int = param(2, "TokenAdapt attention heads; official 6 [1, inf)")
    ta_dim_head: int = param(32, "TokenAdapt head width; official 64 [1, inf)")
    storage_images: int = param(500, "validation images encoded as PNG and as tokens for the storage column [1, inf)")
    ft_train_subset: int = param(1000, "fine-tuning images of the target task; 0 means all [0, inf)")
    ft_val_subset: int = param(500, "fine-tuning validation images; 0 means all [0, inf)")
    ft_epochs: int = param(3, "fine-tuning epochs (memory and full) [1, inf)")
    ft_batch_size: int = param(64, "fine-tuning batch size [1, inf)")
    ft_lr: float = param(0.1, "SGD learning rate of memory fine-tuning (as 05_memory) (0, inf)")
    ft_full_lr: float = param(0.02, "SGD learning rate of full fine-tuning (as 05_memory) (0, inf)")
    ft_warmup_steps: int = param(30, "linear warm-up steps of fine-tuning [0, inf)")
    memory_cells: int = param(5, "memory tokens per layer of the memory rows [1, inf)")
    latency: bool = param(True, "time inference of every trained model (torch.utils.benchmark)")
    latency_batch: int = param(32, "images per timed forward [1, inf)")
    latency_min_run_time: float = param(0.3, "seconds of blocked_autorange per model (0, inf)")
    speedup_batch: int = param(128, "batch of the interleaved ToE step timing of the speed-up claims [1, inf)")
    speedup_steps: int = param(5, "interleaved repeats per ToE stage (median and IQR over them) [1, inf)")
    speedup_warmup: int = param(2, "untimed warm-up steps per variant before the interleaved repeats [0, inf)")
    num_workers: int = param(0, "DataLoader workers of every training and fine-tuning loader [0, inf)")
    accelerator: str = param("auto", "cpu, cuda or auto")
    precision: str = param("32-true", "32-true or bf16-mixed")

__all__ = [
    "ARMS", "Arm", "ArmRun", "parse_arms", "source_bundle", "pixel_config", "token_params", "build_arm_model",
    "run_seeds", "finetune_arms", "pixel_specs", "reused_recipes", "stored_arm", "floor_rows", "arm_model",
    "source_data_config", "notebook_params", "ft_scale_text", "REUSED_FROM", "PARTNER", "comparison_table", "per_seed_table", "pareto_figure", "composition_evidence",
    "scale_text", "toe_placement_table", "findings_markdown", "gpu_budget_estimate", "gpu_loops", "profile_params",
    "finetune_config",
    "load_splits", "prepare_tokens", "TokenPrep", "print_run", "curves_figure", "toe_speedups", "toe_stage_epochs",
    "speedup_scale", "TOE_BASES", "judge_heldout", "CLAIM_ARMS", "arm_seed_plan", "tokenizer_params", "hook_settings",
    "token_specs", "stored_token_arm", "heldout_token_loader", "token_grid",
]


# ----------------------------------------------------------------------------------------------------------
# training: every arm through the workbook's run store, one run per (arm, seed), trained once for the whole workbook
# (the pixel arms here, the token arms in cross_paper_tokens)
# ----------------------------------------------------------------------------------------------------------
#: the notebook whose run a reused arm is (``reuse_notebook_runs``)
REUSED_FROM = {"vit": "03_toe", "vit_toe": "03_toe", "t2t": "02_t2t_vit", "vittm": "01_vittm"}
#: a composition's partner notebook: its data config, recipe, batch and model keywords (paired by seed with it)
PARTNER = {"t2t_toe": "02_t2t_vit", "vittm_toe": "01_vittm"}


def notebook_params(notebook: str, profile: str, root: Any = None):
    """Another notebook's parameters under ``profile`` (its defaults + its profile's YAML), as its run sees them."""
    from pathlib import Path

    from tokenbook.results import repo_root
    from tokenbook.runner import profile_parameters

    return profile_parameters(Path(root) if root is not None else repo_root(), notebook, profile)


def reused_recipes(profile: str, num_classes: int, root: Any = None) -> dict[str, dict]:
    """What 01_vittm, 02_t2t_vit and 03_toe's notebooks hand their store trainers under ``profile``, built as
    their notebooks build it (their ``Params``, ``data_config()``, train config, model keywords and spec function):
    ``{notebook: {params, data, train, batch_size, num_workers, models: {arm: (name, kwargs)}, ...}}``."""
    from tokenbook.experiments import t2t_vit as t2t_exp
    from tokenbook.experiments import toe as toe_exp
    from tokenbook.experiments import vittm as vittm_exp

    p1, p2, p3 = (notebook_params(nb, profile, root) for nb in ("01_vittm", "02_t2t_vit", "03_toe"))
    ttm_kw = dict(drop_path_rate=p1.drop_path_rate, **({"embed_dim": p1.embed_dim} if p1.embed_dim else {}))
    v = t2t_exp.fmnist_ablations(img_size=p2.img_size, in_chans=p2.channels, num_classes=num_classes,
                                 embed_dim=p2.embed_dim, depth=p2.depth, num_heads=p2.num_heads, tokens=p2.tokens)
    t2t_name, t2t_kw = v["t2t_performer"]
    return {
        "01_vittm": dict(params=p1, data=p1.data_config(), train=vittm_exp.make_train_config(p1, p1.recipe),
                         batch_size=p1.batch_size, num_workers=p1.num_workers,
                         models={"vittm": (p1.model_name, dict(ttm_kw, img_size=p1.img_size, num_classes=num_classes))}),
        "02_t2t_vit": dict(params=p2, data=p2.data_config(), train=p2.train_config(), batch_size=p2.batch_size,
                           num_workers=p2.num_workers,
                           models={"t2t": (t2t_name, {**t2t_kw, "drop_path_rate": p2.drop_path_rate,
                                                      "num_classes": num_classes, "img_size": p2.img_size,
                                                      "in_chans": p2.channels})}),
        "03_toe": dict(params=p3, data=p3.data_config(), train=toe_exp.train_config(p3), batch_size=p3.batch_size,
                       num_workers=p3.num_workers, toe=toe_exp.toe_config(p3), block_index=p3.toe_block_index,
                       models={"vit": (p3.model_name, dict(num_classes=num_classes, img_size=p3.img_size,
                                                           drop_path_rate=p3.drop_path_rate))}),
    }


def _check_reuse(recipes: dict, params: dict) -> None:
    """Refuse reuse when another notebook's split, epochs or models are not this notebook's (the arms would not
    be comparable), naming what differs."""
    own = (params["train_subset"] or None, params["val_subset"] or None, int(params["seed"]), int(params["epochs"]))
    bad = []
    for nb, r in recipes.items():
        d, t = r["data"], r["train"]
        theirs = (d.train_subset, d.val_subset, d.subset_seed, t.epochs)
        if d.dataset != "fashion_mnist" or d.classes is not None or theirs != own:
            bad.append(f"{nb}: {d.dataset} classes {d.classes}, train/val/subset seed/epochs {theirs}")
    if sorted(int(c) for c in params["source_classes"]) != list(range(10)):
        bad.append(f"this notebook's source_classes {params['source_classes']} (the others train on all 10)")
    names = {"vit": recipes["03_toe"]["models"]["vit"][0], "vittm": recipes["01_vittm"]["models"]["vittm"][0]}
    for k, n in names.items():
        if n != arm_model(ARMS[k], params):
            bad.append(f"{k}: the other notebook trains {n}, this one names {arm_model(ARMS[k], params)}")
    if bad:
        raise ValueError("reuse_notebook_runs: the other notebooks' runs are not this notebook's arms (own: train/val/"
                         f"subset seed/epochs {own}): " + "; ".join(bad) + ". Align the profiles or set "
                         "reuse_notebook_runs false.")


def pixel_specs(arms: Sequence[str], seeds: Sequence[int], params: dict, num_classes: int, profile: str = "",
                root: Any = None, arm_seeds: Optional[dict] = None) -> dict[tuple[int, str], Any]:
    """The :class:`tokenbook.runs.RunSpec` of every pixel arm and seed, ``{(seed, arm): spec}`` (``arm_seeds``,
    :func:`arm_seed_plan`: an arm listed there only for its own seeds).

    ``reuse_notebook_runs``: ``vit`` / ``vit_toe`` are 03_toe's full-token and ToE arms (:func:`toe.arm_spec`),
    ``t2t`` is 02_t2t_vit's ``t2t_performer`` (:func:`t2t_vit_runs.variant_spec`), ``vittm`` is 01_vittm's ViTTM
    (:func:`vittm_runs.run_spec`), each from that notebook's parameters of ``profile`` as its notebook builds it, so
    the store key is the same run; the compositions ``t2t_toe`` / ``vittm_toe`` are :func:`toe.arm_spec` on their
    partner's model keywords, data, recipe and batch, with this notebook's ToE (:func:`toe_kwargs`): the same
    initial weights and batches as the partner's run of the seed. Otherwise every pixel arm is a
    :func:`toe.arm_spec` of this notebook's own models, data (:func:`source_data_config`) and recipe
    (:func:`pixel_config`)."""
    import dataclasses

    from tokenbook.experiments import t2t_vit_runs, vittm_runs
    from tokenbook.experiments import toe as toe_exp

    pix = [k for k in arms if ARMS[k].input == "pixels"]
    out: dict[tuple[int, str], Any] = {}
    seeds = [int(s) for s in seeds]
    if params.get("reuse_notebook_runs"):
        rec = reused_recipes(profile or str(params.get("profile", "cpu")), num_classes, root)
        _check_reuse(rec, params)
        for s in seeds:
            for k in (k for k in pix if s in own_seeds(arm_seeds, k, seeds)):
                lab = f"06 {k} seed {s}"
                if k in ("vit", "vit_toe"):
                    r = rec["03_toe"]
                    name, kw = r["models"]["vit"]
                    out[(s, k)] = toe_exp.arm_spec(name, kw, r["toe"] if k == "vit_toe" else None, r["block_index"],
                                                   r["data"], r["train"], r["batch_size"], int(s), r["num_workers"])
                elif k == "t2t":
                    r = rec["02_t2t_vit"]
                    name, kw = r["models"]["t2t"]
                    out[(s, k)] = t2t_vit_runs.variant_spec(name, kw, r["data"], dataclasses.replace(
                        r["train"], seed=int(s)), r["batch_size"], r["num_workers"], label=f"t2t_performer seed {s}")
                elif k == "vittm":
                    r = rec["01_vittm"]
                    name, kw = r["models"]["vittm"]
                    out[(s, k)] = vittm_runs.run_spec(name, kw, r["data"], dataclasses.replace(r["train"], seed=int(s)),
                                                      r["batch_size"], r["num_workers"], label=f"{name} seed {s}")
                else:  # a composition on its partner's run
                    r = rec[PARTNER[k]]
                    name, kw = next(iter(r["models"].values()))
                    if k == "vittm_toe":
                        kw = vittm_runs.canonical_kwargs(name, kw)
                    train = dataclasses.replace(r["train"], progress=False) if k == "vittm_toe" else r["train"]
                    out[(s, k)] = toe_exp.arm_spec(name, kw, toe_kwargs(params), 0, r["data"], train, r["batch_size"],
                                                   int(s), r["num_workers"], label=lab)
        return out
    dcfg = source_data_config(params)
    for s in seeds:
        for k in (k for k in pix if s in own_seeds(arm_seeds, k, seeds)):
            arm = ARMS[k]
            out[(s, k)] = toe_exp.arm_spec(arm_model(arm, params), _model_kwargs(arm, params, num_classes),
                                           toe_kwargs(params) if arm.toe else None, 0, dcfg, pixel_config(params, s),
                                           int(params["batch_size"]), int(s), int(params.get("num_workers", 0)),
                                           label=f"06 {k} seed {s}")
    return out


def _stored_model(spec: Any, out: Any) -> nn.Module:
    """The trained model of a stored pixel-arm run on the CPU (ToE attached for a ToE arm, off in ``eval()``)."""
    from tokenbook.experiments import toe as toe_exp
    from tokenbook.experiments import vittm_runs

    if spec.trainer == toe_exp.ARM_TRAINER:
        return toe_exp.rebuild_arm(spec.args, out).result.model.cpu()
    return out.load_into(vittm_runs.create(spec.args["model_name"], **spec.args["model_kwargs"])).cpu()


def _headline_history(history: Any) -> Any:
    """``history`` with ``val_top1`` (a ViTTM's memory head, its headline, as 01_vittm reads it)."""
    if history is not None and "val_top1" not in history and "val_top1_memory" in history:
        history = history.assign(val_top1=history["val_top1_memory"])
    return history


def stored_arm(key: str, seed: int, spec: Any, out: Any, params: dict, measure: bool, latency: bool,
               source: str = "") -> "ArmRun":
    """An :class:`ArmRun` from a stored pixel-arm run (``out``: its :class:`tokenbook.runs.TrainedRun`); ``measure``:
    count MACs and time inference (first seed only)."""
    arm, a = ARMS[key], spec.args
    model = _stored_model(spec, out)
    chans = int(a["data"]["channels"])
    row = stored_row(key, seed, spec, out, model, source, in_chans=chans)
    if measure:
        row.update(training_compute(model, arm, params, row, chans=chans))
        from tokenbook.train import all_heads

        with all_heads(model):
            row.update(inference_numbers(model, _example(arm, params, 2, chans), params, latency))
    return ArmRun(key, int(seed), row, _headline_history(out.history), model, data=dict(a["data"]))


def run_seeds(arms: Sequence[str], seeds: Sequence[int], params: dict, bundle: Any, tokens: Any = None,
              tokenadapt: Optional[nn.Module] = None, latency: bool = True,
              callback: Optional[Callable[[dict], None]] = None, launch: Optional[dict] = None,
              profile: str = "", launched: Optional[list] = None,
              arm_seeds: Optional[dict] = None) -> dict[tuple[int, str], ArmRun]:
    """Every arm for every seed (``arm_seeds``, :func:`arm_seed_plan`: an arm listed there only for its own seeds),
    every run from the workbook's run store: the pixel arms (:func:`pixel_specs`) and the token arms
    (:func:`token_specs` on ``tokens``, f/g ``tokenadapt``) in one launch of every missing run (``launch``:
    :func:`tokenbook.runs.launch` keywords, e.g. ``params.launch_options()``; ``launched`` receives the store's
    records). MACs, latency and storage-independent numbers are measured on an arm's first seed and copied to its
    others (they do not depend on it; wall time and top-1 are per seed)."""
    from tokenbook import runs as R

    runs: dict[tuple[int, str], ArmRun] = {}
    first: dict[str, dict] = {}
    measured = ("train_tmacs", "train_gmacs_per_image", "hook_gmacs_per_image", "infer_gmacs", "infer_gflops",
                "latency_ms", "latency_iqr_ms")
    specs = pixel_specs(arms, [int(s) for s in seeds], params, bundle.num_classes, profile, arm_seeds=arm_seeds)
    specs.update(token_specs(arms, seeds, params, bundle, tokens, tokenadapt, arm_seeds))
    own = {k: own_seeds(arm_seeds, k, seeds) for k in arms}
    done = dict(zip(specs, R.launch(list(specs.values()), **(launch or {"executor": "kernel"})))) if specs else {}
    if launched is not None:
        launched.extend(done.values())
    for s in seeds:
        for k in (k for k in arms if int(s) in own[k]):
            lat, m = latency and not ARMS[k].toe, k not in first  # measured on the arm's first seed
            run = done[(int(s), k)]
            if ARMS[k].input == "tokens":
                r = stored_token_arm(k, int(s), run, params, tokens, measure=m, latency=lat, tokenadapt=tokenadapt)
            else:
                r = stored_arm(k, int(s), run.spec, run.output, params, measure=m, latency=lat, source=run.source)
            if m:
                first[k] = {m: r.row.get(m) for m in measured}
            else:
                r.row.update(first[k])
            runs[(int(s), k)] = r
            if callback:
                callback(r.row)
    # ToE is off in eval(): the trained model is its base architecture, so inference numbers are the base arm's
    for (s, k), r in runs.items():
        base = TOE_BASES.get(k)
        if base and (s, base) in runs:
            for m in ("latency_ms", "latency_iqr_ms"):
                r.row[m] = runs[(s, base)].row.get(m)
    return runs


TOE_BASES = {"vit_toe": "vit", "t2t_toe": "t2t", "vittm_toe": "vittm"}


def toe_stage_epochs(params: dict) -> dict[int, int]:
    """Epochs the run spends in each ToE stage (the official ``bisect_right`` rule on the scaled boundaries)."""
    steps = toe_kwargs(params)["expansion_step"]
    out: dict[int, int] = {}
    for e in range(int(params["epochs"])):
        s = toe_method.stage_for_epoch(steps, e)
        out[s] = out.get(s, 0) + 1
    return out


def toe_speedups(runs: dict[tuple[int, str], ArmRun], params: dict, batch_size: int = 128, steps: int = 5,
                 warmup: int = 2) -> tuple[Any, dict[str, dict]]:
    """Training-step speed-up of every ToE arm by interleaved timing, as 03_toe measures ``toe.train_speedup``.

    On the first seed's trained ToE model, each active stage's training step (forward + backward + update) is timed
    back to back with the same model with ToE off (and a truncation to the same token count), ``steps`` repeats
    after ``warmup`` (:func:`tokenbook.experiments.toe.overhead_table`); every repeat's stage ratios, weighted by the
    run's epochs per stage (:func:`toe_stage_epochs`; inactive stages count 1), give one speed-up, and the claim
    reads their median and interquartile range (:func:`tokenbook.experiments.toe.interleaved_step_speedup`). Timing
    both arms interleaved in one process takes load drift out of the ratio, which per-run wall times of runs that
    follow each other do not. Returns ``(table, {arm: {ratio, q1, q3, per_repeat, repeats}})``."""
    import pandas as pd

    from tokenbook.experiments import toe as toe_exp

    stage_epochs = toe_stage_epochs(params)
    device = _timing_device(params)
    first = min(s for s, _ in runs) if runs else 0
    rows, out = [], {}
    for key in TOE_BASES:
        if (first, key) not in runs:
            continue
        arm = ARMS[key]
        model = runs[(first, key)].model
        try:
            over = toe_exp.overhead_table(model, batch_size=int(batch_size), steps=int(steps), warmup=int(warmup),
                                          input_size=tuple(_example(arm, params, 1, runs[(first, key)].row.get(
                                              "in_chans", 1)).shape[1:]), device=device)
        finally:
            model.cpu()
        sp = toe_exp.interleaved_step_speedup(over, stage_epochs)
        out[key] = sp
        for _, r in over.iterrows():
            rows.append({"model": arm.label, "arm": key, "stage": int(r["stage"]), "keep_rate": r["keep_rate"],
                         "epochs_in_stage": stage_epochs.get(int(r["stage"]), 0), "step_ms_full": r["step_ms_full"],
                         "step_ms_toe": r["step_ms_toe"], "stage_speedup": r["speedup_vs_full"],
                         "selection_share": r.get("overhead_share")})
        rows.append({"model": arm.label, "arm": key, "stage": "epoch-weighted", "epochs_in_stage":
                     sum(stage_epochs.values()), "stage_speedup": sp["ratio"], "iqr_low": sp["q1"],
                     "iqr_high": sp["q3"], "repeats": sp["repeats"]})
    return pd.DataFrame(rows), out


def finetune_config(params: dict):
    """The fine-tuning ``TrainConfig`` of :func:`finetune_arms` (and of its GPU estimate, :func:`gpu_loops`): SGD with
    momentum, clipping 1.0, warm-up then cosine, fp32 (the profile's ``precision`` is the arms' pre-training's)."""
    from tokenbook.train import TrainConfig

    return TrainConfig(epochs=int(params["ft_epochs"]), batch_size=int(params["ft_batch_size"]), opt="sgd",
                       momentum=0.9, lr=float(params["ft_lr"]), weight_decay=0.0, clip_grad=1.0,
                       warmup_steps=int(params["ft_warmup_steps"]), warmup_lr=0.0, min_lr=0.0, sched="cosine",
                       progress=False, accelerator=str(params.get("accelerator", "auto")),
                       max_steps_per_epoch=params.get("max_steps_per_epoch") or None,
                       max_steps=params.get("max_steps") or None)


def finetune_arms(runs: dict[tuple[int, str], ArmRun], seeds: Sequence[int], params: dict, target: Any,
                  latency: bool = True) -> tuple[Any, dict, dict]:
    """Learnable Memory vs full fine-tuning on the held-out classes, from the first seed's ``vit`` and ``t2t``.

    Returns ``(rows DataFrame, {(seed, row key): history}, exactness)`` where ``exactness[backbone]`` holds, per seed,
    the largest |difference| of (a) the source head's logits against the plain backbone after fine-tuning and (b) each
    task's logits in the concatenation of all seeds' memory tasks against its stand-alone model."""
    import pandas as pd

    from tokenbook.experiments import memory as mem_exp

    s0 = int(seeds[0])
    cfg = finetune_config(params)
    cells = int(params["memory_cells"])
    rows, hists, exact = [], {}, {}
    tasks = {1: target}
    for key, label, base, mode in FINETUNE_ROWS:
        if (s0, base) not in runs:
            continue
        chans = int(runs[(s0, base)].row.get("in_chans", 1))
        if chans not in tasks:  # the same images with the backbone's channels (03's ViT reads 3)
            tasks[chans] = target_task(params, chans)
        target = tasks[chans]
        x_val = target.bundle.preprocess(next(iter(torch.utils.data.DataLoader(target.bundle.val, batch_size=64)))[0])
        backbone = runs[(s0, base)].model.eval()
        run = mem_exp.run_finetune_seeds(backbone, [target], [(mode, cells if mode == "memory" else 0)], cfg,
                                         [int(s) for s in seeds], full_lr=float(params["ft_full_lr"]),
                                         keep_full=True, verbose=False, num_workers=int(params.get("num_workers", 0)))
        # finetune_model's models answer only their task (set_outputs), as they would serve it
        first_model = run.models[(s0, target.name, run.results["method"].iloc[0])]
        inf = inference_numbers(first_model, x_val, params, latency)
        # forward of everything the model computes + backward to its trainable parameters only
        train_macs = float(bench.count_train_macs(first_model, x_val[:2])["macs_per_image"])
        for _, r in run.results.iterrows():
            spe = max(1, int(r["steps"]) // int(r["epochs"]))
            rows.append({"arm": key, "model": label, "paper": "Learnable Memory", "composition": base == "t2t",
                         "input": "pixels", "seed": int(r["seed"]), "top1": r["top1"], "epochs": int(r["epochs"]),
                         "steps": int(r["steps"]), "batch_size": cfg.batch_size, "train_s": r["train_s"],
                         "step_ms": r["step_ms"], "trainable_params": int(r["trainable_params"]),
                         "params": bench.count_params(first_model)["total"],
                         "train_tmacs": train_macs * spe * cfg.batch_size * int(r["epochs"]) / 1e12,
                         "train_gmacs_per_image": train_macs / 1e9, "hook_gmacs_per_image": 0.0, **inf})
            hists[(int(r["seed"]), key)] = run.histories[(int(r["seed"]), target.name, r["method"])]
        if mode == "memory":
            exact[base] = _exactness(backbone, run, target.name, [int(s) for s in seeds], x_val)
    return pd.DataFrame(rows), hists, exact


@torch.no_grad()
def _exactness(backbone: nn.Module, run: Any, task: str, seeds: Sequence[int], x: torch.Tensor) -> dict[int, float]:
    from tokenbook.models import memory as M

    ref = backbone.eval()(x)
    method = run.results["method"].iloc[0]
    alone = {}
    for s in seeds:
        m = copy.deepcopy(run.models[(s, task, method)]).eval()
        m.rename_task(task, f"{task}_s{s}")
        alone[s] = m
    merged = M.concatenate(list(alone.values())).eval()
    out_merged = merged.forward_all(x)
    res = {}
    for s, m in alone.items():
        own = m.forward_all(x)
        name = f"{task}_s{s}"
        d_src = float((own[M.SOURCE] - ref).abs().max())
        d_cat = float((out_merged[name] - own[name]).abs().max())
        d_src_merged = float((out_merged[M.SOURCE] - ref).abs().max())
        res[s] = max(d_src, d_cat, d_src_merged)
    return res


# ----------------------------------------------------------------------------------------------------------
# tables and figures
# ----------------------------------------------------------------------------------------------------------
def print_run(row: dict) -> None:
    """One progress line per trained arm or fine-tuning run (the ``callback`` of :func:`run_seeds`)."""
    print(f"seed {row['seed']} {row['model']:<34} top-1 {row['top1']:6.2f}  {row['train_s']:5.1f} s", flush=True)


def per_seed_table(runs: dict[tuple[int, str], ArmRun], ft_rows: Any = None):
    """Every arm and seed in one table: the scratch runs, then the fine-tuning rows."""
    import pandas as pd

    df = pd.DataFrame([r.row for r in runs.values()])
    if ft_rows is not None and len(ft_rows):
        df = pd.concat([df, ft_rows], ignore_index=True)
    return df.drop(columns=["top5"], errors="ignore")  # top-5 of a 5-way task is always 100


def comparison_table(per_seed: Any, storage: dict[str, float], level: float = 0.95):
    """One row per arm: top-1 mean and t-interval over seeds, the per-seed values, training compute and wall time,
    inference MACs and latency, trainable parameters, storage per training image."""
    import pandas as pd

    rows = []
    order = list(dict.fromkeys(per_seed["arm"]))
    for key in order:
        g = per_seed[per_seed["arm"] == key]
        top = g["top1"].astype(float).tolist()
        if len(top) >= 2:
            m, lo, hi = mean_ci(top, level=level)
        else:
            m, lo, hi = float(top[0]), math.nan, math.nan
        r0 = g.iloc[0]
        rows.append({"arm": key, "model": r0["model"], "paper": r0["paper"], "composition": bool(r0["composition"]),
                     "task": "held-out classes" if key in {k for k, *_ in FINETUNE_ROWS} else "source classes",
                     "seeds": len(g), "top1": m, "top1_ci_low": lo, "top1_ci_high": hi,
                     "top1_per_seed": ", ".join(f"{v:.2f}" for v in top),
                     "train_tmacs": float(r0["train_tmacs"]),
                     "train_gmacs_per_image": float(r0["train_gmacs_per_image"]),
                     "train_s": float(g["train_s"].mean()), "infer_gmacs": float(r0["infer_gmacs"]),
                     "infer_gflops": float(r0["infer_gflops"]), "latency_ms": float(r0["latency_ms"]),
                     "trainable_params": int(r0["trainable_params"]), "params": int(r0["params"]),
                     "storage_bytes_per_image": storage[r0["input"]]})
    return pd.DataFrame(rows)


def pareto_figure(table: Any, latency_batch: int = 0):
    """Top-1 (mean, 95 % CI bars) against training compute, inference latency and storage per training image (the
    source-class arms), and the fine-tuning arms against their training compute. One colour and marker per arm in
    every panel (legend below); compositions as open markers; the dashed line joins the Pareto front (less cost, higher
    top-1)."""
    import matplotlib.pyplot as plt

    src = table[table["task"] == "source classes"]
    ft = table[table["task"] != "source classes"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    lat = f"CPU latency (ms per batch of {latency_batch})" if latency_batch else "CPU latency (ms)"
    panels = [("train_tmacs", "training compute (TMACs, forward + backward, all steps)", src,
               "accuracy vs training compute"),
              ("latency_ms", lat, src, "accuracy vs inference latency"),
              ("storage_bytes_per_image", "storage per training image (bytes, log scale)", src, "accuracy vs storage"),
              ("train_tmacs", "fine-tuning compute (TMACs)", ft, "fine-tuning on held-out classes")]
    colors = plt.get_cmap("tab20").colors
    markers = "osD^vP*Xhp<>"
    style = {k: (colors[i % len(colors)], markers[i % len(markers)]) for i, k in enumerate(table["arm"])}
    handles = {}
    for ax, (col, xlabel, df, title) in zip(axes.flat, panels):
        for _, r in df.iterrows():
            if not math.isfinite(r[col]) or not math.isfinite(r["top1"]):
                continue
            lo = r["top1"] - r["top1_ci_low"] if math.isfinite(r["top1_ci_low"]) else 0.0
            hi = r["top1_ci_high"] - r["top1"] if math.isfinite(r["top1_ci_high"]) else 0.0
            c, mk = style[r["arm"]]
            h = ax.errorbar([r[col]], [r["top1"]], yerr=[[lo], [hi]], fmt=mk, color=c, capsize=3, ms=8,
                            mfc="white" if r["composition"] else c, mew=1.6, label=r["model"])
            handles.setdefault(r["model"], h)
        pts = df[[col, "top1"]].astype(float).dropna().sort_values(col).to_numpy()
        front, best = [], -math.inf
        for x, y in pts:
            if y > best:
                front.append((x, y))
                best = y
        if len(front) > 1:
            ax.plot(*zip(*front), "--", color="grey", lw=1, zorder=0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("top-1 (%)" if df is src else "top-1 on held-out classes (%)")
        ax.set_title(title)
        if col == "storage_bytes_per_image":
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=4, fontsize=9, frameon=False)
    fig.suptitle("Pareto view: mean top-1 and 95 % CI over seeds (open markers: compositions no paper ran)",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.09, 1, 0.97))
    return fig


def curves_figure(histories: dict, labels: Optional[dict] = None):
    """Validation top-1 per epoch: the mean over seeds of every arm (line) with the seeds' range (band); source-class
    arms and fine-tuning arms side by side."""
    import matplotlib.pyplot as plt

    labels = labels or {}
    by_arm: dict[str, list] = {}
    for (s, k), h in sorted(histories.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if h is not None and "val_top1" in h and len(h):
            by_arm.setdefault(k, []).append(h[["epoch", "val_top1"]].dropna())
    ft_keys = {k for k, *_ in FINETUNE_ROWS}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = plt.get_cmap("tab20").colors
    order = [k for k in list(ARMS) + sorted(ft_keys, key=[r[0] for r in FINETUNE_ROWS].index) if k in by_arm]
    for i, k in enumerate(order):
        hs = by_arm[k]
        ax = axes[1] if k in ft_keys else axes[0]
        epochs = sorted(set().union(*[set(h["epoch"]) for h in hs]))
        vals = np.array([[float(h.set_index("epoch")["val_top1"].get(e, np.nan)) for e in epochs] for h in hs])
        c = colors[i % len(colors)]
        ax.plot(epochs, np.nanmean(vals, axis=0), marker="o", color=c, ms=4, label=f"{labels.get(k, k)} (n={len(hs)})",
                ls="--" if ARMS.get(k) is not None and ARMS[k].composition else "-")
        ax.fill_between(epochs, np.nanmin(vals, axis=0), np.nanmax(vals, axis=0), color=c, alpha=0.15)
    from matplotlib.ticker import MaxNLocator

    for ax, title in zip(axes, ("source classes: training from scratch", "held-out classes: fine-tuning")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation top-1 (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("validation top-1 per epoch: mean over seeds, band = the seeds' range (dashed: compositions)",
                 fontsize=10)
    fig.tight_layout()
    return fig


def toe_placement_table(params: dict, num_classes: int):
    """Where ToE's selection sits in each architecture and what it keeps, with the per-stage training MACs."""
    import pandas as pd

    rows = []
    for key in ("vit_toe", "t2t_toe", "vittm_toe"):
        arm = ARMS[key]
        model = build_arm_model(arm, params, num_classes, 0)
        ts = toe_method.find_token_selects(model)[0]
        seq = {"vit": "class token + 49 patches", "t2t": "class token + 49 T2T tokens",
               "vittm": "49 process tokens (196 memory tokens untouched)"}[arm.family]
        where = {"vit": "after block 0 (official)", "t2t": "after backbone block 0 (after the T2T module)",
                 "vittm": "process stream, after layer 0's process block"}[arm.family]
        mac = training_macs(model, arm, params, 1, 1)["train_gmacs_per_epoch_image"]
        full = training_macs(build_arm_model(ARMS[key.replace('_toe', '')], params, num_classes, 0),
                             ARMS[key.replace('_toe', '')], params, 1, 1)["train_gmacs_per_image"]
        rows.append({"arm": key, "model": arm.label, "selection": where, "sequence": seq,
                     "prefix_tokens": ts.num_prefix_tokens, "expansion_step": str(ts.expansion_step),
                     "keep_rate": str(ts.keep_rate),
                     "train_gmacs_per_image_by_epoch": ", ".join(f"{m:.4f}" for m in mac),
                     "full_token_train_gmacs_per_image": full, "compute_saving_x": full / float(np.mean(mac))})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------------
# claims
# ----------------------------------------------------------------------------------------------------------
def scale_text(params: dict, bundle: Any, target: Any, seeds: Sequence[int], seeds_text: str = "") -> str:
    src, tgt = ",".join(str(c) for c in parse_classes(params["source_classes"])), params["ft_target"]
    return (f"Fashion-MNIST classes {src} ({len(bundle.train)} train / {len(bundle.val)} val "
            f"images, 28 px, 1 channel), {params['epochs']} epochs x batch {params['batch_size']}, width "
            f"{params['embed_dim']} x depth {params['depth']}, {params['num_heads']} heads; fine-tuning on held-out "
            f"classes {tgt} ({len(target.bundle.train)} / {len(target.bundle.val)} images, "
            f"{params['ft_epochs']} epochs); " + (seeds_text or f"seeds {','.join(str(s) for s in seeds)}"))


def ft_scale_text(params: dict, target: Any, seeds: Sequence[int]) -> str:
    """The scale column of the fine-tuning claims: the backbone and the fine-tuning task and budget."""
    return (f"T2T-ViT backbone of seed {seeds[0]} trained on the source split; fine-tuned on {params['ft_target']} "
            f"({len(target.bundle.train)} train / {len(target.bundle.val)} val images, 28 px), {params['ft_epochs']} "
            f"epochs x batch {params['ft_batch_size']}, SGD lr {params['ft_lr']} (memory, "
            f"{params['memory_cells']} cells) / {params['ft_full_lr']} (full); seeds "
            f"{','.join(str(s) for s in seeds)}")


def _timing_device(params: dict) -> str:
    return "cuda" if torch.cuda.is_available() and str(params.get("accelerator", "auto")) != "cpu" else "cpu"


def speedup_scale(params: dict, batch_size: int, steps: int) -> str:
    """The scale column of the interleaved speed-up claims."""
    import platform

    d, L = int(params["embed_dim"]), int(params["depth"])
    dev = _timing_device(params)
    return (f"first seed's trained models (width {d}, depth {L}, 28 px), training step (forward + backward + update) "
            f"at batch {batch_size} on {dev} ({torch.get_num_threads()} threads, {platform.machine()}), {steps} "
            f"interleaved repeats per stage, stages weighted by this run's epochs {toe_stage_epochs(params)}")


def _by_seed(per_seed: Any, value: str = "top1") -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for _, r in per_seed.iterrows():
        out.setdefault(int(r["seed"]), {})[r["arm"]] = float(r[value])
    return out


def _curves(histories: dict, arms: Sequence[str]) -> list[list[float]]:
    out = []
    for (s, k), h in histories.items():
        if k in arms and h is not None and "val_top1" in h:
            out.append([float(v) for v in h["val_top1"].dropna()])
    return out


def floor_rows(per_seed: Any) -> list[dict]:
    """One row per arm trained from scratch on the source split for :func:`tokenbook.floors.beside_floors`: mean and
    worst-seed top-1, parameters and mean training seconds (:func:`tokenbook.floors.arm_row`)."""
    from tokenbook.floors import arm_row

    rows = []
    ft = {k for k, *_ in FINETUNE_ROWS}
    for key in dict.fromkeys(per_seed["arm"]):
        if key in ft:
            continue
        g = per_seed[per_seed["arm"] == key]
        rows.append({**arm_row(str(g["model"].iloc[0]), g["top1"].astype(float).tolist(), int(g["params"].iloc[0]),
                               g["train_s"].astype(float).tolist()), "arm": key})
    return rows


def composition_evidence(per_seed: Any, histories: dict, exactness: dict, scale: str, report: str = "",
                         speedups: Optional[dict[str, dict]] = None,
                         speedup_scale: str = "", floors: Any = None, ft_scale: str = "") -> list[Evidence]:
    """Evidence for every composition claim of ``cross_paper.yaml`` from the per-seed table; the speed-up claims
    from the interleaved step timing of :func:`toe_speedups` (``speedups``; without it they get no evidence and
    show as ``failed``). ``floors`` (:func:`tokenbook.floors.floors_table` of the source split): a run of an arm
    trained from scratch below the logistic floor is a failed run (the fine-tuning rows train on another task and
    are not judged by it). ``ft_scale``: the scale column of the fine-tuning claims (default ``scale``)."""
    from tokenbook.floors import failed_baseline_runs

    top = _by_seed(per_seed)
    wall = _by_seed(per_seed, "train_s")
    speedups = speedups or {}
    ev: list[Evidence] = []
    kw = dict(scale=scale, report=report)

    def have(*arms: str) -> bool:
        return all(any(a in d for d in top.values()) for a in arms)

    for fam in ("t2t", "vittm"):
        if not have(fam, f"{fam}_toe"):
            continue
        ev.append(paired_evidence(f"cross_paper.toe_{fam}_lossless", top, f"{fam}_toe", fam, floors=floors,
                                  curves=_curves(histories, [fam, f"{fam}_toe"]),
                                  detail=f"top-1 of {fam} + ToE minus {fam}, same seed, same init and batches", **kw))
        sp = speedups.get(f"{fam}_toe")
        if sp is not None:
            walls = [wall[s][fam] / wall[s][f"{fam}_toe"] for s in sorted(wall) if fam in wall[s] and
                     f"{fam}_toe" in wall[s]]
            ev.append(Evidence(claim=f"cross_paper.toe_{fam}_speedup", ratio=sp["ratio"], q1=sp["q1"], q3=sp["q3"],
                               scale=speedup_scale or scale, report=report,
                               detail=f"{sp['repeats']} interleaved repeats of every active stage's training step "
                                      "with and without ToE, weighted by the run's epochs per stage; per-run wall "
                                      "time ratios (runs one after the other, not interleaved): "
                                      + ", ".join(f"{w:.2f}x" for w in walls)))
    if "t2t" in exactness:
        ex = exactness["t2t"]
        ev.append(Evidence(claim="cross_paper.memory_t2t_exact", a=[ex[s] for s in sorted(ex)], b=[0.0] * len(ex),
                           detail="max |difference| per seed of the source head (vs the plain backbone) and of the "
                                  "task's logits in the concatenation of all seeds' tasks (vs stand-alone)",
                           scale=ft_scale or scale, report=report))
    if have("t2t_memory", "t2t_full"):
        ev.append(paired_evidence("cross_paper.memory_t2t_approaches_full", top, "t2t_full", "t2t_memory",
                                  curves=_curves(histories, ["t2t_memory", "t2t_full"]),
                                  detail="full minus memory fine-tuning top-1 on the fine-tuning task",
                                  scale=ft_scale or scale, report=report))
    if have("t2t", "t2t_tokens", "vit", "seit"):
        cost = {s: {"t2t": d["t2t"] - d["t2t_tokens"], "vit": d["vit"] - d["seit"]} for s, d in top.items()
                if {"t2t", "t2t_tokens", "vit", "seit"} <= set(d)}
        arms4 = ("t2t", "t2t_tokens", "vit", "seit")
        extra = {} if floors is None else {"failed_run": failed_baseline_runs(
            {a: {s: d[a] for s, d in top.items() if a in d} for a in arms4}, floors)}
        ev.append(paired_evidence("cross_paper.tokens_t2t_cost", cost, "t2t", "vit", **extra,
                                  curves=_curves(histories, ["t2t", "t2t_tokens", "vit", "seit"]),
                                  detail="(T2T-ViT pixels - T2T-ViT tokens) minus (ViT pixels - SeiT tokens), "
                                         "top-1 points per seed", **kw))
    return ev


def findings_markdown(table: Any, verdicts: Any, per_seed: Any = None) -> str:
    """A short, number-backed reading of the comparison and the composition verdicts."""
    t = table.set_index("arm")
    lines = ["**What this run says** (small scale; the verdicts' intervals decide, not the means):", ""]
    src = table[table["task"] == "source classes"].sort_values("top1", ascending=False)
    if len(src):
        best = src.iloc[0]
        lines.append(f"- Highest mean top-1 on the source classes: {best['model']} at {best['top1']:.2f} % "
                     f"(95 % CI {best['top1_ci_low']:.2f} to {best['top1_ci_high']:.2f}).")
        cheap = src.sort_values("train_tmacs").iloc[0]
        lines.append(f"- Least training compute: {cheap['model']} ({cheap['train_tmacs']:.3f} TMACs, "
                     f"{cheap['top1']:.2f} %).")
    if "vit" in t.index and "seit" in t.index:
        lines.append(f"- Storage per training image: {t.loc['vit', 'storage_bytes_per_image']:.0f} B as PNG, "
                     f"{t.loc['seit', 'storage_bytes_per_image']:.0f} B as tokens "
                     f"({t.loc['seit', 'storage_bytes_per_image'] / t.loc['vit', 'storage_bytes_per_image']:.1%}).")
    if per_seed is not None:
        d = _by_seed(per_seed)
        for fam, label in (("vit", "ViT"), ("t2t", "T2T-ViT"), ("vittm", "ViTTM")):
            diffs = [x[f"{fam}_toe"] - x[fam] for x in d.values() if fam in x and f"{fam}_toe" in x]
            if len(diffs) >= 2:
                m, lo, hi = mean_ci(diffs)
                lines.append(f"- {label} + ToE minus {label}, paired by seed: {m:+.2f} pt (95 % CI {lo:+.2f} to "
                             f"{hi:+.2f}).")
    for _, v in verdicts.iterrows():
        ci = (f"[{v['ci_low']:.3g}, {v['ci_high']:.3g}]" if v["ci_low"] is not None and
              not (isinstance(v["ci_low"], float) and math.isnan(v["ci_low"])) else "no interval")
        ours = "n/a" if v["ours"] is None or (isinstance(v["ours"], float) and math.isnan(v["ours"])) else \
            f"{v['ours']:.3g}"
        if "IQR" in str(v.get("method", "")):  # a speed-up: median ratio of interleaved repeats and its IQR
            lines.append(f"- `{v['claim']}`: **{v['verdict']}** (ours {ours}x, IQR {ci} of interleaved repeats).")
        elif ci == "no interval" and v["verdict"] not in ("failed", "not_testable_here"):  # exactness, bounds
            lines.append(f"- `{v['claim']}`: **{v['verdict']}** ({v['method']}; criterion {v['criterion']}).")
        else:
            lines.append(f"- `{v['claim']}`: **{v['verdict']}** (ours {ours}, 95 % CI {ci}, n = {v['n']}).")
    return "\n".join(lines)


def storage_per_image(bundle: Any, tokens: Any, n: int) -> tuple[dict[str, float], Any]:
    """Bytes per training image as PNG (lossless pixels) and as SeiT's gzip'd token files, from
    :func:`tokenbook.experiments.seit.storage_table` on ``n`` validation images; returns ``({input: bytes}, table)``."""
    from tokenbook.experiments import seit as seit_exp

    imgs = bundle.val.images_tensor(min(n, len(bundle.val)))
    st = seit_exp.storage_table(imgs, tokens)
    s = st.set_index("format")["bytes_per_image"]
    return {"pixels": float(s["PNG"]), "tokens": float(s["tokens (gzip stream + gzip index)"])}, st


def target_task(params: dict, channels: int = 1):
    """The fine-tuning task ``ft_target``, new to the backbones: ``digits`` (scikit-learn's 1,797 8x8 digits, offline,
    as 05_memory uses) or ``fm:<classes>`` disjoint from ``source_classes``; at 28 px with ``channels`` (the
    backbone's)."""
    from tokenbook.experiments import memory as mem_exp

    item = str(params["ft_target"]).strip()
    if item.startswith("fm:"):
        src = set(parse_classes(params["source_classes"]))
        tgt = parse_classes([int(c) for c in item[3:].split(",") if c.strip()])
        if src & set(tgt):
            raise ValueError(f"ft_target {item!r} overlaps source_classes {sorted(src)}: the fine-tuning task must be "
                             "new to the backbones (use digits)")
    elif item != "digits":
        raise ValueError(f"ft_target must be digits or fm:<classes>, got {item!r}")
    return mem_exp.load_target_tasks([item], img_size=28, channels=int(channels),
                                     train_subset=int(params["ft_train_subset"]) or None,
                                     val_subset=int(params["ft_val_subset"]) or None,
                                     data_dir=params.get("data_dir") or None, seed=int(params["seed"]))[0]


def recipe_table(params: dict):
    import pandas as pd

    p = pixel_config(params, 0)
    rows = [{"arms": "pixel arms (ViT, ViTTM, T2T-ViT, + ToE)", "epochs": p.epochs, "batch_size": p.batch_size,
             "opt": p.opt, "lr": p.lr, "weight_decay": p.weight_decay, "warmup_epochs": p.warmup_epochs,
             "min_lr": p.min_lr, "augmentation": f"CutMix {p.cutmix:g}, label smoothing {p.label_smoothing:g}"},
            {"arms": "token arms (SeiT, + TokenAdapt/ColorAdapt, T2T-ViT on tokens)", "epochs": p.epochs,
             "batch_size": p.batch_size, "opt": p.opt, "lr": p.lr, "weight_decay": p.weight_decay,
             "warmup_epochs": p.warmup_epochs, "min_lr": p.min_lr,
             "augmentation": f"SeiT batch hook (Emb-Noise std {float(params.get('emb_noise', 1.0)):g} / ColorAdapt / "
                             f"TokenAdapt, CutMix {float(params.get('token_cutmix', 1.0)):g}, smoothing 0.1), "
                             f"Token-EDA {'on' if params.get('token_eda', True) else 'off'}, crop "
                             f"{int(params['crop'])} of the {token_grid(params)}x{token_grid(params)} id map"},
            {"arms": "fine-tuning (memory, full)", "epochs": int(params["ft_epochs"]),
             "batch_size": int(params["ft_batch_size"]), "opt": "sgd (momentum 0.9, clip 1.0)",
             "lr": float(params["ft_lr"]), "weight_decay": 0.0, "warmup_epochs": math.nan, "min_lr": 0.0,
             "augmentation": f"none; full fine-tuning lr {float(params['ft_full_lr']):g}, "
                             f"{int(params['ft_warmup_steps'])} warm-up steps, {int(params['memory_cells'])} memory "
                             "cells"}]
    return pd.DataFrame(rows)



def load_splits(params: dict):
    """``(source bundle, held-out target task, a table describing both)``."""
    import pandas as pd

    bundle, target = source_bundle(params), target_task(params)
    table = pd.DataFrame([{"split": "source (comparison, pre-training)", **bundle.describe(),
                           "classes": ", ".join(bundle.class_names)},
                          {"split": "fine-tuning task (new to the backbones)", **target.bundle.describe(),
                           "classes": ", ".join(target.bundle.class_names)}])
    return bundle, target, table


@dataclass
class TokenPrep:
    """What the token arms need, built once per notebook: token data, TokenAdapt f/g (when an arm uses it), the
    storage per image of both inputs and the tables that describe them."""

    tokens: Any = None
    tokenadapt: Optional[nn.Module] = None
    tokenadapt_history: Any = None
    storage: dict = None
    storage_table: Any = None
    token_info: Any = None


def prepare_tokens(arms: Sequence[str], bundle: Any, params: dict, profile: str,
                   timer: Optional[Callable[[str], Any]] = None) -> TokenPrep:
    """Tokenizer (and TokenAdapt for ``seit_ta_ca``) trained once, and the storage table, when any arm trains on
    tokens; otherwise storage is NaN for both inputs. ``timer(name)`` (e.g. ``ctx.timer``) times each stage."""
    import contextlib

    import pandas as pd

    timer = timer or (lambda name: contextlib.nullcontext())
    if not any(ARMS[a].input == "tokens" for a in arms):
        return TokenPrep(storage={"pixels": math.nan, "tokens": math.nan})
    out = TokenPrep()
    with timer("tokenizer"):
        out.tokens = build_tokens(bundle, params, profile)
    if "seit_ta_ca" in arms:
        with timer("tokenadapt"):
            out.tokenadapt, out.tokenadapt_history = train_tokenadapt(out.tokens, bundle, params)
    out.storage, out.storage_table = storage_per_image(bundle, out.tokens, int(params["storage_images"]))
    out.token_info = pd.DataFrame([out.tokens.describe()])
    return out


def build_tokens(bundle: Any, params: dict, profile: str):
    """SeiT-format tokens of the source images from the VQ tokenizer of the run store (04_seit's
    :func:`tokenbook.experiments.seit.stored_tokens` with :func:`tokenizer_params`: trained once, read back), written
    under ``token_dir`` (default: the cache, ``seit/cross_paper-<profile>``) and read back."""
    from tokenbook.experiments import seit as seit_exp

    root = params.get("token_dir") or str(seit_exp.cache_dir("seit", f"cross_paper-{profile}"))
    return seit_exp.stored_tokens(bundle, root, tokenizer_params(params), via_store=True)[0]


def train_tokenadapt(tokens: Any, bundle: Any, params: dict):
    """TokenAdapt f/g for the ``seit_ta_ca`` arm from the run store (04_seit's
    :func:`tokenbook.experiments.seit.stored_tokenadapt`: trained once with ``seed``); returns (module, history)."""
    from tokenbook.experiments import seit as seit_exp

    ta, hist, _ = seit_exp.stored_tokenadapt(tokens, bundle, tokenizer_params(params), via_store=True)
    return ta, hist


# ----------------------------------------------------------------------------------------------------------
# GPU budget (an estimate: no GPU was at hand when this was written)
# ----------------------------------------------------------------------------------------------------------
def _ta_sizes(params: dict) -> dict:
    """TokenAdapt's constructor arguments under ``params`` (the token grid, :func:`token_grid`, in; ``crop`` out)."""
    return dict(code_dim=int(params["code_dim"]), codebook_size=int(params["codebook_size"]),
                in_grid=token_grid(params),
                out_grid=int(params["crop"]), dim=int(params["ta_dim"]), heads=int(params["ta_heads"]),
                dim_head=int(params["ta_dim_head"]))


def _token_costable(arm: Arm, params: dict, num_classes: int):
    """The token arm's model with its SeiT batch hook as the device-side batch work (ids in, as the loader gives)."""
    from tokenbook.experiments.seit import token_costable

    return token_costable(build_arm_model(arm, params, num_classes, 0), arm.variant, _ta_sizes(params), num_classes,
                          int(params["crop"]), float(params["rrc_scale_min"]), grid=token_grid(params))


def gpu_loops(params: dict) -> list:
    """This notebook's training loops under ``params`` as :class:`tokenbook.gpu_budget.Loop` rows (what
    :func:`tokenbook.gpu_budget.estimate` costs): every arm x seeds (ToE arms per stage at their kept tokens, token arms
    with their batch hook), the fine-tuning rows, the tokenizer and TokenAdapt, the interleaved ToE timing and the
    latency benchmarks."""
    from tokenbook import gpu_budget as G
    from tokenbook.experiments import memory as mem_exp
    from tokenbook.experiments import seit as seit_exp

    nb = "06_cross_paper"
    src = parse_classes(params["source_classes"])
    n_tr, n_va = G.fm_images(params["train_subset"], len(src)), G.fm_images(params["val_subset"], len(src), G.FM_VAL)
    ft = str(params["ft_target"])
    tgt = list(range(10)) if ft == "digits" else parse_classes([int(c) for c in ft[3:].split(",")])
    if ft == "digits":  # tokenbook.data.tasks.digits_data: 1,797 images, the rest of the train subset validates
        n_ft = min(int(params["ft_train_subset"]) or 1797, 1797)
        nv_ft = min(int(params["ft_val_subset"]) or 1797 - n_ft, 1797 - n_ft)
    else:
        n_ft = G.fm_images(params["ft_train_subset"], len(tgt))
        nv_ft = G.fm_images(params["ft_val_subset"], len(tgt), G.FM_VAL)
    seeds, w = len(params["seeds"]), int(params.get("num_workers", 0))
    dims = (int(params["embed_dim"]), int(params["depth"]), int(params["num_heads"]))
    loops: list = []
    for key in parse_arms(params["arms"]):
        arm = ARMS[key]
        label = f"{arm.label} x {seeds} seeds"
        if arm.input == "tokens":
            cfg = seit_exp.train_config(token_params(params, 0), arm.variant)
            loops.append(G.Loop(nb, label, lambda arm=arm: _token_costable(arm, params, len(src)), data="tokens",
                                per_sample=True, key=("06", key, dims), **G.fit_fields(cfg, n_tr, n_va, w, seeds)))
            continue
        cfg = pixel_config(params, 0)
        fit = G.fit_fields(cfg, n_tr, n_va, w, seeds)
        if not arm.toe:
            loops.append(G.Loop(nb, label, G.pixel_build(lambda arm=arm: build_arm_model(arm, params, len(src), 0),
                                                          28, 1), key=("06", key, dims), **fit))
            continue
        stages = [toe_method.stage_for_epoch(toe_kwargs(params)["expansion_step"], e) for e in range(cfg.epochs)]
        for st in dict.fromkeys(stages):  # charged per stage at its kept tokens; evaluation is full-token (ToE off)
            k, e0 = stages.count(st), stages.index(st)

            def make(arm=arm, e0=e0):
                m = build_arm_model(arm, params, len(src), 0)
                toe_method.ToEStageHook().on_epoch_start(e0, m)
                return m
            loops.append(G.Loop(nb, f"{label}, ToE stage {st} ({k} epochs)", G.pixel_build(make, 28, 1),
                                key=("06", key, dims, st), **{**fit, "epochs": k, "evals": k,
                                                              "steps": fit["steps"] // cfg.epochs * k}))
    ft = finetune_config(params)  # the config finetune_arms trains with (fp32)
    for key, label, base, mode in FINETUNE_ROWS:
        def make_ft(base=base, mode=mode):
            bb = build_arm_model(ARMS[base], params, len(src), 0).eval().requires_grad_(False)
            return mem_exp.finetune_model(bb, mode, len(tgt), cells=int(params["memory_cells"]) if mode == "memory"
                                          else 0, task="t")
        loops.append(G.Loop(nb, f"fine-tuning: {label} x {seeds} seeds", G.pixel_build(make_ft, 28, 1),
                            key=("06", key, dims), **G.fit_fields(ft, n_ft, nv_ft, w, seeds)))
    tokens = [k for k in parse_arms(params["arms"]) if ARMS[k].input == "tokens"]
    if tokens:
        tok = dict(in_chans=1, image_size=28 + 2 * int(params.get("tokenizer_pad", 0)),
                   downsample=int(params.get("tokenizer_downsample", 2)), codebook_size=int(params["codebook_size"]),
                   code_dim=int(params["code_dim"]), hidden=int(params["tokenizer_hidden"]))
        loops.append(G.Loop(nb, f"VQ tokenizer training ({params['tokenizer_steps']} steps)",
                            lambda: seit_exp.tokenizer_costable(tok), steps=int(params["tokenizer_steps"]),
                            batch=int(params["tokenizer_batch"]), precision="32-true", opt="adam", data="memory",
                            key=("vq", G.freeze(tok)), note="tokenizing every image after: not charged"))
        if any(seit_exp.VARIANTS[ARMS[k].variant][2] for k in tokens):
            ta = _ta_sizes(params)
            loops.append(G.Loop(nb, f"TokenAdapt f/g training ({params['ta_steps']} steps)",
                                lambda: seit_exp.tokenadapt_costable(tok, ta, True), steps=int(params["ta_steps"]),
                                batch=int(params["ta_batch"]), precision="32-true", data="memory", per_sample=True,
                                key=("ta", G.freeze(tok), G.freeze(ta), True)))
    toe_arms = [k for k in parse_arms(params["arms"]) if ARMS[k].toe]
    if toe_arms:
        n_steps = 2 * 3 * (int(params["speedup_warmup"]) + int(params["speedup_steps"]))  # 2 active stages
        for k in toe_arms:
            base = ARMS[TOE_BASES[k]]
            loops.append(G.Loop(nb, f"interleaved ToE step timing: {ARMS[k].label}",
                                G.pixel_build(lambda base=base: build_arm_model(base, params, len(src), 0), 28, 1),
                                batch=int(params["speedup_batch"]), precision="32-true", opt="sgd", steps=n_steps,
                                data="none", key=("06", "speedup", k, dims),
                                note="fp32, synthetic batches; 3 variants x 2 stages, each at the full-token step "
                                     "(an upper bound)"))
    if params.get("latency", True):
        timed = len([k for k in parse_arms(params["arms"]) if not ARMS[k].toe]) + len(FINETUNE_ROWS)
        loops.append(G.latency_loop(nb, "inference of the trained models", timed,
                                    float(params["latency_min_run_time"])))
    return loops


def gpu_budget_estimate(params: dict, **kw):
    """ESTIMATE, not a measurement, of this notebook's minutes on one H100/H200-class GPU under ``params``:
    :func:`tokenbook.gpu_budget.estimate` of :func:`gpu_loops` (``kw``: its rates); the last row is the total."""
    from tokenbook import gpu_budget as G

    return G.estimate(gpu_loops(params), **kw)


def profile_params(profile: str, root: Any = None) -> dict:
    """This notebook's parameters under another profile (defaults of the parameters cell + the profile's YAML)."""
    from pathlib import Path

    from tokenbook.results import repo_root
    from tokenbook.runner import profile_parameters

    return profile_parameters(Path(root) if root is not None else repo_root(), "06_cross_paper", profile)
