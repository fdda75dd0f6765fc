"""04_seit's runs, kept apart from the notebook's report code so that their code version is small
(:func:`tokenbook.runs.code_version` hashes a trainer's import closure): the token data the runs read
(:class:`TokenData`), the batch hook of each variant, the ``TrainConfig`` of a variant, and the three stored runs
with their specs and trainers: a (variant, seed) classifier (:func:`variant_spec` / :func:`train_variant_run`), the
VQ tokenizer (:func:`tokenizer_spec` / :func:`train_tokenizer_run`) and TokenAdapt f/g (:func:`tokenadapt_spec` /
:func:`train_tokenadapt_run`). Imports nothing of the reports, the ledger or :mod:`tokenbook.results`; editing
those, or :mod:`tokenbook.experiments.seit` and ``seit_results``, does not train these runs again. Re-exported by
:mod:`tokenbook.experiments.seit` (import them from there).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenbook.data import tokens as T
from tokenbook.io import display_path
from tokenbook.methods.token_aug import TokenBatchAugment, TokenEDA, load_synonyms

PathLike = Union[str, os.PathLike]


#: ablation variants: name -> (input, ColorAdapt, TokenAdapt)
VARIANTS = {
    "pixel": ("pixels", False, False),
    "seit": ("tokens", False, False),
    "seit_ca": ("tokens", True, False),
    "seit_ta": ("tokens", False, True),
    "seit_ta_ca": ("tokens", True, True),
}


#: our variant -> the row label of the paper's tables (``tokenbook/references/seit.yaml``)
PAPER_LABELS = {
    "pixel": "Full pixels",
    "seit": "SeiT",
    "seit_ca": "SeiT + ColorAdapt",
    "seit_ta": "SeiT + TokenAdapt",
    "seit_ta_ca": "SeiT + TokenAdapt + ColorAdapt",
}


@dataclass
class TokenData:
    """Token sets read back from SeiT-format files, with what the classifiers and figures need."""

    train: T.TokenSet
    val: T.TokenSet
    codebook: torch.Tensor  # raw rows (K, D), as the classifier sees them
    synonyms: dict
    num_classes: int
    source: str
    root: Path
    tokenizer: Optional[T.VQTokenizer] = None
    tokenizer_history: list = field(default_factory=list)
    files: dict = field(default_factory=dict)  # name -> path of every file written / read

    @property
    def grid(self) -> tuple[int, int]:
        return self.train.grid

    def describe(self) -> dict:
        return {"source": self.source, "train_records": len(self.train), "val_records": len(self.val),
                "grid": f"{self.grid[0]}x{self.grid[1]}", "codebook": f"{self.codebook.shape[0]}x{self.codebook.shape[1]}",
                "max_id": int(max(np.max(self.train.ids), np.max(self.val.ids))), "num_classes": self.num_classes,
                "root": display_path(self.root)}


def _images_uint8(ds, n: Optional[int] = None, pad: int = 0) -> torch.Tensor:
    """(N, C, H, W) uint8 images of an ImageDataset (grey stays 1 channel), ``pad`` zero pixels on each side."""
    x = ds.images_tensor(n)
    return F.pad(x, (int(pad),) * 4) if pad else x


def token_images(ds: Any, pad: int = 0, n: Optional[int] = None) -> torch.Tensor:
    """The images the tokenizer sees: the first ``n`` of ``ds`` as uint8 (N, C, H, W) with ``pad`` zero pixels on
    each side (Fashion-MNIST's background is 0, so padding 28 px to 32 adds background; with downsample 4 the
    token grid is 8x8)."""
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    return _images_uint8(ds, n, pad)


def train_default_tokenizer(bundle: Any, downsample: int = 2, codebook_size: int = 391, code_dim: int = 32,
                            hidden: int = 32, steps: int = 200, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                            device: str = "cpu", pad: int = 0) -> tuple[T.VQTokenizer, list]:
    """The VQ tokenizer of :func:`build_default_tokens` trained on ``bundle.train`` (padded by ``pad``), seeded by
    ``seed``; returns ``(tokenizer on the CPU in eval mode, logged rows)``."""
    imgs_tr = token_images(bundle.train, pad)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    tok = T.VQTokenizer(in_chans=imgs_tr.shape[1], image_size=imgs_tr.shape[-1], downsample=downsample,
                        codebook_size=codebook_size, code_dim=code_dim, hidden=hidden)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(imgs_tr), batch_size=batch_size,
                                         shuffle=True, drop_last=len(imgs_tr) >= batch_size, generator=g)
    hist = T.train_tokenizer(tok, loader, steps=steps, lr=lr, device=device, log_every=max(1, steps // 10))
    return tok.cpu().eval(), hist


def token_loaders(data: TokenData, batch_size: int, seed: int = 0, eda: bool = True, synonym_prob: float = 0.25,
                  swap_prob: float = 0.25, num_workers: int = 0, eval_batch_size: Optional[int] = None):
    """Train loader (Token-EDA per sample, shuffled, drop_last) and ordered val loader over the token sets."""
    from tokenbook.repro import loader_generator, worker_init_fn

    k = int(data.codebook.shape[0])
    eda_t = TokenEDA(data.synonyms, synonym_prob=synonym_prob, swap_prob=swap_prob, num_codes=k) if eda else None
    common = dict(num_workers=num_workers, worker_init_fn=worker_init_fn if num_workers else None,
                  persistent_workers=num_workers > 0)
    train = torch.utils.data.DataLoader(T.TokenDataset(data.train, eda_t), batch_size=batch_size, shuffle=True,
                                        drop_last=True, generator=loader_generator(seed), **common)
    val = torch.utils.data.DataLoader(T.TokenDataset(data.val), batch_size=eval_batch_size or 2 * batch_size,
                                      shuffle=False, **common)
    return train, val


def make_hook(variant: str, codebook: torch.Tensor, num_classes: int, crop: int, tokenadapt: Optional[nn.Module],
              rrc_scale_min: float = 0.08, per_sample: bool = True,
              coloradapt_eps: float = 1e-5, emb_noise: float = 1.0, cutmix: float = 1.0,
              label_smoothing: float = 0.1, ta_mix: bool = True) -> TokenBatchAugment:
    """The batch hook of a token variant: SeiT (Emb-Noise on half of every batch) or Forging Tokens (noise 0.75 /
    ColorAdapt 0.25 per batch; ``noise 1 / ColorAdapt 0`` without ColorAdapt), with the TokenAdapt half if asked.

    ``coloradapt_eps``: the official ColorAdapt divides by the std without an epsilon; on the default data a map
    (or the partner's) is often a single code (black background), whose zero std gives NaN, so we add 1e-5.

    ``emb_noise``: the standard deviation of Emb-Noise's channel shift and per-element noise (official 1.0 and 1.0,
    ``token-noise-scale`` / ``token-noise-std``, on ViT-VQGAN's codebook rows, whose scale is unknown).
    ``cutmix``: CutMix alpha of the SeiT part (official 1.0; 0 is off), ``label_smoothing``: of the soft targets
    (official 0.1); ``ta_mix``: the TokenAdapt half's Mixup 0.8 / CutMix 1.0 (official; False turns them off).
    """
    kind, ca, ta = VARIANTS[variant]
    if kind != "tokens":
        raise ValueError(f"{variant} is not a token variant")
    if not emb_noise >= 0:
        raise ValueError(f"emb_noise must be >= 0, got {emb_noise}")
    kw = dict(rrc_scale=(rrc_scale_min, 1.0), per_sample=per_sample, coloradapt_eps=coloradapt_eps,
              noise_scale=float(emb_noise), noise_std=float(emb_noise), cutmix_alpha=float(cutmix),
              label_smoothing=float(label_smoothing))
    if ta and not ta_mix:
        kw.update(ta_mixup_alpha=0.0, ta_cutmix_alpha=0.0)
    if not ca and not ta:
        return TokenBatchAugment.seit(codebook, num_classes, crop, **kw)
    if ta and tokenadapt is None:
        raise ValueError(f"{variant} needs a TokenAdapt module (train_tokenadapt or load_tokenadapt)")
    return TokenBatchAugment.forging(codebook, num_classes, crop, tokenadapt=tokenadapt if ta else None,
                                     coloradapt=ca, **kw)


_CFG_KEYS = ("epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "warmup_lr", "min_lr", "ema_decay",
             "max_steps_per_epoch", "accelerator", "devices", "num_nodes", "strategy", "precision", "seed",
             "clip_grad", "max_steps")


def train_config(params: dict, variant: str, **overrides: Any):
    """``TrainConfig`` of a variant from notebook parameters.

    Token variants: ``mixup = cutmix = label_smoothing = 0`` (the batch hook mixes and returns smoothed soft
    targets); TokenAdapt variants take ``ta_warmup_epochs`` (30 in the official TokenAdapt code). The pixel variant
    uses CutMix 1.0 and ``label_smoothing`` like the token variants' hook. ``max_steps_per_epoch`` 0 means None.
    """
    from tokenbook.train import TrainConfig

    kw = {k: params[k] for k in _CFG_KEYS if k in params}
    if not kw.get("max_steps_per_epoch"):
        kw["max_steps_per_epoch"] = None
    if kw.get("clip_grad") in (0, 0.0):
        kw["clip_grad"] = None
    kind, _, ta = VARIANTS[variant]
    if kind == "tokens":
        kw.update(mixup=0.0, cutmix=0.0, label_smoothing=0.0)
        if ta and params.get("ta_warmup_epochs") is not None:
            kw["warmup_epochs"] = float(params["ta_warmup_epochs"])
    else:
        kw.update(mixup=0.0, cutmix=float(params.get("pixel_cutmix", 1.0)),
                  label_smoothing=float(params.get("label_smoothing", 0.1)))
    kw.update(progress=False)
    kw.update(overrides)
    return TrainConfig(**kw)


def fit_launched(model: nn.Module, train_loader: Any, val_loader: Any, cfg: Any, **kw: Any):
    """:func:`tokenbook.train.fit_launched` (kept here under its old name for the notebook)."""
    from tokenbook.train import fit_launched as _fit_launched

    return _fit_launched(model, train_loader, val_loader, cfg, **kw)


def _variant_model(variant: str, params: dict, num_classes: int, img_size: int, code_dim: int) -> tuple[str, dict]:
    """(timm name, keywords) of a variant's classifier."""
    dp = float(params.get("drop_path", 0.0))
    if VARIANTS[variant][0] == "pixels":
        return params["pixel_model"], {"num_classes": int(num_classes), "img_size": int(img_size), "drop_path_rate": dp}
    return params["token_model"], {"num_classes": int(num_classes), "img_size": int(params["crop"]),
                                   "in_chans": int(code_dim), "drop_path_rate": dp}


def _fit_variant(variant: str, model_name: str, model_kwargs: dict, cfg: Any, num_workers: int,
                 bundle: Any = None, data: Optional[TokenData] = None, tokenadapt: Optional[nn.Module] = None,
                 hook: Optional[dict] = None):
    """The body of every run of the ablation (kernel path :func:`run_variant` and store trainer
    :func:`train_variant_run`): the classifier built right after ``seed_everything(cfg.seed)``, loaders seeded with
    ``cfg.seed`` and ``fit``. Returns the ``FitResult``."""
    import timm

    import tokenbook.models  # noqa: F401  (registers the pixel and token ViTs)
    from tokenbook import data as D
    from tokenbook.repro import seed_everything

    seed = int(cfg.seed)
    seed_everything(seed)
    model = timm.create_model(model_name, **model_kwargs)
    if VARIANTS[variant][0] == "pixels":
        if bundle is None:
            raise ValueError("the pixel variant needs the image bundle")
        tl, vl = D.make_loaders(bundle, cfg.batch_size, num_workers=num_workers, seed=seed)
        return fit_launched(model, tl, vl, cfg, preprocess=bundle.preprocess, desc=variant)
    if data is None:
        raise ValueError(f"{variant} needs token data")
    model.set_codebook(data.codebook)
    tl, vl = token_loaders(data, cfg.batch_size, seed=seed, eda=bool(hook["token_eda"]), num_workers=num_workers)
    h = make_hook(variant, data.codebook, data.num_classes, int(hook["crop"]), tokenadapt,
                  float(hook["rrc_scale_min"]), bool(hook["per_sample"]), emb_noise=float(hook.get("emb_noise", 1.0)),
                  cutmix=float(hook.get("cutmix", 1.0)), label_smoothing=float(hook.get("label_smoothing", 0.1)),
                  ta_mix=bool(hook.get("ta_mix", True)))
    return fit_launched(model, tl, vl, cfg, hooks=[h], num_classes=data.num_classes, desc=variant)


def _hook_settings(params: dict) -> dict:
    return {"crop": int(params["crop"]), "rrc_scale_min": float(params.get("rrc_scale_min", 0.08)),
            "per_sample": bool(params.get("ta_per_sample", True)), "token_eda": bool(params.get("token_eda", True)),
            "emb_noise": float(params.get("emb_noise", 1.0)), "cutmix": float(params.get("token_cutmix", 1.0)),
            "label_smoothing": float(params.get("token_label_smoothing", 0.1)),
            "ta_mix": bool(params.get("ta_mix", True))}


def build_tokenadapt(data: TokenData, crop: int, dim: int = 384, heads: int = 6, dim_head: int = 64,
                     depth: int = 1) -> nn.Module:
    """A :class:`tokenbook.models.seit.TokenAdapt` for this token data: in grid = the token grid, out grid = the
    classifier crop (official: 32 -> 28), codebook size and code dim from the codebook."""
    from tokenbook.models.seit import TokenAdapt

    if data.grid[0] != data.grid[1]:
        raise ValueError(f"TokenAdapt needs a square token grid, got {data.grid}")
    return TokenAdapt(code_dim=int(data.codebook.shape[1]), codebook_size=int(data.codebook.shape[0]),
                      in_grid=data.grid[0], out_grid=crop, dim=dim, depth=depth, heads=heads, dim_head=dim_head)


def token_device(accelerator: str = "auto") -> str:
    """Where the tokenizer and TokenAdapt train: ``cuda`` when the notebook's ``accelerator`` asks for it (``auto``,
    ``cuda``, ``gpu``) and CUDA is there, else ``cpu`` (their random draws come from CPU generators either way)."""
    return "cuda" if str(accelerator).split(":")[0] in ("auto", "cuda", "gpu") and torch.cuda.is_available() else "cpu"


def train_default_tokenadapt(data: TokenData, bundle: Any, crop: int, steps: int = 150, batch_size: int = 64,
                             lr: float = 1e-3, dim: int = 384, heads: int = 6, dim_head: int = 64, seed: int = 0,
                             per_sample: bool = True, mix_prob: float = 0.0, device: str = "cpu", pad: int = 0):
    """Train f/g on the default data's pixels with :func:`tokenbook.methods.token_aug.train_tokenadapt` (CE of g's code
    logits against the tokens of the pixel-augmented image) on ``device`` (:func:`token_device`); returns
    ``(TokenAdapt, history DataFrame)`` with TokenAdapt and the tokenizer back on the CPU. ``pad``: as the tokenizer's
    (:func:`build_default_tokens`)."""
    import pandas as pd

    from tokenbook.methods.token_aug import train_tokenadapt

    if data.tokenizer is None:
        raise ValueError("training TokenAdapt needs the tokenizer (and pixels); for the release load tokenadapt.ckpt")
    torch.manual_seed(seed)
    ta = build_tokenadapt(data, crop, dim, heads, dim_head)
    imgs = token_images(bundle.train, pad)
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(imgs), batch_size=batch_size, shuffle=True,
                                         drop_last=True, generator=g)
    hist = train_tokenadapt(ta, data.tokenizer, loader, steps=steps, lr=lr, codebook=data.codebook,
                            per_sample=per_sample, mix_prob=mix_prob, log_every=max(1, steps // 10),
                            generator=torch.Generator().manual_seed(seed + 1), device=device)
    data.tokenizer.cpu()
    return ta.cpu().eval(), pd.DataFrame(hist)


def token_fingerprint(data: TokenData) -> str:
    """sha256 (16 hex digits) of what a token run reads: the ids and labels of both splits, the codebook and the
    synonyms. Part of every token run's spec, so new token files (another tokenizer) are other runs."""
    import hashlib
    import json

    h = hashlib.sha256()
    for ts in (data.train, data.val):
        h.update(np.ascontiguousarray(np.asarray(ts.ids), dtype=np.uint16).tobytes())
        h.update(np.asarray(ts.labels, dtype=np.int64).tobytes() if ts.labels is not None else b"-")
    h.update(data.codebook.detach().float().cpu().numpy().tobytes())
    h.update(json.dumps({str(k): [int(x) for x in v] for k, v in data.synonyms.items()}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def module_fingerprint(module: nn.Module) -> str:
    """sha256 (16 hex digits) of a module's state dict (names, shapes and values)."""
    import hashlib

    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode() + str(tuple(v.shape)).encode() + v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _tokenadapt_config(ta: nn.Module) -> dict:
    """The :class:`tokenbook.models.seit.TokenAdapt` keywords that rebuild ``ta`` (read off its layers)."""
    from tokenbook.models.seit import _Attention, _FeedForward

    attn = [m for m in ta.conversion_function.modules() if isinstance(m, _Attention)]
    lin = ta.conversion_function[0]
    hidden = [m.net[0] for m in ta.conversion_function.modules() if isinstance(m, _FeedForward)]
    return {"code_dim": int(ta.code_dim), "codebook_size": int(ta.codebook_size), "in_grid": int(ta.in_grid),
            "out_grid": int(ta.out_grid), "dim": int(lin.out_features), "depth": len(attn), "heads": int(attn[0].heads),
            "dim_head": int(attn[0].to_qkv.out_features // (3 * attn[0].heads)),
            "mlp_ratio": float(hidden[0].out_features / lin.out_features) if hidden else 4.0}


def save_tokenadapt(ta: nn.Module, path: PathLike) -> dict:
    """Write f/g's state dict to ``path`` (read back by :func:`tokenbook.models.seit.load_tokenadapt`); returns
    ``{"path", "sha", "config"}`` for a run spec (the config rebuilds the module, the sha is checked on reading)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in ta.state_dict().items()}, path)
    return {"path": str(path), "sha": module_fingerprint(ta), "config": _tokenadapt_config(ta)}


def variant_spec(variant: str, params: dict, seed: int, data_config: Any, tokens: Optional[dict] = None,
                 tokenadapt: Optional[dict] = None, num_classes: int = 10):
    """The :class:`tokenbook.runs.RunSpec` of one (variant, seed) run: the classifier (name and keywords), the data
    config (pixels), the resolved ``TrainConfig`` of :func:`train_config` (its seed ``seed``), batch and loader
    workers (:func:`tokenbook.runs.fit_args`), and for a token variant the token files (``tokens``: ``{"root",
    "name", "sha"}``, :func:`token_fingerprint`), the hook's settings and, for a TokenAdapt variant, f/g
    (``tokenadapt``: :func:`save_tokenadapt`'s answer)."""
    from tokenbook.runs import RunSpec, fit_args

    params = {**params, "seed": int(seed)}
    cfg = train_config(params, variant)
    kind, _, ta = VARIANTS[variant]
    extra: dict = {"variant": variant, "seed": int(seed)}
    code_dim = 0
    if kind == "tokens":
        if tokens is None:
            raise ValueError(f"{variant} needs the token files ({{'root', 'name', 'sha'}})")
        if ta and tokenadapt is None:
            raise ValueError(f"{variant} needs TokenAdapt f/g (save_tokenadapt)")
        code_dim = int(tokens["code_dim"])
        extra.update(tokens=dict(tokens), tokenadapt=dict(tokenadapt) if ta else None, hook=_hook_settings(params))
    img = int(data_config.img_size if not isinstance(data_config, dict) else data_config["img_size"])
    name, mkw = _variant_model(variant, params, num_classes, img, code_dim)
    args = fit_args(name, mkw, data_config, cfg, cfg.batch_size, int(params.get("num_workers", 0)), **extra)
    return RunSpec("tokenbook.experiments.seit_runs:train_variant_run", args, label=f"{variant} seed {seed}")


def _read_tokens(tokens: dict) -> TokenData:
    """The token data of a run spec, read back from its files and checked against its fingerprint."""
    root, name = Path(tokens["root"]), tokens.get("name", "fmnist")
    syn_path = root / "codebook-synonyms.json"
    td = TokenData(train=T.read_token_file(T.token_file_paths(root, name, "train")),
                   val=T.read_token_file(T.token_file_paths(root, name, "val")),
                   codebook=T.load_codebook(root / "codebook.ckpt"), synonyms=load_synonyms(syn_path),
                   num_classes=int(tokens["num_classes"]), source=f"token files {display_path(root)}", root=root)
    sha = token_fingerprint(td)
    if sha != tokens["sha"]:
        raise ValueError(f"the token files in {root} changed since this run was specified (fingerprint {sha}, spec "
                         f"{tokens['sha']}): rebuild the tokens or specify the runs again")
    return td


def _read_tokenadapt(spec: dict) -> nn.Module:
    from tokenbook.models.seit import TokenAdapt, load_tokenadapt

    ta = load_tokenadapt(spec["path"], module=TokenAdapt(**spec["config"])).eval()
    if module_fingerprint(ta) != spec["sha"]:
        raise ValueError(f"{spec['path']} changed since this run was specified: save TokenAdapt again")
    return ta


def train_variant_run(model_name: str, model_kwargs: dict, data: dict, train: dict, batch_size: int, variant: str,
                      seed: int, num_workers: int = 0, tokens: Optional[dict] = None,
                      tokenadapt: Optional[dict] = None, hook: Optional[dict] = None):
    """Trainer of :func:`variant_spec` (in the kernel, a launcher process or a job): the pixel variant loads the
    pixel data, a token variant reads its token files (and f/g), then :func:`_fit_variant`. Returns a
    :class:`tokenbook.runs.TrainedRun`."""
    from tokenbook import data as D
    from tokenbook.runs import TrainedRun
    from tokenbook.train import TrainConfig

    cfg = TrainConfig(**{**train, "seed": int(seed), "batch_size": int(batch_size)})
    if VARIANTS[variant][0] == "pixels":
        res = _fit_variant(variant, model_name, model_kwargs, cfg, num_workers, bundle=D.load_data(D.DataConfig(**data)))
    else:
        td = _read_tokens(tokens)
        ta = _read_tokenadapt(tokenadapt) if tokenadapt else None
        res = _fit_variant(variant, model_name, model_kwargs, cfg, num_workers, data=td, tokenadapt=ta, hook=hook)
    return TrainedRun.from_fit(res)


def rebuild_variant(args: dict, out: Any):
    """The ``FitResult`` of a stored run (``args``: its spec's arguments, ``out``: its TrainedRun): the classifier
    built as the trainer built it, with the stored weights, on the CPU; a token classifier gets the codebook of its
    token files (a buffer outside the state dict)."""
    import timm

    import tokenbook.models  # noqa: F401
    from tokenbook.train import FitResult, TrainConfig

    model = out.load_into(timm.create_model(args["model_name"], **args["model_kwargs"]))
    if args.get("tokens"):  # the codebook is a buffer outside the state dict: the run's own codebook file
        model.set_codebook(T.load_codebook(Path(args["tokens"]["root"]) / "codebook.ckpt"))
    cfg = TrainConfig(**{k: v for k, v in args["train"].items() if k not in ("checkpoint_dir", "resume")})
    return FitResult(model=model, ema=None, history=out.history, final=dict(out.final), timing=dict(out.timing),
                     config=cfg, trainable_params=out.trainable_params)


def token_ref(data: TokenData) -> dict:
    """How a run spec names token files written by :func:`build_default_tokens`: ``{"root", "name", "sha",
    "num_classes", "code_dim"}`` (``sha``: :func:`token_fingerprint`, checked when a run reads them back)."""
    names = {p.name.split("-train-token")[0] for p in Path(data.root).glob("*-train-token.data.bin.gz")}
    name = next(iter(names)) if len(names) == 1 else "fmnist"
    return {"root": str(Path(data.root).resolve()), "name": name, "sha": token_fingerprint(data),
            "num_classes": int(data.num_classes), "code_dim": int(data.codebook.shape[1])}


_TOKENIZER_KEYS = ("downsample", "codebook_size", "code_dim", "hidden", "steps", "batch_size", "lr", "seed", "pad")


def tokenizer_spec(params: Any, data_config: Any):
    """The :class:`tokenbook.runs.RunSpec` of the notebook's tokenizer training under ``params`` (the notebook's
    ``tokenizer_*``, ``codebook_size``, ``code_dim``, ``seed`` and ``accelerator``) on the pixel data of
    ``data_config``."""
    from tokenbook.runs import RunSpec, config_dict

    p = params
    args = {"data": config_dict(data_config), "downsample": int(p["tokenizer_downsample"]),
            "codebook_size": int(p["codebook_size"]), "code_dim": int(p["code_dim"]),
            "hidden": int(p["tokenizer_hidden"]), "steps": int(p["tokenizer_steps"]),
            "batch_size": int(p["tokenizer_batch"]), "lr": float(p["tokenizer_lr"]), "seed": int(p["seed"]),
            "pad": int(p["tokenizer_pad"]), "accelerator": token_device(str(p["accelerator"]))}
    return RunSpec("tokenbook.experiments.seit_runs:train_tokenizer_run", args, label="VQ tokenizer",
                   resumable=False)


def train_tokenizer_run(data: dict, accelerator: str = "cpu", **kw: Any) -> dict:
    """Trainer of :func:`tokenizer_spec`: the pixel data, then :func:`train_default_tokenizer`. Returns
    ``{"config", "state_dict", "history", "seconds"}`` (the tokenizer's keywords and CPU weights, the logged rows,
    the training time)."""
    import time

    from tokenbook import data as D

    bundle = D.load_data(D.DataConfig(**data))
    t0 = time.perf_counter()
    tok, hist = train_default_tokenizer(bundle, device=accelerator, **{k: kw[k] for k in _TOKENIZER_KEYS})
    sd = {k: v.detach().cpu().clone() for k, v in tok.state_dict().items()}
    return {"config": dict(tok.config), "state_dict": sd, "history": list(hist), "seconds": time.perf_counter() - t0}


def tokenadapt_spec(params: Any, data_config: Any, data: Any):
    """The :class:`tokenbook.runs.RunSpec` of TokenAdapt f/g's training under ``params`` (``ta_*``, ``crop``,
    ``seed``, ``tokenizer_pad``, ``accelerator``) on the pixels of ``data_config``, with the token files of ``data``
    (written by :func:`build_default_tokens`) and its ``tokenizer.pt``, both named by path and fingerprint."""
    from tokenbook.runs import RunSpec, config_dict

    if data.tokenizer is None or data.root is None:
        raise ValueError("TokenAdapt's training needs token data written here with its tokenizer "
                         "(build_default_tokens)")
    p = params
    tok_path = Path(data.root) / "tokenizer.pt"
    args = {"data": config_dict(data_config), "tokens": token_ref(data),
            "tokenizer": {"path": str(tok_path.resolve()), "sha": module_fingerprint(data.tokenizer)},
            "crop": int(p["crop"]), "steps": int(p["ta_steps"]), "batch_size": int(p["ta_batch"]),
            "lr": float(p["ta_lr"]), "dim": int(p["ta_dim"]), "heads": int(p["ta_heads"]),
            "dim_head": int(p["ta_dim_head"]), "seed": int(p["seed"]), "per_sample": bool(p["ta_per_sample"]),
            "mix_prob": float(p["ta_mix_prob"]), "pad": int(p["tokenizer_pad"]),
            "accelerator": token_device(str(p["accelerator"]))}
    return RunSpec("tokenbook.experiments.seit_runs:train_tokenadapt_run", args, label="TokenAdapt f/g",
                   resumable=False)


def train_tokenadapt_run(data: dict, tokens: dict, tokenizer: dict, accelerator: str = "cpu", **kw: Any) -> dict:
    """Trainer of :func:`tokenadapt_spec`: the pixel data, the token files and the tokenizer (checked against their
    fingerprints), then :func:`train_default_tokenadapt`. Returns ``{"config", "state_dict", "history",
    "seconds"}``."""
    import time

    from tokenbook import data as D
    from tokenbook.data import tokens as T

    bundle = D.load_data(D.DataConfig(**data))
    td = _read_tokens(tokens)
    tok = T.load_tokenizer(tokenizer["path"])
    if module_fingerprint(tok) != tokenizer["sha"]:
        raise ValueError(f"{tokenizer['path']} changed since this run was specified: write the tokens again")
    td.tokenizer = tok.eval()
    t0 = time.perf_counter()
    ta, hist = train_default_tokenadapt(td, bundle, device=accelerator, **kw)
    return {"config": _tokenadapt_config(ta), "history": hist,
            "state_dict": {k: v.detach().cpu().clone() for k, v in ta.state_dict().items()},
            "seconds": time.perf_counter() - t0}
