"""Notebook 05_memory through the workbook's run store (issue 20) and beside the floors (issue 19): the pre-training
and every fine-tuning run stored, the store path equal to the kernel path, a second launch training nothing, the
backbone in every fine-tuning key, the floors tables and the failed-run rule of the pre-training."""
import numpy as np
import pandas as pd
import pytest
import torch

import tokenbook.models  # noqa: F401  (registers the small ViTs)
from tokenbook import claims, data
from tokenbook import runs as R
from tokenbook.experiments import memory

BB = {"num_classes": 2, "img_size": 28, "patch_size": 7}


def _source(idx_dir):
    return data.load_data(data.DataConfig(dataset="fashion_mnist", data_dir=str(idx_dir), img_size=28,
                                          train_subset=32, val_subset=16, classes=[0, 1], subset_seed=0))


def _pcfg(**kw):
    return memory.pretrain_config({"pretrain_epochs": 1, "pretrain_batch_size": 16, "pretrain_lr": 2e-3,
                                   "pretrain_label_smoothing": 0.1, "accelerator": "cpu", "precision": "32-true",
                                   "seed": 0}, max_steps_per_epoch=2, **kw)


def _fcfg():
    return memory.finetune_train_config({"epochs": 2, "batch_size": 16, "opt": "sgd", "lr": 0.05, "momentum": 0.9,
                                         "weight_decay": 0.0, "clip_grad": 1.0, "warmup_steps": 1, "sched": "cosine",
                                         "min_lr": 0.0, "accelerator": "cpu", "precision": "32-true", "seed": 0},
                                        max_steps_per_epoch=2)


@pytest.mark.slow
def test_store_path_equals_kernel_path_and_a_second_launch_trains_nothing(idx_dir, tmp_path, one_thread):
    src = _source(idx_dir)
    threads = torch.get_num_threads()
    kern = memory.pretrain_backbone("vit_fm_tiny_p7_28", BB, src, _pcfg(), 16)
    stored = memory.pretrain_backbone("vit_fm_tiny_p7_28", BB, src, _pcfg(), 16, executor="kernel", via_store=True,
                                      store=tmp_path, threads=threads)
    assert kern.ref is None and stored.ref["kind"] == "stored" and stored.launched[0].source == "trained"
    assert kern.final["val_top1"] == stored.final["val_top1"]
    for (k, a), (_, b) in zip(kern.backbone.state_dict().items(), stored.backbone.state_dict().items()):
        assert torch.equal(a, b), k
    mean, std = memory.backbone_norm(stored.backbone)
    targs = [memory.task_args("digits", 28, 48, 32, mean, std, seed=0)]
    tasks = [memory.load_task(targs[0])]
    methods = memory.parse_methods(["full", "head", "memory-1"])
    ref = memory.run_finetune_seeds(kern.backbone, tasks, methods, _fcfg(), [0, 1], verbose=False, macs=False)
    via = memory.finetune_seeds(stored, tasks, targs, methods, _fcfg(), [0, 1], macs=False, store=tmp_path,
                                threads=threads, verbose=False)
    assert [r.source for r in via.launched] == ["trained"] * 6
    pd.testing.assert_frame_equal(ref.results.drop(columns=["train_s", "step_ms"]),
                                  via.results.drop(columns=["train_s", "step_ms"]))
    for k, h in ref.histories.items():
        assert list(h["val_top1"]) == list(via.histories[k]["val_top1"]), k
    m_ref, m_via = ref.models[(1, "digits", "memory-1")], via.models[(1, "digits", "memory-1")]
    assert torch.equal(m_ref.tasks["digits"].memory[0], m_via.tasks["digits"].memory[0])
    # the rebuilt memory model shares the pre-trained backbone: its source head is the backbone's, exactly
    assert memory.source_head_max_diff(stored.backbone, [m_via], tasks[0].bundle) == 0.0
    # a second launch reads everything from the store: nothing trained, the same tables
    again = memory.pretrain_backbone("vit_fm_tiny_p7_28", BB, src, _pcfg(), 16, executor="kernel", via_store=True,
                                     store=tmp_path, threads=threads)
    via2 = memory.finetune_seeds(again, tasks, targs, methods, _fcfg(), [0, 1], macs=False, store=tmp_path,
                                 threads=threads, verbose=False)
    assert again.launched[0].source == "store" and all(r.source == "store" for r in via2.launched)
    pd.testing.assert_frame_equal(via.results, via2.results)


def test_fine_tuning_keys_name_the_backbone(idx_dir, tmp_path):
    """A changed pre-training (another recipe) gives every fine-tuning run another key: it trains again."""
    src = _source(idx_dir)
    mean, std = (0.5,) * 3, (0.5,) * 3
    targ = memory.task_args("digits", 28, 48, 32, mean, std)
    tcfg = memory.finetune_config(_fcfg(), "memory", 48)

    def ref(**kw):
        spec = memory.pretrain_spec("vit_fm_tiny_p7_28", BB, src.config, _pcfg(**kw), 16)
        return {"kind": "stored", "key": R.run_key(spec, 1), "trainer": spec.trainer, "args": spec.args,
                "store": ""}

    a = memory.finetune_spec(ref(), targ, "memory", 1, tcfg, 0)
    b = memory.finetune_spec(ref(lr=1e-3), targ, "memory", 1, tcfg, 0)
    c = memory.finetune_spec(ref(), targ, "memory", 1, tcfg, 1)
    keys = {R.run_key(s, 1) for s in (a, b, c)}
    assert len(keys) == 3
    assert R.run_key(a, 1) == R.run_key(memory.finetune_spec(ref(), targ, "memory", 1, tcfg, 0), 1)
    assert a.args["train"]["seed"] == 0 and c.args["train"]["seed"] == 1
    ck = memory.backbone_ref("vit_fm_tiny_p7_28", 2, 28, 7, "/nowhere.npz")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        memory.load_ref_backbone(ck)
    with pytest.raises(ValueError, match="unknown backbone ref"):
        memory.load_ref_backbone({"kind": "?"})
    # a stored ref is read by its key and never trained where it is read: a missing pre-training is an error
    with pytest.raises(RuntimeError, match="is not in the run store.*pretrain_backbone launches"):
        memory.load_ref_backbone({**ref(), "store": str(tmp_path)})
    with pytest.raises(ValueError, match="names its pre-training's key"):
        memory.load_ref_backbone({**ref(), "key": ""})
    assert not list(tmp_path.rglob("output.pkl"))  # nothing was trained into the store
    with pytest.raises(ValueError, match="needs a ref|trains through the run store"):
        memory.finetune_seeds(memory.Pretrained(torch.nn.Linear(1, 1)), [], [], [], _fcfg(), [0],
                              executor="processes")


def _floors(lr_top1: float, cnn_top1: float) -> pd.DataFrame:
    return pd.DataFrame([{"model": "logistic regression on pixels", "train_images": 10, "val_images": 5,
                          "top1": lr_top1, "top5": None, "params": 10, "train_s": 0.1},
                         {"model": "small CNN (width 32, 5 epochs)", "train_images": 10, "val_images": 5,
                          "top1": cnn_top1, "top5": 100.0, "params": 100, "train_s": 1.0}])


def test_finetune_beside_floors_per_task():
    res = pd.DataFrame([{"seed": s, "task": t, "method": m, "top1": v + s, "trainable_params": p, "train_s": 1.0}
                        for s in (0, 1) for t in ("a", "b") for m, v, p in (("head", 70.0, 10), ("full", 90.0, 99))])
    fl = pd.concat([_floors(80.0, 85.0).assign(task="a"), _floors(60.0, 65.0).assign(task="b")], ignore_index=True)
    tab = memory.finetune_beside_floors(res, fl)
    assert list(tab.columns[:2]) == ["task", "model"]
    a = tab[tab.task == "a"].set_index("model")
    assert a.loc["head", "top1"] == 70.5 and a.loc["head", "worst_seed_top1"] == 70.0
    assert a.loc["head", "vs_logistic_floor_pts"] == pytest.approx(-9.5)
    assert tab[tab.task == "b"].set_index("model").loc["head", "vs_logistic_floor_pts"] == pytest.approx(10.5)
    assert (tab["kind"] == "floor").sum() == 4
    with pytest.raises(ValueError, match="no floors for target task 'b'"):
        memory.finetune_beside_floors(res, fl[fl.task == "a"])


def test_pretraining_below_its_floor_fails_the_empirical_claims():
    pre = memory.Pretrained(torch.nn.Linear(1, 1), final={"val_top1": 70.0}, timing={"wall_time_s": 3.0})
    tab, failed = memory.pretrain_beside_floors(pre, _floors(80.0, 85.0), params=1000)
    assert "below the logistic-regression floor 80.00" in failed
    assert tab.iloc[0]["vs_logistic_floor_pts"] == pytest.approx(-10.0)
    _, ok = memory.pretrain_beside_floors(pre, _floors(60.0, 85.0), params=1000)
    assert ok == ""
    # the fine-tuning table of two seeds where memory-10 clearly beats every other arm
    rows = [{"seed": s, "task": t, "method": m, "top1": v + s, "paper_dataset": None}
            for s in (0, 1, 2) for t in ("a", "b")
            for m, v in (("full", 80.0), ("head", 60.0), ("head+cls", 61.0), ("memory-1", 62.0), ("memory-10", 79.0))]
    run = memory.FinetuneRun(pd.DataFrame(rows), {}, {})
    good = {e.claim: e for e in memory.claims_evidence(run, "test", {})}
    bad = {e.claim: e for e in memory.claims_evidence(run, "test", {}, failed_run=failed)}
    v_good = claims.verdict_table("memory", list(good.values())).set_index("claim")
    v_bad = claims.verdict_table("memory", list(bad.values())).set_index("claim")
    assert v_good.loc["memory.beats_head", "verdict"] == "reproduced"
    for c in ("memory.beats_head", "memory.beats_head_cls", "memory.more_memory_helps", "memory.approaches_full"):
        assert v_bad.loc[c, "verdict"] == "failed", c
    assert np.isfinite(v_bad.loc["memory.beats_head", "ours"])


def test_cpu_profile_goes_through_the_store_and_fits_the_floors():
    from conftest import ROOT
    from tokenbook.runner import profile_parameters

    p = dict(profile_parameters(ROOT, "05_memory", "cpu"))
    assert p["executor"] == "processes" and p["fit_floors"]
    assert p["model_name"] == "vit_fm_tiny_p7_28" and p["pretrain_label_smoothing"] == 0.1
    # every arm of the empirical claims runs
    labels = [memory.method_label(*m) for m in memory.parse_methods(p["methods"])]
    for c in claims.load_claims("memory"):
        if c.kind == "empirical" and not c.not_testable_here:
            assert c.a in labels and c.b in labels, c.id
    assert memory.method_label("memory", p["concat_cells"]) in labels
    smoke = dict(profile_parameters(ROOT, "05_memory", "smoke"))
    assert smoke["executor"] == "kernel" and not smoke["fit_floors"]
