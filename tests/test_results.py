import json

import pandas as pd
import pytest

from tokenbook import references
from tokenbook.results import RunContext, check_param_type, paper_vs_ours, save_table, to_markdown


def test_all_reference_files_validate():
    names = references.available()
    assert "baselines" in names
    from tokenbook.claims import load_claims

    for n in names:
        refs = references.load(n)
        # only a sheet of compositions no paper ran (cross_paper) may have no paper numbers at all
        assert refs or all(c.kind == "composition" for c in load_claims(n)), n
        for r in refs:
            assert r.kind in references.SOURCE_KINDS and r.source


def test_reference_schema_errors(tmp_path, monkeypatch):
    import yaml

    pkg = tmp_path / "refs"
    pkg.mkdir()
    (pkg / "bad.yaml").write_text(yaml.safe_dump({"entries": [{"id": "x", "model": "m", "metric": "top1",
                                                                "value": "82.9%", "unit": "%", "source": "t",
                                                                "kind": "paper"}]}))
    (pkg / "kind.yaml").write_text(yaml.safe_dump({"entries": [{"id": "x", "model": "m", "metric": "top1",
                                                                 "value": 1, "unit": "%", "source": "t",
                                                                 "kind": "blog"}]}))

    class Files:
        def __init__(self, root):
            self.root = root

        def iterdir(self):
            return self.root.iterdir()

        def joinpath(self, name):
            return self.root / name

    monkeypatch.setattr(references.resources, "files", lambda _: Files(pkg))
    references.load.cache_clear()
    with pytest.raises(references.ReferenceError, match="value must be a number"):
        references.load("bad")
    with pytest.raises(references.ReferenceError, match="kind 'blog'"):
        references.load("kind")
    with pytest.raises(references.ReferenceError, match="no reference file"):
        references.load("nope")


def test_paper_vs_ours_joins_sources_and_na():
    ours = pd.DataFrame([
        {"model": "deit_small_patch16_224", "params_m": 22.05, "gmacs": 4.599, "latency_ms": 3.0},
        {"model": "my_model", "params_m": 1.0, "gmacs": 0.1, "latency_ms": 1.0},
    ])
    t = paper_vs_ours(ours, "baselines", metrics=["params_m", "gmacs", "latency_ms"])
    row = t[(t.model == "deit_small_patch16_224") & (t.metric == "gmacs")].iloc[0]
    assert row["paper"] == 4.6 and row["diff"] == pytest.approx(-0.001) and row["pass"] is True
    assert "Table 2" in row["paper_source"] and "[paper]" in row["paper_source"]
    lat = t[(t.model == "deit_small_patch16_224") & (t.metric == "latency_ms")].iloc[0]
    assert pd.isna(lat["paper"]) and lat["paper_source"] == "n/a" and pd.isna(lat["pass"])
    md = to_markdown(t)
    assert "n/a" in md
    # a far-off value fails its tolerance
    bad = paper_vs_ours(pd.DataFrame([{"model": "deit_small_patch16_224", "gmacs": 4.24}]), "baselines")
    assert bad.iloc[0]["pass"] is False or bad.iloc[0]["pass"] == False  # noqa: E712


def test_run_context_writes_atomically(tmp_path):
    ctx = RunContext("00_test", "smoke", {"seed": 3, "lr": 0.1}, results_root=tmp_path)
    df = pd.DataFrame({"model": ["a", "b"], "top1": [1.0, None]})
    ctx.save_table("t", df, caption="cap")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1])
    ctx.save_figure("f", fig)
    with ctx.timer("phase"):
        pass
    ctx.note("headline", 1.5)
    meta = ctx.finish()
    out = tmp_path / "00_test" / "smoke"
    assert pd.read_csv(out / "t.csv").shape == (2, 2)
    assert "cap" in (out / "t.md").read_text() and "n/a" in (out / "t.md").read_text()
    m = json.loads((out / "meta.json").read_text())
    assert m["status"] == "completed" and m["parameters"] == {"seed": 3, "lr": 0.1} and m["seed"] == 3
    assert m["tables"][0]["name"] == "t" and m["figures"][0]["png"] == "f.png" and "phase" in m["timings_s"]
    assert m["notes"]["headline"] == 1.5 and m["versions"]["torch"] and "dirty" in m["git"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left behind


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    save_table(pd.DataFrame({"a": [1]}), "t", tmp_path)
    import tokenbook.results as R

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(R.os, "replace", boom)
    with pytest.raises(OSError):
        save_table(pd.DataFrame({"a": [2]}), "t", tmp_path)
    assert pd.read_csv(tmp_path / "t.csv")["a"].tolist() == [1]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_param_type_checks():
    assert check_param_type("lr", 1, "float") == 1.0
    with pytest.raises(TypeError, match="'epochs' must be int"):
        check_param_type("epochs", "ten", "int")
    with pytest.raises(TypeError, match="must be int"):
        check_param_type("epochs", True, "int")
    with pytest.raises(TypeError, match="must be bool"):
        check_param_type("latency", "yes", "bool")


def test_param_type_scientific_notation():
    import yaml

    # PyYAML (YAML 1.1) loads these as strings; they are floats wherever a float is expected
    for text, want in (("1e-3", 1e-3), ("5e-4", 5e-4), ("1e9", 1e9), ("5E-4", 5e-4), ("-2.5e+1", -25.0)):
        assert check_param_type("lr", yaml.safe_load(f"lr: {text}")["lr"], "float") == want
        assert isinstance(check_param_type("lr", text, "float"), float)
    # ints in that notation only when integral
    assert check_param_type("steps", "1e3", "int") == 1000 and isinstance(check_param_type("steps", "1e3", "int"), int)
    assert check_param_type("steps", 2000.0, "int") == 2000
    with pytest.raises(TypeError, match="'steps' must be int, got float 0.001 \\(not a whole number\\)"):
        check_param_type("steps", "1e-3", "int")
    with pytest.raises(TypeError, match="'lr' must be float, got str '1e-3x'"):
        check_param_type("lr", "1e-3x", "float")
    assert check_param_type("name", "1e-3", "str") == "1e-3"  # strings stay strings
    with pytest.raises(TypeError, match="must be float"):
        check_param_type("lr", True, "float")


def test_same_seed_identical_tables(tmp_path):
    """The determinism promise: the same seed gives identical tables on the same CPU machine."""
    import timm
    import torch

    from tokenbook import repro
    from tokenbook.train import TrainConfig, fit

    def run(root):
        repro.seed_everything(11)
        g = torch.Generator().manual_seed(11)
        x, y = torch.randn(96, 3, 8, 8, generator=g), torch.arange(96) % 3
        tl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True,
                                         generator=repro.loader_generator(11))
        m = timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2,
                              num_classes=3)
        r = fit(m, tl, tl, TrainConfig(epochs=2, lr=1e-3, progress=False, accelerator="cpu", seed=11))
        ctx = RunContext("00_det", "smoke", {"seed": 11}, results_root=root)
        ctx.save_table("history", r.history.drop(columns=[c for c in r.history.columns if "time" in c]))
        return (root / "00_det" / "smoke" / "history.csv").read_bytes()

    assert run(tmp_path / "a") == run(tmp_path / "b")


def test_a_run_is_stamped_with_the_commit_it_started_from():
    """meta.json's git record: the start's commit; dirty when the tree was dirty at either end or HEAD moved."""
    from tokenbook.results import run_git_info

    a, b = {"commit": "a" * 40, "dirty": False}, {"commit": "b" * 40, "dirty": False}
    assert run_git_info(a, a) == {"commit": "a" * 40, "dirty": False}
    assert run_git_info(a, {**a, "dirty": True}) == {"commit": "a" * 40, "dirty": True}
    assert run_git_info({**a, "dirty": True}, a)["dirty"] is True
    assert run_git_info(a, b) == {"commit": "a" * 40, "dirty": True, "commit_now": "b" * 40}
    assert run_git_info({"commit": None, "dirty": None}, {"commit": None, "dirty": None})["dirty"] is None
