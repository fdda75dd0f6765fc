"""The arms of ``06_cross_paper``, re-exported by :mod:`tokenbook.experiments.cross_paper` (import them from there):
what each comparison row is (:class:`Arm`, ``ARMS``, ``FINETUNE_ROWS``), the source split and the pixel and token
recipes of an arm, its model (timm name and keywords, ToE attached), and how its training and inference are counted
(MACs with attention, latency), the seeds each arm trains (:data:`CLAIM_ARMS`, :func:`arm_seed_plan`), and the arms
judged on every held-out image (:func:`judge_heldout`). Imports nothing
of :mod:`tokenbook.experiments.cross_paper` (which imports this).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from tokenbook import bench
from tokenbook.methods import toe as toe_method
from tokenbook.params import as_list



@dataclass
class ArmRun:
    """One trained (arm, seed): its table row, validation history and model (CPU)."""

    arm: str
    seed: int
    row: dict
    history: Any
    model: nn.Module
    data: Optional[dict] = None  # a stored run's data config (its own channels), for judge_heldout


@dataclass(frozen=True)
class Arm:
    """One row of the comparison: how to build and train it."""

    key: str
    label: str
    paper: str  # which paper's method the row stands for ("" for the baseline)
    model: str  # timm registry name
    input: str = "pixels"  # pixels | tokens
    family: str = "vit"  # vit | vittm | t2t (the model kwargs that apply)
    toe: bool = False
    variant: str = ""  # SeiT batch-hook variant of a token arm (tokenbook.experiments.seit.VARIANTS)
    composition: bool = False


ARMS: dict[str, Arm] = {a.key: a for a in (
    Arm("vit", "ViT (baseline)", "", "vit_fm_tiny_p4_28"),
    Arm("vittm", "ViTTM", "ViTTM", "vittm_cpu_m2p4_28", family="vittm"),
    Arm("t2t", "T2T-ViT", "T2T-ViT", "t2t_vit_tiny_fmnist", family="t2t"),
    Arm("vit_toe", "ViT + ToE", "ToE", "vit_fm_tiny_p4_28", toe=True),
    Arm("seit", "SeiT (ViT on tokens)", "SeiT", "deit_fm_micro_token_32", input="tokens", variant="seit"),
    Arm("seit_ta_ca", "SeiT + TokenAdapt + ColorAdapt", "SeiT/TokenAdapt", "deit_fm_micro_token_32",
        input="tokens", variant="seit_ta_ca"),
    Arm("t2t_toe", "T2T-ViT + ToE", "composition", "t2t_vit_tiny_fmnist", family="t2t", toe=True, composition=True),
    Arm("vittm_toe", "ViTTM + ToE", "composition", "vittm_cpu_m2p4_28", family="vittm", toe=True, composition=True),
    Arm("t2t_tokens", "T2T-ViT on SeiT tokens", "composition", "t2t_vit_fm_token_32", input="tokens", family="t2t",
        variant="seit", composition=True),
)}

#: The arms each paired claim of ``cross_paper.yaml`` compares, for the seed plan (:func:`arm_seed_plan`).
CLAIM_ARMS: dict[str, tuple[str, ...]] = {
    "cross_paper.toe_t2t_lossless": ("t2t_toe", "t2t"),
    "cross_paper.toe_vittm_lossless": ("vittm_toe", "vittm"),
    "cross_paper.tokens_t2t_cost": ("t2t", "t2t_tokens", "vit", "seit"),
}


def own_seeds(arm_seeds: Optional[dict], arm: str, seeds: Sequence[int]) -> set[int]:
    """The seeds ``arm`` trains: its own list in ``arm_seeds`` (:func:`arm_seed_plan`), else every one of ``seeds``."""
    return {int(s) for s in (arm_seeds or {}).get(arm, seeds)}


def arm_seed_plan(plan: Any, run_seeds: Sequence[int], arms: Sequence[str], base: int) -> dict[str, list[int]]:
    """``{arm: seeds}`` under a :func:`tokenbook.claims.plan_seeds` plan: an arm that a paired claim compares
    (:data:`CLAIM_ARMS`) trains the seeds of the claim using it that needs the most (a claim the pilot has no paired
    seeds of: the ``base`` first seeds, :func:`tokenbook.claims.arm_seeds`); every other arm trains the ``base``
    first seeds. The fine-tuning rows take the base seeds too (their claims are planned at most at the base)."""
    from tokenbook.claims import arm_seeds

    got = arm_seeds(plan, run_seeds, CLAIM_ARMS, arms, unplanned=base)
    used = {a for pair in CLAIM_ARMS.values() for a in pair}
    return {a: (s if a in used else list(run_seeds)[:base]) for a, s in got.items()}


#: fine-tuning rows: (key, label, backbone arm, mode, memory cells)
FINETUNE_ROWS = (
    ("vit_memory", "ViT: memory fine-tuning", "vit", "memory"),
    ("vit_full", "ViT: full fine-tuning", "vit", "full"),
    ("t2t_memory", "T2T-ViT: memory fine-tuning", "t2t", "memory"),
    ("t2t_full", "T2T-ViT: full fine-tuning", "t2t", "full"),
)


def parse_arms(text: Sequence[str]) -> list[str]:
    """``["vit", "vittm", ...]`` or ``["all"]`` -> arm keys in :data:`ARMS` order; unknown names raise."""
    names = as_list(text, "arms")
    names = list(ARMS) if names in ([], ["all"]) else names
    bad = [n for n in names if n not in ARMS]
    if bad:
        raise ValueError(f"unknown arms {bad}; choose from {list(ARMS)} or 'all'")
    needs = {"t2t_toe": "t2t", "vittm_toe": "vittm", "vit_toe": "vit", "seit_ta_ca": "seit", "t2t_tokens": "seit"}
    missing = sorted({needs[n] for n in names if n in needs and needs[n] not in names})
    if missing:
        raise ValueError(f"arms {names} need their comparison partners {missing} as well")
    return [n for n in ARMS if n in names]


def parse_classes(text: Sequence[int]) -> list[int]:
    out = as_list(text, "classes")
    if (not out or len(set(out)) != len(out)
            or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 9 for c in out)):
        raise ValueError(f"classes must be distinct Fashion-MNIST labels 0..9, got {text!r}")
    return out


# ----------------------------------------------------------------------------------------------------------
# data and recipes
# ----------------------------------------------------------------------------------------------------------
def source_data_config(params: dict):
    """The source split's ``DataConfig``: Fashion-MNIST ``source_classes`` at 28 px, one channel, class-balanced
    subsets (``classes`` None when all ten: the split 00-03 train on)."""
    from tokenbook.data import DataConfig

    classes = parse_classes(params["source_classes"])
    return DataConfig(dataset="fashion_mnist", data_dir=params.get("data_dir") or None, img_size=28, channels=1,
                      train_subset=params["train_subset"] or None, val_subset=params["val_subset"] or None,
                      classes=None if sorted(classes) == list(range(10)) else classes,
                      subset_seed=int(params["seed"]))


def source_bundle(params: dict):
    """The pre-training data (:func:`source_data_config`)."""
    from tokenbook.data import load_data

    return load_data(source_data_config(params))


def pixel_config(params: dict, seed: int):
    """The shared recipe of every pixel arm (``TrainConfig``): the notebook's epochs, batch, AdamW and cosine schedule,
    CutMix ``pixel_cutmix`` and label smoothing ``label_smoothing`` (what SeiT's hook does to the token arms)."""
    from tokenbook.train import TrainConfig

    return TrainConfig(epochs=int(params["epochs"]), batch_size=int(params["batch_size"]), lr=float(params["lr"]),
                       weight_decay=float(params["weight_decay"]), warmup_epochs=float(params["warmup_epochs"]),
                       min_lr=float(params["min_lr"]), cutmix=float(params["pixel_cutmix"]),
                       label_smoothing=float(params["label_smoothing"]), seed=int(seed), progress=False,
                       max_steps_per_epoch=params.get("max_steps_per_epoch") or None,
                       max_steps=params.get("max_steps") or None, accelerator=str(params.get("accelerator", "auto")),
                       precision=str(params.get("precision", "32-true")))


def token_params(params: dict, seed: int) -> dict:
    """The parameters :mod:`tokenbook.experiments.seit` expects for a token arm, from this notebook's."""
    keys = ("epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "min_lr", "accelerator", "precision",
            "max_steps_per_epoch", "max_steps", "label_smoothing")
    out = {k: params[k] for k in keys if k in params}
    out.update(seed=int(seed), ta_warmup_epochs=float(params["warmup_epochs"]), crop=int(params["crop"]),
               rrc_scale_min=float(params["rrc_scale_min"]))
    return out


def arm_model(arm: Arm, params: dict) -> str:
    """The timm name of ``arm`` under ``params`` (``vit_model`` / ``vittm_model`` for the pixel ViT and ViTTM arms)."""
    if arm.input == "pixels" and arm.family == "vit":
        return str(params.get("vit_model", arm.model))
    if arm.input == "pixels" and arm.family == "vittm":
        return str(params.get("vittm_model", arm.model))
    return arm.model


def _model_kwargs(arm: Arm, params: dict, num_classes: int) -> dict:
    d, L, h = int(params["embed_dim"]), int(params["depth"]), int(params["num_heads"])
    kw: dict[str, Any] = dict(num_classes=num_classes, embed_dim=d, depth=L, num_heads=h)
    if arm.input == "pixels":
        kw["in_chans"] = 1
        if arm.family == "t2t":
            from tokenbook.models import t2t_vit as tv

            kw.update(img_size=28, depth=int(params.get("t2t_depth") or L),
                      num_heads=int(params.get("t2t_num_heads") or h))
            if int(params.get("t2t_tokens", 49)) == 16:
                kw["soft_split"] = tv.FMNIST_SOFT_SPLIT_16
    else:
        kw.update(in_chans=int(params["code_dim"]), img_size=int(params["crop"]))
        if arm.family == "t2t":  # T2T-ViT on tokens: the pixel T2T-ViT arm's depth and heads
            kw.update(depth=int(params.get("t2t_depth") or L), num_heads=int(params.get("t2t_num_heads") or h))
    return kw


def toe_kwargs(params: dict) -> dict:
    """ToE's configuration for the run: the official stages 0/100/200 of 300 scaled to ``epochs``, keep rates
    0.5/0.75/1.0, r0 0.25, k 2 (DeiT-S defaults; ``toe_keep_rate`` etc. override them)."""
    steps = toe_method.scale_expansion_step([0, 100, 200], int(params["epochs"]), 300)
    return dict(expansion_step=steps, keep_rate=[float(x) for x in params["toe_keep_rate"]],
                initialization_keep_rate=float(params["toe_initialization_keep_rate"]), expansion_multiple_stage=2)


def build_arm_model(arm: Arm, params: dict, num_classes: int, seed: int) -> nn.Module:
    """The arm's model right after ``seed_everything(seed)`` (identical weights for an arm and its ToE twin)."""
    import timm

    from tokenbook import models as _models  # noqa: F401  (registers the workbook's models)
    from tokenbook.repro import seed_everything

    seed_everything(int(seed))
    model = timm.create_model(arm_model(arm, params), **_model_kwargs(arm, params, num_classes))
    if arm.toe:
        toe_method.attach_token_select(model, **toe_kwargs(params))
    return model


# ----------------------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------------------
def _example(arm: Arm, params: dict, n: int = 2, chans: int = 1) -> torch.Tensor:
    if arm.input == "pixels":
        return torch.randn(n, int(chans), 28, 28)
    c = int(params["crop"])
    return torch.randn(n, int(params["code_dim"]), c, c)


def training_macs(model: nn.Module, arm: Arm, params: dict, steps_per_epoch: int, batch_size: int,
                  chans: int = 1, epochs: Optional[int] = None) -> dict:
    """Training compute of a run: MACs per training image of one step (forward + backward, counted) x images seen;
    ToE: per epoch at that epoch's stage. Returns total TMACs, per-image GMACs (epoch mean) and per-stage detail."""
    epochs = int(params["epochs"] if epochs is None else epochs)
    x = _example(arm, params, chans=chans)
    model = model.cpu()
    ts = toe_method.find_token_selects(model)
    per_epoch = []
    if ts:
        saved = ts[0].expansion_stage
        try:
            for e in range(epochs):
                ts[0].update_current_stage(e)
                per_epoch.append(bench.count_train_macs(model, x)["macs_per_image"])
        finally:
            ts[0].expansion_stage = saved
    else:
        per_epoch = [bench.count_train_macs(model, x)["macs_per_image"]] * epochs
    images = steps_per_epoch * batch_size
    total = sum(m * images for m in per_epoch)
    return {"train_tmacs": total / 1e12, "train_gmacs_per_image": float(np.mean(per_epoch)) / 1e9,
            "train_gmacs_per_epoch_image": [m / 1e9 for m in per_epoch]}


def stored_row(key: str, seed: int, spec: Any, out: Any, model: nn.Module, source: str = "",
               in_chans: Optional[int] = None) -> dict:
    """The per-seed table row of a stored run of arm ``key`` (``spec``/``out``: the store's spec and
    :class:`tokenbook.runs.TrainedRun`; ``model``: the rebuilt classifier), before any measurement."""
    arm, a = ARMS[key], spec.args
    final, timing = dict(out.final), dict(out.timing)
    row = {"arm": key, "model": arm.label, "paper": arm.paper or "baseline", "composition": arm.composition,
           "input": arm.input, "seed": int(seed), "top1": final.get("val_top1", final.get("val_top1_memory")),
           "top5": final.get("val_top5"), "epochs": int(a["train"]["epochs"]), "steps": int(timing["steps"]),
           "batch_size": int(a["batch_size"]), "train_s": timing["wall_time_s"], "step_ms": timing["step_ms"],
           "trainable_params": int(out.trainable_params), "params": bench.count_params(model)["total"]}
    if in_chans is not None:
        row["in_chans"] = int(in_chans)
    row.update(timm_name=a["model_name"], store=source, run_trainer=spec.trainer.split(":")[0])
    return row


def training_compute(model: nn.Module, arm: Arm, params: dict, row: dict, chans: int = 1,
                     hook_macs: float = 0.0) -> dict:
    """A stored run's training compute for its ``row`` (:func:`stored_row`): :func:`training_macs` over the run's
    steps and epochs, plus ``hook_macs`` (a token arm's batch hook, per image) for every image seen."""
    epochs, batch = int(row["epochs"]), int(row["batch_size"])
    spe = max(1, int(row["steps"]) // epochs)
    out = training_macs(model, arm, params, spe, batch, chans=chans, epochs=epochs)
    out.pop("train_gmacs_per_epoch_image")
    out["hook_gmacs_per_image"] = hook_macs / 1e9
    out["train_tmacs"] += hook_macs * spe * batch * epochs / 1e12
    return out


def inference_numbers(model: nn.Module, example: torch.Tensor, params: dict, latency: bool) -> dict:
    """Inference MACs/FLOPs per image (``eval()``, attention counted) and CPU latency of a batch."""
    model = model.cpu().eval()
    mc = bench.count_macs(model, example=example[:1])
    out = {"infer_gmacs": mc["gmacs"], "infer_gflops": mc["gflops"], "latency_ms": math.nan,
           "latency_iqr_ms": math.nan}
    if latency:
        b = int(params["latency_batch"])
        ex = example[:1].expand(b, *example.shape[1:]).contiguous()
        lat = bench.measure_latency(model, batch_size=b, example=ex, input_size=tuple(ex.shape[1:]),
                                    min_run_time=float(params["latency_min_run_time"]))
        out.update(latency_ms=lat.median_ms, latency_iqr_ms=lat.iqr_ms)
    return out


# ----------------------------------------------------------------------------------------------------------
# judged on every held-out image (issue 19): tokenbook.heldout, as 01-04
# ----------------------------------------------------------------------------------------------------------
def judge_heldout(runs: dict, heldout_bundle: Any, token_loader: Any = None) -> dict:
    """The arms trained on the source split (``runs`` of ``cross_paper.run_seeds``: ``{(seed, arm): ArmRun}``),
    each model evaluated once more on every held-out image of the source classes: ``heldout_bundle``
    (:func:`tokenbook.heldout.heldout_bundle` of the source split), or for a stored run with its own data config
    (``ArmRun.data``: 01-03's runs feed some models 3 channels) the held-out split of that config. ``row["top1"]``
    becomes that top-1 (the first head, as the stored ``val_top1``), the validation subset's value moves to
    ``row["val_subset_top1"]``; histories (and the plateau rule) stay on the subset. Token arms read the ids of the
    same held-out images from ``token_loader`` (``cross_paper.heldout_token_loader``; without it they are refused).
    Returns ``{(seed, arm): held-out top-1}``."""
    import json

    from tokenbook.data import DataConfig
    from tokenbook.heldout import heldout_bundle as split_of, heldout_top1

    token = sorted({k for (_, k), r in runs.items() if r.row.get("input") != "pixels"})
    if token and token_loader is None:
        raise ValueError(f"token arms {token} ran: their held-out judgement needs the held-out ids (token_loader)")
    if token and len(token_loader.dataset) != len(heldout_bundle.val):
        raise ValueError(f"{len(token_loader.dataset)} held-out token maps for {len(heldout_bundle.val)} images")
    bundles: dict = {}
    out = {}
    for key, r in runs.items():
        b, ids = heldout_bundle, token_loader if r.row.get("input") != "pixels" else None
        if r.data is not None and ids is None:
            c = json.dumps(r.data, sort_keys=True)
            if c not in bundles:
                bundles[c] = split_of(DataConfig(**r.data))
            b = bundles[c]
            if len(b.val) != len(heldout_bundle.val):
                raise ValueError(f"arm {key}: its held-out split has {len(b.val)} images, the source's "
                                 f"{len(heldout_bundle.val)}: not the same classes")
        out[key] = heldout_top1({"m": r.model}, b, loader=ids)["m"]
        r.row.setdefault("val_subset_top1", r.row["top1"])
        r.row["top1"] = out[key]
    return out
