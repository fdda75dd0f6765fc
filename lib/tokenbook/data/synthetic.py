"""Tiny synthetic datasets in the exact on-disk layouts of the papers' data, to run the ``full`` profiles on a CPU.

The ``full`` profiles point at real data: ImageNet-1k as an ImageNet-style folder (``folder:/data/imagenet``),
CIFAR-100 as a local copy of the hub's parquet files (``hf:/data/cifar100``) and SeiT's ImageNet-1k token release
(``release:/data/imagenet1k-tokens``). This module writes a few classes of each, in the same layout, with the real
class identities (ImageNet-1k WordNet synsets, CIFAR-100 fine/coarse names, ImageNet class indices for the
tokens), so those parameter sets can be proved end to end without the real files. The content is synthetic but
class-dependent (a class colour, oriented stripes of a class frequency and a class shape, plus seeded per-image
jitter and noise; token grids with a class vocabulary laid out in class stripes), so a model can learn it a little.

- :func:`write_imagenet_folder`: ``train/<synset>/<synset>_<n>.JPEG``, ``val/<synset>/ILSVRC2012_val_<8 digits>.JPEG``
  (RGB JPEG, sides >= ``size``, varied), and ``LOC_synset_mapping.txt`` (``<synset> <lemmas>``, the Kaggle
  release's file) for the classes written. Reads with ``DataConfig(dataset="folder:<root>")``.
- :func:`write_cifar100_parquet`: ``cifar100/{train,test}-00000-of-00001.parquet`` as the hub's ``uoft-cs/cifar100``
  stores them: columns ``img`` (32x32 PNG), ``fine_label`` and ``coarse_label`` (``ClassLabel`` features with all
  100 / 20 real names, so the label space is CIFAR-100's; only the chosen fine classes have rows). Reads with
  ``DataConfig(dataset="hf:<root>")`` (label column ``fine_label``, as the 05_memory ``full`` profile uses it).
- :func:`write_seit_tokens`: ``imagenet1k-{train,val}-token.data.bin.gz`` (escape-coded, one gzip stream),
  ``...index.npy.gz`` (int64 offsets), ``imagenet1k-{split}-label.txt`` and ``codebook.ckpt`` (391 x 32), written
  with :mod:`tokenbook.data.tokens`' own writers; 32x32 ids per image (ids >= 255 included, so escapes occur).
  Reads with :func:`tokenbook.data.tokens.read_release_split`.

Every writer is deterministic for its seed (byte-identical files), takes seconds, builds its folder next to the
target and renames it into place (no half-written dataset), refuses a non-empty target unless ``overwrite=True``
(and then only replaces a folder this module wrote, marked by ``.tokenbook-synthetic``), and returns a manifest
(paths, classes, counts, and the ``dataset`` / ``token_source`` value a profile would use).

CLI: ``python -m tokenbook.data.synthetic {imagenet,cifar100,seit-tokens,all} --out DIR [--classes N]
[--train-per-class N] [--val-per-class N] [--size PX] [--seed S] [--overwrite]``; ``all`` writes
``DIR/imagenet``, ``DIR/cifar100`` and ``DIR/imagenet1k-tokens`` (the ``full`` profiles' folder names). The manifest
is printed as JSON.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np

__all__ = [
    "IMAGENET_SYNSETS", "CIFAR100_FINE", "CIFAR100_COARSE", "CIFAR100_FINE_TO_COARSE", "MARKER",
    "imagenet_classes", "class_image", "class_tokens", "write_imagenet_folder", "write_cifar100_parquet",
    "write_seit_tokens", "write_all", "main", "PROOF_LAYOUT", "PROOF_COUNTS", "default_proof_root", "write_proof_data",
]

PathLike = Union[str, os.PathLike]

#: the first 20 of ImageNet-1k's 1000 sorted WordNet ids with their lemmas (timm's ``imagenet_synset_to_lemma.txt``);
#: more classes are read from timm's packaged class info
IMAGENET_SYNSETS: tuple[tuple[str, str], ...] = (
    ("n01440764", "tench, Tinca tinca"),
    ("n01443537", "goldfish, Carassius auratus"),
    ("n01484850", "great white shark, white shark, man-eater, man-eating shark, Carcharodon carcharias"),
    ("n01491361", "tiger shark, Galeocerdo cuvieri"),
    ("n01494475", "hammerhead, hammerhead shark"),
    ("n01496331", "electric ray, crampfish, numbfish, torpedo"),
    ("n01498041", "stingray"),
    ("n01514668", "cock"),
    ("n01514859", "hen"),
    ("n01518878", "ostrich, Struthio camelus"),
    ("n01530575", "brambling, Fringilla montifringilla"),
    ("n01531178", "goldfinch, Carduelis carduelis"),
    ("n01532829", "house finch, linnet, Carpodacus mexicanus"),
    ("n01534433", "junco, snowbird"),
    ("n01537544", "indigo bunting, indigo finch, indigo bird, Passerina cyanea"),
    ("n01558993", "robin, American robin, Turdus migratorius"),
    ("n01560419", "bulbul"),
    ("n01580077", "jay"),
    ("n01582220", "magpie"),
    ("n01592084", "chickadee"),
)

#: CIFAR-100's 100 fine labels in label order (the hub's ``fine_label`` names)
CIFAR100_FINE: tuple[str, ...] = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl", "boy",
    "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
    "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish",
    "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange",
    "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine",
    "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk",
    "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow_tree", "wolf", "woman", "worm",
)

#: the 20 superclasses (``coarse_label`` names) with their five fine classes each (the CIFAR page's table)
_COARSE_MEMBERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("aquatic_mammals", ("beaver", "dolphin", "otter", "seal", "whale")),
    ("fish", ("aquarium_fish", "flatfish", "ray", "shark", "trout")),
    ("flowers", ("orchid", "poppy", "rose", "sunflower", "tulip")),
    ("food_containers", ("bottle", "bowl", "can", "cup", "plate")),
    ("fruit_and_vegetables", ("apple", "mushroom", "orange", "pear", "sweet_pepper")),
    ("household_electrical_devices", ("clock", "keyboard", "lamp", "telephone", "television")),
    ("household_furniture", ("bed", "chair", "couch", "table", "wardrobe")),
    ("insects", ("bee", "beetle", "butterfly", "caterpillar", "cockroach")),
    ("large_carnivores", ("bear", "leopard", "lion", "tiger", "wolf")),
    ("large_man-made_outdoor_things", ("bridge", "castle", "house", "road", "skyscraper")),
    ("large_natural_outdoor_scenes", ("cloud", "forest", "mountain", "plain", "sea")),
    ("large_omnivores_and_herbivores", ("camel", "cattle", "chimpanzee", "elephant", "kangaroo")),
    ("medium_mammals", ("fox", "porcupine", "possum", "raccoon", "skunk")),
    ("non-insect_invertebrates", ("crab", "lobster", "snail", "spider", "worm")),
    ("people", ("baby", "boy", "girl", "man", "woman")),
    ("reptiles", ("crocodile", "dinosaur", "lizard", "snake", "turtle")),
    ("small_mammals", ("hamster", "mouse", "rabbit", "shrew", "squirrel")),
    ("trees", ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree")),
    ("vehicles_1", ("bicycle", "bus", "motorcycle", "pickup_truck", "train")),
    ("vehicles_2", ("lawn_mower", "rocket", "streetcar", "tank", "tractor")),
)
CIFAR100_COARSE: tuple[str, ...] = tuple(c for c, _ in _COARSE_MEMBERS)
#: fine label id -> coarse label id
CIFAR100_FINE_TO_COARSE: tuple[int, ...] = tuple(
    next(ci for ci, (_, members) in enumerate(_COARSE_MEMBERS) if f in members) for f in CIFAR100_FINE)

#: the file that marks a folder as written here (``overwrite=True`` replaces only such folders)
MARKER = ".tokenbook-synthetic"
#: SeiT's release: 32x32 ids per image, codebook pruned to 391 entries of 32 dims
TOKEN_GRID, CODEBOOK_SIZE, CODE_DIM = 32, 391, 32


# ----------------------------------------------------------------------------------------------------------
# Class identities and content
# ----------------------------------------------------------------------------------------------------------
def imagenet_classes(n: int) -> list[tuple[str, str]]:
    """The first ``n`` of ImageNet-1k's sorted synsets as ``(wnid, lemmas)``; beyond the shipped 20 from timm."""
    if not 1 <= n <= 1000:
        raise ValueError(f"ImageNet-1k has 1000 classes; asked for {n}")
    if n <= len(IMAGENET_SYNSETS):
        return list(IMAGENET_SYNSETS[:n])
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [(info.index_to_label_name(i), info.index_to_description(i)) for i in range(n)]


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i], dtype=np.float32)


def class_image(rng: np.random.RandomState, k: int, height: int, width: int) -> np.ndarray:
    """A uint8 RGB image (H, W, 3) of class ``k`` (a global class index, so a class looks the same however many are
    written): class colour and its complement in stripes of a class angle and frequency, a class shape (disc,
    square, diamond) at a random place, per-image jitter of angle, phase, brightness, and pixel noise."""
    hue = (k * 0.6180339887) % 1.0
    a, b = _hsv_to_rgb(hue, 0.75, 0.9), _hsv_to_rgb((hue + 0.5) % 1.0, 0.6, 0.35)
    angle = np.deg2rad((k * 37) % 180 + rng.uniform(-8, 8))
    cycles = 3 + 2 * (k % 5)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u = (x * np.cos(angle) + y * np.sin(angle)) / max(height, width)
    stripe = 0.5 + 0.5 * np.sin(2 * np.pi * (cycles * u + rng.uniform(0, 1)))
    img = stripe[..., None] * a + (1 - stripe[..., None]) * b
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    r = rng.uniform(0.15, 0.25) * min(height, width)
    dy, dx = np.abs(y - cy), np.abs(x - cx)
    shape = k % 3
    inside = (dy ** 2 + dx ** 2 <= r ** 2) if shape == 0 else (np.maximum(dy, dx) <= r) if shape == 1 else \
        (dy + dx <= r * 1.3)
    img[inside] = 1.0 - a
    img = img * rng.uniform(0.8, 1.1) * 255 + rng.normal(0, 12, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def class_tokens(rng: np.random.RandomState, k: int, grid: int = TOKEN_GRID,
                 codebook_size: int = CODEBOOK_SIZE) -> np.ndarray:
    """A (grid, grid) uint16 id map of class ``k``: the class's own vocabulary of 12 ids (at least 3 of them >= 255,
    so the escape coding is exercised) laid out in stripes of a class angle and width, a random phase per image,
    and 20% of the positions replaced by uniform random ids."""
    vr = np.random.RandomState(10_007 + k)
    vocab = np.concatenate([vr.choice(np.arange(255, codebook_size), 3, replace=False),
                            vr.choice(np.arange(0, 255), 9, replace=False)])
    vr.shuffle(vocab)
    angle = np.deg2rad((k * 53) % 180)
    width = 2 + k % 4
    y, x = np.mgrid[0:grid, 0:grid]
    band = np.floor((x * np.cos(angle) + y * np.sin(angle) + rng.uniform(0, len(vocab) * width)) / width)
    ids = vocab[band.astype(np.int64) % len(vocab)]
    noise = rng.rand(grid, grid) < 0.2
    ids[noise] = rng.randint(0, codebook_size, size=int(noise.sum()))
    return ids.astype(np.uint16)


def _check_counts(classes: int, train_per_class: int, val_per_class: int, max_classes: int, what: str) -> None:
    if not 1 <= classes <= max_classes:
        raise ValueError(f"{what}: classes must be in 1..{max_classes}, got {classes}")
    if train_per_class < 1 or val_per_class < 1:
        raise ValueError(f"{what}: train_per_class and val_per_class must be >= 1, got {train_per_class}, "
                         f"{val_per_class}")


# ----------------------------------------------------------------------------------------------------------
# Writing into place
# ----------------------------------------------------------------------------------------------------------
@contextmanager
def _fresh_dir(out: PathLike, overwrite: bool) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``out``; on success it replaces ``out`` (renamed into place)."""
    out = Path(out).expanduser()
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a folder")
        if any(out.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{out} is not empty; choose an empty or new folder (or overwrite=True / "
                                      f"--overwrite to replace a folder this generator wrote)")
            if not (out / MARKER).is_file():
                raise FileExistsError(f"{out} was not written by tokenbook.data.synthetic (no {MARKER} file); "
                                      "refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        (tmp / MARKER).write_text("synthetic data written by tokenbook.data.synthetic; not real data\n")
        if out.exists():
            old = out.with_name(f".{out.name}.old{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# The three layouts
# ----------------------------------------------------------------------------------------------------------
def write_imagenet_folder(out: PathLike, classes: int = 5, train_per_class: int = 10, val_per_class: int = 4,
                          size: int = 256, seed: int = 0, quality: int = 90, overwrite: bool = False) -> dict:
    """ImageNet-1k's folder layout with its first ``classes`` synsets (see the module docstring).

    Image sides are drawn in ``size .. size * 1.25`` (height) and ``size .. size * 1.25 + 32`` (width), default
    about 288 x 256 like ImageNet's typical landscape photos at reduced scale. Validation files are numbered
    1..N over a seeded interleaving of the classes, as in ILSVRC2012's validation set.
    """
    from PIL import Image

    _check_counts(classes, train_per_class, val_per_class, 1000, "imagenet")
    if size < 16:
        raise ValueError(f"size must be >= 16 px, got {size}")
    syn = imagenet_classes(classes)
    rng = np.random.RandomState(seed)
    out = Path(out).expanduser()
    hi = int(size * 1.25)
    with _fresh_dir(out, overwrite) as tmp:
        plan = [("train", k, f"{wnid}_{i + 1}.JPEG") for k, (wnid, _) in enumerate(syn) for i in range(train_per_class)]
        val = [k for k in range(classes) for _ in range(val_per_class)]
        order = rng.permutation(len(val))
        plan += [("val", val[j], f"ILSVRC2012_val_{n + 1:08d}.JPEG") for n, j in enumerate(order)]
        for split, k, name in plan:
            h, w = rng.randint(size, hi + 1), rng.randint(size, hi + 33)
            d = tmp / split / syn[k][0]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(class_image(rng, k, h, w)).save(d / name, format="JPEG", quality=quality)
        (tmp / "LOC_synset_mapping.txt").write_text("".join(f"{w} {lemma}\n" for w, lemma in syn))
    return {"layout": "imagenet-folder", "root": str(out), "dataset": f"folder:{out}",
            "classes": [w for w, _ in syn], "class_names": [lemma.split(",")[0] for _, lemma in syn],
            "counts": {"train": classes * train_per_class, "val": classes * val_per_class},
            "size_range": [[size, hi], [size, hi + 32]], "seed": seed}


def write_cifar100_parquet(out: PathLike, classes: int = 5, train_per_class: int = 10, val_per_class: int = 4,
                           seed: int = 0, fine_labels: Optional[Sequence[int]] = None,
                           overwrite: bool = False) -> dict:
    """CIFAR-100 in the hub's parquet layout (``uoft-cs/cifar100``), with the first ``classes`` fine labels or the
    given ``fine_labels`` (real ids 0..99). Rows of each split are in a seeded interleaved order."""
    import datasets
    from PIL import Image

    fine = list(range(classes)) if fine_labels is None else [int(f) for f in fine_labels]
    _check_counts(len(fine), train_per_class, val_per_class, 100, "cifar100")
    if len(set(fine)) != len(fine) or not all(0 <= f < 100 for f in fine):
        raise ValueError(f"fine_labels must be distinct CIFAR-100 label ids in 0..99, got {fine}")
    rng = np.random.RandomState(seed)
    out = Path(out).expanduser()
    feats = datasets.Features({"img": datasets.Image(),
                               "fine_label": datasets.ClassLabel(names=list(CIFAR100_FINE)),
                               "coarse_label": datasets.ClassLabel(names=list(CIFAR100_COARSE))})
    counts = {}
    with _fresh_dir(out, overwrite) as tmp:
        (tmp / "cifar100").mkdir()
        for split, per in (("train", train_per_class), ("test", val_per_class)):
            labels = [fine[j] for j in rng.permutation(np.repeat(np.arange(len(fine)), per))]
            imgs = []
            for f in labels:
                b = io.BytesIO()
                Image.fromarray(class_image(rng, f, 32, 32)).save(b, format="PNG")
                imgs.append({"bytes": b.getvalue(), "path": None})
            ds = datasets.Dataset.from_dict({"img": imgs, "fine_label": labels,
                                             "coarse_label": [CIFAR100_FINE_TO_COARSE[f] for f in labels]},
                                            features=feats)
            quiet = not datasets.utils.are_progress_bars_disabled()
            if quiet:
                datasets.disable_progress_bars()
            try:
                ds.to_parquet(str(tmp / "cifar100" / f"{split}-00000-of-00001.parquet"))
            finally:
                if quiet:
                    datasets.enable_progress_bars()
            counts[split] = len(labels)
    return {"layout": "cifar100-parquet", "root": str(out), "dataset": f"hf:{out}", "label_column": "fine_label",
            "classes": fine, "class_names": [CIFAR100_FINE[f] for f in fine],
            "coarse": [CIFAR100_COARSE[CIFAR100_FINE_TO_COARSE[f]] for f in fine], "counts": counts,
            "num_label_names": len(CIFAR100_FINE), "size": [32, 32], "seed": seed}


def write_seit_tokens(out: PathLike, classes: int = 5, train_per_class: int = 10, val_per_class: int = 4,
                      seed: int = 0, name: str = "imagenet1k", overwrite: bool = False) -> dict:
    """SeiT's ImageNet-1k token release layout (see the module docstring), labels = ImageNet class indices
    0..classes-1 (the first synsets), records in a seeded interleaved order; the codebook is seeded Gaussian rows."""
    import torch

    from tokenbook.data import tokens as T

    _check_counts(classes, train_per_class, val_per_class, 1000, "seit-tokens")
    rng = np.random.RandomState(seed)
    out = Path(out).expanduser()
    counts, files = {}, {}
    with _fresh_dir(out, overwrite) as tmp:
        for split, per in (("train", train_per_class), ("val", val_per_class)):
            labels = rng.permutation(np.repeat(np.arange(classes), per))
            ids = np.stack([class_tokens(rng, int(k)) for k in labels])
            p = T.write_token_file(T.token_file_paths(tmp, name, split), ids, labels)
            counts[split] = len(labels)
            files[split] = {k: getattr(p, k).name for k in ("data", "index", "labels")}
        cb = torch.from_numpy(rng.randn(CODEBOOK_SIZE, CODE_DIM).astype(np.float32))
        T.save_codebook(cb, tmp / "codebook.ckpt")
    # torch.save writes a zip archive whose entries carry no time stamp, so the codebook file is byte-identical too
    return {"layout": "seit-token-release", "root": str(out), "token_source": f"release:{out}", "name": name,
            "classes": [w for w, _ in imagenet_classes(classes)], "labels": list(range(classes)), "counts": counts,
            "grid": [TOKEN_GRID, TOKEN_GRID], "codebook": [CODEBOOK_SIZE, CODE_DIM], "files": files, "seed": seed}


def write_all(out: PathLike, classes: int = 5, train_per_class: int = 10, val_per_class: int = 4, size: int = 256,
              seed: int = 0, overwrite: bool = False) -> dict:
    """All three under ``out``: ``imagenet/``, ``cifar100/``, ``imagenet1k-tokens/``."""
    out = Path(out).expanduser()
    kw = dict(classes=classes, train_per_class=train_per_class, val_per_class=val_per_class, seed=seed,
              overwrite=overwrite)
    return {"imagenet": write_imagenet_folder(out / "imagenet", size=size, **kw),
            "cifar100": write_cifar100_parquet(out / "cifar100", **kw),
            "seit-tokens": write_seit_tokens(out / "imagenet1k-tokens", **kw)}


# ----------------------------------------------------------------------------------------------------------
# The proof tree: every dataset the full profiles name, under one data root
# ----------------------------------------------------------------------------------------------------------
#: ``<root>/<name>``: what writes it. The names are the full profiles' (``${TOKENBOOK_DATA:-/data}/<name>``):
#: ImageNet-1k (01-03), ViTTM's ImageNet-21k-P pre-training folder (01, same layout), CIFAR-100 and the three
#: ImageNet-style transfer folders (05; synthetic classes under WordNet ids, the layout is what is proved) and SeiT's
#: token release (04). Weight files (TokenAdapt's, 05's backbone) are written by the experiments modules'
#: ``proof_data`` hooks, which know the models.
PROOF_LAYOUT: dict[str, tuple[str, int]] = {
    "imagenet": ("imagenet", 0), "imagenet21k_p": ("imagenet", 1), "cifar100": ("cifar100", 2),
    "places365": ("imagenet", 3), "sun397": ("imagenet", 4), "inat2017": ("imagenet", 5),
    "imagenet1k-tokens": ("seit-tokens", 6),
}
#: the proof tree's size: 3 classes x 4 training and 2 validation images each (seconds to write, a few MB)
PROOF_COUNTS = dict(classes=3, train_per_class=4, val_per_class=2)


def default_proof_root() -> Path:
    """``$TOKENBOOK_CACHE/proof-data`` (default ``~/.cache/tokenbook/proof-data``)."""
    from tokenbook.io import cache_root

    return cache_root() / "proof-data"


def write_proof_data(root: PathLike, names: Optional[Sequence[str]] = None) -> list[str]:
    """Write the proof tree's datasets (``names``, default all of :data:`PROOF_LAYOUT`) under ``root``, each only
    when it is missing (a folder with this module's marker counts as present; a folder without it is refused, so
    real data under the same name is never touched). Returns the names written now."""
    root = Path(root).expanduser()
    written = []
    for name in names if names is not None else PROOF_LAYOUT:
        if name not in PROOF_LAYOUT:
            raise ValueError(f"no proof dataset {name!r}; known: {', '.join(PROOF_LAYOUT)}")
        out = root / name
        if (out / MARKER).is_file():
            continue
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise FileExistsError(f"{out} holds data not written by tokenbook.data.synthetic; a proof writes its "
                                  "synthetic copies only beside them, never over them (choose another data root)")
        layout, seed = PROOF_LAYOUT[name]
        if layout == "imagenet":
            write_imagenet_folder(out, seed=seed, **PROOF_COUNTS)
        elif layout == "cifar100":
            write_cifar100_parquet(out, seed=seed, **PROOF_COUNTS)
        else:
            write_seit_tokens(out, seed=seed, **PROOF_COUNTS)
        written.append(name)
    return written


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tokenbook.data.synthetic",
                                 description="Write tiny synthetic datasets in the papers' on-disk layouts.")
    ap.add_argument("layout", choices=("imagenet", "cifar100", "seit-tokens", "all"))
    ap.add_argument("--out", required=True, help="target folder (new or empty; 'all' writes three sub-folders)")
    ap.add_argument("--classes", type=int, default=5)
    ap.add_argument("--train-per-class", type=int, default=10)
    ap.add_argument("--val-per-class", type=int, default=4)
    ap.add_argument("--size", type=int, default=256, help="shortest image side of the ImageNet folder (px)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true", help="replace a folder this generator wrote before")
    a = ap.parse_args(argv)
    kw = dict(classes=a.classes, train_per_class=a.train_per_class, val_per_class=a.val_per_class, seed=a.seed,
              overwrite=a.overwrite)
    try:
        if a.layout == "imagenet":
            man = write_imagenet_folder(a.out, size=a.size, **kw)
        elif a.layout == "cifar100":
            man = write_cifar100_parquet(a.out, **kw)
        elif a.layout == "seit-tokens":
            man = write_seit_tokens(a.out, **kw)
        else:
            man = write_all(a.out, size=a.size, **kw)
    except (ValueError, FileExistsError, OSError) as e:
        print(f"tokenbook.data.synthetic: {e}", file=sys.stderr)
        return 2
    print(json.dumps(man, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
