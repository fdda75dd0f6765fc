"""Released checkpoints evaluated against the papers' numbers (issue 20, item 3): a generic evaluator.

:func:`released_table` takes a list of released checkpoints (:class:`Released`, or dicts of its fields; each paper's
list is ``RELEASED`` in ``tokenbook.experiments.<stem>``) and returns one row per checkpoint: the paper's ImageNet-1k
top-1 with its source (from ``tokenbook/references/<stem>.yaml``), ours on the user's ImageNet val folder (or, for
token-trained models, the token release's val split), the difference, the weight file and its sha256, and the
preprocessing used. A missing weight file, a missing data folder or a checkpoint that does not fit the architecture
is said in that row's ``status``; the other rows still build.

Conventions:

- **Models by name.** An entry names a timm model (with its pretrained tag, e.g. ``t2t_vit_14.in1k_384``); the
  caller imports ``tokenbook.models`` first so the names are registered (this core module imports no paper code).
- **Loading.** The local file is read with ``torch.load(weights_only=True)`` (``argparse.Namespace`` allow-listed,
  as official DeiT-style checkpoints pickle their ``args``; ``.safetensors`` too) and handed *whole* to timm as
  ``pretrained_cfg_overlay=dict(state_dict=...)``, so each family's ``checkpoint_filter_fn`` unwraps its own
  container (T2T-ViT ``state_dict_ema``, ToE / SeiT ``model``, ViTTM EMA prefixes) and checks the keys; timm then
  loads strictly. Nothing is downloaded: the entry's ``url`` is where to get the file.
- **Preprocessing** is timm's evaluation convention for the model: ``timm.data.resolve_data_config(model=model)``
  (input size, crop pct, crop mode, interpolation, mean/std of the model's ``pretrained_cfg``) and
  ``timm.data.create_transform(**cfg)`` (resize to ``size / crop_pct``, centre crop). Rows whose weights are missing
  still show the preprocessing they would use (from the registered ``pretrained_cfg``).
- **Pixels.** The val folder is ImageNet-style, ``val/<synset>/*.JPEG`` (the path may be the ``val`` folder or its
  parent). Labels are the synset's index in the sorted list of the 1000 ImageNet-1k synsets (timm's
  ``ImageNetInfo``), the order every 1000-class head expects. A folder with fewer classes is evaluated on the full
  1000-way head with those true indices (a wrong class outside the folder's subset counts as wrong); folders that
  are not ImageNet-1k synsets are refused (one message in every pixel row).
- **Tokens** (SeiT's token-trained ViTs, ``data='tokens'``): ``token_val_dir`` is the unpacked ``IMNET1K-tokens.tar``
  (``imagenet1k-val-token.data.bin.gz``, its index and labels, ``codebook.ckpt``), read with
  :func:`tokenbook.data.tokens.read_release_split`; the model gets the codebook (``set_codebook``) and centre-crops
  the 32x32 id grid itself (the official val transform).
- **Scoring** is :func:`tokenbook.train.evaluate` (top-1 of the model's first head; a two-head model such as ViTTM
  also lists each head's top-1 in ``heads``). ``max_images`` evaluates a seeded random subset for quick checks.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch

__all__ = ["Released", "released_table", "imagenet_synsets", "imagenet_val_samples", "ImageNetVal",
           "DataUnavailable", "sha256_of", "read_checkpoint", "preprocessing_of", "params_kwargs", "TABLE_COLUMNS"]

PathLike = Union[str, Path]
_SYNSET = re.compile(r"^n\d{8}$")
_IMAGE_EXT = (".jpeg", ".jpg", ".png")
#: the columns of :func:`released_table`, in order
TABLE_COLUMNS = ("model", "paper_name", "paper_top1", "paper_source", "ours_top1", "diff_pt", "ours_top5", "heads",
                 "n_images", "weights", "sha256", "input_size", "crop_pct", "crop_mode", "interpolation", "mean",
                 "std", "data", "status", "note")


@dataclass(frozen=True)
class Released:
    """One released checkpoint.

    ``model``: timm name with tag; ``file``: the official file name (looked up in ``weights_dir``; None when the
    release gives none); ``url``: where to get it (recorded, never fetched); ``ref``: ``"<stem>:<reference id>"`` of
    the paper's top-1 in ``references/<stem>.yaml`` (None: the sheet has none, ``note`` says why); ``paper_name``:
    the paper's label; ``data``: ``'pixels'`` or ``'tokens'``; ``kwargs``: extra ``timm.create_model`` arguments."""

    model: str
    file: Optional[str] = None
    url: str = ""
    ref: Optional[str] = None
    paper_name: str = ""
    data: str = "pixels"
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    note: str = ""

    def __post_init__(self):
        if self.data not in ("pixels", "tokens"):
            raise ValueError(f"{self.model}: data must be 'pixels' or 'tokens', got {self.data!r}")
        if self.ref is not None and ":" not in self.ref:
            raise ValueError(f"{self.model}: ref must be '<stem>:<reference id>', got {self.ref!r}")

    @classmethod
    def of(cls, entry: Union["Released", Mapping[str, Any]]) -> "Released":
        if isinstance(entry, cls):
            return entry
        unknown = set(entry) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"released entry {entry.get('model', '?')}: unknown fields {sorted(unknown)}")
        return cls(**entry)


class DataUnavailable(Exception):
    """The evaluation data is missing or unusable; the message is what the table's rows say."""


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------
def imagenet_synsets() -> list[str]:
    """The 1000 ImageNet-1k synsets in class-index order (sorted wnids; timm's ``ImageNetInfo``)."""
    from timm.data import ImageNetInfo

    names = list(ImageNetInfo().label_names())
    if len(names) != 1000 or names != sorted(names):  # the index order every 1000-class head expects
        raise RuntimeError("timm's ImageNet-1k synset list is not the 1000 sorted wnids")
    return names


def _synset_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def imagenet_val_samples(val_dir: Optional[PathLike]) -> tuple[list[tuple[str, int]], Path]:
    """``[(image path, ImageNet-1k class index)]`` of an ImageNet-style val folder, and the folder used.

    ``val_dir`` may be the folder of synset sub-folders or its parent holding ``val/``. Raises
    :class:`DataUnavailable` with the row message when it is not given, absent, empty or not ImageNet-1k synsets."""
    if val_dir is None or str(val_dir) == "":
        raise DataUnavailable("ImageNet val folder not given")
    root = Path(val_dir).expanduser()
    if not root.is_dir():
        raise DataUnavailable(f"ImageNet val folder not found: {root}")
    dirs = _synset_dirs(root)
    if not any(_SYNSET.match(d.name) for d in dirs) and (root / "val").is_dir():
        root = root / "val"
        dirs = _synset_dirs(root)
    if not dirs:
        raise DataUnavailable(f"ImageNet val folder {root} has no class folders (val/<synset>/*.JPEG); a flat val "
                              "folder must first be sorted into synset folders")
    index = {s: i for i, s in enumerate(imagenet_synsets())}
    bad = [d.name for d in dirs if d.name not in index]
    if bad:
        raise DataUnavailable(f"ImageNet val folder {root}: class folders {bad[:5]}"
                              f"{f' (+{len(bad) - 5})' if len(bad) > 5 else ''} are not ImageNet-1k synsets "
                              "(the 1000-class heads need each image's true synset index)")
    samples = [(str(f), index[d.name]) for d in dirs for f in sorted(d.iterdir())
               if f.is_file() and f.suffix.lower() in _IMAGE_EXT]
    if not samples:
        raise DataUnavailable(f"ImageNet val folder {root} holds no images (*.JPEG, *.jpg, *.png)")
    return samples, root


class ImageNetVal(torch.utils.data.Dataset):
    """``(transform(RGB image), class index)`` over :func:`imagenet_val_samples`."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform):
        self.samples, self.transform = list(samples), transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.samples[i]
        with Image.open(path) as img:
            x = self.transform(img.convert("RGB"))
        return x, label


def _subset(n: int, max_images: Optional[int], seed: int) -> np.ndarray:
    if not max_images or max_images >= n:
        return np.arange(n)
    return np.sort(np.random.RandomState(seed).permutation(n)[:max_images])


def _token_val(token_val_dir: Optional[PathLike]):
    """(TokenSet of the release's val split, codebook, folder) or :class:`DataUnavailable`."""
    from tokenbook.data import tokens as T

    what = ("token val set (the unpacked IMNET1K-tokens.tar: imagenet1k-val-token.data.bin.gz, its index and "
            "labels, codebook.ckpt)")
    if token_val_dir is None or str(token_val_dir) == "":
        raise DataUnavailable(f"{what} not given (token_val_dir)")
    root = Path(token_val_dir).expanduser()
    paths = T.token_file_paths(root, "imagenet1k", "val")
    missing = [str(p) for p in (paths.data, paths.index, paths.labels, root / "codebook.ckpt") if not p.is_file()]
    if missing:
        raise DataUnavailable(f"{what} not found: {', '.join(missing)}")
    try:
        ts = T.read_release_split(root, "val")
        cb = T.load_codebook(root / "codebook.ckpt")
    except (ValueError, OSError) as e:  # TokenFormatError is a ValueError
        raise DataUnavailable(f"token val set {root} cannot be read: {e}") from e
    return ts, cb, root


# ----------------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------------
def sha256_of(path: PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def read_checkpoint(path: PathLike) -> Any:
    """The file's object as saved (a state dict or an official container), read without running pickled code."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} cannot be read as a checkpoint with torch.load(weights_only=True): "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def _weights_path(e: Released, weights_dir: Optional[PathLike], paths: Mapping[str, PathLike]) -> tuple[Optional[Path], str]:
    """(path of an existing file, '') or (None, the row message)."""
    if e.model in paths:
        p = Path(paths[e.model]).expanduser()
    elif e.file is None:
        return None, (f"weights not found: the release names no file for {e.model}; pass "
                      f"paths={{'{e.model}': '<checkpoint>'}}")
    elif weights_dir is None:
        return None, f"weights not found: weights_dir not given (official file {e.file})"
    else:
        p = Path(weights_dir).expanduser() / e.file
    return (p, "") if p.is_file() else (None, f"weights not found: {p}")


def preprocessing_of(model_or_name: Any) -> dict:
    """timm's evaluation data config of a model instance or a registered name (its ``pretrained_cfg``)."""
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    if isinstance(model_or_name, str):
        cfg = get_pretrained_cfg(model_or_name)
        if cfg is None:
            raise ValueError(f"{model_or_name} is not a registered timm model (import tokenbook.models first)")
        return resolve_data_config(pretrained_cfg=cfg.to_dict())
    return resolve_data_config(model=model_or_name)


def _create(e: Released, checkpoint: Any):
    import timm

    model = timm.create_model(e.model, pretrained=True, pretrained_cfg_overlay=dict(state_dict=checkpoint),
                              **dict(e.kwargs))
    if isinstance(getattr(model, "pretrained_cfg", None), dict):
        model.pretrained_cfg.pop("state_dict", None)  # keep no second reference to the weights
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------
def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _paper(e: Released) -> tuple[float, str]:
    if e.ref is None:
        return math.nan, "not in the reference sheet (see note)"
    from tokenbook import references

    stem, rid = e.ref.split(":", 1)
    try:
        r = next((r for r in references.load(stem) if r.id == rid), None)
    except references.ReferenceError as err:
        return math.nan, str(err)
    if r is None:
        return math.nan, f"reference {rid!r} not found in {stem}.yaml"
    return (math.nan if r.value is None else r.value), f"{r.source} [{r.kind}] ({stem}.yaml {r.id})"


def _row(e: Released, weights_dir, paths, pixels, tokens, max_images, batch_size, num_workers, device, seed,
         sha_cache: dict) -> dict:
    from tokenbook.train import CheckpointMismatchError, evaluate

    paper_top1, paper_source = _paper(e)
    row = {c: None for c in TABLE_COLUMNS}
    row.update(model=e.model, paper_name=e.paper_name, paper_top1=paper_top1, paper_source=paper_source,
               ours_top1=math.nan, diff_pt=math.nan, ours_top5=math.nan, heads="", n_images=0, note=e.note)
    problems = []
    path, msg = _weights_path(e, weights_dir, paths)
    row["weights"] = str(path) if path else (e.url or "")
    if msg:
        problems.append(msg)  # the weights column then shows where to get the file
    else:
        if str(path) not in sha_cache:
            sha_cache[str(path)] = sha256_of(path)
        row["sha256"] = sha_cache[str(path)]
    data = tokens if e.data == "tokens" else pixels
    if isinstance(data, DataUnavailable):
        problems.append(str(data))
    else:
        row["data"] = str(data[-1])
    model = None
    if path is not None:
        try:
            checkpoint = read_checkpoint(path)
        except ValueError as err:
            checkpoint = None
            problems.append(f"weights not readable: {_first_line(err)}")
        try:
            model = None if checkpoint is None else _create(e, checkpoint)
        except (ValueError, RuntimeError, KeyError, CheckpointMismatchError) as err:  # the loaders' mismatch errors
            msg = re.sub(r"^checkpoint does not match\s*", "", _first_line(err))
            problems.append(f"checkpoint does not match {e.model}: " + (msg if len(msg) <= 400 else msg[:400] + " ..."))
        except Exception as err:  # e.g. a bad kwargs entry: this row only
            problems.append(f"cannot build {e.model}: {type(err).__name__}: {_first_line(err)}")
    try:
        cfg = preprocessing_of(model if model is not None else e.model)
        row.update(input_size=tuple(cfg["input_size"]), crop_pct=cfg.get("crop_pct"), crop_mode=cfg.get("crop_mode"),
                   interpolation=cfg.get("interpolation"), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))
    except Exception as err:  # an unregistered name: say so in the row
        problems.append(f"no preprocessing: {err}")
        cfg = None
    if e.data == "tokens":  # ids are not resized or normalised: only the input size applies
        row.update(crop_mode="token ids: centre crop to the model's grid (official val)", crop_pct=None,
                   interpolation=None, mean=None, std=None)
    if problems or model is None or cfg is None:
        row["status"] = "; ".join(problems) or "not evaluated"
        return row
    try:
        if e.data == "tokens":
            from tokenbook.data.tokens import TokenDataset

            ts, codebook, _ = data
            if not hasattr(model, "set_codebook"):
                raise ValueError(f"{e.model} has no set_codebook: it is not a token model")
            model.set_codebook(codebook)
            ds = TokenDataset(ts)
        else:
            from timm.data import create_transform

            ds = ImageNetVal(data[0], create_transform(**cfg, is_training=False))
        idx = _subset(len(ds), max_images, seed)
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, idx.tolist()), batch_size=batch_size,
                                             shuffle=False, num_workers=num_workers,
                                             pin_memory=torch.device(device).type == "cuda")
        res = evaluate(model.to(device), loader, device=torch.device(device))
    except Exception as err:  # keep the other rows
        row["status"] = f"evaluation failed: {type(err).__name__}: {_first_line(err)}"
        return row
    row.update(ours_top1=res["top1"], ours_top5=res["top5"], n_images=res["n"],
               diff_pt=(res["top1"] - paper_top1) if not math.isnan(paper_top1) else math.nan,
               heads=", ".join(f"{k[5:]} {v:.2f}" for k, v in res.items() if k.startswith("top1_")),
               status="ok" + (f" (subset of {res['n']} of {len(ds)} images)" if res["n"] < len(ds) else ""))
    return row


def released_table(entries: Iterable[Union[Released, Mapping[str, Any]]], weights_dir: Optional[PathLike] = None,
                   val_dir: Optional[PathLike] = None, token_val_dir: Optional[PathLike] = None,
                   paths: Optional[Mapping[str, PathLike]] = None, max_images: Optional[int] = None,
                   batch_size: int = 64, num_workers: int = 4, device: Optional[str] = None, seed: int = 0):
    """One row per released checkpoint (columns :data:`TABLE_COLUMNS`) as a pandas DataFrame.

    ``weights_dir``: folder with the official file names; ``paths``: ``{model name: file}`` for entries without an
    official name or stored elsewhere (wins over ``weights_dir``). ``val_dir``: the ImageNet val folder (or its
    parent); ``token_val_dir``: the unpacked token release (token models). ``max_images``: a seeded random subset of
    that many images (None: all). ``device``: default ``cuda`` when available. ``status`` is ``ok`` or says what is
    missing (weights, data) or wrong (a checkpoint that does not fit the architecture); no row raises."""
    import pandas as pd

    entries = [Released.of(e) for e in entries]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pixels = tokens = None
    if any(e.data == "pixels" for e in entries):
        try:
            pixels = imagenet_val_samples(val_dir)
        except DataUnavailable as err:
            pixels = err
    if any(e.data == "tokens" for e in entries):
        try:
            tokens = _token_val(token_val_dir)
        except DataUnavailable as err:
            tokens = err
    sha_cache: dict = {}
    rows = [_row(e, weights_dir, dict(paths or {}), pixels, tokens, max_images, batch_size, num_workers, device,
                 seed, sha_cache) for e in entries]
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def params_kwargs(params: Optional[Mapping[str, Any]] = None, **overrides: Any) -> dict:
    """:func:`released_table` arguments from a notebook's parameters: ``released_weights`` (weights_dir),
    ``released_paths`` ({model: file}), ``released_max_images``, ``imagenet_val`` or ``dataset: "folder:<root>"``
    (val_dir: ``<root>/val``), ``token_source: "release:<root>"`` (token_val_dir), ``num_workers``; ``overrides``
    win."""
    p = dict(params or {})
    out: dict = {}
    if p.get("released_weights"):
        out["weights_dir"] = p["released_weights"]
    if p.get("released_paths"):
        out["paths"] = dict(p["released_paths"])
    if p.get("released_max_images"):
        out["max_images"] = int(p["released_max_images"])
    ds = str(p.get("dataset") or "")
    if p.get("imagenet_val"):
        out["val_dir"] = p["imagenet_val"]
    elif ds.startswith("folder:"):
        out["val_dir"] = ds[len("folder:"):]
    ts = str(p.get("token_source") or "")
    if ts.startswith("release:"):
        out["token_val_dir"] = ts[len("release:"):]
    if p.get("num_workers") is not None:
        out["num_workers"] = int(p["num_workers"])
    out.update(overrides)
    return out


# ----------------------------------------------------------------------------------------------------------
# Writing the original ViT release format (for synthetic checkpoints in tests and run_all.sh --proof)
# ----------------------------------------------------------------------------------------------------------
def vit_npz_arrays(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """A timm ``VisionTransformer``'s weights under the original JAX ViT / AugReg ``.npz`` names and layouts
    (``embedding/kernel`` HWIO, ``Transformer/encoderblock_<i>/MultiHeadDotProductAttention_1/query/kernel`` as
    ``(dim, heads, head_dim)``, ``MlpBlock_3/Dense_<r>``, ``head/kernel`` as ``(dim, classes)``, ...): the inverse
    of timm's ``.npz`` reader (``timm.models.vision_transformer._load_weights``), for class-token ViTs with a
    linear head, so that a synthetic file exercises the same loading path as a released one."""
    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    heads = model.blocks[0].attn.num_heads
    dim = sd["cls_token"].shape[-1]
    out = {"embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
           "embedding/bias": sd["patch_embed.proj.bias"], "cls": sd["cls_token"],
           "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
           "Transformer/encoder_norm/scale": sd["norm.weight"], "Transformer/encoder_norm/bias": sd["norm.bias"],
           "head/kernel": sd["head.weight"].T, "head/bias": sd["head.bias"]}
    for i in range(len(model.blocks)):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        mha = p + "MultiHeadDotProductAttention_1/"
        for n, (w, bias) in zip(("query", "key", "value"), zip(np.split(sd[b + "attn.qkv.weight"], 3),
                                                                 np.split(sd[b + "attn.qkv.bias"], 3))):
            out[f"{mha}{n}/kernel"] = w.T.reshape(dim, heads, -1)
            out[f"{mha}{n}/bias"] = bias.reshape(heads, -1)
        out[f"{mha}out/kernel"] = sd[b + "attn.proj.weight"].reshape(dim, heads, -1).transpose(1, 2, 0)
        out[f"{mha}out/bias"] = sd[b + "attn.proj.bias"]
        for ln, name in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            out[f"{p}{ln}/scale"], out[f"{p}{ln}/bias"] = sd[b + name + ".weight"], sd[b + name + ".bias"]
        for r in range(2):
            out[f"{p}MlpBlock_3/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            out[f"{p}MlpBlock_3/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def write_vit_npz(model: torch.nn.Module, path: PathLike) -> Path:
    """:func:`vit_npz_arrays` written to ``path`` (``np.savez``, atomically: a temporary file renamed)."""
    from .io import atomic_save

    arrays = vit_npz_arrays(model)

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to the temporary name
            np.savez(f, **arrays)

    return atomic_save(path, save)


__all__ += ["vit_npz_arrays", "write_vit_npz"]
