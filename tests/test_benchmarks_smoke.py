"""Smoke test of the benchmark scripts: each runs in ``--quick`` mode (tiny sizes, one round)
and must write a well-formed result file. No timing is asserted: the numbers of a quick run
are meaningless, only the shape of the result is checked."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shlex
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
from common import ROW_KEYS  # noqa: E402

SCRIPTS = sorted(p.name for p in BENCH.glob("bench_*.py"))


def test_every_benchmark_is_covered():
    assert {"bench_pgd.py", "bench_eot.py", "bench_memory.py"} <= set(SCRIPTS)


def _load(script: str):
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), BENCH / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", SCRIPTS)
def test_quick_run_writes_wellformed_rows(script, tmp_path, capsys, monkeypatch):
    name = script.removeprefix("bench_").removesuffix(".py")
    argv = ["--quick", "--out-dir", str(tmp_path)]
    if name == "memory":
        argv += ["--model", "smallcnn"]  # its children are fresh processes
    elif name != "scaling":  # scaling's quick mode uses a tiny ResNet-20 batch
        argv += ["--models", "smallcnn"]
    monkeypatch.setattr(sys, "argv", [script, *argv])
    assert _load(script).main(argv) == 0
    stdout = capsys.readouterr().out
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1, files
    payload = json.loads(files[0].read_text())
    assert payload["quick"] is True
    assert payload["machine"]["threads"] == 2
    for key in ("cpu", "cores", "torch", "torchattacks"):
        assert payload["machine"][key]
    assert "--quick" in payload["command"]
    # paths are recorded relative to the working folder
    assert not any(os.path.isabs(a) for a in shlex.split(payload["command"])), payload["command"]
    assert payload["contention"] is None or payload["contention"]["wall_s"] > 0
    rows = payload["rows"]
    assert rows, "no result rows"
    for r in rows:
        assert set(ROW_KEYS) <= set(r), set(ROW_KEYS) - set(r)
        assert r["model"] and r["setting"] and r["reference"]
        for key in ("ours", "ref_value"):  # img/s > 0; extra MB may be 0
            assert math.isfinite(r[key]) and r[key] >= 0, (key, r)
        # a lower-is-better difference (bf16 vs fp32 accuracy points) may be exactly 0
        floor_ok = r["ratio"] > 0 or (r["ratio"] == 0 and not r["higher_is_better"])
        assert math.isfinite(r["ratio"]) and floor_ok, r
        assert r["met"] in (True, False, None)
        if r["goal"] is None:
            assert r["met"] is None
        else:
            better = r["ratio"] >= r["goal"] if r["higher_is_better"] else r["ratio"] <= r["goal"]
            assert r["met"] == better
    # the Markdown table is printed too, one line per row
    table = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert len(table) == len(rows) + 1
