"""ViTTM's released checkpoint (a part of :mod:`tokenbook.experiments.vittm`, which re-exports it): :data:`RELEASED`
and :func:`released_table` (the README's ViTTM-B-28 weights on the user's ImageNet val folder, by
:mod:`tokenbook.released`)."""
from __future__ import annotations

from typing import Any, Optional

__all__ = ["RELEASED", "released_table"]


# ----------------------------------------------------------------------------------------------------------------------
# Released checkpoints vs the paper (issue 20): the README's ViTTM-B-28 weights, evaluated by tokenbook.released
# ----------------------------------------------------------------------------------------------------------------------
RELEASED = [dict(
    model="vittm_base_m28p28_224.official_in1k", file=None, ref="vittm:vittm_b.in1k.top1", paper_name="ViTTM-B",
    url="https://github.com/pjjajal/EfficientTTMs (README: 'ViTTM-B-28' weights, a Google-Drive link; no file name)",
    note="the release names no file: pass paths={'vittm_base_m28p28_224.official_in1k': <file>}; ours_top1 is the "
         "memory head (the official code selects checkpoints by it), heads lists both; which head the abstract's "
         "82.9 is, and whether the released file is that run, is not stated (reference sheet 1.6, 4)")]


def released_table(params: Optional[dict] = None, **kw: Any):
    """:data:`RELEASED` evaluated on the user's ImageNet val folder (:func:`tokenbook.released.released_table`;
    arguments from ``params`` by :func:`tokenbook.released.params_kwargs`, ``kw`` win)."""
    import tokenbook.models  # noqa: F401  (registers ViTTM)
    from tokenbook import released as R

    return R.released_table(RELEASED, **R.params_kwargs(params, **kw))

