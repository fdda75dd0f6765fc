import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenbook import data
from tokenbook.data import CorruptDataError, DataConfig, DatasetNotFoundError, load_data, make_loaders


def test_idx_round_trip(idx_dir):
    x = data.read_idx(idx_dir / "train-images-idx3-ubyte.gz")
    y = data.read_idx(idx_dir / "train-labels-idx1-ubyte.gz")
    assert x.shape == (200, 28, 28) and x.dtype == np.uint8
    assert y.shape == (200,) and set(np.unique(y)) == set(range(10))


@pytest.mark.parametrize("damage", ["truncate", "magic", "not_gzip", "empty"])
def test_corrupt_idx_names_the_file(tmp_path, idx_dir, damage):
    src = (idx_dir / "train-images-idx3-ubyte.gz").read_bytes()
    raw = gzip.decompress(src)
    p = tmp_path / "train-images-idx3-ubyte.gz"
    if damage == "truncate":
        p.write_bytes(gzip.compress(raw[:-100]))
    elif damage == "magic":
        p.write_bytes(gzip.compress(b"\x01\x02" + raw[2:]))
    elif damage == "not_gzip":
        p.write_bytes(b"this is not gzip")
    else:
        p.write_bytes(gzip.compress(b""))
    with pytest.raises(CorruptDataError, match="train-images-idx3-ubyte.gz"):
        data.read_idx(p)


def test_corrupt_file_in_dataset_dir_fails_clearly(tmp_path, idx_dir):
    d = tmp_path / "fm"
    d.mkdir()
    for f in idx_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    (d / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"\x01"))
    with pytest.raises(CorruptDataError, match="t10k-labels"):
        load_data(DataConfig(data_dir=str(d)))


def test_resolution_order_prefers_explicit_dir(idx_dir, monkeypatch):
    assert data.find_fashion_mnist(str(idx_dir)) == str(idx_dir)
    monkeypatch.setenv(data.FASHION_MNIST_ENV, str(idx_dir))
    assert data.find_fashion_mnist() == str(idx_dir)


def test_incomplete_dir_lists_missing_files(tmp_path, idx_dir):
    d = tmp_path / "partial"
    d.mkdir()
    (d / "train-images-idx3-ubyte.gz").write_bytes((idx_dir / "train-images-idx3-ubyte.gz").read_bytes())
    with pytest.raises(DatasetNotFoundError) as e:
        data.find_fashion_mnist(str(d))
    msg = str(e.value)
    assert "t10k-images-idx3-ubyte.gz" in msg and "incomplete" in msg


def test_nothing_available_lists_three_ways(monkeypatch, tmp_path):
    monkeypatch.delenv(data.FASHION_MNIST_ENV, raising=False)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "nope")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DatasetNotFoundError) as e:
        data.find_fashion_mnist()
    msg = str(e.value)
    assert "TOKENBOOK_FASHION_MNIST" in msg and "dataset-fashion-mnist" in msg and "zalando-datasets/fashion_mnist" in msg


def test_debian_files_are_second(monkeypatch, idx_dir):
    monkeypatch.delenv(data.FASHION_MNIST_ENV, raising=False)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", idx_dir)
    assert data.find_fashion_mnist() == str(idx_dir)


def test_hub_is_third_when_online(monkeypatch, tmp_path):
    monkeypatch.delenv(data.FASHION_MNIST_ENV, raising=False)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "nope")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert data.find_fashion_mnist() == "hub:zalando-datasets/fashion_mnist"


def test_subsets_are_deterministic_and_balanced(idx_dir):
    cfg = DataConfig(data_dir=str(idx_dir), train_subset=50, val_subset=20, subset_seed=3)
    a, b = load_data(cfg), load_data(cfg)
    assert np.array_equal(a.train.indices, b.train.indices) and len(a.train) == 50 and len(a.val) == 20
    counts = np.bincount(a.train.labels, minlength=10)
    assert counts.min() == counts.max() == 5
    c = load_data(DataConfig(data_dir=str(idx_dir), train_subset=50, subset_seed=4))
    assert not np.array_equal(a.train.indices, c.train.indices)


def test_class_subset_remaps_labels(idx_dir):
    b = load_data(DataConfig(data_dir=str(idx_dir), classes=[7, 2, 5]))
    assert b.num_classes == 3 and b.class_names == ["Sneaker", "Pullover", "Sandal"]
    raw = data.read_idx(idx_dir / "train-labels-idx1-ubyte.gz")
    assert len(b.train) == int(np.isin(raw, [7, 2, 5]).sum())
    orig = raw[b.train.indices]
    assert np.array_equal(b.train.labels, np.array([{7: 0, 2: 1, 5: 2}[int(v)] for v in orig]))


@pytest.mark.parametrize("channels,size", [(3, 32), (1, 28)])
def test_batch_path_preprocess(idx_dir, channels, size):
    b = load_data(DataConfig(data_dir=str(idx_dir), img_size=size, channels=channels))
    tl, vl = make_loaders(b, 16, seed=0)
    x, y = next(iter(tl))
    assert x.dtype == torch.uint8 and x.shape == (16, 1, 28, 28)
    z = b.preprocess(x)
    assert z.shape == (16, channels, size, size) and z.dtype == torch.float32
    # normalization uses the dataset statistics: back-conversion recovers [0, 1]
    assert b.preprocess.denormalize(z).min() >= 0 and b.preprocess.denormalize(z).max() <= 1


def test_augmentation_preset_uses_timm_transforms(idx_dir):
    b = load_data(DataConfig(data_dir=str(idx_dir), img_size=32, preset="deit"))
    x, y = b.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    names = " ".join(type(t).__name__ for t in b.train.transform.transforms)
    assert "RandomResizedCrop" in names and "RandAugment" in names and "RandomErasing" in names
    assert b.val.transform is None  # evaluation stays on the batch path


def test_loader_order_depends_only_on_seed(idx_dir):
    b = load_data(DataConfig(data_dir=str(idx_dir)))
    ys = [next(iter(make_loaders(b, 32, seed=s)[0]))[1] for s in (1, 1, 2)]
    assert torch.equal(ys[0], ys[1]) and not torch.equal(ys[0], ys[2])


def test_bad_config_errors():
    with pytest.raises(ValueError, match="preset"):
        DataConfig(preset="nope")
    with pytest.raises(ValueError, match="dataset"):
        DataConfig(dataset="mnist")
    with pytest.raises(ValueError, match="train_subset"):
        DataConfig(train_subset=-3)


def test_bad_class_list(idx_dir):
    with pytest.raises(ValueError, match="classes"):
        load_data(DataConfig(data_dir=str(idx_dir), classes=[1, 12]))


def test_image_folder(tmp_path):
    root = data.write_folder_fixture(tmp_path / "imnet", classes=("cat", "dog", "fish"), per_class=4)
    b = load_data(DataConfig(dataset=f"folder:{root}", img_size=32))
    assert b.num_classes == 3 and b.class_names == ["cat", "dog", "fish"]
    assert len(b.train) == 12 and len(b.val) == 6
    x, y = b.val[0]
    assert x.shape == (3, 32, 32)
    tl, _ = make_loaders(b, 4)
    xb, yb = next(iter(tl))
    assert xb.shape == (4, 3, 32, 32)


def test_image_folder_missing_val(tmp_path):
    root = data.write_folder_fixture(tmp_path / "imnet")
    import shutil

    shutil.rmtree(root / "val")
    with pytest.raises(DatasetNotFoundError, match="val"):
        load_data(DataConfig(dataset=f"folder:{root}"))


def test_hub_format_local_copy(tmp_path):
    root = data.write_hub_fixture(tmp_path / "hub", n_train=20, n_val=10, num_classes=5, label_column="fine_label")
    b = load_data(DataConfig(dataset=f"hf:{root}", img_size=32, train_subset=10))
    assert b.num_classes == 5 and len(b.train) == 10 and len(b.val) == 10
    assert b.train[0][0].shape == (3, 32, 32)


def test_hub_unreachable_is_clear(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="hub|local copy"):
        load_data(DataConfig(dataset="hf:some-org/does-not-exist"))


def test_real_default_data_if_installed():
    try:
        where = data.find_fashion_mnist(allow_hub=False)
    except DatasetNotFoundError:
        pytest.skip("Fashion-MNIST not installed")
    b = load_data(DataConfig(data_dir=where, train_subset=100, val_subset=50))
    assert data.read_idx(Path(where) / "train-images-idx3-ubyte.gz").shape == (60000, 28, 28)
    assert b.num_classes == 10 and len(b.train) == 100


def test_fashion_mnist_hub_layout_converts_to_the_idx_layout(tmp_path, monkeypatch):
    """The hub copy (zalando-datasets/fashion_mnist: PIL 'image' + ClassLabel 'label') goes through the same
    converter as when it is downloaded; here from a local copy in the hub's parquet layout."""
    import datasets
    from PIL import Image

    root = tmp_path / "fm_hub" / "data"
    root.mkdir(parents=True)
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=data.FASHION_MNIST_CLASSES)})
    rng = np.random.RandomState(0)
    arrays = {}
    for split, n in (("train", 20), ("test", 10)):
        x = rng.randint(0, 255, size=(n, 28, 28)).astype(np.uint8)
        arrays[split] = x
        ds = datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in x], "label": [i % 10 for i in range(n)]},
                                        features=feats)
        ds.to_parquet(str(root / f"{split}-00000-of-00001.parquet"))
    dd = datasets.load_dataset(str(root.parent))
    conv = data._fmnist_hub_to_arrays(dd)
    monkeypatch.setattr(data, "find_fashion_mnist", lambda *a, **k: "hub:local")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: dd)
    b = load_data(DataConfig(img_size=28))
    assert b.source == "local" and len(b.train) == 20 and b.class_names == data.FASHION_MNIST_CLASSES
    assert np.array_equal(b.train.raw(3)[0].numpy(), arrays["train"][3])
    assert conv["train"].features["label"].names == data.FASHION_MNIST_CLASSES


@pytest.mark.parametrize("workers", [0, 2])
def test_loaders_for_cuda_pin_memory_and_prefetch(idx_dir, workers):
    """What a CUDA run gets (inspected on the DataLoader, no GPU needed): pinned memory, prefetching workers."""
    b = load_data(DataConfig(data_dir=str(idx_dir)))
    for loader in make_loaders(b, 16, num_workers=workers, device="cuda"):
        assert loader.pin_memory is True
        assert loader.persistent_workers is (workers > 0)
        assert loader.prefetch_factor == (4 if workers else None)
    for dev in ("cpu", torch.device("cpu")):
        for loader in make_loaders(b, 16, num_workers=workers, device=dev):
            assert loader.pin_memory is False
            assert loader.prefetch_factor == (2 if workers else None)  # torch's default
    assert make_loaders(b, 16, device="gpu")[0].pin_memory and make_loaders(b, 16, device="cuda:1")[0].pin_memory
    assert make_loaders(b, 16, device="auto")[0].pin_memory is torch.cuda.is_available()
