"""The reproduce presets (built and validated, nothing trained) and the report's paired
statistics on fabricated sections."""

from __future__ import annotations

import pytest

from advdefense.cli import main
from advdefense.config import config_from_dict
from advdefense.presets import MULTI_SEED, build_plans, preset_settings
from advdefense.reproduction import paired_markdown, paired_summary


def test_quick_preset_plan_is_built_and_valid():
    plans = build_plans("mnist5k-quick")
    keys = [p.key for p in plans]
    assert len(keys) == len(set(keys)) == 11
    assert not any(k.endswith("_s1") for k in keys)  # one seed
    for p in plans:
        cfg = config_from_dict(p.config)
        assert cfg.data.train_split == "fit" and cfg.data.monitor_split == "val"
        assert cfg.data.limit == 1500 and cfg.train.epochs == 2
        assert cfg.train.early_stopping is not None
        expected = "monitor_clean_acc" if cfg.train.recipe == "standard" else "monitor_pgd_acc"
        assert cfg.train.early_stopping.metric == expected
    by_key = {p.key: p for p in plans}
    for key in ("at_cas", "trades_cas", "mart_cas"):
        plan = by_key[key]
        assert plan.config["model"]["name"] == "resnet_mini"
        assert plan.config["defense"] == {"cas": {"placement": "default"}}
        assert plan.config["train"]["recipe_args"]["aux_weight"] == 2.0
        # every CAS entry is compared with PGD-AT (and its own recipe) on the same network
        for base in plan.extra["baselines"]:
            assert by_key[base].config["model"]["name"] == "resnet_mini"
            assert "cas" not in by_key[base].config["defense"]
        assert plan.extra["baselines"][0] == "pgd_at_rn"
    for key in ("rna_at", "pni_at"):
        assert by_key[key].extra["baselines"] == ["pgd_at"]
        assert by_key["pgd_at"].config["model"] == by_key[key].config["model"]
    settings = preset_settings("mnist5k-quick")
    assert settings["n"] == 100 and settings["budget"]["eot"] <= 2


def test_full_preset_trains_two_seeds_of_every_entry():
    plans = build_plans("mnist5k")
    keys = {p.key for p in plans}
    for group in MULTI_SEED:
        assert {group, f"{group}_s1"} <= keys
    second = [p for p in plans if p.key.endswith("_s1")]
    assert len(second) == len(MULTI_SEED)
    for p in second:
        first = next(q for q in plans if q.key == p.extra["group"])
        assert (p.config["seed"], first.config["seed"]) == (1, 0)
        assert p.config["train"] == first.config["train"]
        # every seed runs every attack-failure check: a check it skipped could not fail
        assert p.extra["skip_curve"] and not p.extra.get("light_checks")
        config_from_dict(p.config)
    assert {p.config["train"]["epochs"] for p in plans} == {20}
    assert preset_settings("mnist5k")["n"] == 200
    assert [p.key for p in build_plans("mnist5k", seeds=[3])][:2] == ["standard", "pgd_at"]
    assert {p.config["seed"] for p in build_plans("mnist5k", seed=5)} == {5, 6}


def _section(key, group, seed, worst, paper=None, baselines=(), arch="smallcnn"):
    paper = paper if paper is not None else worst
    verdict = {"name": group, "paper_label": "p", "paper": paper, "worst": worst,
               "checks": [], "adaptive": ["apgd-ce"]}
    return {"key": key, "group": group, "seed": seed, "arch": arch, "title": key,
            "baselines": list(baselines), "train_seconds": 10.0,
            "training": {"epochs": 5, "cap": 10, "checkpoint": "best.pt", "best_epoch": 3,
                         "best_value": 0.8, "stopped_early": True,
                         "early_stopping": {"metric": "monitor_pgd_acc", "patience": 2,
                                            "min_delta": 0.005}},
            "verdicts": [verdict]}


def test_paired_summary_matches_baselines_by_seed_and_reports_the_spread():
    n = 40
    strong = [True] * 30 + [False] * 10
    weak = [True] * 12 + [False] * 28
    paper_high = [True] * 36 + [False] * 4
    sections = [
        _section("pgd_at", "pgd_at", 0, strong),
        _section("pgd_at_s1", "pgd_at", 1, [True] * 28 + [False] * 12),
        _section("rna_at", "rna_at", 0, weak, paper=weak[:12] + [True] * 20 + [False] * 8,
                 baselines=("pgd_at",)),
        _section("rna_at_s1", "rna_at", 1, weak, baselines=("pgd_at",)),
        _section("at_cas", "at_cas", 0, strong[:29] + [False] * 11, paper=paper_high,
                 baselines=("pgd_at_rn",), arch="resnet_mini"),
    ]
    summary = paired_summary(sections)
    rows = {(r["group"], r["seed"]): r for r in summary["rows"]}
    rna0 = rows[("rna_at", 0)]["vs_baselines"][0]
    assert rna0["key"] == "pgd_at" and rna0["only_a"] == 0 and rna0["only_b"] == 18
    assert rna0["decided"] and rna0["difference"] == pytest.approx(-18 / n)
    assert rows[("rna_at", 1)]["vs_baselines"][0]["key"] == "pgd_at_s1"  # same seed
    assert rows[("rna_at", 0)]["vs_paper"]["decided"]  # 20 examples only the paper survives
    assert rows[("at_cas", 0)]["vs_baselines"][0]["missing"]  # no resnet_mini PGD-AT here
    assert not rows[("pgd_at", 0)]["vs_baselines"]
    spread = {s["group"]: s for s in summary["spread"]}
    assert set(spread) == {"pgd_at", "rna_at"}
    assert spread["pgd_at"]["worst"] == [0.75, 0.7]
    assert spread["pgd_at"]["worst_range"] == pytest.approx(0.05)
    text = "\n".join(paired_markdown(summary, sections))
    assert "decided at the 5% level" in text and "Spread over training seeds" in text
    assert "epochs trained" in text and "n/a" in text


def test_reproduce_accepts_the_quick_preset_and_seeds(capsys):
    assert main(["reproduce", "--preset", "mnist5k-quick", "--only", "nope",
                 "--output", "/nonexistent/x"]) == 2
    assert "unknown entries" in capsys.readouterr().err
    assert main(["reproduce", "--seeds", "0,x", "--output", "/nonexistent/x"]) == 2
    assert "--seeds" in capsys.readouterr().err


def test_a_folder_trained_with_another_config_is_retrained_and_reevaluated(tmp_path):
    """Resuming into a folder from another experiment (e.g. an older preset) must not reuse
    its model or its cached evaluation; an unchanged rerun reuses both."""
    import json

    from advdefense.presets import mnist5k_config
    from advdefense.reproduction import Plan, evaluate_entry

    calls = []

    def evaluate(model, x, y, plan):
        calls.append(type(model).__name__)
        return {"tables": [], "checks": []}

    def plan(model):
        cfg = mnist5k_config("e", epochs=1, model=model)
        cfg["data"].update(limit=40, monitor_size=0)
        cfg["model"]["kwargs"] = {"width": 4} if model == "smallcnn" else {}
        return Plan("e", "e", cfg, evaluate)

    opts = dict(seed=0, n_eval=8)
    evaluate_entry(plan("smallcnn"), tmp_path, **opts)
    evaluate_entry(plan("smallcnn"), tmp_path, **opts)
    assert calls == ["SmallCNN"]  # reused
    section = evaluate_entry(plan("resnet_mini"), tmp_path, **opts)
    assert calls == ["SmallCNN", "ResNet"]
    assert section["training"]["epochs"] == 1
    assert json.loads((tmp_path / "e" / "evaluation.json").read_text())["digest"]
    evaluate_entry(plan("resnet_mini"), tmp_path, seed=0, n_eval=9)  # other examples
    assert calls == ["SmallCNN", "ResNet", "ResNet"]


@pytest.mark.parametrize("preset", ["mnist5k", "mnist5k-quick", "cifar10-jpeg",
                                    "cifar10-jpeg-quick", "cifar10"])
def test_every_preset_names_its_data_eps_and_curves_in_its_units(preset):
    """No preset borrows another dataset's eps or curve (mnist5k's 0.1-0.4 on CIFAR)."""
    settings = preset_settings(preset)
    eps = settings["eps"]
    assert 0 in settings["curve_eps"] and eps in settings["curve_eps"]
    assert max(settings["curve_eps"]) <= 1.5 * eps + 1e-9
    for plan in build_plans(preset)[:3]:
        cfg = config_from_dict(plan.config)
        assert cfg.data.name == settings["dataset"]
        assert plan.extra.get("eps", 0.3) == pytest.approx(eps)
        assert cfg.train.attack.eps == pytest.approx(eps)


def test_reproduce_lists_the_cifar10_jpeg_presets(capsys):
    assert main(["reproduce", "--preset", "cifar10-jpeg-quick", "--only", "nope",
                 "--output", "/nonexistent/x"]) == 2
    err = capsys.readouterr().err
    assert "unknown entries" in err and "pni_w" in err
