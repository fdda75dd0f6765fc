"""The claims machinery (issue 12): verdict rule on synthetic intervals, confidence intervals against known values,
the claims schema, and the ledger builder (a claim whose experiment failed is `failed`, never `reproduced`)."""
import json

import numpy as np
import pandas as pd
import pytest

from tokenbook.claims import (Claim, ClaimError, Evidence, build_ledger, judge, load_claims, mean_ci,
                              side_of_margin, write_evidence)


@pytest.mark.parametrize("lo,hi,direction,margin,verdict", [
    (0.2, 1.0, ">", 0.0, "reproduced"), (-1.0, -0.1, ">", 0.0, "contradicted"), (-0.3, 0.4, ">", 0.0, "inconclusive"),
    (0.0, 1.0, ">", 0.0, "inconclusive"), (0.0, 1.0, ">=", 0.0, "reproduced"),     # strict vs non-strict at the edge
    (-0.4, 0.3, ">=", -0.5, "reproduced"), (-0.9, -0.6, ">=", -0.5, "contradicted"),  # "lossless": >= -0.5 pt
    (-0.7, 0.3, ">=", -0.5, "inconclusive"), (1.2, 1.4, "<=", 1.0, "contradicted"), (0.5, 0.9, "<", 1.0, "reproduced"),
    (-0.2, 0.3, "within", 0.5, "reproduced"), (0.6, 0.9, "within", 0.5, "contradicted"),
    (0.3, 0.8, "within", 0.5, "inconclusive"),
])
def test_side_of_margin(lo, hi, direction, margin, verdict):
    assert side_of_margin(lo, hi, direction, margin) == verdict


def test_t_interval_matches_the_textbook_value():
    # n=3, mean 2, sd 1: half width t_{0.975,2} * 1/sqrt(3) = 4.302653 / 1.732051 = 2.484138
    m, lo, hi = mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and hi - m == pytest.approx(2.484138, abs=1e-5) and m - lo == pytest.approx(2.484138, abs=1e-5)


def test_bootstrap_is_seeded_and_contains_the_mean():
    x = np.random.default_rng(3).normal(1.0, 0.5, size=8)
    a, b = mean_ci(x, method="bootstrap", seed=1), mean_ci(x, method="bootstrap", seed=1)
    assert a == b and a[1] < a[0] < a[2]
    with pytest.raises(ValueError, match="at least 2"):
        mean_ci([1.0])
    with pytest.raises(ValueError, match="non-finite"):
        mean_ci([1.0, float("nan")])


def _claim(**kw):
    base = dict(id="p.c", paper="p", statement="A beats B", source="paper [paper]", kind="empirical",
                a="A", b="B", metric="top1", direction=">", margin=0.0)
    return Claim(**{**base, **kw})


def test_judge_paired_seeds_gives_known_verdicts():
    c = _claim()
    up = judge(c, Evidence("p.c", a=[80.0, 81.0, 82.0], b=[79.0, 79.5, 80.5], scale="FMNIST 28px"))
    assert up.verdict == "reproduced" and up.n == 3 and up.ours == pytest.approx(4.0 / 3) and "t-interval" in up.method
    assert up.ci_low > 0 and up.scale == "FMNIST 28px"
    down = judge(c, Evidence("p.c", a=[70.0, 71.0, 70.5], b=[75.0, 76.0, 75.2]))
    assert down.verdict == "contradicted"
    noisy = judge(c, Evidence("p.c", a=[80.0, 75.0, 82.0], b=[79.0, 79.0, 79.0]))
    assert noisy.verdict == "inconclusive"


def test_every_row_states_its_criterion():
    c = _claim(quantity="top-1 of A minus top-1 of B (pt)", direction=">=", margin=-0.5, has_compare=True)
    assert c.rule == "paired" and c.criterion() == "95 % CI of a − b ≥ −0.5 pt"
    row = judge(c, Evidence("p.c", a=[80.0, 81.0], b=[79.0, 80.0])).row()
    assert (row["criterion"], row["direction"], row["margin"]) == ("95 % CI of a − b ≥ −0.5 pt", ">=", -0.5)
    hw = _claim(kind="hardware", quantity="latency of A over B (x)", direction=">=", margin=2.25, has_compare=True)
    assert hw.rule == "ratio" and hw.criterion() == "IQR of the ratio ≥ 2.25×"
    within = _claim(quantity="A minus B (points), per seed", direction="within", margin=0.5, has_compare=True)
    assert within.criterion() == "95 % CI of a − b within ±0.5 pt"
    match = _claim(kind="structural", quantity="params (M)", paper_value=22.05, tolerance=0.1)
    assert match.rule == "match" and match.criterion() == "|ours − paper| ≤ 0.1 M"
    # the unit is read from the last parenthesis that names one, wherever it stands
    assert _claim(quantity="ratio of A over B (x; median and IQR); only part of it").unit == "×"


def test_bounds_and_exactness_report_the_value_and_the_tolerance_without_an_interval():
    bound = _claim(kind="structural", quantity="tokens as % of JPEG (%)", paper_value=1.0, direction="<",
                   margin=1.0, has_compare=True)
    assert bound.rule == "bound" and bound.criterion() == "ours < 1 %"
    v = judge(bound, Evidence("p.c", value=0.72, detail="per photo 0.45-1.59 %"))
    assert (v.verdict, v.ours, v.ci_low, v.ci_high, v.n) == ("reproduced", 0.72, None, None, 1)
    assert judge(bound, Evidence("p.c", value=1.3)).verdict == "contradicted"
    assert judge(bound, Evidence("p.c", value=1.0)).verdict == "contradicted"  # strict bound
    assert judge(bound, Evidence("p.c", a=[0.5], b=[0.0])).verdict == "failed"  # a bound needs its one value
    assert judge(bound, Evidence("p.c", value=float("nan"))).verdict == "failed"
    exact = _claim(kind="composition", quantity="max |logit difference| per seed (logits)", direction="<=",
                   margin=0.0, tolerance=0.0, has_compare=True)
    assert exact.rule == "exact" and exact.criterion() == "max |a − b| over seeds ≤ 0"
    v = judge(exact, Evidence("p.c", a=[0.0, 0.0, 0.0], b=[0.0, 0.0, 0.0]))
    assert (v.verdict, v.ours, v.ci_low, v.ci_high, v.n) == ("reproduced", 0.0, None, None, 3)
    assert "largest |a − b| over 3 seed(s) = 0 vs tolerance 0" in v.method and "interval" not in v.method
    bad = judge(exact, Evidence("p.c", a=[0.0, 1e-3, 0.0], b=[0.0, 0.0, 0.0]))
    assert bad.verdict == "contradicted" and bad.ours == pytest.approx(1e-3)


def test_a_structural_target_is_a_bound_not_a_paper_value():
    with pytest.raises(ClaimError, match="bound"):
        load_claims("p", "claims:\n  - {id: p.s, statement: s, source: x, kind: structural, quantity: q, tolerance: 0}\n")
    (c,) = load_claims("p", "claims:\n  - {id: p.s, statement: s, source: x, kind: structural, quantity: d (G),\n"
                            "     compare: {direction: '<=', margin: 0.01}}\n")
    assert c.rule == "bound" and c.paper_value is None and c.criterion() == "ours ≤ 0.01 G"


def test_every_sheet_claim_has_a_criterion_and_no_target_posing_as_a_paper_value():
    sheets = ("vittm", "t2t_vit", "toe", "seit", "memory", "cross_paper")
    for c in (c for s in sheets for c in load_claims(s)):
        if not c.not_testable_here:
            assert c.criterion(), c.id
        if c.kind == "structural" and c.rule == "match":
            assert c.paper_value is not None and c.paper_value != 0, c.id
    by_id = {c.id: c for s in sheets for c in load_claims(s)}
    assert by_id["seit.storage_under_1pct"].rule == "bound"
    assert by_id["cross_paper.memory_t2t_exact"].rule == "exact"
    assert {by_id[i].rule for i in ("t2t_vit.params_all", "t2t_vit.macs_main", "toe.removable_at_test",
                                    "memory.source_head_exact", "memory.concat_equals_separate")} == {"bound"}
    assert "DeiT-S trained" not in by_id["toe.lossless"].quantity  # the cpu run is not a DeiT-S


def test_failed_never_reproduced():
    c = _claim()
    assert judge(c, None).verdict == "failed"
    assert judge(c, Evidence("p.c", a=[80.0], b=[70.0])).verdict == "failed"            # one seed: no interval
    assert judge(c, Evidence("p.c", a=[80.0, 81.0], b=[70.0])).verdict == "failed"      # unpaired
    assert judge(c, Evidence("p.c", a=[float("nan"), 81.0], b=[70.0, 71.0])).verdict == "failed"  # diverged
    nt = judge(_claim(not_testable_here="full profile of 03_toe (ImageNet, 8 GPUs)"), None)
    assert nt.verdict == "not_testable_here" and "03_toe" in nt.detail


def test_a_failed_run_behind_a_claim_makes_it_failed_whatever_the_difference(tmp_path):
    from tokenbook.claims import read_evidence, write_evidence

    c = _claim()
    clear = Evidence("p.c", a=[80.0, 81.0, 82.0], b=[70.0, 71.0, 72.5])
    assert judge(c, clear).verdict == "reproduced"
    bad = Evidence("p.c", a=[80.0, 81.0, 82.0], b=[70.0, 71.0, 72.5],
                   failed_run="failed runs below the logistic-regression floor 84.45 % on the same split: vit seed 1 (71.0 %)")
    v = judge(c, bad)
    assert v.verdict == "failed" and v.detail.startswith("failed runs below") and v.ours == pytest.approx(29.5 / 3)
    write_evidence(tmp_path, [bad])  # the reason survives the evidence file the ledger reads
    assert judge(c, read_evidence(tmp_path)["p.c"]).verdict == "failed"


def test_structural_and_hardware_claims():
    s = _claim(kind="structural", paper_value=2.4, tolerance=0.1)
    assert judge(s, Evidence("p.c", value=2.46)).verdict == "reproduced"
    assert judge(s, Evidence("p.c", value=2.6)).verdict == "contradicted"
    exact = _claim(kind="structural", paper_value=0.0, tolerance=0.0)
    assert judge(exact, Evidence("p.c", value=0.0)).verdict == "reproduced"
    assert judge(exact, Evidence("p.c", value=1e-7)).verdict == "contradicted"
    h = _claim(kind="hardware", direction=">=", margin=1.2)
    assert judge(h, Evidence("p.c", ratio=1.26, q1=1.22, q3=1.3)).verdict == "reproduced"
    assert judge(h, Evidence("p.c", ratio=1.21, q1=1.15, q3=1.27)).verdict == "inconclusive"
    assert judge(h, Evidence("p.c", ratio=1.21)).verdict == "failed"


SHEET = """
paper: X
claims:
  - id: x.gain
    statement: "A beats B"
    source: "X paper, Table 1 [paper]"
    kind: empirical
    quantity: "top-1 difference (pt)"
    paper_value: 3.1
    compare: {a: A, b: B, metric: top1, direction: ">", margin: 0.0}
  - id: x.params
    statement: "A has 22.1 M parameters"
    source: "X paper, Table 2 [paper]"
    kind: structural
    paper_value: 22.1
    tolerance: 0.05
  - id: x.imagenet
    statement: "A reaches 81.5 % on ImageNet"
    source: "X paper, Table 3 [paper]"
    kind: empirical
    not_testable_here: "full profile (ImageNet-1k, 300 epochs on 8 GPUs)"
"""


def test_schema_is_checked():
    claims = load_claims("x", SHEET)
    assert [c.id for c in claims] == ["x.gain", "x.params", "x.imagenet"] and claims[0].direction == ">"
    with pytest.raises(ClaimError, match="kind"):
        load_claims("x", SHEET.replace("kind: structural", "kind: vibes"))
    with pytest.raises(ClaimError, match="tolerance"):
        load_claims("x", SHEET.replace("    tolerance: 0.05\n", ""))
    with pytest.raises(ClaimError, match="direction"):
        load_claims("x", SHEET.replace('direction: ">"', 'direction: "bigger"'))
    with pytest.raises(ClaimError, match="duplicate"):
        load_claims("x", SHEET.replace("id: x.params", "id: x.gain"))


def test_ledger_marks_a_failed_notebook_failed(tmp_path, monkeypatch):
    import tokenbook.claims as C

    monkeypatch.setattr(C, "load_claims", lambda stem, text=None: load_claims(stem, SHEET))
    ok, bad = tmp_path / "01_x" / "cpu", tmp_path / "02_y" / "cpu"
    for d, status in ((ok, "ok"), (bad, "failed")):
        d.mkdir(parents=True)
        (d / "status.json").write_text(json.dumps({"status": status}))
        write_evidence(d, [Evidence("x.gain", a=[80.0, 81.0, 82.0], b=[79.0, 79.5, 80.5], scale="FMNIST"),
                           Evidence("x.params", value=22.05)])
    df = build_ledger(tmp_path, ["01_x", "02_y"], "cpu")
    assert list(df.columns)[:12] == ["paper", "claim", "statement", "kind", "quantity", "paper_value", "source",
                                     "criterion", "ours", "ci_low", "ci_high", "n"]
    assert {"direction", "margin", "tolerance"} <= set(df.columns)
    v = {(r.paper, r.claim): r.verdict for r in df.itertuples()}
    assert v[("x", "x.gain")] == "reproduced"  # both notebooks read the same sheet here; the ok one first
    got = df.groupby("verdict").size().to_dict()
    assert got == {"reproduced": 2, "failed": 2, "not_testable_here": 2}
    assert (tmp_path / "claims.csv").is_file() and "Claims ledger" in (tmp_path / "CLAIMS.md").read_text()
    assert pd.read_csv(tmp_path / "claims.csv")["verdict"].tolist().count("failed") == 2


# ----------------------------------------------------------------------------------------------------------
# helpers the notebooks use: seeds, plateau, paired evidence, the notebook's verdict table, ctx.add_evidence
# ----------------------------------------------------------------------------------------------------------
def test_parse_seeds():
    from tokenbook.claims import parse_seeds

    assert parse_seeds([0, 1, 2]) == [0, 1, 2] and parse_seeds(3) == [0, 1, 2] and parse_seeds((4, 5)) == [4, 5]
    for bad in ([], [0, 0], ["a", "b"], [1.5]):
        with pytest.raises(ValueError):
            parse_seeds(bad)
    with pytest.raises(TypeError, match=r"seeds must be a list \(YAML"):  # the old comma string
        parse_seeds("0,1,2")


def test_plateau_is_less_than_half_a_point_over_the_last_fifth_of_the_evaluations():
    from tokenbook.claims import Evidence, judge, plateau, plateau_note, plateau_window

    assert [plateau_window(n) for n in (1, 2, 3, 5, 8, 10, 20)] == [1, 1, 1, 1, 2, 2, 4]
    # 10 evaluations: the last 2 count; +0.4 plateaued, +0.5 not (strictly less than 0.5 pt)
    flat = [50, 60, 70, 75, 78, 79, 79.5, 79.8, 80.0, 80.2]
    assert plateau(flat) == (True, pytest.approx(0.4))
    assert plateau(flat[:-1] + [80.3])[0] is False
    # 5 evaluations: only the last one counts, however steep the start
    assert plateau([10, 40, 70, 80, 80.3]) == (True, pytest.approx(0.3))
    ok, gain = plateau([50, 60, 70, 80])
    assert not ok and gain == pytest.approx(10)
    assert plateau([50])[0] is False  # too short to tell
    # a dip at the window's start that comes back to the earlier best gained nothing; a new best beyond it did
    assert plateau([70, 80, 86, 85.2, 85.9]) == (True, pytest.approx(-0.1))
    assert plateau([70, 80, 86, 85.2, 86.6]) == (False, pytest.approx(0.6))
    assert plateau([50, 60, 70, 75, 78, 79, 79.5, 80.0, 79.0, 80.4]) == (True, pytest.approx(0.4))
    note = plateau_note([[50, 70, 80, 80.2], [40, 60, 75, 78]])
    assert note.startswith("no:") and "+3.0" in note and "1/2 runs" in note and "20 %" in note
    assert plateau_note([[70, 80, 80.2], [75, 78, 78.1]]).startswith("yes:")
    # evidence carries its curves; the verdict recomputes the note with the library's criterion
    c = Claim(id="p.c", paper="p", statement="s", source="x", kind="empirical", a="A", b="B", direction=">",
              margin=0.0, has_compare=True)
    e = Evidence("p.c", a=[80.0, 81.0], b=[79.0, 79.5], curves=[[70, 80, 80.2], [75, 78, 79.0]])
    assert e.plateau.startswith("no:") and "+1.0" in e.plateau
    e.plateau = "yes: written by an older criterion"
    assert judge(c, e).plateau.startswith("no:")


def test_paired_evidence_pairs_by_seed_and_names_missing_seeds():
    from tokenbook.claims import paired_evidence

    per_seed = {0: {"A": 80.0, "B": 78.0}, 1: {"A": 81.0, "B": 80.0}, 2: {"A": 79.0}}
    e = paired_evidence("x.y", per_seed, "A", "B", scale="s")
    assert e.a == [80.0, 81.0] and e.b == [78.0, 80.0] and "[2]" in e.detail and e.scale == "s"
    e0 = paired_evidence("x.z", per_seed, "A", 0.0)
    assert e0.a == [80.0, 81.0, 79.0] and e0.b == [0.0, 0.0, 0.0]


def test_verdict_table_and_ctx_add_evidence(tmp_path):
    from tokenbook import claims as C
    from tokenbook.results import RunContext

    ctx = RunContext("05_memory", "smoke", {}, results_root=tmp_path)
    ev = C.Evidence("memory.beats_head", a=[80.0, 81.0, 82.0], b=[70.0, 71.0, 72.5], scale="tiny")
    ctx.add_evidence(ev)
    with pytest.raises(TypeError):
        ctx.add_evidence({"claim": "memory.beats_head"})
    back = C.read_evidence(ctx.out_dir)
    assert back["memory.beats_head"].a == ev.a
    df = C.verdict_table("memory", [ev])
    row = df.set_index("claim").loc["memory.beats_head"]
    assert row["verdict"] == "reproduced" and row["n"] == 3
    # claims without evidence are failed (or not testable here), never reproduced
    others = df[df["claim"] != "memory.beats_head"]
    assert set(others["verdict"]) <= {"failed", "not_testable_here"}


def test_read_evidence_rejects_unknown_fields(tmp_path):
    from tokenbook import claims as C

    (tmp_path / "claims_evidence.json").write_text('[{"claim": "a.b", "bogus": 1}]')
    with pytest.raises(C.ClaimError, match="bogus"):
        C.read_evidence(tmp_path)


def test_ledger_marks_claims_of_a_notebook_whose_latest_run_failed(tmp_path):
    import json

    from tokenbook import claims as C

    folder = tmp_path / "05_memory" / "cpu"
    folder.mkdir(parents=True)
    (folder / "status.json").write_text(json.dumps({"status": "ok"}))
    C.write_evidence(folder, [C.Evidence("memory.beats_head", a=[80.0, 81.0, 82.0], b=[70.0, 71.0, 72.5])])
    df = C.build_ledger(tmp_path, ["05_memory"], "cpu").set_index("claim")
    assert df.loc["memory.beats_head", "verdict"] == "reproduced"
    (folder / "last_failure.json").write_text("{}")
    df = C.build_ledger(tmp_path, ["05_memory"], "cpu").set_index("claim")
    assert df.loc["memory.beats_head", "verdict"] == "failed" and "latest run" in df.loc["memory.beats_head", "detail"]


def test_seeds_by_power_and_the_seeds_an_inconclusive_claim_needs():
    from scipy import stats

    from tokenbook.claims import SEEDS_CAP, margin_distance, seeds_for

    # sd 2, distance 2: n = 7 is the first with t_{0.975, n-1} * 2 / sqrt(n) < 2 (2.447 * 2 / 2.646 = 1.85)
    assert seeds_for(2.0, 2.0) == 7
    assert stats.t.ppf(0.975, 5) * 2 / 6 ** 0.5 >= 2.0  # n = 6 is not enough
    assert seeds_for(0.0, 0.1) == 2 and seeds_for(1.0, 0.0) is None and seeds_for(100.0, 0.1) is None
    assert margin_distance(0.3, "within", 0.5) == pytest.approx(0.2) and margin_distance(-1.0, ">=", -0.5) == 0.5
    c = _claim(direction=">", margin=0.0, has_compare=True)
    v = judge(c, Evidence("p.c", a=[81.0, 78.0, 82.0], b=[79.0, 79.0, 79.0]))
    assert v.verdict == "inconclusive"
    diffs = np.array([2.0, -1.0, 3.0])
    want = seeds_for(float(diffs.std(ddof=1)), abs(float(diffs.mean())))
    assert 3 < want < SEEDS_CAP and v.seeds_needed == str(want) and f"n = {want} seeds" in v.detail
    assert judge(c, Evidence("p.c", a=[80.0, 75.0, 82.0], b=[79.0, 79.0, 79.0])).seeds_needed == f"> {SEEDS_CAP}"
    assert v.row()["seeds_needed"] == v.seeds_needed
    assert judge(c, Evidence("p.c", a=[80.0, 81.0, 82.0], b=[79.0, 79.5, 80.5])).row()["seeds_needed"] is None


def test_verdict_summary_is_written_from_the_table():
    """The notebooks' verdict paragraph comes from the claims table: each empirical row's verdict, mean and interval,
    plateau and, for a failed or inconclusive row, its reason; structural rows and untestable ones are left out."""
    from tokenbook import claims as C

    curves = [[50.0, 80.0, 85.0, 85.2], [50.0, 79.0, 84.0, 84.1]]
    ev = [C.Evidence("memory.beats_head", a=[80.0, 81.0, 82.0], b=[70.0, 71.0, 72.5], curves=curves),
          C.Evidence("memory.beats_head_cls", a=[80.0, 81.0, 82.0], b=[70.0, 71.0, 72.5],
                     failed_run="failed runs below the logistic-regression floor 84.0 %: head seed 1 (71.0 %)"),
          C.Evidence("memory.source_head_exact", value=0.0)]
    text = C.verdict_summary(C.verdict_table("memory", ev))
    lines = text.splitlines()
    first = next(x for x in lines if "`memory.beats_head`" in x)
    assert "**reproduced**" in first and "+9.83 pt" in first and "n = 3" in first and "plateau: yes" in first
    failed = next(x for x in lines if "`memory.beats_head_cls`" in x)
    assert "**failed**" in failed and "head seed 1 (71.0 %)" in failed
    assert not any("source_head_exact" in x or "cifar100" in x for x in lines)  # structural / not testable here
    assert all(x.startswith("- `") for x in lines)
    empty = C.verdict_table("memory", [])
    assert "no evidence" in C.verdict_summary(empty)


def test_seeds_are_planned_by_power_from_a_frozen_pilot(tmp_path):
    """plan_seeds: the power rule on each paired claim of a pilot evidence file; a claim within the cap grows the
    run's seeds (the next consecutive integers after the base seeds), one beyond it keeps the base seeds and says
    why; no pilot leaves the seeds alone; a missing pilot is a clear error; the plan reads only the pilot."""
    from tokenbook import claims as C

    pilot = tmp_path / "pilot.json"
    C.write_evidence(tmp_path, [
        C.Evidence("memory.beats_head", a=[80.0, 81.0, 82.0], b=[70.0, 71.0, 72.5]),      # decided: 2 seeds
        C.Evidence("memory.beats_head_cls", a=[81.0, 78.0, 82.0], b=[79.0, 79.0, 79.0]),  # sd 2.08, mean 1.33
        C.Evidence("memory.more_memory_helps", a=[80.0, 75.0, 82.0], b=[79.0, 79.0, 79.0]),  # mean ~0: > 20
        C.Evidence("memory.source_head_exact", value=0.0)])                               # not paired: skipped
    C.evidence_file(tmp_path).rename(pilot)
    need = C.seeds_for(float(np.std([2.0, -1.0, 3.0], ddof=1)), abs(float(np.mean([2.0, -1.0, 3.0]))))
    assert need is not None and 3 < need < 20
    seeds, plan = C.plan_seeds([3, 4, 5], pilot, cap=need, paper="memory")
    assert seeds == [3, 4, 5] + list(range(6, 6 + need - 3))
    plan = plan.set_index("claim")
    assert set(plan.index) == {"memory.beats_head", "memory.beats_head_cls", "memory.more_memory_helps"}
    assert plan.loc["memory.beats_head", "planned"] == 3 and plan.loc["memory.beats_head_cls", "planned"] == need
    assert plan.loc["memory.more_memory_helps", "needed"] == f"> {C.SEEDS_CAP}"
    assert "not decidable" in plan.loc["memory.more_memory_helps", "why"]
    # a cap below what a claim needs keeps the base seeds for it
    seeds, plan = C.plan_seeds([0, 1, 2], pilot, cap=need - 1, paper="memory")
    assert seeds == [0, 1, 2] and "over the cap" in plan.set_index("claim").loc["memory.beats_head_cls", "why"]
    assert C.plan_seeds([0, 1, 2], "", cap=8)[0] == [0, 1, 2] and C.plan_seeds([0, 1, 2], "", cap=8)[1].empty
    # each claim's own arms take the first `planned` of the run's seeds
    seeds, plan = C.plan_seeds([3, 4, 5], pilot, cap=need, paper="memory")
    assert C.claim_seeds(plan, seeds, "memory.beats_head_cls") == seeds
    assert C.claim_seeds(plan, seeds, "memory.more_memory_helps") == [3, 4, 5]
    assert C.claim_seeds(plan, seeds, "memory.not_in_the_pilot") == seeds
    assert C.claim_seeds(plan, seeds, "memory.more_memory_helps", "memory.beats_head_cls") == seeds
    assert C.claim_seeds(plan, seeds, "memory.more_memory_helps", "memory.beats_head") == [3, 4, 5]
    with pytest.raises(C.ClaimError, match="seed pilot"):
        C.plan_seeds([0, 1], tmp_path / "missing.json", cap=8, paper="memory")
    # relative paths are taken from the root given
    assert C.plan_seeds([0, 1, 2], "pilot.json", cap=need, paper="memory", root=tmp_path)[0] == \
        C.plan_seeds([0, 1, 2], pilot, cap=need, paper="memory")[0]


def test_the_cpu_profiles_seeds_are_what_their_pilots_plan():
    """A profile with a seed pilot trains the seeds the power rule asks of it (05_memory's cpu profile: 4 fresh
    seeds, none of the pilot's 0-2); fails when the pilot, the rule or the profile changes."""
    from pathlib import Path

    from tokenbook import claims as C
    from tokenbook.runner import profile_parameters

    root = Path(__file__).resolve().parents[1]
    p = profile_parameters(root, "05_memory", "cpu")
    seeds, plan = C.plan_seeds(p.seeds, p.seed_pilot, p.seed_cap, paper="memory", root=root)
    assert seeds == [3, 4, 5, 6] and int(plan["planned"].max()) == 4
    assert not set(seeds) & {0, 1, 2}


def test_01s_cpu_profile_plans_eight_seeds_for_section_2_and_the_memory_blocks_arms_only():
    """01_vittm's cpu profile, planned from the held-out pilot (stop 34's run): vittm.no_memory_processing's spread
    asks for 8 seeds (the cap), vittm.beats_vit for 5, so section 2 trains seeds 0-7; the memory-blocks arms train
    0-7, and the head and fusion arms, whose claims the pilot did not run, the 3 base seeds."""
    from pathlib import Path

    from tokenbook import claims as C
    from tokenbook.experiments import vittm
    from tokenbook.runner import profile_parameters

    root = Path(__file__).resolve().parents[1]
    p = profile_parameters(root, "01_vittm", "cpu")
    seeds, plan = C.plan_seeds(p.seeds, p.seed_pilot, p.seed_cap, paper="vittm", root=root)
    assert seeds == list(range(8))
    rows = plan.set_index("claim")["planned"].to_dict()
    assert rows == {"vittm.beats_vit": 5, "vittm.no_memory_processing": 8}
    got = vittm.claim_arm_seeds(plan, seeds, p.ablation_claim_ids, len(p.seeds))
    assert got["memory_blocks none"] == got["memory_blocks mlp"] == list(range(8))
    assert {a: s for a, s in got.items() if not a.startswith("memory_blocks")} == {
        a: [0, 1, 2] for a in ("lin+residual", "tl+residual", "ca+residual", "la+residual", "lca+residual",
                               "lin+erase", "lin+add_erase")}
    assert C.arm_seeds_text(got) == ("lin+residual, tl+residual, ca+residual, la+residual, lca+residual, lin+erase, "
                                     "lin+add_erase: seeds 0-2; memory_blocks none, memory_blocks mlp: seeds 0-7")


def test_arm_seeds_give_each_arm_what_its_claims_need():
    """An arm trains the seeds of the claim that needs the most of those that use it; an arm no claim uses trains
    every seed; without a plan every arm trains every seed."""
    import pandas as pd

    from tokenbook import claims as C

    plan = pd.DataFrame({"claim": ["p.a", "p.b"], "planned": [5, 3]})
    arms = {"p.a": ("x", "base"), "p.b": ("y", "base")}
    got = C.arm_seeds(plan, [0, 1, 2, 3, 4], arms, ["base", "x", "y", "z"])
    assert got == {"base": [0, 1, 2, 3, 4], "x": [0, 1, 2, 3, 4], "y": [0, 1, 2], "z": [0, 1, 2, 3, 4]}
    assert C.arm_seeds(pd.DataFrame(), [0, 1, 2], arms, ["x", "y"]) == {"x": [0, 1, 2], "y": [0, 1, 2]}
    # a claim the pilot has no row for: every seed, or the base number with unplanned=
    arms["p.new"] = ("w", "base")
    got = C.arm_seeds(plan, [0, 1, 2, 3, 4], arms, ["base", "w", "y"])
    assert got == {"base": [0, 1, 2, 3, 4], "w": [0, 1, 2, 3, 4], "y": [0, 1, 2]}
    got = C.arm_seeds(plan, [0, 1, 2, 3, 4], arms, ["base", "w", "y"], unplanned=2)
    assert got == {"base": [0, 1, 2, 3, 4], "w": [0, 1], "y": [0, 1, 2]}
    assert C.seeds_text([0, 1, 2, 3]) == "0-3" and C.seeds_text([0, 2]) == "0, 2" and C.seeds_text([4]) == "4"
    assert C.seeds_text([0, 1]) == "0, 1" and C.seeds_text([0, 1, 3]) == "0, 1, 3"
    assert C.arm_seeds_text({"x": [0, 1], "y": [0, 1]}) == "seeds [0, 1]"


def test_04s_cpu_profile_plans_five_seeds_for_the_coloradapt_arms_only():
    """04_seit's cpu profile: seit.coloradapt_gain's pilot spread asks for 5 seeds, the other claims at most 3, so
    seit and seit_ca train seeds 0-4 and the pixel and TokenAdapt arms keep seeds 0-2."""
    from pathlib import Path

    from tokenbook import claims as C
    from tokenbook.experiments import seit
    from tokenbook.runner import profile_parameters

    root = Path(__file__).resolve().parents[1]
    p = profile_parameters(root, "04_seit", "cpu")
    seeds, plan = C.plan_seeds(p.seeds, p.seed_pilot, p.seed_cap, paper="seit", root=root)
    assert seeds == [0, 1, 2, 3, 4]
    got = C.arm_seeds(plan, seeds, seit.CLAIM_ARMS, seit.parse_variants(p.variants))
    assert got == {"pixel": [0, 1, 2], "seit": [0, 1, 2, 3, 4], "seit_ca": [0, 1, 2, 3, 4],
                   "seit_ta": [0, 1, 2], "seit_ta_ca": [0, 1, 2]}
