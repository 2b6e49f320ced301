"""Shared fixtures: small real data and quickly trained models (cached per session)."""

from __future__ import annotations

import pytest
import torch

from advdefense.analysis.transfer import train_model
from advdefense.attacks import PGD
from advdefense.data import as_tensors, dataset_info, load_split
from advdefense.models import build_model

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def make_smallcnn(norm="bn", seed=0, dataset="mnist5k", **kw):
    info = dataset_info(dataset)
    torch.manual_seed(seed)
    return build_model("smallcnn", num_classes=info.num_classes, in_channels=info.in_channels,
                       image_size=info.image_size, mean=info.mean, std=info.std, norm=norm, **kw)


def quick_train(model, x, y, *, epochs=2, batch=100, lr=1e-3, attack=None, seed=0):
    """A minimal seeded Adam loop (independent of the Trainer) for attack/eval tests."""
    return train_model(model, x, y, epochs=epochs, seed=seed, batch_size=batch, lr=lr,
                       attack=attack)


@pytest.fixture
def one_thread():
    """Small models run many small passes: one thread avoids contention on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def mnist_train():
    return as_tensors(load_split("mnist5k", "train"))


@pytest.fixture(scope="session")
def mnist_test():
    return as_tensors(load_split("mnist5k", "test"))


@pytest.fixture(scope="session")
def standard_model(mnist_train):
    """smallcnn trained 2 epochs on mnist5k (about 10 s); clean accuracy around 95%."""
    x, y = mnist_train
    return quick_train(make_smallcnn(), x, y, epochs=2)


@pytest.fixture(scope="session")
def robust_model(mnist_train):
    """smallcnn PGD-trained (eps 0.3, 5 steps) for 3 epochs on mnist5k (about 1 min)."""
    x, y = mnist_train
    atk = PGD(eps=0.3, steps=5, step_size=0.1, seed=1)
    model = quick_train(make_smallcnn(seed=1), x, y, epochs=1)
    return quick_train(model, x, y, epochs=3, attack=atk, seed=1)
