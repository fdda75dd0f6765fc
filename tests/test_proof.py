"""Paper-scale parameter sets proved on the CPU (issue 20, item 2): ``run_all.sh --profile full --proof`` runs a
notebook's ``full`` parameter set end to end on synthetic copies of the papers' data, every training run cut after
two optimizer updates (``max_steps``), with the notebook's declared ``PROOF`` overrides (devices, batch, timings).

Pieces: ``${TOKENBOOK_DATA:-/data}`` in the profiles, the proof tree of :mod:`tokenbook.data.synthetic`,
``TrainConfig.max_steps`` in :func:`tokenbook.train.fit`, the runner's ``--proof``; then one proof run per notebook
that has been proved (a subprocess of the runner, as a user runs it)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tokenbook import runner
from tokenbook.data import synthetic
from tokenbook.params import params_class

from conftest import ROOT

#: the notebooks whose full parameter set is proved here
PROVED = ["00_baselines", "01_vittm", "02_t2t_vit", "03_toe", "04_seit", "05_memory", "06_cross_paper"]
#: the notebooks whose full profile evaluates the paper's released checkpoints
RELEASED_TABLES = ["01_vittm", "02_t2t_vit", "04_seit"]


# ------------------------------------------------------------------------------------------------ the pieces
def test_profile_strings_expand_from_the_environment(monkeypatch):
    monkeypatch.delenv("TOKENBOOK_DATA", raising=False)
    assert runner.expand_env("folder:${TOKENBOOK_DATA:-/data}/imagenet") == "folder:/data/imagenet"
    monkeypatch.setenv("TOKENBOOK_DATA", "/tmp/x")
    assert runner.expand_env(["hf:${TOKENBOOK_DATA:-/data}/c", 3, "plain"]) == ["hf:/tmp/x/c", 3, "plain"]
    monkeypatch.setenv("TOKENBOOK_DATA", "")
    assert runner.expand_env("${TOKENBOOK_DATA:-/data}/i") == "/data/i"  # empty counts as unset with a default
    monkeypatch.delenv("TOKENBOOK_NOT_SET_ANYWHERE", raising=False)
    with pytest.raises(runner.RunnerError, match="TOKENBOOK_NOT_SET_ANYWHERE.*not set"):
        runner.expand_env("${TOKENBOOK_NOT_SET_ANYWHERE}/x", "f.yaml: dataset")


def test_full_profiles_read_their_data_under_the_data_root(monkeypatch):
    monkeypatch.setenv("TOKENBOOK_DATA", "/mnt/papers")
    p = runner.profile_parameters(ROOT, "02_t2t_vit", "full")
    assert p.dataset == "folder:/mnt/papers/imagenet"
    p = runner.profile_parameters(ROOT, "05_memory", "full")
    assert p.targets[0] == "hf:/mnt/papers/cifar100" and p.backbone_checkpoint.startswith("/mnt/papers/")
    monkeypatch.delenv("TOKENBOOK_DATA")
    assert runner.profile_parameters(ROOT, "04_seit", "full").token_source == "release:/data/imagenet1k-tokens"


def test_proof_overrides_order():
    cls = params_class("03_toe")
    ov = runner.proof_overrides(cls, {"seeds": [7, 8]})
    assert ov["max_steps"] == 2 and ov["accelerator"] == "cpu" and ov["seeds"] == [7, 8]  # the user's -p wins
    assert runner.proof_overrides(cls, {"max_steps": 5})["max_steps"] == 5
    for nb in PROVED:  # every declared override names a parameter of its notebook and validates
        c = params_class(nb)
        assert set(c.PROOF) <= set(c.specs()), nb
        runner.profile_parameters(ROOT, nb, "full", runner.proof_overrides(c))


def test_proof_tree_is_written_once_and_never_over_real_data(tmp_path):
    root = tmp_path / "data"
    written = synthetic.write_proof_data(root, ["imagenet", "cifar100"])
    assert written == ["imagenet", "cifar100"]
    assert (root / "imagenet" / "train").is_dir() and (root / "imagenet" / synthetic.MARKER).is_file()
    n = len(list((root / "imagenet" / "train").rglob("*.JPEG")))
    assert n == synthetic.PROOF_COUNTS["classes"] * synthetic.PROOF_COUNTS["train_per_class"]
    assert synthetic.write_proof_data(root, ["imagenet", "cifar100"]) == []  # present: untouched
    (root / "sun397").mkdir()
    (root / "sun397" / "real.jpg").write_bytes(b"x")  # a real dataset under the same name
    with pytest.raises(FileExistsError, match="not written by tokenbook"):
        synthetic.write_proof_data(root, ["sun397"])
    assert (root / "sun397" / "real.jpg").read_bytes() == b"x"
    with pytest.raises(ValueError, match="no proof dataset"):
        synthetic.write_proof_data(root, ["imagenet22k"])


def _tiny_loaders(n=24, batch=4):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)
    ds = torch.utils.data.TensorDataset(x, y)
    return (torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(1)),
            torch.utils.data.DataLoader(ds, batch_size=batch))


def test_max_steps_cuts_the_run_keeps_the_schedule_and_evaluates(tmp_path):
    from tokenbook.train import TrainConfig, fit

    train, val = _tiny_loaders()  # 6 steps per epoch
    model = torch.nn.Linear(8, 3)
    cfg = TrainConfig(epochs=50, max_steps=8, lr=1e-2, warmup_epochs=1.0, progress=False, accelerator="cpu")
    res = fit(model, train, val, cfg)
    assert res.timing["steps"] == 8 and res.timing["capped_at_step"] == 8
    assert list(res.history["steps"]) == [6, 2] and "val_top1" in res.history.columns
    assert res.history["val_top1"].notna().iloc[-1]  # the cut epoch is evaluated
    # the schedule is the 50-epoch one: still warming up after 8 of 300 updates
    assert res.history["lr"].iloc[-1] < cfg.lr
    uncapped = fit(torch.nn.Linear(8, 3), train, val, TrainConfig(epochs=2, lr=1e-2, progress=False,
                                                                   accelerator="cpu"))
    assert uncapped.timing["capped_at_step"] is None
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig(max_steps=0)


def test_max_steps_flows_from_params_to_every_train_config():
    for nb in ("00_baselines", "02_t2t_vit", "03_toe"):
        p = runner.profile_parameters(ROOT, nb, "full", {"max_steps": 3})
        assert p.max_steps == 3
    from tokenbook.experiments import cross_paper, toe

    p = runner.profile_parameters(ROOT, "06_cross_paper", "full", {"max_steps": 3})
    assert cross_paper.pixel_config(p, 0).max_steps == 3 and cross_paper.finetune_config(p).max_steps == 3
    assert cross_paper.token_params(p, 0)["max_steps"] == 3
    p = runner.profile_parameters(ROOT, "03_toe", "full", {"max_steps": 3})
    assert toe.train_config(p).max_steps == 3
    assert runner.profile_parameters(ROOT, "03_toe", "full").max_steps is None  # 0 means no cap


def test_proof_refuses_the_small_profiles(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tokenbook.runner", "--profile", "cpu", "--proof", "--only",
                          "toe", "--results", str(tmp_path / "r")], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "--proof proves the full and gpu parameter sets" in out.stderr
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------------ the proofs
@pytest.fixture(scope="module")
def proof_root(tmp_path_factory):
    return tmp_path_factory.mktemp("proof")


@pytest.mark.notebook
@pytest.mark.parametrize("name", PROVED)
def test_full_profile_runs_end_to_end_on_synthetic_data(name, proof_root):
    results = proof_root / "results"
    env = {**os.environ, "TOKENBOOK_RUNS": str(proof_root / "runs")}
    out = subprocess.run([sys.executable, "-m", "tokenbook.runner", "--profile", "full", "--proof", "--only", name,
                          "--results", str(results), "--data-root", str(proof_root / "data")],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    folder = results / name / "full"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["status"] == "completed" and meta["profile"] == "full"
    assert meta["parameters"]["max_steps"] == 2
    assert list(folder.glob("*.csv")) and list(folder.glob("*.png")) and (folder / f"{name}.html").is_file()
    if name in RELEASED_TABLES:  # the released checkpoints: a row per release, none given, the table still built
        import pandas as pd

        rel = pd.read_csv(folder / "released.csv")
        assert len(rel) >= 1 and rel["status"].str.startswith("weights not found").all(), rel["status"].tolist()
        assert rel["paper_top1"].notna().any() and rel["ours_top1"].isna().all()
        assert "released" in (folder / f"{name}.html").read_text()


# ------------------------------------------------------------------------------------------------ weight files
def test_vit_npz_writer_is_the_inverse_of_timms_reader(tmp_path):
    import timm
    from timm.models.vision_transformer import _load_weights

    from tokenbook.released import write_vit_npz

    torch.manual_seed(0)
    src = timm.create_model("vit_base_patch32_224", depth=2, embed_dim=64, num_heads=4, num_classes=7)
    dst = timm.create_model("vit_base_patch32_224", depth=2, embed_dim=64, num_heads=4, num_classes=7)
    path = write_vit_npz(src, tmp_path / "augreg.npz")
    names = set(__import__("numpy").load(path).files)
    assert {"embedding/kernel", "cls", "Transformer/posembed_input/pos_embedding", "head/kernel",
            "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel",
            "Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias"} <= names
    _load_weights(dst, str(path))
    a, b = src.state_dict(), dst.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(1, 3, 224, 224)
    assert torch.equal(src.eval()(x), dst.eval()(x))


def test_proof_hooks_write_the_weight_files_once(tmp_path, monkeypatch):
    from tokenbook.experiments import memory, seit
    from tokenbook.models.seit import load_tokenadapt

    assert seit.proof_data(tmp_path) == ["seit/weights/tokenadapt.ckpt"]
    ta = load_tokenadapt(tmp_path / "seit" / "weights" / "tokenadapt.ckpt")
    assert (ta.in_grid, ta.out_grid, ta.codebook_size) == (32, 28, 391)  # the official sizes
    assert seit.proof_data(tmp_path) == []
    # the full ViT-B/32 + 21,843-class head is 400 MB; the same writer on a small ViT
    from tokenbook.experiments import memory_report  # proof_data and its constant live in the reporting half

    monkeypatch.setattr(memory_report, "PROOF_BACKBONE", ("checkpoints/b.npz", "vit_tiny_patch16_224", 10))
    assert memory.proof_data(tmp_path) == ["checkpoints/b.npz"]
    bb = memory.load_backbone("vit_tiny_patch16_224", 10, checkpoint_file=str(tmp_path / "checkpoints" / "b.npz"),
                              checkpoint_num_classes=10)
    w = __import__("numpy").load(tmp_path / "checkpoints" / "b.npz")
    assert torch.equal(bb.head.weight, torch.from_numpy(w["head/kernel"].T))  # read by timm's .npz reader
    assert torch.equal(bb.cls_token, torch.from_numpy(w["cls"]))
    assert memory.proof_data(tmp_path) == []
