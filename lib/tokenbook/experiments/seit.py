"""SeiT / TokenAdapt experiments behind ``notebooks/04_seit.ipynb``: token data, ablation runs, tables,
figures and the ImageNet token-release recipe.

The notebook is a thin driver; everything it runs lives here (reference sheet ``../shared/papers/seit_tokenadapt.md``):

- :func:`build_default_tokens` trains the small VQ tokenizer (:class:`tokenbook.data.tokens.VQTokenizer`) on the default
  data, tokenizes train/val, **writes them in SeiT's on-disk format** and reads them back, so the classifiers train
  on what the reader decodes; it also writes ``codebook.ckpt`` and the synonym JSON as the release names them.
  :func:`load_release_tokens` reads the real ImageNet-1k token release through the same readers.
- :func:`storage_table` / :func:`storage_vs_paper` (in seit_results): bytes per image for pixels, PNG, JPEG and
  tokens, next to the paper's ImageNet figures.
- :func:`run_variant` / :func:`run_ablation`: the paper's ImageNet-100 ablation (SeiT, + TokenAdapt, + ColorAdapt,
  + both) plus a pixel ViT, all with ``tokenbook.train.fit`` and the same budget; :func:`ablation_vs_paper` (in
  seit_results) puts the paper's numbers (third-party summary) beside ours.
- Figures: :func:`plot_reconstructions`, :func:`plot_augmentations` (pixel vs token-space augmentation through f/g,
  decoded), :func:`plot_synonyms`, :func:`plot_storage`.
- :func:`train_config` builds the ``TrainConfig`` of a variant from the notebook parameters (the ``full`` profile
  is SeiT's recipe: AdamW lr 1.5e-3, wd 0.1, 300 epochs, 8 x 128, warmup 5 / 30, EMA 0.99996, DDP).
- Seeds (issue 12): :func:`run_ablation_seeds` / :func:`seed_summary` (every variant per seed, paired by seed;
  means, t-intervals, paired gains) and :func:`photo_storage` (tokens vs JPEG on real photographs at 256 px); the
  claims' evidence is :func:`claims_evidence` (in seit_results).
- Run store (issue 20): every (variant, seed) run as one :class:`tokenbook.runs.RunSpec` (:func:`variant_spec`,
  :func:`ablation_specs`; the token files and f/g named by path and fingerprint), trained by
  :func:`train_variant_run` with the kernel path's run body (:func:`_fit_variant`) and rebuilt from the stored
  weights by :func:`rebuild_variant`; :func:`train_ablation` is :func:`run_ablation_seeds` wherever ``executor``
  says. Floors (issue 19): ``token_floor`` (logistic regression on the token embeddings of the same split) beside
  ``tokenbook.floors``' pixel floors (``arms_beside_floors``, in seit_results).
- The tokenizer and TokenAdapt f/g through the run store too (issue 20): :func:`tokenizer_spec` /
  :func:`train_tokenizer_run` / :func:`stored_tokens` and :func:`tokenadapt_spec` / :func:`train_tokenadapt_run` /
  :func:`stored_tokenadapt`, keyed by their spec (f/g's names the token files and the tokenizer by fingerprint).
- The recipe sweep behind the cpu profile (issue 19): :data:`RECIPE_SWEEP` / :func:`recipe_sweep_table` (in
  seit_results, constants written by ``scripts/seit_sweep.py``).

The stored runs' specs and trainers, the token data, the batch hooks and the recipes live in
:mod:`tokenbook.experiments.seit_runs` (re-exported here), so that a run's key names only the code that trains it;
what the notebook reports (storage and paper-vs-ours tables, seed summary, claims, floors, photo storage, the recipe
sweep, figures) is in :mod:`tokenbook.experiments.seit_results`, re-exported here too.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from tokenbook.data import tokens as T
from tokenbook.io import display_path
from tokenbook.methods.token_aug import (  # noqa: F401  (apply_spatial, embed_ids, ...: the notebook's names)
    apply_spatial, build_synonyms, embed_ids, load_synonyms, sample_spatial_params, save_synonyms,
)
from tokenbook.params import LaunchParams, ReleasedParams, SeedPlanParams
from tokenbook.params import as_list, param
# the released checkpoints and the --proof weight file live in seit_released (re-exported)
from tokenbook.experiments.seit_released import RELEASED, proof_data, released_table  # noqa: F401,E402
# the token data, the batch hooks, the recipes and the stored runs' specs and trainers live in seit_runs
# (re-exported): their code version leaves this module and the reports out
from tokenbook.experiments.seit_runs import (  # noqa: F401,E402
    TokenData, _TOKENIZER_KEYS, _fit_variant, _hook_settings, _read_tokens, _variant_model, build_tokenadapt,
    fit_launched, make_hook, module_fingerprint, rebuild_variant, save_tokenadapt, token_device, token_fingerprint,
    token_images, token_loaders, token_ref, tokenadapt_spec, tokenizer_spec, train_config, train_default_tokenadapt,
    train_default_tokenizer, train_tokenadapt_run, train_tokenizer_run, train_variant_run, variant_spec,
)
# the variants, the claims' evidence, the floors, the seed summary, photo storage and the figures live in seit_results
from tokenbook.experiments.seit_results import (  # noqa: F401,E402
    CLAIM_ARMS, PAPER_LABELS, VARIANTS, arms_beside_floors, claims_commentary, claims_evidence, floor_rows,
    photo_storage, plot_augmentations, plot_reconstructions, plot_storage, plot_synonyms, sample_photos,
    seed_summary, token_features, token_floor, token_floors_table, RECIPE_SWEEP, SWEEP_BASE, SWEEP_TOKEN_FLOOR,
    SWEEP_PIXEL_FLOOR, recipe_sweep_table, storage_table, storage_vs_paper, ablation_vs_paper, accuracy_vs_storage,
    release_storage_table, paper_models_table,
)


# ----------------------------------------------------------------------------------------------------------
# parameters: the notebook's parameters cell is generated from this class (python -m tokenbook.params --sync)
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Params(ReleasedParams, SeedPlanParams, LaunchParams):  # released, seed-plan, launcher fields: bases
    """The parameters of notebooks/04_seit.ipynb (its parameters cell is generated from this class)."""

    NOTEBOOK: ClassVar[str] = "04_seit"
    #: run_all.sh --proof: one CPU process (bf16-mixed as the recipe), two seeds, a CPU batch (divisible by 4 for
    #: TokenAdapt), small figures
    PROOF: ClassVar[dict] = {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "strategy": "auto", "seeds": [0, 1],
                             "batch_size": 4, "num_workers": 0, "num_figure_images": 2}

    seed: int = param(0, "seed of the data subset, the tokenizer and TokenAdapt (trained once, not per seed) [0, inf)")
    seeds: list[int] = param([0, 1, 2], "classifier seeds of the ablation, paired by seed (init and batch order)")
    dataset: str = param("fashion_mnist", "pixel data: fashion_mnist, folder:<path> or hf:<id>")
    data_dir: str = param(
        "", "Fashion-MNIST IDX folder; empty: $TOKENBOOK_FASHION_MNIST, Debian package, then the hub", none="")
    img_size: int = param(28, "pixel side, for the tokenizer and the pixel ViT [1, inf)")
    train_subset: int = param(10000, "training images, class-balanced; 0 means all [0, inf)", none=0)
    val_subset: int = param(2000, "validation images; 0 means all [0, inf)", none=0)
    token_source: str = param("train",
                              "train: tokenizer trained here on the pixels; release:<dir> reads the ImageNet token "
                              "release")
    token_dir: str = param("", "where the token files go; empty: the tokenbook cache dir, seit/<dataset>-<profile>")
    tokenizer_downsample: int = param(2, "pixels per token side; 2 gives a 14x14 grid on 28 px [1, inf)")
    tokenizer_pad: int = param(0, "zero pixels added on each side before tokenizing; 2 with downsample 4 gives an 8x8 "
                                  "grid on 28 px [0, inf)")
    codebook_size: int = param(391,
                               "codebook entries, as the released codebook; ids above 254 use the escape byte [2, "
                               "inf)")
    code_dim: int = param(32, "code dimension, as the released codebook [1, inf)")
    tokenizer_hidden: int = param(32, "channels of the small conv VQ encoder and decoder [1, inf)")
    tokenizer_steps: int = param(150, "Adam steps of tokenizer training [1, inf)")
    tokenizer_batch: int = param(64, "tokenizer batch size [1, inf)")
    tokenizer_lr: float = param(0.002, "tokenizer learning rate (0, inf)")
    storage_images: int = param(2000, "validation images encoded as PNG and JPEG for the storage table [1, inf)")
    storage_jpeg_quality: int = param(95,
                                      "JPEG quality that stands for the original JPEG files in tokens-vs-JPEG [1, "
                                      "100]")
    tokenadapt_ckpt: str = param("", "a released tokenadapt.ckpt; empty trains f and g here")
    ta_dim: int = param(64, "TokenAdapt width; official 384 [1, inf)")
    ta_heads: int = param(2, "TokenAdapt attention heads; official 6 [1, inf)")
    ta_dim_head: int = param(32, "TokenAdapt head width; official 64 [1, inf)")
    ta_steps: int = param(100, "TokenAdapt training steps [1, inf)")
    ta_batch: int = param(64, "TokenAdapt training batch size [1, inf)")
    ta_lr: float = param(0.002, "TokenAdapt AdamW learning rate (0, inf)")
    ta_mix_prob: float = param(0.0, "probability of Mixup or CutMix during TokenAdapt training [0, 1]")
    ta_per_sample: bool = param(True, "per-sample f-space flip and affine; False is the official batch-level draw")
    ta_mix: bool = param(True, "Mixup 0.8 / CutMix 1.0 in the TokenAdapt half of every batch, as the official; "
                               "false turns them off")
    variants: list[str] = param(["pixel", "seit", "seit_ca", "seit_ta", "seit_ta_ca"],
                                "ablation rows, see tokenbook.experiments.seit.VARIANTS")
    pixel_model: str = param("vit_fm_tiny_p4_28", "pixel ViT with the token ViT's width, depth and heads")
    token_model: str = param("deit_fm_micro_token_32", "token ViT with Stem-Adapter and mean-pooled head")
    crop: int = param(12, "classifier input side in tokens; official 28 of 32, here 12 of 14 [1, inf)")
    rrc_scale_min: float = param(0.35,
                                 "lower scale of the random resized crop on the embedding map; official 0.08 (0, 1]")
    token_eda: bool = param(True, "Token-EDA per sample: synonym replacement 0.25, block swap 0.25")
    emb_noise: float = param(1.0, "std of Emb-Noise's channel shift and per-element noise; official 1.0 on ViT-VQGAN's "
                                  "codebook rows [0, inf)")
    epochs: int = param(1, "training epochs of every variant [1, inf)")
    batch_size: int = param(64, "batch size per device; divisible by 4 for TokenAdapt [1, inf)")
    lr: float = param(0.002, "peak AdamW learning rate (0, inf)")
    weight_decay: float = param(0.05, "AdamW weight decay [0, inf)")
    warmup_epochs: float = param(0.3, "linear warmup in epochs; SeiT uses 5 [0, inf)")
    ta_warmup_epochs: float = param(0.3,
                                    "warmup of the TokenAdapt variants; the official TokenAdapt code uses 30 [0, "
                                    "inf)")
    warmup_lr: float = param(1e-06, "learning rate at the start of the warmup [0, inf)")
    min_lr: float = param(1e-05, "final cosine learning rate [0, inf)")
    ema_decay: float = param(0.0, "EMA of the weights; 0 is off; SeiT keeps 0.99996 but evaluates the raw model [0, 1)")
    drop_path: float = param(0.0, "stochastic depth rate; SeiT 0.1 [0, 1)")
    label_smoothing: float = param(0.1, "label smoothing of the pixel variant; the token hooks': token_label_smoothing "
                                        "[0, 1)")
    token_cutmix: float = param(1.0, "CutMix alpha of the token hooks' SeiT part (SeiT 1.0); 0 is off (the TokenAdapt "
                                     "half keeps its Mixup 0.8 / CutMix 1.0) [0, inf)")
    token_label_smoothing: float = param(0.1, "label smoothing of the token hooks' soft targets (SeiT 0.1) [0, 1)")
    pixel_cutmix: float = param(1.0, "CutMix alpha of the pixel variant, like the token hooks [0, inf)")
    max_steps_per_epoch: int = param(0, "cut epochs short; 0 means full epochs [0, inf)", none=0)
    num_workers: int = param(0, "DataLoader workers [0, inf)")
    accelerator: str = param("auto", "cpu, cuda or auto")
    devices: int = param(1, "devices per node; the full recipe uses 8 [1, inf)")
    num_nodes: int = param(1, "nodes [1, inf)")
    strategy: str = param("auto", "Fabric strategy; multi-GPU from a notebook needs ddp_notebook")
    precision: str = param("32-true", "32-true or bf16-mixed")
    paper_models: list[str] = param(["deit_small_token_32", "deit_base_token_32", "vit_small_patch16_224", "vit_base_patch16_224"],
                                    "models of the MACs table; empty skips it")
    num_figure_images: int = param(6, "images per figure [1, inf)")
    fit_floors: bool = param(True, "also fit the reference floors on the same split: logistic regression on pixels, a "
                                   "small CNN, and logistic regression on the token embeddings")
    floor_cnn_epochs: int = param(5, "epochs of the small-CNN floor [1, inf)")
    judge_heldout: bool = param(False, "judge the claims and the floors on every held-out image of the classes "
                                       "(tokenbook.heldout: each stored classifier evaluated once more, the held-out "
                                       "images tokenized by the stored tokenizer); the curves stay on val_subset; "
                                       "needs the run store (an executor other than kernel)")

__all__ = [
    "VARIANTS", "PAPER_LABELS", "TokenData", "cache_dir", "build_default_tokens", "load_release_tokens",
    "storage_table", "storage_vs_paper", "token_loaders", "make_hook", "train_config", "fit_launched",
    "run_variant", "run_ablation", "ablation_vs_paper", "accuracy_vs_storage", "plot_reconstructions",
    "plot_augmentations", "plot_synonyms", "plot_storage", "parse_variants", "write_tiny_release",
    "build_tokenadapt", "train_default_tokenadapt", "token_device", "release_storage_table", "paper_models_table",
    "token_images", "tokenizer_spec", "train_tokenizer_run", "stored_tokens", "tokenadapt_spec",
    "train_tokenadapt_run", "stored_tokenadapt", "AblationHistories", "token_fingerprint", "module_fingerprint", "save_tokenadapt", "variant_spec",
    "train_variant_run", "rebuild_variant", "ablation_specs", "token_ref", "train_default_tokenizer", "train_ablation",
    "token_features", "token_floor", "token_floors_table", "floor_rows", "arms_beside_floors", "CLAIM_ARMS",
    "claims_evidence", "claims_commentary", "seed_summary", "photo_storage", "sample_photos", "RECIPE_SWEEP",
    "SWEEP_BASE", "SWEEP_TOKEN_FLOOR", "SWEEP_PIXEL_FLOOR", "recipe_sweep_table", "heldout_tokens", "add_heldout",
]


PathLike = Union[str, os.PathLike]


def parse_variants(spec: Sequence[str]) -> list[str]:
    """``["pixel", "seit", "seit_ta"]`` checked against :data:`VARIANTS`."""
    out = as_list(spec, "variants")
    bad = [v for v in out if v not in VARIANTS]
    if bad or not out:
        raise ValueError(f"unknown variants {bad or spec!r}; choose from {', '.join(VARIANTS)}")
    return out


def cache_dir(*parts: str) -> Path:
    """``$TOKENBOOK_CACHE`` (else ``~/.cache/tokenbook``) / parts."""
    root = Path(os.environ.get("TOKENBOOK_CACHE") or Path.home() / ".cache" / "tokenbook")
    return root.joinpath(*parts)


# ----------------------------------------------------------------------------------------------------------
# Token data
# ----------------------------------------------------------------------------------------------------------


def build_default_tokens(
    bundle: Any,
    root: PathLike,
    name: str = "fmnist",
    downsample: int = 2,
    codebook_size: int = 391,
    code_dim: int = 32,
    hidden: int = 32,
    steps: int = 200,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    synonym_top: int = 5,
    device: str = "cpu",
    pad: int = 0,
    tokenizer: Optional[T.VQTokenizer] = None,
    tokenizer_history: Optional[list] = None,
) -> TokenData:
    """Train the VQ tokenizer on ``bundle.train`` (:func:`train_default_tokenizer`; a trained ``tokenizer`` and its
    ``tokenizer_history`` are used instead, e.g. a stored run's: :func:`stored_tokens`), write train/val in
    SeiT's format under ``root`` and read them back.

    Files (release naming): ``{name}-{split}-token.data.bin.gz``, ``...index.npy.gz``, ``{name}-{split}-label.txt``,
    ``codebook.ckpt`` (raw rows, 391 x 32 by default), ``codebook-synonyms.json`` (top-``synonym_top`` cosine
    neighbours; how the release built its list is unknown), ``tokenizer.pt``. The files are rewritten on every call.
    ``pad``: zero pixels added on each side of every image before training and tokenizing (:func:`token_images`).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    imgs_tr = token_images(bundle.train, pad)
    imgs_va = token_images(bundle.val, pad)
    if tokenizer is None:
        tok, hist = train_default_tokenizer(bundle, downsample, codebook_size, code_dim, hidden, steps, batch_size,
                                            lr, seed, device, pad)
    else:
        tok, hist = tokenizer.cpu().eval(), list(tokenizer_history or [])
    files = {}
    for split, imgs, labels in (("train", imgs_tr, bundle.train.labels), ("val", imgs_va, bundle.val.labels)):
        ids = T.tokenize_images(tok, imgs).numpy().astype(np.uint16)
        p = T.write_token_file(T.token_file_paths(root, name, split), ids, labels)
        files.update({f"{split}_data": p.data, f"{split}_index": p.index, f"{split}_labels": p.labels})
    cb = tok.export_codebook()
    files["codebook"] = T.save_codebook(cb, root / "codebook.ckpt")
    syn = build_synonyms(cb, top=synonym_top)
    files["synonyms"] = save_synonyms(syn, root / "codebook-synonyms.json")
    files["tokenizer"] = T.save_tokenizer(tok, root / "tokenizer.pt")
    train = T.read_token_file(T.token_file_paths(root, name, "train"))
    val = T.read_token_file(T.token_file_paths(root, name, "val"))
    return TokenData(train=train, val=val, codebook=T.load_codebook(files["codebook"]),
                     synonyms=load_synonyms(files["synonyms"]), num_classes=bundle.num_classes,
                     source=f"VQ tokenizer trained here on {bundle.source}", root=root, tokenizer=tok,
                     tokenizer_history=hist, files=files)


def _subset(ts: T.TokenSet, n: int, seed: int) -> T.TokenSet:
    if not n or n >= len(ts):
        return ts
    idx = np.sort(np.random.RandomState(seed).permutation(len(ts))[:n])
    return T.TokenSet(ids=np.asarray(ts.ids[idx]), labels=None if ts.labels is None else ts.labels[idx],
                      paths=ts.paths)


def load_release_tokens(
    root: PathLike,
    name: str = "imagenet1k",
    train_subset: int = 0,
    val_subset: int = 0,
    seed: int = 0,
    synonym_top: int = 5,
    cache: bool = True,
) -> TokenData:
    """Read the ImageNet-1k token release (``IMNET1K-tokens.tar`` unpacked in ``root``) with the same readers.

    Needs ``{name}-{train,val}-token.data.bin.gz`` (+ index, labels) and ``codebook.ckpt``; the synonym file is
    ``codebook-synonyms.json`` or ``synonyms.json`` (both names occur), built from codebook neighbours when absent.
    ``cache`` keeps a memory-mapped ``uint16`` copy of the decoded ids under :func:`cache_dir`.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"token release folder {root} does not exist (unpack IMNET1K-tokens.tar there)")
    cb_path = root / "codebook.ckpt"
    if not cb_path.is_file():
        raise FileNotFoundError(f"{cb_path} is missing: the release ships the codebook as codebook.ckpt")
    cb = T.load_codebook(cb_path)
    sets = {}
    for split in ("train", "val"):
        kw = {"cache_path": cache_dir("seit", "release", f"{name}-{split}.u16.npy")} if cache else {}
        sets[split] = T.read_release_split(root, split, name, **kw)
    syn_path = next((root / n for n in ("codebook-synonyms.json", "synonyms.json") if (root / n).is_file()), None)
    syn = load_synonyms(syn_path) if syn_path else build_synonyms(cb, top=synonym_top)
    labels = np.concatenate([sets["train"].labels, sets["val"].labels])
    files = {"codebook": cb_path, **({"synonyms": syn_path} if syn_path else {})}
    for split in ("train", "val"):
        p = sets[split].paths
        files.update({f"{split}_data": p.data, f"{split}_index": p.index, f"{split}_labels": p.labels})
    return TokenData(train=_subset(sets["train"], train_subset, seed), val=_subset(sets["val"], val_subset, seed + 1),
                     codebook=cb, synonyms=syn, num_classes=int(labels.max()) + 1,
                     source=f"token release {display_path(root)}", root=root, files=files)


def write_tiny_release(root: PathLike, n_train: int = 8, n_val: int = 4, num_classes: int = 4, grid: int = 32,
                       codebook_size: int = 391, code_dim: int = 32, seed: int = 0) -> Path:
    """A tiny token release in the official layout (random ids incl. ids >= 255, codebook.ckpt, synonyms.json)."""
    root = Path(root)
    rng = np.random.RandomState(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        ids = rng.randint(0, codebook_size, size=(n, grid, grid)).astype(np.uint16)
        ids[0, 0, 0] = codebook_size - 1
        T.write_token_file(T.token_file_paths(root, "imagenet1k", split), ids, np.arange(n) % num_classes)
    cb = torch.from_numpy(rng.randn(codebook_size, code_dim).astype(np.float32))
    T.save_codebook(cb, root / "codebook.ckpt")
    save_synonyms(build_synonyms(cb, top=5), root / "synonyms.json")
    return root


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


def _model_row(variant: str, model: nn.Module, res: Any, input_size: tuple, storage_bpi: float) -> dict:
    from tokenbook.bench import count_macs, count_params

    macs = count_macs(model, input_size=input_size)
    f = res.final
    return {"variant": variant, "model": PAPER_LABELS[variant], "input": VARIANTS[variant][0],
            "input_shape": "x".join(str(s) for s in input_size), "storage_bytes_per_image": storage_bpi,
            "top1": f.get("val_top1"), "top5": f.get("val_top5"), "ema_top1": f.get("ema_top1"),
            "params_m": count_params(model)["total"] / 1e6, "gmacs": macs["gmacs"], "gflops": macs["gflops"],
            "epochs": int(res.config.epochs), "steps": int(res.timing["steps"]),
            "train_wall_s": res.timing["wall_time_s"], "step_ms": res.timing["step_ms"],
            "train_img_s": res.timing["train_img_s"]}


def run_variant(variant: str, params: dict, data: Optional[TokenData] = None, bundle: Any = None,
                tokenadapt: Optional[nn.Module] = None, storage_bpi: Optional[float] = None, **cfg_overrides: Any):
    """Train one variant with ``fit`` and return ``(summary row, FitResult)``.

    ``params``: notebook parameters (``seed``, ``token_model``, ``pixel_model``, ``crop``, ``drop_path``,
    ``rrc_scale_min``, ``ta_per_sample``, ``token_eda``, and the :func:`train_config` keys). Pixel variant: the
    pixel ViT on ``bundle`` (uint8 batches + ``bundle.preprocess``). Token variants: the token ViT with the codebook
    attached (evaluation on centre-cropped ids), Token-EDA in the dataset and the variant's batch hook.
    """
    seed = int(params.get("seed", 0))
    cfg = train_config({**params, "seed": seed}, variant, **cfg_overrides)
    if VARIANTS[variant][0] == "pixels":
        if bundle is None:
            raise ValueError("the pixel variant needs the image bundle")
        name, mkw = _variant_model(variant, params, bundle.num_classes, bundle.config.img_size, 0)
        res = _fit_variant(variant, name, mkw, cfg, int(params.get("num_workers", 0)), bundle=bundle)
    else:
        if data is None:
            raise ValueError(f"{variant} needs token data")
        name, mkw = _variant_model(variant, params, data.num_classes, 0, int(data.codebook.shape[1]))
        res = _fit_variant(variant, name, mkw, cfg, int(params.get("num_workers", 0)), data=data,
                           tokenadapt=tokenadapt, hook=_hook_settings(params))
    return _result_row(variant, res, bundle, data, params, storage_bpi), res


def _result_row(variant: str, res: Any, bundle: Any, data: Optional[TokenData], params: dict,
                storage_bpi: Optional[float]) -> dict:
    if VARIANTS[variant][0] == "pixels":
        size = (bundle.config.channels, bundle.config.img_size, bundle.config.img_size)
    else:
        size = (int(data.codebook.shape[1]), int(params["crop"]), int(params["crop"]))
    model = res.model.cpu()
    return _model_row(variant, model, res, size, float("nan") if storage_bpi is None else storage_bpi)


def run_ablation(variants: Sequence[str], params: dict, data: Optional[TokenData], bundle: Any = None,
                 tokenadapt: Optional[nn.Module] = None, storage: Any = None,
                 callback: Optional[Callable[[dict], None]] = None):
    """Run every variant in order with the same parameters; returns ``(summary DataFrame, {variant: history})``.

    ``storage`` (from :func:`storage_table`) gives the bytes per image of each input: PNG for pixels (lossless, per
    image), the gzip'd token stream + index for tokens. ``gain_vs_seit_pts`` = top-1 minus the SeiT row's top-1.
    """
    bpi = _bytes_per_image(storage)
    rows, hist = [], {}
    for v in variants:
        row, res = run_variant(v, params, data, bundle, tokenadapt, bpi.get(VARIANTS[v][0]))
        rows.append(row)
        hist[v] = res.history
        if callback:
            callback(row)
    return _ablation_frame(rows), hist


def _bytes_per_image(storage: Any) -> dict:
    if storage is None:
        return {}
    s = storage.set_index("format")["bytes_per_image"]
    return {"pixels": float(s["PNG"]), "tokens": float(s["tokens (gzip stream + gzip index)"])}


def _ablation_frame(rows: list):
    import pandas as pd

    df = pd.DataFrame(rows)
    base = df.loc[df["variant"] == "seit", "top1"]
    df["gain_vs_seit_pts"] = df["top1"] - float(base.iloc[0]) if len(base) else float("nan")
    return df


# ----------------------------------------------------------------------------------------------------------
# TokenAdapt f/g (storage and the paper-vs-ours tables are in seit_results)
# ----------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------
# Seeds and claims (issue 12)
# ----------------------------------------------------------------------------------------------------------
class AblationHistories(dict):
    """``{(variant, seed): history DataFrame}`` (a dict) with ``launched``: the :class:`tokenbook.runs.Run` records
    of the runs that went through the run store (empty in the kernel path)."""

    def __init__(self, *args: Any, launched: Sequence = (), **kw: Any):
        super().__init__(*args, **kw)
        self.launched = list(launched)


def _seeds_of(variants: Sequence[str], seeds: Sequence[int], arm_seeds: Optional[dict]) -> list[tuple[int, list]]:
    """``[(seed, [variants that train it])]`` in seed order: every variant trains every seed, or, with
    ``arm_seeds`` (``{variant: seeds}``, :func:`tokenbook.claims.arm_seeds`), the seeds listed for it (a variant
    missing there trains all of ``seeds``). Seeds no variant trains are left out."""
    variants = parse_variants(variants)
    pick = {v: [int(s) for s in (arm_seeds or {}).get(v, seeds)] for v in variants}
    extra = sorted({s for v in variants for s in pick[v]} - {int(s) for s in seeds})
    if extra:
        raise ValueError(f"arm_seeds names seeds {extra} outside the run's seeds {list(seeds)}")
    out = [(int(s), [v for v in variants if int(s) in pick[v]]) for s in dict.fromkeys(int(x) for x in seeds)]
    return [(s, vs) for s, vs in out if vs]


def run_ablation_seeds(variants: Sequence[str], params: dict, seeds: Sequence[int], data: Optional[TokenData],
                       bundle: Any = None, tokenadapt: Optional[nn.Module] = None, storage: Any = None,
                       callback: Optional[Callable[[dict], None]] = None, arm_seeds: Optional[dict] = None):
    """:func:`run_ablation` once per seed, paired by seed: for a seed s every variant starts from
    ``repro.seed_everything(s)`` (the four token variants share the architecture, so the same initial weights) and
    sees the same batch order (``loader_generator(s)``). The tokenizer and TokenAdapt's f/g are shared (trained once
    by the caller). Returns ``(runs, histories)``: one row per (seed, variant) with a ``seed`` column, and
    ``{(variant, seed): history DataFrame}`` (an :class:`AblationHistories`). ``arm_seeds`` (``{variant: seeds}``,
    :func:`tokenbook.claims.arm_seeds`): a variant trains only its own seeds. In this process, nothing stored; the
    same runs through the run store: :func:`train_ablation`."""
    import pandas as pd

    frames, hist = [], AblationHistories()
    for s, vs in _seeds_of(variants, seeds, arm_seeds):
        df, h = run_ablation(vs, {**params, "seed": int(s)}, data, bundle, tokenadapt, storage,
                             callback=None if callback is None else (lambda r, s=s: callback({**r, "seed": s})))
        df.insert(0, "seed", int(s))
        frames.append(df)
        hist.update({(v, int(s)): hv for v, hv in h.items()})
    return pd.concat(frames, ignore_index=True), hist


# ----------------------------------------------------------------------------------------------------------
# the ablation through the workbook's run store (tokenbook.runs): one stored run per (variant, seed)
# ----------------------------------------------------------------------------------------------------------


def ablation_specs(variants: Sequence[str], params: dict, seeds: Sequence[int], data: Optional[TokenData],
                   bundle: Any = None, tokenadapt: Optional[nn.Module] = None,
                   arm_seeds: Optional[dict] = None) -> list:
    """``[(variant, seed, RunSpec)]`` of the seeded ablation (:func:`variant_spec`), seed by seed (each variant only
    its own seeds with ``arm_seeds``, as :func:`run_ablation_seeds`); the token data must have been written to
    files (:func:`build_default_tokens`: ``data.root``) and TokenAdapt is saved next to them."""
    tokens = ta = None
    variants = parse_variants(variants)
    if any(VARIANTS[v][0] == "tokens" for v in variants):
        if data is None or data.root is None:
            raise ValueError("the token variants need token data read from files (build_default_tokens)")
        tokens = token_ref(data)
        if any(VARIANTS[v][2] for v in variants):
            if tokenadapt is None:
                raise ValueError("the TokenAdapt variants need f/g")
            sha = module_fingerprint(tokenadapt)
            ta = save_tokenadapt(tokenadapt, Path(data.root) / f"tokenadapt-{sha}.pt")
    cfg = bundle.config if bundle is not None else None
    if cfg is None:
        from tokenbook.data import DataConfig

        cfg = DataConfig(img_size=int(params.get("img_size", 28)))
    nc = bundle.num_classes if bundle is not None else data.num_classes
    return [(v, s, variant_spec(v, params, s, cfg, tokens, ta, nc))
            for s, vs in _seeds_of(variants, seeds, arm_seeds) for v in vs]


def train_ablation(variants: Sequence[str], params: dict, seeds: Sequence[int], data: Optional[TokenData],
                   bundle: Any = None, tokenadapt: Optional[nn.Module] = None, storage: Any = None,
                   callback: Optional[Callable[[dict], None]] = None, executor: str = "kernel",
                   via_store: Optional[bool] = None, store: Optional[str] = None, workers: Optional[int] = None,
                   threads: Optional[int] = None, cluster: Optional[str] = None, resources: Optional[dict] = None,
                   wait: bool = True, arm_seeds: Optional[dict] = None):
    """``seit.run_ablation_seeds`` (same arguments, ``arm_seeds`` included; same ``(runs, histories)``) wherever
    ``executor`` says.

    ``executor="kernel"`` (``via_store`` None or False): ``seit.run_ablation_seeds`` in this process, nothing
    stored. Any other executor (``processes``, ``torchrun``, ``submitit``; or ``kernel`` with ``via_store=True``):
    every (variant, seed) run of :func:`ablation_specs` is one entry of the workbook's run store, trained once by
    :func:`tokenbook.runs.launch` (``store``, ``workers``, ``threads``, ``cluster``, ``resources``, ``wait`` as
    there) and read back by every later execution; each classifier is rebuilt from its stored weights
    (:func:`rebuild_variant`) and gives the same rows and histories as the kernel path. ``histories.launched``
    holds the :class:`tokenbook.runs.Run` records (empty in the kernel path)."""
    if via_store is None:
        via_store = executor != "kernel"
    if not via_store:
        if executor != "kernel":
            raise ValueError(f"executor {executor!r} trains through the run store; via_store=False needs 'kernel'")
        return run_ablation_seeds(variants, params, seeds, data, bundle, tokenadapt, storage, callback, arm_seeds)
    launch = dict(executor=executor, store=store, workers=workers, threads=threads, cluster=cluster,
                  resources=resources, wait=wait)
    import pandas as pd

    from tokenbook import runs as R

    plan = ablation_specs(variants, params, seeds, data, bundle, tokenadapt, arm_seeds)
    done = R.launch([spec for _, _, spec in plan], **launch)
    bpi = _bytes_per_image(storage)
    frames, hist = [], AblationHistories(launched=done)
    for s in dict.fromkeys(sd for _, sd, _ in plan):
        rows = []
        for (v, sd, spec), run in zip(plan, done):
            if sd != s:
                continue
            res = rebuild_variant(spec.args, run.output)
            row = _result_row(v, res, bundle, data, params, bpi.get(VARIANTS[v][0]))
            rows.append(row)
            hist[(v, s)] = res.history
            if callback:
                callback({**row, "seed": s})
        df = _ablation_frame(rows)
        df.insert(0, "seed", s)
        frames.append(df)
    return pd.concat(frames, ignore_index=True), hist


def heldout_tokens(data: TokenData, heldout_bundle: Any, root: Any, name: str = "fmnist") -> TokenData:
    """The token data of every held-out image (:func:`tokenbook.heldout.heldout_bundle`): the same tokenizer
    (``data.tokenizer``, e.g. the stored one of :func:`stored_tokens`; its padding follows from its image size)
    writes the held-out split in SeiT's format under ``root`` (the training split again, as the same ids) and reads
    it back."""
    tok = data.tokenizer
    if tok is None:
        raise ValueError("held-out tokens need the tokenizer that wrote the run's tokens (token_source 'train')")
    pad = (int(tok.image_size) - int(heldout_bundle.config.img_size)) // 2
    return build_default_tokens(heldout_bundle, root, name=name, tokenizer=tok, pad=pad,
                                tokenizer_history=data.tokenizer_history)


def add_heldout(runs: Any, histories: AblationHistories, heldout_bundle: Any, heldout_data: TokenData,
                batch_size: int = 500) -> Any:
    """Evaluate every stored (variant, seed) classifier of :func:`train_ablation` (``histories.launched``) once more
    on every held-out image: a pixel variant on ``heldout_bundle``, a token variant on the ids of
    :func:`heldout_tokens`; adds the column ``heldout_top1`` to ``runs`` (returned). Needs the store's records (the
    kernel path keeps no weights)."""
    from tokenbook.heldout import HELDOUT_COLUMN, evaluate_runs

    if not histories.launched:
        raise ValueError("no stored runs to evaluate: the held-out judgement needs the run store (executor other "
                         "than kernel)")

    def build(run):
        return rebuild_variant(run.spec.args, run.output).model

    pixel = [r for r in histories.launched if VARIANTS[r.spec.args["variant"]][0] == "pixels"]
    token = [r for r in histories.launched if VARIANTS[r.spec.args["variant"]][0] != "pixels"]
    token_val = token_loaders(heldout_data, batch_size, eda=False, eval_batch_size=batch_size)[1]
    metrics = {**evaluate_runs(pixel, heldout_bundle, build, batch_size),
               **evaluate_runs(token, heldout_bundle, build, loader=token_val)}
    got = {(r.spec.args["variant"], int(r.spec.args["seed"])): float(metrics[r.key]["top1"])
           for r in histories.launched}
    missing = [(v, int(s)) for v, s in zip(runs["variant"], runs["seed"]) if (v, int(s)) not in got]
    if missing:
        raise ValueError(f"no stored run for {missing}")
    runs = runs.copy()
    runs[HELDOUT_COLUMN] = [got[(v, int(s))] for v, s in zip(runs["variant"], runs["seed"])]
    return runs


# ----------------------------------------------------------------------------------------------------------
# the tokenizer and TokenAdapt f/g through the run store (issue 20): keyed by their spec, trained once, read back
# (the pattern of 05's source pre-training, experiments.memory.pretrain_spec)
# ----------------------------------------------------------------------------------------------------------


def _launch(spec: Any, store: Optional[str], threads: Optional[int]):
    from tokenbook import runs as R

    return R.launch([spec], executor="kernel", store=store, threads=threads)[0]


def _via_store(params: Any, via_store: Optional[bool]) -> bool:
    return str(params.get("executor", "kernel")) != "kernel" if via_store is None else bool(via_store)


def stored_tokens(bundle: Any, root: Any, params: Any, via_store: Optional[bool] = None, store: Optional[str] = None,
                  threads: Optional[int] = None, name: str = "fmnist"):
    """The notebook's token data with the tokenizer from the run store (:func:`tokenizer_spec`, trained in this
    process when the store lacks it): the token files written under ``root`` from the stored weights. Returns
    ``(TokenData, Run)``; ``TokenData.tokenizer_history`` is the stored training log. ``via_store`` None: the
    store unless ``params["executor"]`` is ``kernel`` (the ablation's rule, :func:`train_ablation`); without it
    the tokenizer trains here (:func:`build_default_tokens`) and the Run is None."""
    from tokenbook.data import tokens as T

    spec = tokenizer_spec(params, bundle.config)
    kw = {k: spec.args[k] for k in _TOKENIZER_KEYS}  # the training keywords are unused with a trained tokenizer
    if not _via_store(params, via_store):
        return build_default_tokens(bundle, root, name=name, device=spec.args["accelerator"], **kw), None
    run = _launch(spec, store, threads)
    tok = T.VQTokenizer(**run.output["config"])
    tok.load_state_dict(run.output["state_dict"])
    td = build_default_tokens(bundle, root, name=name, tokenizer=tok.eval(), tokenizer_history=run.output["history"],
                              **kw)
    return td, run


def stored_tokenadapt(data: Any, bundle: Any, params: Any, via_store: Optional[bool] = None,
                      store: Optional[str] = None, threads: Optional[int] = None):
    """TokenAdapt f/g from the run store (:func:`tokenadapt_spec`, trained in this process when the store lacks it),
    frozen in eval mode. Returns ``(TokenAdapt, history DataFrame, Run)``; ``via_store`` as in
    :func:`stored_tokens` (without the store: :func:`train_default_tokenadapt` here, Run None)."""
    from tokenbook.models.seit import TokenAdapt

    spec = tokenadapt_spec(params, bundle.config, data)
    if not _via_store(params, via_store):
        kw = {k: v for k, v in spec.args.items() if k not in ("data", "tokens", "tokenizer", "accelerator")}
        return (*train_default_tokenadapt(data, bundle, device=spec.args["accelerator"], **kw), None)
    run = _launch(spec, store, threads)
    ta = TokenAdapt(**run.output["config"])
    ta.load_state_dict(run.output["state_dict"])
    return ta.eval(), run.output["history"], run


# ----------------------------------------------------------------------------------------------------------
# GPU budget: this notebook's loops for tokenbook.gpu_budget (an ESTIMATE; the engine is in the core), and the
# token-side costables and loader rates 06_cross_paper's token arms use too
# ----------------------------------------------------------------------------------------------------------
from tokenbook import gpu_budget as _gpu  # noqa: E402  (the core engine: it imports no paper code)


def measure_token_loader_us(grid: int = 14, batch: int = 256, n_batches: int = 10, val: bool = False,
                            codebook_size: int = 391, n: int = 4096) -> float:
    """us per image of :func:`token_loaders` (training: Token-EDA per sample, ``val``: plain ids) on synthetic ids
    (the cost does not depend on their values), on this CPU."""
    ts = T.TokenSet(np.random.RandomState(0).randint(0, codebook_size, (n, grid, grid)).astype(np.uint16),
                    np.arange(n) % 10)
    cb = torch.randn(codebook_size, 32)
    td = TokenData(ts, ts, cb, build_synonyms(cb), 10, "synthetic", None)
    return _gpu.time_loader(token_loaders(td, batch)[int(val)], n_batches)


_gpu.register_loader_rate("tokens", measure_token_loader_us)
_gpu.register_loader_rate("tokens (val)", lambda: measure_token_loader_us(val=True))


def tokenizer_costable(kw: dict) -> "_gpu.Costable":
    """The VQ tokenizer of ``kw`` on uint8 images, as ``T.train_tokenizer`` trains it."""
    return _gpu.Costable(T.VQTokenizer(**kw), torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8),
                         lambda x: x / 255.0)


class _TokenAdaptStep(nn.Module):
    """The step of ``methods.token_aug.train_tokenadapt``: tokens of the images and of their spatially augmented
    copies (no grad), then f, the same augmentation in f-space, and g's code logits."""

    def __init__(self, ta: nn.Module, tok: nn.Module, per_sample: bool):
        super().__init__()
        self.ta, self.tok, self.per_sample = ta.set_trainable(True), tok.eval().requires_grad_(False), per_sample
        self.cb = tok.export_codebook().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, g = self.ta.out_grid, self.ta.in_grid
        with torch.no_grad():
            ids = self.tok.encode(x)
            sp = sample_spatial_params(x.shape[0], 2 * g, 2 * g, per_sample=self.per_sample)
            self.tok.encode(apply_spatial(x, sp, m * (x.shape[-1] // g)).clamp(0, 1))
        return self.ta.forward_logits(apply_spatial(self.ta.forward_conversion(embed_ids(ids, self.cb)), sp, 2 * m))


def tokenadapt_costable(tok: dict, ta: dict, per_sample: bool) -> "_gpu.Costable":
    """One TokenAdapt f/g training step (TokenAdapt of ``ta``'s sizes, the VQ tokenizer of ``tok``) on uint8 images."""
    from tokenbook.models.seit import TokenAdapt

    return _gpu.Costable(_TokenAdaptStep(TokenAdapt(**ta), T.VQTokenizer(**tok), per_sample),
                         torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8), lambda x: x / 255.0)


def token_costable(model: nn.Module, variant: str, ta: dict, num_classes: int, crop: int, rrc_scale_min: float,
                   per_sample: bool = True, grid: int = 14) -> "_gpu.Costable":
    """A token classifier ``model`` with the variant's batch hook (:func:`make_hook`; TokenAdapt of ``ta``'s sizes
    for the TokenAdapt variants) as its device-side batch work, on the ids the token loader yields."""
    from tokenbook.models.seit import TokenAdapt

    cb = torch.randn(ta["codebook_size"], ta["code_dim"])
    model.set_codebook(cb)
    hook = make_hook(variant, cb, num_classes, crop, TokenAdapt(**ta) if VARIANTS[variant][2] else None,
                     rrc_scale_min, per_sample)
    return _gpu.Costable(model, torch.randint(0, ta["codebook_size"], (4, grid, grid)),
                         lambda x: hook(x, torch.arange(x.shape[0]) % num_classes)[0], lambda x: x)


def _gpu_token_classifier(p: dict, v: str, tm: dict, ta: dict, grid: int) -> "_gpu.Costable":
    """04's token ViT (``token_model``) with the variant's batch hook."""
    import timm

    import tokenbook.models  # noqa: F401  (registers the token ViTs)

    return token_costable(timm.create_model(p["token_model"], **tm), v, ta, 10, p["crop"], p["rrc_scale_min"],
                          p["ta_per_sample"], grid)


def gpu_loops(params: dict) -> list:
    """This notebook's training loops under ``params`` as :class:`tokenbook.gpu_budget.Loop` rows (what
    :func:`tokenbook.gpu_budget.estimate` costs): the VQ tokenizer, TokenAdapt f/g, every variant x seeds (token
    variants with their batch hook and the Token-EDA loader)."""
    import tokenbook.models  # noqa: F401  (registers the pixel and token ViTs)
    from tokenbook.claims import parse_seeds

    p, G, nb = params, _gpu, "04_seit"
    if p["token_source"] != "train":
        raise ValueError("the GPU estimate covers token_source 'train' (the tokenizer trained in the notebook)")
    (n, nv), S = G.fm_sizes(p), len(parse_seeds(p["seeds"]))
    grid, K, D, crop = 28 // p["tokenizer_downsample"], p["codebook_size"], p["code_dim"], p["crop"]
    cpu = "on the GPU (experiments.seit.token_device)"
    tok = dict(in_chans=1, image_size=28, downsample=p["tokenizer_downsample"], codebook_size=K, code_dim=D,
               hidden=p["tokenizer_hidden"])
    ta = dict(code_dim=D, codebook_size=K, in_grid=grid, out_grid=crop, dim=p["ta_dim"], heads=p["ta_heads"],
              dim_head=p["ta_dim_head"])
    loops = [G.Loop(nb, f"VQ tokenizer training ({p['tokenizer_steps']} steps)", lambda: tokenizer_costable(tok),
                    steps=p["tokenizer_steps"], batch=p["tokenizer_batch"], precision="32-true", opt="adam",
                    data="memory", key=("vq", G.freeze(tok)),
                    note=cpu + "; tokenizing every image after: not charged")]
    variants = parse_variants(p["variants"])
    if any(VARIANTS[v][2] for v in variants) and not p["tokenadapt_ckpt"]:
        loops.append(G.Loop(nb, f"TokenAdapt f/g training ({p['ta_steps']} steps)",
                            lambda: tokenadapt_costable(tok, ta, p["ta_per_sample"]), steps=p["ta_steps"],
                            batch=p["ta_batch"], precision="32-true", data="memory", per_sample=True,
                            key=("ta", G.freeze(tok), G.freeze(ta), p["ta_per_sample"]),
                            note=cpu + "; its Mixup/CutMix not charged"))
    for v in variants:
        fit = G.fit_fields(train_config(p, v), n, nv, p["num_workers"], S)
        if VARIANTS[v][0] == "pixels":
            loops.append(G.timm_loop(nb, f"{v}: {p['pixel_model']} x {S} seeds", p["pixel_model"],
                                     dict(num_classes=10, img_size=p["img_size"], drop_path_rate=p["drop_path"]),
                                     p["img_size"], **fit))
            continue
        tm = dict(num_classes=10, img_size=crop, in_chans=D, drop_path_rate=p["drop_path"])
        loops.append(G.Loop(nb, f"{v}: {p['token_model']} + batch hook x {S} seeds",
                            lambda v=v, tm=tm: _gpu_token_classifier(p, v, tm, ta, grid), data="tokens",
                            per_sample=True, key=("seit", v, G.freeze(tm), G.freeze(ta), p["rrc_scale_min"],
                                                  p["ta_per_sample"]), **fit))
    return loops


__all__ += ["RELEASED", "released_table", "proof_data"]
