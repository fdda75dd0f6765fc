"""Notebook 05_memory and the claims ledger (issue 12): the smoke run's evidence and verdicts, and the experiment
functions behind them (seeds paired by seed, per-seed means over tasks, CIs, plateau curves, the structural
checks)."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import timm
import torch

import tokenbook.models  # noqa: F401  (registers the small ViTs)
from tokenbook import claims
from tokenbook.experiments import memory

NB = "05_memory"


@pytest.fixture(scope="module")
def smoke(smoke_results):
    record, folder = smoke_results(NB)
    assert record["status"] == "ok", record
    return folder


# ----------------------------------------------------------------------------------------------------------
# the smoke run
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.notebook
def test_smoke_writes_evidence_for_every_testable_claim(smoke):
    sheet = claims.load_claims("memory")
    testable = {c.id for c in sheet if not c.not_testable_here}
    assert {"memory.beats_head", "memory.source_head_exact"} <= testable
    ev = claims.read_evidence(smoke)
    assert set(ev) == testable
    meta = json.loads((smoke / "meta.json").read_text())
    n_seeds = len(claims.parse_seeds(meta["parameters"]["seeds"]))
    assert n_seeds == 2
    for c in sheet:
        if c.id not in testable:
            continue
        e = ev[c.id]
        assert "seeds 0,1" in e.scale and "fm_4_5_6" in e.scale and "epochs" in e.scale
        if c.kind == "structural":
            assert e.value == 0.0, (c.id, e.value, e.detail)  # bit-identical on CPU float32
        else:
            assert len(e.a) == len(e.b) == n_seeds and e.plateau and "per task top-1" in e.detail
            assert all(0 <= v <= 100 for v in e.a + e.b)


@pytest.mark.notebook
def test_smoke_claims_table_has_a_verdict_for_every_claim(smoke):
    tab = pd.read_csv(smoke / "claims.csv").set_index("claim")
    sheet = claims.load_claims("memory")
    assert list(tab.index) == [c.id for c in sheet]
    assert tab["verdict"].isin(claims.VERDICTS).all() and not (tab["verdict"] == "failed").any()
    for c in sheet:
        v = tab.loc[c.id]
        if c.not_testable_here:
            assert v["verdict"] == "not_testable_here"
        elif c.kind == "empirical":
            assert v["n"] == 2 and v["ci_low"] <= v["ours"] <= v["ci_high"]
        else:
            assert v["verdict"] == "reproduced" and v["ours"] == 0.0
    # the evidence pairs the per-seed means over tasks of the claim's arms
    ps = pd.read_csv(smoke / "finetune_per_seed.csv")
    a = ps[ps.method == "memory-10"].set_index("seed")["mean over tasks"]
    b = ps[ps.method == "head"].set_index("seed")["mean over tasks"]
    assert tab.loc["memory.beats_head", "ours"] == pytest.approx((a - b).mean())


# ----------------------------------------------------------------------------------------------------------
# the experiment functions
# ----------------------------------------------------------------------------------------------------------
def _results(values: dict) -> pd.DataFrame:
    """A fake ``run_finetune_seeds`` results table from ``{(seed, task, method): top1}``."""
    return pd.DataFrame([{"seed": s, "task": t, "method": m, "mode": m.split("-")[0],
                          "cells": int(m.split("-")[1]) if m.startswith("memory-") else 0, "top1": v,
                          "task_params": 1, "paper_dataset": None} for (s, t, m), v in values.items()])


def _hist(curve):
    return pd.DataFrame({"epoch": range(1, len(curve) + 1), "val_top1": curve})


def test_eval_every():
    assert memory.eval_every(5) == 1 and memory.eval_every(207, 10) == 20 and memory.eval_every(3, 10) == 1
    cfg = memory.finetune_train_config({"epochs": 6, "batch_size": 8, "opt": "sgd", "lr": 0.1, "momentum": 0.9,
                                        "weight_decay": 0.0, "clip_grad": 0.0, "warmup_steps": 1, "sched": "cosine",
                                        "min_lr": 0.0, "accelerator": "cpu", "precision": "32-true", "seed": 0,
                                        "val_evals": 3})
    assert cfg.eval_every == 2 and cfg.clip_grad is None
    assert memory.finetune_config(cfg, "memory", 100, train_steps=40, val_evals=0).eval_every == 1
    with pytest.raises(ValueError):
        memory.eval_every(0)


def test_arm_means_seed_summary_and_per_seed_table():
    vals = {(0, "a", "head"): 50.0, (0, "b", "head"): 70.0, (0, "a", "memory-10"): 60.0, (0, "b", "memory-10"): 74.0,
            (1, "a", "head"): 52.0, (1, "b", "head"): 68.0, (1, "a", "memory-10"): 61.0, (1, "b", "memory-10"): 75.0,
            (2, "a", "head"): 51.0, (2, "b", "head"): 69.0, (2, "a", "memory-10"): 59.0}  # seed 2 lacks b/memory-10
    res = _results(vals)
    per = memory.arm_means(res)
    assert per[0] == {"head": 60.0, "memory-10": 67.0} and per[1]["memory-10"] == 68.0
    assert "memory-10" not in per[2] and per[2]["head"] == 60.0
    st = memory.seed_summary(res).set_index(["task", "method"])
    m = st.loc[("mean over tasks", "memory-10")]
    assert m["n"] == 2 and m["seeds"] == "0,1" and m["top1_mean"] == pytest.approx(67.5)
    lo, hi = claims.mean_ci([67.0, 68.0])[1:]
    assert (m["ci_low"], m["ci_high"]) == pytest.approx((lo, hi))
    assert st.loc[("a", "head"), "n"] == 3 and st.loc[("a", "head"), "top1_mean"] == pytest.approx(51.0)
    assert st.loc[("b", "memory-10"), "n"] == 2
    single = memory.seed_summary(_results({(0, "a", "head"): 40.0})).iloc[0]
    assert single["top1_mean"] == 40.0 and math.isnan(single["ci_low"])
    ps = memory.per_seed_table(res).set_index(["seed", "method"])
    assert ps.loc[(1, "memory-10"), "mean over tasks"] == 68.0 and ps.loc[(0, "head"), "a"] == 50.0


def test_side_by_side_with_seeds_pairs_the_gain():
    vals = {(s, t, m): 50.0 + 10 * (m == "memory-10") + s + (t == "b") for s in (0, 1, 2) for t in ("a", "b")
            for m in ("head", "memory-10")}
    vals[(2, "a", "memory-10")] += 3.0
    vals.update({(s, t, "memory-2"): 55.0 for s in (0, 1, 2) for t in ("a", "b")})
    side = memory.finetune_side_by_side(_results(vals)).set_index("method")
    # memory-2 is not a column of the paper's table: n/a, never invented
    assert math.isnan(side.loc["memory-2", "paper CIFAR-100"]) and side.loc["memory-2", "paper_source"] == "n/a"
    assert side.loc["memory-10", "paper CIFAR-100"] == 91.1
    assert side.loc["memory-10", "ours gain vs head"] == pytest.approx(10.5)
    gains = [10.0, 10.0, 11.5]
    assert (side.loc["memory-10", "ours gain ci_low"], side.loc["memory-10", "ours gain ci_high"]) == \
        pytest.approx(claims.mean_ci(gains)[1:])
    assert side.loc["memory-10", "n_seeds"] == 3
    cmp = memory.finetune_vs_paper(_results(vals))
    assert len(cmp[cmp.metric == "top1"]) == 6  # one row per (task, method): means over seeds
    assert math.isnan(cmp.set_index(["task", "method"]).loc[("mean over tasks", "memory-2"), "paper"])


def test_claims_evidence_pairs_by_seed_and_reports_plateau():
    vals = {}
    for s in (0, 1, 2):
        for t in ("a", "b"):
            for m, base in (("full", 80.0), ("head", 60.0), ("head+cls", 62.0), ("memory-1", 64.0),
                            ("memory-10", 65.0)):
                vals[(s, t, m)] = base + s + (t == "b")
    res = _results(vals)
    hist = {(s, t, m): _hist([10.0, 59.5, 60.0, 60.3] if m != "head" else [10.0, 30.0, 50.0, 58.0])
            for (s, t, m) in vals}
    run = memory.FinetuneRun(res, {}, hist)
    ev = {e.claim: e for e in memory.claims_evidence(run, "scale text",
                                                     {"memory.source_head_exact": (0.0, "d0")})}
    sheet = {c.id: c for c in claims.load_claims("memory")}
    testable = {i for i, c in sheet.items() if not c.not_testable_here}
    assert set(ev) == testable - {"memory.concat_equals_separate"}  # a structural claim without a value: none
    e = ev["memory.beats_head"]
    assert e.a == [65.5, 66.5, 67.5] and e.b == [60.5, 61.5, 62.5] and e.scale == "scale text"
    assert e.plateau.startswith("no") and "+8.0 pt" in e.plateau  # the head-only curves still climb
    assert "6/12 runs" in e.plateau
    assert "seed 0 head: a 60.00, b 61.00" in e.detail
    assert ev["memory.more_memory_helps"].plateau.startswith("yes")
    assert ev["memory.source_head_exact"].value == 0.0 and ev["memory.source_head_exact"].detail == "d0"
    tab = claims.verdict_table("memory", ev.values()).set_index("claim")
    assert tab.loc["memory.beats_head", "verdict"] == "reproduced" and tab.loc["memory.beats_head", "n"] == 3
    assert tab.loc["memory.approaches_full", "verdict"] == "contradicted"  # full - memory-10 = 15 pt > 4 pt
    assert tab.loc["memory.concat_equals_separate", "verdict"] == "failed"
    md = memory.claims_markdown(claims.verdict_table("memory", ev.values())).splitlines()
    assert len(md) == len(sheet) and "`memory.beats_head`" in md[2] and "**reproduced**" in md[2]
    assert "+5.00 pt" in md[2] and "n = 3" in md[2] and "not testable here" in md[-1]
    # an arm that did not run gives no pairs: failed, never reproduced
    run2 = memory.FinetuneRun(res[res.method != "memory-10"], {}, hist)
    tab2 = claims.verdict_table("memory", memory.claims_evidence(run2, "", {})).set_index("claim")
    assert (tab2.loc[["memory.beats_head", "memory.approaches_full"], "verdict"] == "failed").all()
    assert memory.val_curves(hist, ["head"], seeds=[0]) == [[10.0, 30.0, 50.0, 58.0]] * 2


def _tiny():
    torch.manual_seed(0)
    return timm.create_model("vit_fm_tiny_p4_28", num_classes=4, patch_size=7).eval().requires_grad_(False)


def test_source_head_max_diff_sees_a_destructive_model():
    bb = _tiny()
    b = memory.digits_data(img_size=28, train_size=64, val_size=40, seed=0)
    models = []
    for i, name in enumerate(("a", "b")):
        m = memory.finetune_model(bb, "memory", 10, cells=2, task=name)
        with torch.no_grad():
            for p in m.tasks[name].parameters():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
        models.append(m)
    assert memory.source_head_max_diff(bb, models + [memory.concatenate(models)], b, batch_size=16) == 0.0
    # without the Table-1 mask the source tokens see the task tokens: the check must catch it
    assert memory.source_head_max_diff(bb, [memory.naive_concatenate(models)], b, batch_size=16) > 1e-4
    with pytest.raises(ValueError):
        memory.source_head_max_diff(bb, [], b)


def test_run_finetune_seeds_pairs_by_seed():
    bb = _tiny()
    task = memory.TargetTask("d", "digits", memory.digits_data(img_size=28, train_size=64, val_size=40, seed=0))
    cfg = memory.finetune_train_config({"epochs": 2, "batch_size": 16, "opt": "sgd", "lr": 0.05, "momentum": 0.9,
                                        "weight_decay": 0.0, "clip_grad": 1.0, "warmup_steps": 1, "sched": "cosine",
                                        "min_lr": 0.0, "accelerator": "cpu", "precision": "32-true", "seed": 99},
                                       max_steps_per_epoch=2)
    methods = memory.parse_methods(["head", "memory-1"])
    run = memory.run_finetune_seeds(bb, [task], methods, cfg, [3, 4], verbose=False, macs=False)
    assert list(run.results.columns[:3]) == ["seed", "task", "method"]
    assert list(run.results["seed"]) == [3, 3, 4, 4]
    assert set(run.histories) == {(s, "d", m) for s in (3, 4) for m in ("head", "memory-1")}
    assert all(len(h["val_top1"].dropna()) == 2 for h in run.histories.values())  # evaluated every epoch
    m3, m4 = run.models[(3, "d", "memory-1")], run.models[(4, "d", "memory-1")]
    assert not torch.equal(m3.tasks["d"].memory[0], m4.tasks["d"].memory[0])  # seeds differ
    again = memory.run_finetune_seeds(bb, [task], methods, cfg, [4], verbose=False, macs=False)
    assert torch.equal(again.models[(4, "d", "memory-1")].tasks["d"].memory[0], m4.tasks["d"].memory[0])
    assert np.allclose(again.results["top1"], run.results[run.results.seed == 4]["top1"])
    with pytest.raises(ValueError, match="no seeds"):
        memory.run_finetune_seeds(bb, [task], methods, cfg, [])


def test_claims_scale_writes_the_source_classes_as_the_ledger_always_has():
    """The scale text of the ledger: class lists comma-joined (the YAML lists of the typed parameters must not leak
    their Python spelling '[0, 1, 2, 3]' into the committed ledger)."""
    p = memory.Params()
    text = memory.claims_scale(p, [], [0, 1, 2])
    assert "pre-trained here on Fashion-MNIST classes 0,1,2,3 (6000 images, 6 epochs)" in text and "[" not in text
    assert "classes 0,1,2,3" in memory.claims_scale(p.to_dict(), [], [0])
