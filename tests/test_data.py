"""Dataset registry: offline splits, and torchvision loaders on tiny files in the real formats.

torchvision verifies CIFAR/SVHN files by MD5 of the real releases; the tiny files written here
cannot match, so those checks are patched out. Everything else (paths, pickle/.mat/idx
parsing, transforms, splits) is the real code path.
"""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from advdefense.data import as_tensors, dataset_info, load_split
from advdefense.errors import AdvDefenseError, DataError


def test_mnist5k_split_is_fixed_and_disjoint():
    xtr, ytr = as_tensors(load_split("mnist5k", "train"))
    xte, yte = as_tensors(load_split("mnist5k", "test"))
    assert xtr.shape == (4000, 1, 28, 28) and xte.shape == (1000, 1, 28, 28)
    assert 0 <= xtr.min() and xtr.max() <= 1 and xtr.dtype == torch.float32
    assert set(ytr.unique().tolist()) == set(range(10))
    # no image appears in both splits
    train_keys = {hash(r.numpy().tobytes()) for r in xtr}
    assert not any(hash(r.numpy().tobytes()) in train_keys for r in xte)
    again, _ = as_tensors(load_split("mnist5k", "test"))
    assert torch.equal(again, xte)


def test_val_and_fit_partition_train():
    xtr, _ = as_tensors(load_split("mnist5k", "train"))
    xv, _ = as_tensors(load_split("mnist5k", "val"))
    xf, _ = as_tensors(load_split("mnist5k", "fit"))
    assert len(xv) == 500 and len(xf) == 3500
    assert torch.equal(torch.cat([xf, xv]), xtr)


def test_digits_and_limit():
    ds = load_split("digits", "train", limit=50)
    x, y = as_tensors(ds)
    assert x.shape == (50, 1, 8, 8) and x.max() <= 1
    assert dataset_info("digits").image_size == 8


@pytest.mark.parametrize("call", [
    lambda: load_split("imagenet"), lambda: load_split("mnist5k", "holdout"),
    lambda: load_split("mnist5k", limit=0)])
def test_bad_names_give_one_line_errors(call):
    with pytest.raises(AdvDefenseError) as info:
        call()
    assert "\n" not in str(info.value)


def test_missing_torchvision_dataset_says_where_it_looked(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path)):
        load_split("cifar10", "test", root=tmp_path)


def _write_cifar(root, name="cifar-10-batches-py", n=6, classes=10, fine=False):
    folder = root / name
    folder.mkdir()
    rng = np.random.default_rng(0)
    key = "fine_labels" if fine else "labels"
    files = ["train", "test"] if fine else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for f in files:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 key: rng.integers(0, classes, n).tolist()}
        with open(folder / f, "wb") as fh:
            pickle.dump(batch, fh)
    meta_name, meta_key = ("meta", "fine_label_names") if fine else ("batches.meta", "label_names")
    with open(folder / meta_name, "wb") as fh:
        pickle.dump({meta_key: [f"c{i}" for i in range(classes)]}, fh)


def test_cifar10_loader_reads_real_format(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)
    _write_cifar(tmp_path)
    train = load_split("cifar10", "train", root=tmp_path, augment=True)
    test = load_split("cifar10", "test", root=tmp_path)
    assert len(train) == 30 and len(test) == 6
    x, y = train[0]
    assert x.shape == (3, 32, 32) and 0 <= x.min() and x.max() <= 1
    assert len(load_split("cifar10", "val", root=tmp_path)) == 3


def test_cifar100_loader_reads_real_format(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)
    _write_cifar(tmp_path, "cifar-100-python", classes=100, fine=True)
    x, y = as_tensors(load_split("cifar100", "test", root=tmp_path))
    assert x.shape == (6, 3, 32, 32) and y.max() < 100


def test_mnist_loader_reads_idx_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 4)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        with open(raw / f"{prefix}-images-idx3-ubyte", "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        with open(raw / f"{prefix}-labels-idx1-ubyte", "wb") as f:
            f.write(struct.pack(">II", 2049, n) + labels.tobytes())
    x, y = as_tensors(load_split("mnist", "test", root=tmp_path))
    assert x.shape == (4, 1, 28, 28)
    assert torch.allclose(x[0, 0] * 255, torch.from_numpy(
        np.frombuffer(gzip.decompress(gzip.compress(
            open(raw / "t10k-images-idx3-ubyte", "rb").read()))[16:16 + 784],
            dtype=np.uint8).reshape(28, 28).astype(np.float32)))


def test_svhn_loader_reads_mat_file(tmp_path, monkeypatch):
    import scipy.io
    import torchvision.datasets.svhn as svhn

    monkeypatch.setattr(svhn.SVHN, "_check_integrity", lambda self: True)
    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, (32, 32, 3, 5), dtype=np.uint8)
    y = np.array([[1], [2], [10], [4], [5]], dtype=np.uint8)  # SVHN stores digit 0 as 10
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": X, "y": y})
    xs, ys = as_tensors(load_split("svhn", "test", root=tmp_path))
    assert xs.shape == (5, 3, 32, 32)
    assert ys.tolist() == [1, 2, 0, 4, 5]


def test_registry_names_the_image_datasets():
    from advdefense.config import DataConfig
    from advdefense.data import INFO, dataset_names

    assert "cifar10-jpeg" in INFO and "imagefolder:some/folder" in INFO
    assert "imagefolder:" not in INFO and "bogus" not in INFO
    assert "imagefolder:PATH" in dataset_names()
    with pytest.raises(AdvDefenseError, match="imagefolder:PATH") as info:
        dataset_info("bogus")
    assert "\n" not in str(info.value)
    DataConfig(name="imagefolder:some/folder").validate("data")  # checked when loaded
    with pytest.raises(AdvDefenseError):
        DataConfig(name="bogus").validate("data")
