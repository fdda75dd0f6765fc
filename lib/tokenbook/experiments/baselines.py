"""Experiments of the notebook ``00_baselines`` (the template every paper notebook follows): the efficiency table of
timm's reference ViTs beside their published params/MACs, the summary of a small ViT trained on the default data, and
the attention-map figure.

- :func:`efficiency` / :func:`vs_published`: params, MACs (attention counted) and same-run latency of timm models,
  and the published numbers of ``references/baselines.yaml`` beside them.
- :func:`small_vit_summary`: one row with the trained model's accuracy, size, compute and training speed.
- :func:`attention_figure`: class-token attention per head in the last block and attention rollout.
"""
from __future__ import annotations

from typing import Any, Sequence

import pandas as pd
import torch
import torch.nn as nn

from tokenbook import bench, viz
from tokenbook.results import paper_vs_ours

__all__ = ["parse_models", "efficiency", "vs_published", "small_vit_summary", "attention_figure"]

PAPER = "baselines"


def parse_models(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]`` (the notebook's comma-separated model list)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError("no model names given (eff_models is empty)")
    return names


def efficiency(names: Sequence[str], img_size: int = 224, latency: bool = True, batch_size: int = 1,
               device: str = "cpu", min_run_time: float = 1.0) -> pd.DataFrame:
    """:func:`tokenbook.bench.efficiency_table` of timm models by name; ratios against the last one."""
    import timm

    return bench.efficiency_table({n: timm.create_model(n) for n in names}, input_size=(3, img_size, img_size),
                                  latency=latency, batch_size=batch_size, device=device, min_run_time=min_run_time,
                                  baseline=names[-1])


def vs_published(eff: pd.DataFrame) -> pd.DataFrame:
    """Params (M) and GMACs of :func:`efficiency` beside the published values, with sources and differences."""
    return paper_vs_ours(eff, PAPER, metrics=["params_m", "gmacs"])


def small_vit_summary(model: nn.Module, model_name: str, dataset: str, bundle: Any, result: Any, epochs: int,
                      img_size: int) -> pd.DataFrame:
    """One row: the trained small ViT's top-1/top-5 (raw and EMA), params, MACs and training speed."""
    return pd.DataFrame([{
        "model": model_name, "dataset": dataset, "train_images": len(bundle.train), "val_images": len(bundle.val),
        "epochs": epochs, "top1": result.final.get("val_top1"), "top5": result.final.get("val_top5"),
        "ema_top1": result.final.get("ema_top1"), "params_m": bench.count_params(model)["total"] / 1e6,
        "gmacs": bench.count_macs(model, input_size=(3, img_size, img_size))["gmacs"],
        "train_wall_s": result.timing["wall_time_s"], "train_step_s": result.timing["step_time_s"],
        "step_ms": result.timing["step_ms"], "train_img_s": result.timing["train_img_s"],
        "device": result.timing["device"],
    }])


def attention_figure(model: nn.Module, bundle: Any, num_images: int, title: str):
    """Class-token attention per head of the last block and attention rollout on the first validation images."""
    x = torch.stack([bundle.val[i][0] for i in range(num_images)])
    xb = bundle.preprocess(x)
    maps = viz.attention_maps(model.cpu(), xb)
    last = viz.cls_attention(maps[-1])  # (B, heads, g, g)
    roll = viz.cls_attention(viz.attention_rollout(maps)[:, None])[:, 0]
    imgs = [viz.to_display(im, bundle.mean, bundle.std) for im in xb]
    return viz.plot_maps(imgs, [[*last[i], roll[i]] for i in range(len(imgs))],
                         row_titles=[bundle.class_names[int(bundle.val[i][1])] for i in range(len(imgs))],
                         col_titles=[f"head {h}" for h in range(last.shape[1])] + ["rollout"],
                         suptitle=f"{title}: class-token attention (last block) and rollout")
