"""T2T-ViT notebook support (``notebooks/02_t2t_vit.ipynb``): paper-table views, small-scale experiments, figures
and the paper's training recipes. The models live in :mod:`tokenbook.models.t2t_vit`.

- **Tables 1-7**: :func:`variant_table` counts parameters and MACs (attention counted) of every registered variant,
  the paper's reference ViTs and, optionally, timm's versions of the CNN rows; models are built on the ``meta`` device,
  so counting the 64M-parameter models costs about a second each and no memory. :func:`paper_tables_view` lays
  those numbers out as the paper's Tables 1-7 (paper columns with their source next to ours).
- **From scratch at small scale**: :func:`train_variants` trains each variant of
  :func:`fmnist_ablations` (or ``imagenet_ablations``) with one shared budget and seed and
  measures MACs and time; :func:`ablation_table` puts the result beside the paper's Table 7 deltas.
- **Seeds and claims**: :func:`train_seeds` (in :mod:`~tokenbook.experiments.t2t_vit_runs`, with the run store path)
  repeats the runs for several seeds, paired by seed (same init seed and
  batches for every arm of a seed); :func:`seed_summary` gives mean and 95 % CI; :func:`structural_evidence` and
  :func:`empirical_evidence` turn the tables and runs into ``tokenbook.claims.Evidence`` for the sheet's claims.
- **Figures**: :func:`plot_feature_rows` (Figure 2 style: token features as images), :func:`plot_receptive_fields`
  (soft-split windows), :func:`attention_panels` (T2T-layer and backbone attention for ``viz.plot_maps``).
- **Recipes**: :func:`imagenet_recipe` (AdamW, lr by model size at batch 512, 300 + 10 cooldown epochs, Mixup 0.8 /
  CutMix 1.0, label smoothing 0.1, EMA 0.99996; data preset ``deit``; drop path 0.1) and :func:`transfer_recipe`
  (Table 5: CIFAR-10/100, SGD, 60 epochs) with :class:`TransferLrHook`, :class:`PadCropFlipHook` and
  :func:`prepare_for_transfer` for what the training engine does not do itself (0.01x learning rate on the
  pretrained part, frozen class token and final norm, the official pad-28 random crop).

Size: one notebook's support (tables, claims evidence, figures, recipes); its training runs (in the kernel or through
the run store) and the paper's parameter counts are in :mod:`tokenbook.experiments.t2t_vit_runs` and re-exported
here, so that the trainer of the stored runs imports none of this module in launcher processes and jobs.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from tokenbook.models import t2t_vit as tv
from tokenbook.params import LaunchParams, ReleasedParams, SeedPlanParams
from tokenbook.params import param

# the runs (in the kernel or through the run store) and the paper's parameter counts live in t2t_vit_runs
from tokenbook.experiments.t2t_vit_runs import (SeededRuns, TrainedVariants, frozen_tables, param_counts,  # noqa: F401
                                                train_seeds, train_variant_run, train_variants, variant_spec)


# ----------------------------------------------------------------------------------------------------------
# parameters: the notebook's parameters cell is generated from this class (python -m tokenbook.params --sync)
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Params(ReleasedParams, LaunchParams, SeedPlanParams):  # released, launcher, seed-plan fields (tokenbook.params)
    """The parameters of notebooks/02_t2t_vit.ipynb (its parameters cell is generated from this class)."""

    NOTEBOOK: ClassVar[str] = "02_t2t_vit"
    #: run_all.sh --proof: two seeds (a paired claim needs two), a CPU batch, one process per run, runs one after the
    #: other in the kernel
    PROOF: ClassVar[dict] = {"seeds": [0, 1], "batch_size": 4, "num_workers": 0, "executor": "kernel",
                             "devices": 1, "num_nodes": 1, "strategy": "auto"}

    seed: int = param(0, "seed of the data subsets and of the notebook's other random draws [0, inf)")
    seeds: list[int] = param([0, 1, 2],
                             "training seeds: every trained variant runs once per seed, paired by seed (same init "
                             "seed and batches for all arms)")
    table_models: list[str] = param(["all"],
                                    "T2T-ViT registry names for the tables, name@384 for 384 px; all means every "
                                    "official and Table 6/7 name")
    table_references: list[str] = param(["ViT-S/16", "ViT-B/16", "ViT-L/16", "DeiT-small"],
                                        "paper reference ViTs to count")
    table_cnns: list[str] = param(["ResNet50", "ResNet101", "ResNet152", "MobileNetV2-1.0x*", "MobileNetV2-1.4x*", "MobileNetV3", "VGG11", "Inception-v3", "DenseNet201*", "SENet50*", "ResNeXt50*"],
                                  "CNN rows counted with timm's models")
    table_img_size: int = param(224, "input side of the tables [1, inf)")
    scale: str = param("fmnist", "fmnist: small CPU variants of the ablations; imagenet: the paper's 14-size models")
    dataset: str = param("fashion_mnist", "fashion_mnist | folder:<path> | hf:<id>")
    data_dir: str = param(
        "", "Fashion-MNIST IDX folder; empty: $TOKENBOOK_FASHION_MNIST, Debian package, then the hub", none="")
    img_size: int = param(28, "training input side; 28 or 32 for the fmnist scale [1, inf)")
    channels: int = param(1, "image channels fed to the models; 1 keeps Fashion-MNIST grey [1, inf)")
    train_subset: int = param(6000, "training images, class-balanced; 0 means all [0, inf)", none=0)
    val_subset: int = param(1000, "validation images; 0 means all [0, inf)", none=0)
    preset: str = param("none", "per-sample augmentation preset, see tokenbook.data.PRESETS; deit is the paper's")
    embed_dim: int = param(64,
                           "fmnist scale: backbone width of the deep-narrow models; 0 keeps the registry's 128 [0, "
                           "inf)", none=0)
    depth: int = param(8, "fmnist scale: backbone depth, a multiple of 4; 0 keeps the registry's 8 [0, inf)", none=0)
    num_heads: int = param(2, "fmnist scale: attention heads; 0 keeps the registry's 4 [0, inf)", none=0)
    tokens: int = param(49, "fmnist scale: patch tokens into the backbone at 28 px: 49 (7 x 7, 4 px patches) or 16 "
                              "(4 x 4, 7 px patches; the cpu scale) [16, 49]", choices=(49, 16))
    train_variants: list[str] = param(["t2t_performer", "no_t2t", "t2t_transformer", "t2t_convolution", "deep_narrow", "shallow_wide", "vit"],
                                      "variants to train; t2t_performer and no_t2t are needed by the figures; vit is"
                                      " the plain ViT of similar size")
    epochs: int = param(2, "training epochs, the same budget for every variant [1, inf)")
    batch_size: int = param(32, "training batch size per device (the loaders' batch); over several devices the "
                                "global batch is batch_size x devices x num_nodes; small batches give more steps per "
                                "CPU second [1, inf)")
    lr: float = param(0.001, "peak learning rate of AdamW (0, inf)")
    weight_decay: float = param(0.05, "AdamW weight decay [0, inf)")
    warmup_epochs: float = param(0.3, "linear warmup, in epochs [0, inf)")
    warmup_lr: float = param(1e-06, "learning rate at the start of the warmup [0, inf)")
    min_lr: float = param(1e-05, "final learning rate of the cosine schedule [0, inf)")
    cooldown_epochs: int = param(0, "epochs at min_lr after the cosine; the paper uses 10 of 310 [0, inf)")
    mixup: float = param(0.0, "Mixup alpha; the paper uses 0.8 [0, inf)")
    cutmix: float = param(0.0, "CutMix alpha; the paper uses 1.0 [0, inf)")
    label_smoothing: float = param(0.0, "label smoothing; the paper uses 0.1 [0, 1)")
    drop_path_rate: float = param(0.0, "stochastic depth of the backbone; the paper uses 0.1 [0, 1)")
    ema_decay: float = param(0.0, "EMA decay of the weights; 0 turns EMA off; the paper uses 0.99996 [0, 1)")
    max_steps_per_epoch: int = param(0, "cut epochs short; 0 means full epochs [0, inf)", none=0)
    num_workers: int = param(0, "DataLoader workers [0, inf)")
    fit_floors: bool = param(True, "also fit the reference floors on the same split: logistic regression on pixels, "
                             "a small CNN")
    floor_cnn_epochs: int = param(10, "epochs of the small-CNN floor [1, inf)")
    judge_heldout: bool = param(False, "judge the claims and the floors on every held-out image of the classes "
                                 "(tokenbook.heldout: each stored model evaluated once more); the curves stay on "
                                 "val_subset; no effect when val_subset is all")
    accelerator: str = param("auto", "cpu | cuda | auto")
    devices: int = param(1, "devices per node of each run; over several, one DDP run (the paper: 8 GPUs x 64) [1, "
                            "inf)")
    num_nodes: int = param(1, "nodes of each run; over several, executor submitit [1, inf)")
    strategy: str = param("auto", "strategy of a run over several devices: ddp (ranks started by executor torchrun "
                                  "or submitit) or ddp_notebook (started from the kernel); auto on one device")
    precision: str = param("32-true", "32-true | bf16-mixed")
    num_figure_images: int = param(3, "images in the attention figure [1, inf)")
    feature_channels: int = param(8, "channels per row of the feature figure [1, inf)")

__all__ = [
    "PAPER_NAMES", "REFERENCE_VITS", "CNN_TIMM", "PAPER_TABLE_ROWS", "TABLE7_PAPER", "build_reference",
    "variant_table", "paper_tables_view", "TrainedVariants", "train_variants", "ablation_table", "plot_feature_rows",
    "top_channels", "plot_receptive_fields", "attention_panels", "IMAGENET_RECIPE", "IMAGENET_LR_WD",
    "IMAGENET_DATA", "IMAGENET_MODEL_KWARGS", "imagenet_recipe", "TRANSFER_RECIPE", "TRANSFER_DATA",
    "transfer_recipe", "TransferLrHook", "PadCropFlipHook", "prepare_for_transfer", "recipe_table",
    "fmnist_ablations", "imagenet_ablations", "t2t_token_features", "vit_patch_features", "t2t_attention_maps",
    "backbone_attention_maps", "plain_vit_like", "PLAIN_VIT", "SeededRuns", "train_seeds", "variant_spec", "train_variant_run", "mean_by_variant",
    "seed_summary", "CLAIM_ARMS", "train_planned", "add_heldout", "MACS_MAIN", "structural_evidence", "run_scale", "launch_options", "empirical_evidence", "floor_rows", "frozen_tables", "param_counts",
]

PAPER = "t2t_vit"

#: registry name -> (paper name, paper tables the row appears in)
PAPER_NAMES: dict[str, tuple[str, str]] = {
    "t2t_vit_7": ("T2T-ViT-7", "1, 4"),
    "t2t_vit_10": ("T2T-ViT-10", "README"),
    "t2t_vit_12": ("T2T-ViT-12", "1, 4"),
    "t2t_vit_14": ("T2T-ViT-14", "1, 2, 3, 5, 6, 7"),
    "t2t_vit_19": ("T2T-ViT-19", "1, 3, 5"),
    "t2t_vit_24": ("T2T-ViT-24", "1, 2, 3"),
    "t2t_vit_t_14": ("T2T-ViT_t-14", "1, 3, 7"),
    "t2t_vit_t_19": ("T2T-ViT_t-19", "3, 7"),
    "t2t_vit_t_24": ("T2T-ViT_t-24", "3, 7"),
    "t2t_vit_14_resnext": ("T2T-ViT-ResNeXt", "6"),
    "t2t_vit_14_wide": ("T2T-ViT-Wide / d768-4", "6, 7"),
    "t2t_vit_14_se": ("T2T-ViT-SE", "6"),
    "t2t_vit_dense": ("T2T-ViT-Dense", "6"),
    "t2t_vit_16_ghost": ("T2T-ViT-Ghost", "6"),
    "t2t_vit_14_wo_t2t": ("T2T-ViT-14 w/o T2T", "7"),
    "t2t_vit_c_14": ("T2T-ViT_c-14", "7"),
    "t2t_vit_14@384": ("T2T-ViT-14 at 384 px", "2"),
    "t2t_vit_t_14@384": ("T2T-ViT_t-14 at 384 px", "-"),
}

#: the paper's reference ViTs: row label -> (timm model name or None, kwargs). The paper's "ViT-S/16" is the early
#: timm ``vit_small_patch16_224`` (768 wide, 8 deep, 8 heads, MLP 2304, no qkv bias; 48.6M), not DeiT-S.
REFERENCE_VITS: dict[str, tuple[Optional[str], dict]] = {
    "ViT-S/16": (None, dict(patch_size=16, embed_dim=768, depth=8, num_heads=8, mlp_ratio=3.0, qkv_bias=False)),
    "ViT-B/16": ("vit_base_patch16_224", {}),
    "ViT-L/16": ("vit_large_patch16_224", {}),
    "DeiT-small": ("deit_small_patch16_224", {}),
}

#: CNN rows of Tables 3, 4, 6 for which timm has the same architecture: row label -> (timm name, input size)
CNN_TIMM: dict[str, tuple[str, int]] = {
    "ResNet50": ("resnet50", 224), "ResNet101": ("resnet101", 224), "ResNet152": ("resnet152", 224),
    "MobileNetV2-1.0x*": ("mobilenetv2_100", 224), "MobileNetV2-1.4x*": ("mobilenetv2_140", 224),
    "MobileNetV3": ("mobilenetv3_large_100", 224), "VGG11": ("vgg11", 224), "Inception-v3": ("inception_v3", 299),
    "DenseNet201*": ("densenet201", 224), "SENet50*": ("seresnet50", 224), "ResNeXt50*": ("resnext50_32x4d", 224),
}

#: the paper's Tables 1-7 as rows: (table, row label as printed, model key in our results / the references file,
#: metric suffix used by the references file for this table's printing, e.g. "_table7")
PAPER_TABLE_ROWS: list[tuple[str, str, str, str]] = [
    ("1", "ViT-S/16", "ViT-S/16", ""), ("1", "ViT-B/16", "ViT-B/16", ""), ("1", "ViT-L/16", "ViT-L/16", ""),
    ("1", "T2T-ViT-14", "t2t_vit_14", ""), ("1", "T2T-ViT-19", "t2t_vit_19", ""),
    ("1", "T2T-ViT-24", "t2t_vit_24", ""), ("1", "T2T-ViT_t-14", "t2t_vit_t_14", ""),
    ("1", "T2T-ViT-7", "t2t_vit_7", "_table1"), ("1", "T2T-ViT-12", "t2t_vit_12", "_table1"),
    ("2", "ViT-S/16", "ViT-S/16", ""), ("2", "DeiT-small", "DeiT-small", ""),
    ("2", "DeiT-small-Distilled", "DeiT-small-Distilled", ""), ("2", "T2T-ViT-14", "t2t_vit_14", ""),
    ("2", "T2T-ViT-14 (384)", "t2t_vit_14@384", ""), ("2", "ViT-B/16", "ViT-B/16", "_table2"),
    ("2", "ViT-L/16", "ViT-L/16", ""), ("2", "T2T-ViT-24", "t2t_vit_24", ""),
    ("3", "ResNet50", "ResNet50", ""), ("3", "ResNet50*", "ResNet50*", ""), ("3", "T2T-ViT-14", "t2t_vit_14", ""),
    ("3", "T2T-ViT_t-14", "t2t_vit_t_14", ""), ("3", "ResNet101", "ResNet101", ""),
    ("3", "ResNet101*", "ResNet101*", ""), ("3", "T2T-ViT-19", "t2t_vit_19", ""),
    ("3", "T2T-ViT_t-19", "t2t_vit_t_19", ""), ("3", "ResNet152", "ResNet152", ""),
    ("3", "ResNet152*", "ResNet152*", ""), ("3", "T2T-ViT-24", "t2t_vit_24", ""),
    ("3", "T2T-ViT_t-24", "t2t_vit_t_24", ""),
    ("4", "MobileNetV1 1.0x*", "MobileNetV1-1.0x*", ""), ("4", "T2T-ViT-7", "t2t_vit_7", ""),
    ("4", "T2T-ViT-7-Distilled", "T2T-ViT-7-Distilled", ""), ("4", "MobileNetV2 1.0x*", "MobileNetV2-1.0x*", ""),
    ("4", "MobileNetV2 1.4x*", "MobileNetV2-1.4x*", ""), ("4", "MobileNetV3", "MobileNetV3", ""),
    ("4", "T2T-ViT-12", "t2t_vit_12", ""), ("4", "T2T-ViT-12-Distilled", "T2T-ViT-12-Distilled", ""),
    ("4", "T2T-ViT-10 (README)", "t2t_vit_10", ""),
    ("5", "ViT/S-16", "ViT-S/16", ""), ("5", "T2T-ViT-14", "t2t_vit_14", ""),
    ("5", "T2T-ViT-19", "t2t_vit_19", "_table5"),
    ("6", "AlexNet", "AlexNet", ""), ("6", "VGG11", "VGG11", ""), ("6", "Inception v3", "Inception-v3", ""),
    ("6", "ResNet50*", "ResNet50*", ""), ("6", "Wide-ResNet18x1.5*", "Wide-ResNet18x1.5*", ""),
    ("6", "DenseNet201*", "DenseNet201*", ""), ("6", "SENet50*", "SENet50*", ""),
    ("6", "ResNeXt50*", "ResNeXt50*", ""), ("6", "ResNet50-Ghost*", "ResNet50-Ghost*", ""),
    ("6", "ViT-S/16", "ViT-S/16", ""), ("6", "ViT-DN", "ViT-DN", ""), ("6", "ViT-SW", "ViT-SW", ""),
    ("6", "ViT-Dense", "ViT-Dense", ""), ("6", "ViT-SE", "ViT-SE", ""), ("6", "ViT-ResNeXt", "ViT-ResNeXt", ""),
    ("6", "ViT-Ghost", "ViT-Ghost", ""), ("6", "T2T-ViT-14", "t2t_vit_14", ""),
    ("6", "T2T-ViT-Wide", "t2t_vit_14_wide", ""), ("6", "T2T-ViT-Dense", "t2t_vit_dense", ""),
    ("6", "T2T-ViT-SE", "t2t_vit_14_se", ""), ("6", "T2T-ViT-ResNeXt", "t2t_vit_14_resnext", ""),
    ("6", "T2T-ViT-Ghost", "t2t_vit_16_ghost", ""),
    ("7", "T2T-ViT-14 w/o T2T", "t2t_vit_14_wo_t2t", ""), ("7", "T2T-ViT-14 (performer)", "t2t_vit_14", ""),
    ("7", "T2T-ViT_t-14 (transformer)", "t2t_vit_t_14", ""), ("7", "T2T-ViT_c-14 (convolution)", "t2t_vit_c_14", ""),
    ("7", "T2T-ViT-d768-4 (shallow-wide)", "t2t_vit_14_wide", "_table7"),
    ("7", "T2T-ViT-19", "t2t_vit_19", ""), ("7", "T2T-ViT_t-19", "t2t_vit_t_19", ""),
    ("7", "T2T-ViT-24", "t2t_vit_24", ""), ("7", "T2T-ViT_t-24", "t2t_vit_t_24", ""),
]

#: Table 7 (ImageNet, T2T-ViT-14 scale) for each small-scale variant: variant -> (paper model key, metric suffix,
#: baseline variant). Deltas are taken against the baseline variant, as the paper's table does.
TABLE7_PAPER: dict[str, tuple[str, str, str]] = {
    "t2t_performer": ("t2t_vit_14", "", "t2t_performer"),
    "t2t_transformer": ("t2t_vit_t_14", "", "t2t_performer"),
    "t2t_convolution": ("t2t_vit_c_14", "", "t2t_performer"),
    "no_t2t": ("t2t_vit_14_wo_t2t", "", "t2t_performer"),
    "deep_narrow": ("t2t_vit_14", "", "deep_narrow"),
    "shallow_wide": ("t2t_vit_14_wide", "_table7", "deep_narrow"),
}


# ----------------------------------------------------------------------------------------------------------
# Tables 1-7: parameters and MACs
# ----------------------------------------------------------------------------------------------------------
def build_reference(label: str, img_size: int = 224, device: Any = "meta", **kwargs: Any) -> nn.Module:
    """One of :data:`REFERENCE_VITS` (e.g. ``"ViT-S/16"``, the paper's 48.6M model) or :data:`CNN_TIMM`."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    with torch.device(device):
        if label in REFERENCE_VITS:
            name, kw = REFERENCE_VITS[label]
            if name is None:
                return VisionTransformer(img_size=img_size, **{**kw, **kwargs})
            return timm.create_model(name, img_size=img_size, **kwargs)
        if label in CNN_TIMM:
            return timm.create_model(CNN_TIMM[label][0], **kwargs)
    raise ValueError(f"unknown reference model {label!r}; use one of {sorted(REFERENCE_VITS) + sorted(CNN_TIMM)}")


def _split_size(name: str, img_size: int) -> tuple[str, int]:
    if "@" in name:
        base, size = name.split("@", 1)
        return base, int(size)
    return name, img_size


def variant_table(names: Sequence[str], img_size: int = 224, references: Sequence[str] = (),
                  cnns: Sequence[str] = (), device: Any = "meta") -> "Any":
    """Params and MACs (attention counted; FLOPs = 2 MACs) of T2T-ViT registry names (``name@384`` for another
    input size), paper reference ViTs (:data:`REFERENCE_VITS`) and CNN rows (:data:`CNN_TIMM`), one row each.

    Columns: model, paper_name, paper_tables, family, tokens_type, embed_dim, depth, num_heads, mlp_hidden,
    img_size, tokens (patch tokens into the backbone), params (all, incl. the frozen tables, as the paper counts),
    params_trainable, params_m, t2t_params, gmacs (= macs_g), gflops, t2t_gmacs. Built on ``device`` (``meta``: no
    memory, no weights; counts and MACs are exact because they depend on shapes only).
    """
    import pandas as pd
    import timm

    from tokenbook import bench

    rows = []
    for full in names:
        name, size = _split_size(full, img_size)
        if name not in tv.OFFICIAL_CONFIGS:
            raise ValueError(f"{name!r} is not a T2T-ViT registry name; use one of {sorted(tv.OFFICIAL_CONFIGS)}")
        with torch.device(device):
            m = timm.create_model(name, img_size=size)
        cfg = tv.OFFICIAL_CONFIGS[name]
        pc = param_counts(m)  # + the frozen tables (buffers here, parameters officially), as the paper counts
        mc = bench.count_macs(m, input_size=(m.tokens_to_token.in_chans, size, size))
        t2t_mc = bench.count_macs(m.tokens_to_token, input_size=(m.tokens_to_token.in_chans, size, size))
        hidden = (int(cfg["embed_dim"] * cfg["mlp_ratio"]) if "block_config" not in cfg
                  else f"{cfg['embed_dim']}-{m.num_features} wide")
        rows.append(dict(
            model=full, paper_name=PAPER_NAMES.get(full, (full, ""))[0], paper_tables=PAPER_NAMES.get(full, ("", "-"))[1],
            family="T2T-ViT", tokens_type=cfg["tokens_type"], embed_dim=cfg["embed_dim"],
            depth=cfg["depth"] if "block_config" not in cfg else sum(cfg["block_config"]),
            num_heads=cfg["num_heads"], mlp_hidden=str(hidden), img_size=size,
            tokens=m.tokens_to_token.num_patches, params=pc["total"], params_trainable=pc["trainable"],
            params_m=pc["total"] / 1e6, t2t_params=param_counts(m.tokens_to_token)["total"],
            gmacs=mc["gmacs"], macs_g=mc["gmacs"], gflops=mc["gflops"], t2t_gmacs=t2t_mc["gmacs"]))
    for label in list(references) + list(cnns):
        size = CNN_TIMM[label][1] if label in CNN_TIMM else img_size
        m = build_reference(label, img_size=size, device=device)
        pc = bench.count_params(m)
        mc = bench.count_macs(m, input_size=(3, size, size))
        is_vit = label in REFERENCE_VITS
        rows.append(dict(
            model=label, paper_name=label, paper_tables="1, 2, 5, 6" if label == "ViT-S/16" else "",
            family="ViT" if is_vit else "CNN (timm " + CNN_TIMM[label][0] + ")",
            tokens_type="hard split 16 px" if is_vit else "-",
            embed_dim=getattr(m, "embed_dim", None), depth=len(m.blocks) if is_vit else None,
            num_heads=m.blocks[0].attn.num_heads if is_vit else None,
            mlp_hidden=str(m.blocks[0].mlp.fc1.out_features) if is_vit else "-", img_size=size,
            tokens=m.patch_embed.num_patches if is_vit else None, params=pc["total"],
            params_trainable=pc["trainable"], params_m=pc["total"] / 1e6, t2t_params=None, gmacs=mc["gmacs"],
            macs_g=mc["gmacs"], gflops=mc["gflops"], t2t_gmacs=None))
    return pd.DataFrame(rows)


@functools.lru_cache(maxsize=1)
def _refs() -> dict:
    from tokenbook import references

    out: dict = {}
    for r in references.load(PAPER):
        out.setdefault((r.model, r.metric), r)
    return out


def _ref(model: str, metric: str):
    """The paper/official reference for (model, metric) or None (the references file is parsed once)."""
    return _refs().get((model, metric))


def paper_tables_view(measured: "Any", tables: Optional[Sequence[str]] = None) -> "Any":
    """The paper's Tables 1-7 (:data:`PAPER_TABLE_ROWS`) with paper params / MACs / ImageNet top-1 (as printed in
    that table, with the source) beside our params / MACs from ``measured`` (a :func:`variant_table`) and the
    difference. ``n/a`` where the paper prints no value or we did not build the model; ImageNet top-1 is the
    paper's only (reproducing it needs ImageNet training, which only the ``full`` profile configures)."""
    import pandas as pd

    from tokenbook.results import NA

    by_model = {r["model"]: r for r in measured.to_dict("records")}
    rows = []
    for table, label, key, suffix in PAPER_TABLE_ROWS:
        if tables is not None and table not in tables:
            continue
        ours = by_model.get(key)
        row: dict[str, Any] = {"table": table, "row": label, "model": key}
        sources: list[str] = []
        for metric, col in (("params_m", "params_m"), ("macs_g", "gmacs")):
            ref = _ref(key, metric + suffix) or _ref(key, metric)
            paper = ref.value if ref is not None else None
            mine = ours[col] if ours is not None else None
            row[f"paper_{metric}"] = paper if paper is not None else NA
            row[f"ours_{metric}"] = round(mine, 3) if mine is not None else NA
            row[f"diff_{metric}"] = round(mine - paper, 3) if (paper is not None and mine is not None) else NA
            if ref is not None:
                sources.append(f"{metric.split('_')[0]}: {ref.source} [{ref.kind}]")
        ref = _ref(key, "top1" + suffix) or _ref(key, "top1")
        row["paper_in1k_top1"] = ref.value if ref is not None else NA
        row["ours_in1k_top1"] = NA
        if ref is not None:
            sources.append(f"top1: {ref.source} [{ref.kind}]")
        row["paper_source"] = "; ".join(sources) or NA
        rows.append(row)
    return pd.DataFrame(rows)


def ablation_table(summary: "Any", metric: str = "top1") -> "Any":
    """Small-scale results beside the paper's Table 7 (ImageNet, T2T-ViT-14 scale). With seeds, a variant's top-1
    is its mean over its seeds, and its delta the mean of its paired deltas (the seeds both arms trained).

    One row per variant in ``summary`` (:func:`train_variants`): the paper's model, top-1, its delta to the
    baseline variant (``TABLE7_PAPER``), params, MACs and MACs ratio to the baseline, with the source; ours: the
    same quantities measured in this run; ``same_direction`` says whether our delta has the paper's sign (``n/a``
    for the baselines and when a value is missing). Accuracies of different datasets are not comparable, only
    the directions of the deltas and the cost ratios are.
    """
    import pandas as pd

    from tokenbook.results import NA

    per_seed = summary if "seed" in summary.columns else None
    if per_seed is not None:
        summary = mean_by_variant(per_seed)
    ours = summary.set_index("variant")
    rows = []
    for key in summary["variant"]:
        if key not in TABLE7_PAPER:
            continue
        pmodel, suffix, base = TABLE7_PAPER[key]
        bmodel, bsuffix, _ = TABLE7_PAPER[base]

        def pv(model, metric_, sfx):
            r = _ref(model, metric_ + sfx) or _ref(model, metric_)
            return r

        r_top, b_top = pv(pmodel, "top1", suffix), pv(bmodel, "top1", bsuffix)
        r_mac, b_mac = pv(pmodel, "macs_g", suffix), pv(bmodel, "macs_g", bsuffix)
        r_par = pv(pmodel, "params_m", suffix)
        p_top = r_top.value if r_top else None
        p_delta = p_top - b_top.value if (r_top and b_top) else None
        o_top = ours.loc[key, metric]
        o_delta = o_top - ours.loc[base, metric] if base in ours.index else None
        is_base = key == base
        same = NA if (is_base or p_delta is None or o_delta is None) else bool(np.sign(p_delta) == np.sign(o_delta))
        rows.append({
            "variant": key, "baseline": base, "paper_model": PAPER_NAMES.get(pmodel, (pmodel,))[0],
            "paper_top1": p_top if p_top is not None else NA,
            "paper_delta_top1": round(p_delta, 2) if p_delta is not None else NA,
            "paper_params_m": r_par.value if r_par else NA, "paper_macs_g": r_mac.value if r_mac else NA,
            "paper_macs_ratio": round(r_mac.value / b_mac.value, 3) if (r_mac and b_mac) else NA,
            "paper_source": "; ".join(sorted({f"{r.source} [{r.kind}]" for r in (r_top, r_mac, r_par) if r})) or NA,
            "ours_model": ours.loc[key, "model"], f"ours_{metric}": round(float(o_top), 2),
            f"ours_delta_{metric}": round(float(o_delta), 2) if o_delta is not None else NA,
            "ours_params_m": round(float(ours.loc[key, "params_m"]), 4),
            "ours_mmacs": round(float(ours.loc[key, "mmacs"]), 2),
            "ours_macs_ratio": round(float(ours.loc[key, "gmacs"] / ours.loc[base, "gmacs"]), 3)
            if base in ours.index else NA,
            "ours_step_ms": round(float(ours.loc[key, "step_ms"]), 1),
            "ours_time_ratio": round(float(ours.loc[key, "step_ms"] / ours.loc[base, "step_ms"]), 3)
            if base in ours.index else NA,
            "same_direction": same,
        })
        if per_seed is not None:  # paired by seed: the delta's 95 % t-interval over the seeds
            diffs = _paired_diffs(per_seed, key, base, metric)
            ci = _ci(diffs) if not is_base else (None, None, None)
            if diffs and not is_base:  # the mean of the paired deltas (the arms may train different seeds)
                d = float(np.mean(diffs))
                rows[-1][f"ours_delta_{metric}"] = round(d, 2)
                rows[-1]["same_direction"] = NA if p_delta is None else bool(np.sign(p_delta) == np.sign(d))
            rows[-1].update({"seeds": _seed_list(per_seed), "n_seeds": len(diffs),
                             f"ours_delta_{metric}_ci_low": NA if ci[1] is None else round(ci[1], 2),
                             f"ours_delta_{metric}_ci_high": NA if ci[2] is None else round(ci[2], 2)})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------------
# Several seeds, paired by seed; evidence for the claims ledger (tokenbook.claims)
# ----------------------------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------------------------
# Several seeds, paired by seed; evidence for the claims ledger (tokenbook.claims)
# ----------------------------------------------------------------------------------------------------------
def _seed_list(per_seed: "Any") -> str:
    return ",".join(str(int(s)) for s in dict.fromkeys(per_seed["seed"]))


def _paired_diffs(per_seed: "Any", a: str, b: str, metric: str) -> list[float]:
    """``metric`` of variant ``a`` minus that of ``b``, per seed where both ran (paired by seed)."""
    t = per_seed.pivot_table(index="seed", columns="variant", values=metric, aggfunc="first")
    if a not in t or b not in t:
        return []
    d = (t[a] - t[b]).dropna()
    return [float(x) for x in d]


def _ci(values: Sequence[float]) -> tuple[Optional[float], Optional[float], Optional[float]]:
    """Mean and 95 % Student-t interval (None for the interval with fewer than 2 values)."""
    from tokenbook.claims import mean_ci

    if len(values) == 0:
        return None, None, None
    if len(values) < 2:
        return float(values[0]), None, None
    return mean_ci(values)


def mean_by_variant(per_seed: "Any") -> "Any":
    """One row per variant (first-seen order): numeric columns averaged over the seeds, others from the first
    seed; ``seed`` dropped."""
    g = per_seed.drop(columns=["seed"]).groupby("variant", sort=False)
    num = [c for c in per_seed.columns if c not in ("seed", "variant") and
           per_seed[c].dtype.kind in "fiu"]
    out = g.first()
    out[num] = g[num].mean()
    return out.reset_index()[[c for c in per_seed.columns if c != "seed"]]


def seed_summary(per_seed: "Any", metric: str = "top1") -> "Any":
    """Accuracy over the seeds, one row per variant: the seeds, per-seed values, mean, standard deviation and the
    95 % t-interval of the mean (``n/a`` with one seed)."""
    import pandas as pd

    from tokenbook.results import NA

    rows = []
    for key, g in per_seed.groupby("variant", sort=False):
        v = [float(x) for x in g[metric]]
        m, lo, hi = _ci(v)
        rows.append({"variant": key, "model": g["model"].iloc[0], "seeds": _seed_list(g), "n": len(v),
                     f"{metric}_per_seed": ", ".join(f"{x:.2f}" for x in v), f"{metric}_mean": round(m, 2),
                     f"{metric}_sd": round(float(np.std(v, ddof=1)), 2) if len(v) > 1 else NA,
                     f"{metric}_ci_low": NA if lo is None else round(lo, 2),
                     f"{metric}_ci_high": NA if hi is None else round(hi, 2),
                     "same_run_as": g["same_run_as"].iloc[0] if "same_run_as" in g else ""})
    return pd.DataFrame(rows)


#: empirical claims of the sheet -> (arm a, arm b) among the trained variants; a - b per seed is the evidence
CLAIM_ARMS: dict[str, tuple[str, str]] = {
    "t2t_vit.beats_vit": ("t2t_performer", "vit"),
    "t2t_vit.t2t_module": ("t2t_performer", "no_t2t"),
    "t2t_vit.deep_narrow": ("deep_narrow", "shallow_wide"),
    "t2t_vit.performer_vs_transformer": ("t2t_performer", "t2t_transformer"),
}
#: the models of t2t_vit.macs_main (the paper's Tables 1-4 main rows)
MACS_MAIN = ("t2t_vit_7", "t2t_vit_12", "t2t_vit_14", "t2t_vit_19", "t2t_vit_24", "t2t_vit_t_14", "t2t_vit_t_19",
             "t2t_vit_t_24")
STRUCTURAL_SCALE = ("ImageNet-size models as built (224 px, batch 1, 1000 classes, meta device): counts of the "
                    "architecture, no training, no data")


def _worst_beyond_rounding(measured: dict[str, float], metric: str, models: Sequence[str]) -> tuple[float, str]:
    """max over ``models`` of max(0, |ours - paper| - tolerance) / paper with the sheet's paper value and rounding
    tolerance of ``metric`` (``params_m`` / ``macs_g``); and a detail line naming the worst model."""
    devs = []
    for m in models:
        r = _ref(m, metric)
        if r is None or r.kind != "paper" or r.tolerance is None:
            raise ValueError(f"the sheet has no paper {metric} with a tolerance for {m}")
        devs.append((max(0.0, abs(measured[m] - r.value) - r.tolerance) / r.value, m, measured[m], r.value))
    worst = max(devs)
    largest = max(devs, key=lambda d: abs(d[2] - d[3]) / d[3])
    return worst[0], (f"{len(devs)} variants; worst beyond rounding: {worst[1]} {worst[2]:.3f} vs paper "
                      f"{worst[3]:g} ({worst[0]:.4f}); largest raw difference {largest[1]} {largest[2]:.3f} vs "
                      f"{largest[3]:g}")


def structural_evidence(measured: "Any") -> list:
    """Evidence of the structural claims (params_all, macs_main, performer_fewer_macs) from a
    :func:`variant_table`; the 224 px rows it lacks are built here (meta device, about a second each)."""
    import pandas as pd

    from tokenbook.claims import Evidence

    params_models = [r.model for r in _refs().values() if r.metric == "params_m" and r.kind == "paper"
                     and r.tolerance is not None]
    need = list(dict.fromkeys([*params_models, *MACS_MAIN]))
    have = measured[measured["model"].isin(need) & (measured["img_size"] == 224)]
    missing = [m for m in need if m not in set(have["model"])]
    if missing:
        have = pd.concat([have, variant_table(missing, img_size=224)], ignore_index=True)
    rows = have.drop_duplicates("model").set_index("model")
    p_val, p_detail = _worst_beyond_rounding(rows["params_m"].to_dict(), "params_m", params_models)
    m_val, m_detail = _worst_beyond_rounding(rows["gmacs"].to_dict(), "macs_g", MACS_MAIN)
    d = float(rows.loc["t2t_vit_t_14", "gmacs"] - rows.loc["t2t_vit_14", "gmacs"])
    return [
        Evidence("t2t_vit.params_all", scale=STRUCTURAL_SCALE, value=p_val,
                 detail=f"all parameters incl. the frozen tables; {p_detail}"),
        Evidence("t2t_vit.macs_main", scale=STRUCTURAL_SCALE, value=m_val,
                 detail=f"GMACs with attention (FLOPs / 2); {m_detail}"),
        Evidence("t2t_vit.performer_fewer_macs", scale=STRUCTURAL_SCALE, value=d,
                 detail=f"T2T-ViT_t-14 {rows.loc['t2t_vit_t_14', 'gmacs']:.3f} G - T2T-ViT-14 "
                        f"{rows.loc['t2t_vit_14', 'gmacs']:.3f} G; T2T modules "
                        f"{rows.loc['t2t_vit_t_14', 't2t_gmacs']:.3f} vs {rows.loc['t2t_vit_14', 't2t_gmacs']:.3f} G"),
    ]


def launch_options(p: "Params") -> dict:
    """The ``train_seeds`` keywords that say where the runs train (:meth:`tokenbook.params.LaunchParams.launch_options`:
    ``executor`` and, for submitit, the job resources)."""
    return p.launch_options()


def run_scale(bundle, cfg, seeds: Sequence[int], batch_size: int, heldout: str = "") -> str:
    """What the small-scale runs were, for the ledger's ``scale`` column (``heldout``: where the claims' top-1 comes
    from, :func:`tokenbook.heldout.describe`; ``seeds``: a list, or the per-variant text of a power plan)."""
    c = bundle.config
    steps = len(bundle.train) // batch_size
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    return (f"{c.dataset} {len(bundle.train)} train / {len(bundle.val)} val images"
            + (f" ({heldout})" if heldout else "") + f", {c.img_size} px, "
            f"{c.channels} channel(s), from scratch: {cfg.epochs} epochs x {steps} steps of batch {batch_size}, "
            f"{cfg.opt} lr {cfg.lr:g}, {cfg.precision}; seeds "
            + (seeds if isinstance(seeds, str) else ','.join(str(s) for s in seeds)))


def _arm(per_seed: "Any", key: str) -> str:
    r = per_seed[per_seed["variant"] == key].iloc[0]
    return f"{key} = {r['model']} {r['embed_dim']}x{r['depth']}, {r['params'] / 1e6:.3f}M params"


def empirical_evidence(runs: SeededRuns, scale: str, metric: str = "top1", floors: Any = None) -> list:
    """Evidence of the empirical claims (:data:`CLAIM_ARMS`): per-seed ``metric`` of both arms, paired by seed,
    with the plateau note over the validation curves of every run behind the claim. Claims whose arms were not
    trained get no evidence (the ledger shows them as failed). With ``floors`` (:func:`tokenbook.floors.floors_table`
    on the same split), a claim whose arms have a run below the logistic-regression floor carries that failed run
    (``Evidence.failed_run``): every arm here is trained from scratch, and one that has not learned the task
    decides nothing."""
    from tokenbook.claims import paired_evidence

    s = runs.summary
    per_seed = {int(k): dict(zip(g["variant"], g[metric].astype(float))) for k, g in s.groupby("seed")}
    out = []
    for claim, (a, b) in CLAIM_ARMS.items():
        if a not in set(s["variant"]) or b not in set(s["variant"]):
            continue
        ev = paired_evidence(claim, per_seed, a, b, scale=f"{scale}; a: {_arm(s, a)}; b: {_arm(s, b)}",
                             curves=runs.curves(a) + runs.curves(b), floors=floors)
        ev.detail = (f"{metric} per seed: {a} {', '.join(f'{x:.2f}' for x in ev.a)}; "
                     f"{b} {', '.join(f'{x:.2f}' for x in ev.b)}" + (f"; {ev.detail}" if ev.detail else ""))
        out.append(ev)
    return out


def floor_rows(runs: SeededRuns, metric: str = "top1") -> list[dict]:
    """One row per trained variant for :func:`tokenbook.floors.beside_floors` (:func:`tokenbook.floors.arm_row`):
    mean ``metric`` over the seeds, the worst seed, params and mean training seconds."""
    from tokenbook.floors import arm_row

    return [arm_row(f"{key} ({g['model'].iloc[0]})", g[metric].astype(float).tolist(), g["params"].iloc[0],
                    g["train_wall_s"].tolist())
            for key, g in runs.summary.groupby("variant", sort=False)
            if not g["same_run_as"].astype(str).str.len().gt(0).all()]  # deep_narrow: t2t_performer's runs


def train_planned(variants: dict[str, tuple[str, dict]], bundle, cfg, keys: Sequence[str], batch_size: int,
                  arm_seeds: dict[str, Sequence[int]], **kw: Any) -> SeededRuns:
    """:func:`train_seeds` where each variant trains its own seeds (``arm_seeds``, from
    :func:`tokenbook.claims.arm_seeds`: what its claims need under the power rule). Variants that share a seed list
    are launched together, the longest list first; a variant that is the same model as another (``deep_narrow`` =
    ``t2t_performer``) is launched with it, so that it stays marked ``same_run_as`` and is read from the store, not
    trained twice. Returns one :class:`SeededRuns` over the union of the seeds: a seed's summary has the variants that
    train it, so the paired claims use the seeds both arms have. With every list equal this is :func:`train_seeds`."""
    import pandas as pd

    missing = [k for k in keys if k not in arm_seeds]
    if missing:
        raise ValueError(f"no seeds for variant(s) {missing}")
    own: dict[tuple, list] = {}  # seed list -> the variants that train exactly those seeds
    for k in keys:
        own.setdefault(tuple(int(s) for s in arm_seeds[k]), []).append(k)
    order = sorted(own, key=len, reverse=True)
    parts = []
    for g in order:
        launch = []
        for k in own[g]:  # an alias brings the earlier variant it repeats (read back from the store)
            twin = next((o for o in keys[:keys.index(k)] if variants.get(o) == variants.get(k)), None)
            if twin is not None and twin not in launch and twin not in own[g]:
                launch.append(twin)
            launch.append(k)
        parts.append((own[g], train_seeds(variants, bundle, cfg, launch, batch_size, list(g), **kw)))
    out = SeededRuns(seeds=sorted({s for g in order for s in g}), summary=None)
    frames, keys_seen = [], set()
    for mine, part in parts:
        frames.append(part.summary[part.summary["variant"].isin(mine)])
        for s in part.seeds:
            tvs = out.runs.setdefault(s, TrainedVariants(summary=None))
            for k in mine:
                if k in part.runs[s].models:
                    tvs.histories[k], tvs.models[k] = part.runs[s].histories[k], part.runs[s].models[k]
                    tvs.results[k] = part.runs[s].results[k]
        out.launched += [r for r in part.launched if r.key not in keys_seen]  # an alias's twin: once
        keys_seen.update(r.key for r in part.launched)
    rank = {k: i for i, k in enumerate(keys)}
    out.summary = (pd.concat(frames, ignore_index=True)
                   .sort_values(["seed", "variant"], key=lambda c: c.map(rank) if c.name == "variant" else c,
                                kind="stable").reset_index(drop=True))
    for s, tvs in out.runs.items():
        tvs.summary = out.summary[out.summary["seed"] == s].drop(columns="seed").reset_index(drop=True)
        for k, first in zip(tvs.summary["variant"], tvs.summary["same_run_as"]):
            if first and first in tvs.models:  # one model object per run, as train_seeds gives
                tvs.histories[k], tvs.models[k], tvs.results[k] = (tvs.histories[first], tvs.models[first],
                                                                   tvs.results[first])
    return out


def add_heldout(runs: SeededRuns, heldout_bundle: Any) -> list[float]:
    """Evaluate every run's model once more on ``heldout_bundle`` (:func:`tokenbook.heldout.heldout_bundle`) and add
    the column ``heldout_top1`` to ``runs.summary`` and to each seed's summary (aliases share their run's value).
    Returns the seconds each seed's evaluation took."""
    import time

    from tokenbook.heldout import HELDOUT_COLUMN, heldout_top1

    took, values = [], {}
    for s in runs.seeds:
        t0 = time.perf_counter()
        values[s] = heldout_top1(runs.runs[s].models, heldout_bundle)
        took.append(time.perf_counter() - t0)
        tvs = runs.runs[s]
        tvs.summary[HELDOUT_COLUMN] = [values[s][k] for k in tvs.summary["variant"]]
    runs.summary[HELDOUT_COLUMN] = [values[int(s)][k] for s, k in zip(runs.summary["seed"], runs.summary["variant"])]
    return took


# ----------------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------------
def top_channels(features: torch.Tensor, n: int) -> list[int]:
    """Indices of the ``n`` channels of ``features`` (C, h, w) with the largest spatial variance (the most
    structured maps; a deterministic pick for the Figure 2-style panels)."""
    var = features.float().flatten(1).var(dim=1)
    return var.argsort(descending=True)[:n].tolist()


def plot_feature_rows(image: np.ndarray, rows: dict[str, torch.Tensor], n_channels: int = 8, title: str = "",
                      size: float = 1.25):
    """Figure 2 style: the input image, then one row per feature tensor (C, h, w) showing ``n_channels`` channels
    (largest spatial variance first) as images, each min-max normalized. Features are token features reshaped to
    their grid, not attention maps (as in the paper)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), n_channels + 1, figsize=(size * (n_channels + 1), size * len(rows) + 0.4),
                             squeeze=False)
    for r, (label, feats) in enumerate(rows.items()):
        feats = feats.detach().float().cpu()
        axes[r, 0].imshow(image, cmap="gray" if image.ndim == 2 else None)
        axes[r, 0].set_ylabel(label, fontsize=7)
        chans = top_channels(feats, n_channels)
        for c in range(n_channels):
            ax = axes[r, c + 1]
            if c < len(chans):
                f = feats[chans[c]]
                ax.imshow(((f - f.min()) / (f.max() - f.min() + 1e-12)).numpy(), cmap="viridis")
                ax.set_title(f"ch {chans[c]} ({feats.shape[-2]}x{feats.shape[-1]})", fontsize=6)
            else:
                ax.axis("off")
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_receptive_fields(image: np.ndarray, soft_split: Sequence[tuple[int, int, int]] = tv.OFFICIAL_SOFT_SPLIT,
                          tokens_per_stage: int = 3, title: str = "", size: float = 2.6):
    """One panel per soft split: the pixel windows of ``tokens_per_stage`` neighbouring tokens in the middle row
    (their overlap is the paper's soft split), plus a table line with kernel / stride / receptive field / jump."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    h, w = image.shape[:2]
    grids = tv.soft_split_grids((h, w), soft_split)
    infos = tv.soft_split_receptive_fields(soft_split)
    colors = ["#e41a1c", "#377eb8", "#4daf4a", "#ff7f00", "#984ea3"]
    fig, axes = plt.subplots(1, len(grids), figsize=(size * len(grids), size + 0.5), squeeze=False)
    for i, ((gh, gw), info) in enumerate(zip(grids, infos)):
        ax = axes[0, i]
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
        row = gh // 2
        start = max(0, gw // 2 - tokens_per_stage // 2)
        for j, col in enumerate(range(start, min(gw, start + tokens_per_stage))):
            r0 = info["offset"] + row * info["jump"]
            c0 = info["offset"] + col * info["jump"]
            ax.add_patch(Rectangle((c0 - 0.5, r0 - 0.5), info["rf"], info["rf"], fill=False, lw=1.5,
                                   ec=colors[j % len(colors)]))
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
        ax.set_title(f"after SS{i}: {gh}x{gw} tokens\nk{info['kernel']} s{info['stride']} p{info['padding']}, "
                     f"rf {info['rf']} px, jump {info['jump']} px", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


@torch.no_grad()
def attention_panels(model: nn.Module, x: torch.Tensor) -> tuple[list[list[torch.Tensor]], list[str]]:
    """Per image: attention of the centre query token in each T2T layer (as a map over that layer's token grid),
    then the backbone's class-token attention in the first and last block (mean over heads) and the attention
    rollout. Returns (maps per image, column titles) for :func:`tokenbook.viz.plot_maps`."""
    from tokenbook import viz

    t2t = _t2t(model)
    size = tuple(x.shape[-2:])
    grids = tv.soft_split_grids(size, t2t.soft_split)
    cols, per_layer = [], []
    for i, (name, att) in enumerate(t2t_attention_maps(model, x).items()):
        gh, gw = grids[i]
        q = (gh // 2) * gw + gw // 2
        per_layer.append(att[:, q, :].reshape(-1, gh, gw).float().cpu())
        cols.append(f"T2T layer {i + 1}\ncentre token {gh}x{gw}")
    maps = backbone_attention_maps(model, x)
    gh, gw = t2t.grid_for(size)
    first = maps[0][:, :, 0, 1:].mean(1).reshape(-1, gh, gw).float().cpu()
    last = maps[-1][:, :, 0, 1:].mean(1).reshape(-1, gh, gw).float().cpu()
    roll = viz.attention_rollout(maps)[:, 0, 1:].reshape(-1, gh, gw).float().cpu()
    cols += ["block 1\ncls attention", f"block {len(maps)}\ncls attention", "rollout"]
    out = [[*(p[b] for p in per_layer), first[b], last[b], roll[b]] for b in range(x.shape[0])]
    return out, cols


# ----------------------------------------------------------------------------------------------------------
# Recipes
# ----------------------------------------------------------------------------------------------------------
#: ImageNet recipe of the official repo (main.py + README, reference sheet section 5); batch 512 in total: 64 per
#: device (TrainConfig.batch_size, the loaders' batch) x 8 GPUs, one DDP run
IMAGENET_RECIPE: dict[str, Any] = dict(
    epochs=310, cooldown_epochs=10, batch_size=64, devices=8, strategy="ddp", opt="adamw", weight_decay=0.05, filter_bias_and_bn=True,
    sched="cosine", warmup_epochs=10, warmup_lr=1e-6, min_lr=1e-5, mixup=0.8, cutmix=1.0, mixup_prob=1.0,
    mixup_switch_prob=0.5, label_smoothing=0.1, ema_decay=0.99996, clip_grad=None, precision="bf16-mixed")
#: (lr, weight decay) by model size at total batch 512 (README; issue #25)
IMAGENET_LR_WD: dict[str, tuple[float, float]] = {
    "t2t_vit_7": (1e-3, 0.03), "t2t_vit_10": (1e-3, 0.03), "t2t_vit_12": (1e-3, 0.03),
    "t2t_vit_14": (5e-4, 0.05), "t2t_vit_t_14": (5e-4, 0.05), "t2t_vit_19": (5e-4, 0.065),
    "t2t_vit_t_19": (5e-4, 0.065), "t2t_vit_24": (5e-4, 0.065), "t2t_vit_t_24": (5e-4, 0.065),
}
#: the recipe's per-sample augmentation (tokenbook.data preset 'deit': RandomResizedCrop 0.08-1, flip,
#: RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25 pixel mode) at 224 px, RGB
IMAGENET_DATA: dict[str, Any] = dict(img_size=224, channels=3, preset="deit")
#: model keyword arguments of the recipe: stochastic depth 0.1 (linear), dropout 0
IMAGENET_MODEL_KWARGS: dict[str, Any] = dict(drop_path_rate=0.1, drop_rate=0.0)


def _size_key(model_name: str) -> str:
    name = model_name.split("@")[0]
    if name in IMAGENET_LR_WD:
        return name
    for key in ("t2t_vit_14", "t2t_vit_16"):  # Table 6/7 variants of the 14-size model
        if name.startswith(key) or name in ("t2t_vit_dense", "t2t_vit_c_14"):
            return "t2t_vit_14"
    raise ValueError(f"no ImageNet recipe for {model_name!r}; known sizes: {sorted(IMAGENET_LR_WD)} and the "
                     f"14-size Table 6/7 variants")


def imagenet_recipe(model_name: str = "t2t_vit_14", **overrides: Any):
    """The paper's ImageNet recipe as a ``TrainConfig`` for ``model_name``: lr and weight decay by model size at
    batch 512 (1e-3 / 0.03 for 7/10/12, 5e-4 / 0.05 for 14 and its Table 6/7 variants, 5e-4 / 0.065 for 19/24),
    310 epochs = 300 cosine + 10 cooldown at min lr 1e-5, 10 warmup epochs from 1e-6, Mixup 0.8 / CutMix 1.0,
    label smoothing 0.1, EMA 0.99996. Data: :data:`IMAGENET_DATA`; model: :data:`IMAGENET_MODEL_KWARGS`.

    Deviation: the official scheduler steps per epoch; ``fit`` steps the same cosine per update (smoother, same
    endpoints)."""
    from tokenbook.train import TrainConfig

    lr, wd = IMAGENET_LR_WD[_size_key(model_name)]
    return TrainConfig(**{**IMAGENET_RECIPE, "lr": lr, "weight_decay": wd, **overrides})


#: Table 5 transfer recipe (transfer_learning.py + README): SGD momentum 0.9, lr 0.05 (head; 0.01x on the rest),
#: weight decay 5e-4 on all parameters, batch 64, 60 epochs, cosine to 2e-4, plain cross-entropy.
#: weight_decay is 0 here because TransferLrHook applies the official L2 term with the per-group scale.
TRANSFER_RECIPE: dict[str, Any] = dict(
    epochs=60, batch_size=64, opt="sgd", momentum=0.9, lr=0.05, weight_decay=0.0, filter_bias_and_bn=False,
    sched="cosine", warmup_epochs=0, warmup_lr=0.05, min_lr=2e-4, mixup=0.0, cutmix=0.0, label_smoothing=0.0,
    ema_decay=0.0)
#: CIFAR at 224 px; mean/std of CIFAR as the official script; augmentation = PadCropFlipHook(padding=28)
TRANSFER_DATA: dict[str, dict[str, Any]] = {
    "cifar10": dict(dataset="hf:uoft-cs/cifar10", img_size=224, channels=3, preset="none",
                    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
    "cifar100": dict(dataset="hf:uoft-cs/cifar100", img_size=224, channels=3, preset="none",
                     mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)),
}
TRANSFER_BACKBONE_LR_SCALE = 0.01
TRANSFER_WEIGHT_DECAY = 5e-4


def transfer_recipe(dataset: str = "cifar10", **overrides: Any):
    """Table 5's fine-tuning recipe as a ``TrainConfig`` (see :data:`TRANSFER_RECIPE`); use it with
    ``hooks=[TransferLrHook(), PadCropFlipHook()]`` after :func:`prepare_for_transfer`, and the data of
    ``TRANSFER_DATA[dataset]``. Deviation: the cosine is stepped per update instead of per epoch."""
    from tokenbook.train import TrainConfig

    if dataset not in TRANSFER_DATA:
        raise ValueError(f"unknown transfer dataset {dataset!r}; use one of {sorted(TRANSFER_DATA)}")
    return TrainConfig(**{**TRANSFER_RECIPE, **overrides})


def prepare_for_transfer(model: nn.Module, num_classes: int) -> nn.Module:
    """As the official transfer script: a new head for ``num_classes`` and the class token and final norm frozen
    (they are in none of its optimizer's parameter groups)."""
    model.reset_classifier(num_classes)
    for name, p in model.named_parameters():
        if name == "cls_token" or name.startswith("norm."):
            p.requires_grad_(False)
    return model


class TransferLrHook:
    """Training hook giving the pretrained part ``backbone_lr_scale`` times the learning rate of the head, with the
    official SGD L2 weight decay, through gradient hooks: grad <- scale * (grad + weight_decay * p).

    With SGD(momentum, weight_decay=0) this is exactly the official two-group SGD (lr x 0.01 on the T2T module and
    blocks, lr on the head, weight decay 5e-4 on both). Single device, ``grad_accum=1``, no fp16 loss scaling (the
    decay term would otherwise be added per micro-batch or scaled)."""

    def __init__(self, backbone_lr_scale: float = TRANSFER_BACKBONE_LR_SCALE,
                 weight_decay: float = TRANSFER_WEIGHT_DECAY, head_prefix: str = "head.") -> None:
        self.scale, self.weight_decay, self.head_prefix = backbone_lr_scale, weight_decay, head_prefix
        self.handles: list = []
        self.scales: dict[str, float] = {}

    def on_fit_start(self, fabric, model: nn.Module) -> None:
        self.remove()
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            s = 1.0 if name.startswith(self.head_prefix) else self.scale
            self.scales[name] = s
            self.handles.append(p.register_hook(
                lambda g, p=p, s=s, wd=self.weight_decay: s * (g + wd * p.detach().to(g.dtype))))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class PadCropFlipHook:
    """The official CIFAR augmentation on batches on the device: zero-pad by ``padding`` pixels (zero after
    normalization, i.e. the mean colour; the official pads black before normalizing), random crop back to the
    input size, horizontal flip with probability 0.5. Seeded; applies in training batches only."""

    def __init__(self, padding: int = 28, flip: float = 0.5, seed: int = 0) -> None:
        self.padding, self.flip = padding, flip
        self.gen = torch.Generator().manual_seed(seed)

    def on_batch(self, batch):
        x, y = batch[0], batch[1]
        b, _, h, w = x.shape
        p = self.padding
        xp = torch.nn.functional.pad(x, (p, p, p, p))
        oy = torch.randint(0, 2 * p + 1, (b,), generator=self.gen).tolist()
        ox = torch.randint(0, 2 * p + 1, (b,), generator=self.gen).tolist()
        flips = (torch.rand(b, generator=self.gen) < self.flip).tolist()
        out = torch.stack([xp[i, :, oy[i]:oy[i] + h, ox[i]:ox[i] + w] for i in range(b)])
        idx = [i for i, f in enumerate(flips) if f]
        if idx:
            out[idx] = out[idx].flip(-1)
        return (out, y, *batch[2:])

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, sd: dict) -> None:
        self.gen.set_state(sd["gen"])


def recipe_table(model_name: str = "t2t_vit_14", transfer_dataset: str = "cifar10") -> "Any":
    """The two recipes side by side as (recipe, setting, value, source) rows, for the notebook."""
    import pandas as pd

    im = imagenet_recipe(model_name)
    tr = transfer_recipe(transfer_dataset)
    src_im = "reference sheet section 5 (main.py defaults + README commands; paper section 4.1)"
    src_tr = "reference sheet section 5 (transfer_learning.py + README; paper Table 5)"
    rows = [("imagenet", k, getattr(im, k), src_im) for k in (
        "epochs", "cooldown_epochs", "batch_size", "devices", "strategy", "opt", "lr", "weight_decay", "warmup_epochs", "warmup_lr",
        "min_lr", "mixup", "cutmix", "label_smoothing", "ema_decay", "precision")]
    rows += [("imagenet", "global_batch", im.batch_size * im.devices * im.num_nodes, src_im)]
    rows += [("imagenet", f"data.{k}", str(v), src_im) for k, v in IMAGENET_DATA.items()]
    rows += [("imagenet", f"model.{k}", v, src_im) for k, v in IMAGENET_MODEL_KWARGS.items()]
    rows += [("imagenet", "augmentation", "RRC 0.08-1, flip, rand-m9-mstd0.5-inc1, random erasing 0.25", src_im)]
    rows += [(f"transfer_{transfer_dataset}", k, getattr(tr, k), src_tr) for k in (
        "epochs", "batch_size", "opt", "momentum", "lr", "min_lr", "sched", "label_smoothing")]
    rows += [(f"transfer_{transfer_dataset}", "backbone_lr_scale", TRANSFER_BACKBONE_LR_SCALE, src_tr),
             (f"transfer_{transfer_dataset}", "weight_decay (all params, SGD L2)", TRANSFER_WEIGHT_DECAY, src_tr),
             (f"transfer_{transfer_dataset}", "frozen", "cls_token, norm", src_tr),
             (f"transfer_{transfer_dataset}", "augmentation", "resize 224, pad 28 + random crop, flip", src_tr)]
    rows += [(f"transfer_{transfer_dataset}", f"data.{k}", str(v), src_tr)
             for k, v in TRANSFER_DATA[transfer_dataset].items()]
    return pd.DataFrame(rows, columns=["recipe", "setting", "value", "source"]).astype({"value": str})


# ----------------------------------------------------------------------------------------------------------
# The paper's ablation sets, T2T features and attention read-outs
# ----------------------------------------------------------------------------------------------------------
def fmnist_ablations(img_size: int = 28, in_chans: int = 1, num_classes: int = 10, embed_dim: Optional[int] = None,
                     depth: Optional[int] = None, num_heads: Optional[int] = None,
                     tokens: int = 49) -> dict[str, tuple[str, dict]]:
    """The paper's ablations at Fashion-MNIST scale: variant -> (registry name, kwargs for ``timm.create_model``).

    - ``t2t_performer`` (the T2T-ViT, deep-narrow 128x8), ``t2t_transformer``, ``t2t_convolution``,
      ``no_t2t`` (plain ViT, 4 px patches, same backbone): Table 7's T2T-module ablation;
    - ``deep_narrow`` (128 wide, 8 deep) vs ``shallow_wide`` (256 wide, 2 deep; identical block parameter count):
      Table 7's d384-14 vs d768-4 comparison;
    - ``vit``: a standard timm ViT (:func:`plain_vit_like`: 4 px hard split, learned position embedding, MLP ratio
      4, qkv bias) of the T2T-ViT's width and heads, its depth chosen for the closest parameter count (within 10 %):
      Table 2's T2T-ViT-14 vs DeiT-small comparison.
    ``embed_dim`` / ``depth`` / ``num_heads`` replace the deep-narrow backbone (e.g. 64 x 8 for short CPU runs); the
    shallow-wide partner is then ``2 * embed_dim`` wide, ``depth // 4`` deep with ``2 * num_heads`` heads, which keeps
    the block weight matrices' parameter count equal (``D^2 * depth`` constant).
    All work at 28 and 32 px. ``tokens`` is the backbone's token grid at 28 px: ``49`` (7 x 7; 64 at 32 px) with
    ``FMNIST_SOFT_SPLIT`` and 4 px patches, the registry's default; ``16`` (4 x 4 at 28 and 32 px) with
    ``FMNIST_SOFT_SPLIT_16`` for the T2T modules and a hard split of ``img_size // 4`` px (7 at 28 px) for ``no_t2t``
    and ``vit``, a third of the tokens: the workbook's cpu scale, where the ablations train to a plateau.
    """
    if img_size < 8:
        raise ValueError(f"img_size {img_size} is too small for FMNIST_SOFT_SPLIT; use 28 or 32")
    if tokens not in (49, 16):
        raise ValueError(f"tokens must be 49 (FMNIST_SOFT_SPLIT) or 16 (FMNIST_SOFT_SPLIT_16), got {tokens!r}")
    common = dict(img_size=img_size, in_chans=in_chans, num_classes=num_classes)
    if tokens == 16:
        common["soft_split"] = tv.FMNIST_SOFT_SPLIT_16
    base = tv.OFFICIAL_CONFIGS["t2t_vit_tiny_fmnist"]
    d, L, h = embed_dim or base["embed_dim"], depth or base["depth"], num_heads or base["num_heads"]
    if d % h:
        raise ValueError(f"embed_dim {d} is not divisible by num_heads {h}")
    if L % 4:
        raise ValueError(f"depth {L} must be a multiple of 4 (the shallow-wide partner has depth // 4 blocks)")
    dn = dict(common) if (embed_dim, depth, num_heads) == (None, None, None) else dict(
        common, embed_dim=d, depth=L, num_heads=h)
    sw = dict(common) if (embed_dim, depth, num_heads) == (None, None, None) else dict(
        common, embed_dim=2 * d, depth=L // 4, num_heads=2 * h)
    import timm

    with torch.device("meta"):
        target = param_counts(timm.create_model("t2t_vit_tiny_fmnist", **dn))["total"]
    patch = 4 if tokens == 49 else img_size // 4
    hard = {} if tokens == 49 else {"soft_split": ((patch, patch, 0),)}  # tokens_type none: patch = the stride
    return {
        "t2t_performer": ("t2t_vit_tiny_fmnist", dict(dn)),
        "t2t_transformer": ("t2t_vit_t_tiny_fmnist", dict(dn)),
        "t2t_convolution": ("t2t_vit_c_tiny_fmnist", dict(dn)),
        "no_t2t": ("t2t_vit_tiny_fmnist_wo_t2t", {**dn, **hard}),
        "deep_narrow": ("t2t_vit_tiny_fmnist", dict(dn)),
        "shallow_wide": ("t2t_vit_sw_tiny_fmnist", dict(sw)),
        "vit": plain_vit_like(target, img_size=img_size, in_chans=in_chans, num_classes=num_classes,
                              embed_dim=d, num_heads=h, patch_size=patch),
    }


#: timm model behind the plain-ViT arm (its defaults are overridden: patch size, width, depth, heads, MLP ratio)
PLAIN_VIT = "vit_tiny_patch16_224"


def plain_vit_like(target_params: int, img_size: int, in_chans: int, num_classes: int, embed_dim: int,
                   num_heads: int, patch_size: int = 4, mlp_ratio: float = 4.0, max_rel: float = 0.10,
                   max_depth: int = 48) -> tuple[str, dict]:
    """A standard timm ViT (hard ``patch_size`` split, learned position embedding, class token, qkv bias, MLP ratio
    ``mlp_ratio`` as ViT/DeiT) of width ``embed_dim`` with the depth whose parameter count is closest to
    ``target_params``, as (timm name, kwargs). Raises ``ValueError`` when no depth comes within ``max_rel``."""
    import timm

    best: Optional[tuple[float, dict]] = None
    for depth in range(1, max_depth + 1):
        kw = dict(img_size=img_size, in_chans=in_chans, num_classes=num_classes, patch_size=patch_size,
                  embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio)
        with torch.device("meta"):
            n = sum(p.numel() for p in timm.create_model(PLAIN_VIT, **kw).parameters())
        rel = n / target_params - 1
        if best is None or abs(rel) < abs(best[0]):
            best = (rel, kw)
        if rel > max_rel:
            break
    if best is None or abs(best[0]) > max_rel:
        raise ValueError(f"no ViT of width {embed_dim} and depth <= {max_depth} has params within {max_rel:.0%} of "
                         f"{target_params} (closest: {best[0]:+.1%})" if best else "max_depth must be >= 1")
    return PLAIN_VIT, best[1]


def imagenet_ablations(img_size: int = 224, in_chans: int = 3, num_classes: int = 1000) -> dict[str, tuple[str, dict]]:
    """The same variants as :func:`fmnist_ablations` at the paper's scale (Table 7): T2T-ViT-14 (performer),
    T2T-ViT_t-14, T2T-ViT_c-14, T2T-ViT-14 w/o T2T, deep-narrow T2T-ViT-14 vs shallow-wide T2T-ViT-d768-4, and
    the plain ViT of Table 2 (``vit``: DeiT-small, 22.1M params vs 21.5M)."""
    common = dict(img_size=img_size, in_chans=in_chans, num_classes=num_classes)
    return {
        "t2t_performer": ("t2t_vit_14", dict(common)),
        "t2t_transformer": ("t2t_vit_t_14", dict(common)),
        "t2t_convolution": ("t2t_vit_c_14", dict(common)),
        "no_t2t": ("t2t_vit_14_wo_t2t", dict(common)),
        "deep_narrow": ("t2t_vit_14", dict(common)),
        "shallow_wide": ("t2t_vit_14_wide", dict(common)),
        "vit": ("deit_small_patch16_224", dict(common)),
    }


def _t2t(model: nn.Module) -> tv.T2TModule:
    t2t = getattr(model, "tokens_to_token", model)
    if not isinstance(t2t, tv.T2TModule):
        raise ValueError(f"{type(model).__name__} has no T2T module; pass a T2TViT or a T2TModule")
    return t2t


@torch.no_grad()
def t2t_token_features(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-stage features of the T2T module as images (B, C, h, w), for the paper's Figure 2-style visualization:
    ``soft_split0`` (3*7*7 channels in unfold order), ``attention1`` (64 channels), ``soft_split1``,
    ``attention2``, ``soft_split2``, ``project`` (embed_dim channels = the tokens entering the backbone)."""
    was = model.training
    model.eval()
    try:
        return _t2t(model).forward_stages(x)
    finally:
        model.train(was)


@torch.no_grad()
def vit_patch_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Patch-embedding features (B, D, h, w) of a timm ViT (``patch_embed.proj``), or of a T2T-ViT with
    tokens_type 'none'; the ViT side of Figure 2."""
    if hasattr(model, "patch_embed"):
        return model.patch_embed.proj(x)
    t2t = _t2t(model)
    if t2t.tokens_type != "none":
        raise ValueError("model has T2T layers; use t2t_token_features for it")
    return t2t.project(x)


@torch.no_grad()
def t2t_attention_maps(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Attention (B, T, T) of each T2T layer; for the performer the implicit normalized kernel matrix."""
    was = model.training
    model.eval()
    try:
        return _t2t(model).attention_maps(x)
    finally:
        model.train(was)


def _attn_probs(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(attn, tv.GhostAttention):
        q, k, _ = attn.qkv_heads(x)
    else:
        b, n, _ = x.shape
        q, k, _ = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)


@torch.no_grad()
def backbone_attention_maps(model: tv.T2TViT, x: torch.Tensor) -> list[torch.Tensor]:
    """Attention probabilities (B, heads, 1 + h*w, 1 + h*w) of every backbone block (token 0 = class token)."""
    maps: list[torch.Tensor] = []
    hooks = []
    for blk in model.blocks:
        if hasattr(blk, "attn"):
            hooks.append(blk.attn.register_forward_pre_hook(lambda m, args: maps.append(_attn_probs(m, args[0]))))
    was = model.training
    model.eval()
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return maps


# ----------------------------------------------------------------------------------------------------------
# GPU budget: this notebook's loops for tokenbook.gpu_budget (an ESTIMATE; the engine is in the core)
# ----------------------------------------------------------------------------------------------------------
def gpu_loops(params: dict) -> list:
    """The from-scratch variants x seeds of the fmnist scale under ``params`` as :class:`tokenbook.gpu_budget.Loop`
    rows (what :func:`tokenbook.gpu_budget.estimate` costs); keys naming the same model and kwargs train once."""
    import tokenbook.models  # noqa: F401  (registers the T2T-ViTs)
    from tokenbook import gpu_budget as G
    from tokenbook.claims import parse_seeds
    from tokenbook.train import TrainConfig

    p, nb = params, "02_t2t_vit"
    if p["scale"] != "fmnist":
        raise ValueError("the GPU estimate covers the fmnist scale of 02_t2t_vit")
    img, ch, (n, nv), S = p["img_size"], p["channels"], G.fm_sizes(p), len(parse_seeds(p["seeds"]))
    cfg = TrainConfig.from_params(p, max_steps_per_epoch=p["max_steps_per_epoch"] or None)
    variants = fmnist_ablations(img_size=img, in_chans=ch, num_classes=10, embed_dim=p["embed_dim"] or None,
                                depth=p["depth"] or None, num_heads=p["num_heads"] or None, tokens=p.get("tokens", 49))
    runs: dict = {}  # train_variants trains keys naming the same model and kwargs once
    for key in p["train_variants"]:
        name, kw = variants[key]
        kw = {**kw, "drop_path_rate": p["drop_path_rate"], "num_classes": 10, "img_size": img, "in_chans": ch}
        runs.setdefault((name, G.freeze(kw)), [name, kw, []])[2].append(key)
    return [G.timm_loop(nb, f"{' = '.join(keys)} x {S} seeds", name, kw, img, ch,
                        **G.fit_fields(cfg, n, nv, p["num_workers"], S)) for name, kw, keys in runs.values()]


# ----------------------------------------------------------------------------------------------------------
# Released checkpoints vs the paper (issue 20): the official ImageNet-1k release assets, evaluated by
# tokenbook.released (local files only; the URL is where to get each)
# ----------------------------------------------------------------------------------------------------------
_T2T_RELEASE = "https://github.com/yitu-opensource/T2T-ViT/releases/download/main/"
RELEASED = [dict(model=m, file=f, url=_T2T_RELEASE + f, ref=f"t2t_vit:{r}", paper_name=n, note=note)
            for m, f, r, n, note in [
                ("t2t_vit_7.in1k", "71.7_T2T_ViT_7.pth.tar", "t2t_vit_7.in1k.top1", "T2T-ViT-7", ""),
                ("t2t_vit_10.in1k", "75.2_T2T_ViT_10.pth.tar", "t2t_vit_10.in1k.top1", "T2T-ViT-10",
                 "the paper gives no T2T-ViT-10 number; README table"),
                ("t2t_vit_12.in1k", "76.5_T2T_ViT_12.pth.tar", "t2t_vit_12.in1k.top1", "T2T-ViT-12", ""),
                ("t2t_vit_14.in1k", "81.5_T2T_ViT_14.pth.tar", "t2t_vit_14.in1k.top1", "T2T-ViT-14", ""),
                ("t2t_vit_14.in1k_384", "83.3_T2T_ViT_14.pth.tar", "t2t_vit_14_384.in1k.top1", "T2T-ViT-14@384", ""),
                ("t2t_vit_19.in1k", "81.9_T2T_ViT_19.pth.tar", "t2t_vit_19.in1k.top1", "T2T-ViT-19", ""),
                ("t2t_vit_24.in1k", "82.3_T2T_ViT_24.pth.tar", "t2t_vit_24.in1k.top1", "T2T-ViT-24", ""),
                ("t2t_vit_t_14.in1k", "81.7_T2T_ViTt_14.pth.tar", "t2t_vit_t_14.in1k.top1", "T2T-ViTt-14", ""),
                ("t2t_vit_t_19.in1k", "82.4_T2T_ViTt_19.pth.tar", "t2t_vit_t_19.in1k.top1", "T2T-ViTt-19",
                 "paper Table 3 says 82.2, the README (released file) 82.4 (t2t_vit_t_19.in1k.top1.readme)"),
                ("t2t_vit_t_24.in1k", "82.6_T2T_ViTt_24.pth.tar", "t2t_vit_t_24.in1k.top1", "T2T-ViTt-24", ""),
            ]]


def released_table(params: Optional[dict] = None, **kw: Any):
    """:data:`RELEASED` evaluated on the user's ImageNet val folder (:func:`tokenbook.released.released_table`;
    arguments from ``params`` by :func:`tokenbook.released.params_kwargs`, ``kw`` win)."""
    import tokenbook.models  # noqa: F401  (registers the T2T-ViTs)
    from tokenbook import released as R

    return R.released_table(RELEASED, **R.params_kwargs(params, **kw))


__all__ += ["RELEASED", "released_table"]
