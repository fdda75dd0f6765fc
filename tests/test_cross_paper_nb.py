"""Notebook 06_cross_paper: the smoke run writes the comparison table (every arm, its seeds and every measured
column), the Pareto figure and evidence for every composition claim; the profiles give the seeds the issue asks for."""
import json

import pandas as pd
import pytest

from tokenbook.claims import load_claims, parse_seeds, read_evidence
from tokenbook.experiments import cross_paper as X

from conftest import ROOT

NB = "06_cross_paper"


def profile_params(profile: str) -> dict:
    return {**X.profile_params(profile, ROOT), "profile": profile}


@pytest.mark.parametrize("profile,n", [("smoke", 2), ("cpu", 3), ("gpu", 5), ("full", 5)])
def test_profiles_seeds_and_arms(profile, n):
    p = profile_params(profile)
    assert len(parse_seeds(p["seeds"])) == n
    # every arm, except the cpu profile's seit_ta_ca (it serves no claim; TokenAdapt doubles a token arm's cost)
    want = [a for a in X.ARMS if profile != "cpu" or a != "seit_ta_ca"]
    assert X.parse_arms(p["arms"]) == want
    # the fine-tuning target is new to the backbone: digits, or Fashion-MNIST classes the source split lacks
    target = str(p["ft_target"])
    assert target == "digits" or (target.startswith("fm:") and not set(X.parse_classes(p["source_classes"])) & {
        int(c) for c in target[3:].split(",")})
    assert p["epochs"] >= 3, "ToE needs its three stages"
    if profile == "cpu":  # 04_seit's token scale: the whole 8x8 id map of a 32 px padded image, its tuned hook
        assert (X.token_grid(p), p["crop"], p["rrc_scale_min"]) == (8, 8, 1.0)
        assert (p["emb_noise"], p["token_cutmix"], p["token_eda"]) == (0.1, 0.0, True)
        h = X.hook_settings(p)
        assert (h["crop"], h["emb_noise"], h["cutmix"], h["rrc_scale_min"]) == (8, 0.1, 0.0, 1.0)


@pytest.mark.notebook
def test_smoke_comparison_figure_and_claims(smoke_results):
    record, folder = smoke_results(NB)
    assert record["status"] == "ok"
    table = pd.read_csv(folder / "comparison.csv")
    arms = list(X.ARMS) + [k for k, *_ in X.FINETUNE_ROWS]
    assert list(table["arm"]) == arms
    assert (table["seeds"] == 2).all()
    for col in ("top1", "top1_ci_low", "top1_ci_high", "train_tmacs", "train_s", "infer_gmacs", "latency_ms",
                "trainable_params", "storage_bytes_per_image"):
        assert table[col].notna().all(), col
    t = table.set_index("arm")
    assert t.loc["seit", "storage_bytes_per_image"] < t.loc["vit", "storage_bytes_per_image"]
    assert t.loc["t2t_memory", "trainable_params"] < t.loc["t2t_full", "trainable_params"]
    assert t.loc["vit_toe", "train_tmacs"] < t.loc["vit", "train_tmacs"]
    assert t.loc["vit_toe", "infer_gmacs"] == t.loc["vit", "infer_gmacs"]  # ToE is off at inference
    runs = pd.read_csv(folder / "runs.csv")
    assert len(runs) == 2 * len(arms)
    meta = json.loads((folder / "meta.json").read_text())
    assert {"pareto", "training_curves"} <= {f["name"] for f in meta["figures"]}
    ev = read_evidence(folder)
    ids = {c.id for c in load_claims("cross_paper")}
    assert set(ev) == ids
    for c in ids:
        if c.endswith("_speedup"):  # interleaved step timing: a median ratio and its IQR
            e = ev[c]
            assert not e.a and e.q1 <= e.ratio <= e.q3 and "interleaved" in e.scale and "3 interleaved" in e.detail
        else:
            assert len(ev[c].a) == len(ev[c].b) == 2 and ev[c].scale
    speed = pd.read_csv(folder / "toe_speedup.csv")
    assert set(speed["arm"]) == {"vit_toe", "t2t_toe", "vittm_toe"}
    assert (speed["stage"] == "epoch-weighted").sum() == 3
    assert max(ev["cross_paper.memory_t2t_exact"].a) == 0.0  # exact concatenation on a T2T-ViT backbone
    claims = pd.read_csv(folder / "claims.csv")
    assert set(claims["claim"]) == ids
    # two smoke steps learn nothing: a claim may fail only by the failed-run rule (runs below their floor)
    failed = claims[claims["verdict"] == "failed"]
    assert failed["detail"].astype(str).str.startswith("failed run").all(), failed[["claim", "detail"]].to_string()
