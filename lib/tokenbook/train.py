"""One training engine for every notebook: ``fit()`` on Lightning Fabric with timm's training components.

- Devices, precision (``32-true``, ``bf16-mixed``, ``16-mixed``) and DDP over GPUs and nodes come from Lightning
  Fabric (``TrainConfig.accelerator/devices/num_nodes/strategy/precision``).
- timm supplies the optimizer (``create_optimizer_v2``), the per-step warmup + cosine schedule
  (``CosineLRScheduler`` / ``StepLRScheduler``), Mixup/CutMix, the losses (label smoothing, soft-target CE, BCE) and the EMA
  (``ModelEmaV3``).
- Models may return one logit tensor or several (ViTTM's memory and process heads): every head gets the loss, the
  losses are summed (``TrainConfig.head_weights`` to weight them), and evaluation reports top-1/top-5 per head for the
  raw and the EMA model. Models that return one tensor in ``eval()`` but have several heads ask for all of them
  through the :class:`all_heads` protocol (a boolean ``return_all_heads`` attribute).
- Hooks (objects with any of ``on_fit_start(fabric, model)``, ``on_epoch_start(epoch, model)``,
  ``on_batch(batch) -> batch``, ``on_epoch_end(epoch, model, metrics)``, ``state_dict()``, ``load_state_dict(sd)``)
  carry the papers' needs: ToE's per-epoch stages, SeiT's batch transforms on the device; hook state is saved in
  checkpoints and restored on resume. Only parameters with ``requires_grad`` are optimized (Learnable Memory).
- Timing: ``step_time_s`` is the sum of the pure steps (forward + backward + optimizer step, data loading excluded);
  ``wall_time_s`` is end to end (data loading and evaluation included). On a GPU the steps are timed with CUDA events
  that are read once per epoch, on the CPU (synchronous) with ``perf_counter``: the hot path never waits for the device.
- Divergence: per-step losses stay on the device in a small buffer that is read every ``finite_check_every`` steps
  and at the end of each epoch (one host sync per window, not per step); a non-finite loss raises
  :class:`TrainingDivergedError` naming the first bad step (the steps after it in the same window have run, so the
  in-memory weights may be NaN; no checkpoint is written after a bad step). A non-finite validation loss or metric is
  an error too (naming the epoch), never a silent ``NaN`` / ``n/a``.
- Checkpoints (``last.ckpt``) hold model, optimizer, scheduler, EMA, hooks, RNG states and history; they load with
  ``torch.load(weights_only=True)``. :func:`save_weights` / :func:`load_weights` handle ``.safetensors`` and torch files
  and list missing/unexpected keys on a mismatch.

Size: about 880 lines, over the 800-line guide: one engine whose ``fit()`` is split into set-up, one epoch and the
end-of-epoch evaluation (``_setup_fit``, ``_train_epoch``, ``_end_epoch``, sharing a ``_Run``), next to the config,
the recipes, evaluation and the weight files it uses; splitting the module would separate ``fit`` from its helpers.
"""
from __future__ import annotations

import copy
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from .io import atomic_save

__all__ = [
    "TrainConfig", "FitResult", "fit", "evaluate", "save_weights", "load_weights", "TrainingDivergedError",
    "CheckpointMismatchError", "OutOfMemoryError", "RECIPES", "recipe", "fit_launched", "all_heads",
]


class TrainingDivergedError(RuntimeError):
    """The loss became NaN/inf; one line naming the epoch, step and global step of the first non-finite loss and the
    configured (peak) learning rate (for a non-finite validation loss/metric: the epoch and global step)."""


class CheckpointMismatchError(RuntimeError):
    """A checkpoint does not match the model; the message lists the missing and unexpected keys."""


class OutOfMemoryError(RuntimeError):
    """The device ran out of memory; the message suggests what to reduce."""


@dataclass
class TrainConfig:
    """Everything ``fit()`` needs besides the model and the data. Defaults suit short CPU runs."""

    epochs: int = 10
    batch_size: int = 128  # per device; informational here (the loaders carry it), recorded in results
    # optimizer (timm create_optimizer_v2)
    opt: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    filter_bias_and_bn: bool = True  # no weight decay on 1-d params (timm); False = decay everything (ViTTM code)
    # schedule (timm CosineLRScheduler, stepped per optimizer update)
    sched: str = "cosine"  # cosine | step | none
    warmup_epochs: float = 1.0  # may be fractional
    warmup_steps: Optional[int] = None  # overrides warmup_epochs (ViTTM's recipes are in steps)
    warmup_lr: float = 1e-6
    min_lr: float = 1e-6
    cooldown_epochs: int = 0
    # regularisation and loss
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.0
    loss: str = "ce"  # ce | bce (timm BinaryCrossEntropy) ; soft-target CE is used automatically with mixup
    bce_sum_classes: bool = False
    head_weights: Optional[Sequence[float]] = None  # weights of several heads' losses (default all 1: summed)
    clip_grad: Optional[float] = None  # max grad norm
    grad_accum: int = 1
    # EMA (timm ModelEmaV3), 0 = off
    ema_decay: float = 0.0
    # devices (Lightning Fabric)
    accelerator: str = "auto"  # cpu | cuda | auto
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | ddp_find_unused_parameters_true | ...
    precision: str = "32-true"  # 32-true | bf16-mixed | 16-mixed
    compile: bool = False  # torch.compile the model
    # bookkeeping
    seed: int = 0
    max_steps_per_epoch: Optional[int] = None  # cut epochs short (smoke runs)
    max_steps: Optional[int] = None  # stop the whole run after this many optimizer updates (a proof of a long recipe:
    # its schedule, data and model unchanged, evaluated after the last update; the history says the run was cut)
    eval_every: int = 1  # evaluate every n epochs (and always after the last)
    checkpoint_dir: Optional[str] = None  # where last.ckpt goes (None = no checkpoints)
    resume: bool = False  # continue from checkpoint_dir/last.ckpt when it exists
    progress: bool = True  # tqdm progress bars (plain text when not in a notebook front end)
    log_every: int = 0  # print a line every n steps (0 = only per epoch)
    finite_check_every: int = 100  # read the on-device losses (one host sync) every n steps and at each epoch end

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.loss not in ("ce", "bce"):
            raise ValueError(f"loss must be 'ce' or 'bce', got {self.loss!r}")
        if self.sched not in ("cosine", "step", "none"):
            raise ValueError(f"sched must be 'cosine', 'step' or 'none', got {self.sched!r}")
        if self.precision not in ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "64-true"):
            raise ValueError(f"unsupported precision {self.precision!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.grad_accum < 1:
            raise ValueError("grad_accum must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 (None: no cap), got {self.max_steps}")
        if self.finite_check_every < 1:
            raise ValueError(f"finite_check_every must be >= 1, got {self.finite_check_every}")

    @classmethod
    def from_params(cls, params: dict, **overrides) -> "TrainConfig":
        """Build from a dict of notebook parameters; keys that are not fields are ignored."""
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in params.items() if k in names}
        kw.update(overrides)
        return cls(**kw)


#: Paper recipes as TrainConfig keyword sets (per-device batch sizes assume the paper's GPU counts; see notes).
RECIPES: dict[str, dict[str, Any]] = {
    # ViTTM README, IN-21k-P pre-training (S and B): 4 x 1024, 300 ep, AdamW 1.5e-4, wd 0.03 on all params
    "vittm_pt_in21k": dict(epochs=300, batch_size=1024, opt="adamw", lr=1.5e-4, weight_decay=0.03,
                           filter_bias_and_bn=False, warmup_steps=10_000, warmup_lr=1e-6, min_lr=1e-7, mixup=0.5,
                           cutmix=0.0, clip_grad=1.0, ema_decay=0.999, precision="bf16-mixed", devices=2, num_nodes=2,
                           strategy="ddp_find_unused_parameters_true"),
    "vittm_s_ft_in1k": dict(epochs=300, batch_size=1024, opt="adamw", lr=1.75e-4, weight_decay=0.03,
                            filter_bias_and_bn=False, warmup_steps=3_000, warmup_lr=1e-6, min_lr=1e-6, mixup=0.5,
                            cutmix=0.5, loss="bce", bce_sum_classes=True, clip_grad=1.0, ema_decay=0.999,
                            precision="bf16-mixed", devices=2, num_nodes=2),
    "vittm_b_ft_in1k": dict(epochs=300, batch_size=1024, opt="adamw", lr=2.5e-5, weight_decay=0.1,
                            filter_bias_and_bn=False, warmup_steps=3_000, warmup_lr=1e-6, min_lr=1e-7, mixup=0.8,
                            cutmix=0.8, loss="bce", bce_sum_classes=True, clip_grad=1.0, ema_decay=0.999,
                            precision="bf16-mixed", devices=2),
    # DeiT / T2T-ViT ImageNet recipe (batch 512 total; lr 5e-4 x batch/512)
    "deit_in1k": dict(epochs=300, batch_size=128, opt="adamw", lr=5e-4, weight_decay=0.05, warmup_epochs=5,
                      warmup_lr=1e-6, min_lr=1e-5, cooldown_epochs=10, mixup=0.8, cutmix=1.0, label_smoothing=0.1,
                      ema_decay=0.99996, devices=4, strategy="ddp"),
    # ToE official DeiT-S run script: 4 x 256, lr 1e-3
    "toe_deit_s_in1k": dict(epochs=300, batch_size=256, opt="adamw", lr=1e-3, weight_decay=0.05, warmup_epochs=5,
                            warmup_lr=1e-6, min_lr=1e-5, mixup=0.8, cutmix=1.0, label_smoothing=0.1, devices=4,
                            strategy="ddp"),
    # Learnable Memory (ViT transfer): SGD momentum, clip 1.0, linear warmup, batch 512, 20k steps (see notebook)
    "memory_transfer": dict(opt="sgd", momentum=0.9, lr=0.1, weight_decay=0.0, clip_grad=1.0, warmup_steps=500,
                            sched="cosine", batch_size=512),
}


def recipe(name: str, **overrides) -> TrainConfig:
    """A paper recipe (see :data:`RECIPES`) as a TrainConfig, with overrides."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; available: {sorted(RECIPES)}")
    return TrainConfig(**{**RECIPES[name], **overrides})


@dataclass
class FitResult:
    model: nn.Module
    ema: Optional[nn.Module]
    history: "Any"  # pandas DataFrame, one row per epoch
    final: dict  # metrics after the last epoch
    timing: dict  # wall_time_s, step_time_s, steps, step_ms, train_img_s, eval_time_s
    config: TrainConfig
    trainable_params: int
    head_names: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {**self.final, **{k: v for k, v in self.timing.items()}, "trainable_params": self.trainable_params}


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
def _as_list(out) -> list[torch.Tensor]:
    if isinstance(out, (tuple, list)):
        return [o for o in out if torch.is_tensor(o)]
    return [out]


class all_heads:
    """Multi-head protocol (duck-typed): a model with a boolean attribute ``return_all_heads`` returns one tensor
    from ``forward`` in ``eval()`` (timm's convention for two-head models, e.g. ViTTM) and all of its heads (a tuple,
    in ``head_names`` order) while the attribute is True. ``with all_heads(model):`` sets it to True (on the model
    inside Fabric/DDP/compile wrappers) and restores it afterwards; ``fit()`` and ``evaluate()`` run inside it, so
    every head gets its loss and its metrics. Models without the attribute are left as they are."""

    def __init__(self, model: nn.Module):
        m = getattr(model, "module", model)
        self.model = getattr(m, "_orig_mod", m)
        self.prev = getattr(self.model, "return_all_heads", None)

    def __enter__(self):
        if isinstance(self.prev, bool):
            self.model.return_all_heads = True
        return self.model

    def __exit__(self, *exc):
        if isinstance(self.prev, bool):
            self.model.return_all_heads = self.prev
        return False


def head_names_of(model: nn.Module, n: int) -> list[str]:
    """Names for a model's output heads: ``model.head_names`` if it has them, else head0, head1, ..."""
    m = getattr(model, "module", model)
    m = getattr(m, "_orig_mod", m)
    names = getattr(m, "head_names", None)
    if names and len(names) == n:
        return list(names)
    return ["main"] if n == 1 else [f"head{i}" for i in range(n)]


def _progress(iterable, total, desc, enabled):
    """tqdm: widget bars in an interactive notebook (tqdm.auto), plain text at a low rate when run headlessly by
    papermill/run_all.sh (``TOKENBOOK_HEADLESS`` is set there), none when disabled."""
    if not enabled:
        return iterable
    if os.environ.get("TOKENBOOK_HEADLESS"):
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, leave=False, mininterval=15.0, file=sys.stdout, ascii=True)
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, mininterval=0.5, dynamic_ncols=True)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _StepTimer:
    """Sum of the per-step times of one epoch without a host sync per step.

    CUDA: a pair of timing events per step, recorded on the current stream and read once in :meth:`total` (one sync);
    the time is the device's from the step's first to its last kernel, so the data loading between steps is not in
    it. CPU (synchronous): ``perf_counter`` around the step."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._pairs: list = []
        self._host = 0.0
        self._t0 = self._ev0 = None

    def start(self) -> None:
        if self.cuda:
            self._ev0 = torch.cuda.Event(enable_timing=True)
            self._ev0.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pairs.append((self._ev0, end))
        else:
            self._host += time.perf_counter() - self._t0

    def total(self) -> float:
        """Seconds summed since the last call (waits for the last step's end event on CUDA), then resets."""
        if self.cuda:
            t = 0.0
            if self._pairs:
                self._pairs[-1][1].synchronize()
                t = sum(a.elapsed_time(b) for a, b in self._pairs) / 1e3
            self._pairs = []
            return t
        t, self._host = self._host, 0.0
        return t


class _LossWindow:
    """Per-step losses kept on the device and read (one host sync) when the window is full, before a log line and at
    the end of an epoch; a non-finite one raises :class:`TrainingDivergedError` naming its step."""

    def __init__(self, size: int, device: torch.device, peak_lr: float):
        self.buf = torch.zeros(size, device=device, dtype=torch.float32)
        self.peak_lr = peak_lr  # the configured lr, named in the error (the step's own lr may be warmup's or min_lr)
        self.steps: list[tuple[int, int, int, float]] = []  # (epoch, step, global step, lr) of the losses in buf
        self.sum, self.n = 0.0, 0

    def add(self, loss: torch.Tensor, epoch: int, step: int, global_step: int, lr: float) -> None:
        self.buf[len(self.steps)] = loss.detach().float()  # a device-side copy: no sync
        self.steps.append((epoch, step, global_step, lr))
        if len(self.steps) == self.buf.numel():
            self.drain()

    def drain(self) -> None:
        if not self.steps:
            return
        vals = self.buf[:len(self.steps)].tolist()  # the one host sync of the window
        for v, (epoch, step, gstep, lr) in zip(vals, self.steps):
            if not math.isfinite(v):
                raise TrainingDivergedError(
                    f"training diverged: the loss first became {v} at epoch {epoch}, step {step} (global step "
                    f"{gstep}) with configured lr {self.peak_lr:.3g} (schedule at {lr:.3g} for that step); lower lr, "
                    "add warmup or gradient clipping (clip_grad), or use 32-true precision.")
            self.sum += v
        self.n += len(self.steps)
        self.steps = []


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}


def _set_rng_state(s: dict) -> None:
    random.setstate(tuple(s["python"]) if not isinstance(s["python"], tuple) else s["python"])
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))


# ----------------------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------------------
def save_weights(model: nn.Module, path: str | Path) -> Path:
    """Save a model's state_dict atomically (``.safetensors`` or a torch file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        # safetensors refuses shared storage; clone to be safe
        save_file({k: v.clone() for k, v in sd.items()}, str(tmp))
    else:
        torch.save(sd, tmp)
    os.replace(tmp, path)
    return path


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read weights from ``.safetensors`` or a torch file (``weights_only=True``); unwraps common containers."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointMismatchError(f"{path}: cannot be read as a torch checkpoint with weights_only=True ({e})") from e
    if isinstance(obj, dict):
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
    return obj


def load_weights(model: nn.Module, path: str | Path, strict: bool = True,
                 filter_fn: Optional[Callable[[dict, nn.Module], dict]] = None) -> dict:
    """Load weights into ``model``; on a mismatch raise :class:`CheckpointMismatchError` listing the keys.

    ``filter_fn(state_dict, model)`` (e.g. a timm ``checkpoint_filter_fn``) converts foreign key names first.
    Returns ``{"missing": [...], "unexpected": [...]}`` (empty lists after a strict load).
    """
    sd = read_state_dict(path)
    if filter_fn is not None:
        sd = filter_fn(sd, model)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shape = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if strict and (missing or unexpected or shape):
        def fmt(keys):
            return ", ".join(keys[:8]) + (f" ... (+{len(keys) - 8})" if len(keys) > 8 else "") if keys else "none"

        raise CheckpointMismatchError(
            f"{path} does not match {type(model).__name__}: missing keys: {fmt(missing)}; unexpected keys: "
            f"{fmt(unexpected)}; shape mismatches: "
            + (", ".join(f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in shape[:5]) or "none"))
    model.load_state_dict({k: v for k, v in sd.items() if k not in shape}, strict=False)
    return {"missing": missing, "unexpected": unexpected, "shape_mismatch": shape}


# ----------------------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, loader, preprocess: Optional[nn.Module] = None, fabric=None,
             max_batches: Optional[int] = None, device: Optional[torch.device] = None) -> dict:
    """Top-1 / top-5 (and CE loss) per output head. Keys: ``top1``/``top5``/``loss`` for one head, else
    ``top1_<head>`` etc. plus ``top1`` of the first head."""
    was = model.training
    model.eval()
    if device is None:
        device = fabric.device if fabric is not None else next(model.parameters()).device
    correct1 = correct5 = None
    loss_sum = None
    count = torch.zeros((), device=device, dtype=torch.float64)
    names = None
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if preprocess is not None:
            x = preprocess(x)
        with all_heads(model):
            outs = _as_list(model(x))
        if correct1 is None:
            n = len(outs)
            names = head_names_of(model, n)
            correct1 = torch.zeros(n, device=device, dtype=torch.float64)
            correct5 = torch.zeros(n, device=device, dtype=torch.float64)
            loss_sum = torch.zeros(n, device=device, dtype=torch.float64)
        for h, o in enumerate(outs):
            o = o.float()
            k = min(5, o.shape[-1])
            topk = o.topk(k, dim=-1).indices
            hit = topk.eq(y[:, None])
            correct1[h] += hit[:, 0].sum()
            correct5[h] += hit.any(dim=-1).sum()
            loss_sum[h] += nn.functional.cross_entropy(o, y, reduction="sum")
        count += y.numel()
    model.train(was)
    if correct1 is None:
        raise ValueError("evaluation loader is empty")
    if fabric is not None and fabric.world_size > 1:
        correct1, correct5, loss_sum, count = (fabric.all_reduce(t, reduce_op="sum")
                                               for t in (correct1, correct5, loss_sum, count))
    n = float(count)
    res = {}
    for h, name in enumerate(names):
        sfx = "" if len(names) == 1 else f"_{name}"
        res[f"top1{sfx}"] = 100.0 * float(correct1[h]) / n
        res[f"top5{sfx}"] = 100.0 * float(correct5[h]) / n
        res[f"loss{sfx}"] = float(loss_sum[h]) / n
    if len(names) > 1:
        res["top1"] = res[f"top1_{names[0]}"]
        res["top5"] = res[f"top5_{names[0]}"]
    res["n"] = int(n)
    bad = [k for k, v in res.items() if not math.isfinite(v)]
    if bad:
        raise TrainingDivergedError(
            f"evaluation gave non-finite {', '.join(f'{k}={res[k]}' for k in bad)} on {res['n']} samples: the model's "
            "outputs are NaN/inf (training diverged?). Lower lr, add warmup or gradient clipping (clip_grad).")
    return res


# ----------------------------------------------------------------------------------------------------------
# fit
# ----------------------------------------------------------------------------------------------------------
def _make_fabric(cfg: TrainConfig):
    from lightning_fabric import Fabric

    return Fabric(accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes, strategy=cfg.strategy,
                  precision=cfg.precision)


def _criterion(cfg: TrainConfig, mixing: bool):
    from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if cfg.loss == "bce":
        return BinaryCrossEntropy(smoothing=cfg.label_smoothing, sum_classes=cfg.bce_sum_classes)
    if mixing:
        return SoftTargetCrossEntropy()
    if cfg.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.label_smoothing)
    return nn.CrossEntropyLoss()


def _evaluate_epoch(model, val_dl, preprocess, fabric, epoch: int, which: str, peak_lr: float, global_step: int,
                    train_loss: float) -> dict:
    """:func:`evaluate` after an epoch; a non-finite validation loss/metric names the epoch, the global step and the
    configured learning rate."""
    try:
        return evaluate(model, val_dl, preprocess, fabric)
    except TrainingDivergedError as e:
        raise TrainingDivergedError(f"training diverged: validation of the {which}model after epoch {epoch + 1} "
                                    f"(global step {global_step}) with configured lr {peak_lr:.3g} failed (train loss "
                                    f"{train_loss:.4g}): {e}") from None


def _call_hooks(hooks, name, *args):
    for h in hooks:
        fn = getattr(h, name, None)
        if fn is not None:
            fn(*args)


@dataclass
class _Run:
    """What :func:`fit` sets up once (:func:`_setup_fit`) and its epochs share and update."""

    cfg: TrainConfig
    fabric: Any
    model: nn.Module  # as Fabric set it up (compiled / DDP-wrapped); ``raw_model`` is the caller's module
    raw_model: nn.Module
    optimizer: Any
    scheduler: Any
    train_dl: Any
    val_dl: Any
    device: torch.device
    preprocess: Optional[nn.Module]
    mixup_fn: Any
    loss_fn: Callable
    criterion: Optional[Callable]
    ema: Any
    hooks: list
    steps_per_epoch: int
    n_trainable: int
    ckpt_path: Optional[Path]
    desc: str
    start_epoch: int = 0
    end_epoch: int = 0  # epochs this run trains: cfg.epochs, fewer under cfg.max_steps
    global_step: int = 0
    history: list = field(default_factory=list)
    weights: Optional[list] = None
    last_lr: float = 0.0
    head_names: list = field(default_factory=list)
    step_time_total: float = 0.0
    eval_time_total: float = 0.0
    steps_done: int = 0
    images_done: int = 0


def _steps_per_epoch(cfg: TrainConfig, train_loader, fabric) -> int:
    # the loader is set up by Fabric; with DDP each rank sees len(loader) / world_size batches
    steps_per_epoch = math.ceil(len(train_loader) / fabric.world_size) if fabric.world_size > 1 else len(train_loader)
    if getattr(train_loader, "drop_last", False) and fabric.world_size > 1:
        steps_per_epoch = len(train_loader) // fabric.world_size
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch * cfg.grad_accum)
    if steps_per_epoch < 1:
        raise ValueError("the training loader yields no batches (dataset smaller than one batch with drop_last?)")
    return steps_per_epoch


def _make_scheduler(cfg: TrainConfig, optimizer, updates_per_epoch: int):
    warmup_epochs = cfg.warmup_epochs if cfg.warmup_steps is None else cfg.warmup_steps / updates_per_epoch
    warmup_t = int(round(warmup_epochs * updates_per_epoch))
    decay_t = max(1, (cfg.epochs - cfg.cooldown_epochs) * updates_per_epoch)
    if cfg.sched == "cosine":
        from timm.scheduler import CosineLRScheduler

        # per-update cosine to min_lr over the non-cooldown epochs, linear warmup from warmup_lr (timm semantics:
        # warmup replaces the start of the cosine), then min_lr during the cooldown epochs
        return CosineLRScheduler(optimizer, t_initial=decay_t, lr_min=cfg.min_lr, warmup_lr_init=cfg.warmup_lr,
                                 warmup_t=warmup_t, t_in_epochs=False, cycle_limit=1)
    if cfg.sched == "step":
        from timm.scheduler import StepLRScheduler

        return StepLRScheduler(optimizer, decay_t=max(1, decay_t // 3), decay_rate=0.1,
                               warmup_lr_init=cfg.warmup_lr, warmup_t=warmup_t, t_in_epochs=False)
    return None


def _make_mixup(cfg: TrainConfig, num_classes: Optional[int]):
    if not (cfg.mixup > 0 or cfg.cutmix > 0):
        return None
    from timm.data import Mixup

    if not num_classes:
        raise ValueError("Mixup/CutMix need num_classes (pass it or give the model a num_classes attribute)")
    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                 switch_prob=cfg.mixup_switch_prob, mode="batch", label_smoothing=cfg.label_smoothing,
                 num_classes=num_classes)


def _setup_fit(model, train_loader, val_loader, cfg: TrainConfig, hooks, preprocess, criterion, num_classes, fabric,
               desc) -> _Run:
    """Seed, optimizer, schedule, Fabric set-up of model and loaders, Mixup, loss, EMA, and the resume (in that
    order: the seeded RNG streams depend on it)."""
    from timm.optim import create_optimizer_v2

    from .repro import seed_everything

    fabric = fabric or _make_fabric(cfg)
    if fabric.world_size > 1 and not getattr(fabric, "_launched", False):
        fabric.launch()
    seed_everything(cfg.seed, rank=fabric.global_rank)
    raw_model = model
    num_classes = num_classes or getattr(model, "num_classes", None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters (all requires_grad=False)")
    n_trainable = sum(p.numel() for p in {id(p): p for p in trainable}.values())
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    momentum=cfg.momentum, filter_bias_and_bn=cfg.filter_bias_and_bn)
    steps_per_epoch = _steps_per_epoch(cfg, train_loader, fabric)
    scheduler = _make_scheduler(cfg, optimizer, max(1, steps_per_epoch // cfg.grad_accum))
    if cfg.compile:
        model = torch.compile(model)
    model, optimizer = fabric.setup(model, optimizer)
    loaders = fabric.setup_dataloaders(train_loader, *( [val_loader] if val_loader is not None else []))
    train_dl = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
    val_dl = loaders[1] if isinstance(loaders, (list, tuple)) and len(loaders) > 1 else None
    device = fabric.device
    if preprocess is not None:
        preprocess = preprocess.to(device)
    mixup_fn = _make_mixup(cfg, num_classes)
    loss_fn = _criterion(cfg, mixup_fn is not None)
    ema = None
    if cfg.ema_decay > 0:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(raw_model, decay=cfg.ema_decay, device=device)
    run = _Run(cfg=cfg, fabric=fabric, model=model, raw_model=raw_model, optimizer=optimizer, scheduler=scheduler,
               train_dl=train_dl, val_dl=val_dl, device=device, preprocess=preprocess,
               mixup_fn=mixup_fn, loss_fn=loss_fn, criterion=criterion, ema=ema, hooks=list(hooks),
               steps_per_epoch=steps_per_epoch, n_trainable=n_trainable, desc=desc,
               ckpt_path=Path(cfg.checkpoint_dir) / "last.ckpt" if cfg.checkpoint_dir else None)
    run.end_epoch = cfg.epochs
    if cfg.max_steps:
        run.end_epoch = min(cfg.epochs, math.ceil(cfg.max_steps / max(1, steps_per_epoch // cfg.grad_accum)))
    if cfg.resume and run.ckpt_path is not None and run.ckpt_path.is_file():
        _resume(run)
    return run


def _resume(run: _Run) -> None:
    """Load ``last.ckpt`` into the run: weights, optimizer, schedule, EMA, hooks, RNG states, epoch and history."""
    cfg, path = run.cfg, run.ckpt_path
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("epochs_planned") != cfg.epochs:
        raise ValueError(f"{path} was written for a {state.get('epochs_planned')}-epoch run, this run has "
                         f"{cfg.epochs} epochs; use a new checkpoint_dir or the same epochs")
    run.raw_model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scheduler is not None and state.get("scheduler"):
        run.scheduler.load_state_dict(state["scheduler"])
    if run.ema is not None and state.get("ema"):
        run.ema.module.load_state_dict(state["ema"])
    for h, hs in zip(run.hooks, state.get("hooks", [])):
        if hs is not None and hasattr(h, "load_state_dict"):
            h.load_state_dict(hs)
    rng = state["rng"]
    rank_file = _rank_rng_path(path, run.fabric.global_rank)
    if run.fabric.global_rank > 0 and rank_file.is_file():
        rank_state = torch.load(rank_file, map_location="cpu", weights_only=True)
        if rank_state.get("epoch") == state["epoch"]:  # written at the same epoch end as last.ckpt
            rng = rank_state["rng"]
    _set_rng_state(rng)
    run.start_epoch, run.global_step, run.history = state["epoch"] + 1, state["global_step"], list(state["history"])
    run.fabric.print(f"resumed from {path} at epoch {run.start_epoch}")


def _loss(run: _Run, out, target) -> torch.Tensor:
    outs = _as_list(out)
    if not run.head_names:
        run.head_names = head_names_of(run.raw_model, len(outs))
    if run.criterion is not None:
        return run.criterion(out, target)
    w = run.weights or [1.0] * len(outs)
    if len(w) != len(outs):
        raise ValueError(f"head_weights has {len(w)} entries, the model returns {len(outs)} heads")
    return sum(wi * run.loss_fn(o.float(), target) for wi, o in zip(w, outs))


def _train_step(run: _Run, x, target, accumulating: bool) -> tuple[torch.Tensor, float]:
    """Forward, backward and (unless accumulating) the optimizer update, schedule step and EMA update; returns the
    loss and the learning rate the step ran with."""
    cfg, model = run.cfg, run.model
    with run.fabric.no_backward_sync(model, enabled=accumulating), all_heads(run.raw_model):
        loss = _loss(run, model(x), target)
        step_lr = run.last_lr
        run.fabric.backward(loss / cfg.grad_accum)
    if not accumulating:
        if cfg.clip_grad:
            run.fabric.clip_gradients(model, run.optimizer, max_norm=cfg.clip_grad)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.global_step += 1
        if run.scheduler is not None:
            run.scheduler.step_update(num_updates=run.global_step)
        run.last_lr = run.optimizer.param_groups[0]["lr"]
        if run.ema is not None:
            run.ema.update(run.raw_model, step=run.global_step)
    return loss, step_lr


def _train_epoch(run: _Run, epoch: int) -> tuple[dict, float]:
    """One epoch of training steps; returns the epoch's history row (before evaluation) and its start time."""
    cfg, fabric, device = run.cfg, run.fabric, run.device
    sampler = getattr(run.train_dl, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    _call_hooks(run.hooks, "on_epoch_start", epoch, run.raw_model)
    run.model.train()
    t_epoch = time.perf_counter()
    timer = _StepTimer(device)
    losses = _LossWindow(cfg.finite_check_every, device, cfg.lr)
    it = _progress(run.train_dl, run.steps_per_epoch, f"{run.desc} {epoch + 1}/{cfg.epochs}", cfg.progress and
                   fabric.is_global_zero)
    for i, batch in enumerate(it):
        if i >= run.steps_per_epoch or (cfg.max_steps and run.global_step >= cfg.max_steps):
            break
        timer.start()
        x, y = batch
        if run.preprocess is not None:
            x = run.preprocess(x)
        for h in run.hooks:
            if hasattr(h, "on_batch"):
                x, y = h.on_batch((x, y))
        target = y
        if run.mixup_fn is not None:
            if x.shape[0] % 2:
                x, target = x[:-1], target[:-1]
            x, target = run.mixup_fn(x, target)
        accumulating = (i + 1) % cfg.grad_accum != 0
        try:
            loss, step_lr = _train_step(run, x, target, accumulating)
        except RuntimeError as e:
            if _is_oom(e) and not isinstance(e, TrainingDivergedError):
                raise OutOfMemoryError(f"out of memory at epoch {epoch + 1}, step {i + 1} with batch "
                                       f"{x.shape[0]} on {device}: reduce batch_size, use bf16-mixed precision or "
                                       "gradient accumulation (grad_accum)") from e
            raise
        timer.stop()
        # finiteness is checked when the window is read (every finite_check_every steps), not here
        losses.add(loss, epoch + 1, i + 1, run.global_step + (1 if accumulating else 0), step_lr)
        run.images_done += x.shape[0]
        if cfg.log_every and (i + 1) % cfg.log_every == 0:
            losses.drain()  # a log line reads the losses (one sync per log_every steps)
            fabric.print(f"epoch {epoch + 1} step {i + 1}: loss {losses.sum / losses.n:.4f} lr {run.last_lr:.3g}")
    if hasattr(it, "close"):
        it.close()
    losses.drain()
    ep_step_time = timer.total()
    run.steps_done += losses.n
    run.step_time_total += ep_step_time
    train_loss = losses.sum / max(1, losses.n)
    if fabric.world_size > 1:
        train_loss = float(fabric.all_reduce(torch.tensor(train_loss, device=device), reduce_op="mean"))
    row = {"epoch": epoch + 1, "train_loss": train_loss, "lr": run.last_lr, "steps": losses.n,
           "step_time_s": ep_step_time, "epoch_time_s": time.perf_counter() - t_epoch}
    return row, t_epoch


def _end_epoch(run: _Run, epoch: int, row: dict, t_epoch: float) -> None:
    """Evaluate (raw and EMA model) when due, append the row to the history, call the hooks, print and checkpoint."""
    cfg, fabric = run.cfg, run.fabric
    if run.val_dl is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == run.end_epoch):
        t_eval = time.perf_counter()
        metrics = _evaluate_epoch(run.model, run.val_dl, run.preprocess, fabric, epoch, "", cfg.lr, run.global_step,
                                  row["train_loss"])
        row.update({f"val_{k}": v for k, v in metrics.items() if k != "n"})
        if run.ema is not None:
            em = _evaluate_epoch(run.ema.module, run.val_dl, run.preprocess, fabric, epoch, "EMA ", cfg.lr,
                                 run.global_step, row["train_loss"])
            row.update({f"ema_{k}": v for k, v in em.items() if k != "n"})
        run.eval_time_total += time.perf_counter() - t_eval
    row["epoch_time_s"] = time.perf_counter() - t_epoch
    run.history.append(row)
    _call_hooks(run.hooks, "on_epoch_end", epoch, run.raw_model, row)
    if fabric.is_global_zero:
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()
                 if k in ("train_loss", "val_top1", "ema_top1", "lr", "epoch_time_s")}
        if cfg.progress or cfg.log_every:
            fabric.print(f"epoch {epoch + 1}/{cfg.epochs} {shown}")
    if run.ckpt_path is not None:
        _save_checkpoint(fabric, run.ckpt_path, run.raw_model, run.optimizer, run.scheduler, run.ema, run.hooks,
                         epoch, run.global_step, run.history, cfg)


def _epoch_seeder(train_loader) -> Callable[[int], None]:
    """Data order is a function of (loader seed, epoch) so that a resumed run sees the same batches (the base seed is
    remembered on the loader, so reusing one loader for several fit() calls is reproducible too)."""
    gen = getattr(train_loader, "generator", None)
    if gen is None:
        return lambda epoch: None
    gen_base = getattr(train_loader, "_tokenbook_base_seed", None)
    if gen_base is None:
        gen_base = gen.initial_seed()
        train_loader._tokenbook_base_seed = gen_base
    return lambda epoch: gen.manual_seed(gen_base + 1_000_003 * epoch)


def fit(model: nn.Module, train_loader, val_loader=None, cfg: Optional[TrainConfig] = None, hooks: Sequence = (),
        preprocess: Optional[nn.Module] = None, criterion: Optional[Callable] = None, num_classes: Optional[int] = None,
        fabric=None, desc: str = "train") -> FitResult:
    """Train ``model`` on ``train_loader`` and evaluate on ``val_loader`` after each epoch (see module doc).

    ``preprocess`` (e.g. ``DataBundle.preprocess``) runs on each batch on the device before hooks and Mixup.
    ``criterion(outputs, targets)`` replaces the built-in per-head loss. ``num_classes`` is needed for Mixup/BCE
    (read from the model's ``num_classes`` when not given).
    """
    import pandas as pd

    cfg = cfg or TrainConfig()
    run = _setup_fit(model, train_loader, val_loader, cfg, hooks, preprocess, criterion, num_classes, fabric, desc)
    _call_hooks(run.hooks, "on_fit_start", run.fabric, run.raw_model)
    run.weights = list(cfg.head_weights) if cfg.head_weights else None
    t_fit = time.perf_counter()
    run.last_lr = run.optimizer.param_groups[0]["lr"]
    seed_epoch = _epoch_seeder(train_loader)
    for epoch in range(run.start_epoch, run.end_epoch):
        seed_epoch(epoch)
        row, t_epoch = _train_epoch(run, epoch)
        _end_epoch(run, epoch, row, t_epoch)
    wall = time.perf_counter() - t_fit
    final = dict(run.history[-1]) if run.history else {}
    st, steps, images = run.step_time_total, run.steps_done, float(run.images_done)
    prior = run.history[:run.start_epoch]  # a resumed run: its earlier epochs' rows came with the checkpoint
    if prior:  # the run's timing covers every epoch, not only those after the resume
        per_step = images / steps if steps else float(cfg.batch_size * run.fabric.world_size)
        prior_steps = sum(int(r.get("steps", 0)) for r in prior)
        wall += sum(float(r.get("epoch_time_s", 0.0)) for r in prior)
        st += sum(float(r.get("step_time_s", 0.0)) for r in prior)
        steps, images = steps + prior_steps, images + prior_steps * per_step
    timing = {"wall_time_s": wall, "step_time_s": st, "eval_time_s": run.eval_time_total,
              "steps": steps, "step_ms": 1e3 * st / max(1, steps),
              "train_img_s": images / st if st else float("nan"),
              "resumed_at_epoch": run.start_epoch or None,
              "device": str(run.device), "world_size": run.fabric.world_size, "precision": cfg.precision,
              "capped_at_step": run.global_step if cfg.max_steps and run.global_step >= cfg.max_steps else None}
    return FitResult(model=run.raw_model, ema=run.ema.module if run.ema is not None else None,
                     history=pd.DataFrame(run.history), final=final, timing=timing, config=cfg,
                     trainable_params=run.n_trainable, head_names=run.head_names)


def fit_launched(model: nn.Module, train_loader, val_loader=None, cfg: Optional[TrainConfig] = None, **kw) -> FitResult:
    """``fit()``, launching the worker processes first for the fork/spawn strategies (``ddp_notebook``,
    ``ddp_fork``, ``ddp_spawn``): the only multi-device strategies a Jupyter kernel can start. The trained weights
    (and EMA) come back to this process as bytes; the returned model is the caller's, updated in place.

    Plain ``ddp`` with several devices is started by ``torchrun`` / ``fabric run`` from a script (Fabric then finds
    its processes already running); single-device runs are a plain ``fit()``.
    """
    import io

    cfg = cfg or TrainConfig()
    if str(cfg.strategy).startswith(("ddp_notebook", "ddp_fork", "ddp_spawn")):
        fabric = _make_fabric(cfg)
        if fabric.world_size > 1:
            def worker(f) -> dict:
                res = fit(model, train_loader, val_loader, cfg, fabric=f, **kw)

                def pack(m: Optional[nn.Module]) -> Optional[bytes]:
                    if m is None:
                        return None
                    buf = io.BytesIO()
                    torch.save({k: v.detach().cpu().clone() for k, v in m.state_dict().items()}, buf)
                    return buf.getvalue()

                # tensors shared through the result queue die with the worker: return bytes and plain data
                return {"model": pack(res.model), "ema": pack(res.ema), "history": res.history, "final": res.final,
                        "timing": res.timing, "trainable_params": res.trainable_params, "head_names": res.head_names}

            out = fabric.launch(worker)
            model.load_state_dict(torch.load(io.BytesIO(out["model"]), weights_only=True))
            ema = None
            if out["ema"] is not None:
                ema = copy.deepcopy(model)
                ema.load_state_dict(torch.load(io.BytesIO(out["ema"]), weights_only=True))
            return FitResult(model=model, ema=ema, history=out["history"], final=out["final"], timing=out["timing"],
                             config=cfg, trainable_params=out["trainable_params"], head_names=out["head_names"])
    return fit(model, train_loader, val_loader, cfg, **kw)


def _save_checkpoint(fabric, path: Path, model, optimizer, scheduler, ema, hooks, epoch, global_step, history, cfg):
    if fabric.is_global_zero:
        state = {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "ema": ema.module.state_dict() if ema is not None else None,
            "hooks": [h.state_dict() if hasattr(h, "state_dict") else None for h in hooks],
            "rng": _rng_state(), "epoch": epoch, "global_step": global_step, "history": history,
            "epochs_planned": cfg.epochs,
        }
        atomic_save(path, lambda tmp: torch.save(state, tmp))
    else:  # each other rank keeps its own RNG streams (dropout, drop-path), so a resumed DDP run is exact too
        rank_state = {"rng": _rng_state(), "epoch": epoch}
        atomic_save(_rank_rng_path(path, fabric.global_rank), lambda tmp: torch.save(rank_state, tmp))
    fabric.barrier()


def _rank_rng_path(path: Path, rank: int) -> Path:
    """Where rank ``rank`` (> 0) of a DDP run keeps its RNG states next to ``last.ckpt``."""
    return path.with_name(f"{path.name}.rng{rank}")
