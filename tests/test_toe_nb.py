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
from tokenbook.runner import profile_parameters
from tokenbook.train import RECIPES

from conftest import ROOT

NB = "03_toe"


def profile_params(profile: str) -> dict:
    """The notebook's Params overlaid with a profile, as papermill would see them, as a dict."""
    return dict(profile_parameters(ROOT, NB, profile))


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
    all_runs = pd.read_csv(folder / "runs.csv")
    assert all_runs["seed"].tolist() == [0, 0, 1, 1] and all_runs["run"].tolist() == ["full-token", "ToE"] * 2
    assert (all_runs["epochs"] == 3).all() and (all_runs["steps"] == 6).all()
    assert all_runs["top1"].between(0, 100).all() and (all_runs["step_time_s"] > 0).all()
    assert (all_runs["wall_time_s"] >= all_runs["train_wall_s"]).all()
    runs = all_runs[all_runs.seed == 0].set_index("run")

    speed_all = pd.read_csv(folder / "speedup.csv")
    assert speed_all["seed"].tolist() == [0] * 3 + [1] * 3
    speed = speed_all[speed_all.seed == 0].reset_index(drop=True)
    assert len(speed) == 3 and (speed["speedup"] > 0).all()
    assert speed["top1_diff"].iloc[0] == pytest.approx(runs.loc["ToE", "top1"] - runs.loc["full-token", "top1"])
    assert speed["speedup"].iloc[0] == pytest.approx(runs.loc["full-token", "step_time_s"] /
                                                     runs.loc["ToE", "step_time_s"])

    # accuracy over the seeds: per-seed values, mean and a 95 % t-interval; the difference is paired by seed
    t1 = pd.read_csv(folder / "top1_seeds.csv").set_index("run")
    assert list(t1.index) == ["full-token", "ToE", "ToE - full-token (paired)"] and (t1["n"] == 2).all()
    assert (t1["seeds"] == "0,1").all()
    for lab in ("full-token", "ToE"):
        per = all_runs[all_runs.run == lab].set_index("seed")["top1"]
        assert [t1.loc[lab, "top1_seed0"], t1.loc[lab, "top1_seed1"]] == pytest.approx(per.tolist())
        assert t1.loc[lab, "top1_mean"] == pytest.approx(per.mean())
    d = t1.loc["ToE - full-token (paired)"]
    assert d["top1_seed1"] == pytest.approx(t1.loc["ToE", "top1_seed1"] - t1.loc["full-token", "top1_seed1"])
    assert d["ci95_low"] <= d["top1_mean"] <= d["ci95_high"]

    sched = pd.read_csv(folder / "run_schedule.csv")
    assert sched["kept_patches"].tolist() == [32, 48, 64] and sched["seq_len"].tolist() == [33, 49, 65]
    assert (sched["counted_gmacs"] == sched["gmacs"]).all()  # tokenbook.bench count (attention included) = analytic
    assert sched["selection_mmacs"].tolist()[:2] == [64 * 64 * 64 / 1e6] * 2 and sched["selection_mmacs"].iloc[2] == 0

    stages_all = pd.read_csv(folder / "per_stage_step_time.csv")
    assert stages_all["seed"].tolist() == [0, 0, 0, 1, 1, 1]
    stages = stages_all[stages_all.seed == 0]
    assert stages["stage"].tolist() == [1, 2, 3] and stages["mac_ratio_full_over_stage"].iloc[-1] == 1.0
    assert (stages["mac_ratio_full_over_stage"].diff().dropna() < 0).all()

    over = pd.read_csv(folder / "token_select_overhead.csv")
    assert over["stage"].tolist() == [1, 2] and over["keep_rate"].tolist() == [0.5, 0.75]
    assert over["overhead_share"].apply(math.isfinite).all() and (over["step_ms_toe"] > 0).all()

    hist = pd.read_csv(folder / "history_toe.csv")
    assert hist["seed"].tolist() == [0, 0, 0, 1, 1, 1]
    assert hist["epoch"].tolist() == [1, 2, 3] * 2 and {"train_loss", "val_top1", "step_time_s"} <= set(hist.columns)

    head = read(folder, "speedup_vs_paper")
    assert (head["paper"] == 1.3).all() and head["paper_source"].str.contains(r"abstract .*\[paper\]").all()
    assert head["what"].str.contains("interleaved").any() and head["what"].str.contains("DeiT-S").any()

    meta = json.loads((folder / "meta.json").read_text())
    assert {f["name"] for f in meta["figures"]} == {"token_selection", "keep_rate_schedule", "training_curves"}
    assert {"step_speedup", "train_wall_speedup", "top1_diff", "run_epoch_avg_mac_saving"} <= set(meta["notes"])
    assert meta["parameters"]["expansion_step"] == [0, 100, 200] and meta["parameters"]["epochs"] == 3
    assert meta["parameters"]["seeds"] == [0, 1]
    assert meta["notes"]["top1_diff"] == pytest.approx(d["top1_mean"])


@pytest.mark.notebook
def test_smoke_claims(smoke_results):
    """Evidence for every testable claim of the sheet, and the claims table judges every claim (n = seeds)."""
    from tokenbook import claims as C

    _, folder = smoke_results(NB)
    sheet = C.load_claims("toe")
    testable = {c.id for c in sheet if not c.not_testable_here}
    ev = C.read_evidence(folder)
    assert set(ev) == testable
    for e in ev.values():
        assert e.scale, e.claim
    table = read(folder, "claims").set_index("claim")
    assert set(table.index) == {c.id for c in sheet}
    assert set(table["verdict"]) <= set(C.VERDICTS)
    assert set(table.index[table["verdict"] == "failed"]) <= {"toe.lossless"}  # only by the floor rule, below
    assert table.loc["toe.imagenet_deit_s", "verdict"] == "not_testable_here"

    # empirical: per-seed top-1 of both arms, paired by seed, equal to the runs table; failed exactly when a run of
    # either arm is below the logistic floor fitted on the same split (a few smoke steps are)
    lossless = table.loc["toe.lossless"]
    assert int(lossless["n"]) == 2 and lossless["plateau"].startswith(("yes", "no"))
    fl = read(folder, "floors")
    logistic = float(fl.loc[fl["kind"] == "floor", "top1"].iloc[0])
    below = min(ev["toe.lossless"].a + ev["toe.lossless"].b) < logistic
    assert (lossless["verdict"] == "failed") == below == bool(ev["toe.lossless"].failed_run)
    assert set(fl["model"][:2]) == {"ToE", "full-token"} and (fl["kind"] == "floor").sum() == 2
    runs = pd.read_csv(folder / "runs.csv")
    assert ev["toe.lossless"].a == pytest.approx(runs[runs.run == "ToE"].sort_values("seed")["top1"].tolist())
    assert ev["toe.lossless"].b == pytest.approx(runs[runs.run == "full-token"].sort_values("seed")["top1"].tolist())
    assert "3 epochs" in ev["toe.lossless"].scale and "seeds 0,1" in ev["toe.lossless"].scale

    # structural: the DeiT-S saving of the schedule table, and an exact removal at test time
    summary = read(folder, "schedule_summary").set_index("model")
    assert ev["toe.compute_saving"].value == pytest.approx(summary.loc["DeiT-S ToE 0.5/0.75/1.0", "epoch_avg_saving"])
    assert table.loc["toe.compute_saving", "verdict"] == "reproduced"
    rem = pd.read_csv(folder / "removable_at_test.csv")
    assert rem["model"].tolist() == ["vit_fm_tiny_p4_32", "deit_small_patch16_224"]
    assert (rem["max_abs_diff"] == 0).all() and (rem["param_diff"] == 0).all()
    assert (rem["train_mode_max_abs_diff"] > 0).all()  # ToE was really on: the check is not vacuous
    assert rem["seq_len_train"].tolist() == [33, 99] and rem["seq_len_eval"].tolist() == [65, 197]
    assert ev["toe.removable_at_test"].value == 0 and table.loc["toe.removable_at_test", "verdict"] == "reproduced"

    # hardware: median and IQR of the per-repeat epoch-weighted speed-ups of the interleaved timing
    rep = pd.read_csv(folder / "overhead_repeats.csv")
    assert rep["repeat"].tolist() == [1, 2, 3]
    hw = ev["toe.train_speedup"]
    assert hw.ratio == pytest.approx(rep["epoch_weighted_speedup"].median())
    assert hw.q1 <= hw.ratio <= hw.q3 and "batch 4" in hw.scale
    assert table.loc["toe.train_speedup", "ci_low"] == pytest.approx(hw.q1)


# ------------------------------------------------------------------------------------------------------------
# profiles
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("profile, steps", [("smoke", [0, 1, 2]), ("cpu", [0, 5, 10]), ("gpu", [0, 4, 8]),
                                            ("full", [0, 100, 200])])
def test_profile_toe_schedule(profile, steps):
    p = profile_params(profile)
    cfg = toe_runs.toe_config(p)
    assert cfg["expansion_step"] == steps and cfg["keep_rate"] == [0.5, 0.75, 1.0]
    assert cfg["initialization_keep_rate"] == 0.25 and cfg["expansion_multiple_stage"] == 2
    # one epoch per stage at least: every stage of the official schedule is trained
    assert sorted({toe.stage_for_epoch(steps, e) for e in range(p["epochs"])}) == [1, 2, 3]


@pytest.mark.parametrize("profile, n", [("smoke", 2), ("cpu", 3), ("gpu", 5), ("full", 5)])
def test_profile_seeds(profile, n):
    from tokenbook.claims import parse_seeds

    assert len(parse_seeds(profile_params(profile)["seeds"])) == n


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
    assert p["preset"] == "deit" and p["dataset"].startswith("folder:") and p["train_subset"] is None
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
    p = {"epochs": 9, "expansion_step": [0, 100, 200], "official_epochs": 300, "keep_rate": [0.4, 0.7, 1.0],
         "initialization_keep_rate": 0.2, "expansion_multiple_stage": 2, "distance": "euclidean_corrected",
         "seed_stride": "corrected", "clip_grad": 0.0, "max_steps_per_epoch": 0, "lr": 0.01, "unrelated": 1}
    cfg = toe_runs.toe_config(p)
    assert cfg["expansion_step"] == [0, 3, 6] and cfg["keep_rate"] == [0.4, 0.7, 1.0]
    assert cfg["distance"] == "euclidean_corrected" and cfg["seed_stride"] == "corrected"
    tc = toe_runs.train_config(p)
    assert tc.clip_grad is None and tc.max_steps_per_epoch is None and tc.lr == 0.01 and tc.epochs == 9
    with pytest.raises(TypeError, match=r"keep_rate must be a list \(YAML"):
        toe_runs.toe_config({**p, "keep_rate": "0.5,0.75"})
    with pytest.raises(ValueError, match="cannot read keep_rate"):
        toe_runs.toe_config({**p, "keep_rate": ["0.5;0.75"]})
    with pytest.raises(ValueError, match="keep_rate"):
        toe_runs.toe_config({**p, "keep_rate": [0.75, 0.5, 1.0]})


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


# ------------------------------------------------------------------------------------------------------------
# claims ledger helpers (issue 12)
# ------------------------------------------------------------------------------------------------------------
def _fake_overhead(times: dict) -> pd.DataFrame:
    df = pd.DataFrame([{"stage": s} for s in times])
    df.attrs["times_ms"] = times
    return df


def test_interleaved_step_speedup_is_per_repeat_epoch_weighted():
    # repeat i: stage 1 takes half the full step, stage 2 three quarters; stage 3 (inactive) counts as full
    times = {1: {"full": [100.0, 200.0, 100.0, 400.0], "toe": [50.0, 100.0, 50.0, 200.0]},
             2: {"full": [100.0, 100.0, 300.0, 100.0], "toe": [75.0, 75.0, 225.0, 75.0]}}
    r = toe_runs.interleaved_step_speedup(_fake_overhead(times), {1: 2, 2: 2, 3: 2})
    assert r["repeats"] == 4 and r["per_repeat"] == pytest.approx([6 / (1 + 1.5 + 2)] * 4)
    assert r["ratio"] == r["q1"] == r["q3"] == pytest.approx(4 / 3)
    # drift that hits both arms of a repeat alike cancels; a slower ToE step in one repeat shows in the IQR
    times[1]["toe"][3] = 400.0
    r = toe_runs.interleaved_step_speedup(_fake_overhead(times), {1: 1, 2: 1, 3: 1})
    assert r["per_repeat"][3] == pytest.approx(3 / (1 + 0.75 + 1)) and r["q1"] < r["ratio"]
    # epoch weights matter: all epochs in stage 1 gives the stage-1 ratio
    r = toe_runs.interleaved_step_speedup(_fake_overhead(times), {1: 5})
    assert r["per_repeat"][:3] == pytest.approx([2.0] * 3)
    tab = toe_runs.overhead_repeats_table(_fake_overhead(times), {1: 5})
    assert tab["repeat"].tolist() == [1, 2, 3, 4] and tab["stage1_toe_ms"].iloc[3] == 400.0
    assert tab["epoch_weighted_speedup"].tolist() == pytest.approx(r["per_repeat"])
    assert toe_runs.interleaved_step_speedup(pd.DataFrame(), {1: 1}) is None
    with pytest.raises(ValueError, match="at least 3"):
        toe_runs.interleaved_step_speedup(_fake_overhead({1: {"full": [1.0, 1.0], "toe": [1.0, 1.0]}}), {1: 1})


def test_overhead_table_keeps_the_repeats():
    model = toe_runs.build_model("vit_fm_tiny_p4_32", 0, dict(expansion_step=[0, 1, 2], keep_rate=[0.5, 0.75, 1.0]),
                                 num_classes=10, img_size=32)
    over = toe_runs.overhead_table(model, batch_size=2, steps=3, warmup=0)
    t = over.attrs["times_ms"]
    assert sorted(t) == [1, 2] and all(len(v[k]) == 3 for v in t.values() for k in ("full", "toe", "truncated"))
    assert "times_ms" not in over.columns
    assert over.set_index("stage").loc[1, "step_ms_toe"] == pytest.approx(sorted(t[1]["toe"])[1])


class _Res:
    def __init__(self, top1, curve):
        self.final = {"val_top1": top1}
        self.history = pd.DataFrame({"epoch": range(1, len(curve) + 1), "val_top1": curve})


def _fake_runs():
    R = toe_runs.ToERun
    return {0: {"full-token": R("full-token", _Res(80.0, [60, 75, 80])), "ToE": R("ToE", _Res(81.0, [62, 76, 81]))},
            1: {"full-token": R("full-token", _Res(78.0, [70, 77.5, 78])), "ToE": R("ToE", _Res(77.0, [70, 77, 77]))},
            2: {"full-token": R("full-token", _Res(79.0, [70, 78, 79])), "ToE": R("ToE", _Res(80.5, [71, 79, 80.5]))}}


def test_top1_seeds_table_and_curves():
    from scipy import stats

    runs = _fake_runs()
    t = toe_runs.top1_seeds_table(runs).set_index("run")
    assert t.loc["ToE", "top1_mean"] == pytest.approx((81 + 77 + 80.5) / 3) and (t["n"] == 3).all()
    d = t.loc["ToE - full-token (paired)"]
    diffs = [1.0, -1.0, 1.5]
    assert [d["top1_seed0"], d["top1_seed1"], d["top1_seed2"]] == pytest.approx(diffs)
    half = stats.t.ppf(0.975, 2) * pd.Series(diffs).std() / 3 ** 0.5
    assert (d["ci95_low"], d["ci95_high"]) == pytest.approx((0.5 - half, 0.5 + half))
    one = toe_runs.top1_seeds_table({0: runs[0]}).set_index("run")
    assert one.loc["ToE", "n"] == 1 and pd.isna(one.loc["ToE", "ci95_low"])
    curves = toe_runs.val_curves(runs)
    assert len(curves) == 6 and curves[0] == [60, 75, 80]
    tab = toe_runs.per_seed({s: pd.DataFrame({"x": [s, s]}) for s in (3, 5)})
    assert tab.columns.tolist() == ["seed", "x"] and tab["seed"].tolist() == [3, 3, 5, 5]


def test_removable_at_test_exact_and_able_to_fail():
    model = toe_runs.build_model("vit_fm_tiny_p4_32", 0, dict(expansion_step=[0, 1, 2], keep_rate=[0.5, 0.75, 1.0]),
                                 num_classes=10, img_size=32)
    ts = toe.find_token_selects(model)[0]
    ts.update_current_stage(2)  # final stage, inactive: the check must force an active stage itself
    x = torch.randn(2, 3, 32, 32)
    r = toe_runs.removable_at_test(model, "vit_fm_tiny_p4_32", x, num_classes=10, img_size=32)
    assert r["max_abs_diff"] == 0 and r["param_diff"] == 0 and r["state_dict_key_diff"] == 0
    assert r["train_mode_max_abs_diff"] > 0 and (r["seq_len_train"], r["seq_len_eval"]) == (33, 65)
    assert ts.expansion_stage == 3 and model.training  # restored
    # a ToE that stays on at evaluation (the official --sparse-eval) is not removable: the check sees it
    ts.sparse_eval = True
    r = toe_runs.removable_at_test(model, "vit_fm_tiny_p4_32", x, num_classes=10, img_size=32)
    assert r["max_abs_diff"] > 0 and r["seq_len_eval"] == 33
    ts.sparse_eval = False
    with pytest.raises(ValueError, match="not an active"):
        toe_runs.removable_at_test(model, "vit_fm_tiny_p4_32", x, stage=3, num_classes=10, img_size=32)
    with pytest.raises(ValueError, match="no TokenSelect"):
        toe_runs.removable_at_test(toe_runs.build_model("vit_fm_tiny_p4_32", 0, None, num_classes=10, img_size=32),
                                   "vit_fm_tiny_p4_32", x, num_classes=10, img_size=32)


def test_train_seeds_pairs_by_seed(idx_dir, monkeypatch):
    """Per seed both arms start from the same weights and read the same seeded loader; seeds differ; a seed
    reproduces its runs."""
    from tokenbook.train import TrainConfig

    bundle = data.load_data(data.DataConfig(dataset="fashion_mnist", data_dir=str(idx_dir), img_size=32,
                                            train_subset=32, val_subset=16))
    cfg = TrainConfig(epochs=1, max_steps_per_epoch=1, lr=1e-3, warmup_epochs=0.0, accelerator="cpu",
                      progress=False)
    toe_cfg = dict(expansion_step=[0, 1, 2], keep_rate=[0.5, 0.75, 1.0])
    mk = dict(num_classes=10, img_size=32)
    seen = []
    real_fit = toe_runs._fit

    def spy(model, train_loader, val_loader, cfg, **kw):
        seen.append({"arm": kw.get("desc"), "seed": cfg.seed, "w": model.patch_embed.proj.weight.detach().clone(),
                     "loader": id(train_loader), "loader_seed": getattr(train_loader, "_tokenbook_base_seed",  # the engine remembers the base seed
                                                      train_loader.generator.initial_seed())})
        return real_fit(model, train_loader, val_loader, cfg, **kw)

    from tokenbook.experiments import toe_runs as arm_runs  # the module whose _fit_arm calls _fit

    monkeypatch.setattr(arm_runs, "_fit", spy)
    out = toe_runs.train_seeds("vit_fm_tiny_p4_32", bundle, 8, cfg, toe_cfg, [0, 1], model_kwargs=mk)
    assert sorted(out) == [0, 1] and all(set(r) == {"full-token", "ToE"} for r in out.values())
    assert [(r["arm"], r["seed"]) for r in seen] == [("full-token", 0), ("ToE", 0), ("full-token", 1), ("ToE", 1)]
    for a, b in ((seen[0], seen[1]), (seen[2], seen[3])):  # paired: same init, same loader and data order
        assert torch.equal(a["w"], b["w"]) and a["loader"] == b["loader"] and a["loader_seed"] == b["loader_seed"]
    assert not torch.equal(seen[0]["w"], seen[2]["w"]) and seen[0]["loader_seed"] != seen[2]["loader_seed"]
    again = toe_runs.train_seeds("vit_fm_tiny_p4_32", bundle, 8, cfg, toe_cfg, [0], model_kwargs=mk)
    for lab in ("full-token", "ToE"):
        assert out[0][lab].result.history["train_loss"].tolist() == \
            again[0][lab].result.history["train_loss"].tolist()


def _tiny_toe_setup(idx_dir, **train):
    from tokenbook.train import TrainConfig

    bundle = data.load_data(data.DataConfig(dataset="fashion_mnist", data_dir=str(idx_dir), img_size=32,
                                            train_subset=32, val_subset=16))
    cfg = TrainConfig(epochs=3, max_steps_per_epoch=1, lr=1e-3, warmup_epochs=0.0, accelerator="cpu",
                      progress=False, **train)
    return bundle, cfg, dict(expansion_step=[0, 1, 2], keep_rate=[0.5, 0.75, 1.0]), dict(num_classes=10, img_size=32)


_TIMES = ("step_time_s", "eval_time_s", "epoch_time_s", "wall_time_s", "train_img_s")


def _same_runs(a: "toe_runs.ToERun", b: "toe_runs.ToERun") -> None:
    """Same trained weights (and EMA), same per-epoch history apart from the measured times, same final metrics,
    same ToE stage history and TokenSelect state."""
    sa, sb = a.result.model.state_dict(), b.result.model.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k].to(sa[k].device)) for k in sa), a.label
    if a.result.ema is not None:
        ea, eb = a.result.ema.state_dict(), b.result.ema.state_dict()
        assert all(torch.equal(ea[k], eb[k].to(ea[k].device)) for k in ea), a.label
    cols = [c for c in a.result.history.columns if c not in _TIMES]
    pd.testing.assert_frame_equal(a.result.history[cols], b.result.history[cols])
    assert {k: v for k, v in a.result.final.items() if k not in _TIMES} == \
        {k: v for k, v in b.result.final.items() if k not in _TIMES}
    assert a.result.model.training == b.result.model.training and a.result.config.epochs == b.result.config.epochs
    if a.hook is not None:
        assert [tuple(h) for h in a.hook.history] == [tuple(h) for h in b.hook.history]
        assert b.token_select is toe.find_token_selects(b.result.model)[0]
        assert (a.token_select.expansion_stage, a.token_select.sparse_inference) == \
            (b.token_select.expansion_stage, b.token_select.sparse_inference)
    else:
        assert b.hook is None and b.token_select is None


def test_train_seeds_kernel_path_is_train_pair_of_before(idx_dir, one_thread):
    """executor='kernel' (the default) still trains in this process, nothing stored, with the weights and histories
    of the body train_pair had before the run store (written out here as it was)."""
    import dataclasses

    bundle, cfg, toe_cfg, mk = _tiny_toe_setup(idx_dir, ema_decay=0.9)
    out = toe_runs.train_seeds("vit_fm_tiny_p4_32", bundle, 8, cfg, toe_cfg, [0, 1], model_kwargs=mk)
    assert out.launched == [] and sorted(out) == [0, 1]
    for s in (0, 1):
        c = dataclasses.replace(cfg, seed=s)
        tl, vl = data.make_loaders(bundle, 8, seed=s)
        m = toe_runs.build_model("vit_fm_tiny_p4_32", s, None, 0, **mk)
        before = {"full-token": toe_runs.ToERun("full-token", toe_runs._fit(m, tl, vl, c, preprocess=bundle.preprocess,
                                                                            desc="full-token"))}
        m = toe_runs.build_model("vit_fm_tiny_p4_32", s, toe_cfg, 0, **mk)
        hook = toe.ToEStageHook()
        res = toe_runs._fit(m, tl, vl, c, hooks=[hook], preprocess=bundle.preprocess, desc="ToE")
        before["ToE"] = toe_runs.ToERun("ToE", res, hook, toe.find_token_selects(m)[0])
        assert hook.history == [(0, 1, 0.5), (1, 2, 0.75), (2, 3, 1.0)]
        for lab in ("full-token", "ToE"):
            _same_runs(before[lab], out[s][lab])
    with pytest.raises(ValueError, match="run store"):
        toe_runs.train_seeds("vit_fm_tiny_p4_32", bundle, 8, cfg, toe_cfg, [0], model_kwargs=mk,
                             executor="processes", via_store=False)


def test_train_seeds_through_the_run_store(idx_dir, tmp_path, monkeypatch, one_thread):
    """Through tokenbook.runs (in the kernel with via_store=True, and in 2 processes of 1 thread): one stored run
    per (arm, seed) with the kernel path's weights, histories and ToE stages; the rebuilt runs serve the notebook's
    helpers; a second launch trains nothing."""
    from tokenbook import runs as R

    monkeypatch.setenv("TOKENBOOK_RUNS", str(tmp_path / "runs"))
    bundle, cfg, toe_cfg, mk = _tiny_toe_setup(idx_dir, ema_decay=0.9)
    args = ("vit_fm_tiny_p4_32", bundle, 8, cfg, toe_cfg, [0, 1])
    ref = toe_runs.train_seeds(*args, model_kwargs=mk)
    got = toe_runs.train_seeds(*args, model_kwargs=mk, via_store=True)
    assert [r.source for r in got.launched] == ["trained"] * 4 and len({r.key for r in got.launched}) == 4
    assert [r.spec.label for r in got.launched] == [f"{a} vit_fm_tiny_p4_32 seed {s}" for s in (0, 1)
                                                    for a in ("full-token", "ToE")]
    assert (tmp_path / "runs").is_dir()
    for s in (0, 1):
        assert list(got[s]) == ["full-token", "ToE"]
        for lab in ("full-token", "ToE"):
            _same_runs(ref[s][lab], got[s][lab])
    # the notebook's helpers read the rebuilt runs as they read the kernel's
    cols = ["run", "epochs", "steps", "top1", "top5", "ema_top1", "final_train_loss"]
    pd.testing.assert_frame_equal(toe_runs.run_summary(got[0])[cols], toe_runs.run_summary(ref[0])[cols])
    pd.testing.assert_frame_equal(toe_runs.top1_seeds_table(got), toe_runs.top1_seeds_table(ref))
    assert toe_runs.val_curves(got) == toe_runs.val_curves(ref)
    assert [r["params"] for r in toe_runs.floor_rows(got)] == [r["params"] for r in toe_runs.floor_rows(ref)]
    x = torch.randn(2, 3, 32, 32)
    rem = toe_runs.removable_at_test(got[0]["ToE"].result.model, "vit_fm_tiny_p4_32", x, **mk)
    assert rem["max_abs_diff"] == 0 and rem["train_mode_max_abs_diff"] > 0
    assert not toe.find_token_selects(got[0]["ToE"].result.ema)[0].sparse_inference  # the EMA copy: ToE off
    table = R.runs_table(got.launched)
    assert table["source"].tolist() == ["trained"] * 4 and set(table["executor"]) == {"kernel"}

    again = toe_runs.train_seeds(*args, model_kwargs=mk, via_store=True)
    assert {r.source for r in again.launched} == {"store"}
    assert [r.key for r in again.launched] == [r.key for r in got.launched]
    for s in (0, 1):
        for lab in ("full-token", "ToE"):
            _same_runs(got[s][lab], again[s][lab])
            assert again[s][lab].result.timing == got[s][lab].result.timing  # the stored times, not new ones

    par = toe_runs.train_seeds(*args, model_kwargs=mk, executor="processes", workers=2, store=str(tmp_path / "par"))
    assert [r.source for r in par.launched] == ["trained"] * 4 and {r.threads for r in par.launched} == {1}
    assert {r.executor for r in par.launched} == {"processes"}
    for s in (0, 1):
        for lab in ("full-token", "ToE"):
            _same_runs(ref[s][lab], par[s][lab])
    base_less = toe_runs.train_seeds(*args, model_kwargs=mk, via_store=True, run_baseline=False)
    assert [list(r) for r in base_less.values()] == [["ToE"], ["ToE"]]
    assert {r.source for r in base_less.launched} == {"store"}  # the same ToE runs as above


def test_launch_options_and_the_executor_parameter():
    from tokenbook.params import ParamsError

    P = toe_runs.Params
    assert toe_runs.launch_options(P()) == {"executor": "kernel"}
    for ex in ("processes", "torchrun"):
        assert toe_runs.launch_options(P(executor=ex)) == {"executor": ex}
    opts = toe_runs.launch_options(P(executor="submitit", slurm_partition="gpu", gpus_per_node=4,
                                     job_timeout_min=60, wait_for_jobs=False, num_workers=3))
    assert opts == {"executor": "submitit", "cluster": None, "wait": False,
                    "resources": {"gpus_per_node": 4, "timeout_min": 60, "cpus_per_task": 4,
                                  "slurm_partition": "gpu"}}
    with pytest.raises(ParamsError, match="'executor' = 'ray' is not one of"):
        P(executor="ray")
    assert profile_params("cpu")["executor"] == "processes"
    assert profile_params("smoke")["executor"] == "kernel" and P.PROOF["executor"] == "kernel"


def test_verdict_over_seeds_and_the_claims_paragraph():
    from tokenbook import claims as C

    summary = pd.DataFrame([
        {"run": "full-token", "top1": 85.0, "step_time_s": 120.0, "train_wall_s": 130.0, "wall_time_s": 140.0},
        {"run": "ToE", "top1": 84.7, "step_time_s": 90.0, "train_wall_s": 100.0, "wall_time_s": 110.0}])
    slow = summary.assign(train_wall_s=[130.0, 120.0], top1=[85.0, 85.3])
    sp = toe_runs.per_seed({0: toe_runs.speedup_table(summary), 1: toe_runs.speedup_table(slow)})
    text = toe_runs.verdict(sp)
    assert "median over 2 seeds" in text and "+0.00 pt, mean" in text and "**not met**" in text
    assert f"{(1.3 + 130 / 120) / 2:.2f}x" in text  # median of two = their mean
    ev = [C.Evidence("toe.compute_saving", value=1.3132, scale="s"),
          C.Evidence("toe.train_speedup", ratio=1.1, q1=1.05, q3=1.15, scale="s"),
          C.paired_evidence("toe.lossless", {0: {"ToE": 80.0, "full-token": 79.0}, 1: {"ToE": 79.0, "full-token": 79.5},
                                             2: {"ToE": 80.0, "full-token": 79.0}}, "ToE", "full-token", scale="s",
                            plateau="no: at most +2.0 pt")]
    para = C.verdict_summary(C.verdict_table("toe", ev), kinds=None)  # 03's claims paragraph: every claim
    lines = para.splitlines()
    assert len(lines) == 5
    assert "`toe.compute_saving` (structural): **reproduced**, ours 1.313" in para
    assert "`toe.train_speedup` (hardware): **contradicted**, median 1.100x, IQR 1.050-1.150" in para
    assert "`toe.lossless` (empirical): **inconclusive**, +0.50 pt [" in para and "n = 3" in para
    assert "plateau: no: at most +2.0 pt" in para
    assert "`toe.removable_at_test` (structural): **failed**" in para
    assert "`toe.imagenet_deit_s` (empirical): **not_testable_here**; needs:" in para


def test_judge_heldout_makes_every_runs_final_top1_the_heldout_one(idx_dir, one_thread):
    """03's judge_heldout: each run's model (ToE: all tokens in eval) evaluated on every held-out image becomes its
    final top-1, the subset's value kept beside it; the seeds table and the claims read it, the curves do not move;
    a second call does not lose the subset's number."""
    from tokenbook import heldout
    from tokenbook.train import evaluate

    bundle, cfg, toe_cfg, mk = _tiny_toe_setup(idx_dir)
    runs = toe_runs.train_seeds("vit_fm_tiny_p4_32", bundle, 8, cfg, toe_cfg, [0, 1], model_kwargs=mk)
    subset = {(s, lab): r.result.final["val_top1"] for s, rr in runs.items() for lab, r in rr.items()}
    curves = toe_runs.val_curves(runs)
    ho = heldout.heldout_bundle(bundle.config)
    got = toe_runs.judge_heldout(runs, ho)
    loader = data.make_loaders(ho, 64, device="cpu")[1]
    for (s, lab), v in got.items():
        final = runs[s][lab].result.final
        assert final["val_top1"] == v and final["val_subset_top1"] == subset[(s, lab)]
        m = runs[s][lab].result.model
        assert v == pytest.approx(evaluate(m, loader, preprocess=ho.preprocess, device=torch.device("cpu"))["top1"])
    assert toe_runs.val_curves(runs) == curves
    table = toe_runs.top1_seeds_table(runs).set_index("run")
    assert table.loc["ToE", "top1_mean"] == pytest.approx((got[(0, "ToE")] + got[(1, "ToE")]) / 2)
    toe_runs.judge_heldout(runs, ho)
    assert runs[0]["ToE"].result.final["val_subset_top1"] == subset[(0, "ToE")]


def test_03s_cpu_profile_judges_heldout_with_seeds_by_power():
    from conftest import ROOT
    from tokenbook import claims
    from tokenbook.runner import profile_parameters

    p = dict(profile_parameters(ROOT, "03_toe", "cpu"))
    assert p["judge_heldout"] is True
    seeds, plan = claims.plan_seeds(p["seeds"], p["seed_pilot"], p["seed_cap"], paper="toe", root=ROOT)
    assert seeds == [0, 1, 2, 3] and plan.set_index("claim").loc["toe.lossless", "planned"] == 4
    for prof in ("smoke", "gpu", "full"):
        q = dict(profile_parameters(ROOT, "03_toe", prof))
        assert not q["seed_pilot"] and q["judge_heldout"] is False, prof
