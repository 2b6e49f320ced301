"""The demo/reproduce pipeline on a tiny budget: trains, evaluates, reports, resumes."""

from __future__ import annotations

import json

import pytest

from advdefense.cli import main
from advdefense.presets import demo_plans, mnist5k_config, mnist5k_plans
from advdefense.reproduction import Plan, recorded_train_seconds, run_plans

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(plan: Plan) -> Plan:
    plan.config["train"]["epochs"] = 1
    plan.config["data"]["limit"] = 300
    plan.config["data"]["monitor_size"] = 30
    return plan


def test_run_plans_writes_report_and_resumes(tmp_path):
    plans = [_tiny(demo_plans()[0])]
    report = run_plans(plans, tmp_path, title="t", command="test", seed=0,
                       curve_eps=[0.0, 0.3], n_eval=40)
    text = report.read_text()
    assert "| pgd |" in text and "[95% CI]" in text
    assert (tmp_path / "accuracy_vs_eps.png").stat().st_size > 1000
    data = json.loads((tmp_path / "report.json").read_text())
    rows = {r["attack"]: r for r in data["sections"][0]["tables"][0]["rows"]}
    assert rows["clean"]["n"] == 40
    # PGD at eps 0.3 can only lower accuracy, per example, so the worst case <= every row
    assert all(rows["worst case"]["accuracy"] <= r["accuracy"] for r in rows.values())
    assert data["curves"]  # the eps curve was measured
    ckpt = tmp_path / "standard" / "last.pt"
    before = ckpt.stat().st_mtime_ns
    trained = data["sections"][0]["train_seconds"]
    assert trained > 0
    report = run_plans(plans, tmp_path, title="t", command="test", seed=0,
                       curve_eps=[0.0, 0.3], n_eval=40)
    assert ckpt.stat().st_mtime_ns == before, "a finished model must not be retrained"
    # the second run reuses model and evaluation but still reports what they cost
    again = json.loads((tmp_path / "report.json").read_text())["sections"][0]
    assert again["train_seconds"] == pytest.approx(trained)
    assert "compute time, summed over the entries" in report.read_text()


def test_recorded_train_seconds_sums_logged_epochs(tmp_path):
    assert recorded_train_seconds(tmp_path) is None
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "seconds": 2.5}\n'
                                            '{"epoch": 2, "seconds": 4.0}\n')
    assert recorded_train_seconds(tmp_path) == pytest.approx(6.5)


def test_presets_are_valid_configs():
    from advdefense.config import config_from_dict

    for plan in demo_plans() + mnist5k_plans():
        cfg = config_from_dict(plan.config)
        assert cfg.data.name == "mnist5k"
    assert mnist5k_config("x", recipe="trades")["train"]["recipe"] == "trades"


def test_reproduce_rejects_unknown_preset_and_entry(capsys):
    assert main(["reproduce", "--preset", "imagenet"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert main(["reproduce", "--only", "nope", "--output", "/nonexistent/x"]) == 2
    err = capsys.readouterr().err
    assert "unknown entries" in err and err.count("\n") == 1


@pytest.mark.parametrize("argv", [["demo", "--help"], ["reproduce", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0


def _fgsm_table(model, x, y, plan):
    """A cheap evaluator for the parallel test: clean + FGSM, no checks."""
    from advdefense.attacks import build_attack
    from advdefense.evaluation.harness import AttackSpec, evaluate
    from advdefense.reproduction import table_from_result

    res = evaluate(model, (x, y), [AttackSpec("fgsm", build_attack("fgsm", eps=0.3))],
                   checks=False)
    return {"tables": [table_from_result(res, title="fgsm")], "checks": []}


def _two_tiny_plans() -> list[Plan]:
    """Module-level (picklable) plan factory: two 1-epoch standard models of different seeds."""
    plans = []
    for key, seed in (("a", 0), ("b", 1)):
        plan = _tiny(Plan(key, key, mnist5k_config(key, epochs=1, seed=seed), _fgsm_table))
        plan.config["data"]["limit"] = 200
        plans.append(plan)
    return plans


def test_parallel_entries_match_the_serial_run(tmp_path):
    """``jobs=2`` runs the entries in spawned worker processes (1 thread each); with the
    parent also at 1 thread, every number in the report equals the serial run's."""
    import torch

    plans = _two_tiny_plans()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = {}
        for jobs in (1, 2):
            root = tmp_path / f"jobs{jobs}"
            run_plans(plans, root, title="t", command="test", seed=0, n_eval=30,
                      jobs=jobs, rebuild=_two_tiny_plans if jobs > 1 else None)
            sections = json.loads((root / "report.json").read_text())["sections"]
            runs[jobs] = [[(r["attack"], r["accuracy"]) for t in s["tables"] for r in t["rows"]]
                          for s in sections]
    finally:
        torch.set_num_threads(threads)
    assert [len(s) for s in runs[1]] == [3, 3]  # clean, fgsm, worst case per entry
    assert runs[1] == runs[2]
    assert runs[1][0] != runs[1][1]  # the two seeds differ, so a swap would be caught
    with pytest.raises(ValueError, match="rebuild"):
        run_plans(plans, tmp_path / "x", title="t", command="test", seed=0, jobs=2)


def test_smoothing_entry_chooses_sigma_and_m_on_val_only(monkeypatch):
    """The PNI entry picks (sigma, m) from its grid using the val split; test is never read."""
    from advdefense import data as data_module
    from advdefense.defenses.noise import inject
    from advdefense.presets import _choose_smoothing_on_val

    from .conftest import make_smallcnn

    loaded = []
    real = data_module.load_split

    def spy(name, split="train", **kw):
        loaded.append(split)
        return real(name, split, **kw)

    monkeypatch.setattr(data_module, "load_split", spy)
    plan = next(p for p in mnist5k_plans() if p.key == "pni_at")
    sm = {"sigmas": [0.0, 0.1], "ms": [1, 2], "n_val": 8}
    sigma, m, how, records = _choose_smoothing_on_val(inject(make_smallcnn(), kind="pni").eval(),
                                                      plan, sm, eps=0.3, seed=0, samples=2)
    assert loaded == ["val"]
    assert sigma in sm["sigmas"] and m in sm["ms"] and "8 val images" in how
    # the whole grid is reported, for the prediction vote the verdicts use
    assert {(r["sigma"], r["m"]) for r in records} == {(s, k) for s in sm["sigmas"]
                                                       for k in sm["ms"]}
    assert _choose_smoothing_on_val(None, plan, {"sigma": 0.2, "m": 8}, eps=0.3, seed=0,
                                    samples=2)[:2] == (0.2, 8)


def test_raising_the_cap_of_a_stopped_run_reuses_model_and_evaluation(tmp_path):
    # min_delta 1.0 (100 points): no epoch after the first can improve, so the run stops
    # after epoch 2 with best epoch 1, below its cap of 3
    rule = {"metric": "monitor_clean_acc", "patience": 1, "min_delta": 1.0}

    def plans(cap):
        cfg = mnist5k_config("es", epochs=cap, early_stopping=rule, monitor_size=30, limit=200)
        return [Plan("es", "early-stopped", cfg, demo_plans()[0].evaluate)]

    run_plans(plans(3), tmp_path, title="t", command="test", seed=0, curve_eps=None, n_eval=20)
    section = json.loads((tmp_path / "report.json").read_text())["sections"][0]
    assert section["training"]["stopped_early"] and section["training"]["epochs"] == 2
    cache = tmp_path / "es" / "evaluation.json"
    ckpt = tmp_path / "es" / "last.pt"
    before = cache.stat().st_mtime_ns, ckpt.stat().st_mtime_ns
    run_plans(plans(6), tmp_path, title="t", command="test", seed=0, curve_eps=None, n_eval=20)
    assert (cache.stat().st_mtime_ns, ckpt.stat().st_mtime_ns) == before
