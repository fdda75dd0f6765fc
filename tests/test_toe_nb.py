"""Notebook 03_toe: content of the smoke run's tables, the profiles' ToE schedules, and the `full` recipe (the official
DeiT-S ImageNet run script with ToE) checked for one step on a tiny fake ImageNet-style folder."""
import json
import math

import pandas as pd
import pytest
import torch

from tokenbook import data
from tokenbook.experiments import toe as toe_runs
from tokenbook.methods import toe
from tokenbook.results import notebook_parameters
from tokenbook.runner import resolve_parameters
from tokenbook.train import RECIPES

from conftest import ROOT

NB = "03_toe"


def profile_params(profile: str) -> dict:
    """Notebook defaults overlaid with a profile, as papermill would see them."""
    specs = notebook_parameters(NB, ROOT / "notebooks" / f"{NB}.ipynb")
    defaults = {k: eval(v["default"]) for k, v in specs.items()}  # literals of the parameters cell
    return {**defaults, **resolve_parameters(ROOT, NB, profile, {}), "profile": profile}


def read(folder, name: str) -> pd.DataFrame:
    """A results table with "n/a" kept as written (pandas would turn it into NaN); empty cells are NaN."""
    return pd.read_csv(folder / f"{name}.csv", keep_default_na=False, na_values=[""])


# ------------------------------------------------------------------------------------------------------------
# smoke run content
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.notebook
def test_smoke_schedule_tables(smoke_results):
    _, folder = smoke_results(NB)
    stages = read(folder, "schedule_stages")
    s = stages[stages.model == "DeiT-S ToE 0.5/0.75/1.0"].set_index("stage")
    assert s["kept_patches"].tolist() == [98, 147, 196] and s["seq_len"].tolist() == [99, 148, 197]
    assert str(s.loc[1, "seeds"]) == "49" and s.loc[1, "substeps"] == "24+25" and s.loc[2, "substeps"] == "24+25+24+25"
    assert s.loc[3, "seeds"] == "n/a" and not s.loc[3, "active"]
    assert s["epochs"].tolist() == ["0-99", "100-199", "200-299"]
    lv = stages[stages.model == "LV-ViT-S ToE 0.4/0.7/1.0"]
    assert lv["kept_patches"].tolist() == [78, 136, 196]

    cmp = read(folder, "schedule_vs_reference")
    deit_s = cmp[cmp.model == "DeiT-S ToE 0.5/0.75/1.0"].set_index("metric")
    for st, kept in ((1, 98), (2, 147), (3, 196)):
        row = deit_s.loc[f"kept_patches_stage{st}"]
        assert row["paper"] == kept and row["ours"] == kept and bool(row["pass"])
        assert "sheet 1.4" in row["paper_source"] and row["reference_kind"] == "computed"
    sav = deit_s.loc["epoch_avg_saving"]
    assert sav["paper"] == 1.31 and abs(sav["ours"] - 1.3132) < 1e-3 and bool(sav["pass"])
    # a value the reference does not have is n/a, never invented
    na = cmp[(cmp.model == "DeiT-T ToE 0.6/0.8/1.0") & (cmp.metric == "epoch_avg_saving")].iloc[0]
    assert pd.isna(na["paper"]) and na["paper_source"] == "n/a" and na["reference_kind"] == "n/a"
    # no row of this table claims to be a paper result: the paper's tables are not available (sheet 3.2)
    assert set(cmp["reference_kind"]) <= {"computed", "n/a"}

    et = read(folder, "efficienttrain_vs_reference").set_index(["model", "metric"])
    assert abs(et.loc[("DeiT-S EfficientTrain+ToE", "epoch_avg_saving"), "ours"] - 1.84) < 0.005
    assert abs(et.loc[("DeiT-S EfficientTrain+ToE", "saving_vs_efficienttrain"), "ours"] - 1.18) < 0.005


@pytest.mark.notebook
def test_smoke_training_tables(smoke_results):
    _, folder = smoke_results(NB)
    runs = pd.read_csv(folder / "runs.csv").set_index("run")
    assert list(runs.index) == ["full-token", "ToE"]
    assert (runs["epochs"] == 3).all() and (runs["steps"] == 6).all()
    assert runs["top1"].between(0, 100).all() and (runs["step_time_s"] > 0).all()
    assert (runs["wall_time_s"] >= runs["train_wall_s"]).all()

    speed = pd.read_csv(folder / "speedup.csv")
    assert len(speed) == 3 and (speed["speedup"] > 0).all()
    assert speed["top1_diff"].iloc[0] == pytest.approx(runs.loc["ToE", "top1"] - runs.loc["full-token", "top1"])
    assert speed["speedup"].iloc[0] == pytest.approx(runs.loc["full-token", "step_time_s"] /
                                                     runs.loc["ToE", "step_time_s"])

    sched = pd.read_csv(folder / "run_schedule.csv")
    assert sched["kept_patches"].tolist() == [32, 48, 64] and sched["seq_len"].tolist() == [33, 49, 65]
    assert (sched["counted_gmacs"] == sched["gmacs"]).all()  # tokenbook.bench count (attention included) = analytic
    assert sched["selection_mmacs"].tolist()[:2] == [64 * 64 * 64 / 1e6] * 2 and sched["selection_mmacs"].iloc[2] == 0

    stages = pd.read_csv(folder / "per_stage_step_time.csv")
    assert stages["stage"].tolist() == [1, 2, 3] and stages["mac_ratio_full_over_stage"].iloc[-1] == 1.0
    assert (stages["mac_ratio_full_over_stage"].diff().dropna() < 0).all()

    over = pd.read_csv(folder / "token_select_overhead.csv")
    assert over["stage"].tolist() == [1, 2] and over["keep_rate"].tolist() == [0.5, 0.75]
    assert over["overhead_share"].apply(math.isfinite).all() and (over["step_ms_toe"] > 0).all()

    hist = pd.read_csv(folder / "history_toe.csv")
    assert hist["epoch"].tolist() == [1, 2, 3] and {"train_loss", "val_top1", "step_time_s"} <= set(hist.columns)

    head = read(folder, "speedup_vs_paper")
    assert (head["paper"] == 1.3).all() and head["paper_source"].str.contains(r"abstract .*\[paper\]").all()
    assert head["what"].str.contains("interleaved").any() and head["what"].str.contains("DeiT-S").any()

    meta = json.loads((folder / "meta.json").read_text())
    assert {f["name"] for f in meta["figures"]} == {"token_selection", "keep_rate_schedule", "training_curves"}
    assert {"step_speedup", "train_wall_speedup", "top1_diff", "run_epoch_avg_mac_saving"} <= set(meta["notes"])
    assert meta["parameters"]["expansion_step"] == "0,100,200" and meta["parameters"]["epochs"] == 3


# ------------------------------------------------------------------------------------------------------------
# profiles
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("profile, steps", [("smoke", [0, 1, 2]), ("cpu", [0, 2, 4]), ("gpu", [0, 10, 20]),
                                            ("full", [0, 100, 200])])
def test_profile_toe_schedule(profile, steps):
    p = profile_params(profile)
    cfg = toe_runs.toe_config(p)
    assert cfg["expansion_step"] == steps and cfg["keep_rate"] == [0.5, 0.75, 1.0]
    assert cfg["initialization_keep_rate"] == 0.25 and cfg["expansion_multiple_stage"] == 2
    # one epoch per stage at least: every stage of the official schedule is trained
    assert sorted({toe.stage_for_epoch(steps, e) for e in range(p["epochs"])}) == [1, 2, 3]


def test_full_profile_is_the_official_deit_s_recipe():
    p = profile_params("full")
    cfg = toe_runs.train_config(p)
    rec = RECIPES["toe_deit_s_in1k"]
    for k in ("epochs", "batch_size", "opt", "lr", "weight_decay", "warmup_epochs", "warmup_lr", "min_lr", "mixup",
              "cutmix", "label_smoothing", "devices"):
        assert getattr(cfg, k) == rec[k], k
    assert cfg.batch_size * cfg.devices == 1024 and cfg.strategy.startswith("ddp")
    assert cfg.ema_decay == 0.99996 and cfg.seed == 3407 and cfg.precision == "16-mixed"
    assert p["model_name"] == "deit_small_patch16_224" and p["img_size"] == 224 and p["drop_path_rate"] == 0.1
    assert p["preset"] == "deit" and p["dataset"].startswith("folder:") and p["train_subset"] == 0
    official = {k: v for k, v in toe.OFFICIAL_CONFIGS["deit_small"].items() if k != "epochs"}
    got = toe_runs.toe_config(p)
    assert {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in official.items()} == \
        {k: got[k] for k in official}


def test_full_recipe_one_step_on_fake_imagenet_folder(tmp_path):
    """The full profile's data, model, TrainConfig and ToE on a tiny ImageNet-style folder: one optimizer step on the
    CPU (one device instead of four DDP GPUs, fp32 instead of AMP), stage 1 active, evaluation full-token."""
    p = profile_params("full")
    root = data.write_folder_fixture(tmp_path / "imagenet", per_class=2)
    p.update(dataset=f"folder:{root}")
    bundle = data.load_data(data.DataConfig(dataset=p["dataset"], img_size=p["img_size"], preset=p["preset"]))
    tl, vl = data.make_loaders(bundle, 2, seed=p["seed"])
    cfg = toe_runs.train_config(p, epochs=1, accelerator="cpu", devices=1, strategy="auto", precision="32-true",
                                max_steps_per_epoch=1, ema_decay=0.9)
    toe_cfg = toe_runs.toe_config(p)  # unscaled: epoch 0 is stage 1 (keep 0.5)
    runs = toe_runs.train_pair(p["model_name"], tl, vl, cfg, toe_cfg, preprocess=bundle.preprocess,
                               run_baseline=False, model_kwargs=dict(num_classes=bundle.num_classes,
                                                                     img_size=p["img_size"],
                                                                     drop_path_rate=p["drop_path_rate"]))
    run = runs["ToE"]
    assert run.hook.history == [(0, 1, 0.5)] and run.token_select.expansion_stage == 1
    assert run.result.timing["steps"] == 1 and math.isfinite(run.result.final["train_loss"])
    assert "val_top1" in run.result.final and "ema_top1" in run.result.final
    # the trained model reduces 197 -> 99 tokens in training mode and keeps all 197 in eval and in the EMA copy
    seen = []
    model = run.result.model
    h = model.blocks[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        model.train()
        model(x)
        model.eval()
        model(x)
    h.remove()
    assert seen == [99, 197]
    ema_ts = toe.find_token_selects(run.result.ema)[0]
    assert not ema_ts.sparse_inference


def test_toe_config_and_train_config_helpers():
    p = {"epochs": 9, "expansion_step": "0, 100, 200", "official_epochs": 300, "keep_rate": "0.4,0.7,1.0",
         "initialization_keep_rate": 0.2, "expansion_multiple_stage": 2, "distance": "euclidean_corrected",
         "seed_stride": "corrected", "clip_grad": 0.0, "max_steps_per_epoch": 0, "lr": 0.01, "unrelated": 1}
    cfg = toe_runs.toe_config(p)
    assert cfg["expansion_step"] == [0, 3, 6] and cfg["keep_rate"] == [0.4, 0.7, 1.0]
    assert cfg["distance"] == "euclidean_corrected" and cfg["seed_stride"] == "corrected"
    tc = toe_runs.train_config(p)
    assert tc.clip_grad is None and tc.max_steps_per_epoch is None and tc.lr == 0.01 and tc.epochs == 9
    with pytest.raises(ValueError, match="comma-separated"):
        toe_runs.toe_config({**p, "keep_rate": "0.5;0.75"})
    with pytest.raises(ValueError, match="keep_rate"):
        toe_runs.toe_config({**p, "keep_rate": "0.75,0.5,1.0"})


def test_speedup_table_and_verdict():
    summary = pd.DataFrame([
        {"run": "full-token", "top1": 85.0, "step_time_s": 120.0, "train_wall_s": 130.0, "wall_time_s": 140.0},
        {"run": "ToE", "top1": 84.7, "step_time_s": 90.0, "train_wall_s": 100.0, "wall_time_s": 110.0}])
    sp = toe_runs.speedup_table(summary)
    assert sp["speedup"].tolist() == pytest.approx([120 / 90, 1.3, 140 / 110])
    assert sp["top1_diff"].iloc[0] == pytest.approx(-0.3) and sp["target_met"].tolist() == [True, True, True]
    assert "**met**" in toe_runs.verdict(sp, 1.25, 1.28)
    worse = summary.assign(top1=[85.0, 84.0])
    assert not toe_runs.speedup_table(worse)["target_met"].any()
    assert toe_runs.speedup_table(summary[summary.run == "ToE"]).empty


def test_token_selection_figure_and_schedule_figure():
    import matplotlib

    matplotlib.use("Agg")
    model = toe_runs.build_model("vit_fm_tiny_p4_32", 0, dict(expansion_step=[0, 1, 2], keep_rate=[0.5, 0.75, 1.0]),
                                 num_classes=10, img_size=32)
    x = torch.randn(2, 3, 32, 32)
    fig = toe_runs.plot_token_selection(model, x, [im[0].numpy() for im in x], stages=(1, 2), row_titles=["a", "b"])
    assert len(fig.axes) == 2 * 5
    fig = toe_runs.plot_keep_schedule(dict(expansion_step=[0, 1, 2], keep_rate=[0.5, 0.75, 1.0],
                                           initialization_keep_rate=0.25, expansion_multiple_stage=2), 3, 64,
                                      dims=toe.ViTDims.from_model(model))
    assert len(fig.axes) == 2
