"""ToE (Token Expansion, Huang et al., CVPR 2024): training-time token selection for any timm ViT.

Reference sheet: ``../shared/papers/toe.md`` (section numbers below refer to it). Official code: Osilly/TokenExpansion.

What the official ``TokenSelect`` does (restated, sheet section 1)
------------------------------------------------------------------
On the output of transformer block 0 (before block 1) and only while training, the patch tokens (class token split off
and prepended again at the end) are reduced to about ``N * keep_rate[stage]`` tokens:

1. *Initialization*: ``floor(N * r0)`` seed tokens at the raster positions ``0, s, 2s, ...`` with ``s = int(1 // r0)``
   (float floor division: ``1 // 0.2 == 4.0``, so r0 = 0.2 gives stride 4, not 5). Same seeds for every image.
2. *Expansion*: for every stage ``t = 1..stage`` the ``m_t`` tokens of that stage are added in ``k`` greedy sub-steps
   (``expansion_multiple_stage``); each sub-step adds, per sample, the unselected tokens whose best score against the
   selected set (max over the selected set) is the smallest (ascending sort), i.e. for cosine the tokens farthest from
   everything selected so far. All stages up to the current one are replayed on every forward.
3. *Merging*: every token still unselected goes to the selected token with the highest score (``argmax``); each
   selected token becomes the unweighted mean of itself and the tokens sent to it (``scatter_reduce(..., "mean")``
   with ``include_self=True``). Only the index computations are under ``no_grad``; gradients reach merged tokens.

The stage is ``bisect_right(expansion_step, epoch)`` (number of boundaries at or below the epoch); stage 0 means all
tokens, and the last stage with keep rate 1.0 means ToE is off. Output order: prefix tokens, seeds in raster order, then
the added tokens in the order they were added.

Where this module differs from the official code (all documented on the options)
--------------------------------------------------------------------------------
- Attaches to any timm ``VisionTransformer`` (class token or not, register tokens, distilled token) through a forward
  hook on ``blocks[block_index]`` (default 0, as in the official DeiT/LV-ViT/YOLOS code); the state dict keys of the
  model do not change, and the hook also runs inside timm's gradient checkpointing (the official DeiT override
  silently skips ToE when gradient checkpointing is on).
- Off in ``eval()`` mode and in deep copies such as the ``ModelEmaV3`` model, whatever ``sparse_inference`` says
  (the official code gates only on the flag, which its scripts reset before validation); ``sparse_eval=True`` keeps
  it on at evaluation, as the official ``--sparse-eval``.
- Faster indexing with the same selection: the seed indices are cached per (N, device), indices are (B, n) rather
  than channel-expanded (B, n, C), no host-side index lists are built per forward, and the score matrix between all
  patch tokens is computed once per forward (B, N, N) and read by every sub-step, with the per-token best score
  updated incrementally (``max`` is associative, so the picks are the same as re-scoring against the enlarged set).
  Scores are computed in float32 even under autocast (the official code scores in the autocast dtype).
- Named distance variants: ``cosine`` (default), ``euclidean``/``manhattan`` exactly as shipped (distances fed to the
  same max/ascending-sort/argmax as the cosine similarity, which inverts their meaning, sheet 1.6) and
  ``euclidean_corrected``/``manhattan_corrected`` (negated distances, so "closest" means closest). The distances
  use the official broadcast formula by default (``distance_impl="official"``, same rounding as the official code);
  ``distance_impl="cdist"`` uses ``torch.cdist``, which rounds differently, so in float32 near-ties pick other
  tokens (about 3% of samples at DeiT-S size).
- ``seed_stride``: ``"official"`` (the ``int(1 // r0)`` quirk, default), ``"corrected"`` (``floor(1/r0)`` computed
  robustly: 5 for r0 = 0.2), ``"uniform"`` (seeds spread evenly over the whole raster, ``floor(i * N / n0)``).
- The index of original positions is (B, num_prefix + n) int64; the official one is expanded over channels.

Size: about 830 lines, a little over the project's 800-line guide: one method (the selection, its stage plan, the
per-stage MAC accounting and the attach/detach plumbing, including where it goes in T2T-ViT and ViTTM) whose parts
share the ``StagePlan`` invariants.
"""
from __future__ import annotations

import bisect
import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "DISTANCES", "DISTANCE_IMPLS", "SEED_STRIDES", "OFFICIAL_CONFIGS", "EFFICIENTTRAIN_SEGMENTS",
    "TokenSelect", "StagePlan", "seed_positions", "stage_for_epoch", "token_plan", "toe_schedule",
    "attach_token_select", "detach_token_select", "find_token_selects", "ToEStageHook", "scale_expansion_step",
    "ViTDims", "vit_block_macs", "toe_stage_macs", "epoch_weighted_saving", "segment_weighted_macs",
    "restore_positions", "broadcast_distance",
]

#: how euclidean/manhattan distances are computed (see :func:`broadcast_distance`)
DISTANCE_IMPLS = ("official", "cdist")

#: distance names -> (metric, sign). "as shipped" variants keep the official max/ascending/argmax on the raw distance.
DISTANCES: dict[str, tuple[str, float]] = {
    "cosine": ("cosine", 1.0),
    "euclidean": ("euclidean", 1.0),
    "euclidean_as_shipped": ("euclidean", 1.0),
    "euclidean_corrected": ("euclidean", -1.0),
    "manhattan": ("manhattan", 1.0),
    "manhattan_as_shipped": ("manhattan", 1.0),
    "manhattan_corrected": ("manhattan", -1.0),
}
SEED_STRIDES = ("official", "corrected", "uniform")

#: ToE settings of the official run scripts (sheet section 2); ``epochs`` is the run length they were used with.
OFFICIAL_CONFIGS: dict[str, dict[str, Any]] = {
    "deit_small": dict(expansion_step=(0, 100, 200), keep_rate=(0.5, 0.75, 1.0), initialization_keep_rate=0.25,
                       expansion_multiple_stage=2, distance="cosine", epochs=300),
    "lvvit_small": dict(expansion_step=(0, 100, 200), keep_rate=(0.4, 0.7, 1.0), initialization_keep_rate=0.2,
                        expansion_multiple_stage=2, distance="cosine", epochs=300),
    "efficienttrain": dict(expansion_step=(0, 100, 200), keep_rate=(0.6, 0.8, 1.0), initialization_keep_rate=0.3,
                           expansion_multiple_stage=2, distance="cosine", epochs=300),
    "yolos_small": dict(expansion_step=(5, 50, 100), keep_rate=(0.5, 0.75, 1.0), initialization_keep_rate=0.25,
                        expansion_multiple_stage=2, distance="cosine", epochs=150),
    "yolos_tiny": dict(expansion_step=(5, 100, 200), keep_rate=(0.5, 0.75, 1.0), initialization_keep_rate=0.25,
                       expansion_multiple_stage=2, distance="cosine", epochs=300),
}

#: EfficientTrain + ToE: (epochs, image size, ToE stage) blocks of ``ToE/EfficientTrain/get_flops_and_params.py``.
EFFICIENTTRAIN_SEGMENTS: tuple[tuple[int, int, int], ...] = (
    (100, 160, 1), (80, 160, 2), (20, 192, 2), (40, 192, 3), (60, 224, 3))


# ----------------------------------------------------------------------------------------------------------
# Schedule arithmetic (sheet 1.4, 1.5)
# ----------------------------------------------------------------------------------------------------------
def _check_config(expansion_step: Sequence[int], keep_rate: Sequence[float], initialization_keep_rate: float,
                  expansion_multiple_stage: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    steps, rates = tuple(expansion_step), tuple(float(r) for r in keep_rate)
    if len(steps) == 0 or len(steps) != len(rates):
        raise ValueError(f"expansion_step and keep_rate must be non-empty and of equal length, got {len(steps)} "
                         f"and {len(rates)} entries")
    if any(int(s) != s or s < 0 for s in steps) or any(b < a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"expansion_step must be non-decreasing epoch numbers >= 0, got {list(steps)}")
    if any(not 0.0 < r <= 1.0 for r in rates) or any(b < a for a, b in zip(rates, rates[1:])):
        raise ValueError(f"keep_rate must be non-decreasing values in (0, 1], got {list(rates)}")
    if not 0.0 < initialization_keep_rate <= rates[0]:
        raise ValueError(f"initialization_keep_rate must be in (0, keep_rate[0]={rates[0]}], "
                         f"got {initialization_keep_rate}")
    if int(expansion_multiple_stage) != expansion_multiple_stage or expansion_multiple_stage < 1:
        raise ValueError(f"expansion_multiple_stage must be an integer >= 1, got {expansion_multiple_stage}")
    return tuple(int(s) for s in steps), rates


def stage_for_epoch(expansion_step: Sequence[int], epoch: int) -> int:
    """Official stage rule: the number of ``expansion_step`` entries at or below ``epoch`` (``bisect_right``)."""
    return bisect.bisect_right(list(expansion_step), epoch)


def seed_positions(num_patches: int, initialization_keep_rate: float, seed_stride: str = "official") -> list[int]:
    """Patch positions (raster order, prefix tokens excluded) of the ``floor(N * r0)`` seed tokens.

    ``"official"``: every ``int(1 // r0)``-th position from 0 (the float floor-division quirk: r0 = 0.2 -> stride 4,
    so the seeds stop early and the last rows get none). ``"corrected"``: stride ``floor(1/r0)`` computed robustly
    (r0 = 0.2 -> 5). ``"uniform"``: ``floor(i * N / n0)``, spread over the whole raster.
    """
    if seed_stride not in SEED_STRIDES:
        raise ValueError(f"unknown seed_stride {seed_stride!r}; use one of {SEED_STRIDES}")
    n0 = int(num_patches * initialization_keep_rate)
    if n0 < 1:
        raise ValueError(f"initialization_keep_rate={initialization_keep_rate} gives no seed token for {num_patches} "
                         f"patches; raise it to at least {1 / num_patches:.4g}")
    if seed_stride == "uniform":
        return [i * num_patches // n0 for i in range(n0)]
    stride = int(1 // initialization_keep_rate) if seed_stride == "official" else \
        int(math.floor(1.0 / initialization_keep_rate + 1e-9))
    pos = list(range(0, num_patches, max(stride, 1)))[:n0]
    if len(pos) < n0:
        raise ValueError(f"seed stride {stride} leaves only {len(pos)} positions for {n0} seeds over {num_patches} "
                         f"patches; use seed_stride='uniform'")
    return pos


@dataclass(frozen=True)
class StagePlan:
    """Token counts of one stage for ``num_patches`` patch tokens (sheet 1.4).

    ``substeps[t-1]`` holds the sub-step sizes of stage ``t`` (k numbers, the last one takes the remainder).
    ``active`` is False for stage 0 and for the last stage when its keep rate is 1.0 (then ``kept == num_patches``).
    """
    stage: int
    num_patches: int
    seeds: int
    substeps: tuple[tuple[int, ...], ...]
    kept: int
    active: bool

    @property
    def added(self) -> tuple[int, ...]:
        """Tokens added per stage ``t = 1..stage``."""
        return tuple(sum(s) for s in self.substeps)

    @property
    def merged(self) -> int:
        return self.num_patches - self.kept


def token_plan(num_patches: int, stage: int, keep_rate: Sequence[float], initialization_keep_rate: float,
               expansion_multiple_stage: int = 2) -> StagePlan:
    """The official integer arithmetic for one stage (floating-point keep-rate differences included).

    ``m_t = floor(N * (r_t - r_{t-1}))`` with ``r_0 = initialization_keep_rate`` for ``t < S``; for the last stage
    ``S`` (only reached when ``r_S < 1``) ``m_S = floor(N * r_S) - floor(N * (r0 + sum_{i<S} delta_i))``. Each ``m_t``
    is split into ``k - 1`` pieces of ``m_t // k`` and a last piece with the remainder.
    """
    rates = [float(r) for r in keep_rate]
    S, r0, k = len(rates), float(initialization_keep_rate), int(expansion_multiple_stage)
    if not 0 <= stage <= S:
        raise ValueError(f"stage must be in [0, {S}] for {S} keep rates, got {stage}")
    N = int(num_patches)
    if stage == 0 or (stage == S and rates[-1] == 1.0):
        return StagePlan(stage, N, 0, (), N, False)
    n0 = int(N * r0)
    if n0 < 1:
        raise ValueError(f"initialization_keep_rate={r0} gives no seed token for {N} patches")
    deltas = [rates[0] - r0] + [rates[t] - rates[t - 1] for t in range(1, S)]
    substeps = []
    for t in range(1, stage + 1):
        if t < S:
            m = int(N * deltas[t - 1])
        else:
            acc = r0
            for d in deltas[:S - 1]:
                acc += d
            m = int(N * rates[S - 1]) - int(N * acc)
        if m < 0:
            raise ValueError(f"stage {t} would remove tokens (m={m}); keep_rate must be non-decreasing")
        a = m // k
        substeps.append(tuple([a] * (k - 1) + [m - (k - 1) * a]))
    kept = n0 + sum(sum(s) for s in substeps)
    if kept > N:
        raise ValueError(f"stage {stage} would keep {kept} of {N} patch tokens; check keep_rate")
    return StagePlan(stage, N, n0, tuple(substeps), kept, True)


def toe_schedule(num_patches: int, expansion_step: Sequence[int] = (0, 100, 200),
                 keep_rate: Sequence[float] = (0.5, 0.75, 1.0), initialization_keep_rate: float = 0.25,
                 expansion_multiple_stage: int = 2, total_epochs: Optional[int] = None,
                 num_prefix_tokens: int = 1, seed_stride: str = "official") -> list[dict[str, Any]]:
    """Kept-token schedule, one row per stage that has epochs (stage 0 only when ``expansion_step[0] > 0``).

    Row keys: ``stage``, ``first_epoch``, ``last_epoch`` (inclusive; None for an open end), ``epochs``, ``active``,
    ``seeds``, ``seed_positions`` (list, empty when inactive), ``substeps`` (flattened sub-step sizes of all stages
    replayed), ``added`` (per stage), ``kept_patches``, ``seq_len`` (kept + prefix tokens, the length seen by the
    blocks after the insertion point), ``merged``.
    """
    steps, rates = _check_config(expansion_step, keep_rate, initialization_keep_rate, expansion_multiple_stage)
    bounds = [0] + list(steps)
    rows = []
    for stage in range(len(steps) + 1):
        first = bounds[stage]
        nxt = steps[stage] if stage < len(steps) else total_epochs
        if stage == 0 and steps[0] == 0:
            continue
        if nxt is not None and nxt <= first:
            continue  # a stage with no epoch (duplicate boundaries or beyond the run)
        if total_epochs is not None and first >= total_epochs:
            continue
        plan = token_plan(num_patches, stage, rates, initialization_keep_rate, expansion_multiple_stage)
        rows.append(dict(
            stage=stage, first_epoch=first, last_epoch=None if nxt is None else nxt - 1,
            epochs=None if nxt is None else nxt - first, active=plan.active, seeds=plan.seeds,
            seed_positions=seed_positions(num_patches, initialization_keep_rate, seed_stride) if plan.active else [],
            substeps=[a for s in plan.substeps for a in s], added=list(plan.added), kept_patches=plan.kept,
            seq_len=plan.kept + num_prefix_tokens, merged=plan.merged))
    return rows


def scale_expansion_step(expansion_step: Sequence[int], epochs: int, official_epochs: int = 300) -> list[int]:
    """Scale the official stage boundaries to a run of ``epochs`` epochs: ``round_half_up(e * epochs / official)``.

    ``[0, 100, 200]`` of 300 epochs -> ``[0, 1, 2]`` for 3 epochs, ``[0, 3, 7]`` for 10. Boundaries that collide
    (very short runs) give stages without epochs, which the official ``bisect_right`` rule simply skips.
    """
    if epochs < 1 or official_epochs < 1:
        raise ValueError(f"epochs and official_epochs must be >= 1, got {epochs} and {official_epochs}")
    return [int(math.floor(e * epochs / official_epochs + 0.5)) for e in expansion_step]


# ----------------------------------------------------------------------------------------------------------
# The module
# ----------------------------------------------------------------------------------------------------------
class TokenSelect(nn.Module):
    """Training-time token selection of ToE (initialization, greedy expansion, merging); no parameters.

    Args (the first five as in the official README / ``TokenSelect.__init__``):
        expansion_step: epochs at which stages 1..S start (``[0, 100, 200]`` for DeiT-S, 300 epochs).
        keep_rate: kept fraction of patch tokens per stage ``[r1, ..., rS]``; a last rate of 1.0 means off.
        initialization_keep_rate: r0, the fraction of seed tokens.
        expansion_multiple_stage: k, the greedy sub-steps per stage.
        distance: ``cosine`` | ``euclidean`` | ``manhattan`` (as shipped) | ``euclidean_corrected`` |
            ``manhattan_corrected`` (see module docstring).
        num_prefix_tokens: leading tokens excluded from selection and prepended (1 = class token; set from the
            model by :func:`attach_token_select`).
        seed_stride: ``official`` (default, the ``int(1 // r0)`` quirk) | ``corrected`` | ``uniform``.
        sparse_eval: also select in ``eval()`` mode (the official ``--sparse-eval``); default False.
        distance_impl: how euclidean/manhattan distances are computed: ``official`` (default; the official
            broadcast-and-sum formula, bit for bit, see :func:`broadcast_distance`) | ``cdist`` (``torch.cdist``;
            rounds differently, so float32 near-ties can pick other tokens).

    State: ``expansion_stage`` (set by :meth:`update_current_stage` or the :class:`ToEStageHook`) and
    ``sparse_inference`` (the official on/off flag; True here by default, and reset to False in deep copies such as
    the EMA model). The module acts only when the stage is active, the flag is on and the model is training (or
    ``sparse_eval``).
    """

    def __init__(self, expansion_step: Sequence[int] = (0, 100, 200), keep_rate: Sequence[float] = (0.5, 0.75, 1.0),
                 initialization_keep_rate: float = 0.25, expansion_multiple_stage: int = 2,
                 distance: str = "cosine", num_prefix_tokens: int = 1, seed_stride: str = "official",
                 sparse_eval: bool = False, distance_impl: str = "official") -> None:
        super().__init__()
        if distance_impl not in DISTANCE_IMPLS:
            raise ValueError(f"unknown distance_impl {distance_impl!r}; use one of {DISTANCE_IMPLS}")
        steps, rates = _check_config(expansion_step, keep_rate, initialization_keep_rate, expansion_multiple_stage)
        if distance not in DISTANCES:
            raise ValueError(f"unknown distance {distance!r}; use one of {sorted(DISTANCES)}")
        if seed_stride not in SEED_STRIDES:
            raise ValueError(f"unknown seed_stride {seed_stride!r}; use one of {SEED_STRIDES}")
        if num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
        self.expansion_step = list(steps)
        self.keep_rate = list(rates)
        self.initialization_keep_rate = float(initialization_keep_rate)
        self.expansion_multiple_stage = int(expansion_multiple_stage)
        self.distance = distance
        self.distance_impl = distance_impl
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.seed_stride = seed_stride
        self.sparse_eval = bool(sparse_eval)
        self.sparse_inference = True
        self.expansion_stage = 0
        self.store_index = False
        self.last_index: Optional[torch.Tensor] = None
        self._seed_cache: dict[tuple[int, str], torch.Tensor] = {}
        self._plan_cache: dict[tuple[int, int], StagePlan] = {}
        self._trace: Optional[list] = None
        self._truncate = False

    # -- copies (EMA) ----------------------------------------------------------------------------------------
    def __deepcopy__(self, memo: dict) -> "TokenSelect":
        """Deep copies (``ModelEmaV3``, ``copy.deepcopy(model)``) start with ``sparse_inference=False``.

        This mirrors the official scripts, where the EMA copy is made while the flag is still off and is never
        switched on; :class:`ToEStageHook` switches the flag on for the model it is given at each epoch.
        """
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = copy.deepcopy(v, memo)
        new.__dict__["sparse_inference"] = False
        new.__dict__["_seed_cache"] = {}
        return new

    # -- stage -----------------------------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.keep_rate)

    def update_current_stage(self, epoch: int) -> int:
        """Official rule: ``expansion_stage = bisect_right(expansion_step, epoch)``; returns the stage."""
        self.expansion_stage = stage_for_epoch(self.expansion_step, epoch)
        return self.expansion_stage

    def stage_active(self, stage: Optional[int] = None) -> bool:
        """Whether ``stage`` (default: current) reduces tokens: > 0 and not the last stage with keep rate 1.0."""
        s = self.expansion_stage if stage is None else stage
        return s > 0 and not (s == self.num_stages and self.keep_rate[-1] == 1.0)

    def is_active(self) -> bool:
        """Stage active, ``sparse_inference`` on, and training mode (or ``sparse_eval``)."""
        return self.stage_active() and self.sparse_inference and (self.training or self.sparse_eval)

    def plan(self, num_patches: int, stage: Optional[int] = None) -> StagePlan:
        s = self.expansion_stage if stage is None else stage
        key = (int(num_patches), int(s))
        if key not in self._plan_cache:
            self._plan_cache[key] = token_plan(num_patches, s, self.keep_rate, self.initialization_keep_rate,
                                               self.expansion_multiple_stage)
        return self._plan_cache[key]

    def extra_repr(self) -> str:
        return (f"expansion_step={self.expansion_step}, keep_rate={self.keep_rate}, "
                f"initialization_keep_rate={self.initialization_keep_rate}, "
                f"expansion_multiple_stage={self.expansion_multiple_stage}, distance={self.distance!r}, "
                f"num_prefix_tokens={self.num_prefix_tokens}, seed_stride={self.seed_stride!r}, "
                f"distance_impl={getattr(self, 'distance_impl', 'official')!r}, stage={self.expansion_stage}")

    # -- selection -------------------------------------------------------------------------------------------
    def _seed_index(self, num_patches: int, device: torch.device) -> torch.Tensor:
        key = (num_patches, str(device))
        idx = self._seed_cache.get(key)
        if idx is None:
            pos = seed_positions(num_patches, self.initialization_keep_rate, self.seed_stride)
            idx = torch.tensor(pos, dtype=torch.long, device=device)
            self._seed_cache[key] = idx
        return idx

    def pairwise_scores(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, N, N) scores between L2-normalized patch tokens, oriented as the code uses them (max = best).

        Computed in float32 (float64 for float64 input) with autocast off.

        cosine: similarity; as-shipped euclidean/manhattan: the distance itself; corrected: minus the distance.
        Distances use the official broadcast formula (:func:`broadcast_distance`) unless ``distance_impl="cdist"``.
        """
        metric, sign = DISTANCES[self.distance]
        dev = patches.device.type
        ctx = torch.autocast(dev, enabled=False) if dev in ("cuda", "cpu") else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            pn = F.normalize(patches.detach().to(torch.promote_types(patches.dtype, torch.float32)), dim=-1)
            if metric == "cosine":
                s = pn @ pn.transpose(1, 2)
            elif getattr(self, "distance_impl", "official") == "cdist":
                s = torch.cdist(pn, pn, p=2.0 if metric == "euclidean" else 1.0,
                                compute_mode="donot_use_mm_for_euclid_dist")
            else:
                s = broadcast_distance(pn, metric)
        return s if sign > 0 else -s

    @torch.no_grad()
    def select_indices(self, patches: torch.Tensor, stage: Optional[int] = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Index computations of one forward on patch tokens (B, N, C) (prefix tokens removed).

        Returns ``(kept, rest, target, chunks)``: ``kept`` (B, n) original patch positions in output order,
        ``rest`` (B, R) positions merged away (ascending), ``target`` (B, R) column in ``kept`` each goes to, and
        ``chunks`` = [seeds (n0,), then one (B, a) tensor per non-empty sub-step in the order they were added].
        """
        B, N, _ = patches.shape
        plan = self.plan(N, stage)
        if not plan.active:
            full = torch.arange(N, device=patches.device).expand(B, N)
            empty = full[:, :0]
            return full, empty, empty, [torch.arange(N, device=patches.device)]
        score = self.pairwise_scores(patches)                                    # (B, N, N)
        seeds = self._seed_index(N, patches.device)
        best = score.index_select(2, seeds).amax(-1)                             # best score vs. the selected set
        best[:, seeds] = float("inf")                                            # selected tokens are never picked
        chunks: list[torch.Tensor] = [seeds]
        picks: list[torch.Tensor] = [seeds.expand(B, -1)]
        sizes = [a for s in plan.substeps for a in s if a > 0]
        for j, a in enumerate(sizes):
            pick = best.topk(a, dim=1, largest=False, sorted=True).indices       # ascending, as the official argsort
            chunks.append(pick)
            picks.append(pick)
            best.scatter_(1, pick, float("inf"))
            if j + 1 < len(sizes):
                new = score.gather(2, pick.unsqueeze(1).expand(B, N, a)).amax(-1)
                best = torch.maximum(best, new)
        kept = torch.cat(picks, dim=1)
        R = N - kept.shape[1]
        if R == 0:
            empty = kept[:, :0]
            return kept, empty, empty, chunks
        is_kept = torch.zeros(B, N, dtype=torch.uint8, device=patches.device).scatter_(1, kept, 1)
        rest = torch.sort(is_kept, dim=1, stable=True).indices[:, :R]            # unselected, ascending position
        sub = score.gather(1, rest.unsqueeze(-1).expand(B, R, N))
        sub = sub.gather(2, kept.unsqueeze(1).expand(B, R, kept.shape[1]))       # (B, R, n)
        return kept, rest, sub.argmax(-1), chunks

    def select(self, x: torch.Tensor, stage: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Reduce a token sequence (B, L, C) whatever the mode; returns (tokens (B, p + n, C), index (B, p + n)).

        ``index`` holds original sequence positions (prefix tokens 0..p-1, patches shifted by p).
        """
        if x.dim() != 3:
            raise ValueError(f"TokenSelect expects tokens of shape (B, L, C), got {tuple(x.shape)}")
        p = self.num_prefix_tokens
        B, L, C = x.shape
        if L - p < 1:
            raise ValueError(f"sequence of {L} tokens has no patch token after {p} prefix tokens")
        prefix, patches = x[:, :p], x[:, p:]
        kept, rest, target, chunks = self.select_indices(patches, stage)
        if self._trace is not None:
            self._trace.append(dict(kept=kept, rest=rest, target=target, chunks=chunks, num_patches=L - p))
        n = kept.shape[1]
        out = patches.gather(1, kept.unsqueeze(-1).expand(B, n, C))
        if rest.shape[1] > 0:
            src = patches.gather(1, rest.unsqueeze(-1).expand(B, rest.shape[1], C))
            out = out.scatter_reduce(1, target.unsqueeze(-1).expand(B, rest.shape[1], C), src, reduce="mean",
                                     include_self=True)
        index = torch.cat([torch.arange(p, device=x.device).expand(B, p), kept + p], dim=1)
        return torch.cat([prefix, out], dim=1), index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Identity unless :meth:`is_active`; then the reduced sequence (index kept in ``last_index`` if
        ``store_index``). ``last_index`` is None after a forward that selected nothing (inactive stage, eval)."""
        self.last_index = None
        if not self.is_active():
            return x
        if self._truncate:  # MAC counting at the kept token count, without the selection itself
            return x[:, :self.num_prefix_tokens + self.plan(x.shape[1] - self.num_prefix_tokens).kept]
        out, index = self.select(x)
        if self.store_index:
            self.last_index = index
        return out

    def _block_hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return self(output)


def broadcast_distance(pn: torch.Tensor, metric: str, max_elements: int = 1 << 24) -> torch.Tensor:
    """(B, N, N) euclidean or manhattan distances between the rows of ``pn`` (B, N, C), by the official formula.

    The official ``get_score`` broadcasts ``a.unsqueeze(2) - b.unsqueeze(1)`` to (B, |U|, |S|, C) and reduces the last
    dimension (``sqrt(sum(diff ** 2))`` or ``sum(abs(diff))``). Every entry is reduced on its own, so computing
    row blocks (at most ``max_elements`` broadcast elements each, to bound memory) gives the same numbers bit for
    bit, and the matrix is exactly symmetric. ``torch.cdist`` rounds differently.
    """
    if metric not in ("euclidean", "manhattan"):
        raise ValueError(f"broadcast_distance: metric must be euclidean or manhattan, got {metric!r}")
    B, N, C = pn.shape
    out = pn.new_empty(B, N, N)
    rows = max(1, max_elements // max(1, B * N * C))
    for i in range(0, N, rows):
        diff = pn[:, i:i + rows].unsqueeze(2) - pn.unsqueeze(1)
        out[:, i:i + rows] = (torch.sqrt(torch.sum(diff ** 2, dim=-1)) if metric == "euclidean"
                              else torch.sum(torch.abs(diff), dim=-1))
    return out


def restore_positions(tokens: torch.Tensor, index: torch.Tensor, seq_len: int) -> torch.Tensor:
    """LV-ViT style restore: scatter (B, n, C) tokens back to their positions in an all-zero (B, seq_len, C)."""
    B, n, C = tokens.shape
    if index.shape != (B, n):
        raise ValueError(f"index must have shape {(B, n)}, got {tuple(index.shape)}")
    out = tokens.new_zeros(B, seq_len, C)
    return out.scatter(1, index.unsqueeze(-1).expand(B, n, C), tokens)


# ----------------------------------------------------------------------------------------------------------
# Attaching to timm models, stage hook
# ----------------------------------------------------------------------------------------------------------
def find_token_selects(model: nn.Module) -> list[TokenSelect]:
    """Every :class:`TokenSelect` inside ``model`` (works through Fabric/DDP/compile wrappers)."""
    return [m for m in model.modules() if isinstance(m, TokenSelect)]


def attach_token_select(model: nn.Module, token_select: Optional[TokenSelect] = None, block_index: int = 0,
                        **kwargs: Any) -> TokenSelect:
    """Insert ToE on the output of ``model.blocks[block_index]`` (default 0: before block 1, as the official code).

    Works on any timm ``VisionTransformer``-like model with ``blocks`` and ``num_prefix_tokens`` (class token or not,
    register tokens, distillation token). ``kwargs`` build a new :class:`TokenSelect` when none is given; its
    ``num_prefix_tokens`` is taken from the model. The module is registered as ``model.token_select`` (no
    parameters, so the state dict is unchanged) and called by a forward hook on the block, which also runs inside
    timm's gradient checkpointing. Returns the module.

    Where the selection goes in the other architectures of the workbook (compositions no paper ran):

    - **T2T-ViT** (:class:`tokenbook.models.t2t_vit.T2TViT`): after the first backbone block, as in DeiT. The T2T
      module is left alone: its soft splits re-structurize the full token grid into an image, which a subset of
      tokens cannot fill; the selection acts on the grid it produces (class token kept as prefix).
    - **ViTTM** (:class:`tokenbook.models.vittm.ViTTM`, ``num_prefix_tokens = 0``): on the process stream after the
      first layer's process block (``blocks[0]``), so that layer's write head and every later read head, process
      block and write head run on the kept process tokens. The memory stream keeps all its tokens: it is the
      model's state (read and written through attention heads whose cost is linear in the process tokens) and the
      memory head classifies from it. Needs read/write heads whose output length follows their queries
      (``lin``, ``ca``, ``la``, ``lca``; not ``tl``) and a read fusion that is not sized by the token count (not
      ``add_erase``); other configurations raise ``ValueError``.
    - Learnable Memory's :class:`~tokenbook.models.memory.MemoryViT` is a fine-tuning wrapper; ToE is a training
      method for the backbone and is not combined with it here.
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or not hasattr(model, "num_prefix_tokens"):
        raise ValueError(f"{type(model).__name__} has no 'blocks' sequence and 'num_prefix_tokens'; ToE attaches to "
                         f"timm VisionTransformer-like models")
    if not 0 <= block_index < len(blocks):
        raise ValueError(f"block_index must be in [0, {len(blocks) - 1}] for a model with {len(blocks)} blocks, "
                         f"got {block_index}")
    _check_process_stream(model)
    if find_token_selects(model):
        raise ValueError("model already has a TokenSelect attached; call detach_token_select(model) first")
    if hasattr(model, "token_select"):
        raise ValueError("model already has an attribute 'token_select'")
    p = int(model.num_prefix_tokens)
    if token_select is None:
        token_select = TokenSelect(num_prefix_tokens=p, **kwargs)
    elif kwargs:
        raise ValueError(f"pass either a TokenSelect or its arguments, not both (got {sorted(kwargs)})")
    elif token_select.num_prefix_tokens != p:
        raise ValueError(f"token_select.num_prefix_tokens={token_select.num_prefix_tokens} but the model has {p} "
                         f"prefix tokens")
    model.token_select = token_select
    blocks[block_index].register_forward_hook(token_select._block_hook)
    token_select.block_index = block_index
    return token_select


def _check_process_stream(model: nn.Module) -> None:
    """ViTTM: refuse read/write heads or fusions whose shapes are tied to the process token count."""
    if not (hasattr(model, "read_head") and hasattr(model, "read_fusion") and hasattr(model, "num_process_tokens")):
        return
    if getattr(model, "rw_head_type", None) == "tl":
        raise ValueError("ToE on ViTTM needs read/write heads whose output follows the number of queries; the "
                         "TokenLearner heads (rw_head_type='tl') always emit num_process_tokens tokens. Use 'lin' "
                         "(paper), 'ca', 'la' or 'lca'")
    if getattr(model, "fusion_type", None) == "add_erase":
        raise ValueError("ToE on ViTTM: the add_erase fusion's gate is sized by the process token count, so fewer "
                         "process tokens cannot be fused; use fusion_type='residual' (paper) or 'erase'")


def detach_token_select(model: nn.Module) -> Optional[TokenSelect]:
    """Remove the ToE hook and ``model.token_select``; returns the removed module (None if there was none)."""
    ts = getattr(model, "token_select", None)
    if not isinstance(ts, TokenSelect):
        return None
    for blk in model.blocks:
        for hid, fn in list(blk._forward_hooks.items()):
            if getattr(fn, "__self__", None) is ts:
                del blk._forward_hooks[hid]
    del model.token_select
    return ts


class ToEStageHook:
    """Training-engine hook: sets the ToE stage from the epoch (official per-epoch ``update_current_stage``).

    ``on_epoch_start(epoch, model)`` sets ``expansion_stage = bisect_right(expansion_step, epoch)`` and switches
    ``sparse_inference`` on for every TokenSelect in ``model`` (the trained model, not the EMA copy), as the
    official scripts do before each training epoch. ``state_dict``/``load_state_dict`` keep the last epoch and stage
    so a resumed run restores them (on ``on_fit_start`` or immediately when the modules are known). ``history``
    lists ``(epoch, stage, kept_fraction)`` per epoch for the keep-rate figure.
    """

    def __init__(self, token_select: Optional[TokenSelect] = None) -> None:
        self._modules: list[TokenSelect] = [token_select] if token_select is not None else []
        self.epoch: Optional[int] = None
        self.stage: Optional[int] = None
        self.history: list[tuple[int, int, float]] = []

    def _find(self, model: Optional[nn.Module]) -> list[TokenSelect]:
        if model is not None:
            found = find_token_selects(model)
            if not found:
                raise ValueError("no TokenSelect in the model; call tokenbook.methods.toe.attach_token_select(model) first")
            self._modules = found
        return self._modules

    def _apply(self) -> None:
        for ts in self._modules:
            if self.stage is not None:
                ts.expansion_stage = self.stage
            ts.sparse_inference = True

    def on_fit_start(self, fabric: Any, model: nn.Module) -> None:
        self._find(model)
        if self.stage is not None:
            self._apply()

    def on_epoch_start(self, epoch: int, model: nn.Module) -> None:
        mods = self._find(model)
        self.epoch = int(epoch)
        self.stage = mods[0].update_current_stage(epoch)
        self._apply()
        ts = mods[0]
        rate = ts.keep_rate[self.stage - 1] if ts.stage_active(self.stage) else 1.0
        self.history.append((self.epoch, self.stage, rate))

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "stage": self.stage, "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.stage = state.get("epoch"), state.get("stage")
        self.history = [tuple(h) for h in state.get("history", [])]
        if self._modules and self.stage is not None:
            self._apply()


# ----------------------------------------------------------------------------------------------------------
# MACs
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ViTDims:
    """What the analytic MAC formula needs. ``mlp_hidden`` = mlp_ratio * dim; ``attn_dim`` = q/k/v width."""
    depth: int
    dim: int
    mlp_hidden: int
    num_prefix_tokens: int = 1
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    attn_dim: Optional[int] = None

    @classmethod
    def from_model(cls, model: nn.Module) -> "ViTDims":
        blk = model.blocks[0]
        try:
            hidden = blk.mlp.fc1.out_features
            attn_dim = blk.attn.qkv.out_features // 3
        except AttributeError as e:
            raise ValueError(f"{type(model).__name__} blocks are not timm Blocks with attn.qkv and mlp.fc1") from e
        ps = model.patch_embed.patch_size
        head = getattr(model, "head", None)
        return cls(depth=len(model.blocks), dim=model.embed_dim, mlp_hidden=hidden,
                   num_prefix_tokens=int(model.num_prefix_tokens), patch_size=ps[0] if isinstance(ps, tuple) else ps,
                   in_chans=model.patch_embed.proj.in_channels,
                   num_classes=head.out_features if isinstance(head, nn.Linear) else 0, attn_dim=attn_dim)

    @classmethod
    def preset(cls, name: str) -> "ViTDims":
        """``deit_tiny``, ``deit_small``, ``deit_base`` (depth 12) and ``lvvit_small`` (depth 16, D 384, mlp 3)."""
        presets = {"deit_tiny": cls(12, 192, 768), "deit_small": cls(12, 384, 1536), "deit_base": cls(12, 768, 3072),
                   "lvvit_small": cls(16, 384, 1152)}
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; use one of {sorted(presets)}")
        return presets[name]


def vit_block_macs(seq_len: int, dim: int, mlp_hidden: int, attn_dim: Optional[int] = None) -> int:
    """MACs of one pre-norm ViT block on ``seq_len`` tokens: qkv + q k^T + attn v + proj + MLP (norms excluded).

    With ``attn_dim == dim`` and ``mlp_hidden = r * dim`` this is ``(4 + 2r) L D^2 + 2 L^2 D`` (sheet 3.3).
    """
    a = dim if attn_dim is None else attn_dim
    L = seq_len
    return L * dim * 3 * a + 2 * L * L * a + L * a * dim + 2 * L * dim * mlp_hidden


def _analytic_macs(dims: ViTDims, num_patches: int, kept: int, block_index: int) -> tuple[int, int]:
    full_len, red_len = num_patches + dims.num_prefix_tokens, kept + dims.num_prefix_tokens
    blocks = sum(vit_block_macs(full_len if i <= block_index else red_len, dims.dim, dims.mlp_hidden, dims.attn_dim)
                 for i in range(dims.depth))
    embed = num_patches * dims.dim * dims.in_chans * dims.patch_size ** 2
    head = dims.dim * dims.num_classes
    return blocks, blocks + embed + head


def _schedule_args(ts: TokenSelect) -> dict[str, Any]:
    return dict(expansion_step=ts.expansion_step, keep_rate=ts.keep_rate,
                initialization_keep_rate=ts.initialization_keep_rate,
                expansion_multiple_stage=ts.expansion_multiple_stage)


def toe_stage_macs(model: Optional[nn.Module] = None, token_select: Optional[TokenSelect] = None,
                   input_size: Optional[Sequence[int]] = None, total_epochs: Optional[int] = 300,
                   dims: Optional[ViTDims] = None, num_patches: Optional[int] = None, block_index: int = 0,
                   counted: bool = False, overhead: bool = False, **config: Any) -> list[dict[str, Any]]:
    """Per-stage kept tokens and forward MACs per image, for a model and a ToE configuration.

    Give either a ``model`` (a timm ViT, ToE attached or not; ``input_size`` defaults to the model's) or ``dims`` +
    ``num_patches``. The configuration comes from ``token_select`` (default: the one attached to the model) or
    ``config`` (``expansion_step``, ``keep_rate``, ...; defaults are the DeiT-S official ones).

    Each :func:`toe_schedule` row gets ``block_macs`` (transformer blocks only, the sheet's convention),
    ``macs`` (blocks + patch embedding + head, analytic), and with ``counted=True`` ``counted_macs`` from
    :func:`tokenbook.bench.count_macs` with the blocks after the insertion point run at the kept token count (equal to
    ``macs`` for timm ViTs); ``overhead=True`` adds ``selection_macs``, the MACs of the selection itself (score
    matrix; counted with the real TokenSelect). Requires a model for ``counted``/``overhead``.
    """
    if token_select is None and model is not None and not config:
        found = find_token_selects(model)
        token_select = found[0] if found else None
    if token_select is not None:
        if config:
            raise ValueError(f"pass either token_select or a configuration, not both (got {sorted(config)})")
        config = _schedule_args(token_select)
        block_index = getattr(token_select, "block_index", block_index)
    unknown = set(config) - {"expansion_step", "keep_rate", "initialization_keep_rate", "expansion_multiple_stage"}
    if unknown:
        raise ValueError(f"unknown ToE configuration keys {sorted(unknown)}")
    if model is not None:
        dims = dims or ViTDims.from_model(model)
        if input_size is None:
            input_size = (dims.in_chans, *model.patch_embed.img_size)
        H, W = input_size[-2], input_size[-1]
        if H % dims.patch_size or W % dims.patch_size:
            raise ValueError(f"input size {H}x{W} is not divisible by the patch size {dims.patch_size}")
        num_patches = (H // dims.patch_size) * (W // dims.patch_size)
    if dims is None or num_patches is None:
        raise ValueError("give a model, or dims and num_patches")
    if (counted or overhead) and model is None:
        raise ValueError("counted/overhead MACs need a model")
    rows = toe_schedule(num_patches, total_epochs=total_epochs, num_prefix_tokens=dims.num_prefix_tokens, **config)
    for row in rows:
        row["block_macs"], row["macs"] = _analytic_macs(dims, num_patches, row["kept_patches"], block_index)
    if counted or overhead:
        _count_stage_macs(model, rows, config, block_index, input_size, counted, overhead)
    return rows


@contextlib.contextmanager
def _forced_stage(ts: TokenSelect, stage: int, truncate: bool = False) -> Iterator[TokenSelect]:
    saved = (ts.expansion_stage, ts.sparse_eval, ts.sparse_inference, ts._truncate)
    ts.expansion_stage, ts.sparse_eval, ts.sparse_inference, ts._truncate = stage, True, True, truncate
    try:
        yield ts
    finally:
        ts.expansion_stage, ts.sparse_eval, ts.sparse_inference, ts._truncate = saved


def _count_stage_macs(model: nn.Module, rows: list[dict], config: dict, block_index: int,
                      input_size: Sequence[int], counted: bool, overhead: bool) -> None:
    from tokenbook.bench import count_macs

    attached = find_token_selects(model)
    ts = attached[0] if attached else None
    temp = ts is None
    if temp:
        ts = attach_token_select(model, block_index=block_index, **config)
    try:
        for row in rows:
            with _forced_stage(ts, row["stage"], truncate=True):
                trunc = count_macs(model, input_size=tuple(input_size))["macs"]
            if counted:
                row["counted_macs"] = trunc
            if overhead:
                with _forced_stage(ts, row["stage"]):
                    row["selection_macs"] = count_macs(model, input_size=tuple(input_size))["macs"] - trunc
    finally:
        if temp:
            detach_token_select(model)


def epoch_weighted_saving(rows: Sequence[dict[str, Any]], key: str = "block_macs") -> dict[str, float]:
    """Epoch-weighted average of ``rows[key]`` and the saving ``full / average`` (full = the full-token value).

    The rows need finite ``epochs`` (pass ``total_epochs`` to :func:`toe_stage_macs`). DeiT-S 0.5/0.75/1.0 over
    0/100/200 of 300 epochs: 1.31x on block MACs.
    """
    if any(r["epochs"] is None for r in rows):
        raise ValueError("rows need a finite number of epochs; pass total_epochs")
    full = [r[key] for r in rows if not r["active"]]
    if not full:
        raise ValueError("no full-token stage in the rows to compare with")
    total = sum(r["epochs"] for r in rows)
    avg = sum(r["epochs"] * r[key] for r in rows) / total
    return {"average": avg, "full": float(full[0]), "saving": full[0] / avg, "epochs": total}


def segment_weighted_macs(dims: ViTDims, segments: Iterable[tuple[int, int, int]], block_index: int = 0,
                          key: str = "block_macs", **config: Any) -> dict[str, float]:
    """Epoch-weighted MACs over ``(epochs, image_size, stage)`` segments (EfficientTrain + ToE, sheet 3.3).

    Returns ``average`` and ``epochs``; a stage of 0 or the full last stage gives full tokens at that resolution.
    ``config`` is the ToE configuration (default DeiT-S official); for EfficientTrain use
    ``OFFICIAL_CONFIGS['efficienttrain']`` and :data:`EFFICIENTTRAIN_SEGMENTS`.
    """
    cfg = {k: v for k, v in config.items() if k in ("keep_rate", "initialization_keep_rate",
                                                     "expansion_multiple_stage")}
    cfg.setdefault("keep_rate", (0.5, 0.75, 1.0))
    cfg.setdefault("initialization_keep_rate", 0.25)
    total, acc = 0, 0.0
    for epochs, size, stage in segments:
        if size % dims.patch_size:
            raise ValueError(f"image size {size} is not divisible by the patch size {dims.patch_size}")
        n = (size // dims.patch_size) ** 2
        plan = token_plan(n, stage, **cfg)
        blocks, whole = _analytic_macs(dims, n, plan.kept, block_index)
        acc += epochs * (blocks if key == "block_macs" else whole)
        total += epochs
    return {"average": acc / total, "epochs": total}
