"""tokenbook.released: released checkpoints against the papers' numbers (issue 20, item 3). Offline and small:
official-format state dicts of 1-block variants, a tiny ImageNet-style val folder and a tiny token release written
here. Top-1 values are made exact by a classifier bias that always predicts one chosen ImageNet class."""
from __future__ import annotations

import argparse
import hashlib
import math

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from PIL import Image
from timm.data import resolve_data_config

import tokenbook.models  # noqa: F401  (registers the names)
from tokenbook import released as R
from tokenbook.experiments import seit as seit_exp
from tokenbook.experiments import t2t_vit as t2t_exp
from tokenbook.experiments import toe as toe_exp
from tokenbook.experiments import vittm as vittm_exp

SYN = R.imagenet_synsets()
CLASSES = (0, 5, 999)  # the folder holds 3 of the 1000 synsets, 2 images each
T2T7 = R.Released(model="t2t_vit_7.in1k", file="71.7_T2T_ViT_7.pth.tar", url="u7", ref="t2t_vit:t2t_vit_7.in1k.top1",
                  kwargs=dict(depth=1))


@pytest.fixture(scope="module")
def val_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.RandomState(0)
    for c in CLASSES:
        d = root / "val" / SYN[c]
        d.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.randint(0, 256, (256, 256, 3), dtype=np.uint8)).save(d / f"ILSVRC2012_val_{c}_{i}.JPEG")
    return root


def _always(model: torch.nn.Module, cls: int, head: str = "head") -> torch.nn.Module:
    """Make the classifier predict ``cls`` for every input (zero weights, one large bias)."""
    lin = getattr(model, head)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
        lin.bias[cls] = 10.0
    return model


def _t2t7_file(tmp_path, cls: int = 999, name: str = "71.7_T2T_ViT_7.pth.tar"):
    """A released-format T2T-ViT-7 file ({'state_dict_ema': ...}, official key names) truncated to 1 block."""
    torch.manual_seed(0)
    m = _always(timm.create_model("t2t_vit_7", depth=1), cls)
    path = tmp_path / name
    torch.save({"state_dict_ema": m.state_dict()}, path)
    return path


def test_good_checkpoint_top1_sha_and_preprocessing(tmp_path, val_dir):
    path = _t2t7_file(tmp_path)
    df = R.released_table([T2T7], weights_dir=tmp_path, val_dir=val_dir, num_workers=0, device="cpu")
    row = df.iloc[0]
    assert row.status == "ok", row.status
    # 2 of the 6 images are synset 999: right only if labels are the true ImageNet indices, not 0..2
    assert row.n_images == 6 and row.ours_top1 == pytest.approx(100 / 3) and row.ours_top5 >= row.ours_top1
    assert row.paper_top1 == 71.7 and "Table 4 [paper]" in row.paper_source
    assert row.diff_pt == pytest.approx(100 / 3 - 71.7)
    assert row.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and row.weights == str(path)
    cfg = timm.models.get_pretrained_cfg("t2t_vit_7.in1k")
    assert (row.input_size, row.crop_pct, row.interpolation, row["mean"], row["std"]) == (
        cfg.input_size, cfg.crop_pct, cfg.interpolation, cfg.mean, cfg.std)
    assert row.crop_pct == 0.9 and row.data == str(val_dir / "val")
    # the val folder itself works too; max_images evaluates a subset
    df = R.released_table([T2T7], weights_dir=tmp_path, val_dir=val_dir / "val", max_images=3, num_workers=0,
                          device="cpu")
    assert df.iloc[0].n_images == 3 and df.iloc[0].status.startswith("ok (subset of 3 of 6")


def test_missing_weights_mismatch_and_other_rows_still_build(tmp_path, val_dir):
    _t2t7_file(tmp_path)
    (tmp_path / "81.7_T2T_ViTt_14.pth.tar").write_bytes(
        (tmp_path / "71.7_T2T_ViT_7.pth.tar").read_bytes())  # a T2T-ViT-7 file under the ViTt-14 name
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    entries = [
        dict(model="t2t_vit_14.in1k", file="81.5_T2T_ViT_14.pth.tar", url="https://x/81.5_T2T_ViT_14.pth.tar",
             ref="t2t_vit:t2t_vit_14.in1k.top1"),
        dict(model="t2t_vit_t_14.in1k", file="81.7_T2T_ViTt_14.pth.tar", ref="t2t_vit:t2t_vit_t_14.in1k.top1",
             kwargs=dict(depth=1)),
        dict(model="t2t_vit_12.in1k", file=None, ref="t2t_vit:t2t_vit_12.in1k.top1"),
        dict(model="t2t_vit_10.in1k", file="garbage.pth"),
        T2T7,
    ]
    df = R.released_table(entries, weights_dir=tmp_path, val_dir=val_dir, num_workers=0, device="cpu")
    assert list(df.columns) == list(R.TABLE_COLUMNS)
    missing, mismatch, noname, garbage, good = (df.iloc[i] for i in range(5))
    assert missing.status == f"weights not found: {tmp_path / '81.5_T2T_ViT_14.pth.tar'}"
    assert missing.weights == "https://x/81.5_T2T_ViT_14.pth.tar" and pd.isna(missing.sha256)
    assert math.isnan(missing.ours_top1) and missing.paper_top1 == 81.5
    assert missing.input_size == (3, 224, 224) and missing.crop_pct == 0.9  # from the registered pretrained_cfg
    assert mismatch.status.startswith("checkpoint does not match t2t_vit_t_14.in1k: ")
    assert "tokens_to_token.attention1.attn.qkv.weight" in mismatch.status and mismatch.sha256
    assert "pass paths={'t2t_vit_12.in1k'" in noname.status
    assert garbage.status.startswith("weights not readable: ")
    assert good.status == "ok" and good.ours_top1 == pytest.approx(100 / 3)
    # per-entry paths win over weights_dir
    df = R.released_table([dict(model="t2t_vit_12.in1k", kwargs=dict(depth=2))], val_dir=val_dir, num_workers=0,
                          device="cpu", paths={"t2t_vit_12.in1k": str(tmp_path / "71.7_T2T_ViT_7.pth.tar")})
    assert df.iloc[0].status.startswith("checkpoint does not match")  # 1 block in the file, 2 in the model
    assert "missing keys ['blocks.1." in df.iloc[0].status


def test_missing_or_unusable_data(tmp_path, val_dir):
    _t2t7_file(tmp_path)
    df = R.released_table([T2T7], weights_dir=tmp_path, num_workers=0, device="cpu")
    assert df.iloc[0].status == "ImageNet val folder not given" and df.iloc[0].sha256  # weights still hashed
    df = R.released_table([T2T7], weights_dir=tmp_path, val_dir=tmp_path / "nope", num_workers=0, device="cpu")
    assert df.iloc[0].status == f"ImageNet val folder not found: {tmp_path / 'nope'}"
    (tmp_path / "bad" / "cat").mkdir(parents=True)
    df = R.released_table([T2T7], weights_dir=tmp_path, val_dir=tmp_path / "bad", num_workers=0, device="cpu")
    assert "['cat'] are not ImageNet-1k synsets" in df.iloc[0].status
    df = R.released_table([dict(model="t2t_vit_14.in1k", file="absent.pth")], weights_dir=tmp_path, num_workers=0,
                          device="cpu")
    assert df.iloc[0].status == f"weights not found: {tmp_path / 'absent.pth'}; ImageNet val folder not given"


def test_toe_deit_checkpoint_with_pickled_args(tmp_path, val_dir):
    """ToE's DeiT main.py file: {'model', 'model_ema', 'args' (argparse.Namespace)}; the 'model' weights are used."""
    torch.manual_seed(0)
    src = _always(timm.create_model("deit_tiny_patch16_224", depth=1), 0)
    ema = {k: torch.zeros_like(v) for k, v in src.state_dict().items()}
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": src.state_dict(), "model_ema": ema, "args": argparse.Namespace(lr=1e-3), "epoch": 299}, path)
    name = "toe_deit_tiny_patch16_224"
    entry = {**toe_exp.RELEASED[0], "kwargs": dict(depth=1)}
    df = R.released_table([entry], paths={name: path}, val_dir=val_dir, num_workers=0, device="cpu")
    row = df.iloc[0]
    assert row.status == "ok" and row.ours_top1 == pytest.approx(100 / 3)  # synset 0: 2 of 6 images
    assert math.isnan(row.paper_top1) and math.isnan(row.diff_pt) and "no released weights" in row.note
    assert (row.crop_pct, row.interpolation) == (0.875, "bicubic")


def test_two_head_model_lists_each_head(tmp_path, val_dir):
    torch.manual_seed(0)
    m = timm.create_model("vittm_base_m28p28_224", depth=1, embed_dim=64, num_heads=2)
    _always(m, 999, "head")  # memory head right on synset 999, process head on synset 5
    _always(m, 5, "process_head")
    path = tmp_path / "vittm.pth"
    torch.save(m.state_dict(), path)
    entry = {**vittm_exp.RELEASED[0], "kwargs": dict(depth=1, embed_dim=64, num_heads=2)}
    df = R.released_table([entry], paths={entry["model"]: path}, val_dir=val_dir, num_workers=0, device="cpu")
    row = df.iloc[0]
    assert row.status == "ok" and row.ours_top1 == pytest.approx(100 / 3) and row.paper_top1 == 82.9
    assert row.heads == "memory 33.33, process 33.33"


def test_token_model_on_the_token_release(tmp_path):
    rel = seit_exp.write_tiny_release(tmp_path / "tokens", n_val=4, num_classes=4)  # val labels 0, 1, 2, 3
    torch.manual_seed(0)
    m = _always(timm.create_model("deit_tiny_token_32", depth=1), 1)
    sd = {("norm." + k[8:] if k.startswith("fc_norm.") else k): v for k, v in m.state_dict().items()}  # official
    torch.save({"model": sd, "args": argparse.Namespace(epochs=300)}, tmp_path / "trained-vit.ckpt")
    entry = {**seit_exp.RELEASED[0], "model": "deit_tiny_token_32", "kwargs": dict(depth=1)}
    df = R.released_table([entry, T2T7], weights_dir=tmp_path, token_val_dir=rel, num_workers=0, device="cpu")
    tok, pix = df.iloc[0], df.iloc[1]
    assert tok.status == "ok" and tok.n_images == 4 and tok.ours_top1 == pytest.approx(25.0)
    assert tok.paper_top1 == 74.0 and "third_party" in tok.paper_source and tok.data == str(rel)
    assert tok.input_size == (32, 28, 28) and pd.isna(tok.crop_pct) and tok["mean"] is None
    assert pix.status.startswith("weights not found") and "ImageNet val folder not given" in pix.status
    df = R.released_table([entry], weights_dir=tmp_path, num_workers=0, device="cpu")
    assert df.iloc[0].status.startswith("token val set (the unpacked IMNET1K-tokens.tar") and "not given" in \
        df.iloc[0].status
    df = R.released_table([entry], weights_dir=tmp_path, token_val_dir=tmp_path, num_workers=0, device="cpu")
    assert "not found: " + str(tmp_path / "imagenet1k-val-token.data.bin.gz") in df.iloc[0].status


def test_paper_lists_and_params():
    for exp, n in ((t2t_exp, 10), (vittm_exp, 1), (toe_exp, 3), (seit_exp, 2)):
        entries = [R.Released.of(e) for e in exp.RELEASED]
        assert len(entries) == n and all(timm.models.get_pretrained_cfg(e.model) for e in entries)
        assert all(R._paper(e)[1] for e in entries)
    # every reference id resolves to a number from the sheet
    assert [R._paper(R.Released.of(e))[0] for e in t2t_exp.RELEASED] == [71.7, 75.2, 76.5, 81.5, 83.3, 81.9, 82.3,
                                                                          81.7, 82.2, 82.6]
    assert resolve_data_config(pretrained_cfg=timm.models.get_pretrained_cfg("t2t_vit_14.in1k_384").to_dict())[
        "input_size"] == (3, 384, 384)
    kw = R.params_kwargs({"dataset": "folder:/d/imagenet", "token_source": "release:/d/tok", "num_workers": 2,
                          "released_weights": "/w", "released_max_images": 500}, device="cpu")
    assert kw == dict(val_dir="/d/imagenet", token_val_dir="/d/tok", num_workers=2, weights_dir="/w", max_images=500,
                      device="cpu")
    assert R.params_kwargs({"dataset": "fmnist", "token_source": "train"}) == {}
    with pytest.raises(ValueError, match="unknown fields"):
        R.Released.of(dict(model="x", top1=1.0))
