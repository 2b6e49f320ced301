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


def test_pgd_goal_row_gives_torchattacks_channels_last_weights():
    """The PGD goal row compares both sides in channels_last: torchattacks' timed call runs
    with the model's 4-D weights in channels_last (contiguous again after it), and the
    default-against-default and both-contiguous rows are labelled as such. Nothing is timed:
    stand-ins for the attacks record the layout they were called in."""
    import common

    from advdefense import layout

    bench = _load("bench_pgd.py")
    model = common.build("smallcnn")
    x, y = common.batch("smallcnn", 2)

    def weights_channels_last() -> bool:
        return all(p.stride() == layout._nhwc_strides(p.shape)
                   for p in model.parameters() if p.dim() == 4)

    seen = []
    fns, layouts = bench.entries(model, x, y, lambda m, a, b: a,
                                 lambda a, b: seen.append(weights_channels_last()), steps=1)
    specs = bench.comparisons(layouts, "batch 2")
    goal_rows = [c for c in specs if c["reference"] == "torchattacks.PGD" and c["goal"]]
    assert len(goal_rows) == 1, specs
    goal = goal_rows[0]
    assert goal["layout_ours"] == goal["layout_ref"] == "channels_last" and goal["same_layout"]
    assert goal["setting"] == "batch 2, both channels_last (same layout)"
    fns[goal["ref"]]()
    assert seen == [True] and not weights_channels_last()
    fns["ta"]()  # the model as it is: torchattacks' own default
    assert seen == [True, False]
    by_setting = {c["setting"]: c for c in specs if c["reference"] == "torchattacks.PGD"}
    default = by_setting["batch 2, ours channels_last / torchattacks contiguous "
                         "(default against default)"]
    assert default["goal"] is None and not default["same_layout"]
    contiguous = by_setting["batch 2, both contiguous (same layout)"]
    assert (contiguous["ours"], contiguous["ref"]) == ("ours_contig", "ta")


def test_suites_quick_standard_counts_the_passes_of_both_libraries(tmp_path, capsys, one_thread):
    """``bench_suites.py --quick`` on our ``standard`` suite only: well-formed rows, and the
    one pass counter sees the model calls of ours and of torchattacks alike (forward and
    backward rows on both sides), and the checks' passes in a row of their own."""
    bench = _load("bench_suites.py")
    argv = ["--quick", "--threads", "1", "--models", "smallcnn", "--suites", "standard",
            "--ta-steps", "2", "--out-dir", str(tmp_path)]
    assert bench.main(argv) == 0
    capsys.readouterr()
    rows = json.loads((tmp_path / "suites.json").read_text())["rows"]
    for r in rows:
        assert set(ROW_KEYS) <= set(r), set(ROW_KEYS) - set(r)
    passes = [r for r in rows if r["benchmark"] == "suite standard"
              and r["metric"].startswith("fwd+bwd")]
    assert sorted(r["reference"].split(" (")[0] for r in passes) == [
        "AutoAttack standard", "torchattacks.AutoAttack(standard) as shipped"]
    for r in passes:
        for side in ("ours_passes", "ref_passes"):
            assert r[side]["forward"] > 0 and r[side]["backward"] > 0, (side, r)
    checks = [r for r in rows if r["benchmark"] == "checks after standard"]
    assert [r["metric"] for r in checks] == ["fwd+bwd rows per example", "s"]
    assert checks[0]["checks_passes"]["forward"] > 0


def test_suites_quick_undeclared_randomness_is_benchmarked_as_random(tmp_path, capsys,
                                                                     one_thread):
    """A model whose noise is drawn in plain ``forward`` code (outside the draw mechanism)
    is benchmarked as a random model (the ``rand`` family, against AutoAttack rand), and a
    row sets its seconds beside the declared model's, against the goal of at most 2x."""
    bench = _load("bench_suites.py")
    argv = ["--quick", "--threads", "1", "--models", "smallcnn+noise,smallcnn+undeclared",
            "--suites", "rand-fast", "--ta-steps", "0", "--no-checks",
            "--out-dir", str(tmp_path)]
    assert bench.main(argv) == 0
    capsys.readouterr()
    rows = json.loads((tmp_path / "suites.json").read_text())["rows"]
    assert any(r["model"] == "smallcnn+undeclared" and r["benchmark"] == "suite rand-fast"
               and "AutoAttack(rand)" in r["reference"] for r in rows)
    ratio = [r for r in rows if r["metric"].startswith("s per example, undeclared")]
    assert len(ratio) == 1, ratio
    assert ratio[0]["goal"] == 2.0 and ratio[0]["ratio"] > 0
    assert ratio[0]["reference"] == "smallcnn+noise (declared)"


# -- the GPU check's CPU smoke run -------------------------------------------------------------
def test_gpu_check_cpu_smoke_answers_every_phase(tmp_path, capsys):
    gpu_check = _load("gpu_check.py")
    out = tmp_path / "gpu" / "gpu_check.json"  # the folder is created
    assert gpu_check.main(["--cpu-smoke", "--out", str(out)]) == 0, capsys.readouterr().out
    stdout = capsys.readouterr().out
    payload = json.loads(out.read_text())
    assert payload["complete"] is True and payload["failures"] == []
    assert payload["cpu_smoke"] is True and payload["budget_s"] == 420
    machine = payload["machine"]
    for key in ("device", "cpu", "torch", "cuda_runtime", "commit", "torchattacks"):
        assert key in machine, key
    assert machine["device"] == "cpu" and machine["cpu"] and machine["torch"]
    phases = payload["phases"]
    assert list(phases) == [p for p in gpu_check.ORDER if p in gpu_check.NEW_PHASES]
    # one summary line per phase
    for name, rec in phases.items():
        assert any(line.split()[1:2] == [name] for line in stdout.splitlines()), name
        assert rec["seconds"] >= 0

    # 1. PGD-AT steps per mode (the bf16 inner attack is train.attack_precision=amp)
    rows = {r["mode"]: r for r in phases["pgd_at"]["rows"]}
    assert set(rows) == set(gpu_check.TRAIN_MODES) - {"compile"}
    for r in rows.values():
        assert r["steps_per_s"] > 0 and r["img_per_s"] > 0 and math.isfinite(r["loss"])
    assert rows["bf16_attack_bf16"]["attack_precision"] == "amp"
    assert rows["bf16"]["amp"] == "bf16" and rows["bf16"]["attack_precision"] == "fp32"
    assert rows["channels_last"]["weights_channels_last"] is True
    compiled = phases["pgd_at_compile"]["rows"][0]
    assert compiled["mode"] == "compile" and compiled["graph_breaks"] == 0

    # 2. attacks: both layouts, against torchattacks (when importable) and the limit
    attack_rows = phases["attacks"]["rows"]
    with_ta = importlib.util.find_spec("torchattacks") is not None
    for bench in ("PGD-", "APGD-CE", "EOT-"):
        for layout in ("contiguous", "channels_last"):
            refs = {r["reference"].split()[0] for r in attack_rows
                    if r["benchmark"].startswith(bench) and r["layout"] == layout}
            assert "limit" in refs, (bench, layout)
            assert with_ta == any(ref.startswith("torchattacks.") for ref in refs)
    for r in attack_rows:
        assert set(ROW_KEYS) <= set(r)
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0 and r["ours"] > 0

    # 3. sync counting is CUDA-only: skipped with its reason
    assert phases["syncs"]["status"] == "skipped" and "CUDA" in phases["syncs"]["reason"]

    # 4. a forced out-of-memory error: same draws, limit learned
    oom = phases["oom"]
    assert oom["draws"]["bit_identical"] is True
    assert oom["draws"]["learned_row_limit"] < oom["draws"]["failed_pass_rows"]
    assert oom["logits"]["close"] and oom["logits"]["learned_row_limit"] is not None
    assert oom["eot"]["loss"]["close"] and oom["eot"]["grad"]["close"]
    assert [s["item"] for s in oom["skipped_items"]] == ["memory_fraction"]

    # 5. certify: every draw distinct, the same at two max_batch settings
    cert = phases["certify"]
    assert cert["unique_rows"] == cert["expected_rows"] == cert["noise_rows"][0]
    assert cert["same_draws_at_both_settings"] and cert["identical_results"]

    # 6. seeding on the device
    for name in ("gaussian_input", "rna_per_sample"):
        got = phases["seeding"][name]
        assert all(v is not False for v in got.values()), got

    # 7. sharded evaluate: two processes gather the one-process verdicts
    sharded = phases["sharded"]
    assert sharded["status"] == "ok" and sharded["processes"] == 2
    assert sharded["clean_equal"] and sharded["fgsm_equal"] and sharded["clean_correct"] > 0


def test_gpu_check_records_failures_and_budget_skips(tmp_path, monkeypatch, capsys):
    gpu_check = _load("gpu_check.py")

    def broken(run):
        raise RuntimeError("broken on purpose")

    # one failing item: recorded, the phase's other items and the next phase still run
    monkeypatch.setattr(gpu_check, "_oom_logits", broken)
    out = tmp_path / "check.json"
    assert gpu_check.main(["--cpu-smoke", "--phases", "oom,seeding", "--out", str(out)]) == 1
    payload = json.loads(out.read_text())
    oom = payload["phases"]["oom"]
    assert oom["status"] == "failed" and "draws" in oom and "eot" in oom
    assert [e["item"] for e in oom["errors"]] == ["logits"]
    assert "broken on purpose" in oom["errors"][0]["error"]
    assert payload["phases"]["seeding"]["status"] == "ok"
    assert payload["failures"] == ["oom"]
    # the budget spent: every phase skipped with a reason, the file still written
    assert gpu_check.main(["--cpu-smoke", "--budget", "0", "--out", str(out)]) == 1
    payload = json.loads(out.read_text())
    assert payload["complete"] is True
    assert all(r["status"] == "skipped" and r["budget"] and r["reason"]
               for r in payload["phases"].values())
    # unknown names fail loudly
    assert gpu_check.main(["--cpu-smoke", "--phases", "nope"]) == 1
    assert gpu_check.main(["--cpu-smoke", "--modes", "fp99"]) == 1
    assert "unknown" in capsys.readouterr().out
