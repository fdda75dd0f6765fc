"""What ``notebooks/04_seit.ipynb`` reports about its runs, split from :mod:`tokenbook.experiments.seit` (which
re-exports every name here) for its size; imports nothing of that module.

- :data:`VARIANTS` / :data:`PAPER_LABELS`: the ablation's rows and the paper's row labels.
- Seeds and claims (issue 12): :func:`seed_summary` (means, t-intervals, paired gains over SeiT),
  :func:`claims_evidence` (paired by seed, the plateau column from every run's validation curve, each arm judged
  against the logistic floor of its own input) and :func:`claims_commentary`; :func:`photo_storage` (SeiT's
  tokens against the JPEG files of real photographs, claim ``seit.storage_under_1pct``).
- Floors (issue 19): :func:`token_floor` (a logistic regression on the token embeddings of the same split, the
  floor of the token variants) beside ``tokenbook.floors``' pixel floors (:func:`arms_beside_floors`).
- Figures: :func:`plot_reconstructions`, :func:`plot_augmentations`, :func:`plot_synonyms`, :func:`plot_storage`.
- Tables: :func:`storage_table`, :func:`storage_vs_paper`, :func:`release_storage_table` (bytes per image),
  :func:`ablation_vs_paper`, :func:`accuracy_vs_storage`, :func:`paper_models_table` (ours beside the paper's).
- The recipe sweep behind the cpu profile (issue 19): :data:`RECIPE_SWEEP` (constants from
  ``scripts/seit_sweep.py``) as :func:`recipe_sweep_table`.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenbook.data import tokens as T
from tokenbook.methods.token_aug import ReplaceSynonym, SwapCode, apply_spatial, color_adapt, embed_ids, sample_spatial_params

__all__ = [
    "VARIANTS", "PAPER_LABELS", "CLAIM_ARMS", "seed_summary", "photo_storage", "sample_photos", "claims_evidence",
    "claims_commentary", "token_features", "token_floor", "token_floors_table", "floor_rows", "arms_beside_floors",
    "plot_reconstructions", "plot_augmentations", "plot_synonyms", "plot_storage", "SWEEP_TOKEN_FLOOR",
    "SWEEP_PIXEL_FLOOR", "SWEEP_BASE", "RECIPE_SWEEP", "recipe_sweep_table", "storage_table", "storage_vs_paper", "ablation_vs_paper",
    "accuracy_vs_storage", "release_storage_table", "paper_models_table",
]

PathLike = Union[str, os.PathLike]

# the variants and their paper labels live with the runs (seit_runs), re-exported here
from tokenbook.experiments.seit_runs import PAPER_LABELS, VARIANTS  # noqa: E402


def seed_summary(runs: Any, level: float = 0.95):
    """One row per variant from :func:`run_ablation_seeds`'s runs: the first seed's descriptive columns, ``top1`` =
    mean over seeds with its t-interval (``top1_ci_low/high``), the per-seed values (``top1_per_seed``, ``seeds``),
    and ``gain_vs_seit_pts`` = mean of the paired per-seed differences to SeiT with its interval. With one seed the
    intervals are NaN."""
    import pandas as pd

    from tokenbook.claims import mean_ci

    def ci(x):
        return mean_ci(x, level) if len(x) >= 2 else (float(np.mean(x)), float("nan"), float("nan"))

    base = runs[runs["variant"] == "seit"].set_index("seed")["top1"] if (runs["variant"] == "seit").any() else None
    rows = []
    for v in dict.fromkeys(runs["variant"]):
        r = runs[runs["variant"] == v].sort_values("seed")
        top = r["top1"].astype(float).tolist()
        m, lo, hi = ci(top)
        row = {**r.iloc[0].drop(labels=["seed", "top1", "gain_vs_seit_pts"], errors="ignore").to_dict(),
               "top1": m, "top1_ci_low": lo, "top1_ci_high": hi, "n_seeds": len(top),
               "seeds": ",".join(str(int(s)) for s in r["seed"]),
               "top1_per_seed": ", ".join(f"{t:.2f}" for t in top),
               "top5": float(r["top5"].astype(float).mean()), "train_wall_s": float(r["train_wall_s"].sum())}
        if base is not None and set(r["seed"]) <= set(base.index):
            g, glo, ghi = ci([t - float(base[s]) for s, t in zip(r["seed"], top)])
            row.update(gain_vs_seit_pts=g, gain_ci_low=glo, gain_ci_high=ghi)
        else:
            row.update(gain_vs_seit_pts=float("nan"), gain_ci_low=float("nan"), gain_ci_high=float("nan"))
        rows.append(row)
    return pd.DataFrame(rows)


def _kmeans_vq(patches: torch.Tensor, k: int, iters: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on (N, D) rows (init: k distinct rows drawn with a seeded generator); returns (codebook, ids).
    Updates are one-hot matmuls (deterministic; no scatter-add)."""
    g = torch.Generator().manual_seed(seed)
    x = patches.double()
    k = min(k, x.shape[0])
    c = x[torch.randperm(x.shape[0], generator=g)[:k]].clone()
    ids = torch.zeros(x.shape[0], dtype=torch.long)
    for _ in range(iters):
        ids = torch.cdist(x, c).argmin(1)
        oh = F.one_hot(ids, k).double()
        cnt = oh.sum(0)
        keep = cnt > 0
        c[keep] = (oh.t() @ x)[keep] / cnt[keep, None]
    return c.float(), torch.cdist(x, c.double()).argmin(1)


def photo_storage(paths: Optional[Sequence[PathLike]] = None, size: int = 256, grid: int = 32,
                  codebook_size: int = 391, kmeans_iters: int = 10, seed: int = 0, jpeg_quality: int = 95):
    """SeiT's token storage against JPEG on real photographs (claim ``seit.storage_under_1pct``), one row per photo.

    ``paths``: JPEG files (default :func:`sample_photos`: scikit-learn's china.jpg and flower.jpg, matplotlib's
    grace_hopper.jpg). Each photo is resized to ``size`` x ``size`` (SeiT tokenizes ImageNet at 256 px) and cut into
    a ``grid`` x ``grid`` grid of patches (8 x 8 RGB pixels at 256 / 32); the ids come from a k-means codebook of
    ``codebook_size`` codes over the patches of all photos, a stand-in for ViT-VQGAN (whose weights are not usable
    here; it also maps 256 px to 32 x 32 ids from 391 codes). The photo's share of SeiT's files: its escape-coded
    ids gzip'd on their own (so including a whole gzip header, an over-estimate against one stream for a split)
    plus its 8-byte int64 offset in the index. Columns: photo, native size, ``jpeg_file_bytes`` (the file as
    shipped), ``jpeg_resized_bytes`` (PIL re-encode of the 256 px resize at ``jpeg_quality``), ``token_bytes``,
    ``escape_bytes`` (ids before gzip), ``entropy_bound_bytes`` (grid^2 log2 K / 8), ``max_bytes`` (2 bytes per id
    + index, no gzip: the format's worst case), ``codes_used``, ``pct_of_jpeg`` (token_bytes / jpeg_file_bytes) and
    ``pct_of_resized_jpeg``."""
    import gzip as _gzip
    import math as _math

    import pandas as pd
    from PIL import Image

    paths = [Path(p) for p in (paths if paths is not None else sample_photos())]
    if size % grid:
        raise ValueError(f"size {size} is not a multiple of the grid {grid}")
    ps = size // grid
    arrs, rows = [], []
    for p in paths:
        im = Image.open(p).convert("RGB")
        small = im.resize((size, size), Image.BICUBIC)
        b = io.BytesIO()
        small.save(b, format="JPEG", quality=int(jpeg_quality))
        arrs.append(torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0))
        rows.append({"photo": p.name, "native_size": f"{im.size[0]}x{im.size[1]}", "jpeg_file_bytes": p.stat().st_size,
                     "jpeg_resized_bytes": b.tell()})
    x = torch.stack(arrs)                                                      # (N, H, W, 3)
    n = x.shape[0]
    patches = x.reshape(n, grid, ps, grid, ps, 3).permute(0, 1, 3, 2, 4, 5).reshape(n * grid * grid, -1)
    _, ids = _kmeans_vq(patches, codebook_size, kmeans_iters, seed)
    ids = ids.reshape(n, grid, grid).numpy().astype(np.uint16)
    for r, rid in zip(rows, ids):
        stream, _ = T.encode_ids(rid[None])
        tok = len(_gzip.compress(stream, compresslevel=9, mtime=0)) + 8
        r.update(grid=f"{grid}x{grid}", codebook=codebook_size, codes_used=int(np.unique(rid).size),
                 escape_bytes=len(stream), token_bytes=tok,
                 entropy_bound_bytes=grid * grid * _math.log2(codebook_size) / 8, max_bytes=2 * grid * grid + 8)
        r["pct_of_jpeg"] = 100.0 * tok / r["jpeg_file_bytes"]
        r["pct_of_resized_jpeg"] = 100.0 * tok / r["jpeg_resized_bytes"]
    return pd.DataFrame(rows)


def sample_photos() -> list[Path]:
    """Real photographs >= 256 px that installed packages ship: scikit-learn's china.jpg and flower.jpg (640 x 427)
    and matplotlib's grace_hopper.jpg (512 x 600)."""
    import matplotlib.cbook
    import sklearn.datasets

    d = Path(sklearn.datasets.__file__).parent / "images"
    return [d / "china.jpg", d / "flower.jpg", Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg",
                                                                                       asfileobj=False))]


def _show(ax, img: torch.Tensor, title: str = "") -> None:
    a = img.detach().float().cpu()
    a = a[0] if a.shape[0] == 1 else a.permute(1, 2, 0)
    ax.imshow(a.clamp(0, 1).numpy(), cmap="gray" if a.ndim == 2 else None, vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)


def _u8(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


@torch.no_grad()
def plot_reconstructions(tokenizer: T.VQTokenizer, images: torch.Tensor, labels: Optional[Sequence[str]] = None):
    """Rows: original, decoded from tokens, the id grid (colour = id), |error|; one column per image."""
    import matplotlib.pyplot as plt

    x = _u8(images)
    ids = T.tokenize_images(tokenizer, x)
    rec = T.decode_tokens(tokenizer, ids)
    n = x.shape[0]
    fig, axes = plt.subplots(4, n, figsize=(1.5 * n, 6.2), squeeze=False)
    for i in range(n):
        _show(axes[0, i], x[i], labels[i] if labels else "")
        _show(axes[1, i], rec[i])
        axes[2, i].imshow(ids[i].numpy(), cmap="tab20b", vmin=0, vmax=tokenizer.codebook_size - 1)
        axes[2, i].set_xticks([])
        axes[2, i].set_yticks([])
        _show(axes[3, i], (rec[i] - x[i]).abs())
    for r, t in enumerate(["original", "decoded tokens", "token ids", "|error|"]):
        axes[r, 0].set_ylabel(t, fontsize=8)
    fig.suptitle(f"VQ tokenizer: {ids.shape[-2]}x{ids.shape[-1]} ids per image, codebook "
                 f"{tokenizer.codebook_size}x{tokenizer.code_dim}", fontsize=9)
    fig.tight_layout()
    return fig


@torch.no_grad()
def plot_augmentations(tokenizer: T.VQTokenizer, tokenadapt: nn.Module, codebook: torch.Tensor,
                       images: torch.Tensor, seed: int = 0, per_sample: bool = True):
    """The same spatial augmentation in pixel space and in token space through f/g, all decoded to images.

    Columns: original; its tokens decoded; pixel augmentation A(x); tokens of A(x) decoded (TokenAdapt's training
    target); g(A(f(E[T]))) decoded (token-space augmentation); Emb-Noise and ColorAdapt (partner = reversed batch)
    on the embedding map, decoded through the nearest code.
    """
    import matplotlib.pyplot as plt

    from tokenbook.methods.token_aug import EmbeddingNoise

    gen = torch.Generator().manual_seed(seed)
    x = _u8(images)
    ids = T.tokenize_images(tokenizer, x)
    g_in, m = tokenadapt.in_grid, tokenadapt.out_grid
    ds = x.shape[-1] // g_in
    sp = sample_spatial_params(x.shape[0], 2 * g_in, 2 * g_in, per_sample=per_sample, generator=gen)
    xa = apply_spatial(x, sp, m * ds).clamp(0, 1)
    ta_target = T.decode_tokens(tokenizer, tokenizer.encode(xa))
    tokenadapt.eval()
    emb = embed_ids(ids, codebook)
    f = tokenadapt.forward_conversion(emb)
    new_ids = tokenadapt.forward_inversion(apply_spatial(f, sp, 2 * m))
    ta_out = T.decode_tokens(tokenizer, new_ids)

    def decode_map(e: torch.Tensor) -> torch.Tensor:  # nearest code by cosine, as the tokenizer's lookup
        cbn = F.normalize(codebook, dim=-1)
        nid = torch.argmax(F.normalize(e.permute(0, 2, 3, 1), dim=-1) @ cbn.t(), dim=-1)
        return T.decode_tokens(tokenizer, nid)

    noise = decode_map(EmbeddingNoise(prob=1.0)(emb, gen))
    ca = decode_map(color_adapt(emb, eps=1e-6))
    cols = [("original", x), ("tokens, decoded", T.decode_tokens(tokenizer, ids)), ("pixel aug A(x)", xa),
            ("tokens of A(x)\n(TA target)", ta_target), ("g(A(f(tokens)))\ndecoded", ta_out),
            ("Emb-Noise\ndecoded", noise), ("ColorAdapt\ndecoded", ca)]
    n = x.shape[0]
    fig, axes = plt.subplots(n, len(cols), figsize=(1.45 * len(cols), 1.5 * n + 0.5), squeeze=False)
    for c, (title, imgs) in enumerate(cols):
        for r in range(n):
            _show(axes[r, c], imgs[r], title if r == 0 else "")
    agree = float((new_ids == tokenizer.encode(xa)).float().mean())
    fig.suptitle(f"pixel vs token-space augmentation (same flip/affine/crop); f/g token agreement with the target "
                 f"{100 * agree:.0f}%", fontsize=8)
    fig.tight_layout()
    return fig


@torch.no_grad()
def plot_synonyms(tokenizer: T.VQTokenizer, synonyms: dict, images: torch.Tensor, probs: Sequence[float] = (0.25, 0.5, 1.0),
                  seed: int = 0):
    """Token-EDA decoded: synonym replacement at several per-token probabilities (top-5 neighbours) and a block
    swap, next to the tokens' own decoding."""
    import matplotlib.pyplot as plt

    gen = torch.Generator().manual_seed(seed)
    x = _u8(images)
    ids = T.tokenize_images(tokenizer, x)
    k = tokenizer.codebook_size
    cols = [("original", x), ("tokens, decoded", T.decode_tokens(tokenizer, ids))]
    for p in probs:
        rep = ReplaceSynonym(synonyms, top=5, prob=p, num_codes=k)
        cols.append((f"synonyms p={p:g}", T.decode_tokens(tokenizer, torch.stack([rep(i, gen) for i in ids]))))
    swap = SwapCode(scale=(0.2, 0.25))
    cols.append(("block swap", T.decode_tokens(tokenizer, torch.stack([swap(i, gen) for i in ids]))))
    n = x.shape[0]
    fig, axes = plt.subplots(n, len(cols), figsize=(1.45 * len(cols), 1.5 * n + 0.4), squeeze=False)
    for c, (title, imgs) in enumerate(cols):
        for r in range(n):
            _show(axes[r, c], imgs[r], title if r == 0 else "")
    fig.suptitle("Token-EDA on the id grid, decoded (synonyms = 5 nearest codes by cosine)", fontsize=8)
    fig.tight_layout()
    return fig


def plot_storage(storage: Any, summary: Any = None):
    """Bytes per image of each format, the paper's ImageNet storage (GB, log scale), and, with ``summary``, our
    top-1 against bytes per image."""
    import matplotlib.pyplot as plt

    from tokenbook import references

    refs = [r for r in references.load("seit") if r.metric == "storage_gb"]
    ncol = 3 if summary is not None else 2
    fig, axes = plt.subplots(1, ncol, figsize=(4.6 * ncol, 3.6))
    s = storage[~storage["format"].str.contains("entropy")]
    colors = ["tab:orange" if f.startswith("tokens") else "tab:blue" for f in s["format"]]
    axes[0].barh(s["format"], s["bytes_per_image"], color=colors)
    axes[0].invert_yaxis()
    axes[0].set_xlabel("bytes per image")
    axes[0].set_title("ours: default data", fontsize=9)
    axes[0].tick_params(axis="y", labelsize=7)
    axes[1].barh([r.model for r in refs], [r.value for r in refs],
                 color=["tab:orange" if "SeiT" in r.model else "tab:blue" for r in refs])
    axes[1].set_xscale("log")
    axes[1].invert_yaxis()
    axes[1].set_xlabel("GB, ImageNet-1k train (log)")
    axes[1].set_title("paper (third-party summary)", fontsize=9)
    axes[1].tick_params(axis="y", labelsize=7)
    if summary is not None:
        ax = axes[2]
        for _, r in summary.iterrows():
            ax.scatter(r["storage_bytes_per_image"], r["top1"], color="tab:blue" if r["input"] == "pixels"
                       else "tab:orange")
            ax.annotate(r["variant"], (r["storage_bytes_per_image"], r["top1"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xlim(0, 1.15 * float(summary["storage_bytes_per_image"].max()))
        ax.set_xlabel("bytes per training image")
        ax.set_ylabel("val top-1 (%)")
        ax.set_title("ours: accuracy vs storage", fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def token_features(data: Any, split: str, crop: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """``(X, y)``: the embedded ids of ``split`` (the codebook rows, centre-cropped to ``crop`` as the classifiers
    evaluate), one flattened row per image, and the labels."""
    from tokenbook.models.seit import embed_token_ids

    ts = data.train if split == "train" else data.val
    ids = torch.from_numpy(np.asarray(ts.ids).astype(np.int64))
    g = ids.shape[-1]
    crop = int(crop or g)
    x = embed_token_ids(data.codebook.float(), ids, crop)
    return x.reshape(x.shape[0], -1).numpy(), np.asarray(ts.labels)


def token_floor(data: Any, crop: Optional[int] = None, C: float = 0.01, max_iter: int = 100,
                seed: int = 0) -> dict:
    """The logistic-regression floor of the token variants: :func:`tokenbook.floors.logistic_floor`'s model
    (standardised features, multinomial, ``C``, ``max_iter``, one BLAS thread) on the embedded token maps
    (:func:`token_features`) of the same split. A token classifier below it has not learned its own input.
    ``{"model", "top1", "top5", "train_s", "params"}`` (top-1 in %)."""
    import time
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    t0 = time.perf_counter()
    xtr, ytr = token_features(data, "train", crop)
    xva, yva = token_features(data, "val", crop)
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed))
    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(xtr, ytr)
        top1 = 100.0 * float((clf.predict(xva) == yva).mean())
    lr = clf[-1]
    return {"model": "logistic regression on token embeddings", "top1": top1, "top5": None,
            "train_s": time.perf_counter() - t0, "params": int(lr.coef_.size + lr.intercept_.size)}


def token_floors_table(data: Any, crop: Optional[int] = None, seed: int = 0):
    """:func:`token_floor` as a one-row table shaped like :func:`tokenbook.floors.floors_table` (so that
    ``floors.logistic_top1`` and ``claims.paired_evidence(floors=...)`` read it)."""
    import pandas as pd

    df = pd.DataFrame([token_floor(data, crop, seed=seed)], columns=["model", "top1", "top5", "params", "train_s"])
    df.insert(1, "train_images", len(data.train))
    df.insert(2, "val_images", len(data.val))
    return df


def floor_rows(runs: Any) -> list[dict]:
    """One row per variant of :func:`run_ablation_seeds`'s runs for :func:`tokenbook.floors.beside_floors`
    (:func:`tokenbook.floors.arm_row`: mean and worst-seed top-1, parameters, mean training seconds), ``input``
    added."""
    from tokenbook.floors import arm_row

    rows = []
    for v in dict.fromkeys(runs["variant"]):
        r = runs[runs["variant"] == v]
        row = arm_row(f"{PAPER_LABELS[v]} ({v})", r["top1"].astype(float).tolist(), int(round(r["params_m"].iloc[0] * 1e6)),
                      r["train_wall_s"].astype(float).tolist())
        rows.append({**row, "input": VARIANTS[v][0]})
    return rows


def arms_beside_floors(runs: Any, pixel_floors: Any, token_floors: Any = None):
    """Every variant beside the floors of its split: the pixel floors (:func:`tokenbook.floors.floors_table`) and
    the token floor (:func:`token_floors_table`), one table; ``vs_logistic_floor_pts`` is the distance to the
    logistic floor of the row's own input (pixels or token embeddings)."""
    import pandas as pd

    from tokenbook.floors import beside_floors, logistic_top1

    floors_all = pixel_floors if token_floors is None else pd.concat([pixel_floors, token_floors], ignore_index=True)
    df = beside_floors(floor_rows(runs), floors_all)
    px, tk = logistic_top1(pixel_floors), logistic_top1(token_floors) if token_floors is not None else None
    df.loc[df["model"].eq("logistic regression on token embeddings"), "input"] = "tokens"
    df.loc[df["kind"].eq("floor") & df["input"].isna(), "input"] = "pixels"
    ref = df["input"].map({"pixels": px, "tokens": tk if tk is not None else float("nan")})
    df["vs_logistic_floor_pts"] = df["top1"] - ref
    return df


# ----------------------------------------------------------------------------------------------------------
# storage and the paper-vs-ours tables (moved here from experiments.seit for its size)
# ----------------------------------------------------------------------------------------------------------
def storage_table(images: torch.Tensor, data: TokenData, jpeg_qualities: Sequence[int] = (95, 75, 50, 25, 5)):
    """Bytes per image of the same images as raw pixels, PNG, JPEG and tokens (plus the real token files' size per
    training image). ``images`` must be the images whose tokens are ``data.val`` (the first ``len(images)``)."""
    import pandas as pd

    n = images.shape[0]
    rows = T.storage_report(images, np.asarray(data.val.ids[:n]), jpeg_qualities=jpeg_qualities,
                            codebook_size=int(data.codebook.shape[0]))
    p = data.train.paths
    if p is not None:
        sizes = p.sizes()
        per = sum(sizes.values()) / len(data.train)
        raw = rows[0]["bytes_per_image"]
        png = next(r for r in rows if r["format"] == "PNG")["bytes_per_image"]
        rows.append({"format": "tokens (train split files on disk)", "bytes_per_image": per,
                     "total_bytes": float(sum(sizes.values())), "n_images": len(data.train),
                     "pct_of_raw": 100 * per / raw, "pct_of_png": 100 * per / png})
    df = pd.DataFrame(rows)
    df.insert(1, "grid", [f"{data.grid[0]}x{data.grid[1]}" if r.startswith("tokens") else "" for r in df["format"]])
    return df


def storage_vs_paper(storage: Any, jpeg_quality: int = 95):
    """Tokens vs JPEG (the paper's "<1% of JPEG storage") and ImageNet GB, via ``paper_vs_ours``.

    Ours: gzip'd token stream + index per image over JPEG at ``jpeg_quality`` per image, in %. The ImageNet storage
    rows (GB) are the paper's only (third-party summary); ``ours`` is n/a there.
    """
    import pandas as pd

    from tokenbook.results import paper_vs_ours

    s = storage.set_index("format")["bytes_per_image"]
    tok = float(s["tokens (gzip stream + gzip index)"])
    jpg = float(s[f"JPEG q{jpeg_quality}"])
    ours = pd.DataFrame([
        {"model": "SeiT", "storage_pct_of_jpeg": 100 * tok / jpg, "storage_gb": None},
        {"model": "Full pixels (JPEG)", "storage_pct_of_jpeg": None, "storage_gb": None},
        {"model": "JPEG quality 5", "storage_pct_of_jpeg": 100 * float(s["JPEG q5"]) / jpg
         if "JPEG q5" in s else None, "storage_gb": None},
    ])
    df = paper_vs_ours(ours, "seit", metrics=["storage_pct_of_jpeg", "storage_gb"])
    return df[df["paper"].notna() | df["ours"].notna()].reset_index(drop=True)


def ablation_vs_paper(summary: Any):
    """Long paper-vs-ours table: our top-1 and gain over SeiT on the default data, the paper's ImageNet-100 ablation
    (ViT-S, Table C) and ImageNet-1k (ViT-B, 1.4 GB, Tables A/B) numbers and gains, with their sources.

    Top-1 values on different datasets are never subtracted: each metric row is either ours (paper n/a) or the
    paper's (ours n/a); only ``gain_vs_seit_pts`` has both, and its ``diff`` is ours minus the paper's gain.
    """
    from tokenbook.results import paper_vs_ours

    ours = summary[["model", "top1", "gain_vs_seit_pts"]].copy()
    ours["top1_in100"] = None
    ours["top1_in1k"] = None
    ours["top1_in1k_1.4GB"] = None
    df = paper_vs_ours(ours, "seit", metrics=["top1", "gain_vs_seit_pts", "top1_in100", "top1_in1k",
                                              "top1_in1k_1.4GB"])
    return df[df["paper"].notna() | df["ours"].notna()].reset_index(drop=True)


def accuracy_vs_storage(summary: Any):
    """Wide table, one row per variant: ours (top-1, gain, bytes per image) beside the paper's ImageNet numbers and
    their source kind. Paper values not in the references are ``None`` (shown n/a)."""
    import pandas as pd

    from tokenbook import references

    refs = {(r.model, r.metric): r for r in references.load("seit")}

    def ref(model: str, metric: str):
        r = refs.get((model, metric))
        return (r.value, f"{r.kind}: {r.source}") if r else (None, "n/a")

    rows = []
    for _, s in summary.iterrows():
        m = s["model"]
        in100, src100 = ref(m, "top1_in100")
        in1k, src1k = ref(m, "top1_in1k_1.4GB")
        if in1k is None:
            in1k, src1k = ref(m, "top1_in1k")
        gain, srcg = ref(m, "gain_vs_seit_pts")
        rows.append({"model": m, "input": s["input"], "ours_bytes_per_image": s["storage_bytes_per_image"],
                     "ours_top1": s["top1"], "ours_gain_vs_seit_pts": s["gain_vs_seit_pts"],
                     "paper_gain_vs_seit_pts": gain, "gain_diff_pts": (s["gain_vs_seit_pts"] - gain)
                     if gain is not None and s["gain_vs_seit_pts"] == s["gain_vs_seit_pts"] else None,
                     "paper_top1_in100_vit_s": in100, "paper_top1_in1k_vit_b": in1k,
                     "paper_source": "; ".join(sorted({x for x in (src100, src1k, srcg) if x != "n/a"})) or "n/a"})
    return pd.DataFrame(rows)


def release_storage_table(data: TokenData):
    """Storage of token files read from disk (no pixels at hand): bytes per record of each split's files, and of
    the decoded ``uint16`` ids held in memory."""
    import pandas as pd

    rows = []
    for split, ts in (("train", data.train), ("val", data.val)):
        if ts.paths is None:
            continue
        sizes = ts.paths.sizes()
        total = float(sum(sizes.values()))
        records = int(np.load(io.BytesIO(T._gunzip(ts.paths.index))).size - 1)
        rows.append({"format": f"tokens ({split} files on disk)", "grid": f"{ts.grid[0]}x{ts.grid[1]}",
                     "bytes_per_image": total / max(records, 1), "total_bytes": total, "n_images": records})
        rows.append({"format": f"tokens ({split}, decoded uint16)", "grid": f"{ts.grid[0]}x{ts.grid[1]}",
                     "bytes_per_image": 2.0 * ts.grid[0] * ts.grid[1], "total_bytes": 2.0 * ts.grid[0] * ts.grid[1]
                     * records, "n_images": records})
    return pd.DataFrame(rows)


def paper_models_table(names: Sequence[str], num_classes: int = 1000):
    """Params, MACs and FLOPs (attention counted) of the paper's token ViTs and their pixel counterparts, one forward
    of one image at the official input (tokens: 32x28x28, pixels: 3x224x224); ``num_patches`` / ``input_side`` are
    checked against the official code via ``paper_vs_ours``."""
    import pandas as pd
    import timm

    from tokenbook.bench import count_macs, count_params
    from tokenbook.models.seit import TOKEN_MODELS
    from tokenbook.results import paper_vs_ours

    rows = []
    for n in names:
        m = timm.create_model(n, num_classes=num_classes).eval()
        token = n in TOKEN_MODELS
        size = (m.in_chans, m.token_img_size, m.token_img_size) if token else (3, 224, 224)
        mc = count_macs(m, input_size=size)
        rows.append({"model": n, "input": "tokens" if token else "pixels", "input_shape": "x".join(map(str, size)),
                     "input_side": size[-1] if token else None, "num_patches": m.patch_embed.num_patches,
                     "params_m": count_params(m)["total"] / 1e6, "gmacs": mc["gmacs"], "gflops": mc["gflops"]})
        del m
    ours = pd.DataFrame(rows)
    return ours, paper_vs_ours(ours, "seit", metrics=["input_side", "num_patches"])


# ----------------------------------------------------------------------------------------------------------
# the recipe sweep behind the cpu profile (issue 19): constants, written down once, shown by the notebook
# ----------------------------------------------------------------------------------------------------------
#: the token floor of the sweep's split (logistic regression on the token embeddings, :func:`token_floor`, on the
#: cpu profile's 10,000 / 2,000 images and its 8x8 ids): what every sweep row is measured against
SWEEP_TOKEN_FLOOR = 84.45
#: the pixel floor of the same split (logistic regression on the pixels, ``tokenbook.floors``), the pixel row's floor
SWEEP_PIXEL_FLOOR = 84.60

#: the hook and recipe of the cpu profile before the sweep (``params/04_seit/cpu.yaml`` at 8d24937) in what the sweep
#: changed; the rest stayed: batch 128, AdamW wd 0.05, 1 warm-up epoch, cosine to 1e-5, label smoothing 0.1
SWEEP_BASE = {"token_eda": True, "rrc_scale_min": 0.35, "emb_noise": 0.25, "token_cutmix": 1.0, "epochs": 15,
              "lr": 0.002, "drop_path": 0.0}

#: the short sweep of the SeiT arm (seed 0, one torch thread on the shared 2-core machine, ``scripts/seit_sweep.py``
#: through :func:`tokenbook.experiments.seit.train_variant_run`): each row changes ``change`` from
#: :data:`SWEEP_BASE`; top-1 on the 2,000 validation images after the last epoch, the best epoch, and the plateau
#: gain of :func:`tokenbook.claims.plateau` (the last value minus the best before the last 20 % of the epochs); the
#: last row checks the pixel arm (``arm``) under the chosen epochs and drop path
RECIPE_SWEEP: list[dict] = [
    {"run": "base", "change": {}, "top1": 74.05, "best": 74.1, "last20": 0.85, "wall_s": 111.0,
     "note": "the recipe before the sweep: its stored cpu run (seed 0, processes x 1 thread)"},
    {"run": "eda_off",
     "change": {"token_eda": False},
     "top1": 73.0, "best": 73.0, "last20": 0.15, "wall_s": 164.4,
     "note": "Token-EDA off costs 1.05 pt: kept"},
    {"run": "rrc_off",
     "change": {"rrc_scale_min": 1.0},
     "top1": 82.0, "best": 82.05, "last20": 0.35, "wall_s": 152.5,
     "note": "the big cost: any crop below the whole 8x8 map resamples a few ids bicubically"},
    {"run": "noise_0",
     "change": {"emb_noise": 0.0},
     "top1": 78.65, "best": 78.65, "last20": 0.45, "wall_s": 159.7,
     "note": "Emb-Noise 0.25 costs 4.6 pt at our codebook's scale"},
    {"run": "cutmix_off",
     "change": {"token_cutmix": 0.0},
     "top1": 77.55, "best": 77.55, "last20": 0.05, "wall_s": 150.1,
     "note": "CutMix in the hook costs 3.5 pt at 15 epochs"},
    {"run": "rrc1_noise0",
     "change": {"rrc_scale_min": 1.0, "emb_noise": 0.0},
     "top1": 84.7, "best": 84.7, "last20": 0.8, "wall_s": 186.3,
     "note": "above the floor, still rising"},
    {"run": "rrc1_noise0.1",
     "change": {"rrc_scale_min": 1.0, "emb_noise": 0.1},
     "top1": 84.0, "best": 84.0, "last20": 1.0, "wall_s": 152.9,
     "note": "still rising"},
    {"run": "rrc1_noise0_ep20",
     "change": {"rrc_scale_min": 1.0, "emb_noise": 0.0, "epochs": 20},
     "top1": 85.15, "best": 85.4, "last20": 0.8, "wall_s": 179.6,
     "note": "with CutMix: still rising at 20 epochs"},
    {"run": "rrc1_noise0_cutmix0",
     "change": {"rrc_scale_min": 1.0, "emb_noise": 0.0, "token_cutmix": 0.0},
     "top1": 85.85, "best": 85.85, "last20": 0.6, "wall_s": 103.2,
     "note": "0.1 pt short of the plateau rule"},
    {"run": "rrc1_noise0_cutmix0_ep20",
     "change": {"rrc_scale_min": 1.0, "emb_noise": 0.0, "token_cutmix": 0.0, "epochs": 20},
     "top1": 84.65, "best": 84.9, "last20": -0.25, "wall_s": 135.8,
     "note": "plateaued, 0.2 pt above the floor (over-fits)"},
    {"run": "rrc1_noise0_cutmix0_lr3e-3",
     "change": {"rrc_scale_min": 1.0, "emb_noise": 0.0, "token_cutmix": 0.0, "lr": 0.003},
     "top1": 85.2, "best": 85.2, "last20": 0.75, "wall_s": 100.7,
     "note": "still rising"},
    {"run": "rrc1_noise0.1_cutmix0_ep20",
     "change": {"rrc_scale_min": 1.0, "emb_noise": 0.1, "token_cutmix": 0.0, "epochs": 20},
     "top1": 85.25, "best": 85.25, "last20": 0.45, "wall_s": 133.6,
     "note": "plateaued, +0.8 pt"},
    {"run": "rrc1_noise0_cutmix0_ep20_dp0.1",
     "change": {"rrc_scale_min": 1.0, "emb_noise": 0.0, "token_cutmix": 0.0, "epochs": 20, "drop_path": 0.1},
     "top1": 85.8, "best": 85.9, "last20": 0.2, "wall_s": 140.1,
     "note": "plateaued, +1.35 pt, without Emb-Noise"},
    {"run": "rrc1_noise0.1_cutmix0_ep20_dp0.1",
     "change": {"rrc_scale_min": 1.0, "emb_noise": 0.1, "token_cutmix": 0.0, "epochs": 20, "drop_path": 0.1},
     "top1": 85.4, "best": 85.45, "last20": 0.2, "wall_s": 147.7,
     "note": "chosen: plateaued, +0.95 pt; keeps Token-EDA, Emb-Noise and SeiT's drop path", "chosen": True},
    {"run": "pixel_ep20_dp0.1", "arm": "pixel",
     "change": {"epochs": 20, "drop_path": 0.1},
     "top1": 85.25, "best": 85.3, "last20": 0.2, "wall_s": 130.6,
     "note": "the pixel arm (00's recipe, no hook) at the chosen epochs and drop path: above its floor"},
]


#: the settings of the token hook and loader (not the pixel arm's)
_HOOK_KEYS = ("token_eda", "rrc_scale_min", "emb_noise", "token_cutmix")


def recipe_sweep_table(token_floor: float = SWEEP_TOKEN_FLOOR, pixel_floor: float = SWEEP_PIXEL_FLOOR):
    """:data:`RECIPE_SWEEP` as a table: the arm, every setting (the base's value where a row leaves it; the hook's
    settings do not apply to the pixel arm), final / best top-1, the plateau gain and verdict
    (:data:`tokenbook.claims.PLATEAU_TOL`), the distance to the logistic floor of the arm's input (``token_floor``,
    ``pixel_floor``) and whether the row is a usable recipe (above that floor and plateaued)."""
    import pandas as pd

    from tokenbook.claims import PLATEAU_TOL

    rows = []
    for r in RECIPE_SWEEP:
        ch, arm = r["change"], r.get("arm", "seit")
        floor = token_floor if arm != "pixel" else pixel_floor
        row = {"run": r["run"], "arm": arm, "change": ", ".join(f"{k}={v}" for k, v in ch.items()) or "(base)",
               **{k: None if arm == "pixel" and k in _HOOK_KEYS else ch.get(k, v) for k, v in SWEEP_BASE.items()},
               "top1": r["top1"], "best_top1": r["best"], "last20_gain_pts": r["last20"],
               "plateaued": r["last20"] < PLATEAU_TOL, "floor": floor, "vs_floor_pts": round(r["top1"] - floor, 2),
               "wall_s": r["wall_s"], "note": r.get("note", "")}
        row["usable"] = bool(row["plateaued"] and row["vs_floor_pts"] > 0)
        row["chosen"] = bool(r.get("chosen", False))
        rows.append(row)
    return pd.DataFrame(rows)


#: claim id -> (arm a variant, arm b variant) of the empirical ablation claims (``references/seit.yaml``)
CLAIM_ARMS = {
    "seit.tokens_approach_pixels": ("pixel", "seit"),
    "seit.coloradapt_gain": ("seit_ca", "seit"),
    "seit.tokenadapt_gain": ("seit_ta", "seit"),
    "seit.both_gain": ("seit_ta_ca", "seit"),
}


def claims_evidence(runs: Any, histories: dict, scale: str, photos: Any = None, report: str = "",
                    pixel_floors: Any = None, token_floors: Any = None) -> list:
    """Evidence for the sheet's testable claims: the four ablation claims paired by seed from ``runs``
    (:func:`run_ablation_seeds`; claims whose arms did not run are left out, so they show ``failed``), with
    ``plateau`` from the val top-1 curves of both arms over all seeds; and ``seit.storage_under_1pct`` from
    :func:`photo_storage` (``value``: the pooled token % of the JPEG files, a bound; the per-photo range in
    ``detail``).

    Floors (the failed-run rule of :func:`tokenbook.floors.failed_baseline_runs`): every arm is trained from scratch
    and judged against the logistic floor of its own input on the same split: a pixel arm against
    ``pixel_floors`` (:func:`tokenbook.floors.floors_table`), a token arm against ``token_floors``
    (:func:`token_floors_table`). A claim between two token arms passes ``token_floors`` to
    ``claims.paired_evidence``; the pixel-vs-SeiT claim joins the two arms' reasons."""
    from tokenbook import claims as C
    from tokenbook.floors import failed_baseline_runs

    ev = []
    per_seed: dict = {}
    for _, r in runs.iterrows():
        per_seed.setdefault(int(r["seed"]), {})[r["variant"]] = float(r["top1"])
    for cid, (a, b) in CLAIM_ARMS.items():
        if not any(a in d and b in d for d in per_seed.values()):
            continue
        curves = [list(h["val_top1"].dropna()) for (v, s), h in histories.items() if v in (a, b) and "val_top1" in h]
        detail = f"a = {a}, b = {b}: top-1 per seed {sorted(per_seed)}"
        floors_of = {"pixels": pixel_floors, "tokens": token_floors}
        kinds = {VARIANTS[a][0], VARIANTS[b][0]}
        if len(kinds) == 1:
            ev.append(C.paired_evidence(cid, per_seed, a, b, scale=scale, report=report, curves=curves,
                                        floors=floors_of[kinds.pop()], detail=detail))
            continue
        reasons = []
        for arm in (a, b):
            fl = floors_of[VARIANTS[arm][0]]
            if fl is not None:
                why = failed_baseline_runs({arm: {s: d[arm] for s, d in per_seed.items() if a in d and b in d}}, fl)
                if why:
                    reasons.append(why.replace("the logistic-regression floor", f"the {VARIANTS[arm][0]} "
                                               "logistic-regression floor"))
        ev.append(C.paired_evidence(cid, per_seed, a, b, scale=scale, report=report, curves=curves,
                                    failed_run="; ".join(reasons), detail=detail))
    if photos is not None and len(photos):
        agg = 100.0 * float(photos["token_bytes"].sum()) / float(photos["jpeg_file_bytes"].sum())
        agg_r = 100.0 * float(photos["token_bytes"].sum()) / float(photos["jpeg_resized_bytes"].sum())
        per = ", ".join(f"{p} {v:.2f}%" for p, v in zip(photos["photo"], photos["pct_of_jpeg"]))
        pct = photos["pct_of_jpeg"].astype(float)
        ev.append(C.Evidence(
            claim="seit.storage_under_1pct", value=agg,
            scale=(f"{len(photos)} real photos ({', '.join(photos['photo'])}) resized to 256 px, 32x32 ids from a "
                   f"391-code patch k-means VQ (stand-in for ViT-VQGAN), SeiT's escape-coded gzip'd format, vs the "
                   f"shipped JPEG files; pooled over the photos"),
            report=report, plateau="n/a (no training)",
            detail=(f"pooled over {len(photos)} photos: {agg:.2f}% of the JPEG files ({int(photos['token_bytes'].sum())}"
                    f" token bytes / {int(photos['jpeg_file_bytes'].sum())} JPEG bytes); per photo {pct.min():.2f}-"
                    f"{pct.max():.2f}% ({per}); {agg_r:.2f}% of JPEG q95 re-encodes at 256 px; token bytes per photo "
                    f"{', '.join(str(int(t)) for t in photos['token_bytes'])} (format worst case "
                    f"{int(photos['max_bytes'].iloc[0])})")))
    return ev


def claims_commentary(verdicts: Any, ta_token_acc: Optional[float] = None) -> str:
    """Markdown lines for the notebook under the verdict table: every contradicted or inconclusive empirical claim
    with its measured mean and interval; for the TokenAdapt claims, the f/g token accuracy that bounds what the
    TokenAdapt half-batch can carry (the hook and the augmentations follow naver-ai/tokenadapt ``engine.py``)."""
    lines = []
    for _, r in verdicts.iterrows():
        if r["verdict"] not in ("contradicted", "inconclusive") or r["kind"] != "empirical":
            continue
        line = (f"* `{r['claim']}` is **{r['verdict']}** here: mean a − b {r['ours']:+.2f}, 95 % interval "
                f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}] over n = {int(r['n'])}")
        if r["claim"] in ("seit.tokenadapt_gain", "seit.both_gain") and ta_token_acc is not None:
            line += (f". f/g reproduce {100 * ta_token_acc:.0f} % of the tokens of the pixel-augmented image at the "
                     f"end of their training, so about {100 * (1 - ta_token_acc):.0f} % of the ids of the TokenAdapt "
                     "half-batch differ from what the pixel augmentation would give")
            if ta_token_acc < 0.8:
                line += ("; the hook's order and augmentations match the official engine.py, so we read this as a "
                         "small-scale effect of an under-trained f/g, not a bug")
        lines.append(line + ".")
    return "\n".join(lines) if lines else "No empirical claim is contradicted or inconclusive in this run."
