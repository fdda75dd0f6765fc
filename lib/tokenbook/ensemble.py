"""Train several seeds of one architecture at once: :func:`fit_ensemble` (issue 19, item 5).

K models of the same architecture (each its own initialisation and its own data order: one loader per member, as
``make_loaders(bundle, batch, seed=s)`` gives) are trained as one batched model: ``torch.func.stack_module_state``
stacks their parameters along a new leading dimension, ``vmap(functional_call(...), randomness="different")`` runs
the K forwards as one (batched matmuls: fewer, larger kernels, which is what makes it faster on a small CPU), and one
optimizer steps the stacked parameters. The recipe is ``train.fit``'s, member by member:

- optimizer from timm's ``create_optimizer_v2`` with the parameter groups (weight-decay exclusions) it makes for ONE
  member (a stacked bias is 2-d, so the groups cannot be computed on the stack); only elementwise optimizers
  (AdamW, Adam, SGD/momentum/Nesterov) are accepted: their update of a stacked tensor is the update of each member;
- timm's warm-up + cosine (or step) schedule per update, as ``fit`` builds it;
- loss per member (cross-entropy, label smoothing, BCE, soft-target CE with timm Mixup/CutMix; several heads summed
  with ``head_weights``); Mixup draws from a numpy stream per member seeded as ``fit`` seeds it (``seed_everything``),
  so a member mixes its batches as it would alone;
- gradient clipping per member (the norm of member k's gradients, as ``clip_grad_norm_`` computes it for one model),
  never over the stack;
- EMA of parameters and buffers with timm ``ModelEmaV3``'s decay rule;
- ``preprocess`` on each member's batch; the loaders' data order reseeded per epoch exactly as ``fit`` does.

Each member gets a :class:`tokenbook.train.FitResult` (its history has ``fit``'s columns: train loss, lr, steps,
val/EMA top-1/top-5 per epoch), and the trained weights are written back into the caller's K models. The timing
columns (``step_time_s``, ``epoch_time_s``) are the ensemble's, shared by its members.

Not supported batched (refused with a ``ValueError``): hooks (ToE stages, SeiT batch transforms, anything that
changes a member's model or its token count), ``torch.compile``, mixed precision, several devices, checkpoints /
resume, non-elementwise optimizers (LAMB, LARS, ...: their trust ratios are per tensor). A non-finite loss of a
member raises :class:`tokenbook.train.TrainingDivergedError` naming the member and its seed.

Measured equivalence (``tests/test_ensemble.py``): with drop-path/dropout off, each member ends with the weights
``fit`` gives it alone up to float rounding (batched and single matmuls sum in different orders).

Shared core: imports only ``train``, ``repro`` and the field's libraries, never the paper code.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from .train import FitResult, TrainConfig, TrainingDivergedError, _criterion, all_heads, evaluate
from .train import _make_scheduler as _scheduler

__all__ = ["fit_ensemble", "ELEMENTWISE_OPTIMIZERS", "member_grad_norms"]

#: timm optimizer names whose update is elementwise (a stacked tensor updates as each member alone)
ELEMENTWISE_OPTIMIZERS = ("adamw", "adam", "sgd", "nesterov", "momentum")


def _refuse(cfg: TrainConfig, hooks: Sequence) -> None:
    bad = []
    if hooks:
        bad.append(f"hooks ({', '.join(type(h).__name__ for h in hooks)}): they act on one model (ToE stages, batch "
                   "transforms that may change the token count); train those seeds with train.fit")
    if cfg.compile:
        bad.append("compile=True")
    if str(cfg.precision) not in ("32-true", "32"):
        bad.append(f"precision={cfg.precision!r} (only 32-true)")
    if cfg.devices not in (1, "1", "auto") or cfg.num_nodes != 1 or cfg.strategy not in ("auto", None):
        bad.append(f"devices={cfg.devices!r}/num_nodes={cfg.num_nodes}/strategy={cfg.strategy!r} (one device only)")
    if cfg.checkpoint_dir or cfg.resume:
        bad.append("checkpoint_dir/resume")
    if cfg.opt.lower().split("_")[-1] not in ELEMENTWISE_OPTIMIZERS or cfg.opt.lower().startswith("lookahead"):
        bad.append(f"opt={cfg.opt!r} (only elementwise optimizers: {', '.join(ELEMENTWISE_OPTIMIZERS)})")
    if bad:
        raise ValueError("fit_ensemble cannot train these members batched: " + "; ".join(bad))


def _stacked_optimizer(cfg: TrainConfig, model0: nn.Module, stacked: dict[str, torch.Tensor]):
    """timm's optimizer over the stacked parameters, with the parameter groups timm makes for one member."""
    from timm.optim import create_optimizer_v2

    probe = create_optimizer_v2(model0, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                momentum=cfg.momentum, filter_bias_and_bn=cfg.filter_bias_and_bn)
    name_of = {id(p): n for n, p in model0.named_parameters()}
    groups = []
    for g in probe.param_groups:
        params = [stacked[name_of[id(p)]] for p in g["params"]]
        if params:
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": params})
    return create_optimizer_v2(groups, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)


def member_grad_norms(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-member L2 norm of stacked gradients (leading dimension K): member k's total norm over all its
    parameters, as ``torch.nn.utils.clip_grad_norm_`` computes it for one model."""
    per = torch.stack([torch.linalg.vector_norm(g.flatten(1), 2, dim=1) for g in grads])  # [n_params, K]
    return torch.linalg.vector_norm(per, 2, dim=0)


def _clip_per_member(grads: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    norms = member_grad_norms(grads)
    coef = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))
    return norms


def _write_back(models: Sequence[nn.Module], params: dict, buffers: dict) -> None:
    with torch.no_grad():
        for k, m in enumerate(models):
            for n, p in m.named_parameters():
                p.copy_(params[n][k])
            for n, b in m.named_buffers():
                if n in buffers:
                    b.copy_(buffers[n][k])


def _seed_base(loader) -> Optional[int]:
    """The loader generator's base seed, remembered on the loader as ``fit`` does (same attribute)."""
    gen = getattr(loader, "generator", None)
    if gen is None:
        return None
    base = getattr(loader, "_tokenbook_base_seed", None)
    if base is None:
        base = gen.initial_seed()
        loader._tokenbook_base_seed = base
    return base


def fit_ensemble(models: Sequence[nn.Module], train_loaders: Sequence, val_loaders=None,
                 cfg: Optional[TrainConfig] = None, preprocess: Optional[nn.Module] = None,
                 seeds: Optional[Sequence[int]] = None, criterion: Optional[Callable] = None,
                 num_classes: Optional[int] = None, hooks: Sequence = (), desc: str = "ensemble",
                 explicit_attention: bool = True) -> list[FitResult]:
    """Train ``models`` (K members of one architecture) together, batched, with ``fit``'s recipe (module doc).

    ``train_loaders``: one loader per member (its data order); ``val_loaders``: one per member, one shared loader or
    None. ``seeds[k]`` is member k's seed (``cfg.seed`` of the equivalent ``fit`` run: it seeds the member's Mixup
    stream and names it in errors; default ``cfg.seed + k``); the global torch RNG (dropout / drop-path, drawn
    independently per member by ``vmap(randomness="different")``) is seeded with ``seeds[0]``.
    ``explicit_attention``: timm attention modules (a ``fused_attn`` attribute) of the batched copy compute softmax
    attention with explicit matmuls instead of ``scaled_dot_product_attention``, which has no vmap batching rule on
    the CPU (torch falls back to a slow loop over the members); the same formula, rounded differently. The caller's
    models are left as they are.
    Returns one :class:`FitResult` per member; its ``model`` is the caller's model, updated in place."""
    import pandas as pd
    from torch.func import functional_call, stack_module_state, vmap

    from .repro import seed_everything

    cfg = cfg or TrainConfig()
    hooks = list(hooks)
    _refuse(cfg, hooks)
    models = list(models)
    k_members = len(models)
    if k_members < 1:
        raise ValueError("fit_ensemble needs at least one model")
    train_loaders = list(train_loaders)
    if len(train_loaders) != k_members:
        raise ValueError(f"{k_members} models but {len(train_loaders)} train loaders (one per member)")
    if val_loaders is None or not isinstance(val_loaders, (list, tuple)):
        val_loaders = [val_loaders] * k_members
    if len(val_loaders) != k_members:
        raise ValueError(f"{k_members} models but {len(val_loaders)} validation loaders")
    seeds = [cfg.seed + k for k in range(k_members)] if seeds is None else [int(s) for s in seeds]
    if len(seeds) != k_members:
        raise ValueError(f"{k_members} models but {len(seeds)} seeds")
    ref = models[0]
    shapes = {n: tuple(v.shape) for n, v in ref.state_dict().items()}
    for k, m in enumerate(models[1:], 1):
        if type(m) is not type(ref) or {n: tuple(v.shape) for n, v in m.state_dict().items()} != shapes:
            raise ValueError(f"member {k} (seed {seeds[k]}) is not the same architecture as member 0: "
                             f"{type(m).__name__} vs {type(ref).__name__} or different parameter shapes")
    device = next(ref.parameters()).device
    if any(p.device != device for m in models for p in m.parameters()):
        raise ValueError("all members must be on one device")
    lengths = [len(dl) for dl in train_loaders]
    steps_per_epoch = min(lengths)
    if len(set(lengths)) > 1:
        raise ValueError(f"the members' train loaders have different lengths {lengths}: give them the same dataset "
                         "and batch size (one seed per loader)")
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch * cfg.grad_accum)
    if steps_per_epoch < 1:
        raise ValueError("the training loaders yield no batches (dataset smaller than one batch with drop_last?)")
    updates_per_epoch = max(1, steps_per_epoch // cfg.grad_accum)
    num_classes = num_classes or getattr(ref, "num_classes", None)

    seed_everything(seeds[0])
    trainable = {n for n, p in ref.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError("the model has no trainable parameters (all requires_grad=False)")
    n_trainable = sum(p.numel() for n, p in ref.named_parameters() if n in trainable)
    params, buffers = stack_module_state(models)
    params = {n: (p.detach().clone().requires_grad_(n in trainable)) for n, p in params.items()}
    buffers = {n: b.detach().clone() for n, b in buffers.items()}
    train_params = [params[n] for n in params if n in trainable]
    optimizer = _stacked_optimizer(cfg, ref, params)
    scheduler = _scheduler(cfg, optimizer, updates_per_epoch)
    base = copy.deepcopy(ref)
    if explicit_attention:
        for mod in base.modules():
            if isinstance(getattr(mod, "fused_attn", None), bool):
                mod.fused_attn = False

    def one(p, b, x):
        return functional_call(base, (p, b), (x,))

    forward = vmap(one, in_dims=(0, 0, 0), randomness="different")
    if preprocess is not None:
        preprocess = preprocess.to(device)
    mixup_fn = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        from timm.data import Mixup

        if not num_classes:
            raise ValueError("Mixup/CutMix need num_classes (pass it or give the model a num_classes attribute)")
        mixup_fn = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                         switch_prob=cfg.mixup_switch_prob, mode="batch", label_smoothing=cfg.label_smoothing,
                         num_classes=num_classes)
    np_states = [np.random.RandomState(s % 2**32).get_state() for s in seeds]  # = np.random.seed(s), as fit
    loss_fn = _criterion(cfg, mixup_fn is not None)
    weights = list(cfg.head_weights) if cfg.head_weights else None

    ema_state = ema_models = None
    if cfg.ema_decay > 0:
        from timm.utils import ModelEmaV3

        ema_rule = ModelEmaV3(ref, decay=cfg.ema_decay)  # its get_decay(step) is fit's EMA rule
        ema_state = {**{n: p.detach().clone() for n, p in params.items()},
                     **{n: b.clone() for n, b in buffers.items()}}
        ema_models = [copy.deepcopy(m) for m in models]

    bases = [_seed_base(dl) for dl in train_loaders]
    history: list[list[dict]] = [[] for _ in range(k_members)]
    head_names: list[str] = []
    global_step = steps_done = images_done = 0
    step_time_total = eval_time_total = 0.0
    last_lr = optimizer.param_groups[0]["lr"]
    t_fit = time.perf_counter()
    for epoch in range(cfg.epochs):
        for dl, b0 in zip(train_loaders, bases):
            if b0 is not None:
                dl.generator.manual_seed(b0 + 1_000_003 * epoch)
        base.train()
        t_epoch = time.perf_counter()
        ep_step = 0.0
        win = torch.zeros(cfg.finite_check_every, k_members, device=device)
        win_meta: list[tuple[int, float]] = []
        loss_sum = np.zeros(k_members)
        loss_n = 0

        def drain():
            nonlocal win_meta, loss_n
            if not win_meta:
                return
            vals = win[:len(win_meta)].tolist()
            for row, (step, lr) in zip(vals, win_meta):
                for k, v in enumerate(row):
                    if not math.isfinite(v):
                        raise TrainingDivergedError(
                            f"member {k} (seed {seeds[k]}): loss is {v} at epoch {epoch + 1}, step {step}; last "
                            f"learning rate {lr:.3g}. Lower lr, add warmup or gradient clipping (clip_grad).")
                loss_sum[:] += np.asarray(row)
            loss_n += len(win_meta)
            win_meta = []

        for i, batches in enumerate(zip(*train_loaders)):
            if i >= steps_per_epoch:
                break
            t0 = time.perf_counter()
            xs, ts = [], []
            for k, (x, y) in enumerate(batches):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if preprocess is not None:
                    x = preprocess(x)
                target = y
                if mixup_fn is not None:
                    if x.shape[0] % 2:
                        x, target = x[:-1], target[:-1]
                    saved = np.random.get_state()
                    np.random.set_state(np_states[k])
                    x, target = mixup_fn(x, target)
                    np_states[k] = np.random.get_state()
                    np.random.set_state(saved)
                xs.append(x)
                ts.append(target)
            if len({x.shape for x in xs}) > 1:
                raise ValueError(f"the members' batches differ in shape at step {i + 1}: "
                                 f"{[tuple(x.shape) for x in xs]}")
            accumulating = (i + 1) % cfg.grad_accum != 0
            with all_heads(base):
                out = forward(params, buffers, torch.stack(xs))
            outs = list(out) if isinstance(out, (tuple, list)) else [out]
            outs = [o for o in outs if torch.is_tensor(o)]
            if not head_names:
                from .train import head_names_of

                head_names = head_names_of(ref, len(outs))
            member_losses = []
            for k in range(k_members):
                if criterion is not None:
                    o_k = type(out)(o[k] for o in out) if isinstance(out, (tuple, list)) else out[k]
                    member_losses.append(criterion(o_k, ts[k]))
                else:
                    w = weights or [1.0] * len(outs)
                    if len(w) != len(outs):
                        raise ValueError(f"head_weights has {len(w)} entries, the model returns {len(outs)} heads")
                    member_losses.append(sum(wi * loss_fn(o[k].float(), ts[k]) for wi, o in zip(w, outs)))
            losses = torch.stack(member_losses)
            step_lr = last_lr
            (losses.sum() / cfg.grad_accum).backward()
            if not accumulating:
                grads = [p.grad for p in train_params if p.grad is not None]
                if cfg.clip_grad:
                    _clip_per_member(grads, cfg.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                global_step += 1
                if scheduler is not None:
                    scheduler.step_update(num_updates=global_step)
                last_lr = optimizer.param_groups[0]["lr"]
                if ema_state is not None:
                    decay = ema_rule.get_decay(global_step)
                    with torch.no_grad():
                        cur = {**params, **buffers}
                        fl = [n for n, v in ema_state.items() if v.is_floating_point()]
                        torch._foreach_lerp_([ema_state[n] for n in fl], [cur[n].detach() for n in fl],
                                             weight=1.0 - decay)
                        for n, v in ema_state.items():
                            if not v.is_floating_point():
                                v.copy_(cur[n])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            ep_step += time.perf_counter() - t0
            win[len(win_meta)] = losses.detach().float()
            win_meta.append((i + 1, step_lr))
            if len(win_meta) == cfg.finite_check_every:
                drain()
            images_done += xs[0].shape[0] * k_members
        drain()
        steps_done += loss_n
        step_time_total += ep_step
        _write_back(models, params, buffers)
        rows = [{"epoch": epoch + 1, "train_loss": float(loss_sum[k] / max(1, loss_n)), "lr": last_lr,
                 "steps": loss_n, "step_time_s": ep_step} for k in range(k_members)]
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            t_eval = time.perf_counter()
            if ema_models is not None:
                _write_back(ema_models, {n: ema_state[n] for n in params}, {n: ema_state[n] for n in buffers})
            for k in range(k_members):
                if val_loaders[k] is None:
                    continue
                for which, m, pre in (("val", models[k], "val_"), ("EMA", None if ema_models is None else
                                                                   ema_models[k], "ema_")):
                    if m is None:
                        continue
                    try:
                        met = evaluate(m, val_loaders[k], preprocess, device=device)
                    except TrainingDivergedError as e:
                        raise TrainingDivergedError(f"member {k} (seed {seeds[k]}), epoch {epoch + 1}: {which} "
                                                    f"evaluation failed: {e}") from None
                    rows[k].update({f"{pre}{n}": v for n, v in met.items() if n != "n"})
            eval_time_total += time.perf_counter() - t_eval
        for k in range(k_members):
            rows[k]["epoch_time_s"] = time.perf_counter() - t_epoch
            history[k].append(rows[k])
        if cfg.progress or cfg.log_every:
            print(f"{desc} epoch {epoch + 1}/{cfg.epochs} train_loss "
                  f"{[round(r['train_loss'], 4) for r in rows]} top1 {[round(r.get('val_top1', float('nan')), 2) for r in rows]}")
    wall = time.perf_counter() - t_fit
    timing = {"wall_time_s": wall, "step_time_s": step_time_total, "eval_time_s": eval_time_total,
              "steps": steps_done, "step_ms": 1e3 * step_time_total / max(1, steps_done),
              "train_img_s": images_done / step_time_total if step_time_total else float("nan"),
              "device": str(device), "world_size": 1, "precision": cfg.precision, "ensemble_size": k_members}
    out_results = []
    for k in range(k_members):
        ck = copy.copy(cfg)
        ck.seed = seeds[k]
        out_results.append(FitResult(model=models[k], ema=None if ema_models is None else ema_models[k],
                                     history=pd.DataFrame(history[k]), final=dict(history[k][-1]), timing=timing,
                                     config=ck, trainable_params=n_trainable, head_names=head_names))
    return out_results
