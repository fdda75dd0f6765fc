"""Task splits and small in-memory image datasets (used by Learnable Memory's fine-tuning tasks, usable anywhere).

- ``class_group_indices`` / ``TaskSubset`` / ``make_task_datasets``: split a labelled dataset into per-task class
  groups with labels remapped to ``0..k-1``.
- ``ArrayImageDataset``: uint8 arrays + labels in the item format of ``tokenbook.data.Preprocess``.
- ``digits_data``: scikit-learn's bundled handwritten digits (no download) as a ``DataBundle``.
- ``load_target_tasks``: target tasks from specs (``fm:4,5,6``, ``digits``, ``folder:<path>``, ``hf:<id>``) as
  :class:`TargetTask` objects with the paper dataset each stands for.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

__all__ = ["fm_task_classes", "class_group_indices", "TaskSubset", "make_task_datasets", "ArrayImageDataset", "digits_data",
           "TargetTask", "paper_dataset_for", "task_name", "load_target_tasks"]


def class_group_indices(targets: Union[Sequence[int], np.ndarray, torch.Tensor],
                        groups: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Indices of the samples of each class group (groups must be disjoint, non-empty and present in ``targets``)."""
    t = np.asarray(targets.cpu() if torch.is_tensor(targets) else targets).reshape(-1)
    if not groups:
        raise ValueError("groups is empty; pass a list of class lists, e.g. [[0, 1, 2], [3, 4, 5]]")
    owner: dict[int, int] = {}
    present = set(np.unique(t).tolist())
    for g, classes in enumerate(groups):
        if len(classes) == 0:
            raise ValueError(f"group {g} is empty")
        if len(set(classes)) != len(classes):
            raise ValueError(f"group {g} lists a class twice: {list(classes)}")
        for c in classes:
            if c in owner:
                raise ValueError(f"class {c} is in group {owner[c]} and group {g}; groups must be disjoint")
            owner[c] = g
        missing = [c for c in classes if c not in present]
        if missing:
            raise ValueError(f"group {g}: classes {missing} do not occur in the targets (present: {sorted(present)})")
    return [np.flatnonzero(np.isin(t, np.asarray(list(classes)))) for classes in groups]


class TaskSubset(torch.utils.data.Dataset):
    """Samples ``indices`` of ``dataset`` with labels remapped to ``0..len(classes)-1`` in the order of
    ``classes``. Items are ``(input, new_label)``; ``targets`` holds the remapped labels."""

    def __init__(self, dataset: Any, indices: Sequence[int], classes: Sequence[int],
                 targets: Optional[Sequence[int]] = None) -> None:
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.classes = [int(c) for c in classes]
        self.label_map = {c: i for i, c in enumerate(self.classes)}
        src = np.asarray(targets if targets is not None else _dataset_targets(dataset)).reshape(-1)
        old = src[self.indices]
        bad = sorted(set(old.tolist()) - set(self.label_map))
        if bad:
            raise ValueError(f"indices include classes {bad} that are not in classes {self.classes}")
        self.targets = np.array([self.label_map[int(c)] for c in old], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        item = self.dataset[int(self.indices[i])]
        x, y = item[0], item[1]
        y = int(y.item() if torch.is_tensor(y) else y)
        if y not in self.label_map:
            raise ValueError(f"sample {int(self.indices[i])} has label {y}, not in {self.classes}; are the targets "
                             "passed to TaskSubset the dataset's labels?")
        return x, self.label_map[y]


def _dataset_targets(dataset: Any):
    for attr in ("targets", "labels", "y"):
        if hasattr(dataset, attr):
            t = getattr(dataset, attr)
            return t.cpu().numpy() if torch.is_tensor(t) else np.asarray(t)
    raise ValueError(f"{type(dataset).__name__} has no .targets/.labels; pass targets=... explicitly")


def make_task_datasets(dataset: Any, groups: Sequence[Sequence[int]],
                       targets: Optional[Sequence[int]] = None) -> list[TaskSubset]:
    """One ``TaskSubset`` per class group (e.g. Fashion-MNIST ``[[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]``: task ``g``
    gets the samples of ``groups[g]`` with labels ``0..len(groups[g])-1``)."""
    t = np.asarray(targets if targets is not None else _dataset_targets(dataset)).reshape(-1)
    if len(t) != len(dataset):
        raise ValueError(f"targets has {len(t)} entries but the dataset has {len(dataset)} samples")
    return [TaskSubset(dataset, idx, g, targets=t) for idx, g in zip(class_group_indices(t, groups), groups)]



class ArrayImageDataset(torch.utils.data.Dataset):
    """uint8 images ``(N, H, W)`` + labels, items ``(uint8 tensor (1, H, W), label)`` for ``data.Preprocess``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = np.ascontiguousarray(images, dtype=np.uint8)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.targets = self.labels

    def __len__(self) -> int:
        return len(self.labels)

    def raw(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.images[i].copy()).unsqueeze(0)

    def __getitem__(self, i: int):
        return self.raw(i), int(self.labels[i])

    def images_tensor(self, n: Optional[int] = None) -> torch.Tensor:
        n = len(self) if n is None else min(n, len(self))
        return torch.from_numpy(self.images[:n].copy()).unsqueeze(1)


def digits_data(img_size: int = 28, channels: int = 3, train_size: Optional[int] = None, val_size: int = 597,
                mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None, seed: int = 0):
    """scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes; no download) as a ``DataBundle``.

    Pixels 0..16 are scaled to uint8 0..255; a class-stratified split with ``val_size`` validation images (seeded by
    ``seed``, independent of any model RNG) and up to ``train_size`` training images. The bundle's ``preprocess``
    resizes to ``img_size`` on the batch and normalises with ``mean``/``std`` (default: the digits' own statistics).
    """
    from sklearn.datasets import load_digits

    from tokenbook.data import DataBundle, DataConfig, Preprocess

    d = load_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    y = d.target.astype(np.int64)
    if not 0 < val_size < len(y):
        raise ValueError(f"val_size must be in 1..{len(y) - 1}, got {val_size}")
    rng = np.random.RandomState(seed)
    per_class = [rng.permutation(np.flatnonzero(y == c)) for c in range(10)]
    order = [p[k] for k in range(max(len(p) for p in per_class)) for p in per_class if k < len(p)]  # round-robin
    val_idx = np.sort(np.asarray(order[:val_size]))
    train_idx = np.asarray(order[val_size:])
    if train_size is not None:
        train_idx = train_idx[:train_size]
    train_idx = np.sort(train_idx)
    if mean is None or std is None:
        v = x[train_idx].astype(np.float64) / 255.0
        mean, std = (float(v.mean()),) * channels, (float(v.std()),) * channels
    cfg = DataConfig(dataset="fashion_mnist", img_size=img_size, channels=channels)  # dataset field: placeholder
    return DataBundle(train=ArrayImageDataset(x[train_idx], y[train_idx]),
                      val=ArrayImageDataset(x[val_idx], y[val_idx]),
                      num_classes=10, class_names=[str(i) for i in range(10)], mean=tuple(mean), std=tuple(std),
                      config=cfg, source="sklearn.datasets.load_digits",
                      preprocess=Preprocess(img_size, channels, mean, std))


@dataclass
class TargetTask:
    """One target task of the fine-tuning table: a name (a valid task name), its data and the paper dataset it
    stands for (None when the paper has no such dataset)."""

    name: str
    spec: str
    bundle: Any
    paper_dataset: Optional[str] = None

    @property
    def num_classes(self) -> int:
        return self.bundle.num_classes

    def describe(self) -> dict:
        return {"task": self.name, "spec": self.spec, "source": self.bundle.source, "classes": self.num_classes,
                "class_names": ", ".join(self.bundle.class_names[:10]) + (" ..." if self.num_classes > 10 else ""),
                "train_images": len(self.bundle.train), "val_images": len(self.bundle.val),
                "paper_dataset": self.paper_dataset}


def paper_dataset_for(name: str) -> Optional[str]:
    """The paper dataset a task name stands for (``cifar100`` -> ``CIFAR-100``, ``places365`` -> ``Places-365``,
    ``sun397`` -> ``SUN-397``, ``inat...`` -> ``iNaturalist``), else None."""
    n = name.lower().replace("-", "").replace("_", "")
    if "cifar100" in n:
        return "CIFAR-100"
    if "places" in n:
        return "Places-365"
    if "sun397" in n or n.startswith("sun"):
        return "SUN-397"
    if "inat" in n or "inaturalist" in n:
        return "iNaturalist"
    return None


def task_name(spec: str) -> str:
    """A task's name from its spec: ``fm:4,5,6`` -> ``fm_4_5_6``, ``folder:/data/CIFAR-100`` -> ``cifar_100``."""
    kind, _, arg = spec.partition(":")
    if kind == "fm":
        return "fm_" + "_".join(re.findall(r"[^,\s]+", arg))
    if kind == "digits":
        return "digits"
    tail = arg.rstrip("/").split("/")[-1] or arg
    name = re.sub(r"[^0-9a-zA-Z_]", "_", tail).strip("_").lower()
    return name or kind


def fm_task_classes(spec: str) -> list[int]:
    """The Fashion-MNIST classes of a task spec ``fm:4,5,6`` (``[4, 5, 6]``); a clear error for a bad one."""
    kind, _, arg = spec.strip().partition(":")
    if kind != "fm" or not re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*,?\s*", arg):
        raise ValueError(f"bad task {spec!r}: fm:<comma-separated class ids>, e.g. fm:4,5,6")
    return [int(c) for c in re.findall(r"\d+", arg)]


def load_target_tasks(specs: Sequence[str], img_size: int, channels: int = 3, train_subset: Optional[int] = None,
                      val_subset: Optional[int] = None, preset: str = "none", mean: Optional[Sequence[float]] = None,
                      std: Optional[Sequence[float]] = None, data_dir: Optional[str] = None, seed: int = 0,
                      cache_dir: Optional[str] = None, reserved: Sequence[str] = ("source",)) -> list[TargetTask]:
    """Target tasks, one per item of ``specs`` (a name in ``reserved`` is refused: ``source`` is the memory of
    the source task in :class:`tokenbook.models.memory.MemoryViT`):

    - ``fm:4,5,6``: Fashion-MNIST classes 4, 5, 6 (labels remapped to 0..2), class-balanced subsets;
    - ``digits``: scikit-learn's 8x8 digits resized to ``img_size`` (another image source);
    - ``folder:<path>`` / ``hf:<id or path>``: a real dataset (``tokenbook.data``), e.g. the paper's CIFAR-100,
      Places-365, SUN-397, iNaturalist in ImageNet folder layout. The task's paper dataset is read from its name.

    ``mean``/``std`` default to each source's statistics; pass the backbone's (``backbone_norm``) so every task is
    normalised the way the pre-trained model expects.
    """
    from . import DataConfig, load_data

    if isinstance(specs, str):
        raise TypeError(f"target tasks must be a list of specs, e.g. ['fm:4,5,6', 'digits'], got the string {specs!r}")
    items = [s.strip() for s in specs if s.strip()]
    if not items:
        raise ValueError("no target tasks given; e.g. ['fm:4,5,6', 'fm:7,8,9', 'digits']")
    tasks, names = [], set()
    for item in items:
        kind, _, arg = item.partition(":")
        if kind == "fm":
            classes = fm_task_classes(item)
            bundle = load_data(DataConfig(dataset="fashion_mnist", data_dir=data_dir, img_size=img_size,
                                          channels=channels, train_subset=train_subset, val_subset=val_subset,
                                          classes=classes, preset=preset, subset_seed=seed, mean=mean, std=std,
                                          cache_dir=cache_dir))
        elif kind == "digits":
            bundle = digits_data(img_size, channels, train_size=train_subset,
                                 val_size=min(val_subset or 597, 897), mean=mean, std=std, seed=seed)
        elif kind in ("folder", "hf"):
            bundle = load_data(DataConfig(dataset=item, img_size=img_size, channels=channels, train_subset=train_subset,
                                          val_subset=val_subset, preset=preset, subset_seed=seed, mean=mean, std=std,
                                          cache_dir=cache_dir))
        else:
            raise ValueError(f"unknown target task {item!r}; use fm:<classes>, digits, folder:<path> or hf:<id>")
        name = task_name(item)
        if name in names or name in reserved:
            raise ValueError(f"two target tasks are both named {name!r}; give the datasets distinct folder names")
        names.add(name)
        tasks.append(TargetTask(name, item, bundle, paper_dataset_for(name)))
    return tasks
