"""03_toe's runs, kept apart from the notebook's report code so that their code version is small
(:func:`tokenbook.runs.code_version` hashes a trainer's import closure): one arm (full-token or ToE) of one seed,
built right after seeding (:func:`build_model`), fitted (:func:`_fit_arm`), specified for the run store
(:func:`arm_spec`), trained there (:func:`train_arm_run`) and rebuilt from the stored weights (:func:`rebuild_arm`).
06_cross_paper's ToE compositions are runs of the same trainer. Imports nothing of the reports, the ledger or
:mod:`tokenbook.results`. Re-exported by :mod:`tokenbook.experiments.toe` (import them from there).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch.nn as nn

from tokenbook.methods import toe


#: the store trainer of a ToE arm (:func:`train_arm_run`), as its specs name it
TRAINER = "tokenbook.experiments.toe_runs:train_arm_run"


@dataclass
class ToERun:
    """One training run: label, the fit result, and for the ToE run its stage hook and TokenSelect."""
    label: str
    result: Any
    hook: Optional[toe.ToEStageHook] = None
    token_select: Optional[toe.TokenSelect] = None


def _fit(model: nn.Module, train_loader: Any, val_loader: Any, cfg: Any, **kw: Any):
    """:func:`tokenbook.train.fit_launched`: ``fit``, with worker launch for ``ddp_notebook``/``ddp_spawn``."""
    from tokenbook.train import fit_launched

    return fit_launched(model, train_loader, val_loader, cfg, **kw)


def build_model(model_name: str, seed: int, toe_kwargs: Optional[dict] = None, block_index: int = 0,
                **model_kwargs: Any) -> nn.Module:
    """``timm.create_model`` right after seeding (identical initial weights for both runs), ToE attached if given."""
    import timm

    from tokenbook import models as _models  # noqa: F401  (registers the workbook's models)
    from tokenbook.repro import seed_everything

    seed_everything(seed)
    model = timm.create_model(model_name, **model_kwargs)
    if toe_kwargs is not None:
        toe.attach_token_select(model, block_index=block_index, **toe_kwargs)
    return model


def _fit_arm(model_name: str, train_loader: Any, val_loader: Any, cfg: Any, toe_kwargs: Optional[dict], *,
             preprocess: Optional[nn.Module] = None, block_index: int = 0,
             model_kwargs: Optional[dict] = None) -> ToERun:
    """One arm of :func:`train_pair`: ``"full-token"`` (``toe_kwargs`` None) or ``"ToE"`` (stages switched per epoch
    by a :class:`~tokenbook.methods.toe.ToEStageHook`), built right after seeding with ``cfg.seed``. The one training
    body of the kernel path and of the store's trainer :func:`train_arm_run`."""
    m = build_model(model_name, cfg.seed, toe_kwargs, block_index, **dict(model_kwargs or {}))
    if toe_kwargs is None:
        return ToERun("full-token", _fit(m, train_loader, val_loader, cfg, preprocess=preprocess, desc="full-token"))
    hook = toe.ToEStageHook()
    res = _fit(m, train_loader, val_loader, cfg, hooks=[hook], preprocess=preprocess, desc="ToE")
    if not hook.history:  # the epochs ran in worker processes: rebuild the per-epoch stages
        ts0 = toe.find_token_selects(m)[0]
        for e in range(cfg.epochs):
            s = toe.stage_for_epoch(ts0.expansion_step, e)
            hook.history.append((e, s, ts0.keep_rate[s - 1] if ts0.stage_active(s) else 1.0))
    return ToERun("ToE", res, hook, toe.find_token_selects(m)[0])


def arm_spec(model_name: str, model_kwargs: Optional[dict], toe_kwargs: Optional[dict], block_index: int,
             data_config: Any, train_config: Any, batch_size: int, seed: int, num_workers: int = 0, label: str = ""):
    """The :class:`tokenbook.runs.RunSpec` of one arm (``toe_kwargs`` None: full-token) for one seed: model, ToE,
    data, recipe (its ``seed`` set to ``seed``), batch and loader workers, everything that decides the run."""
    from tokenbook.experiments.baselines_runs import classifier_spec
    from tokenbook.runs import RunSpec, fit_args

    train = dataclasses.replace(train_config, seed=int(seed)) if not isinstance(train_config, dict) else \
        {**train_config, "seed": int(seed)}
    if toe_kwargs is None:  # the full-token arm is the workbook's plain classifier run (00's and 01's ViT too)
        return classifier_spec(model_name, model_kwargs or {}, data_config, train, batch_size, num_workers,
                               label=label or f"full-token {model_name} seed {seed}")
    args = fit_args(model_name, model_kwargs or {}, data_config, train, batch_size, num_workers,
                    toe_kwargs=toe_kwargs, block_index=int(block_index), seed=int(seed))
    arm = "full-token" if toe_kwargs is None else "ToE"
    return RunSpec(TRAINER, args, label=label or f"{arm} {model_name} seed {seed}")


def train_arm_run(model_name: str, model_kwargs: dict, toe_kwargs: Optional[dict], block_index: int, data: dict,
                  train: dict, batch_size: int, seed: int, num_workers: int = 0):
    """Trainer of :func:`arm_spec` (in the kernel, a launcher process or a job): load the data, loaders seeded with
    ``seed``, the arm built right after ``seed_everything(seed)`` and fitted (:func:`_fit_arm`, the kernel path's
    body). Returns a :class:`tokenbook.runs.TrainedRun`; ``extra["toe_hook"]`` is the ToE run's stage hook state
    (``history``: ``(epoch, stage, kept fraction)`` per epoch), None for the full-token arm."""
    from tokenbook import data as D
    from tokenbook.runs import TrainedRun
    from tokenbook.train import TrainConfig

    bundle = D.load_data(D.DataConfig(**data))
    cfg = TrainConfig(**{**train, "seed": int(seed)})
    tl, vl = D.make_loaders(bundle, batch_size, num_workers=num_workers, seed=int(seed))
    run = _fit_arm(model_name, tl, vl, cfg, toe_kwargs, preprocess=bundle.preprocess, block_index=block_index,
                   model_kwargs=model_kwargs)
    return TrainedRun.from_fit(run.result, toe_hook=run.hook.state_dict() if run.hook is not None else None)


def rebuild_arm(args: dict, out: Any, label: str = "") -> ToERun:
    """The :class:`ToERun` of a stored run (``args``: its spec's arguments, ``out``: its TrainedRun): the model from
    :func:`build_model` (ToE attached for the ToE arm) with the stored weights, on the CPU in training mode as
    ``fit`` leaves it; ``result`` a :class:`tokenbook.train.FitResult` (EMA copy rebuilt when stored); the hook's
    state restored (stage history, and the TokenSelect's last stage)."""
    import copy

    from tokenbook.train import FitResult, TrainConfig

    a = {"toe_kwargs": None, "block_index": 0, **args}  # a full-token arm is a plain classifier run (no ToE)
    seed = a.get("seed", a["train"]["seed"])
    model = out.load_into(build_model(a["model_name"], seed, a["toe_kwargs"], a["block_index"], **a["model_kwargs"]))
    ema = None
    if out.ema_state_dict is not None:
        ema = copy.deepcopy(model)  # a deep copy: ToE off, as in fit's EMA model
        ema.load_state_dict(out.ema_state_dict)
    res = FitResult(model=model, ema=ema, history=out.history, final=dict(out.final), timing=dict(out.timing),
                    config=TrainConfig(**a["train"]), trainable_params=out.trainable_params)
    if a["toe_kwargs"] is None:
        return ToERun(label or "full-token", res)
    ts = toe.find_token_selects(model)[0]
    hook = toe.ToEStageHook(ts)
    hook.load_state_dict(out.extra.get("toe_hook") or {})
    return ToERun(label or "ToE", res, hook, ts)
