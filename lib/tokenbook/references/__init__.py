"""Paper numbers as data.

Each ``<paper>.yaml`` file in this folder holds the numbers a paper (or its official code) states, with their
source. Nothing in here is invented: a value that is not known is simply absent, and tables show ``n/a``.

Schema of one file::

    paper: ViTTM                       # short name
    title: "Token Turing Machines are Efficient Vision Models"
    reference: ../shared/papers/vittm.md
    entries:
      - id: vittm_b.in1k.top1          # unique within the file
        model: ViTTM-B                 # row label used to join with our results
        metric: top1                   # column label used to join with our results
        value: 82.9                    # number (or null when the paper gives none)
        unit: "%"
        source: "abstract"             # where exactly: "Table 3", "abstract", "README", "benchmark.py ..."
        kind: paper                    # one of SOURCE_KINDS
        tolerance: 0.5                 # optional: |ours - paper| <= tolerance is a pass (same unit)
        rel_tolerance: 0.01            # optional: relative tolerance instead
        note: "..."                    # optional

``kind`` says how much to trust the value (see ``../shared/papers/README.md``):

- ``paper``: stated in the paper (table, figure, abstract, text).
- ``official_code``: written in the official repository (README tables, configs, scripts).
- ``official_code_measured``: measured by building the official code (random init), e.g. parameter counts.
- ``computed``: arithmetic on the figures above.
- ``third_party``: third-party summaries or reproductions, not checked against the paper.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from importlib import resources
from typing import Optional

import yaml

SOURCE_KINDS = ("paper", "official_code", "official_code_measured", "computed", "third_party")
_REQUIRED = ("id", "model", "metric", "value", "unit", "source", "kind")


class ReferenceError(ValueError):
    """A reference file that does not follow the schema."""


@dataclass(frozen=True)
class Reference:
    id: str
    model: str
    metric: str
    value: Optional[float]
    unit: str
    source: str
    kind: str
    tolerance: Optional[float] = None
    rel_tolerance: Optional[float] = None
    note: str = ""

    def passes(self, ours: float) -> Optional[bool]:
        """True/False when a tolerance is defined and both values are known, else None."""
        if self.value is None or ours is None or (isinstance(ours, float) and math.isnan(ours)):
            return None
        if self.tolerance is not None:
            return abs(ours - self.value) <= self.tolerance
        if self.rel_tolerance is not None:
            return abs(ours - self.value) <= self.rel_tolerance * abs(self.value)
        return None


def available() -> list[str]:
    """Names of the reference files shipped with the package (without ``.yaml``)."""
    root = resources.files(__name__)
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def load(paper: str) -> list[Reference]:
    """Load and validate ``<paper>.yaml``; raise ``ReferenceError`` naming the file and entry on bad data.

    Parsed files are cached (entries are immutable); ``load.cache_clear()`` forgets them."""
    return list(_load(paper))


@functools.lru_cache(maxsize=None)
def _load(paper: str) -> tuple[Reference, ...]:
    names = available()
    if paper not in names:
        raise ReferenceError(f"no reference file {paper!r}; available: {', '.join(names) or 'none'}")
    text = resources.files(__name__).joinpath(f"{paper}.yaml").read_text()
    data = yaml.safe_load(text) or {}
    entries = data.get("entries")
    if not isinstance(entries, list):
        raise ReferenceError(f"{paper}.yaml: 'entries' must be a list")
    out, seen = [], set()
    for i, e in enumerate(entries):
        where = f"{paper}.yaml entry {i} ({e.get('id', '?') if isinstance(e, dict) else '?'})"
        if not isinstance(e, dict):
            raise ReferenceError(f"{where}: not a mapping")
        missing = [k for k in _REQUIRED if k not in e]
        if missing:
            raise ReferenceError(f"{where}: missing fields {missing}")
        unknown = set(e) - set(_REQUIRED) - {"tolerance", "rel_tolerance", "note"}
        if unknown:
            raise ReferenceError(f"{where}: unknown fields {sorted(unknown)}")
        if e["kind"] not in SOURCE_KINDS:
            raise ReferenceError(f"{where}: kind {e['kind']!r} is not one of {SOURCE_KINDS}")
        if e["id"] in seen:
            raise ReferenceError(f"{where}: duplicate id")
        seen.add(e["id"])
        v = e["value"]
        if v is not None and not isinstance(v, (int, float)):
            raise ReferenceError(f"{where}: value must be a number or null, got {v!r}")
        out.append(Reference(
            id=str(e["id"]), model=str(e["model"]), metric=str(e["metric"]),
            value=None if v is None else float(v), unit=str(e["unit"]), source=str(e["source"]),
            kind=str(e["kind"]), tolerance=e.get("tolerance"), rel_tolerance=e.get("rel_tolerance"),
            note=str(e.get("note", "")),
        ))
    return tuple(out)


load.cache_clear = _load.cache_clear  # type: ignore[attr-defined]


def lookup(paper: str, model: str, metric: str) -> Optional[Reference]:
    """The reference for (model, metric), or None when the paper states none."""
    for r in load(paper):
        if r.model == model and r.metric == metric:
            return r
    return None


def as_frame(paper: str):
    """All entries of a paper as a pandas DataFrame."""
    import pandas as pd

    return pd.DataFrame([r.__dict__ for r in load(paper)])
