"""Claims as data and their verdicts: the machinery of the claims ledger (issue 12).

A paper's reference sheet (``references/<stem>.yaml``) lists its claims under ``claims:``::

    claims:
      - id: toe.lossless
        statement: "ToE training is lossless: top-1 of ToE matches the baseline"
        source: "ToE paper, abstract [paper]"
        kind: empirical                 # structural | empirical | hardware | composition
        quantity: "top-1 difference (pt)"
        paper_value: 0.0                # what the paper reports (null: it gives no number)
        compare: {a: "DeiT-S + ToE", b: "DeiT-S", metric: top1, direction: ">=", margin: -0.5}
        # optional: tolerance (structural, |ours - paper_value| <= tolerance), not_testable_here: "<run that would>"

Evidence is what a notebook measured for a claim: the per-seed values of both arms (paired by seed) for an
empirical or composition claim, one value for a structural claim, a ratio with its IQR for a hardware claim.
:func:`judge` turns a claim and its evidence into a :class:`Verdict`:

- ``reproduced``: the 95 % confidence interval of the mean paired difference ``a - b`` lies on the claimed side of
  the margin; ``contradicted``: it lies on the other side; ``inconclusive``: it spans the margin;
- structural claims: ``reproduced`` when ``|ours - paper_value| <= tolerance`` (exact when the tolerance is 0),
  else ``contradicted``; a structural claim with a ``compare`` (direction, margin) and no tolerance is a bound on
  one exact value (``ours <direction> margin``): no interval, since nothing is sampled;
- exactness claims of other kinds (a ``tolerance`` on an empirical or composition claim): the largest per-seed
  ``|a - b|`` against the tolerance, no interval (an interval of zeros says nothing);
- hardware claims: the same side-of-the-margin rule on the ratio's interquartile range from interleaved timing;
  so is any claim whose evidence is such a ratio without per-seed values (the compositions' speed-ups);
- ``not_testable_here``: the claim needs ImageNet or a GPU; it names the run that would test it;
- ``failed``: no evidence (the experiment did not run or did not finish), or a failed run behind it
  (``Evidence.failed_run``: a from-scratch baseline below its logistic-regression floor): never ``reproduced``.

Confidence intervals: Student-t on the paired differences (default; exact for normal differences, the usual choice
for 3-10 seeds) or a seeded percentile bootstrap (``method="bootstrap"``). :func:`build_ledger` collects every
claim of every sheet with the evidence the notebooks wrote (``<notebook>/<profile>/claims_evidence.json``) into
the profile's ledger: ``results/claims.csv`` and ``results/CLAIMS.md`` for the committed cpu profile,
``results/claims-<profile>.csv`` and ``results/CLAIMS-<profile>.md`` for any other. Shared core: imports no paper code.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

__all__ = ["KINDS", "VERDICTS", "DIRECTIONS", "Claim", "Evidence", "Verdict", "ClaimError", "load_claims",
           "mean_ci", "side_of_margin", "judge", "evidence_file", "write_evidence", "read_evidence",
           "build_ledger", "LEDGER_COLUMNS", "parse_seeds", "plateau", "plateau_note", "plateau_window",
           "PLATEAU_FRACTION", "PLATEAU_TOL", "paired_evidence",
           "seeds_for", "margin_distance", "SEEDS_CAP", "plan_seeds", "claim_seeds", "read_evidence_file",
           "seeds_text", "arm_seeds_text",
           "verdict_table", "verdict_summary", "RULES"]

KINDS = ("structural", "empirical", "hardware", "composition")
VERDICTS = ("reproduced", "contradicted", "inconclusive", "not_testable_here", "failed")
#: ">=" / ">" / "<=" / "<": a - b on that side of the margin; "within": |a - b| <= margin
DIRECTIONS = (">=", ">", "<=", "<", "within")
LEDGER_COLUMNS = ("paper", "claim", "statement", "kind", "quantity", "paper_value", "source", "criterion", "ours",
                  "ci_low", "ci_high", "n", "method", "verdict", "seeds_needed", "direction", "margin", "tolerance",
                  "scale",
                  "plateau", "report", "detail")
#: how a claim is decided (:attr:`Claim.rule`): ``match`` |ours - paper| <= tolerance; ``bound`` one measured value
#: on the claimed side of the margin (exact, no interval); ``exact`` the largest per-seed |a - b| <= tolerance;
#: ``paired`` the 95 % interval of the mean paired difference a - b against the margin; ``ratio`` the interquartile
#: range of interleaved time ratios against the margin
RULES = ("match", "bound", "exact", "paired", "ratio")
_UNITS = {"x": "×", "pt": " pt", "points": " pt", "%": " %", "g": " G", "m": " M", "logits": "", "fraction": ""}


class ClaimError(ValueError):
    """A claims list that does not follow the schema."""


@dataclass(frozen=True)
class Claim:
    id: str
    paper: str
    statement: str
    source: str
    kind: str
    quantity: str = ""
    paper_value: Optional[float] = None
    a: str = ""
    b: str = ""
    metric: str = ""
    direction: str = ">="
    margin: float = 0.0
    tolerance: Optional[float] = None
    not_testable_here: str = ""
    note: str = ""
    has_compare: bool = False  # the sheet gave a compare: (a structural claim with one is a bound, not a match)

    @property
    def unit(self) -> str:
        """The unit as the criterion writes it, from the quantity's closing parenthesis: ``(pt)`` -> ' pt',
        ``(x; median and IQR ...)`` -> '×'; '' when none is recognised."""
        import re

        for group in reversed(re.findall(r"\(([^()]*)\)", self.quantity)):  # the last parenthesis naming a unit
            for part in re.split(r"[;,]", group):
                u = _UNITS.get(part.strip().lower())
                if u is not None:
                    return u
        return ""

    @property
    def rule(self) -> str:
        """How the claim is decided: one of :data:`RULES`."""
        if self.kind == "structural":
            return "bound" if self.has_compare and self.tolerance is None else "match"
        if self.tolerance is not None:
            return "exact"
        if self.kind == "hardware" or self.unit == "×":
            return "ratio"
        return "paired"

    def criterion(self) -> str:
        """The verdict's criterion as one short text, e.g. ``95 % CI of a − b ≥ −0.5 pt``, ``IQR of the ratio ≥ 2.25×``,
        ``|ours − paper| ≤ 0.1``, ``ours < 1 %``, ``max |a − b| over seeds ≤ 0``: an interval "≥ m" lies wholly on
        that side of the margin when the claim is reproduced."""
        sym = {">=": "≥", ">": ">", "<=": "≤", "<": "<"}
        u, rule = self.unit, self.rule

        def num(v: float) -> str:
            return f"{v:g}".replace("-", "−")

        if rule == "match":
            return "" if self.tolerance is None else f"|ours − paper| ≤ {num(self.tolerance)}{u}"
        if rule == "exact":
            return f"max |a − b| over seeds ≤ {num(self.tolerance)}{u}"
        if not self.has_compare:
            return ""
        if rule == "bound" and self.direction == "within":
            return f"|ours| ≤ {num(self.margin)}{u}"
        if rule == "bound":
            return f"ours {sym[self.direction]} {num(self.margin)}{u}"
        what = "IQR of the ratio" if rule == "ratio" else "95 % CI of a − b"
        if self.direction == "within":
            return f"{what} within ±{num(self.margin)}{u}"
        return f"{what} {sym[self.direction]} {num(self.margin)}{u or ('×' if rule == 'ratio' else '')}"


@dataclass
class Evidence:
    """What a notebook measured for one claim. ``a``/``b``: per-seed values of the two arms, paired by position
    (same seed); ``value``: one number (structural); ``ratio``/``q1``/``q3``: median ratio and IQR (hardware)."""
    claim: str
    scale: str = ""
    a: list[float] = field(default_factory=list)
    b: list[float] = field(default_factory=list)
    value: Optional[float] = None
    ratio: Optional[float] = None
    q1: Optional[float] = None
    q3: Optional[float] = None
    report: str = ""
    detail: str = ""
    plateau: str = ""  # did validation top-1 plateau (see :func:`plateau`): "yes: ..." / "no: ..." / ""
    #: the validation top-1 curve (points, one value per evaluation) of every run behind the claim; when given, the
    #: plateau note is computed from them with the library's one criterion (:func:`plateau`), at evidence time and
    #: again by :func:`judge`, so a ledger always applies the current criterion
    curves: list[list[float]] = field(default_factory=list)
    #: why a run behind the claim is a failed run (e.g. a from-scratch baseline below its logistic-regression floor,
    #: :func:`tokenbook.floors.below_floor`); when set the verdict is ``failed`` whatever the numbers say
    failed_run: str = ""

    def __post_init__(self):
        if self.curves and not self.plateau:
            self.plateau = plateau_note(self.curves)


@dataclass
class Verdict:
    claim: Claim
    verdict: str
    ours: Optional[float] = None
    ci_low: Optional[float] = None
    ci_high: Optional[float] = None
    n: int = 0
    method: str = ""
    scale: str = ""
    report: str = ""
    detail: str = ""
    plateau: str = ""
    seeds_needed: str = ""  # inconclusive paired claims: the seeds the measured spread needs (see seeds_for)

    def row(self) -> dict[str, Any]:
        c = self.claim
        return {"paper": c.paper, "claim": c.id, "statement": c.statement, "kind": c.kind, "quantity": c.quantity,
                "paper_value": c.paper_value, "source": c.source, "criterion": c.criterion(), "ours": self.ours,
                "ci_low": self.ci_low, "ci_high": self.ci_high, "n": self.n, "method": self.method,
                "verdict": self.verdict, "seeds_needed": self.seeds_needed or None,
                "direction": c.direction if c.has_compare else None,
                "margin": c.margin if c.has_compare else None, "tolerance": c.tolerance, "scale": self.scale,
                "plateau": self.plateau, "report": self.report, "detail": self.detail}


# ----------------------------------------------------------------------------------------------------------
# the claims lists of the reference sheets
# ----------------------------------------------------------------------------------------------------------
_FIELDS = {"id", "statement", "source", "kind", "quantity", "paper_value", "compare", "tolerance",
           "not_testable_here", "note"}


def _parse(paper: str, i: int, e: Any) -> Claim:
    where = f"{paper}.yaml claim {i} ({e.get('id', '?') if isinstance(e, dict) else '?'})"
    if not isinstance(e, dict):
        raise ClaimError(f"{where}: not a mapping")
    missing = [k for k in ("id", "statement", "source", "kind") if k not in e]
    if missing:
        raise ClaimError(f"{where}: missing fields {missing}")
    unknown = set(e) - _FIELDS
    if unknown:
        raise ClaimError(f"{where}: unknown fields {sorted(unknown)}")
    if e["kind"] not in KINDS:
        raise ClaimError(f"{where}: kind {e['kind']!r} is not one of {KINDS}")
    pv = e.get("paper_value")
    if pv is not None and not isinstance(pv, (int, float)):
        raise ClaimError(f"{where}: paper_value must be a number or null, got {pv!r}")
    cmp = e.get("compare") or {}
    if not isinstance(cmp, dict):
        raise ClaimError(f"{where}: compare must be a mapping")
    bad = set(cmp) - {"a", "b", "metric", "direction", "margin"}
    if bad:
        raise ClaimError(f"{where}: unknown compare fields {sorted(bad)}")
    direction = cmp.get("direction", ">=")
    if direction not in DIRECTIONS:
        raise ClaimError(f"{where}: direction {direction!r} is not one of {DIRECTIONS}")
    if e["kind"] in ("empirical", "composition") and not e.get("not_testable_here") and not cmp:
        raise ClaimError(f"{where}: an {e['kind']} claim needs compare: {{a, b, metric, direction, margin}}")
    if e["kind"] == "structural" and not e.get("not_testable_here"):
        if e.get("tolerance") is None and not ("direction" in cmp and "margin" in cmp):
            raise ClaimError(f"{where}: a structural claim needs a tolerance (|ours - paper_value| <= tolerance, 0 "
                             "for exact) or a bound (compare: {direction, margin})")
        if e.get("tolerance") is not None and pv is None:
            raise ClaimError(f"{where}: a structural claim with a tolerance needs the paper_value it matches; "
                             "a target that is not the paper's number is a bound (compare: {direction, margin})")
    return Claim(id=str(e["id"]), paper=paper, statement=str(e["statement"]), source=str(e["source"]),
                 kind=str(e["kind"]), quantity=str(e.get("quantity", "")),
                 paper_value=None if pv is None else float(pv), a=str(cmp.get("a", "")), b=str(cmp.get("b", "")),
                 metric=str(cmp.get("metric", "")), direction=direction, margin=float(cmp.get("margin", 0.0)),
                 tolerance=None if e.get("tolerance") is None else float(e["tolerance"]),
                 not_testable_here=str(e.get("not_testable_here") or ""), note=str(e.get("note", "")),
                 has_compare=bool(cmp))


def load_claims(paper: str, text: Optional[str] = None) -> list[Claim]:
    """The ``claims:`` list of ``references/<paper>.yaml`` (or of ``text``), validated; ids are unique."""
    import yaml

    if text is None:
        from importlib import resources

        text = resources.files("tokenbook.references").joinpath(f"{paper}.yaml").read_text()
    data = yaml.safe_load(text) or {}
    items = data.get("claims") or []
    if not isinstance(items, list):
        raise ClaimError(f"{paper}.yaml: 'claims' must be a list")
    out = [_parse(paper, i, e) for i, e in enumerate(items)]
    ids = [c.id for c in out]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ClaimError(f"{paper}.yaml: duplicate claim ids {dup}")
    return out


# ----------------------------------------------------------------------------------------------------------
# statistics and the verdict rule
# ----------------------------------------------------------------------------------------------------------
def mean_ci(values: Sequence[float], level: float = 0.95, method: str = "t", n_boot: int = 10_000,
            seed: int = 0) -> tuple[float, float, float]:
    """Mean and ``level`` confidence interval of ``values`` (e.g. paired differences across seeds).

    ``method="t"``: Student-t interval ``mean +- t_{(1+level)/2, n-1} * sd / sqrt(n)``; ``"bootstrap"``: percentile
    interval of ``n_boot`` resampled means (seeded, so a seed gives the same interval). Needs at least 2 values."""
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or len(x) < 2:
        raise ValueError(f"a confidence interval needs at least 2 values, got {len(x)}")
    if not np.isfinite(x).all():
        raise ValueError(f"non-finite values: {x.tolist()}")
    m = float(x.mean())
    if method == "t":
        from scipy import stats

        half = float(stats.t.ppf((1 + level) / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
        return m, m - half, m + half
    if method == "bootstrap":
        rng = np.random.default_rng(seed)
        means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
        lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
        return m, float(lo), float(hi)
    raise ValueError(f"unknown method {method!r}; use 't' or 'bootstrap'")


def side_of_margin(lo: float, hi: float, direction: str, margin: float) -> str:
    """``reproduced`` / ``contradicted`` / ``inconclusive`` for an interval [lo, hi] of ``a - b`` (or a ratio)
    against the claim "``a - b`` <direction> ``margin``"."""
    if lo > hi:
        raise ValueError(f"interval [{lo}, {hi}] is empty")
    if direction in (">=", ">"):
        ok = lo >= margin if direction == ">=" else lo > margin
        bad = hi < margin if direction == ">=" else hi <= margin
    elif direction in ("<=", "<"):
        ok = hi <= margin if direction == "<=" else hi < margin
        bad = lo > margin if direction == "<=" else lo >= margin
    elif direction == "within":
        ok = -margin <= lo and hi <= margin
        bad = hi < -margin or lo > margin
    else:
        raise ValueError(f"unknown direction {direction!r}; one of {DIRECTIONS}")
    return "reproduced" if ok else "contradicted" if bad else "inconclusive"


#: the most seeds :func:`seeds_for` proposes for one claim
SEEDS_CAP = 20


def margin_distance(mean: float, direction: str, margin: float) -> float:
    """How far a measured mean of ``a - b`` lies from the claim's margin (the nearer edge for ``within``): what the
    interval's half-width must stay below for the claim to be decided."""
    if direction == "within":
        return max(0.0, min(abs(mean - margin), abs(mean + margin)))
    return abs(mean - margin)


def seeds_for(sd: float, distance: float, level: float = 0.95, cap: int = SEEDS_CAP) -> Optional[int]:
    """The power rule, written down once: the smallest number of paired seeds ``n >= 2`` whose expected Student-t
    half-width ``t_{(1+level)/2, n-1} * sd / sqrt(n)`` lies below ``distance`` (the mean's distance to the margin,
    :func:`margin_distance`; before a run, the claim's expected effect minus its margin). ``None`` when even ``cap``
    seeds would not do. Pick a claim's seeds with it before the run, from the per-seed spread of an earlier run;
    never add seeds after looking at a result."""
    from scipy import stats

    if not math.isfinite(sd) or not math.isfinite(distance) or distance <= 0:
        return None
    if sd == 0:
        return 2
    for n in range(2, cap + 1):
        if stats.t.ppf((1 + level) / 2, n - 1) * sd / math.sqrt(n) < distance:
            return n
    return None


def plan_seeds(seeds: int | Sequence[int], pilot: Optional[str | Path], cap: int, paper: Optional[str] = None,
               level: float = 0.95, root: Optional[Path] = None) -> tuple[list[int], "Any"]:
    """Seeds chosen by power before the run (issue 19, item 3): the power rule (:func:`seeds_for`) applied to every
    paired claim of a frozen pilot, the evidence file of an earlier run of the same arms at the same scale
    (``claims_evidence.json``'s format; a relative path is taken from the workbook's root ``root``).

    For each claim with at least two paired seeds in the pilot: ``sd`` of its per-seed differences ``a - b``, the
    pilot mean's distance to the claim's margin (:func:`margin_distance`), and ``needed`` = the seeds the rule says
    (``None`` when even :data:`SEEDS_CAP` would not do). A claim is *planned* at ``needed`` seeds when that is at
    most ``cap`` (the budget's limit), else it keeps the base seeds: more seeds would not decide it at this scale,
    and its row says so. The run then trains the base ``seeds`` extended by the next consecutive integers up to the
    largest planned count. Returns ``(seeds, plan)`` with ``plan`` a DataFrame, one row per claim (empty without a
    pilot, and ``seeds`` unchanged). The plan depends only on the pilot file, the base seeds and ``cap``, never
    on the run it plans, so a rerun asks for the same seeds."""
    import pandas as pd

    from .io import repo_root

    base = parse_seeds(seeds)
    cols = ["claim", "pilot seeds", "pilot mean", "pilot sd", "distance to margin", "needed", "planned", "why"]
    if not pilot:
        return base, pd.DataFrame(columns=cols)
    if not isinstance(cap, int) or cap < 2:
        raise ValueError(f"seed cap must be an integer >= 2, got {cap!r}")
    path = Path(pilot)
    if not path.is_absolute():
        path = (root or repo_root()) / path
    if not path.is_file():
        raise ClaimError(f"seed pilot {pilot!r} not found (looked at {path}): give the evidence file of an earlier "
                         "run of the same arms, or an empty seed_pilot to keep the given seeds")
    evidence = read_evidence_file(path)
    sheet = {c.id: c for c in load_claims(paper)} if paper else {}
    rows = []
    for cid, e in sorted(evidence.items()):
        c = sheet.get(cid)
        if paper and (c is None or not c.has_compare or c.rule != "paired"):
            continue
        diffs = [float(x) - float(y) for x, y in zip(e.a, e.b)] if len(e.a) == len(e.b) else []
        if len(diffs) < 2 or not all(math.isfinite(d) for d in diffs):
            continue
        mean, sd = float(np.mean(diffs)), float(np.std(diffs, ddof=1))
        dist = margin_distance(mean, c.direction, c.margin) if c is not None else abs(mean)
        need = seeds_for(sd, dist, level)
        if need is not None and need <= cap:
            planned, why = max(len(base), need), f"the rule's {need} seeds" + (
                "" if need > len(base) else f" (the base {len(base)} already do)")
        else:
            planned = len(base)
            why = (f"needs {need} seeds, over the cap of {cap}" if need else f"needs more than {SEEDS_CAP} seeds"
                   ) + ": not decidable at this scale, kept at the base seeds"
        rows.append(dict(zip(cols, [cid, len(diffs), mean, sd, dist, need or f"> {SEEDS_CAP}", planned, why])))
    plan = pd.DataFrame(rows, columns=cols)
    n = max([len(base), *plan["planned"].tolist()])
    extra = [s for s in range(max(base) + 1, max(base) + 1 + n) if s not in base][:n - len(base)]
    return base + extra, plan


def claim_seeds(plan: "Any", seeds: Sequence[int], *claims: str, unplanned: Optional[int] = None) -> list[int]:
    """The seeds of the arms that ``claims`` need under a :func:`plan_seeds` plan: the first ``planned`` of the
    run's ``seeds`` for the claim that needs the most (all of them when the plan has none). A claim the plan has no
    row for (its pilot had no paired seeds of it, e.g. it was not run) counts as needing ``unplanned`` seeds (the
    base seeds' number), or all of them with ``unplanned=None``. Arms that only these claims need then train only
    these seeds."""
    seeds = list(seeds)
    if plan is None or not len(plan) or not claims:
        return seeds
    rows = dict(zip(plan["claim"], plan["planned"]))
    if unplanned is None and any(c not in rows for c in claims):
        return seeds
    return seeds[:max(int(rows[c]) if c in rows else int(unplanned) for c in claims)]


def seeds_text(seeds: Sequence[int]) -> str:
    """``[0, 1, 2, 3]`` -> ``"0-3"``; a list with gaps is written out."""
    s = [int(x) for x in seeds]
    return f"{s[0]}-{s[-1]}" if len(s) > 2 and s == list(range(s[0], s[-1] + 1)) else ", ".join(map(str, s))


def arm_seeds_text(per_arm: dict[str, Sequence[int]]) -> str:
    """``{arm: seeds}`` (:func:`arm_seeds`) as text, the arms with the same seeds together:
    ``"a, b: seeds 0-7; c: seeds 0-2"``, or ``"seeds [0, 1, 2]"`` when every arm has the same."""
    groups: dict[tuple, list[str]] = {}
    for arm, s in per_arm.items():
        groups.setdefault(tuple(int(x) for x in s), []).append(arm)
    if len(groups) == 1:
        return f"seeds {list(next(iter(groups)))}"
    return "; ".join(f"{', '.join(arms)}: seeds {seeds_text(s)}" for s, arms in groups.items())


def arm_seeds(plan: "Any", seeds: Sequence[int], claim_arms: dict[str, Sequence[str]],
              arms: Sequence[str], unplanned: Optional[int] = None) -> dict[str, list[int]]:
    """The seeds each arm trains under a :func:`plan_seeds` plan: ``claim_arms`` maps a claim to the arms it
    compares, and an arm trains :func:`claim_seeds` of every claim that uses it (the most any of them needs;
    ``unplanned`` as there); an arm that no claim uses trains all of ``seeds``. ``{arm: seeds}`` in the order of
    ``arms``."""
    out = {}
    for arm in arms:
        cids = [c for c, pair in claim_arms.items() if arm in pair]
        out[arm] = claim_seeds(plan, seeds, *cids, unplanned=unplanned) if cids else list(seeds)
    return out


def judge(claim: Claim, evidence: Optional[Evidence], method: str = "t", level: float = 0.95) -> Verdict:
    """The verdict of one claim from its evidence (None: the experiment did not run: ``failed``)."""
    if claim.not_testable_here:
        return Verdict(claim, "not_testable_here", detail=f"needs: {claim.not_testable_here}")
    if evidence is None:
        return Verdict(claim, "failed", detail="no evidence: the experiment did not run or did not finish")
    base = dict(scale=evidence.scale, report=evidence.report,
                plateau=plateau_note(evidence.curves) if evidence.curves else evidence.plateau)
    try:
        rule = claim.rule
        if rule == "bound":
            if evidence.value is None:
                return Verdict(claim, "failed", detail="bound claim without a measured value", **base)
            v = float(evidence.value)
            if not math.isfinite(v):
                raise ValueError(f"non-finite value {v}")
            return Verdict(claim, side_of_margin(v, v, claim.direction, claim.margin), ours=v, n=1,
                           method=f"one exact value against the bound ({claim.criterion()})", detail=evidence.detail,
                           **base)
        if rule == "exact":
            diffs = ([abs(float(x) - float(y)) for x, y in zip(evidence.a, evidence.b)]
                     if evidence.a and len(evidence.a) == len(evidence.b) else
                     [abs(float(evidence.value))] if evidence.value is not None else [])
            if not diffs:
                return Verdict(claim, "failed", detail="exactness claim without paired values", **base)
            if not all(math.isfinite(d) for d in diffs):
                raise ValueError(f"non-finite differences: {diffs}")
            worst = max(diffs)
            ok = worst <= claim.tolerance + 1e-12 * max(1.0, claim.tolerance)
            return Verdict(claim, "reproduced" if ok else "contradicted", ours=worst, n=len(diffs),
                           method=f"largest |a − b| over {len(diffs)} seed(s) = {worst:.4g} vs tolerance "
                                  f"{claim.tolerance:g}", detail=evidence.detail, **base)
        if claim.kind == "structural":
            if evidence.value is None or claim.paper_value is None or claim.tolerance is None:
                return Verdict(claim, "failed", detail="structural claim without a measured or a paper value",
                               **base)
            diff = abs(float(evidence.value) - claim.paper_value)
            slack = 1e-12 * max(1.0, abs(claim.paper_value))  # decimal tolerances are not exact in binary
            return Verdict(claim, "reproduced" if diff <= claim.tolerance + slack else "contradicted",
                           ours=evidence.value,
                           n=1, method=f"|ours - paper| = {diff:.4g} vs tolerance {claim.tolerance:g}",
                           detail=evidence.detail, **base)
        if claim.kind == "hardware" or (evidence.ratio is not None and not evidence.a and not evidence.b):
            if evidence.ratio is None or evidence.q1 is None or evidence.q3 is None:
                return Verdict(claim, "failed", detail="hardware claim without a ratio and its IQR", **base)
            v = side_of_margin(evidence.q1, evidence.q3, claim.direction, claim.margin)
            return Verdict(claim, v, ours=evidence.ratio, ci_low=evidence.q1, ci_high=evidence.q3, n=1,
                           method="median ratio, IQR of interleaved timing", detail=evidence.detail, **base)
        a, b = list(evidence.a), list(evidence.b)
        if evidence.failed_run:  # an arm that did not learn the task decides nothing, in either direction
            m = float(np.mean([x - y for x, y in zip(a, b)])) if a and len(a) == len(b) else None
            return Verdict(claim, "failed", ours=m, n=len(a), detail=evidence.failed_run
                           + (f"; {evidence.detail}" if evidence.detail else ""), **base)
        if len(a) != len(b):
            return Verdict(claim, "failed", detail=f"unpaired evidence: {len(a)} vs {len(b)} seeds", **base)
        if len(a) < 2:
            return Verdict(claim, "failed", n=len(a), detail="fewer than 2 paired seeds: no interval", **base)
        diffs = [x - y for x, y in zip(a, b)]
        m, lo, hi = mean_ci(diffs, level=level, method=method)
        v = Verdict(claim, side_of_margin(lo, hi, claim.direction, claim.margin), ours=m, ci_low=lo, ci_high=hi,
                    n=len(diffs), method=f"paired {'t-interval' if method == 't' else 'bootstrap'} "
                                         f"{int(level * 100)} %", detail=evidence.detail, **base)
        if v.verdict == "inconclusive":
            sd = float(np.std(diffs, ddof=1))
            dist = margin_distance(m, claim.direction, claim.margin)
            need = seeds_for(sd, dist, level)
            v.seeds_needed = str(need) if need else f"> {SEEDS_CAP}"
            v.detail = ((v.detail + "; ") if v.detail else "") + (
                f"the measured spread (sd {sd:.3g} of a - b over {len(diffs)} seeds) needs "
                + (f"n = {need} seeds" if need else f"more than {SEEDS_CAP} seeds")
                + f" for a {int(level * 100)} % half-width below the mean's distance {dist:.3g} to the margin")
        return v
    except ValueError as e:  # non-finite evidence (a diverged run) is a failure, never a verdict
        return Verdict(claim, "failed", detail=str(e), **base)


# ----------------------------------------------------------------------------------------------------------
# helpers the notebooks use to build evidence
# ----------------------------------------------------------------------------------------------------------
def parse_seeds(text: int | Sequence[int]) -> list[int]:
    """``[0, 1, 2]`` (a notebook's ``seeds``) checked; an int n -> ``range(n)``. Seeds must be distinct ints."""
    from .params import as_list

    if isinstance(text, int) and not isinstance(text, bool):
        seeds = list(range(text))
    else:
        seeds = as_list(text, "seeds")
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise ValueError(f"seeds must be integers, got {text!r}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be one or more distinct integers, got {text!r}")
    return seeds


#: the plateau criterion, written down once: a run has finished learning when its validation top-1 gained less than
#: PLATEAU_TOL points over the last PLATEAU_FRACTION of its evaluations (at least one evaluation): its last value
#: against the best value it had reached before that window
PLATEAU_FRACTION = 0.2
PLATEAU_TOL = 0.5


def plateau_window(n: int) -> int:
    """Evaluations that make up "the last 20 %" of a curve of ``n`` evaluations (at least 1)."""
    return max(1, int(round(PLATEAU_FRACTION * n)))


def plateau(values: Sequence[float]) -> tuple[bool, float]:
    """Did a validation curve (top-1 in points, one value per evaluation) plateau? Returns ``(plateaued, gain)``:
    ``gain`` is what the last :func:`plateau_window` evaluations added, the last value minus the best value before
    them, and the curve plateaued when ``gain < PLATEAU_TOL`` (0.5 pt). On a rising curve that is the last value
    minus the one a window before; a curve that dipped at the window's start and came back to its earlier best has
    gained nothing (a 2,000-image validation set moves by a few tenths between evaluations). A curve with fewer
    than window + 1 finite evaluations never plateaus (nothing to compare)."""
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    w = plateau_window(len(v))
    if len(v) < w + 1:
        return False, float("nan") if not v else v[-1] - v[0]
    gain = v[-1] - max(v[:-w])
    return gain < PLATEAU_TOL, gain


def plateau_note(curves: Sequence[Sequence[float]]) -> str:
    """One line for the ledger's ``plateau`` column from the validation curves of every run behind a claim (all
    arms, all seeds): ``yes`` only when every curve plateaued (:func:`plateau`); the largest gain either way."""
    res = [plateau(c) for c in curves if len(c)]
    if not res:
        return ""
    gains = [g for _, g in res if math.isfinite(g)]
    worst = max(gains) if gains else float("nan")
    ok = all(p for p, _ in res)
    return (f"{'yes' if ok else 'no'}: at most {worst:+.1f} pt over the last {int(PLATEAU_FRACTION * 100)} % of the "
            f"evaluations ({sum(p for p, _ in res)}/{len(res)} runs gained < {PLATEAU_TOL:g} pt)")


def paired_evidence(claim: str, per_seed: dict[int, dict[str, float]], a: str, b: str | float, floors: Any = None,
                    **kw) -> Evidence:
    """Evidence for an empirical claim from ``{seed: {arm: value}}``: arm ``a`` against arm ``b`` (or against a
    constant, e.g. ``0``, when the claim bounds one quantity), paired by seed; seeds missing either arm are left out
    (and named in ``detail``). With ``floors`` (:func:`tokenbook.floors.floors_table` on the same split; the arms
    trained from scratch, values top-1 in %), a run of either arm below the logistic floor is a failed run
    (``Evidence.failed_run``)."""
    seeds = sorted(per_seed)
    keep = [s for s in seeds if a in per_seed[s] and (not isinstance(b, str) or b in per_seed[s])]
    xa = [float(per_seed[s][a]) for s in keep]
    xb = [float(per_seed[s][b]) if isinstance(b, str) else float(b) for s in keep]
    detail = kw.pop("detail", "")
    missing = [s for s in seeds if s not in keep]
    if missing:
        detail = (detail + "; " if detail else "") + f"seeds without both arms: {missing}"
    if floors is not None:
        from .floors import failed_baseline_runs

        arms = [a] + ([b] if isinstance(b, str) else [])
        kw["failed_run"] = failed_baseline_runs({arm: {s: per_seed[s][arm] for s in keep} for arm in arms}, floors)
    return Evidence(claim=claim, a=xa, b=xb, detail=detail, **kw)


def verdict_table(paper: str, evidence: Iterable[Evidence], method: str = "t") -> "Any":
    """This paper's claims judged on a notebook's evidence, as the table the notebook shows (the ledger's
    columns). Claims without evidence show as ``failed``, or ``not_testable_here``."""
    import pandas as pd

    ev = {e.claim: e for e in evidence}
    rows = [judge(c, ev.get(c.id), method=method).row() for c in load_claims(paper)]
    return pd.DataFrame(rows, columns=list(LEDGER_COLUMNS))


def verdict_summary(table: "Any", kinds: Optional[Sequence[str]] = ("empirical", "composition", "hardware")) -> str:
    """A Markdown list written from a :func:`verdict_table` (never by hand, so the text cannot drift from the run it
    describes), one line per claim of ``kinds`` (None: every claim): its verdict; for an empirical or composition
    claim the mean of ``a - b`` with its interval and ``n``, for a hardware claim the median ratio and its IQR, for a
    structural one our value and how it was compared; whether its runs plateaued; and the detail of a failed,
    inconclusive or untestable row (the run below the floor, the seeds the measured spread needs, what it needs)."""
    def num(v: Any) -> Optional[float]:
        try:
            f = float(v)
        except (TypeError, ValueError):
            return None
        return f if math.isfinite(f) else None

    lines = []
    for _, r in table.iterrows():
        if kinds is not None and (r["kind"] not in kinds or r["verdict"] == "not_testable_here"):
            continue
        ours, lo, hi, n = num(r.get("ours")), num(r.get("ci_low")), num(r.get("ci_high")), num(r.get("n"))
        text = f"- `{r['claim']}` ({r['kind']}): **{r['verdict']}**"
        if ours is not None and r["verdict"] != "not_testable_here":
            if r["kind"] == "structural":
                text += f", ours {ours:.4g}" + (f" ({r['method']})" if isinstance(r.get("method"), str) and
                                                 r.get("method") else "")
            elif r["kind"] == "hardware" or (lo is not None and n == 1):
                text += f", median {ours:.3f}x" + (f", IQR {lo:.3f}-{hi:.3f}" if lo is not None and hi is not None
                                                   else "")
            else:
                text += f", {ours:+.2f} pt" + (f" [{lo:+.2f}, {hi:+.2f}]" if lo is not None and hi is not None
                                               else "") + (f", n = {int(n)}" if n else "")
        crit = r.get("criterion")
        if isinstance(crit, str) and crit and r["verdict"] != "not_testable_here":
            text += f" (claim: {crit})"
        plat = r.get("plateau")
        if isinstance(plat, str) and plat:
            text += f"; plateau: {plat}"
        detail = r.get("detail")
        if r["verdict"] in ("failed", "inconclusive", "not_testable_here") and isinstance(detail, str) and detail:
            text += f"; {detail}"
        lines.append(text + ".")
    return "\n".join(lines) if lines else "No claim of these kinds in this table."


# ----------------------------------------------------------------------------------------------------------
# evidence files and the ledger
# ----------------------------------------------------------------------------------------------------------
def evidence_file(folder: Path) -> Path:
    return Path(folder) / "claims_evidence.json"


def write_evidence(folder: Path, evidence: Iterable[Evidence]) -> Path:
    """Write a notebook's evidence (atomically) beside its tables."""
    from .io import atomic_write

    return atomic_write(evidence_file(folder), json.dumps([asdict(e) for e in evidence], indent=1))


def read_evidence(folder: Path) -> dict[str, Evidence]:
    """The evidence a notebook wrote into ``folder`` (``{}`` when it wrote none)."""
    p = evidence_file(folder)
    if not p.is_file():
        return {}
    return read_evidence_file(p)


def read_evidence_file(p: Path) -> dict[str, Evidence]:
    """The evidence in one ``claims_evidence.json``-format file, checked."""
    try:
        items = json.loads(p.read_text())
    except ValueError as e:
        raise ClaimError(f"{p}: not valid JSON ({e})") from e
    known = set(Evidence.__dataclass_fields__)
    for d in items:
        extra = set(d) - known
        if extra or "claim" not in d:
            raise ClaimError(f"{p}: evidence entry {d.get('claim', '?')!r} has unknown fields {sorted(extra)} "
                             f"(known: {sorted(known)})")
    return {d["claim"]: Evidence(**d) for d in items}


def build_ledger(results_dir: Path, notebooks: Sequence[str], profile: str,
                 method: str = "t") -> "Any":
    """Every claim of every notebook's sheet (stem = notebook name without ``NN_``) judged on the evidence in
    ``<results_dir>/<notebook>/<profile>/``; writes the profile's ledger in ``results_dir`` (``claims.csv`` and
    ``CLAIMS.md`` for the committed cpu profile, ``claims-<profile>.csv`` and ``CLAIMS-<profile>.md`` for any other:
    :func:`tokenbook.io.site_file`) and returns the table. A notebook that failed (no ``status.json`` with ``ok``)
    contributes no evidence: its claims are ``failed``."""
    import pandas as pd

    from .io import atomic_write, site_file, to_markdown

    rows = []
    for nb in notebooks:
        stem = nb.split("_", 1)[1] if "_" in nb else nb
        try:
            claims = load_claims(stem)
        except FileNotFoundError:
            continue
        folder = Path(results_dir) / nb / profile
        status = {}
        try:
            status = json.loads((folder / "status.json").read_text())
        except (OSError, ValueError):
            pass
        last_failure = (folder / "last_failure.json").is_file()  # the latest run failed; older results are stale
        ev = read_evidence(folder) if status.get("status") == "ok" and not last_failure else {}
        for c in claims:
            v = judge(c, ev.get(c.id), method=method)
            if v.verdict == "failed" and last_failure:
                v.detail = f"the latest run of {nb} failed ({nb}/{profile}/last_failure.json); {v.detail}"
            elif v.verdict == "failed" and status.get("status") != "ok":
                v.detail = f"{nb} has no successful {profile} run; {v.detail}"
            if not v.report and (folder / f"{nb}.html").is_file():
                v.report = f"{nb}/{profile}/{nb}.html"
            rows.append(v.row())
    df = pd.DataFrame(rows, columns=list(LEDGER_COLUMNS))
    atomic_write(Path(results_dir) / site_file("claims.csv", profile), df.to_csv(index=False))
    counts = df["verdict"].value_counts().reindex(list(VERDICTS), fill_value=0) if len(df) else None
    head = ["# Claims ledger", "", f"Profile `{profile}`. Every claim of the five papers, and of the compositions no "
            "paper ran (`06_cross_paper`), with its verdict on this workbook's evidence; `scale` says what was run (a "
            "Fashion-MNIST verdict is not an ImageNet one).", ""]
    if counts is not None:
        head += [", ".join(f"{k}: {int(n)}" for k, n in counts.items()), ""]
    atomic_write(Path(results_dir) / site_file("CLAIMS.md", profile), "\n".join(head) + "\n" + to_markdown(df) + "\n")
    return df
