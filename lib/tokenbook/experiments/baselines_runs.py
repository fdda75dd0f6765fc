"""The workbook's plain classifier run, kept apart from 00's report code so that its code version is small: one stored
run per (model, recipe, data, seed), which 00's small ViT, 01's ViT baseline, 03's full-token arm and 06's ViT all
ask for. A run's key names the code of its trainer's import closure (:func:`tokenbook.runs.code_version`), so this
module imports only what training needs: editing a report, a table or the ledger does not train these runs again.
Re-exported by :mod:`tokenbook.experiments.baselines`.
"""
from __future__ import annotations

from typing import Any

__all__ = ["canonical_model_kwargs", "classifier_spec", "train_classifier"]


# ----------------------------------------------------------------------------------------------------------
# the workbook's plain classifier run: one stored run per (model, recipe, data, seed) for 00, 01, 03 and 06
# ----------------------------------------------------------------------------------------------------------
def canonical_model_kwargs(model_name: str, model_kwargs: dict) -> dict:
    """``model_kwargs`` of ``timm.create_model(model_name, ...)`` without the keywords that say what the model's
    class would do anyway (the registered entry point's value, else the class's default: ``drop_path_rate=0.0``,
    ``img_size`` of a model registered at that size), so that two notebooks asking for the same model in two ways
    name the same run. Built on the meta device (no memory, no random draws)."""
    import inspect

    import timm
    import torch

    import tokenbook.models  # noqa: F401  (registers the workbook's models with timm)

    with torch.device("meta"):
        base = timm.create_model(model_name)
        defaults = inspect.signature(type(base).__init__).parameters
        return {k: v for k, v in model_kwargs.items() if not _builds_like(model_name, base, k, v, defaults)}


def _builds_like(model_name: str, base: Any, k: str, v: Any, defaults: Any) -> bool:
    """Does the keyword ``k=v`` leave ``model_name`` as its registered default builds it? True for a constructor
    default of the same value (``drop_path_rate=0.0``), or an architecture keyword that the registered model
    already has (``img_size=28`` for a 28 px model, ``num_classes`` equal to its head's)."""
    import inspect

    import timm

    if k == "num_classes":
        return getattr(base, "num_classes", None) == v
    if k == "img_size":
        got = getattr(getattr(base, "patch_embed", None), "img_size", None)
        want = tuple(v) if isinstance(v, (list, tuple)) else (v, v)
        return got is not None and tuple(got) == want
    if k in defaults and defaults[k].default is not inspect.Parameter.empty and defaults[k].default == v:
        try:  # the entry point may set it otherwise: build with it and compare the architecture
            other = timm.create_model(model_name, **{k: v})
        except TypeError:
            return False
        return repr(other) == repr(base)
    return False


def classifier_spec(model_name: str, model_kwargs: dict, data_config: Any, train_config: Any, batch_size: int,
                    num_workers: int = 0, label: str = "") -> Any:
    """The :class:`RunSpec` of the workbook's plain classifier run (:func:`train_classifier`): one timm model fitted
    from scratch on one data set. Every notebook that trains the same model with the same recipe, data, batch and
    seed (``train_config.seed``) asks for it through this function, so the store holds it once: 00's small ViT,
    01's ViT baseline and 03's full-token arm are one run at the workbook's cpu scale. The model keywords are
    canonical (:func:`canonical_model_kwargs`), the progress bar is off (it decides nothing)."""
    from tokenbook.runs import RunSpec, config_dict, fit_args

    train = config_dict(train_config)
    train["progress"] = False
    args = fit_args(model_name, canonical_model_kwargs(model_name, model_kwargs), data_config, train, batch_size,
                    num_workers)
    return RunSpec("tokenbook.experiments.baselines_runs:train_classifier", args,
                   label=label or f"{model_name} seed {train['seed']}")


def train_classifier(model_name: str, model_kwargs: dict, data: dict, train: dict, batch_size: int,
                     num_workers: int = 0) -> Any:
    """Trainer of :func:`classifier_spec` (in the kernel, a launcher process or a job), in the order every notebook
    used: load the data, make the loaders seeded with the run's seed, ``seed_everything(seed)``, build the model,
    ``fit_launched`` it (a plain ``fit`` on one device). Returns a :class:`TrainedRun`."""
    import timm

    import tokenbook.models  # noqa: F401
    from tokenbook import data as D
    from tokenbook.repro import seed_everything
    from tokenbook.runs import TrainedRun
    from tokenbook.train import TrainConfig, fit_launched

    dcfg, tcfg = D.DataConfig(**data), TrainConfig(**train)
    bundle = D.load_data(dcfg)
    tl, vl = D.make_loaders(bundle, batch_size, num_workers=num_workers, seed=tcfg.seed)
    seed_everything(tcfg.seed)
    model = timm.create_model(model_name, **model_kwargs)
    return TrainedRun.from_fit(fit_launched(model, tl, vl, tcfg, preprocess=bundle.preprocess, desc=model_name))
