"""Top-1 on every held-out image of the run's classes, for the claims and the floors (issue 19).

The cpu-scale runs draw their validation curve on a ``val_subset`` of the test split (2,000 of Fashion-MNIST's
10,000 test images): cheap enough to evaluate every epoch, which the plateau rule needs. As the one number a claim
compares, that subset is the largest noise source left that costs nothing to remove:

- a top-1 near 85 % on 2,000 images has a binomial standard error of 0.8 pt, and a paired difference of two models
  on the same images keeps the sampling noise of the images they disagree on;
- the logistic-regression floor is a number on the same images, so the failed-run rule compares two noisy numbers
  (measured on 02's split: the floor is 84.60 % on the 2,000-image subset and 83.50 % on all 10,000 images, the
  subset being the easier one).

Measured on 02's stored cpu runs (seeds 0-2, 533bb8a): the per-seed spread of the paired differences fell from 0.90
to 0.67 pt (T2T module), 0.75 to 0.61 (deep-narrow), 0.63 to 0.29 (performer vs transformer) and 0.60 to 0.53 (T2T-ViT
vs ViT) when the same models are evaluated on all 10,000 images instead of the 2,000.

So a notebook evaluates each stored model once more, after training, on :func:`heldout_config` (the run's data
config without ``val_subset``: every test image of its classes) and judges its claims and floors on that column
(``heldout_top1``). No model is selected on the subset (the runs keep their last epoch's weights), so the 2,000
images inside the 10,000 are not a leak. The run store is untouched: this module is not in any trainer's import
closure, and a run's key does not change.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

__all__ = ["HELDOUT_COLUMN", "heldout_config", "heldout_bundle", "bundle_for", "heldout_top1", "evaluate_runs",
           "judged_on", "describe"]

#: the column of a runs table with the top-1 on every held-out image (%)
HELDOUT_COLUMN = "heldout_top1"


def heldout_config(cfg: Any) -> Any:
    """``cfg`` (a :class:`tokenbook.data.DataConfig`) with every held-out image of its classes: ``val_subset`` None,
    the same training images, classes, size and channels."""
    return dataclasses.replace(cfg, val_subset=None)


def heldout_bundle(cfg: Any) -> Any:
    """The data bundle of :func:`heldout_config` (loaded through :func:`tokenbook.data.load_data`)."""
    from .data import load_data

    return load_data(heldout_config(cfg))


def bundle_for(cfg: Any, judge: bool) -> Any:
    """A notebook's ``judge_heldout`` switch: :func:`heldout_bundle` of ``cfg`` when ``judge`` is set and ``cfg``
    keeps a ``val_subset``; None otherwise (off, or the validation images are already every held-out image)."""
    return heldout_bundle(cfg) if judge and cfg.val_subset else None


def _val_loader(bundle: Any, batch_size: int):
    from .data import make_loaders

    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not len(bundle.val):
        raise ValueError("the held-out split is empty")
    return make_loaders(bundle, batch_size, eval_batch_size=batch_size, device="cpu", drop_last=False)[1]


def _metrics(model: nn.Module, loader: Any, preprocess: Any) -> dict:
    from .train import evaluate

    return evaluate(model.cpu(), loader, preprocess=preprocess, device=torch.device("cpu"))


@torch.no_grad()
def heldout_top1(models: Mapping[str, nn.Module], bundle: Any, batch_size: int = 500,
                 head: Optional[str] = None, loader: Any = None) -> dict[str, float]:
    """Top-1 (%) of each model on every image of ``bundle.val`` (ordered, in batches of ``batch_size``, on the CPU,
    with the bundle's preprocessing). ``head``: for a model with several output heads, the head's top-1
    (``top1_<head>`` of :func:`tokenbook.train.evaluate`); None takes the first head. ``loader``: other batches of
    the same held-out images (e.g. their token ids), fed as they come. A model that is the same object as an
    earlier one is evaluated once."""
    pre = None if loader is not None else bundle.preprocess
    loader = loader if loader is not None else _val_loader(bundle, batch_size)
    key = f"top1_{head}" if head else "top1"
    out: dict[str, float] = {}
    seen: dict[int, float] = {}
    for name, model in models.items():
        if id(model) not in seen:
            res = _metrics(model, loader, pre)
            if key not in res:
                raise KeyError(f"{name}: no {key!r} in the evaluation ({sorted(res)})")
            seen[id(model)] = float(res[key])
        out[name] = seen[id(model)]
    return out


@torch.no_grad()
def evaluate_runs(runs: Sequence[Any], bundle: Any, rebuild: Callable[[Any], nn.Module], batch_size: int = 500,
                  loader: Any = None) -> dict[str, dict]:
    """:func:`tokenbook.train.evaluate` on every image of ``bundle.val`` for each distinct stored run of ``runs``
    (:class:`tokenbook.runs.Run` records, e.g. a notebook's ``launched``; the same key twice is evaluated once), the
    model built by ``rebuild(run)``. ``loader``: other batches of the same held-out images (e.g. their token ids),
    fed to the models as they are, without the bundle's preprocessing. Returns ``{run.key: metrics}`` (``top1``,
    and ``top1_<head>`` per head of a model with several)."""
    pre = None if loader is not None else bundle.preprocess
    loader = loader if loader is not None else _val_loader(bundle, batch_size)
    out: dict[str, dict] = {}
    for run in runs:
        if run.key not in out:
            out[run.key] = _metrics(rebuild(run), loader, pre)
    return out


def judged_on(bundle: Any, heldout: Any = None) -> str:
    """The images a table's top-1 is on, for captions: every held-out image (``heldout``, :func:`bundle_for`), or
    the validation images of ``bundle``."""
    if heldout is not None:
        return f"all {len(heldout.val):,} held-out images"
    return f"the {len(bundle.val):,} validation images"


def describe(bundle: Any, heldout: Any) -> str:
    """One phrase for a ``scale`` column: where the claims' top-1 and the curves come from (no parentheses, so
    that a notebook can put it inside its own)."""
    return (f"top-1 on all {len(heldout.val):,} held-out images, curves on the {len(bundle.val):,}-image "
            "validation subset")
