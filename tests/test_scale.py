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


def test_gpu_check_cpu_smoke_runs_every_cifar_config(tmp_path, capsys):
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--cpu-smoke", "--phases", "old", "--out", str(out)]) == 0, \
        capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    cifar = {p.stem for p in gpu_check.cifar_configs()}
    assert len(cifar) >= 10
    trained = {(r["config"], r["mode"]) for r in rows if r["check"].startswith("train")}
    assert {(c, "fp32") for c in cifar} | {(c, "bf16") for c in cifar} <= trained
    compiled = [r for r in rows if r.get("mode") == "compile"]
    assert compiled and compiled[0]["graph_breaks"] == 0  # RNA's forward compiles in one piece
    assert any(r["check"] == "evaluate --suite rand" for r in rows)
    assert any(r["check"].startswith("smoothing") for r in rows)
    rna_row = next(r for r in rows if r["check"] == "rna forward")
    assert rna_row["attack_sync_free_img_per_s"] > 0 and rna_row["train_host_reads_img_per_s"] > 0
    # and a failure is loud: a non-zero status
    assert gpu_check.main(["--cpu-smoke", "--phases", "old", "--configs", "none",
                           "--modes", "fp99"]) == 1
