"""Token-space augmentations of SeiT and TokenAdapt/ColorAdapt, and the batch-level hook for ``tokenbook.train.fit``.

Reference sheet: ``../shared/papers/seit_tokenadapt.md`` (sections 1.4, 2.4-2.6). What runs where:

- Per sample, on the integer id grid inside the Dataset: :class:`TokenEDA` (synonym replacement from a synonym
  dictionary in the release's JSON form, or a block swap, or nothing). Synonym replacement is vectorized (the
  official code loops over the 1024 positions in Python).
- Per batch, on the float embedding map (B, D, H, W), in :class:`TokenBatchAugment`: codebook lookup, Emb-Noise or
  ColorAdapt (one choice per batch), random resized crop, CutMix (timm ``Mixup``), and for half of the batch the
  TokenAdapt path f -> spatial augmentation -> Mixup/CutMix -> g -> codebook.

Deliberate differences from the official code (all documented at the class):

- SeiT crops the *one-hot* (391, 32, 32) map with bicubic interpolation before the codebook matmul; bicubic
  resizing and the codebook product are both linear, so we gather embeddings first and crop the (D, 32, 32) map:
  the same numbers for 12x fewer channels.
- The official TokenAdapt flip/affine draw one parameter set for the whole half-batch (torchvision transforms on a
  4-D tensor). The issue asks for per-sample augmentation: :class:`FSpaceAugment` draws per sample by default and
  ``per_sample=False`` reproduces the batch-level behaviour (and timm Mixup mode 'batch' instead of 'elem').
- The per-batch colour choice returns identity when both probabilities are 0 (the official builder returns None
  and the engine then calls None).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:  # annotations only: methods never import the models at run time
    from tokenbook.models.seit import TokenAdapt

__all__ = [
    "build_synonyms", "save_synonyms", "load_synonyms", "synonym_table", "ReplaceSynonym", "SwapCode", "TokenEDA",
    "embed_ids", "rrc_params", "random_resized_crop", "center_crop", "random_crop", "EmbeddingNoise", "color_adapt",
    "ColorAdapt", "ColorChoice", "AffineOp", "SpatialParams", "sample_spatial_params", "apply_spatial",
    "FSpaceAugment", "TokenBatchAugment", "train_tokenadapt",
]


def _rand(gen: Optional[torch.Generator] = None) -> float:
    return float(torch.rand((), generator=gen))


def _uniform(a: float, b: float, gen: Optional[torch.Generator] = None) -> float:
    return a + (b - a) * _rand(gen)


def _randint(lo: int, hi_inclusive: int, gen: Optional[torch.Generator] = None) -> int:
    return int(torch.randint(lo, hi_inclusive + 1, (), generator=gen))


# ----------------------------------------------------------------------------------------------------------
# Synonym dictionary and Token-EDA
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def build_synonyms(codebook: torch.Tensor, top: int = 5, include_self: bool = False) -> dict[str, list[int]]:
    """Synonym dictionary from codebook neighbours, in the release's JSON form ``{"0": [ids...], ...}``.

    Neighbours are ranked by cosine similarity of the codebook rows (the tokenizer's lookup metric). How the
    released file was built is unknown (sheet 1.4); ``include_self=False`` leaves each token out of its own list.
    """
    if codebook.ndim != 2:
        raise ValueError(f"codebook must be (K, D), got {tuple(codebook.shape)}")
    k = codebook.shape[0]
    if not 1 <= top <= k - (0 if include_self else 1):
        raise ValueError(f"top={top} neighbours impossible for a codebook of {k} entries")
    cb = F.normalize(codebook.float(), dim=-1)
    sim = cb @ cb.t()
    if not include_self:
        sim.fill_diagonal_(-float("inf"))
    idx = sim.topk(top, dim=1).indices
    return {str(i): [int(j) for j in idx[i]] for i in range(k)}


def save_synonyms(synonyms: Mapping[str, Sequence[int]], path: Union[str, os.PathLike]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({str(k): [int(v) for v in vs] for k, vs in synonyms.items()}))
    return path


def load_synonyms(path: Union[str, os.PathLike]) -> dict[str, list[int]]:
    """Load a synonym JSON (``synonyms.json`` or ``codebook-synonyms.json``: both names occur in the releases)."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise ValueError(f"{path}: expected an object mapping token ids (strings) to lists of token ids")
    return {str(k): [int(x) for x in v] for k, v in data.items()}


def synonym_table(synonyms: Mapping[str, Sequence[int]], num_codes: Optional[int] = None,
                  top: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense (K, top) table of the first ``top`` synonyms of every id and the (K,) count of valid entries."""
    keys = [int(k) for k in synonyms]
    k = num_codes if num_codes is not None else (max(keys) + 1 if keys else 0)
    table = torch.arange(k).unsqueeze(1).repeat(1, top)
    counts = torch.zeros(k, dtype=torch.long)
    for key in keys:
        if key >= k:
            raise ValueError(f"synonym key {key} outside the codebook of {k} entries")
        vals = list(synonyms[str(key)])[:top]
        if any(v < 0 or v >= k for v in vals):
            raise ValueError(f"synonyms of {key} contain ids outside 0..{k - 1}: {vals}")
        if vals:
            table[key, :len(vals)] = torch.tensor(vals)
            counts[key] = len(vals)
    return table, counts


class ReplaceSynonym(nn.Module):
    """Each position independently, with probability ``prob``, takes an id drawn uniformly from the first ``top``
    entries of its synonym list (official ``ReplaceSynonym``; vectorized). Ids without synonyms stay."""

    def __init__(self, synonyms: Mapping[str, Sequence[int]], top: int = 5, prob: float = 0.25,
                 num_codes: Optional[int] = None) -> None:
        super().__init__()
        if not 0 <= prob <= 1:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        self.top, self.prob = top, prob
        table, counts = synonym_table(synonyms, num_codes, top)
        self.register_buffer("table", table, persistent=False)
        self.register_buffer("counts", counts, persistent=False)

    def forward(self, ids: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        flat = ids.reshape(-1).long()
        if flat.numel() and int(flat.max()) >= self.table.shape[0]:
            raise ValueError(f"id {int(flat.max())} has no entry in the synonym table of {self.table.shape[0]} ids")
        hit = torch.rand(flat.shape, generator=generator) < self.prob
        cnt = self.counts[flat]
        pick = (torch.rand(flat.shape, generator=generator) * cnt.clamp(min=1)).long().clamp(max=self.top - 1)
        new = self.table[flat, pick]
        out = torch.where(hit & (cnt > 0), new, flat)
        return out.reshape(ids.shape).to(ids.dtype)


class SwapCode(nn.Module):
    """Swap two ps x ps blocks of the id grid, ps = int(min(H, W) * U(scale)); the corners are re-drawn until their
    distance exceeds ps (official ``SwapCode``). As in the official code both blocks are copied from the *original*
    grid, so overlapping blocks (possible: distance > ps does not imply disjoint) follow its overwrite order."""

    def __init__(self, scale: tuple[float, float] = (0.0, 0.25)) -> None:
        super().__init__()
        if not 0 <= scale[0] <= scale[1] < 1:
            raise ValueError(f"scale must satisfy 0 <= lo <= hi < 1, got {scale}")
        self.scale = scale

    def forward(self, ids: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        h, w = ids.shape[-2:]
        ps = int(min(h, w) * _uniform(*self.scale, generator))
        if ps == 0:
            return ids.clone()
        for _ in range(10000):
            y0, x0 = _randint(0, h - ps - 1, generator), _randint(0, w - ps - 1, generator)
            y1, x1 = _randint(0, h - ps - 1, generator), _randint(0, w - ps - 1, generator)
            if math.hypot(y1 - y0, x1 - x0) > ps:
                break
        else:  # pragma: no cover - needs ps close to the grid side, excluded by scale < 1
            return ids.clone()
        src = ids.reshape(h, w)
        out = src.clone()
        out[y0:y0 + ps, x0:x0 + ps] = src[y1:y1 + ps, x1:x1 + ps]
        out[y1:y1 + ps, x1:x1 + ps] = src[y0:y0 + ps, x0:x0 + ps]
        return out.reshape(ids.shape)


class TokenEDA(nn.Module):
    """SeiT's Token-EDA on one (H, W) id grid: synonym replacement with ``synonym_prob``, block swap with
    ``swap_prob``, unchanged otherwise (defaults 0.25 / 0.25 / 0.5; per-token replace prob 0.25, top-5)."""

    def __init__(self, synonyms: Optional[Mapping[str, Sequence[int]]] = None, synonym_prob: float = 0.25,
                 swap_prob: float = 0.25, replace_token_prob: float = 0.25, synonym_top: int = 5,
                 swap_scale: tuple[float, float] = (0.0, 0.25), num_codes: Optional[int] = None) -> None:
        super().__init__()
        if synonym_prob < 0 or swap_prob < 0 or synonym_prob + swap_prob > 1 + 1e-9:
            raise ValueError(f"synonym_prob + swap_prob must be within [0, 1], got {synonym_prob} + {swap_prob}")
        if synonym_prob > 0 and synonyms is None:
            raise ValueError("synonym_prob > 0 needs a synonym dictionary (build_synonyms or load_synonyms)")
        self.synonym_prob, self.swap_prob = synonym_prob, swap_prob
        self.replace = ReplaceSynonym(synonyms, synonym_top, replace_token_prob, num_codes) if synonyms else None
        self.swap = SwapCode(swap_scale)

    def forward(self, ids: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        u = _rand(generator)
        if u < self.synonym_prob and self.replace is not None:
            return self.replace(ids, generator)
        if u < self.synonym_prob + self.swap_prob:
            return self.swap(ids, generator)
        return ids


# ----------------------------------------------------------------------------------------------------------
# Codebook lookup and crops on the embedding map
# ----------------------------------------------------------------------------------------------------------
def embed_ids(ids: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Ids (B, H, W) -> embedding map (B, D, H, W) = one-hot(ids) @ codebook, as a gather."""
    if ids.dtype.is_floating_point:
        raise ValueError(f"ids must be integers, got {ids.dtype}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= codebook.shape[0]):
        raise ValueError(f"ids in {int(ids.min())}..{int(ids.max())} do not fit a codebook of {codebook.shape[0]}")
    return codebook[ids.long()].permute(0, 3, 1, 2).contiguous()


def rrc_params(height: int, width: int, scale: tuple[float, float] = (0.08, 1.0),
               ratio: tuple[float, float] = (3 / 4, 4 / 3),
               generator: Optional[torch.Generator] = None) -> tuple[int, int, int, int]:
    """Crop box (top, left, h, w) like torchvision's RandomResizedCrop: 10 tries, then a centre-crop fallback."""
    area = height * width
    lr = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(scale[0], scale[1], generator)
        ar = math.exp(_uniform(lr[0], lr[1], generator))
        w = int(round(math.sqrt(target * ar)))
        h = int(round(math.sqrt(target / ar)))
        if 0 < w <= width and 0 < h <= height:
            return _randint(0, height - h, generator), _randint(0, width - w, generator), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(x: torch.Tensor, size: int, scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), mode: str = "bicubic",
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Per-sample random resized crop of (B, C, H, W) to ``size`` (official ``RRC``: crop, then
    ``F.interpolate(mode='bicubic')``, align_corners False, no antialias)."""
    if x.ndim != 4:
        raise ValueError(f"expected (B, C, H, W), got {tuple(x.shape)}")
    out = []
    for xi in x:
        i, j, h, w = rrc_params(x.shape[-2], x.shape[-1], scale, ratio, generator)
        out.append(F.interpolate(xi[None, :, i:i + h, j:j + w], size=(size, size), mode=mode))
    return torch.cat(out) if out else x.new_zeros(0, x.shape[1], size, size)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Centre crop of the last two axes (official ``CC``: start = (H - size) // 2, no resize)."""
    h, w = x.shape[-2:]
    if size > min(h, w):
        raise ValueError(f"centre crop {size} is larger than the map {h}x{w}")
    y0, x0 = (h - size) // 2, (w - size) // 2
    return x[..., y0:y0 + size, x0:x0 + size]


def random_crop(x: torch.Tensor, size: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Per-sample plain random crop (the official ``--src`` option)."""
    h, w = x.shape[-2:]
    out = []
    for xi in x:
        y0, x0 = _randint(0, h - size, generator), _randint(0, w - size, generator)
        out.append(xi[..., y0:y0 + size, x0:x0 + size])
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------------------
# Emb-Noise and ColorAdapt
# ----------------------------------------------------------------------------------------------------------
def _subset(b: int, frac: float, device: torch.device, generator: Optional[torch.Generator]) -> torch.Tensor:
    return torch.randperm(b, generator=generator)[: int(b * frac)].to(device)


class EmbeddingNoise(nn.Module):
    """SeiT's Emb-Noise: for a random ``int(B * prob)`` subset, add ``N(0, scale^2)`` of shape (B, C, 1, 1) (a
    channel-wise shift) plus ``N(0, std^2)`` of shape (B, C, H, W). Returns a new tensor (official: in place)."""

    def __init__(self, prob: float = 0.5, scale: float = 1.0, std: float = 1.0) -> None:
        super().__init__()
        self.prob, self.scale, self.std = prob, scale, std

    def forward(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        b, c, h, w = x.shape
        noise = (torch.randn(b, c, 1, 1, generator=generator) * self.scale
                 + torch.randn(b, c, h, w, generator=generator) * self.std).to(x)
        mask = torch.zeros(b, 1, 1, 1, dtype=x.dtype, device=x.device)
        mask[_subset(b, self.prob, x.device, generator)] = 1
        return x + noise * mask


def color_adapt(x: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """ColorAdapt on every sample: ``sigma_p * (x_i - mu_i) / (sigma_i + eps) + mu_p`` with p = B-1-i (the batch in
    reverse), mean and **unbiased** std per sample and channel over (H, W). ``eps=0`` is the official formula (NaN
    on a constant channel); a small eps is our guard."""
    mu = x.mean(dim=(2, 3), keepdim=True)
    sd = x.std(dim=(2, 3), keepdim=True)
    return (x - mu) / (sd + eps) * sd.flip(0) + mu.flip(0)


class ColorAdapt(nn.Module):
    """ColorAdapt (Forging Tokens / SeiT++): AdaIN with the reversed-batch partner, written back for a random
    ``int(B * prob)`` subset (prob 0.5); labels unchanged. ``eps`` defaults to the official 0."""

    def __init__(self, prob: float = 0.5, eps: float = 0.0) -> None:
        super().__init__()
        self.prob, self.eps = prob, eps

    def forward(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        out = x.clone()
        ids = _subset(x.shape[0], self.prob, x.device, generator)
        out[ids] = color_adapt(x, self.eps)[ids]
        return out


class ColorChoice(nn.Module):
    """One choice per batch among Emb-Noise (``noise_prob``), ColorAdapt (``coloradapt_prob``) and identity (the rest).

    TokenAdapt defaults: 0.75 / 0.25 / 0. Original SeiT = ``noise_prob=1, coloradapt_prob=0`` (noise on half of
    every batch). SeiT++'s ``main_seit.py`` defaults: 0.5 / 0.25 / 0.25. Both 0 gives identity (official: a crash).
    """

    def __init__(self, noise_prob: float = 0.75, coloradapt_prob: float = 0.25, subset: float = 0.5,
                 noise_scale: float = 1.0, noise_std: float = 1.0, eps: float = 0.0) -> None:
        super().__init__()
        if noise_prob < 0 or coloradapt_prob < 0 or noise_prob + coloradapt_prob > 1 + 1e-9:
            raise ValueError(f"noise_prob + coloradapt_prob must be within [0, 1], got {noise_prob} + "
                             f"{coloradapt_prob}")
        self.noise_prob, self.coloradapt_prob = noise_prob, coloradapt_prob
        self.noise = EmbeddingNoise(subset, noise_scale, noise_std)
        self.coloradapt = ColorAdapt(subset, eps)
        self.last_choice = "identity"

    def forward(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        u = _rand(generator)
        if u < self.noise_prob:
            self.last_choice = "noise"
            return self.noise(x, generator)
        if u < self.noise_prob + self.coloradapt_prob:
            self.last_choice = "coloradapt"
            return self.coloradapt(x, generator)
        self.last_choice = "identity"
        return x


# ----------------------------------------------------------------------------------------------------------
# Spatial augmentation in f-space (TokenAdapt), shareable across resolutions
# ----------------------------------------------------------------------------------------------------------
@dataclass
class AffineOp:
    """One ``RandomAffine`` draw: angle (deg), translation as a fraction of (W, H), shear (x, y) in degrees."""

    angle: float = 0.0
    translate: tuple[float, float] = (0.0, 0.0)
    shear: tuple[float, float] = (0.0, 0.0)


@dataclass
class SpatialParams:
    """Resolution-free parameters of one sample's f-space augmentation: flip, affine ops (in order), crop box as
    fractions (top, left, height, width) of the map."""

    flip: bool = False
    ops: list[AffineOp] = field(default_factory=list)
    crop: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)


def _draw_ops(gen: Optional[torch.Generator], apply_p: float, op_p: float, degrees: float, translate: float,
              shear: float) -> list[AffineOp]:
    # RandomApply(p=apply_p) over [Rotate, TranslateX, TranslateY, ShearX, ShearY], each with its own p=op_p
    ops: list[AffineOp] = []
    if _rand(gen) >= apply_p:
        return ops
    if _rand(gen) < op_p:
        ops.append(AffineOp(angle=_uniform(-degrees, degrees, gen)))
    if _rand(gen) < op_p:
        ops.append(AffineOp(translate=(_uniform(-translate, translate, gen), 0.0)))
    if _rand(gen) < op_p:
        ops.append(AffineOp(translate=(0.0, _uniform(-translate, translate, gen))))
    if _rand(gen) < op_p:
        ops.append(AffineOp(shear=(_uniform(0.0, shear, gen), 0.0)))
    if _rand(gen) < op_p:
        ops.append(AffineOp(shear=(0.0, _uniform(0.0, shear, gen))))
    return ops


def sample_spatial_params(
    batch: int, height: int, width: int, per_sample: bool = True, flip_p: float = 0.5, apply_p: float = 0.5,
    op_p: float = 0.5, degrees: float = 30.0, translate: float = 0.2, shear: float = 15.0,
    scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: Optional[torch.Generator] = None,
) -> list[SpatialParams]:
    """Draw the TokenAdapt spatial augmentation (sheet 2.4) for a batch.

    Official (``per_sample=False``): one flip decision and one set of affine ops for the whole batch; the RRC box
    per sample. ``per_sample=True`` draws everything per sample. Crop boxes are drawn on the (height, width) grid
    like the official RRC and stored as fractions so the same params can be applied at another resolution.
    """
    shared_flip = _rand(generator) < flip_p
    shared_ops = _draw_ops(generator, apply_p, op_p, degrees, translate, shear)
    out = []
    for k in range(batch):
        if per_sample and k > 0:
            flip = _rand(generator) < flip_p
            ops = _draw_ops(generator, apply_p, op_p, degrees, translate, shear)
        else:
            flip, ops = shared_flip, shared_ops
        i, j, h, w = rrc_params(height, width, scale, ratio, generator)
        out.append(SpatialParams(flip=flip, ops=list(ops), crop=(i / height, j / width, h / height, w / width)))
    return out


def _apply_ops(x: torch.Tensor, flip: bool, ops: Sequence[AffineOp]) -> torch.Tensor:
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    if flip:
        x = x.flip(-1)
    h, w = x.shape[-2:]
    for op in ops:
        # torchvision RandomAffine rounds the translation to whole pixels; bilinear, zero fill
        x = TF.affine(x, angle=op.angle, translate=[int(round(op.translate[0] * w)), int(round(op.translate[1] * h))],
                      scale=1.0, shear=[op.shear[0], op.shear[1]], interpolation=InterpolationMode.BILINEAR)
    return x


def _same_geometry(a: SpatialParams, b: SpatialParams) -> bool:
    return a.flip == b.flip and a.ops == b.ops


def apply_spatial(x: torch.Tensor, params: Sequence[SpatialParams], out_size: int,
                  mode: str = "bicubic") -> torch.Tensor:
    """Apply per-sample :class:`SpatialParams` to (B, C, H, W): flip, affine ops (bilinear, zero fill), then crop
    the box scaled to (H, W) and resize it to ``out_size`` (bicubic). Differentiable w.r.t. ``x``."""
    if x.ndim != 4 or len(params) != x.shape[0]:
        raise ValueError(f"need one SpatialParams per sample: x {tuple(x.shape)}, {len(params)} params")
    h, w = x.shape[-2:]
    # flip/affine: batched when all samples share them (the official batch-level case), else per sample
    if params and all(_same_geometry(p, params[0]) for p in params):
        geo = _apply_ops(x, params[0].flip, params[0].ops)
    else:
        geo = torch.cat([_apply_ops(x[k:k + 1], p.flip, p.ops) for k, p in enumerate(params)])
    out = []
    for k, p in enumerate(params):
        t, l, ch, cw = p.crop
        i, j = int(round(t * h)), int(round(l * w))
        hh, ww = max(1, int(round(ch * h))), max(1, int(round(cw * w)))
        hh, ww = min(hh, h - i), min(ww, w - j)
        out.append(F.interpolate(geo[k:k + 1, :, i:i + hh, j:j + ww], size=(out_size, out_size), mode=mode))
    return torch.cat(out)


class FSpaceAugment(nn.Module):
    """TokenAdapt's spatial augmentation of the f-space map: flip p 0.5; RandomApply p 0.5 over rotate +-30 deg,
    translate-x/y 20 %, shear-x/y [0, 15] deg (each p 0.5); random resized crop (0.08-1) to ``out_size`` (56 =
    2 x 28 officially). ``per_sample=True`` (default here, as the issue asks) draws per sample; False is official."""

    def __init__(self, out_size: int, per_sample: bool = True, scale: tuple[float, float] = (0.08, 1.0),
                 flip_p: float = 0.5, apply_p: float = 0.5, op_p: float = 0.5, degrees: float = 30.0,
                 translate: float = 0.2, shear: float = 15.0) -> None:
        super().__init__()
        self.out_size, self.per_sample = out_size, per_sample
        self.kw = dict(flip_p=flip_p, apply_p=apply_p, op_p=op_p, degrees=degrees, translate=translate, shear=shear,
                       scale=scale)

    def sample(self, batch: int, height: int, width: int,
               generator: Optional[torch.Generator] = None) -> list[SpatialParams]:
        return sample_spatial_params(batch, height, width, self.per_sample, generator=generator, **self.kw)

    def forward(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        params = self.sample(x.shape[0], x.shape[-2], x.shape[-1], generator)
        return apply_spatial(x, params, self.out_size)


# ----------------------------------------------------------------------------------------------------------
# The batch hook
# ----------------------------------------------------------------------------------------------------------
class TokenBatchAugment:
    """Batch-level token augmentation as a ``tokenbook.train.fit`` hook: ``on_batch((ids, labels)) -> (x, targets)``.

    Input: ids (B, G, G) integer (from :class:`tokenbook.data.tokens.TokenDataset`, Token-EDA already applied) and class
    labels (B,). Output: embedding maps (B, D, crop, crop) and soft targets (B, num_classes) (timm Mixup with label
    smoothing; the engine's loss must accept soft targets, e.g. ``SoftTargetCrossEntropy``). Eval batches are not
    touched: when the model handed to ``on_fit_start`` is in eval mode the batch is returned unchanged (token ViTs
    from :mod:`tokenbook.models.seit` accept ids and centre-crop them themselves).

    Pipeline (TokenAdapt ``engine.py`` order; sheet 2.5):

    1. codebook lookup (B, D, G, G);
    2. ``color_before_crop=True``: one per-batch colour choice (:class:`ColorChoice`) on the full map;
    3. without ``tokenadapt``: the whole batch is the base part; with it, the batch splits into halves (B must be
       divisible by 4);
    4. base part: RRC (scale ``rrc_scale``) to ``crop``, [colour here when ``color_before_crop=False``, the original
       SeiT order where noise sits in the codebook module after the dataset's crop], CutMix (alpha 1, smoothing 0.1);
    5. TokenAdapt half (no grad; f/g are frozen): f -> :class:`FSpaceAugment` to 2 x crop -> Mixup 0.8 / CutMix 1.0
       (mode 'elem' when ``per_sample`` else 'batch') -> g argmax ids (crop x crop) -> codebook;
    6. concatenate base and TokenAdapt halves.

    Presets: :meth:`seit` (original SeiT) and :meth:`tokenadapt` (Forging Tokens, with or without ColorAdapt).
    """

    def __init__(
        self,
        codebook: torch.Tensor,
        num_classes: int,
        crop: int = 28,
        tokenadapt: Optional[nn.Module] = None,
        noise_prob: float = 0.75,
        coloradapt_prob: float = 0.25,
        color_subset: float = 0.5,
        noise_scale: float = 1.0,
        noise_std: float = 1.0,
        color_before_crop: bool = True,
        rrc_scale: tuple[float, float] = (0.08, 1.0),
        cutmix_alpha: float = 1.0,
        ta_mixup_alpha: float = 0.8,
        ta_cutmix_alpha: float = 1.0,
        label_smoothing: float = 0.1,
        per_sample: bool = True,
        coloradapt_eps: float = 0.0,
    ) -> None:
        from timm.data import Mixup

        if codebook.ndim != 2:
            raise ValueError(f"codebook must be (K, D), got {tuple(codebook.shape)}")
        self.codebook = codebook.detach().float()
        self.num_classes, self.crop = num_classes, crop
        self.tokenadapt = tokenadapt
        if tokenadapt is not None:  # frozen, as in the official classifier training
            tokenadapt.eval()
            if hasattr(tokenadapt, "set_trainable"):
                tokenadapt.set_trainable(False)
            else:
                tokenadapt.requires_grad_(False)
        self.color = ColorChoice(noise_prob, coloradapt_prob, color_subset, noise_scale, noise_std, coloradapt_eps)
        self.color_before_crop = color_before_crop
        self.rrc_scale = rrc_scale
        self.per_sample = per_sample
        self.mix = (Mixup(mixup_alpha=0.0, cutmix_alpha=cutmix_alpha, prob=1.0, mode="batch",
                          label_smoothing=label_smoothing, num_classes=num_classes) if cutmix_alpha > 0 else None)
        self.mix_ta = (Mixup(mixup_alpha=ta_mixup_alpha, cutmix_alpha=ta_cutmix_alpha, prob=1.0, switch_prob=0.5,
                             mode="elem" if per_sample else "batch", label_smoothing=label_smoothing,
                             num_classes=num_classes) if (ta_mixup_alpha > 0 or ta_cutmix_alpha > 0) else None)
        self.label_smoothing = label_smoothing
        self.fspace = FSpaceAugment(2 * crop, per_sample=per_sample, scale=rrc_scale)
        self._model: Optional[nn.Module] = None

    # presets -------------------------------------------------------------------------------------------------
    @classmethod
    def seit(cls, codebook: torch.Tensor, num_classes: int, crop: int = 28, **kw: Any) -> "TokenBatchAugment":
        """Original SeiT: RRC -> lookup -> Emb-Noise on half of every batch -> CutMix; no ColorAdapt/TokenAdapt."""
        kw = {"noise_prob": 1.0, "coloradapt_prob": 0.0, "color_before_crop": False, **kw}
        return cls(codebook, num_classes, crop, tokenadapt=None, **kw)

    @classmethod
    def forging(cls, codebook: torch.Tensor, num_classes: int, crop: int = 28, tokenadapt: Optional[nn.Module] = None,
                coloradapt: bool = True, **kw: Any) -> "TokenBatchAugment":
        """Forging Tokens: noise 0.75 / ColorAdapt 0.25 per batch (``coloradapt=False``: noise on every batch) and,
        when ``tokenadapt`` is given, the TokenAdapt half."""
        probs = ({"noise_prob": 0.75, "coloradapt_prob": 0.25} if coloradapt
                 else {"noise_prob": 1.0, "coloradapt_prob": 0.0})
        return cls(codebook, num_classes, crop, tokenadapt=tokenadapt, **{**probs, **kw})

    tokenadapt_preset = forging

    # hook protocol ---------------------------------------------------------------------------------------------
    def on_fit_start(self, fabric: Any, model: nn.Module) -> None:
        self._model = model

    def _smooth(self, y: torch.Tensor) -> torch.Tensor:
        from timm.data.mixup import one_hot

        off = self.label_smoothing / self.num_classes
        return one_hot(y, self.num_classes, on_value=1.0 - self.label_smoothing + off, off_value=off)

    def _mix(self, mixer: Any, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if mixer is None:
            return x, self._smooth(y)
        return mixer(x, y)

    def __call__(self, ids: torch.Tensor, labels: torch.Tensor,
                 generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        if ids.ndim != 3 or ids.dtype.is_floating_point:
            raise ValueError(f"expected integer ids (B, G, G), got {tuple(ids.shape)} {ids.dtype}")
        b = ids.shape[0]
        ta = self.tokenadapt
        if ta is not None and b % 4:
            raise ValueError(f"batch size {b} must be divisible by 4 with TokenAdapt (two halves, each even for "
                             "Mixup); use a batch size divisible by 4 and drop_last=True")
        if ta is None and self.mix is not None and b % 2:
            raise ValueError(f"batch size {b} must be even for CutMix; use drop_last=True and an even batch size")
        if ids.shape[-1] < self.crop:
            raise ValueError(f"id grid {tuple(ids.shape[-2:])} is smaller than the crop {self.crop}")
        if self.codebook.device != ids.device:
            self.codebook = self.codebook.to(ids.device)
        cb = self.codebook
        x = embed_ids(ids, cb)
        labels = labels.to(ids.device)
        if self.color_before_crop:
            x = self.color(x, generator)
        if ta is not None:
            x, x_ta = x.chunk(2)
            y, y_ta = labels.chunk(2)
        else:
            y = labels
        x = random_resized_crop(x, self.crop, self.rrc_scale, generator=generator)
        if not self.color_before_crop:
            x = self.color(x, generator)
        x, t = self._mix(self.mix, x, y)
        if ta is None:
            return x, t
        ta.to(ids.device)
        with torch.no_grad():
            f = ta.forward_conversion(x_ta)
            f = self.fspace(f, generator)
            f, t_ta = self._mix(self.mix_ta, f, y_ta)
            new_ids = ta.forward_inversion(f)
            x_ta = embed_ids(new_ids, cb)
        return torch.cat([x, x_ta]), torch.cat([t, t_ta])

    def on_batch(self, batch: Any) -> Any:
        if self._model is not None and not self._model.training:
            return batch
        ids, labels = batch[0], batch[1]
        x, t = self(ids, labels)
        return (x, t, *batch[2:]) if isinstance(batch, (tuple, list)) else (x, t)


# ----------------------------------------------------------------------------------------------------------
# TokenAdapt training (the objective of sheet 2.3; the official training code is not released)
# ----------------------------------------------------------------------------------------------------------
def train_tokenadapt(
    tokenadapt: TokenAdapt,
    tokenizer: nn.Module,
    data: Iterable,
    steps: int = 500,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    codebook: Optional[torch.Tensor] = None,
    per_sample: bool = True,
    mix_prob: float = 0.0,
    device: Union[str, torch.device] = "cpu",
    log_every: int = 50,
    generator: Optional[torch.Generator] = None,
    callback: Optional[Callable[[dict], None]] = None,
) -> list[dict]:
    """Train f and g jointly: cross-entropy of g's code logits against the tokens of the pixel-augmented image.

    Per step, for images x (B, C, H, W) in [0, 1]: T = tokenizer(x) on the G x G grid; one set of spatial params A
    (:func:`tokenbook.methods.token_aug.sample_spatial_params`, flip / affine / RRC, per sample or batch-level) is applied to
    the pixels (output ``out_grid * (H / G)`` px, re-tokenized to the m x m targets T_A) and to ``f(E[T])`` (output
    2m); loss = CE(g(A(f(E[T]))), T_A). With ``mix_prob`` > 0, a batch is additionally Mixup'd (p 0.5) or CutMix'd
    with the reversed batch in both spaces with the same lambda / box, the target being the tokens of the mixed
    image (our choice: what g sees at classifier time). ``codebook`` defaults to the tokenizer's raw rows.
    ``tokenizer`` needs ``encode(images) -> ids``, ``export_codebook()`` and ``downsample`` (see
    :class:`tokenbook.data.tokens.VQTokenizer`). Rows: step, loss, token_acc (argmax == target).
    """

    device = torch.device(device)
    tokenadapt.to(device).train().set_trainable(True)
    tokenizer.to(device).eval()
    cb = (codebook if codebook is not None else tokenizer.export_codebook()).to(device).float()
    if cb.shape != (tokenadapt.codebook_size, tokenadapt.code_dim):
        raise ValueError(f"codebook {tuple(cb.shape)} does not match TokenAdapt ({tokenadapt.codebook_size}, "
                         f"{tokenadapt.code_dim})")
    params = [p for p in tokenadapt.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    m, g = tokenadapt.out_grid, tokenadapt.in_grid
    hist: list[dict] = []
    it = iter(data)
    for step in range(1, steps + 1):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(data)
            batch = next(it)
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        x = (x.float() / 255.0 if x.dtype == torch.uint8 else x.float()).to(device)
        ds = x.shape[-1] // g
        if x.shape[-1] != g * ds or ds * g != x.shape[-2]:
            raise ValueError(f"images {tuple(x.shape[-2:])} do not tokenize to TokenAdapt's {g}x{g} input grid")
        with torch.no_grad():
            ids = tokenizer.encode(x)
            if tuple(ids.shape[-2:]) != (g, g):
                raise ValueError(f"tokenizer gives a {tuple(ids.shape[-2:])} grid, TokenAdapt expects {g}x{g}")
            sp = sample_spatial_params(x.shape[0], 2 * g, 2 * g, per_sample=per_sample, generator=generator)
            xa = apply_spatial(x, sp, m * ds)
            fmix = None
            if mix_prob > 0 and float(torch.rand((), generator=generator)) < mix_prob:
                lam = float(torch.distributions.Beta(1.0, 1.0).sample())
                if float(torch.rand((), generator=generator)) < 0.5:
                    fmix = ("mixup", lam)
                    xa = lam * xa + (1 - lam) * xa.flip(0)
                else:
                    ch = math.sqrt(1 - lam)
                    cy, cx = float(torch.rand((), generator=generator)), float(torch.rand((), generator=generator))
                    box = (max(cy - ch / 2, 0.0), min(cy + ch / 2, 1.0), max(cx - ch / 2, 0.0), min(cx + ch / 2, 1.0))
                    fmix = ("cutmix", box)
                    xa = _paste(xa, box)
            target = tokenizer.encode(xa.clamp(0, 1))
        f = tokenadapt.forward_conversion(embed_ids(ids, cb))
        fa = apply_spatial(f, sp, 2 * m)
        if fmix is not None:
            fa = fmix[1] * fa + (1 - fmix[1]) * fa.flip(0) if fmix[0] == "mixup" else _paste(fa, fmix[1])
        logits = tokenadapt.forward_logits(fa)
        loss = F.cross_entropy(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % log_every == 0 or step == 1 or step == steps:
            row = {"step": step, "loss": loss.item(), "token_acc": float((logits.argmax(1) == target).float().mean())}
            hist.append(row)
            if callback:
                callback(row)
    tokenadapt.eval()
    return hist


def _paste(x: torch.Tensor, box: tuple[float, float, float, float]) -> torch.Tensor:
    """CutMix with the reversed batch inside a fractional box (y0, y1, x0, x1)."""
    h, w = x.shape[-2:]
    y0, y1, x0, x1 = int(round(box[0] * h)), int(round(box[1] * h)), int(round(box[2] * w)), int(round(box[3] * w))
    out = x.clone()
    out[..., y0:y1, x0:x1] = x.flip(0)[..., y0:y1, x0:x1]
    return out
