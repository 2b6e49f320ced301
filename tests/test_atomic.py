"""advdefense.atomic: a file is its old content or its complete new content, never half."""

from __future__ import annotations

import json
import os

import pytest
import torch

from advdefense.atomic import (
    atomic_open,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)


def test_writes_replace_and_leave_no_temporary_files(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    atomic_write_json(tmp_path / "c.json", {"x": float("nan"), "p": tmp_path})
    assert json.loads((tmp_path / "c.json").read_text())["p"] == str(tmp_path)
    atomic_torch_save({"w": torch.ones(2)}, tmp_path / "d.pt")
    assert torch.equal(torch.load(tmp_path / "d.pt", weights_only=True)["w"], torch.ones(2))
    names = sorted(p.name for p in tmp_path.rglob("*"))
    assert not [n for n in names if n.endswith(".tmp")]
    mask = os.umask(0)
    os.umask(mask)
    assert (target.stat().st_mode & 0o777) == 0o666 & ~mask  # not mkstemp's 0600


def test_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "r.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_open(target, "w") as f:
        f.write("half of the new content")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    with pytest.raises(TypeError):  # serialization fails before anything is written
        atomic_write_json(target, {"x": object()}, default=None)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_clopper_pearson_is_scipy_exact_interval():
    from scipy.stats import binomtest

    from advdefense.evaluation.stats import clopper_pearson, clopper_pearson_lower

    for k, n in [(0, 10), (3, 10), (10, 10), (60, 200), (999, 1000)]:
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
        low, high = clopper_pearson(k, n)
        assert low == pytest.approx(ci.low, abs=1e-9) and high == pytest.approx(ci.high, abs=1e-9)
    # one-sided lower bound at alpha equals the two-sided one at 2 * alpha
    assert clopper_pearson_lower(60, 200, 0.025) == pytest.approx(clopper_pearson(60, 200)[0])
    assert clopper_pearson_lower(0, 5) == 0.0
    with pytest.raises(ValueError):
        clopper_pearson(4, 3)
