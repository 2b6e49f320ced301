"""Image folders as datasets and the ``cifar10-jpeg`` dataset (CIFAR-10, JPEG copy).

Every fixture is written by the tests themselves: tiny PNG/JPEG files in
``train|test/<class>/`` folders and .tar/.tar.gz archives of them. The decoding cache goes to a
temporary folder (``$ADVDEFENSE_CACHE``).
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from advdefense.cli import main as cli_main
from advdefense.data import (
    INFO,
    AugmentedImages,
    as_tensors,
    cifar10_jpeg,
    dataset_info,
    imagefolder,
    load_split,
    loader_options,
)
from advdefense.errors import DataError

# CIFAR-10's label names in label order (batches.meta of the original release)
CIFAR10_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                  "ship", "truck"]
CLASSES = ("ant", "bee", "cat")  # written in another order below; sorted = label order


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """A fresh decoding cache (folder and in-process memo) for every test."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("ADVDEFENSE_CACHE", str(folder))
    monkeypatch.setattr(imagefolder, "_MEMO", {})
    return folder


def _pixels(label: int, i: int, size: int, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(100 * label + i)
    arr = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
    return arr[:, :, 0] if channels == 1 else arr


def write_folder(root: Path, *, train: int = 4, test: int = 2, size: int = 8, fmt: str = "png",
                 classes=CLASSES, channels: int = 3) -> Path:
    """``root/{train,test}/<class>/NN.<fmt>`` with seeded random pixels, classes written in
    reverse order (so the sorted order is not the creation order)."""
    for split, n in (("train", train), ("test", test)):
        for label, cls in reversed(list(enumerate(sorted(classes)))):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in reversed(range(n)):
                offset = 0 if split == "train" else 50
                Image.fromarray(_pixels(label, i + offset, size, channels)).save(
                    folder / f"{i:02d}.{fmt}")
    (root / "README.txt").write_text("not an image\n")
    return root


def write_tar(folder: Path, target: Path) -> Path:
    mode = "w:gz" if target.name.endswith(".gz") else "w"
    with tarfile.open(target, mode) as tf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                tf.add(path, arcname=f"top/{path.relative_to(folder).as_posix()}")
    return target


def _cache_files(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("*") if p.is_file()) if cache.exists() else []


# --- cifar10-jpeg --------------------------------------------------------------------------

def test_cifar10_jpeg_classes_are_cifar10_label_order():
    assert list(cifar10_jpeg.CLASSES) == CIFAR10_LABELS
    assert list(cifar10_jpeg.CLASSES) == sorted(cifar10_jpeg.CLASSES)  # folder order = labels
    info = dataset_info("cifar10-jpeg")
    assert (info.num_classes, info.in_channels, info.image_size) == (10, 3, 32)
    assert info.offline and info.mean != dataset_info("cifar10").mean


def test_shipped_subset_is_a_balanced_prefix_of_the_copy():
    assert cifar10_jpeg.SUBSET.is_file()
    assert cifar10_jpeg.SUBSET.stat().st_size < 5_000_000
    with tarfile.open(cifar10_jpeg.SUBSET) as tf:
        names = [m.name for m in tf.getmembers() if m.isreg() and m.name.endswith(".jpg")]
    by = {}
    for n in names:
        split, cls, file = n.split("/")
        by.setdefault((split, cls), []).append(file)
    for split, per_class in (("train", 500), ("test", 100)):
        for cls in CIFAR10_LABELS:
            assert sorted(by[(split, cls)]) == [f"{i:04d}.jpg" for i in range(per_class)]
    assert len(names) == 6000


def test_shipped_subset_loads_as_cifar10_jpeg(tmp_path):
    """The real file: decoded once (about a second), balanced splits in round-robin order."""
    root = tmp_path / "no-copy-here"
    x, y = as_tensors(load_split("cifar10-jpeg", "test", root=root))
    assert x.shape == (1000, 3, 32, 32) and y[:20].tolist() == list(range(10)) * 2
    assert y.bincount().tolist() == [100] * 10
    _, yf = as_tensors(load_split("cifar10-jpeg", "fit", root=root))
    _, yv = as_tensors(load_split("cifar10-jpeg", "val", root=root))
    assert yf.bincount().tolist() == [450] * 10 and yv.bincount().tolist() == [50] * 10
    arrays = imagefolder.load_image_arrays(cifar10_jpeg.SUBSET)
    assert arrays.files["train"][:11] == tuple(f"{c}/0000.jpg" for c in CIFAR10_LABELS) + (
        "airplane/0001.jpg",)
    assert np.allclose(arrays.mean, cifar10_jpeg.MEAN, atol=0.005)


def test_cifar10_jpeg_root_resolution(tmp_path):
    assert cifar10_jpeg.resolve_source(None) == cifar10_jpeg.SUBSET
    assert cifar10_jpeg.resolve_source(tmp_path / "nothing-here") == cifar10_jpeg.SUBSET
    copy = write_folder(tmp_path / "copy", train=2, test=1, size=32, fmt="jpg",
                        classes=CIFAR10_LABELS)
    assert cifar10_jpeg.resolve_source(copy) == copy
    packed = write_tar(copy, tmp_path / "cifar10-jpeg.tar.gz")
    assert cifar10_jpeg.resolve_source(tmp_path) == packed
    x, y = as_tensors(load_split("cifar10-jpeg", "test", root=packed))
    assert x.shape == (10, 3, 32, 32) and y.tolist() == list(range(10))
    with pytest.raises(DataError, match="missing.tar.gz"):
        cifar10_jpeg.resolve_source(tmp_path / "missing.tar.gz")
    other = write_folder(tmp_path / "other", train=1, test=1, size=32)
    with pytest.raises(DataError, match="not the CIFAR-10 JPEG copy"):
        load_split("cifar10-jpeg", "test", root=other)


# --- image folders -------------------------------------------------------------------------

def test_classes_sorted_and_order_round_robin(tmp_path):
    root = write_folder(tmp_path / "imgs")
    name = f"imagefolder:{root}"
    x, y = as_tensors(load_split(name, "train"))
    assert x.shape == (12, 3, 8, 8) and x.dtype == torch.float32
    assert y.tolist() == [0, 1, 2] * 4
    arrays = imagefolder.load_image_arrays(root)
    assert arrays.classes == CLASSES
    assert arrays.files["train"][:4] == ("ant/00.png", "bee/00.png", "cat/00.png", "ant/01.png")
    # PNG is lossless: the pixels are the ones written, scaled to [0, 1]
    expected = torch.from_numpy(_pixels(1, 0, 8)).permute(2, 0, 1).float() / 255
    assert torch.equal(x[1], expected)
    info = dataset_info(name)
    assert (info.num_classes, info.in_channels, info.image_size) == (3, 3, 8)
    assert name in INFO and loader_options(name)["num_workers"] == 0


def test_val_and_fit_partition_train_and_stay_balanced(tmp_path):
    root = write_folder(tmp_path / "imgs", train=10, test=2)
    name = f"imagefolder:{root}"
    xt, yt = as_tensors(load_split(name, "train"))
    xv, yv = as_tensors(load_split(name, "val"))
    xf, yf = as_tensors(load_split(name, "fit"))
    assert len(yv) == 3 and torch.equal(torch.cat([xf, xv]), xt)
    assert yv.bincount().tolist() == [1, 1, 1] and yf.bincount().tolist() == [9, 9, 9]
    _, ys = as_tensors(load_split(name, "test"))
    assert ys.tolist() == [0, 1, 2, 0, 1, 2]
    assert imagefolder.val_size(5000, 10) == 500 and imagefolder.val_size(50000, 10) == 5000


def test_order_is_deterministic_and_the_same_from_a_tar(tmp_path):
    a = write_folder(tmp_path / "a", fmt="jpg")
    b = write_folder(tmp_path / "b", fmt="jpg")
    xa, ya = as_tensors(load_split(f"imagefolder:{a}", "train"))
    xb, yb = as_tensors(load_split(f"imagefolder:{b}", "train"))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    for suffix in (".tar", ".tar.gz"):
        packed = write_tar(a, tmp_path / f"a{suffix}")
        xt, yt = as_tensors(load_split(f"imagefolder:{packed}", "train"))
        assert torch.equal(xa, xt) and torch.equal(ya, yt)


def test_grey_images_keep_one_channel_and_sizes_must_match(tmp_path):
    grey = write_folder(tmp_path / "grey", channels=1)
    assert dataset_info(f"imagefolder:{grey}").in_channels == 1
    mixed = write_folder(tmp_path / "mixed")
    Image.fromarray(_pixels(0, 0, 9)).save(mixed / "train" / "bee" / "99.png")
    with pytest.raises(DataError, match="99.png is 9x9") as info:
        load_split(f"imagefolder:{mixed}", "train")
    assert "\n" not in str(info.value)


def test_augment_crops_and_flips_but_as_tensors_gives_plain_images(tmp_path):
    root = write_folder(tmp_path / "imgs")
    name = f"imagefolder:{root}"
    ds = load_split(name, "train", augment=True)
    assert isinstance(ds, AugmentedImages) and ds.pad == 1
    plain, _ = as_tensors(load_split(name, "train"))
    torch.manual_seed(0)
    samples = torch.stack([ds[0][0] for _ in range(20)])
    assert samples.shape == (20, 3, 8, 8)
    assert not all(torch.equal(s, plain[0]) for s in samples)
    assert torch.equal(as_tensors(ds)[0], plain)
    assert torch.equal(as_tensors(load_split(name, "train", limit=5))[0], plain[:5])
    assert not isinstance(load_split(name, "test", augment=True), AugmentedImages)


# --- the cache -----------------------------------------------------------------------------

def test_cache_is_reused_on_a_second_load(tmp_path, cache, monkeypatch):
    root = write_folder(tmp_path / "imgs")
    first = imagefolder.load_image_arrays(root)
    files = _cache_files(cache)
    assert len(files) == 1 and files[0].suffix == ".npz"
    monkeypatch.setattr(imagefolder, "_MEMO", {})

    def no_decoding(*a, **k):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(imagefolder, "_decode_source", no_decoding)
    second = imagefolder.load_image_arrays(root)
    assert second.classes == first.classes and second.mean == first.mean
    for split in ("train", "test"):
        assert np.array_equal(second.images[split], first.images[split])
        assert second.files[split] == first.files[split]
    assert _cache_files(cache) == files


def test_tar_cache_key_follows_the_content_not_size_and_mtime(tmp_path, cache):
    root = write_folder(tmp_path / "imgs")
    packed = write_tar(root, tmp_path / "imgs.tar")
    before = imagefolder.load_image_arrays(packed).images["train"].copy()
    stat = packed.stat()
    # same size, same name, same modification time; one image's pixels differ
    Image.fromarray(255 - _pixels(0, 0, 8)).save(root / "train" / "ant" / "00.png")
    write_tar(root, packed)
    os.utime(packed, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert packed.stat().st_size == stat.st_size and packed.stat().st_mtime_ns == stat.st_mtime_ns
    after = imagefolder.load_image_arrays(packed).images["train"]
    assert not np.array_equal(after[0], before[0]) and np.array_equal(after[1:], before[1:])
    assert len(_cache_files(cache)) == 2


def test_folder_cache_key_follows_paths_sizes_and_mtimes(tmp_path, cache):
    root = write_folder(tmp_path / "imgs")
    d1 = imagefolder.source_digest(root)
    assert imagefolder.source_digest(root) == d1
    img = root / "test" / "cat" / "00.png"
    Image.fromarray(255 - _pixels(2, 50, 8)).save(img)
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert imagefolder.source_digest(root) != d1
    (root / "train" / "bee" / "extra.txt").write_text("not an image")
    d2 = imagefolder.source_digest(root)
    (root / "train" / "bee" / "03.png").rename(root / "train" / "bee" / "33.png")
    assert imagefolder.source_digest(root) != d2


# --- errors --------------------------------------------------------------------------------

def test_corrupt_image_is_one_line_naming_the_file_and_writes_no_cache(tmp_path, cache):
    root = write_folder(tmp_path / "imgs", fmt="jpg")
    bad = root / "train" / "bee" / "01.jpg"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    with pytest.raises(DataError) as info:
        load_split(f"imagefolder:{root}", "train")
    msg = str(info.value)
    assert "\n" not in msg and str(bad) in msg and "cannot decode" in msg
    assert _cache_files(cache) == []
    packed = write_tar(root, tmp_path / "imgs.tar.gz")
    with pytest.raises(DataError, match="train/bee/01.jpg in .*imgs.tar.gz"):
        load_split(f"imagefolder:{packed}", "train")
    assert _cache_files(cache) == []


def test_missing_image_file_and_missing_source(tmp_path, cache):
    root = write_folder(tmp_path / "imgs")
    link = root / "train" / "ant" / "07.png"
    link.symlink_to(tmp_path / "gone.png")  # a dangling link: the file is missing
    with pytest.raises(DataError, match=r"07.png is missing or unreadable") as info:
        load_split(f"imagefolder:{root}", "train")
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="not found"):
        load_split(f"imagefolder:{tmp_path / 'nowhere'}", "train")
    empty = tmp_path / "empty"
    (empty / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images laid out"):
        dataset_info(f"imagefolder:{empty}")
    (tmp_path / "broken.tar.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match="broken.tar.gz"):
        load_split(f"imagefolder:{tmp_path / 'broken.tar.gz'}", "train")
    assert _cache_files(cache) == []


def _train_config(tmp_path: Path, dataset: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(
        "name: imgf\n"
        f"data: {{name: \"{dataset}\", batch_size: 6, monitor_size: 0, "
        "train_split: fit, augment: true}\n"
        "model: {name: smallcnn}\n"
        "train: {epochs: 1}\n")
    return path


def test_cli_trains_on_an_image_folder(tmp_path, capsys):
    root = write_folder(tmp_path / "imgs")
    cfg = _train_config(tmp_path, f"imagefolder:{root}")
    code = cli_main(["train", "--config", str(cfg), "--output", str(tmp_path / "out"),
                     "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "last.pt").is_file()


def test_cli_corrupt_image_exits_2_with_one_error_line(tmp_path, capsys, cache):
    root = write_folder(tmp_path / "imgs")
    bad = root / "test" / "ant" / "00.png"
    bad.write_bytes(b"this is not a png")
    cfg = _train_config(tmp_path, f"imagefolder:{root}")
    code = cli_main(["train", "--config", str(cfg), "--output", str(tmp_path / "out"),
                     "--no-progress"])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2
    assert len(err) == 1 and str(bad) in err[0] and err[0].startswith("advdefense: error:")
    assert _cache_files(cache) == []
