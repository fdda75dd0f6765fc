"""Every notebook: static rules (one typed parameters cell, no outputs, no code definitions, profiles valid) and a
papermill run with the smoke profile that must write its tables and metadata."""
import json
import warnings

import nbformat
import pandas as pd
import pytest

from tokenbook.results import notebook_parameters
from tokenbook.runner import PROFILES, list_notebooks, resolve_parameters

from conftest import ROOT

NOTEBOOKS = list_notebooks(ROOT)


def test_expected_notebooks_present():
    assert NOTEBOOKS[0] == "00_baselines"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_a_thin_committed_driver(name):
    nb = nbformat.read(str(ROOT / "notebooks" / f"{name}.ipynb"), as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), "commit without outputs"
    for c in code:
        lines = c.source.splitlines()
        assert not any(l.startswith(("def ", "class ")) for l in lines), "no function/class definitions in cells"
    # every assignment line of the parameters cell is typed, commented and understood by papermill
    body = [l for l in tagged[0].source.splitlines() if l.strip() and not l.lstrip().startswith("#")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        specs = notebook_parameters(name, ROOT / "notebooks" / f"{name}.ipynb")
    assert len(specs) == len(body), f"papermill understood {len(specs)} of {len(body)} parameter lines"
    for n, s in specs.items():
        assert s["type"] in ("int", "float", "str", "bool") or s["type"] in (
            "list[int]", "list[float]", "list[str]"), f"{n} has no scalar or list type annotation"
        assert s["help"], f"{n} has no comment"
    assert {"profile", "results_root", "seed"} <= set(specs)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_profiles_exist_and_validate(name):
    for profile in PROFILES:
        params = resolve_parameters(ROOT, name, profile, {})
        assert isinstance(params, dict)


@pytest.mark.notebook
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_smoke_run_writes_tables_and_metadata(name, smoke_results):
    record, folder = smoke_results(name)
    assert record["status"] == "ok", record
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["status"] == "completed" and meta["profile"] == "smoke" and meta["notebook"] == name
    assert meta["parameters"]["profile"] == "smoke" and "seed" in meta["parameters"]
    assert meta["versions"]["torch"] and "commit" in meta["git"]
    assert meta["tables"], "the notebook wrote no tables"
    for t in meta["tables"]:
        df = pd.read_csv(folder / t["csv"])
        assert len(df) == t["rows"] and len(df) > 0
        assert (folder / t["md"]).read_text().strip()
    for f in meta["figures"]:
        assert (folder / f["png"]).stat().st_size > 1000
    assert (folder / f"{name}.ipynb").is_file() and (folder / f"{name}.html").is_file()


def test_baselines_smoke_tables(smoke_results):
    _, folder = smoke_results("00_baselines")
    cmp = pd.read_csv(folder / "efficiency_vs_published.csv")
    row = cmp[(cmp.model == "deit_small_patch16_224") & (cmp.metric == "gmacs")].iloc[0]
    assert row["paper"] == 4.6 and abs(row["ours"] - 4.6) < 0.05 and bool(row["pass"])
    assert "T2T-ViT paper" in row["paper_source"]
    hist = pd.read_csv(folder / "training_history.csv")
    assert {"train_loss", "val_top1", "lr"} <= set(hist.columns)
    # the throughput benchmark (issue 12): the floor, fit() and the options, with ratios from the same run
    tp = pd.read_csv(folder / "train_throughput.csv")
    variants = list(tp["variant"])
    assert variants[:3] == ["plain PyTorch loop (floor)", "fit()", "fit(), 1 thread"]
    assert any("side by side" in v for v in variants) and any("DataLoader" in v for v in variants)
    assert (tp["img_s"] > 0).all() and tp.loc[0, "vs_plain_loop"] == pytest.approx(1.0)
    assert tp.loc[1, "vs_fit"] == pytest.approx(1.0)
    dec = pd.read_csv(folder / "train_throughput_decision.csv")
    assert {"question", "measured", "decision"} <= set(dec.columns) and len(dec) >= 3
    # issue 19: the floors on the same split, the seeds-per-hour benchmark, and the run store's record
    fl = pd.read_csv(folder / "floors.csv").set_index("kind")
    assert fl.loc["from-scratch baseline", "model"] == "vit_fm_tiny_p4_28"
    lr_floor = fl.loc["floor"].set_index("model").filter(like="logistic", axis=0)["top1"].iloc[0]
    assert fl.loc["from-scratch baseline", "vs_logistic_floor_pts"] == pytest.approx(
        fl.loc["from-scratch baseline", "top1"] - lr_floor)
    sph = pd.read_csv(folder / "seeds_per_hour.csv")
    assert list(sph["way"])[:2] == ["sequential", "processes"] and set(sph["way"]) >= {"ensemble"}
    assert (sph["seeds_per_hour"] > 0).all() and sph.loc[0, "ratio_vs_sequential"] == pytest.approx(1.0)
    import json

    meta = json.loads((folder / "meta.json").read_text())
    assert meta["notes"]["runs"][0]["source"] == "trained" and len(meta["notes"]["runs"][0]["key"]) == 12
    # the small ViT over its seeds (smoke: 2): one row per seed, then mean, sd and the 95 % interval of the top-1
    spread = pd.read_csv(folder / "seed_spread.csv")
    assert list(spread["seed"].astype(str)) == ["0", "1", "mean", "sd (ddof 1)", "95 % CI low", "95 % CI high"]
    per_seed = spread["top1"].iloc[:2]
    assert spread["top1"].iloc[2] == pytest.approx(per_seed.mean()) and spread["top1"].iloc[3] == pytest.approx(
        per_seed.std(ddof=1))
    assert spread["top1"].iloc[4] <= spread["top1"].iloc[2] <= spread["top1"].iloc[5]
    assert meta["notes"]["small_vit_top1_seeds"] == pytest.approx(list(per_seed))
    assert set(spread["plateaued"].iloc[:2]) <= {"yes", "no"} and len(meta["notes"]["runs"]) == 2
    assert meta["notes"]["below_floor"].startswith("failed run") == (fl.loc["from-scratch baseline", "top1"] < lr_floor)


def test_throughput_decision_follows_the_numbers():
    from tokenbook.experiments.baselines import throughput_decision

    tp = pd.DataFrame([
        {"variant": "plain PyTorch loop (floor)", "img_s": 100.0, "vs_plain_loop": 1.0, "vs_fit": 1.05, "setup_s": 0},
        {"variant": "fit()", "img_s": 95.0, "vs_plain_loop": 0.95, "vs_fit": 1.0, "setup_s": 0},
        {"variant": "fit(), bf16 autocast", "img_s": 40.0, "vs_plain_loop": 0.4, "vs_fit": 0.42, "setup_s": 0},
        {"variant": "fit(), torch.compile", "img_s": 110.0, "vs_plain_loop": 1.1, "vs_fit": 1.16, "setup_s": 30.0},
        {"variant": "fit(), 1 thread", "img_s": 60.0, "vs_plain_loop": 0.6, "vs_fit": 0.63, "setup_s": 0},
        {"variant": "fit(), 2 seeds side by side (2 processes x 1 thread)", "img_s": 150.0, "vs_plain_loop": 1.5,
         "vs_fit": 1.58,
         "setup_s": 5.0}])
    d = throughput_decision(tp).set_index("question")["decision"]
    assert d["fit(), bf16 autocast"].startswith("not used")
    assert d["fit(), torch.compile"].startswith("not used")  # 1.16x does not repay 30 s in a 60 s run
    assert d["fit(), 2 seeds side by side (2 processes x 1 thread)"].startswith("worth adopting for seeded runs")
    assert d["fit(), 1 thread"].startswith("not used: all threads")
    assert d["fit() against the plain loop"].startswith("used")
