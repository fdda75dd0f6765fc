"""Datasets for the workbook, built on Hugging Face ``datasets`` (Arrow, memory-mapped cache, torch format).

Sources (``DataConfig.dataset``):

- ``"fashion_mnist"`` (the embedded default: 70k real 28x28 grey images, 10 classes). Resolved in this order:
  1. a directory holding the four IDX ``.gz`` files, given as ``DataConfig.data_dir`` or ``$TOKENBOOK_FASHION_MNIST``;
  2. the files of Debian's package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``);
  3. the Hugging Face hub (``zalando-datasets/fashion_mnist``) when online.
  Otherwise ``DatasetNotFoundError`` lists the three ways to get it. There is no fallback to other data.
- ``"folder:<path>"``: an ImageNet-style folder with ``train/`` and ``val/`` (class sub-folders), read with the
  ``imagefolder`` builder of ``datasets``.
- ``"hf:<id or local path>"``: a hub dataset (``hf:uoft-cs/cifar100``, ``hf:ILSVRC/imagenet-1k``) or a local copy in
  the same format (parquet files, as the hub stores them). Image and label columns are detected.

Images go through one of two paths:

- fixed-size arrays with no per-sample augmentation (``preset="none"``): the loader yields uint8 tensors and
  :class:`Preprocess` (resize, grey to 3 channels, normalize) runs on the whole batch on the training device;
- otherwise a timm transform (``timm.data.create_transform``) per sample, with the paper recipes as presets
  (:data:`PRESETS`): RandAugment, random resized crop, random erasing, colour jitter.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# the constants live in a leaf module (the models import it without this package); re-exported here
from tokenbook.constants import (FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD, IMAGENET_MEAN,
                                 IMAGENET_STD)

__all__ = [
    "DataConfig", "DataBundle", "ImageDataset", "Preprocess", "PRESETS", "load_data", "make_loaders",
    "find_fashion_mnist", "read_idx", "DatasetNotFoundError", "CorruptDataError", "FASHION_MNIST_CLASSES",
    "write_idx_fixture", "write_folder_fixture", "write_hub_fixture",
]

FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz", "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz", "test_labels": "t10k-labels-idx1-ubyte.gz",
}
FASHION_MNIST_ENV = "TOKENBOOK_FASHION_MNIST"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_HUB = "zalando-datasets/fashion_mnist"


class DatasetNotFoundError(FileNotFoundError):
    """The requested dataset is not available anywhere; the message says how to get it."""


class CorruptDataError(ValueError):
    """A data file exists but cannot be read as what it claims to be."""


# ----------------------------------------------------------------------------------------------------------
# Augmentation presets (per-sample, timm transforms). Batch-level Mixup/CutMix live in the training config.
# ----------------------------------------------------------------------------------------------------------
PRESETS: dict[str, dict[str, Any]] = {
    # no augmentation: resize + normalize (batch path when images are fixed-size arrays)
    "none": {},
    # flips and mild crops, for short CPU runs
    "light": dict(scale=(0.6, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, color_jitter=None, auto_augment=None, re_prob=0.0),
    # DeiT / T2T-ViT ImageNet recipe: RandAugment m9 (mstd 0.5, increasing), RRC 0.08-1, jitter 0.4, erasing 0.25
    "deit": dict(scale=(0.08, 1.0), hflip=0.5, color_jitter=0.4, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25,
                 re_mode="pixel", re_count=1, interpolation="bicubic"),
    # ViTTM IN-1k fine-tune, ViTTM-S: RandAugment(2 ops, m15), erasing 0.25
    "vittm_s_ft": dict(scale=(0.08, 1.0), hflip=0.5, color_jitter=None, auto_augment="rand-n2-m15", re_prob=0.25,
                       interpolation="bicubic"),
    # ViTTM IN-1k fine-tune, ViTTM-B: RandAugment(3 ops, m20), erasing 0.25
    "vittm_b_ft": dict(scale=(0.08, 1.0), hflip=0.5, color_jitter=None, auto_augment="rand-n3-m20", re_prob=0.25,
                       interpolation="bicubic"),
    # ViTTM IN-21k-P pre-training: RandAugment(2, 15), no erasing
    "vittm_pt": dict(scale=(0.08, 1.0), hflip=0.5, color_jitter=None, auto_augment="rand-n2-m15", re_prob=0.0,
                     interpolation="bicubic"),
    # Learnable Memory fine-tuning (ViT transfer style): RRC + flip only
    "transfer": dict(scale=(0.08, 1.0), hflip=0.5, color_jitter=None, auto_augment=None, re_prob=0.0,
                     interpolation="bicubic"),
}


@dataclass
class DataConfig:
    """What to load and how to present it. Every notebook builds one from its parameters."""

    dataset: str = "fashion_mnist"  # "fashion_mnist" | "folder:<path>" | "hf:<id or path>"
    data_dir: Optional[str] = None  # Fashion-MNIST IDX directory (else $TOKENBOOK_FASHION_MNIST, Debian, hub)
    img_size: int = 28  # side of the square model input
    channels: int = 3  # 1 keeps grey images grey, 3 replicates them (timm models expect 3)
    train_subset: Optional[int] = None  # number of training images (deterministic, class-balanced), None = all
    val_subset: Optional[int] = None  # number of validation images, None = all
    classes: Optional[Sequence[int]] = None  # keep only these classes (labels remapped to 0..k-1 in this order)
    preset: str = "none"  # per-sample augmentation preset, see PRESETS
    subset_seed: int = 0  # seed of the subset selection (independent of the training seed)
    mean: Optional[Sequence[float]] = None  # None = dataset default (Fashion-MNIST stats, else ImageNet)
    std: Optional[Sequence[float]] = None
    cache_dir: Optional[str] = None  # Arrow cache (default $TOKENBOOK_CACHE or ~/.cache/tokenbook)

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"unknown augmentation preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.img_size < 4:
            raise ValueError(f"img_size must be >= 4, got {self.img_size}")
        for name in ("train_subset", "val_subset"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v <= 0):
                raise ValueError(f"{name} must be a positive int or None, got {v!r}")
        kind = self.dataset.split(":", 1)[0]
        if kind not in ("fashion_mnist", "folder", "hf"):
            raise ValueError(f"unknown dataset {self.dataset!r}: use 'fashion_mnist', 'folder:<path>' or 'hf:<id>'")


@dataclass
class DataBundle:
    """Train and validation datasets plus what a model and a report need to know about them."""

    train: "ImageDataset"
    val: "ImageDataset"
    num_classes: int
    class_names: list[str]
    mean: tuple
    std: tuple
    config: DataConfig
    source: str  # where the data came from (a path or a hub id)
    preprocess: "Preprocess" = field(repr=False, default=None)

    def describe(self) -> dict:
        return {"dataset": self.config.dataset, "source": self.source, "train_size": len(self.train),
                "val_size": len(self.val), "num_classes": self.num_classes, "img_size": self.config.img_size,
                "channels": self.config.channels, "preset": self.config.preset}


# ----------------------------------------------------------------------------------------------------------
# IDX files
# ----------------------------------------------------------------------------------------------------------
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"),
               0x0E: np.dtype(">f8")}


def read_idx(path: str | Path) -> np.ndarray:
    """Read a (gzip'd) IDX file into a numpy array; ``CorruptDataError`` names the file and the problem."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise CorruptDataError(f"{path}: cannot decompress/read ({e}); re-download or reinstall the file") from e
    if len(raw) < 4:
        raise CorruptDataError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    zero, dtype_code, ndim = raw[0:2], raw[2], raw[3]
    if zero != b"\x00\x00" or dtype_code not in _IDX_DTYPES or ndim == 0:
        raise CorruptDataError(f"{path}: bad IDX magic {raw[:4].hex()} (expected 0000 08/09/0b-0e <ndim>)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise CorruptDataError(f"{path}: truncated header ({len(raw)} bytes, need {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[dtype_code])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise CorruptDataError(
            f"{path}: header says shape {dims} ({expected} data bytes) but the file has {len(raw) - header}; "
            "the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="), copy=False)


def _missing_files(d: Path) -> list[str]:
    return [n for n in FASHION_MNIST_FILES.values() if not (d / n).is_file()]


def _fmnist_help(extra: str = "") -> str:
    return (
        "Fashion-MNIST (the workbook's default data) was not found. Get it one of three ways:\n"
        f"  1. put the four IDX files ({', '.join(FASHION_MNIST_FILES.values())}) in a directory and pass it as "
        f"data_dir or set ${FASHION_MNIST_ENV}=<dir>;\n"
        "  2. install Debian's package: apt-get install dataset-fashion-mnist "
        f"(files land in {DEBIAN_FASHION_MNIST});\n"
        f"  3. go online so the Hugging Face hub dataset {FASHION_MNIST_HUB!r} can be downloaded "
        "(unset HF_HUB_OFFLINE).\n" + extra)


def find_fashion_mnist(data_dir: Optional[str] = None, allow_hub: bool = True) -> str:
    """Resolve where Fashion-MNIST comes from: an IDX directory path, or ``"hub:<id>"``.

    An explicitly given directory (argument or environment variable) must be complete: if it is missing files the
    error names them instead of silently using another source.
    """
    explicit = data_dir or os.environ.get(FASHION_MNIST_ENV)
    if explicit:
        d = Path(explicit).expanduser()
        if not d.is_dir():
            raise DatasetNotFoundError(f"Fashion-MNIST directory {d} does not exist.\n" + _fmnist_help())
        missing = _missing_files(d)
        if missing:
            raise DatasetNotFoundError(f"Fashion-MNIST directory {d} is incomplete: missing {missing}.\n" + _fmnist_help())
        return str(d)
    if DEBIAN_FASHION_MNIST.is_dir() and not _missing_files(DEBIAN_FASHION_MNIST):
        return str(DEBIAN_FASHION_MNIST)
    if allow_hub and os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True"):
        return f"hub:{FASHION_MNIST_HUB}"
    raise DatasetNotFoundError(_fmnist_help("(the hub is off: HF_HUB_OFFLINE is set)"))


def _cache_root(cfg_dir: Optional[str]) -> Path:
    root = Path(cfg_dir or os.environ.get("TOKENBOOK_CACHE", Path.home() / ".cache" / "tokenbook"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _arrow_dataset(images: np.ndarray, labels: np.ndarray, class_names: list[str]):
    """Wrap uint8 images (N, H, W[, C]) and labels in a ``datasets.Dataset`` without per-row conversion."""
    import datasets
    import pyarrow as pa

    n = len(images)
    flat = images.reshape(n, -1)
    arr = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), type=pa.uint8()), flat.shape[1])
    table = pa.table({"image": arr, "label": pa.array(labels.astype(np.int64))})
    features = datasets.Features({"image": datasets.Sequence(datasets.Value("uint8"), length=flat.shape[1]),
                                  "label": datasets.ClassLabel(names=class_names)})
    info = datasets.DatasetInfo(features=features, description=f"image_shape={list(images.shape[1:])}")
    ds = datasets.Dataset(table, info=info)
    return ds


def _fmnist_from_idx(d: Path, cache_dir: Optional[str]):
    """Load the IDX files into Arrow, cached on disk keyed by the files' sizes and mtimes."""
    import datasets

    stamp = hashlib.sha1(repr([(n, (d / n).stat().st_size, int((d / n).stat().st_mtime))
                               for n in sorted(FASHION_MNIST_FILES.values())]).encode()).hexdigest()[:12]
    cache = _cache_root(cache_dir) / f"fashion_mnist-{stamp}"
    if (cache / "dataset_dict.json").is_file():
        try:
            return datasets.load_from_disk(str(cache))
        except Exception:  # a broken cache is rebuilt, never trusted
            pass
    splits = {}
    for split, prefix in (("train", "train"), ("test", "test")):
        x = read_idx(d / FASHION_MNIST_FILES[f"{prefix}_images"])
        y = read_idx(d / FASHION_MNIST_FILES[f"{prefix}_labels"])
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise CorruptDataError(f"{d}: {split} images {x.shape} and labels {y.shape} do not match")
        if y.size and (y.min() < 0 or y.max() > 9):
            raise CorruptDataError(f"{d}: {split} labels outside 0..9")
        splits[split] = _arrow_dataset(x, y, FASHION_MNIST_CLASSES)
    dd = datasets.DatasetDict(splits)
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    try:
        dd.save_to_disk(str(tmp))
        if not cache.exists():
            os.replace(tmp, cache)
    except OSError:
        pass  # caching is an optimisation
    finally:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(cache)) if cache.exists() else dd


# ----------------------------------------------------------------------------------------------------------
# Torch dataset over an HF dataset
# ----------------------------------------------------------------------------------------------------------
def _detect_columns(ds) -> tuple[str, str]:
    cols = list(ds.column_names)
    image = next((c for c in ("image", "img", "pixel_values", "jpg", "png") if c in cols), None)
    label = next((c for c in ("label", "labels", "fine_label", "cls", "class") if c in cols), None)
    if image is None or label is None:
        raise ValueError(f"cannot find image/label columns among {cols}")
    return image, label


class ImageDataset(torch.utils.data.Dataset):
    """Images + integer labels over a ``datasets.Dataset`` (optionally a subset of its rows).

    Fixed-size array images are read once into a numpy view of the Arrow buffer; other images (PIL) are read per
    item. With ``transform=None`` items are ``(uint8 tensor CxHxW, label)`` for :class:`Preprocess`; with a
    transform (a timm/torchvision transform taking a PIL image) they are whatever it returns.
    """

    def __init__(self, hf_ds, indices: Optional[np.ndarray] = None, transform: Optional[Callable] = None,
                 label_map: Optional[dict[int, int]] = None, channels: int = 3, image_shape: Optional[tuple] = None):
        self.hf = hf_ds
        self.image_col, self.label_col = _detect_columns(hf_ds)
        labels = np.asarray(hf_ds.data.column(self.label_col).to_numpy(zero_copy_only=False), dtype=np.int64)
        self.indices = np.arange(len(hf_ds)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.label_map = label_map
        lab = labels[self.indices]
        self.labels = np.array([label_map[int(v)] for v in lab], dtype=np.int64) if label_map else lab
        self.transform = transform
        self.channels = channels
        self.image_shape = image_shape
        self._arrays = None
        if image_shape is not None:
            col = hf_ds.data.column(self.image_col).combine_chunks()
            self._arrays = col.flatten().to_numpy().reshape(len(hf_ds), *image_shape)

    def __len__(self) -> int:
        return len(self.indices)

    def image(self, i: int):
        """The i-th image as a PIL image (RGB if ``channels == 3``), for transforms and figures."""
        from PIL import Image

        j = int(self.indices[i])
        if self._arrays is not None:
            img = Image.fromarray(self._arrays[j])
        else:
            img = self.hf[j][self.image_col]
            if not isinstance(img, Image.Image):
                img = Image.fromarray(np.asarray(img, dtype=np.uint8))
        return img.convert("RGB" if self.channels == 3 else "L")

    def raw(self, i: int) -> torch.Tensor:
        """The i-th image as a uint8 tensor (C, H, W), C = 1 for grey sources."""
        j = int(self.indices[i])
        a = self._arrays[j] if self._arrays is not None else np.asarray(self.image(i))
        t = torch.from_numpy(np.array(a, dtype=np.uint8, copy=True))
        return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)

    def __getitem__(self, i: int):
        y = int(self.labels[i])
        if self.transform is None:
            return self.raw(i), y
        return self.transform(self.image(i)), y

    def images_tensor(self, n: Optional[int] = None) -> torch.Tensor:
        """The first ``n`` images as one uint8 tensor (N, C, H, W) (fixed-size images only)."""
        n = len(self) if n is None else min(n, len(self))
        return torch.stack([self.raw(i) for i in range(n)])


class Preprocess(nn.Module):
    """Batch preprocessing on the training device: uint8 (B, C, H, W) -> float, resize, grey->3, normalize.

    Float batches (already transformed per sample) pass through unchanged.
    """

    def __init__(self, img_size: int, channels: int, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.img_size, self.channels = img_size, channels
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point():
            return x
        x = x.float().div_(255.0)
        if x.shape[1] == 1 and self.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False,
                              antialias=True)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Back to [0, 1] for display."""
        return (x * self.std.to(x.device) + self.mean.to(x.device)).clamp(0, 1)


# ----------------------------------------------------------------------------------------------------------
# Subsets
# ----------------------------------------------------------------------------------------------------------
def _select(labels: np.ndarray, classes: Optional[Sequence[int]], count: Optional[int], seed: int) -> np.ndarray:
    """Deterministic, class-balanced selection of ``count`` rows among ``classes``."""
    idx = np.arange(len(labels))
    if classes is not None:
        idx = idx[np.isin(labels, np.asarray(classes))]
    if count is None or count >= len(idx):
        return idx
    rng = np.random.RandomState(seed)
    per_class = [rng.permutation(idx[labels[idx] == c]) for c in np.unique(labels[idx])]
    # round-robin over classes keeps every prefix balanced
    order = []
    for k in range(max(len(p) for p in per_class)):
        order.extend(p[k] for p in per_class if k < len(p))
    return np.sort(np.asarray(order[:count], dtype=np.int64))


# ----------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------
def _load_fashion_mnist(cfg: DataConfig):
    import datasets

    where = find_fashion_mnist(cfg.data_dir)
    if where.startswith("hub:"):
        hub_id = where[4:]
        try:
            dd = datasets.load_dataset(hub_id)
        except Exception as e:  # offline, hub unreachable, ...
            raise DatasetNotFoundError(_fmnist_help(f"(trying the hub failed: {type(e).__name__}: {e})")) from e
        return _fmnist_hub_to_arrays(dd), (28, 28), hub_id
    return _fmnist_from_idx(Path(where), cfg.cache_dir), (28, 28), where


def _fmnist_hub_to_arrays(dd):
    """The hub's Fashion-MNIST (PIL images) in the same Arrow layout as the IDX path."""
    import datasets

    out = {}
    for split in ("train", "test"):
        ds = dd[split]
        img_col, lab_col = _detect_columns(ds)
        x = np.stack([np.asarray(im, dtype=np.uint8) for im in ds[img_col]])
        y = np.asarray(ds[lab_col], dtype=np.int64)
        out[split] = _arrow_dataset(x, y, FASHION_MNIST_CLASSES)
    return datasets.DatasetDict(out)


def _load_folder(path: str):
    import datasets

    root = Path(path).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(f"image folder {root} does not exist (expected {root}/train/<class>/*.jpg and "
                                   f"{root}/val/<class>/*.jpg)")
    for split in ("train", "val"):
        d = root / split
        if not d.is_dir():
            raise DatasetNotFoundError(f"image folder {root} has no '{split}/' sub-folder (ImageNet layout: "
                                       "train/<class>/..., val/<class>/...)")
        if not any(p.is_dir() for p in d.iterdir()):
            raise DatasetNotFoundError(f"{d} has no class sub-folders")
    train_classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    val_classes = sorted(p.name for p in (root / "val").iterdir() if p.is_dir())
    if set(val_classes) - set(train_classes):
        raise DatasetNotFoundError(f"{root}/val has classes not in train: {sorted(set(val_classes) - set(train_classes))}")
    files = {s: str(root / s / "**") for s in ("train", "val")}
    dd = datasets.load_dataset("imagefolder", data_files=files, drop_labels=False)
    # imagefolder infers one label set across splits; check it matches the folder names
    names = dd["train"].features["label"].names
    if names != train_classes:
        raise CorruptDataError(f"{root}: label names {names[:5]}... do not match class folders {train_classes[:5]}...")
    return datasets.DatasetDict({"train": dd["train"], "test": dd["val"]}), None, str(root)


def _load_hub(name: str):
    import datasets

    try:
        dd = datasets.load_dataset(name)
    except Exception as e:
        raise DatasetNotFoundError(
            f"could not load dataset {name!r} ({type(e).__name__}: {e}). Hub datasets need internet (and, for "
            "ImageNet-1k, accepting its terms and `huggingface-cli login`); or pass a local copy: hf:/path/to/dir "
            "with the hub's parquet files, or folder:/path in ImageNet layout.") from e
    val_name = next((s for s in ("validation", "val", "test") if s in dd), None)
    if "train" not in dd or val_name is None:
        raise DatasetNotFoundError(f"dataset {name!r} has splits {list(dd)}; need 'train' and one of "
                                   "validation/val/test")
    return datasets.DatasetDict({"train": dd["train"], "test": dd[val_name]}), None, name


def _class_names(ds) -> list[str]:
    _, label_col = _detect_columns(ds)
    feat = ds.features[label_col]
    if hasattr(feat, "names"):
        return list(feat.names)
    n = int(max(ds[label_col])) + 1
    return [str(i) for i in range(n)]


def build_transform(cfg: DataConfig, train: bool, mean, std):
    """The per-sample timm transform for ``cfg.preset`` (train) or evaluation; grey images are made RGB first."""
    from timm.data import create_transform

    preset = PRESETS[cfg.preset]
    kw = dict(input_size=(cfg.channels, cfg.img_size, cfg.img_size), mean=tuple(mean), std=tuple(std))
    if train and cfg.preset != "none":
        return create_transform(is_training=True, **kw, **preset)
    return create_transform(is_training=False, crop_pct=1.0 if cfg.dataset == "fashion_mnist" else 0.875,
                            interpolation="bicubic", **kw)


def load_data(cfg: Optional[DataConfig] = None, **kwargs) -> DataBundle:
    """Load train/val datasets for ``cfg`` (or ``DataConfig(**kwargs)``)."""
    cfg = cfg or DataConfig(**kwargs)
    kind, _, arg = cfg.dataset.partition(":")
    if kind == "fashion_mnist":
        dd, image_shape, source = _load_fashion_mnist(cfg)
        default_mean, default_std = (FASHION_MNIST_MEAN,) * cfg.channels, (FASHION_MNIST_STD,) * cfg.channels
    elif kind == "folder":
        dd, image_shape, source = _load_folder(arg)
        default_mean, default_std = IMAGENET_MEAN, IMAGENET_STD
    else:
        dd, image_shape, source = _load_hub(arg)
        default_mean, default_std = IMAGENET_MEAN, IMAGENET_STD
    if cfg.channels == 1 and kind != "fashion_mnist":
        default_mean, default_std = (sum(default_mean) / 3,), (sum(default_std) / 3,)
    mean = tuple(cfg.mean) if cfg.mean is not None else tuple(default_mean)
    std = tuple(cfg.std) if cfg.std is not None else tuple(default_std)
    if len(mean) != cfg.channels or len(std) != cfg.channels:
        raise ValueError(f"mean/std need {cfg.channels} values, got {mean} / {std}")

    all_names = _class_names(dd["train"])
    if cfg.classes is not None:
        bad = [c for c in cfg.classes if not 0 <= int(c) < len(all_names)]
        if bad or len(set(cfg.classes)) != len(cfg.classes):
            raise ValueError(f"classes must be distinct labels in 0..{len(all_names) - 1}, got {list(cfg.classes)}")
        label_map = {int(c): i for i, c in enumerate(cfg.classes)}
        names = [all_names[int(c)] for c in cfg.classes]
    else:
        label_map, names = None, all_names

    def labels_of(ds):
        _, lc = _detect_columns(ds)
        return np.asarray(ds.data.column(lc).to_numpy(zero_copy_only=False), dtype=np.int64)

    train_idx = _select(labels_of(dd["train"]), cfg.classes, cfg.train_subset, cfg.subset_seed)
    val_idx = _select(labels_of(dd["test"]), cfg.classes, cfg.val_subset, cfg.subset_seed + 1)
    batch_path = image_shape is not None and cfg.preset == "none"
    t_train = None if batch_path else build_transform(cfg, True, mean, std)
    t_val = None if image_shape is not None else build_transform(cfg, False, mean, std)
    train = ImageDataset(dd["train"], train_idx, t_train, label_map, cfg.channels, image_shape)
    val = ImageDataset(dd["test"], val_idx, t_val, label_map, cfg.channels, image_shape)
    return DataBundle(train=train, val=val, num_classes=len(names), class_names=names, mean=mean, std=std,
                      config=cfg, source=source, preprocess=Preprocess(cfg.img_size, cfg.channels, mean, std))


def _loads_to_cuda(device) -> bool:
    """Whether batches go to a CUDA device: ``cuda``/``cuda:N``/``gpu`` (a torch device or a Fabric accelerator name);
    ``None``/``auto``: when CUDA is available."""
    if device is None or str(device) == "auto":
        return torch.cuda.is_available()
    return str(device).split(":")[0] in ("cuda", "gpu")


def make_loaders(bundle: DataBundle, batch_size: int, num_workers: int = 0, seed: int = 0,
                 eval_batch_size: Optional[int] = None, drop_last: bool = True, device=None,
                 prefetch_factor: int = 4):
    """Seeded train loader (shuffled, ``drop_last``) and an ordered validation loader.

    ``device`` is where the batches go (``"cuda"``, ``"cpu"``, a Fabric accelerator name; ``None``/``"auto"`` = CUDA
    when available). For CUDA the loaders pin memory (so the engine's non-blocking host-to-device copies overlap
    compute) and, with workers, keep ``prefetch_factor`` batches per worker in flight; workers persist across epochs
    whenever ``num_workers > 0``.
    """
    from tokenbook.repro import loader_generator, worker_init_fn

    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    cuda = _loads_to_cuda(device)
    common = dict(num_workers=num_workers, worker_init_fn=worker_init_fn if num_workers else None,
                  persistent_workers=num_workers > 0, pin_memory=cuda)
    if cuda and num_workers > 0:
        common["prefetch_factor"] = prefetch_factor
    train = torch.utils.data.DataLoader(bundle.train, batch_size=batch_size, shuffle=True,
                                        drop_last=drop_last and len(bundle.train) >= batch_size,
                                        generator=loader_generator(seed), **common)
    val = torch.utils.data.DataLoader(bundle.val, batch_size=eval_batch_size or batch_size * 2, shuffle=False,
                                      **common)
    return train, val


# ----------------------------------------------------------------------------------------------------------
# Fixtures in the real formats (tests, examples)
# ----------------------------------------------------------------------------------------------------------
def _write_idx(path: Path, arr: np.ndarray) -> None:
    code = {np.dtype(np.uint8): 0x08}[arr.dtype]
    header = b"\x00\x00" + bytes([code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


def write_idx_fixture(directory: str | Path, n_train: int = 200, n_test: int = 100, seed: int = 0) -> Path:
    """Write four Fashion-MNIST-format IDX ``.gz`` files of synthetic 28x28 images (class-dependent patterns)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        y = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(y)
        x = rng.randint(0, 60, size=(n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(y):  # a bright bar whose position encodes the class
            x[i, 2 + 2 * c: 5 + 2 * c, 4:24] = 220
        prefix = "train" if split == "train" else "test"
        _write_idx(d / FASHION_MNIST_FILES[f"{prefix}_images"], x)
        _write_idx(d / FASHION_MNIST_FILES[f"{prefix}_labels"], y)
    return d


def write_folder_fixture(directory: str | Path, classes: Sequence[str] = ("cat", "dog", "fish"), per_class: int = 4,
                         size: int = 40, seed: int = 0) -> Path:
    """Write a tiny ImageNet-style folder (train/val, class sub-folders, JPEG files of varied sizes)."""
    from PIL import Image

    root = Path(directory)
    rng = np.random.RandomState(seed)
    for split, n in (("train", per_class), ("val", max(1, per_class // 2))):
        for ci, c in enumerate(classes):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for k in range(n):
                h, w = size + rng.randint(0, 9), size + rng.randint(0, 9)
                a = rng.randint(0, 255, size=(h, w, 3)).astype(np.uint8)
                a[..., ci % 3] = 200
                Image.fromarray(a).save(root / split / c / f"{c}_{k}.jpg", quality=90)
    return root


def write_hub_fixture(directory: str | Path, n_train: int = 30, n_val: int = 10, num_classes: int = 5,
                      size: int = 32, seed: int = 0, label_column: str = "label") -> Path:
    """Write a local dataset in the hub's layout (parquet shards with an ``Image`` column and ``ClassLabel``)."""
    import datasets
    from PIL import Image

    root = Path(directory)
    (root / "data").mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    feats = datasets.Features({"img": datasets.Image(),
                               label_column: datasets.ClassLabel(names=[f"c{i}" for i in range(num_classes)])})
    for split, n in (("train", n_train), ("test", n_val)):
        imgs = [Image.fromarray(rng.randint(0, 255, size=(size, size, 3)).astype(np.uint8)) for _ in range(n)]
        ds = datasets.Dataset.from_dict({"img": imgs, label_column: [i % num_classes for i in range(n)]},
                                        features=feats)
        ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def config_dict(cfg: DataConfig) -> dict:
    return asdict(cfg)
