"""Notebook 05_memory: its smoke tables (content, paper values with sources, n/a where unknown, exactness),
its experiment functions in tokenbook.memory, and the `full` profile's recipe on a tiny fake ImageNet-style folder."""
import math

import numpy as np
import pandas as pd
import pytest
import timm
import torch

import tokenbook.models  # noqa: F401  (registers the small ViTs)
from tokenbook import claims, data
from tokenbook.experiments import memory
from tokenbook.runner import profile_parameters

from conftest import ROOT

NB = "05_memory"


def profile_params(profile: str) -> dict:
    """All parameters of a profile run (the notebook's Params: defaults overridden by the profile file), as a dict."""
    return dict(profile_parameters(ROOT, NB, profile))


# ----------------------------------------------------------------------------------------------------------
# The smoke run's tables
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke(smoke_results):
    record, folder = smoke_results(NB)
    assert record["status"] == "ok", record
    return folder


def _csv(folder, name, raw=False):
    """A result table; ``raw=True`` keeps the literal "n/a" strings (pandas reads them as NaN by default)."""
    return pd.read_csv(folder / f"{name}.csv", keep_default_na=not raw)


@pytest.mark.notebook
def test_smoke_finetune_results(smoke):
    params = profile_params("smoke")
    res = _csv(smoke, "finetune_results")
    methods = [memory.method_label(*m) for m in memory.parse_methods(params["methods"])]
    tasks = ["fm_4_5_6", "digits"]
    seeds = claims.parse_seeds(params["seeds"])
    assert len(seeds) == 2 and list(res["seed"].unique()) == seeds
    assert list(res["task"].unique()) == tasks and list(res["method"].unique()) == methods
    assert len(res) == len(seeds) * len(tasks) * len(methods)
    assert res["top1"].between(0, 100).all() and (res["gmacs"] > 0).all()
    assert np.allclose(res["gflops"], 2 * res["gmacs"])
    # the seeds share the architecture: parameter counts do not depend on the seed
    by_seed = res.pivot_table(index=["task", "method"], columns="seed", values="trainable_params")
    assert (by_seed.nunique(axis=1) == 1).all()
    res = res[res.seed == seeds[0]]
    for t in tasks:
        d = res[res.task == t].set_index("method")["trainable_params"]
        assert d["head"] < d["head+cls"] < d["memory-1"] < d["memory-10"] < d["full"]
    # per-task parameters of the small backbone (width 64, depth 6): 6*64*m + 64 + 65*C
    fm = res[(res.task == "fm_4_5_6")].set_index("method")["task_params"]
    assert fm["memory-1"] == memory.memory_task_params(6, 64, 1, 3) == 6 * 64 + 64 + 65 * 3
    assert fm["head"] == 65 * 3 and fm["head+cls"] == 64 + 65 * 3
    # memory adds attention keys: more MACs than head+cls, same as plain for head-only
    g = res[res.task == "digits"].set_index("method")["gmacs"]
    assert g["memory-10"] > g["memory-1"] > g["head+cls"] >= g["head"]
    macs = res.pivot_table(index=["task", "method"], columns="seed", values="gmacs")
    assert (macs.nunique(axis=1) == 1).all()
    # mean / CI over seeds and the per-seed table
    st = _csv(smoke, "finetune_seeds")
    assert set(st["task"]) == {*tasks, "mean over tasks"} and (st["n"] == len(seeds)).all()
    assert (st["ci_low"] <= st["top1_mean"]).all() and (st["top1_mean"] <= st["ci_high"]).all()
    ps = _csv(smoke, "finetune_per_seed")
    assert len(ps) == len(seeds) * len(methods)
    assert np.allclose(ps["mean over tasks"], ps[tasks].mean(axis=1))


@pytest.mark.notebook
def test_smoke_paper_side_by_side(smoke):
    side = _csv(smoke, "finetune_table").set_index("method")
    assert (side["n_seeds"] == 2).all()
    assert (side["ours mean ci_low"] <= side["ours mean"]).all() and (side["ours mean"] <= side["ours mean ci_high"]).all()
    assert side.loc["head", "ours gain vs head"] == 0 and side.loc["head", "ours gain ci_low"] == 0
    assert side.loc["memory-1", "paper CIFAR-100"] == 90.9 and side.loc["full", "paper iNaturalist"] == 54.0
    assert side.loc["head", "paper SUN-397"] == 75.9 and side.loc["head+cls", "paper Places-365"] == 52.4
    assert "results_from_paper.png" in side.loc["memory-1", "paper_source"]
    assert side.loc["memory-1", "paper gain vs head"] == pytest.approx((77.0 + 49.4 + 90.9 + 53.3
                                                                        - 75.9 - 46.3 - 85.8 - 50.9) / 4)
    cmp = _csv(smoke, "finetune_vs_paper")
    per_task = cmp[cmp.metric == "top1"]
    assert per_task["paper"].isna().all()  # no paper dataset among the smoke tasks
    raw = _csv(smoke, "finetune_vs_paper", raw=True)
    assert (raw.loc[raw.metric == "top1", "paper_source"] == "n/a").all()
    gains = cmp[cmp.metric == "gain vs head (points)"].set_index("method")
    assert gains.loc["memory-1", "paper"] == pytest.approx(2.925)
    assert "[computed]" in gains.loc["memory-1", "paper_source"]
    assert gains.loc["memory-1", "diff"] == pytest.approx(gains.loc["memory-1", "ours"] - 2.925)
    params = _csv(smoke, "params_vs_reference").set_index("model")
    assert params.loc["ViT-B/32 memory-1", "ours"] == 86_884 and bool(params.loc["ViT-B/32 memory-1", "pass"])
    assert params.loc["ViT-B/32 memory-10", "paper"] == 169_828 and math.isnan(params.loc["ViT-B/32 head", "paper"])


@pytest.mark.notebook
def test_smoke_non_destructive_and_concatenation(smoke):
    nd = _csv(smoke, "non_destructive")
    assert list(nd["tasks_merged"]) == [0, 1, 2]
    assert list(_csv(smoke, "merged_vs_separate")["merged_tasks"]) == [2, 2]
    assert (nd["source_max_abs_diff"] == 0.0).all(), "source head must be bit-identical on CPU"
    assert nd["source_top1"].nunique() == 1 and (nd["source_predictions_same_pct"] == 100).all()
    mv = _csv(smoke, "merged_vs_separate")
    assert (mv["max_abs_logit_diff"] <= 1e-6).all() and mv["same_predictions"].all() and (mv["diff_top1"] == 0).all()
    naive = _csv(smoke, "naive_merge")
    no_mask = naive[naive.variant == "no mask"]
    assert (no_mask["source_max_abs_diff"] > 0).all(), "without the mask the source head changes"
    assert (naive[naive.variant == "tasks see each other"]["source_max_abs_diff"] == 0).all()
    nvp = _csv(smoke, "naive_merge_vs_paper")
    assert list(nvp["paper_top1_first_task"]) == [50.0, 28.1, 27.8, 17.3]
    assert nvp["paper_source"].str.contains("third_party").all()
    assert nvp.loc[2:, "ours_top1_first_task"].isna().all()  # only two tasks merged in smoke
    ext = _csv(smoke, "extension_vs_concatenation").set_index("role")
    assert ext.loc["earlier task", "extension_max_abs_diff"] == 0.0 and ext.loc["earlier task", "reads"] == "-"
    assert ext.loc["later task", "reads"] == "fm_4_5_6" and ext.loc["later task", "concat_max_abs_diff"] == 0.0
    eff = _csv(smoke, "merged_efficiency")
    assert eff.loc[1, "gmacs"] < eff.loc[0, "gmacs"] and eff.loc[1, "forward_passes"] == 1


@pytest.mark.notebook
def test_smoke_figures_and_schedule(smoke):
    import json

    meta = json.loads((smoke / "meta.json").read_text())
    figs = {f["name"] for f in meta["figures"]}
    assert {"accuracy_vs_cells", "memory_attention", "patch_attention", "attention_masks"} <= figs
    att = _csv(smoke, "memory_attention")
    assert att["memory_attention"].between(0, 1).all() and set(att["task"]) == {"fm_4_5_6", "digits"}
    sched = _csv(smoke, "paper_schedule").set_index("dataset")
    assert sched.loc["CIFAR-100", "epochs"] == 207 and sched.loc["CIFAR-100", "steps_per_epoch"] == 97
    assert math.isnan(sched.loc["SUN-397", "epochs"])


# ----------------------------------------------------------------------------------------------------------
# Experiment helpers
# ----------------------------------------------------------------------------------------------------------
def test_parse_methods_and_labels():
    assert memory.parse_methods(["full", " head", "head+cls", "memory-1", "memory-10"]) == [
        ("full", 0), ("head", 0), ("head+cls", 0), ("memory", 1), ("memory", 10)]
    assert memory.method_label("memory", 5) == "memory-5" and memory.method_label("head+cls") == "head+cls"
    for bad, msg in ((["memory"], "unknown method"), (["memory-0"], "cells"), (["memory-x"], "cell count"),
                     (["head", "head"], "twice"), ([], "no methods"), (["lora"], "unknown method")):
        with pytest.raises(ValueError, match=msg):
            memory.parse_methods(bad)


def test_steps_to_epochs():
    s = memory.steps_to_epochs(20_000, 50_000, 512)
    assert (s["steps_per_epoch"], s["epochs"], s["max_steps_per_epoch"]) == (97, 207, 97)
    assert 20_000 <= s["total_steps"] < 20_000 + s["epochs"]
    s = memory.steps_to_epochs(20_000, 1_803_460, 512)
    assert s["epochs"] == 6 and s["total_steps"] == 20_004
    assert memory.steps_to_epochs(10, 100, 64)["epochs"] == 10  # one step per epoch
    with pytest.raises(ValueError, match="no full batch"):
        memory.steps_to_epochs(10, 12, 512)


def test_digits_and_target_task_names():
    b = memory.digits_data(img_size=16, train_size=300, val_size=200, seed=0)
    assert len(b.train) == 300 and len(b.val) == 200 and b.num_classes == 10
    assert np.bincount(b.val.labels, minlength=10).min() >= 19  # stratified
    x, y = b.train[0]
    assert x.dtype == torch.uint8 and x.shape == (1, 8, 8) and 0 <= y < 10
    assert b.preprocess(b.train.images_tensor(4)).shape == (4, 3, 16, 16)
    again = memory.digits_data(img_size=16, train_size=300, val_size=200, seed=0)
    assert np.array_equal(again.val.images, b.val.images)
    assert memory.paper_dataset_for("cifar100") == "CIFAR-100" and memory.paper_dataset_for("inat2017") == "iNaturalist"
    assert memory.paper_dataset_for("places365") == "Places-365" and memory.paper_dataset_for("sun397") == "SUN-397"
    assert memory.paper_dataset_for("fm_4_5_6") is None
    with pytest.raises(ValueError, match="unknown target task"):
        memory.load_target_tasks(["mnist"], 28)


def test_target_tasks_from_idx_and_folder(idx_dir, tmp_path):
    folder = data.write_folder_fixture(tmp_path / "sun397", per_class=4, size=40)
    tasks = memory.load_target_tasks(["fm:7,8,9", "digits", f"folder:{folder}"], 32, data_dir=str(idx_dir), train_subset=30,
                                     val_subset=12)
    assert [t.name for t in tasks] == ["fm_7_8_9", "digits", "sun397"]
    assert [t.num_classes for t in tasks] == [3, 10, 3] and tasks[2].paper_dataset == "SUN-397"
    assert set(tasks[0].bundle.train.labels) == {0, 1, 2}
    with pytest.raises(ValueError, match="both named"):
        memory.load_target_tasks(["digits", "digits"], 28)


def _tiny_backbone(**kw):
    torch.manual_seed(0)
    return timm.create_model("vit_fm_tiny_p4_28", num_classes=4, patch_size=7, **kw).eval().requires_grad_(False)


def _digit_task(name, classes, seed):
    b = memory.digits_data(img_size=28, train_size=64, val_size=100, seed=seed)
    return memory.TargetTask(name, "digits", b)


def _randomize(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.tasks[name].parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def test_concatenation_and_extension_study_exact():
    bb = _tiny_backbone()
    tasks = [_digit_task("a", 10, 0), _digit_task("b", 10, 1), _digit_task("c", 10, 2)]
    models = [_randomize(memory.finetune_model(bb, "memory", 10, cells=c, task=t.name), t.name, i)
              for i, (t, c) in enumerate(zip(tasks, (1, 2, 3)))]
    study = memory.concatenation_study(bb, models, tasks, source_bundle=tasks[0].bundle, batch_size=50)
    nd, mv, naive = study["non_destructive"], study["merged_vs_separate"], study["naive_merge"]
    assert (nd["source_max_abs_diff"] == 0).all() and nd["source_top1"].nunique() == 1
    assert (mv["max_abs_logit_diff"] == 0).all() and mv["same_predictions"].all()
    no_mask = naive[naive.variant == "no mask"]
    assert (no_mask["source_max_abs_diff"] > 0).all()
    cross = naive[naive.variant == "tasks see each other"].set_index("tasks_merged")
    assert cross.loc[1, "mean_change_vs_standalone"] == 0 and (cross["source_max_abs_diff"] == 0).all()
    # merged model is one forward pass: fewer MACs than running the three models
    eff = memory.merged_efficiency(models, tasks[0].bundle.preprocess(tasks[0].bundle.val.images_tensor(2)),
                                   latency=False)
    assert eff.loc[1, "macs_ratio_vs_separate"] < 0.5
    # extension: the earlier task is untouched, the later one reads it
    ext = memory.MemoryViT(bb)
    ext.load_task("a", models[0].task_state_dict("a"))
    ext.add_task("b", 10, cells=2, extend=True)
    ext.tasks["b"].load_state_dict(models[1].task_state_dict("b"))
    tab = memory.extension_study(bb, ext, models[0], models[1], tasks[0], tasks[1], batch_size=50).set_index("task")
    assert tab.loc["a", "extension_max_abs_diff"] == 0 and tab.loc["b", "extension_max_abs_diff"] > 0
    assert tab.loc["b", "reads"] == "a" and tab.loc["b", "concat_max_abs_diff"] == 0
    fig = memory.plot_masks(17, [1, 2, 3])
    assert len(fig.axes) == 2
    fig = memory.patch_attention_figure(study["merged_model"], tasks, per_task=1, source_bundle=tasks[0].bundle)
    assert len(fig.axes) == 4 * 5  # 4 rows (source + 3 tasks), image + source cls + 3 task cls


def test_run_finetune_table_pooled_head_backbone():
    """A pooled-head ViT (no class token) runs every method; new class tokens are drawn from a normal."""
    bb = _tiny_backbone(class_token=False, global_pool="avg")
    task = _digit_task("d", 10, 0)
    cfg = memory.finetune_train_config({"epochs": 1, "batch_size": 32, "opt": "sgd", "lr": 0.05, "momentum": 0.9,
                                        "weight_decay": 0.0, "clip_grad": 1.0, "warmup_steps": 1, "sched": "cosine",
                                        "min_lr": 0.0, "accelerator": "cpu", "precision": "32-true", "seed": 0},
                                       max_steps_per_epoch=1)
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    run = memory.run_finetune_table(bb, [task], memory.parse_methods(["full", "head", "head+cls", "memory-2"]), cfg,
                                    verbose=False)
    assert list(run.results["method"]) == ["full", "head", "head+cls", "memory-2"]
    assert run.models[("d", "full")] is None and run.models[("d", "memory-2")].backbone is bb
    assert all(torch.equal(before[k], v) for k, v in bb.state_dict().items()), "shared backbone must not change"
    fig = memory.plot_accuracy_vs_cells(run.results)
    assert len(fig.axes) == 1


# ----------------------------------------------------------------------------------------------------------
# The `full` profile's recipe on a tiny fake ImageNet-style folder
# ----------------------------------------------------------------------------------------------------------
def test_full_profile_recipe_runs_on_fake_folder(tmp_path):
    p = profile_params("full")
    assert p["model_name"].startswith("vit_base_patch32_224") and p["img_size"] == 224 and p["source_classes"] == []
    assert p["backbone_checkpoint"] and p["checkpoint_num_classes"] == 21843
    cfg = memory.finetune_train_config(p)
    assert (cfg.opt, cfg.momentum, cfg.clip_grad, cfg.batch_size, cfg.sched) == ("sgd", 0.9, 1.0, 512, "cosine")
    assert cfg.warmup_steps > 0 and p["train_steps"] == 20_000 and cfg.warmup_lr == 0.0
    names = [data.tasks.task_name(t) for t in p["targets"]]
    assert [memory.paper_dataset_for(n) for n in names] == ["CIFAR-100", "Places-365", "SUN-397", "iNaturalist"]
    methods = memory.parse_methods(p["methods"])
    assert [memory.method_label(*m) for m in methods] == ["full", "head", "head+cls", "memory-1", "memory-5",
                                                          "memory-10", "memory-20"]
    # 20k steps at batch 512 on CIFAR-100's 50k images
    c = memory.finetune_config(cfg, "memory", 50_000, p["train_steps"], p["full_lr"], p["val_evals"])
    assert c.epochs == 207 and c.max_steps_per_epoch == 97
    assert p["val_evals"] == 10 and c.eval_every == memory.eval_every(207, 10) == 20  # ten validation passes
    assert memory.finetune_config(cfg, "full", 50_000, p["train_steps"], p["full_lr"]).lr == p["full_lr"]

    # a ViT-B/32-shaped checkpoint file (1 block to stay small) loaded through the profile's path
    src = timm.create_model("vit_base_patch32_224", depth=1, num_classes=p["checkpoint_num_classes"])
    ckpt = tmp_path / "b32.pth"
    torch.save(src.state_dict(), ckpt)
    bb = memory.load_backbone(p["model_name"], p["checkpoint_num_classes"], img_size=p["img_size"],
                              patch_size=p["patch_size"], checkpoint_file=str(ckpt),
                              checkpoint_num_classes=p["checkpoint_num_classes"], depth=1)
    assert torch.equal(bb.head.weight, src.head.weight)
    bb.eval().requires_grad_(False)
    mean, std = memory.backbone_norm(bb)
    assert mean == (0.5, 0.5, 0.5) and std == (0.5, 0.5, 0.5)  # the AugReg checkpoint's normalisation
    folder = data.write_folder_fixture(tmp_path / "cifar100", classes=("a", "b", "c"), per_class=4, size=40)
    tasks = memory.load_target_tasks([f"folder:{folder}"], p["img_size"], preset=p["preset"], mean=mean, std=std)
    assert tasks[0].paper_dataset == "CIFAR-100" and tasks[0].bundle.train[0][0].shape == (3, 224, 224)
    small = memory.finetune_train_config(p, batch_size=4, accelerator="cpu", precision="32-true")
    run = memory.run_finetune_table(bb, tasks, [methods[0], methods[3]], small, train_steps=2,
                                    full_lr=p["full_lr"], verbose=False, macs=False)
    r = run.results.set_index("method")
    assert (r["steps"] == 2).all() and (r["epochs"] == 1).all()
    assert r.loc["full", "lr"] == p["full_lr"] and r.loc["memory-1", "lr"] == p["lr"]
    assert r.loc["memory-1", "task_params"] == memory.memory_task_params(1, 768, 1, 3)
    cmp = memory.finetune_vs_paper(run.results).set_index(["task", "method"])
    row = cmp.loc[("cifar100", "memory-1")]
    assert row["paper"] == 90.9 and row["diff"] == pytest.approx(row["ours"] - 90.9)
    assert "[paper]" in row["paper_source"]
    with pytest.raises(FileNotFoundError, match="ImageNet-21k"):
        memory.load_backbone(p["model_name"], 10, checkpoint_file=str(tmp_path / "missing.npz"))


# ----------------------------------------------------------------------------------------------------------
# The cpu profile's recipe, the store's backbone refs
# ----------------------------------------------------------------------------------------------------------
def test_cpu_profile_pretraining_recipe_is_the_workbooks():
    p = profile_params("cpu")
    cfg = memory.pretrain_config(p)
    assert (cfg.opt, cfg.lr, cfg.weight_decay, cfg.label_smoothing, cfg.warmup_epochs, cfg.sched, cfg.batch_size) == (
        "adamw", 2e-3, 0.05, 0.1, 1.0, "cosine", 128)
    assert cfg.max_steps is None and memory.pretrain_config({**p, "max_steps": 3}).max_steps == 3
    ft = memory.finetune_train_config(p)
    assert memory.finetune_config(ft, "full", 1000, 0, p["full_lr"]).lr == p["full_lr"] != p["lr"]
    assert ft.eval_every == 1 and ft.epochs == p["epochs"]  # every epoch evaluated: the plateau curves
    assert not profile_params("full")["fit_floors"] and profile_params("gpu")["fit_floors"]


def test_checkpoint_backbone_ref_loads_the_file(tmp_path):
    src = timm.create_model("vit_fm_tiny_p7_28", num_classes=3)
    ckpt = tmp_path / "bb.pth"
    torch.save(src.state_dict(), ckpt)
    ref = memory.backbone_ref("vit_fm_tiny_p7_28", 3, 28, 0, str(ckpt), 3)
    bb = memory.load_ref_backbone(ref)
    assert not bb.training and not any(q.requires_grad for q in bb.parameters())
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), bb.state_dict().values()))
    targ = memory.task_args("digits", 28, 40, 20, (0.5,) * 3, (0.5,) * 3)
    task = memory.load_task(targ)
    assert task.name == "digits" and len(task.bundle.train) == 40 and len(task.bundle.val) == 20
    assert memory.task_args("digits", 28, 0, 0, (0.5,), (0.5,))["train_subset"] is None  # 0 means all
