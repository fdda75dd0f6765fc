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
        assert s["type"] in ("int", "float", "str", "bool"), f"{n} has no scalar type annotation"
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
