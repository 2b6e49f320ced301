"""The cifar10-jpeg reproduction presets: built and validated (nothing trained), the same
rules as mnist5k's at eps 8/255 on resnet10_narrow, and the report names the data."""

from __future__ import annotations

import pytest
import torch

from advdefense.config import config_from_dict
from advdefense.presets import (
    C10_ENTRIES,
    C10_QUICK_ENTRIES,
    PAPER_SIGMAS,
    SMOOTHING_MS,
    build_plans,
    paper_sigmas,
    preset_intro,
    preset_settings,
    preset_title,
    stopping_rule,
)

EPS = 8 / 255


@pytest.fixture(scope="module")
def full():
    return build_plans("cifar10-jpeg")


def test_every_entry_trains_two_seeds_on_resnet10_narrow_at_8_255(full):
    keys = [p.key for p in full]
    assert len(keys) == len(set(keys)) == 2 * len(C10_ENTRIES)
    for group in C10_ENTRIES:
        assert {group, f"{group}_s1"} <= set(keys)
    for p in full:
        cfg = config_from_dict(p.config)
        assert (cfg.data.name, cfg.model.name) == ("cifar10-jpeg", "resnet10_narrow")
        assert (cfg.data.train_split, cfg.data.monitor_split) == ("fit", "val")
        assert cfg.data.limit is None and cfg.data.augment and cfg.data.monitor_size == 500
        assert cfg.train.epochs == 40 and p.extra["eps"] == EPS
        # the rate drops 10x on the rule's first two plateaus; the third stops the run
        assert (cfg.train.schedule.name, cfg.train.schedule.gamma,
                cfg.train.schedule.decays) == ("plateau", 0.1, 2)
        # PGD-5 of step 2/255 in training, PGD-10 in the monitor, both at 8/255
        assert (cfg.train.attack.eps, cfg.train.attack.steps) == (EPS, 5)
        assert cfg.train.attack.resolved_step_size() == pytest.approx(2 / 255)
        assert (cfg.train.monitor_attack.eps, cfg.train.monitor_attack.steps) == (EPS, 10)
        rule = cfg.train.early_stopping
        assert {"metric": rule.metric, "patience": rule.patience,
                "min_delta": rule.min_delta} == stopping_rule(cfg.train.recipe, patience=4,
                                                                min_delta=0.01)
        assert not p.extra.get("light_checks")
    for p in (q for q in full if q.key.endswith("_s1")):
        first = next(q for q in full if q.key == p.extra["group"])
        assert p.config["seed"] == 1 and first.config["seed"] == 0
        assert p.config["train"] == first.config["train"] and p.extra["skip_curve"]


def test_baselines_and_defenses_as_in_mnist5k(full):
    by = {p.key: p for p in full}
    assert by["trades"].extra["baselines"] == by["rna"].extra["baselines"] == ["pgd_at"]
    assert by["trades_cas"].extra["baselines"] == ["pgd_at", "trades"]
    assert by["mart_cas"].extra["baselines"] == ["pgd_at", "mart"]
    for key in ("at_cas", "trades_cas", "mart_cas"):
        assert by[key].config["defense"] == {"cas": {"placement": "default"}}
        assert by[key].config["train"]["recipe_args"]["aux_weight"] == 2.0
        assert by[key].evaluate.kind == "cas"
    assert by["rna"].config["defense"]["rna"]["space"] == ["bn", "in"]
    assert by["rna"].evaluate.kind == "rna"
    kinds = {by[k].config["defense"]["noise"]["kind"] for k in ("pni_w", "cni_w")}
    assert kinds == {"pni", "cni"}
    # CNI-W with mnist5k's noise scales and noise learning rate (at the SIAM code's scales
    # resnet10_narrow stayed at chance accuracy)
    m5 = next(p for p in build_plans("mnist5k-quick") if p.key == "cni_at").config
    for key in ("alpha_init", "factor_init"):
        assert by["cni_w"].config["defense"]["noise"][key] == m5["defense"]["noise"][key]
    assert (by["cni_w"].config["train"]["optimizer"]["noise_lr_scale"]
            == m5["train"]["optimizer"]["noise_lr_scale"])
    # each noise entry is judged with and without smoothing: two verdict names
    for key in ("pni_w", "cni_w"):
        extra = by[key].extra
        assert "no smoothing" in extra["base_verdict_name"]
        assert "smoothing (prediction vote)" in extra["smoothed_verdict_name"]
        assert by[key].evaluate.kind == "smoothing"


def test_smoothing_grid_is_the_papers_in_this_datasets_pixels(full):
    from advdefense.data import dataset_info

    std = sum(dataset_info("cifar10-jpeg").std) / 3
    sigmas = paper_sigmas("cifar10-jpeg")
    assert sigmas == pytest.approx([s * std for s in PAPER_SIGMAS], abs=6e-4)
    assert sigmas[-1] == pytest.approx(0.092, abs=1e-3)
    for p in full:
        if "smoothing" in p.extra:
            assert p.extra["smoothing"] == {"sigmas": sigmas, "ms": list(SMOOTHING_MS),
                                            "n_val": 100}


def test_settings_curves_and_budgets():
    s = preset_settings("cifar10-jpeg")
    assert s["n"] >= 200 and s["seeds"] == 2 and s["eps"] == EPS
    assert s["curve_eps"] == pytest.approx([0, 2 / 255, 4 / 255, 8 / 255, 12 / 255])
    assert preset_settings("cifar10")["curve_eps"] == s["curve_eps"]  # no MNIST eps lists
    q = preset_settings("cifar10-jpeg-quick")
    assert q["n"] == 100 and q["seeds"] == 1 and max(q["curve_eps"]) == EPS
    assert all(q["budget"][k] <= s["budget"][k] for k in s["budget"])


def test_the_evaluations_attack_at_8_255(full):
    for p in full[::2]:
        described = p.evaluate.describe(p)
        attacks = [a for group in described["attacks"].values() for a in group]
        assert all("eps=0.0313725" in a for a in attacks if a.startswith(("APGD", "PGD")))


def test_quick_preset_is_small():
    plans = build_plans("cifar10-jpeg-quick")
    assert [p.key for p in plans] == list(C10_QUICK_ENTRIES)
    for p in plans:
        cfg = config_from_dict(p.config)
        assert cfg.train.epochs == 2 and cfg.data.limit == 800 and cfg.data.monitor_size == 50
        assert p.extra["light_checks"] and p.extra["baselines"] in ([], ["pgd_at"])
    assert {p.key: p for p in plans}["pni_w"].extra["smoothing"]["ms"] == [8]


def test_reports_name_the_data():
    intro = preset_intro("cifar10-jpeg", {"eot": 4})
    assert "CIFAR-10 (JPEG copy)" in intro and "not CIFAR-10 results" in intro
    assert "CIFAR-10 (JPEG copy)" in preset_title("cifar10-jpeg-quick")
    assert "JPEG" not in preset_intro("mnist5k", {})


def test_the_rna_evaluation_runs_on_cifar10_jpeg_images():
    """The RNA evaluator on an untrained width-2 resnet10_narrow (2,048 paths: the exact
    attack over every path is skipped) and four test images, at a tiny budget."""
    from advdefense.config import build_from_config
    from advdefense.data import as_tensors, load_split

    plan = next(p for p in build_plans("cifar10-jpeg-quick") if p.key == "rna")
    plan.config["model"]["kwargs"] = {"width": 2}
    plan.extra["light_checks"] = True
    plan.evaluate.budget.update(n_targets=1, square_queries=5, eot=2, repeats=2,
                                rand_square_queries=5, path_pairs=2)
    torch.manual_seed(0)
    model, _ = build_from_config(config_from_dict(plan.config))
    x, y = as_tensors(load_split("cifar10-jpeg", "test", limit=4))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        section = plan.evaluate(model.eval(), x, y, plan)
    finally:
        torch.set_num_threads(threads)
    (verdict,) = section["verdicts"]
    assert len(verdict["worst"]) == 4 and len(verdict["paper_draws"]) == 2
    assert verdict["adaptive"] and not any("over all" in a for a in verdict["adaptive"])


def test_gpu_entry_smoke_runs_the_same_code_on_the_cpu(tmp_path):
    """``scripts/gpu_entry.py --smoke``: train (one epoch of PGD-2 on 64 images of a width-2
    resnet10_narrow), then the standard suite on 8 test images, on the CPU."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu_entry.py"
    spec = importlib.util.spec_from_file_location("gpu_entry", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread avoids contention on a shared CPU
    try:
        assert module.main(["--smoke", "--output", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["smoke"] and summary["epochs"] == 1 and summary["fit_images"] == 64
    assert summary["test_images"] == 8 and summary["device"] == "cpu"
    assert 0 <= summary["standard_suite"] <= summary["clean"] <= 1
    assert (tmp_path / "eval" / "report.json").exists()
    assert (tmp_path / "train" / "last.pt").exists()


def test_the_smoothing_choice_runs_on_the_models_device(monkeypatch):
    """The val sweep that picks sigma and m gets its images on the model's device (a model
    on a GPU got CPU images); checked with a model on the meta device."""
    from types import SimpleNamespace

    from torch import nn

    from advdefense import presets
    from advdefense.analysis import smoothing_sweeps

    seen = {}

    class Seen(Exception):
        pass

    def fake_sweep(model, x, y, **kw):
        seen["devices"] = (x.device.type, y.device.type)
        raise Seen

    monkeypatch.setattr(smoothing_sweeps, "sweep", fake_sweep)
    model = nn.Linear(2, 2).to("meta")
    plan = SimpleNamespace(config={"data": {"name": "mnist5k"}})
    with pytest.raises(Seen):
        presets._choose_smoothing_on_val(model, plan, {"sigmas": [0.0], "ms": [1], "n_val": 4},
                                         eps=0.1, seed=0, samples=1)
    assert seen["devices"] == ("meta", "meta")
