"""Reference floors for from-scratch runs (issue 19): what a model with no token machinery reaches on the same split.

A transformer trained from scratch that ends below a logistic regression on its own pixels has not learned the task;
its verdicts say nothing about the paper. Every notebook that trains from scratch fits these on the same split, in
the same run, and shows them beside its models:

- :func:`logistic_floor`: scikit-learn's multinomial ``LogisticRegression`` (lbfgs, L2) on the standardised raw
  pixels of the training images (one value per pixel: channels averaged, as Fashion-MNIST's three channels are
  copies), evaluated on the validation images;
- :func:`cnn_floor`: a small CNN (:class:`SmallCNN`, two 3x3 conv blocks with batch norm and max-pooling, then a
  linear head) trained with :func:`tokenbook.train.fit` on the same loaders and preprocessing as the transformers;
- :func:`floors_table`: both, one row each (top-1, top-5 for the CNN, parameters, seconds).

:func:`below_floor` is the failed-run rule: a from-scratch baseline whose top-1 is below the logistic-regression
floor is a failed run. Shared core: imports no paper code.
"""
from __future__ import annotations

import time
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

__all__ = ["pixels", "logistic_floor", "SmallCNN", "cnn_floor", "floors_table", "below_floor", "logistic_top1",
           "failed_baseline_runs", "beside_floors", "arm_row", "runs_below", "data_fingerprint"]


def pixels(dataset: Any, limit: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """``(X, y)``: one row of raw pixel values per image (channels averaged) and the labels, in dataset order."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    xs, ys = [], []
    for i in range(n):
        x, y = dataset[i]
        x = torch.as_tensor(x, dtype=torch.float32)
        xs.append((x.mean(0) if x.ndim == 3 else x).reshape(-1).numpy())
        ys.append(int(y))
    return np.stack(xs), np.asarray(ys)


def logistic_floor(bundle: Any, C: float = 0.01, max_iter: int = 100, seed: int = 0) -> dict:
    """Multinomial logistic regression on standardised pixels of ``bundle.train``, scored on ``bundle.val``:
    ``{"model", "top1", "train_s", "params"}`` (top-1 in %). ``C`` is the inverse L2 strength: 0.01 gave the better
    of 0.1 / 0.01 on 10,000 Fashion-MNIST images (84.5 % vs 82.2 % on 2,000 validation images, 100 lbfgs
    iterations, 15-30 s on 2 cores)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    t0 = time.perf_counter()
    xtr, ytr = pixels(bundle.train)
    xva, yva = pixels(bundle.val)
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed))
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    # one BLAS thread: lbfgs stopped at max_iter lands on a thread-count-dependent point (84.45 % with one thread,
    # 84.55 % with two on the cpu profile's split), and a seed must give the same table whatever the thread count
    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        warnings.simplefilter("ignore", ConvergenceWarning)  # the score is what counts; max_iter caps the time
        clf.fit(xtr, ytr)
        top1 = 100.0 * float((clf.predict(xva) == yva).mean())
    lr = clf[-1]
    return {"model": "logistic regression on pixels", "top1": top1, "top5": None,
            "train_s": time.perf_counter() - t0, "params": int(lr.coef_.size + lr.intercept_.size)}


class SmallCNN(nn.Module):
    """Two 3x3 conv blocks (conv, batch norm, ReLU, 2x2 max-pool) of ``width`` and ``2 * width`` channels, average
    pooling to a 4 x 4 map (any input size) and a linear head on the flattened map: a LeNet-style reference, not a
    paper model."""

    def __init__(self, num_classes: int, in_chans: int = 3, width: int = 32):
        super().__init__()

        def block(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True),
                                 nn.MaxPool2d(2))

        self.features = nn.Sequential(block(in_chans, width), block(width, 2 * width), nn.AdaptiveAvgPool2d(4))
        self.head = nn.Linear(2 * width * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def cnn_floor(bundle: Any, train_loader: Any, val_loader: Any, epochs: int = 5, lr: float = 3e-3,
              width: int = 32, seed: int = 0, accelerator: str = "auto", max_steps_per_epoch: Optional[int] = None,
              max_steps: Optional[int] = None) -> dict:
    """:class:`SmallCNN` trained with :func:`tokenbook.train.fit` (AdamW, warm-up + cosine) on the notebook's own
    loaders and preprocessing: ``{"model", "top1", "top5", "train_s", "params"}``."""
    from . import repro
    from .train import TrainConfig, fit

    repro.seed_everything(seed)
    model = SmallCNN(bundle.num_classes, in_chans=bundle.config.channels, width=width)
    cfg = TrainConfig(epochs=epochs, lr=lr, weight_decay=0.05, warmup_epochs=min(1.0, epochs / 5), min_lr=1e-5,
                      seed=seed, accelerator=accelerator, progress=False,
                      max_steps_per_epoch=max_steps_per_epoch, max_steps=max_steps)
    t0 = time.perf_counter()
    res = fit(model, train_loader, val_loader, cfg, preprocess=bundle.preprocess, desc="small CNN floor")
    capped = res.timing.get("capped_at_step")
    what = f"{epochs} epochs" if not capped else f"{epochs} epochs, cut at step {capped}"
    return {"model": f"small CNN (width {width}, {what})", "top1": float(res.final["val_top1"]),
            "top5": float(res.final.get("val_top5", float("nan"))), "train_s": time.perf_counter() - t0,
            "params": int(sum(p.numel() for p in model.parameters()))}


def data_fingerprint(bundle: Any) -> str:
    """sha256 of every training and validation item of ``bundle`` (image tensor bytes, shape, dtype and label, in
    order), its data config and its preprocessing: what the floors are fitted on, whatever built the bundle."""
    import hashlib

    h = hashlib.sha256()
    for part in (bundle.train, bundle.val):
        h.update(f"{len(part)}|".encode())
        for i in range(len(part)):
            x, y = part[i]
            t = torch.as_tensor(x).contiguous()
            h.update(f"{tuple(t.shape)}{t.dtype}{int(y)}|".encode())
            h.update(t.numpy().tobytes())
    h.update(repr(getattr(bundle, "config", None)).encode() + repr(getattr(bundle, "preprocess", None)).encode())
    return h.hexdigest()


def _floors_fit(key: str, bundle: Any, cnn_epochs: int, seed: int, accelerator: str,
                max_steps_per_epoch: Optional[int], batch_size: int, num_workers: int,
                max_steps: Optional[int]) -> "Any":
    """The cached call of :func:`floors_table` (``key`` covers everything; ``bundle`` is not hashed)."""
    return floors_table(bundle, cnn_epochs=cnn_epochs, seed=seed, accelerator=accelerator,
                        max_steps_per_epoch=max_steps_per_epoch, batch_size=batch_size, num_workers=num_workers,
                        max_steps=max_steps, store=False)


def floors_table(bundle: Any, train_loader: Any = None, val_loader: Any = None, cnn_epochs: int = 5, seed: int = 0,
                 accelerator: str = "auto", max_steps_per_epoch: Optional[int] = None, batch_size: int = 128,
                 num_workers: int = 0, max_steps: Optional[int] = None, store: bool = True) -> "Any":
    """Both floors on the notebook's split, one row each. Without loaders the CNN trains on
    ``data.make_loaders(bundle, batch_size, seed=seed)``. ``max_steps`` caps the CNN's optimizer updates like every
    run of a ``--proof`` (its row then says so).

    Without loaders and with ``store`` (the default) the table is fitted once per split for the whole workbook: it
    is kept in the run store (``<store>/floors``, a :class:`joblib.Memory` cache) under a key of the split's
    content (:func:`data_fingerprint`), these arguments, the code version and the float environment (device, torch
    threads), so 00-03, which share the cpu scale's split, fit it once. The rows then carry the seconds of the fit
    that made them."""
    import pandas as pd

    if store and train_loader is None and val_loader is None:
        import hashlib
        import json

        from joblib import Memory

        from .runs import code_version, float_environment, store_dir

        args = dict(cnn_epochs=int(cnn_epochs), seed=int(seed), accelerator=accelerator,
                    max_steps_per_epoch=max_steps_per_epoch, batch_size=int(batch_size), num_workers=int(num_workers),
                    max_steps=max_steps)
        key = hashlib.sha256(json.dumps({"data": data_fingerprint(bundle), "args": args, "code": code_version(__name__),
                                         "env": float_environment(torch.get_num_threads(), accelerator)},
                                        sort_keys=True).encode()).hexdigest()
        cached = Memory(str(store_dir() / "floors"), verbose=0).cache(_floors_fit, ignore=["bundle"])
        return cached(key, bundle, **args)
    if train_loader is None or val_loader is None:
        from .data import make_loaders

        train_loader, val_loader = make_loaders(bundle, batch_size, num_workers=num_workers, seed=seed)
    rows = [logistic_floor(bundle, seed=seed),
            cnn_floor(bundle, train_loader, val_loader, epochs=cnn_epochs, seed=seed, accelerator=accelerator,
                      max_steps_per_epoch=max_steps_per_epoch, max_steps=max_steps)]
    df = pd.DataFrame(rows, columns=["model", "top1", "top5", "params", "train_s"])
    df.insert(1, "train_images", len(bundle.train))
    df.insert(2, "val_images", len(bundle.val))
    return df


def below_floor(top1: float, floors: "Any") -> Optional[str]:
    """The failed-run rule: a from-scratch baseline whose ``top1`` is below the logistic-regression floor of
    ``floors`` (:func:`floors_table`) has not learned the task. Returns the reason, or None."""
    lr = logistic_top1(floors)
    if lr is not None and top1 < lr:
        return f"failed run: top-1 {top1:.2f} % is below the logistic-regression floor {lr:.2f} % on the same split"
    return None


def logistic_top1(floors: "Any") -> Optional[float]:
    """The logistic-regression floor's top-1 in a table with a ``model`` column (:func:`floors_table`,
    :func:`beside_floors`), or None when it has none."""
    lr = floors.loc[floors["model"].astype(str).str.startswith("logistic"), "top1"]
    return float(lr.iloc[0]) if len(lr) else None


def failed_baseline_runs(top1: "dict[str, dict[int, float]]", floors: "Any") -> str:
    """The failed-run rule (:func:`below_floor`) over the runs of from-scratch baselines: ``top1`` maps an arm to its
    top-1 per seed; every run below the logistic-regression floor of ``floors`` is named. Returns the reason for
    ``claims.Evidence.failed_run`` (``"failed runs below the logistic-regression floor 80.30 % on the same split:
    vit seeds 0 (61.2 %), 2 (70.1 %)"``), or ``""`` when every run is above the floor."""
    bad = {arm: [(seed, float(v)) for seed, v in sorted(per_seed.items()) if below_floor(float(v), floors)]
           for arm, per_seed in top1.items()}
    bad = {arm: runs for arm, runs in bad.items() if runs}
    if not bad:
        return ""
    return (f"failed runs below the logistic-regression floor {logistic_top1(floors):.2f} % on the same split: "
            + "; ".join(f"{arm} seed{'s' if len(runs) > 1 else ''} "
                        + ", ".join(f"{seed} ({v:.1f} %)" for seed, v in runs) for arm, runs in bad.items()))


def beside_floors(rows: "Sequence[dict]", floors: "Any") -> "Any":
    """Trained models beside the reference floors of the same split, one table: ``rows`` (each with ``model``,
    ``kind``, ``top1``, ``params``, ``train_s`` and any further columns) first, then the floors of ``floors``
    (:func:`floors_table`), and ``vs_logistic_floor_pts``: how far each row is above the logistic regression."""
    import pandas as pd

    out = [dict(r) for r in rows]
    out += [{"model": r["model"], "kind": "floor", "top1": float(r["top1"]), "params": int(r["params"]),
             "train_s": float(r["train_s"])} for _, r in floors.iterrows()]
    df = pd.DataFrame(out)
    df["vs_logistic_floor_pts"] = df["top1"] - logistic_top1(floors)
    return df


def arm_row(model: str, top1: Sequence[float], params: int, train_s: Sequence[float]) -> dict:
    """A row of :func:`beside_floors` for an arm trained once per seed: mean and worst-seed top-1, parameters and
    mean training seconds."""
    return {"model": model, "kind": f"from scratch, mean of {len(top1)} seed(s)",
            "top1": round(float(np.mean(top1)), 2), "worst_seed_top1": round(float(min(top1)), 2),
            "params": int(params), "train_s": round(float(np.mean(train_s)), 1)}


def runs_below(table: "Any") -> "Any":
    """The trained rows of a :func:`beside_floors` table with a run (the worst seed) below the logistic floor."""
    trained = table[table["kind"] != "floor"]
    worst = trained["worst_seed_top1"] if "worst_seed_top1" in trained else trained["top1"]
    return trained[worst < logistic_top1(table)]
