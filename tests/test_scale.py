"""Paper scale on GPUs: configs monitor on held-out data, and the GPU check's CPU smoke mode."""

from __future__ import annotations

from pathlib import Path

import pytest

from advdefense.config import load_config
from advdefense.training.trainer import _overlapping_splits

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_configs_monitor_on_data_they_do_not_train_on(path):
    data = load_config(path).data
    if data.monitor_size > 0:
        assert not _overlapping_splits(data.train_split, data.monitor_split), (
            data.train_split, data.monitor_split)


def test_overlapping_splits():
    assert _overlapping_splits("train", "val") and _overlapping_splits("fit", "fit")
    assert _overlapping_splits("val", "train")
    assert not _overlapping_splits("fit", "val") and not _overlapping_splits("train", "test")
