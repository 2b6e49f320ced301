"""Smoke test of the benchmark scripts: each runs in ``--quick`` mode (tiny sizes, one round)
and must write a well-formed result file. No timing is asserted: the numbers of a quick run
are meaningless, only the shape of the result is checked."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
from common import ROW_KEYS  # noqa: E402

SCRIPTS = sorted(p.name for p in BENCH.glob("bench_*.py"))


def test_every_benchmark_is_covered():
    assert {"bench_pgd.py", "bench_eot.py", "bench_memory.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_quick_run_writes_wellformed_rows(script, tmp_path):
    name = script.removeprefix("bench_").removesuffix(".py")
    cmd = [sys.executable, str(BENCH / script), "--quick", "--out-dir", str(tmp_path)]
    if name != "memory":
        cmd += ["--models", "smallcnn"]
    else:
        cmd += ["--model", "smallcnn"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1, files
    payload = json.loads(files[0].read_text())
    assert payload["quick"] is True
    assert payload["machine"]["threads"] == 2
    for key in ("cpu", "cores", "torch", "torchattacks"):
        assert payload["machine"][key]
    assert "--quick" in payload["command"]
    rows = payload["rows"]
    assert rows, "no result rows"
    for r in rows:
        assert set(ROW_KEYS) <= set(r), set(ROW_KEYS) - set(r)
        assert r["model"] and r["setting"] and r["reference"]
        for key in ("ours", "ref_value"):  # img/s > 0; extra MB may be 0
            assert math.isfinite(r[key]) and r[key] >= 0, (key, r)
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0, r
        assert r["met"] in (True, False, None)
        if r["goal"] is None:
            assert r["met"] is None
        else:
            better = r["ratio"] >= r["goal"] if r["higher_is_better"] else r["ratio"] <= r["goal"]
            assert r["met"] == better
    # the Markdown table is printed too, one line per row
    table = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == len(rows) + 1
