"""The token arms of ``06_cross_paper`` through the workbook's run store (re-exported by
:mod:`tokenbook.experiments.cross_paper`; import them from there).

SeiT's token ViT (``seit``, ``seit_ta_ca``) and T2T-ViT on SeiT tokens (``t2t_tokens``) are runs of 04_seit's store
trainer (:func:`tokenbook.experiments.seit_runs.train_variant_run`) with this notebook's models (:func:`_model_kwargs`:
the pixel arms' width, depth and heads; T2T-ViT's depth and heads for ``t2t_tokens``), recipe (:func:`token_params`)
and batch hook (:func:`hook_settings`): keyed by everything that determines them, the token files by fingerprint,
trained once and read back by every later execution, like the pixel arms. The tokenizer and TokenAdapt f/g are runs of
the store too (:func:`tokenbook.experiments.seit.stored_tokens` / ``stored_tokenadapt`` with :func:`tokenizer_params`).
:func:`stored_token_arm` rebuilds a stored run as an :class:`ArmRun` (measured on an arm's first seed, as the pixel
arms), and :func:`heldout_token_loader` gives the ids of every held-out image for :func:`judge_heldout`.

Imports nothing of :mod:`tokenbook.experiments.cross_paper` (which imports this)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from tokenbook import bench
from tokenbook.experiments.cross_paper_arms import (ARMS, ArmRun, _model_kwargs, inference_numbers, own_seeds,
                                                    stored_row, token_params, training_compute)

__all__ = ["tokenizer_params", "hook_settings", "token_specs", "stored_token_arm", "heldout_token_loader",
           "token_grid"]


def token_grid(params: dict) -> int:
    """Side of the token map of a 28 px image: (28 + 2 x ``tokenizer_pad``) / ``tokenizer_downsample``."""
    side = 28 + 2 * int(params.get("tokenizer_pad", 0))
    down = int(params.get("tokenizer_downsample", 2))
    if side % down:
        raise ValueError(f"28 px padded by {params.get('tokenizer_pad', 0)} is not a multiple of the tokenizer's "
                         f"downsampling {down}")
    return side // down


def tokenizer_params(params: dict) -> dict:
    """This notebook's parameters in the names of 04_seit's tokenizer and TokenAdapt specs
    (:func:`tokenbook.experiments.seit_runs.tokenizer_spec` / ``tokenadapt_spec``)."""
    keys = ("codebook_size", "code_dim", "tokenizer_hidden", "tokenizer_steps", "tokenizer_batch", "tokenizer_lr",
            "seed", "crop", "ta_steps", "ta_batch", "ta_lr", "ta_dim", "ta_heads", "ta_dim_head")
    out = {k: params[k] for k in keys}
    out.update(tokenizer_downsample=int(params.get("tokenizer_downsample", 2)),
               tokenizer_pad=int(params.get("tokenizer_pad", 0)), ta_per_sample=True, ta_mix_prob=0.0,
               accelerator=str(params.get("accelerator", "auto")), executor="processes")
    return out


def hook_settings(params: dict) -> dict:
    """The SeiT batch hook of the token arms (:func:`tokenbook.experiments.seit_runs.make_hook`'s settings, as a run
    spec names them): ``crop``, ``rrc_scale_min``, Token-EDA, Emb-Noise, the SeiT part's CutMix, smoothing 0.1."""
    return {"crop": int(params["crop"]), "rrc_scale_min": float(params["rrc_scale_min"]), "per_sample": True,
            "token_eda": bool(params.get("token_eda", True)), "emb_noise": float(params.get("emb_noise", 1.0)),
            "cutmix": float(params.get("token_cutmix", 1.0)), "label_smoothing": 0.1, "ta_mix": True}


def token_specs(arms: Sequence[str], seeds: Sequence[int], params: dict, bundle: Any, tokens: Any,
                tokenadapt: Optional[nn.Module] = None, arm_seeds: Optional[dict] = None
                ) -> dict[tuple[int, str], Any]:
    """The :class:`tokenbook.runs.RunSpec` of every token arm and seed (``arm_seeds``: an arm listed there only for
    its own seeds), ``{(seed, arm): spec}``: 04_seit's trainer on ``tokens`` (their files, by fingerprint), with this
    notebook's model keywords, :func:`token_params` recipe and :func:`hook_settings`; a TokenAdapt arm names f/g
    saved beside the token files (:func:`tokenbook.experiments.seit_runs.save_tokenadapt`)."""
    from tokenbook.experiments import seit_runs as S
    from tokenbook.runs import RunSpec, fit_args

    keys = [k for k in arms if ARMS[k].input == "tokens"]
    if not keys:
        return {}
    if tokens is None:
        raise ValueError(f"arms {keys} train on tokens: pass the token data (prepare_tokens)")
    ref = S.token_ref(tokens)
    ta_ref = None
    if any(S.VARIANTS[ARMS[k].variant][2] for k in keys):
        if tokenadapt is None:
            raise ValueError("a TokenAdapt arm needs TokenAdapt f/g (prepare_tokens trains it)")
        ta_ref = S.save_tokenadapt(tokenadapt, Path(tokens.root) / "tokenadapt-06.pt")
    out = {}
    for s in seeds:
        for k in keys:
            if int(s) not in own_seeds(arm_seeds, k, seeds):
                continue
            arm = ARMS[k]
            cfg = S.train_config(token_params(params, int(s)), arm.variant)
            args = fit_args(arm.model, _model_kwargs(arm, params, int(tokens.num_classes)), bundle.config, cfg,
                            cfg.batch_size, int(params.get("num_workers", 0)), variant=arm.variant, seed=int(s),
                            tokens=dict(ref), tokenadapt=dict(ta_ref) if S.VARIANTS[arm.variant][2] else None,
                            hook=hook_settings(params))
            out[(int(s), k)] = RunSpec("tokenbook.experiments.seit_runs:train_variant_run", args,
                                       label=f"06 {k} seed {s}")
    return out


def stored_token_arm(key: str, seed: int, run: Any, params: dict, tokens: Any, measure: bool, latency: bool,
                     tokenadapt: Optional[nn.Module] = None) -> ArmRun:
    """An :class:`ArmRun` from a stored token-arm run (``run``: the store's record): the classifier rebuilt with its
    codebook; ``measure``: MACs of a training step (forward + backward, counted) plus the batch hook's per image,
    and inference numbers on embedded ids (an arm's first seed)."""
    from tokenbook.experiments import seit_runs as S

    arm, a = ARMS[key], run.spec.args
    model = S.rebuild_variant(a, run.output).model.cpu().eval()
    row = stored_row(key, seed, run.spec, run.output, model, run.source)
    if measure:
        h = a["hook"]
        tl, vl = S.token_loaders(tokens, int(row["batch_size"]), seed=int(seed), eda=bool(h["token_eda"]))
        hook = S.make_hook(arm.variant, tokens.codebook, int(tokens.num_classes), int(h["crop"]), tokenadapt,
                           float(h["rrc_scale_min"]), bool(h["per_sample"]), emb_noise=float(h["emb_noise"]),
                           cutmix=float(h["cutmix"]), label_smoothing=float(h["label_smoothing"]),
                           ta_mix=bool(h["ta_mix"]))
        batch_ = next(iter(tl))
        torch.manual_seed(0)
        with torch.no_grad():
            hook_macs = bench.count_call_macs(lambda: hook.on_batch(batch_)) / len(batch_[0])
        row.update(training_compute(model, arm, params, row, hook_macs=hook_macs))
        with torch.no_grad():
            example = model.embed_ids(next(iter(vl))[0][:2])
        row.update(inference_numbers(model, example, params, latency))
    return ArmRun(key, int(seed), row, run.output.history, model)


def heldout_token_loader(tokens: Any, heldout_bundle: Any, batch_size: int = 500):
    """The ids of every held-out image (:func:`tokenbook.experiments.seit.heldout_tokens`: the tokenizer that wrote
    the arms' tokens, into ``<token root>/heldout``), as an ordered loader of ``(ids, label)`` for
    :func:`judge_heldout`."""
    from tokenbook.experiments import seit as seit_exp

    data = seit_exp.heldout_tokens(tokens, heldout_bundle, Path(tokens.root) / "heldout")
    return seit_exp.token_loaders(data, batch_size, eda=False, eval_batch_size=batch_size)[1]
