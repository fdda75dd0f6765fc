"""Synthetic copies of the papers' data layouts (tokenbook.data.synthetic), read back through the workbook's own
loaders: the ImageNet folder with DataConfig("folder:..."), the CIFAR-100 parquet copy with DataConfig("hf:...") as
05_memory's full profile reads it, SeiT's token release with read_release_split (and the SeiT notebook's reader)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tokenbook import runner
from tokenbook.data import DataConfig, load_data
from tokenbook.data import synthetic as S
from tokenbook.data.tokens import load_codebook, read_release_split

ROOT = Path(__file__).resolve().parents[1]
CLASSES, TRAIN, VAL = 3, 4, 2


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """All three layouts, written once through the CLI (``python -m tokenbook.data.synthetic all``)."""
    out = tmp_path_factory.mktemp("synthetic") / "data"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "lib"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "tokenbook.data.synthetic", "all", "--out", str(out),
                        "--classes", str(CLASSES), "--train-per-class", str(TRAIN), "--val-per-class", str(VAL),
                        "--seed", "3"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    return out, json.loads(p.stdout)


def test_shipped_synsets_are_imagenet_1k_sorted_head():
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    assert [w for w, _ in S.IMAGENET_SYNSETS] == [info.index_to_label_name(i) for i in range(len(S.IMAGENET_SYNSETS))]
    assert [lemma for _, lemma in S.IMAGENET_SYNSETS] == [info.index_to_description(i)
                                                         for i in range(len(S.IMAGENET_SYNSETS))]
    assert S.imagenet_classes(25)[20:] == [(info.index_to_label_name(i), info.index_to_description(i))
                                           for i in range(20, 25)]
    assert len(S.CIFAR100_FINE) == 100 and len(S.CIFAR100_COARSE) == 20
    assert np.bincount(S.CIFAR100_FINE_TO_COARSE).tolist() == [5] * 20
    assert S.CIFAR100_COARSE[S.CIFAR100_FINE_TO_COARSE[S.CIFAR100_FINE.index("apple")]] == "fruit_and_vegetables"


def test_imagenet_folder_layout_and_loader(written):
    out, man = written
    root = out / "imagenet"
    m = man["imagenet"]
    assert m["dataset"] == f"folder:{root}" and m["classes"] == ["n01440764", "n01443537", "n01484850"]
    assert m["counts"] == {"train": CLASSES * TRAIN, "val": CLASSES * VAL}
    for syn in m["classes"]:
        train = sorted(p.name for p in (root / "train" / syn).iterdir())
        assert train == sorted(f"{syn}_{i}.JPEG" for i in range(1, TRAIN + 1))
    val = sorted(p.name for p in (root / "val").glob("*/*"))
    assert val == [f"ILSVRC2012_val_{n:08d}.JPEG" for n in range(1, CLASSES * VAL + 1)]
    sizes = set()
    for f in (root / "train").glob("*/*.JPEG"):
        with Image.open(f) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and min(im.size) >= 256
            sizes.add(im.size)
    assert len(sizes) > 1  # varied sizes, as in ImageNet
    mapping = (root / "LOC_synset_mapping.txt").read_text().splitlines()
    assert mapping[0] == "n01440764 tench, Tinca tinca" and len(mapping) == CLASSES

    assert runner.check_dataset({"dataset": m["dataset"]}) is None
    b = load_data(DataConfig(dataset=m["dataset"], img_size=64))
    assert b.class_names == m["classes"] and b.num_classes == CLASSES
    assert len(b.train) == CLASSES * TRAIN and len(b.val) == CLASSES * VAL
    assert sorted(set(b.train.labels.tolist())) == list(range(CLASSES)) and np.bincount(b.val.labels).tolist() == \
        [VAL] * CLASSES
    x, y = b.val[0]
    assert tuple(x.shape) == (3, 64, 64) and 0 <= y < CLASSES


def test_cifar100_parquet_loads_like_the_memory_full_profile(written):
    out, man = written
    root = out / "cifar100"
    m = man["cifar100"]
    assert sorted(p.name for p in (root / "cifar100").iterdir()) == ["test-00000-of-00001.parquet",
                                                                      "train-00000-of-00001.parquet"]
    import pyarrow.parquet as pq

    assert pq.read_schema(root / "cifar100" / "train-00000-of-00001.parquet").names == ["img", "fine_label",
                                                                                      "coarse_label"]
    assert runner.check_dataset({"dataset": m["dataset"]}) is None
    b = load_data(DataConfig(dataset=m["dataset"], img_size=32))
    assert b.train.image_col == "img" and b.train.label_col == "fine_label"
    assert b.num_classes == 100 and b.class_names[:3] == ["apple", "aquarium_fish", "baby"]  # CIFAR-100's label space
    assert m["class_names"] == ["apple", "aquarium_fish", "baby"]
    assert len(b.train) == CLASSES * TRAIN and len(b.val) == CLASSES * VAL
    assert np.bincount(b.train.labels).tolist() == [TRAIN] * CLASSES
    img = b.train.image(0)
    assert img.size == (32, 32) and img.mode == "RGB"
    coarse = b.train.hf["coarse_label"]
    fine = b.train.hf["fine_label"]
    assert all(c == S.CIFAR100_FINE_TO_COARSE[f] for f, c in zip(fine, coarse))
    assert b.train.hf.features["coarse_label"].names[4] == "fruit_and_vegetables"

    # the 05_memory full profile's target list (hf:/data/cifar100) names the task cifar100 -> the paper's CIFAR-100
    from tokenbook.experiments import memory

    task, = memory.load_target_tasks([m["dataset"]], img_size=32, preset="transfer")
    assert task.name == "cifar100" and task.paper_dataset == "CIFAR-100"
    assert tuple(task.bundle.train[0][0].shape) == (3, 32, 32)


def test_seit_token_release_reads_back(written):
    out, man = written
    root = out / "imagenet1k-tokens"
    m = man["seit-tokens"]
    assert m["token_source"] == f"release:{root}"
    names = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
    assert names == ["codebook.ckpt", "imagenet1k-train-label.txt", "imagenet1k-train-token.data.bin.gz",
                     "imagenet1k-train-token.index.npy.gz", "imagenet1k-val-label.txt",
                     "imagenet1k-val-token.data.bin.gz", "imagenet1k-val-token.index.npy.gz"]
    tr, va = read_release_split(root, "train"), read_release_split(root, "val")
    assert tr.ids.shape == (CLASSES * TRAIN, 32, 32) and va.ids.shape == (CLASSES * VAL, 32, 32)
    assert np.bincount(tr.labels).tolist() == [TRAIN] * CLASSES and np.bincount(va.labels).tolist() == [VAL] * CLASSES
    assert tr.ids.max() >= 255 and tr.ids.max() < 391  # escapes occur; ids within the pruned codebook
    assert tuple(load_codebook(root / "codebook.ckpt").shape) == (391, 32)
    # class-dependent: an image shares more ids with its own class than with the others
    def hist(ts, k):
        return np.bincount(np.asarray(ts.ids[ts.labels == k]).ravel(), minlength=391) > 0
    own = [np.mean(hist(va, k)[np.asarray(tr.ids[tr.labels == k]).ravel()]) for k in range(CLASSES)]
    other = [np.mean(hist(va, (k + 1) % CLASSES)[np.asarray(tr.ids[tr.labels == k]).ravel()]) for k in range(CLASSES)]
    assert min(own) > max(other)

    from tokenbook.experiments import seit

    td = seit.load_release_tokens(root, cache=False)
    assert td.num_classes == CLASSES and len(td.train) == CLASSES * TRAIN


def test_writers_are_deterministic_and_refuse_foreign_folders(tmp_path):
    kw = dict(classes=2, train_per_class=3, val_per_class=2, seed=7)
    a, b = S.write_seit_tokens(tmp_path / "a", **kw), S.write_seit_tokens(tmp_path / "b", **kw)
    files = sorted(p.name for p in Path(a["root"]).iterdir())
    assert files and all((Path(a["root"]) / f).read_bytes() == (Path(b["root"]) / f).read_bytes() for f in files)
    c = S.write_seit_tokens(tmp_path / "c", **{**kw, "seed": 8})
    assert (Path(c["root"]) / "imagenet1k-train-token.data.bin.gz").read_bytes() != \
        (Path(a["root"]) / "imagenet1k-train-token.data.bin.gz").read_bytes()
    # a folder written here is replaced only with overwrite=True; a foreign non-empty folder never
    with pytest.raises(FileExistsError, match="not empty"):
        S.write_seit_tokens(tmp_path / "a", **kw)
    S.write_seit_tokens(tmp_path / "a", **{**kw, "classes": 1}, overwrite=True)
    assert len(read_release_split(tmp_path / "a", "train")) == 3
    foreign = tmp_path / "real"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not written by"):
        S.write_imagenet_folder(foreign, classes=1, train_per_class=1, val_per_class=1, overwrite=True)
    assert (foreign / "keep.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == \
        ["a", "b", "c", "real"]  # no temporary folders left behind


def test_bad_arguments_are_one_line_errors(tmp_path):
    assert S.main(["cifar100", "--out", str(tmp_path / "x"), "--classes", "101"]) == 2
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="1..1000"):
        S.write_imagenet_folder(tmp_path / "y", classes=0)
    with pytest.raises(ValueError, match="distinct"):
        S.write_cifar100_parquet(tmp_path / "z", fine_labels=[3, 3])
