"""tokenbook.heldout: every held-out image of the run's classes for the claims' top-1, outside the run store."""
import pytest
import timm
import torch

import tokenbook.models  # noqa: F401
from tokenbook import data, heldout, runs
from tokenbook.train import evaluate


def test_heldout_config_keeps_the_training_split_and_takes_every_test_image(idx_dir):
    cfg = data.DataConfig(data_dir=str(idx_dir), img_size=28, channels=1, train_subset=64, val_subset=16,
                          classes=[0, 1, 2])
    small, ho = data.load_data(cfg), heldout.heldout_bundle(cfg)
    assert heldout.heldout_config(cfg).val_subset is None and heldout.heldout_config(cfg).train_subset == 64
    assert len(ho.train) == len(small.train) and len(ho.val) > len(small.val)
    assert sorted({int(ho.val[i][1]) for i in range(len(ho.val))}) == [0, 1, 2]  # the run's classes only
    text = heldout.describe(small, ho)
    assert f"all {len(ho.val):,} held-out images" in text and "(" not in text and ")" not in text


def test_heldout_top1_is_evaluate_on_every_image_and_shares_aliases(idx_dir):
    cfg = data.DataConfig(data_dir=str(idx_dir), img_size=28, channels=1, train_subset=32, val_subset=8)
    ho = heldout.heldout_bundle(cfg)
    torch.manual_seed(0)
    m = timm.create_model("vit_fm_tiny_p7_28", num_classes=10, in_chans=1)
    got = heldout.heldout_top1({"a": m, "b": m}, ho, batch_size=7)
    loader = data.make_loaders(ho, 64, device="cpu")[1]
    assert got["a"] == got["b"] == pytest.approx(evaluate(m, loader, preprocess=ho.preprocess)["top1"])
    with pytest.raises(ValueError, match="batch_size"):
        heldout.heldout_top1({"a": m}, ho, batch_size=0)
    with pytest.raises(KeyError, match="top1_memory"):
        heldout.heldout_top1({"a": m}, ho, head="memory")


def test_heldout_is_in_no_trainer_closure():
    """Evaluating stored models again must not change any run's key."""
    for mod in ("baselines_runs", "vittm_runs", "t2t_vit_runs", "toe_runs", "seit_runs", "memory_runs"):
        files = {str(p) for p in runs.code_closure(f"tokenbook.experiments.{mod}")}
        assert not any(f.endswith("tokenbook/heldout.py") for f in files), mod


def test_bundle_for_follows_the_switch_and_judged_on_names_the_images(idx_dir):
    cfg = data.DataConfig(data_dir=str(idx_dir), img_size=28, channels=1, train_subset=32, val_subset=8)
    small = data.load_data(cfg)
    assert heldout.bundle_for(cfg, False) is None
    assert heldout.bundle_for(heldout.heldout_config(cfg), True) is None  # already every held-out image
    ho = heldout.bundle_for(cfg, True)
    assert len(ho.val) > len(small.val)
    assert heldout.judged_on(small) == "the 8 validation images"
    assert heldout.judged_on(small, ho) == f"all {len(ho.val):,} held-out images"
