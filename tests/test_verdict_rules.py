"""Verdicts the authors would have to accept: the rules the reproduction pipeline and its
report enforce (docs/verdicts.md), each on tiny stand-in models or fabricated results."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from advdefense.config import build_from_config, config_from_dict
from advdefense.presets import make_evaluator, mnist5k_config
from advdefense.reproduction import Plan, paired_markdown, paired_summary

# every attack runs, at the smallest size that still does something
TINY = {"n_targets": 1, "square_queries": 5, "eot": 2, "repeats": 2, "rand_square_queries": 5,
        "path_pairs": 2, "exact_iters": 2, "smooth_eot": 2, "smooth_iters": 2}
CAS = {"cas": {"placement": "default"}}


def _plan(key, evaluator, **cfg):
    config = mnist5k_config(key, recipe="pgd_at", **cfg)
    config["model"]["kwargs"] = {"width": 4}
    return Plan(key, key, config, evaluator, extra={"light_checks": True, "verdict_name": key})


def _model(plan):
    torch.manual_seed(0)
    model, _ = build_from_config(config_from_dict(plan.config))
    return model.eval()


@pytest.fixture(scope="module")
def few(mnist_test):
    x, y = mnist_test
    return x[:4], y[:4]


class _Spy:
    """Records the arguments of every call of a function, then calls it."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.fn(*args, **kwargs)


# -- 1. every reported model faces the adaptive suite ---------------------------------------

def test_the_smoothed_classifier_itself_faces_apgd_with_eot_over_its_votes(few, monkeypatch,
                                                                           one_thread):
    from advdefense.defenses.smoothing import SmoothedClassifier
    from advdefense.evaluation import suite

    spy = _Spy(suite.run_suite)
    monkeypatch.setattr(suite, "run_suite", spy)
    plan = _plan("pni_at", make_evaluator("smoothing", TINY),
                 defense={"noise": {"kind": "pni", "where": "weights"}})
    plan.extra["smoothing"] = {"sigma": 0.05, "m": 2}
    section = plan.evaluate(_model(plan), *few, plan)
    smoothed_runs = [(a, kw) for a, kw in spy.calls
                     if any(isinstance(m, SmoothedClassifier) for m in a[0].modules())]
    assert smoothed_runs, "the smoothed classifier was never attacked itself"
    attacks = smoothed_runs[0][1]["attacks"]
    names = {type(a[1]).__name__ for a in attacks}
    assert {"APGD", "APGDDLR"} <= names
    white = [a for a in attacks if a[1].access == "white-box"]
    assert all(a[1].eot_samples >= 2 for a in white)  # EOT over its m-sample votes
    # last, the transfer from its base model with EOT over the base's noise and the input
    # noise: the smooth surrogate of the vote, judged against the attacks on the vote itself
    transfer = attacks[-1][1]
    assert type(transfer).__name__ == "TransferAttack"
    assert transfer.attack.eot_samples >= 2
    noisy_base = transfer.substitute
    assert any(m is smoothed_runs[0][0][0].smoothed.base for m in noisy_base.modules())
    assert any(getattr(m, "sigma", None) == 0.05 for m in noisy_base.modules())
    smoothed = section["verdicts"][1]
    assert smoothed["adaptive"] and "upper" not in smoothed
    assert smoothed["adaptive"] == [a[0] for a in attacks]


def test_attacks_on_the_smoothed_classifier_get_a_gradient_where_its_vote_is_unanimous(
        one_thread):
    from advdefense.defenses.smoothing import SmoothedClassifier
    from advdefense.presets import SmoothedLogits

    from .conftest import make_smallcnn

    torch.manual_seed(0)
    base = make_smallcnn(width=4).eval()
    model = SmoothedLogits(SmoothedClassifier(base, sigma=0.01, m=4))
    x = torch.rand(6, 1, 28, 28, requires_grad=True)
    logits = model(x)
    votes = model.smoothed(x.detach())
    assert torch.equal(logits.argmax(1), votes.argmax(1))  # the deployed predictions
    assert (votes.max(1).values == 1).all()  # every vote unanimous
    y = logits.argmax(1)
    for loss in (torch.nn.functional.cross_entropy(logits, y, reduction="sum"),
                 (logits.topk(2).values[:, 1] - logits.gather(1, y[:, None])[:, 0]).sum()):
        (g,) = torch.autograd.grad(loss, x, retain_graph=True)
        assert (g.flatten(1).abs().sum(1) > 0).all()


# -- 2. monitors that cannot be fooled by masking -------------------------------------------

class _Coin(torch.nn.Module):
    """Predicts class 0 on half of its draws and class 1 on the other half, per example."""

    def __init__(self):
        super().__init__()
        from advdefense.randomness import StochasticModule

        class Flip(StochasticModule):
            def sample_state(self, x, groups):
                return torch.rand(x.shape[0], device=x.device) < 0.5

            def forward_with_state(self, x, state):
                return x * 0 + state.float().view(-1, *([1] * (x.dim() - 1)))

        self.flip = Flip()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        heads = self.flip(x).flatten(1).mean(1, keepdim=True) * self.scale
        return torch.cat([heads, 1 - heads, torch.zeros(x.shape[0], 8)], 1)


def _trainer(tmp_path, defense=None, **recipe_args):
    from advdefense.training.trainer import Trainer

    cfg = config_from_dict({
        "name": "m", "seed": 0, "output_dir": str(tmp_path / "m"),
        "data": {"limit": 20, "batch_size": 20, "monitor_size": 4, "train_split": "fit",
                 "monitor_split": "val"},
        "model": {"name": "smallcnn", "kwargs": {"width": 4}}, "defense": defense or {},
        "train": {"recipe": "standard", "epochs": 1, "recipe_args": recipe_args,
                  "monitor_attack": {"steps": 1}}})
    return Trainer(cfg, device="cpu", progress=False)


def test_the_monitor_of_a_random_model_counts_all_repeated_predictions(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.model = _Coin()
    trainer.monitor_x = torch.zeros(64, 1, 28, 28)
    trainer.monitor_y = torch.zeros(64, dtype=torch.long)
    out = trainer.monitor(0)
    # one draw would be right half of the time; all 4 repeated draws, 1 time in 16
    assert out["monitor_clean_acc"] < 0.25
    assert "EOT 4" in out["monitor"] and "all 4 predictions" in out["monitor"]


def test_the_monitor_of_a_cas_model_attacks_main_plus_beta_aux(tmp_path, monkeypatch):
    from advdefense.attacks.objectives import HeadsObjective

    spy = _Spy(HeadsObjective.__call__)
    monkeypatch.setattr(HeadsObjective, "__call__", lambda *a, **k: spy(*a, **k))
    trainer = _trainer(tmp_path, CAS, aux_weight=2.0)
    out = trainer.monitor(0)
    assert spy.calls and spy.calls[0][0][0].aux_weight == 2.0
    assert out["monitor"].endswith("main + 2·aux")


def test_a_checkpoint_chosen_by_another_monitor_is_trained_again(tmp_path):
    from advdefense.reproduction import train_plan
    from advdefense.training.checkpoint import load_checkpoint, save_checkpoint

    rule = {"metric": "monitor_clean_acc", "patience": 1, "min_delta": 0.0}
    cfg = mnist5k_config("e", epochs=1, early_stopping=rule, monitor_size=4, limit=20)
    cfg["model"]["kwargs"] = {"width": 4}
    cfg["train"]["monitor_attack"]["steps"] = 0
    plan = Plan("e", "e", cfg, lambda *a: {})
    _, _, _, training = train_plan(plan, tmp_path)
    assert training["monitor"] == "clean"  # the val monitor is reported with the figure
    ckpt = tmp_path / "e" / "last.pt"
    before = ckpt.stat().st_mtime_ns
    train_plan(plan, tmp_path)
    assert ckpt.stat().st_mtime_ns == before  # same monitor: reused
    saved = load_checkpoint(ckpt)
    saved["metrics"]["history"][0]["monitor"] = "PGD-10, one draw, main logits"
    save_checkpoint(saved, ckpt)
    before = ckpt.stat().st_mtime_ns
    train_plan(plan, tmp_path)
    assert ckpt.stat().st_mtime_ns != before


# -- 3. CAS's adaptive attack counts in its worst case --------------------------------------

def test_the_cas_cascade_attacks_main_plus_beta_aux(few, monkeypatch, one_thread):
    from advdefense.attacks import HeadsObjective
    from advdefense.evaluation import suite

    spy = _Spy(suite.run_suite)
    monkeypatch.setattr(suite, "run_suite", spy)
    plan = _plan("at_cas", make_evaluator("cas", TINY), defense=CAS,
                 recipe_args={"aux_weight": 2.0})
    section = plan.evaluate(_model(plan), *few, plan)
    (args, kwargs), = spy.calls
    heads = [a for a in kwargs["attacks"]
             if isinstance(getattr(a[1], "objective", None), HeadsObjective)]
    assert {type(a[1]).__name__ for a in heads} == {"APGD", "APGDDLR"}
    assert all(a[1].objective.aux_weight == 2.0 for a in heads)
    assert set(section["verdicts"][0]["adaptive"]) >= {a[0] for a in heads}


# -- 4. a failed check withholds the verdict ------------------------------------------------

def _verdict(name, worst, paper=None, checks=(), **extra):
    return {"name": name, "paper_label": "p", "paper": paper if paper is not None else worst,
            "worst": worst, "checks": list(checks), "adaptive": ["apgd-ce"], **extra}


def _section(key, group, seed, verdicts, baselines=()):
    return {"key": key, "group": group, "seed": seed, "arch": "resnet_mini", "title": key,
            "baselines": list(baselines), "verdicts": verdicts, "checks": []}


N = 100
STRONG = [True] * 80 + [False] * 20
WEAK = [True] * 40 + [False] * 60
BEST = [True] * 90 + [False] * 10


def test_an_upper_bound_withholds_a_gain_but_not_a_loss():
    fails = ["unbounded_attack", "blackbox_beats_whitebox"]
    sections = []
    for s in (0, 1):
        sections += [
            _section(f"mart_rn{s}", "mart_rn", s, [_verdict("MART", WEAK)]),
            _section(f"mart_cas{s}", "mart_cas", s, [_verdict("MART + CAS", STRONG,
                                                              checks=fails)], ("mart_rn",)),
            _section(f"pgd_rn{s}", "pgd_at_rn", s, [_verdict("PGD-AT", BEST)]),
            _section(f"trades_cas{s}", "trades_cas", s, [_verdict("TRADES + CAS", WEAK,
                                                                  checks=fails)],
                     ("pgd_at_rn",)),
        ]
    summary = paired_summary(sections)
    rows = {(r["group"], r["seed"]): r for r in summary["rows"]}
    gain = rows[("mart_cas", 0)]
    assert gain["upper_bound"] == fails
    b = gain["vs_baselines"][0]
    assert b["difference"] > 0 and b["p_holm"] < 0.05  # significant, but an upper bound
    assert b["status"] == "withheld" and "unbounded_attack" in b["why"]
    loss = rows[("trades_cas", 0)]["vs_baselines"][0]
    assert loss["difference"] < 0 and loss["status"] == "decided"  # the true figure is lower
    by = {(v["group"], v["against"]): v for v in summary["verdicts"]}
    assert by[("mart_cas", "mart_rn")]["verdict"] == "undecided"
    assert by[("trades_cas", "pgd_at_rn")]["verdict"] == "decided"
    text = "\n".join(paired_markdown(summary, sections))
    assert "≤ 80.0" in text and "upper bound: unbounded_attack" in text
    assert "cannot be claimed" in text
    # a baseline that is an upper bound withholds the defense's loss against it
    flipped = copy.deepcopy(sections)
    for sec in flipped:
        if sec["group"] == "pgd_at_rn":
            sec["verdicts"][0]["checks"] = ["zero_gradients"]
    row = next(r for r in paired_summary(flipped)["rows"] if r["group"] == "trades_cas")
    assert row["vs_baselines"][0]["status"] == "withheld"


def test_a_model_without_an_adaptive_attack_is_an_upper_bound():
    plain = _verdict("smoothed", STRONG)
    del plain["adaptive"]  # nothing recorded, and no cascade table in its section
    sections = [_section("a", "a", 0, [_verdict("base", WEAK), plain])]
    row = paired_summary(sections)["rows"][1]
    assert row["upper_bound"] == ["no adaptive attack on this model"]


def _check(name, passed):
    return {"name": name, "passed": passed, "detail": f"{name} detail", "remedy": "fix it"}


def test_a_check_failing_only_on_the_paper_protocol_marks_the_paper_figure_not_the_worst_case(
        tmp_path):
    from advdefense.presets import verdict_record
    from advdefense.reproduction import paper_upper_bound_reasons, upper_bound_reasons, write_report

    def verdict(name, checks, paper_checks):
        return verdict_record(name, torch.tensor(BEST), torch.tensor(STRONG), paper_label="p",
                              checks=checks, paper_checks=paper_checks, adaptive=["apgd-ce"])

    paper_only = verdict("paper-only", [], ["randomness_without_eot"])
    adaptive = verdict("adaptive", ["unbounded_attack"], [])
    old = _verdict("old", STRONG, paper=BEST, checks=["randomness_without_eot"])
    sections = [
        _section("at", "at", 0, [_verdict("PGD-AT", WEAK)]),
        {**_section("p", "p", 0, [paper_only], ("at",)),
         "checks": [_check("unbounded_attack", True)],
         "paper_checks": [_check("randomness_without_eot", False)]},
        {**_section("a", "a", 0, [adaptive], ("at",)),
         "checks": [_check("unbounded_attack", False)],
         "paper_checks": [_check("randomness_without_eot", True)]},
        # cached before the two were kept apart: every check counts for the worst case
        {**_section("o", "o", 0, [old], ("at",)),
         "checks": [_check("randomness_without_eot", False)]},
    ]
    assert upper_bound_reasons(sections[1], paper_only) == []
    assert paper_upper_bound_reasons(paper_only) == ["randomness_without_eot"]
    assert upper_bound_reasons(sections[2], adaptive) == ["unbounded_attack"]
    assert paper_upper_bound_reasons(adaptive) == []
    assert upper_bound_reasons(sections[3], old) == ["randomness_without_eot"]
    assert paper_upper_bound_reasons(old) == []
    summary = paired_summary(sections)
    rows = {r["group"]: r for r in summary["rows"]}
    # 80% against the baseline's 40%: a gain, withheld only where the worst case is a bound
    assert rows["p"]["vs_baselines"][0]["status"] == "decided"
    assert rows["a"]["vs_baselines"][0]["status"] == "withheld"
    assert rows["o"]["vs_baselines"][0]["status"] == "withheld"
    table = {line.split(" | ")[0]: line for line in paired_markdown(summary, sections)
             if " | resnet_mini | " in line}  # the per-seed table
    assert "| 90.0 (upper bound: randomness_without_eot) | 80.0 [" in table["| paper-only"]
    assert "| 90.0 | ≤ 80.0 [" in table["| adaptive"]
    assert "| 90.0 | ≤ 80.0 [" in table["| old"]
    text = write_report(tmp_path, title="t", command="c", seed=0, sections=sections, curves={},
                        total_seconds=0).read_text()
    parts = {s.split("\n")[0]: s for s in text.split("\n## ")[1:]}
    paper_head = "Attack-failure checks on the paper protocol (a failure marks the paper figure"
    adaptive_head = "Attack-failure checks on the adaptive evaluation (a failure marks the worst"
    assert paper_head in parts["p"] and adaptive_head in parts["p"]
    assert "**Upper bound:**" not in parts["p"]
    assert paper_head in parts["a"] and "**Upper bound:**" in parts["a"]
    assert "Attack-failure checks:" in parts["o"] and "**Upper bound:**" in parts["o"]


class _DropoutNet(torch.nn.Module):
    """A 2-layer net on 8x8 inputs whose dropout stays on in eval mode: a random model."""

    def __init__(self):
        super().__init__()
        from advdefense.randomness import StochasticModule

        class Drop(StochasticModule):
            def sample_state(self, x, groups):
                return torch.rand_like(x) < 0.5

            def forward_with_state(self, x, state):
                return x * state * 2

        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16),
                                       torch.nn.ReLU(), Drop(), torch.nn.Linear(16, 10))

    def forward(self, x):
        return self.net(x)


def test_the_paper_protocols_missing_eot_marks_the_paper_figure_and_the_probes_run_in_the_cascade(
        monkeypatch, one_thread):
    """A random model: the paper protocol (one draw per step) fails randomness_without_eot,
    which lands in ``paper_checks``; its cascade (EOT, with the probes) is the worst case."""
    from advdefense import presets
    from advdefense.reproduction import upper_bound_reasons

    # the base of a random model faces the rand cascade (EOT), as PNI's base does
    monkeypatch.setattr(presets, "standard_suite_attacks", presets.rand_suite_attacks)
    torch.manual_seed(0)
    model = _DropoutNet().eval()
    x, y = torch.rand(4, 1, 8, 8), torch.arange(4)
    plan = Plan("drop", "drop", {"seed": 0}, None, extra={"eps": 0.3, "verdict_name": "drop"})
    section = make_evaluator("deterministic", TINY)(model, x, y, plan)
    paper = {c["name"]: c["passed"] for c in section["paper_checks"]}
    adaptive = {c["name"]: c["passed"] for c in section["checks"]}
    assert paper["randomness_without_eot"] is False
    assert adaptive["randomness_without_eot"] is not False  # n/a where the cascade stopped
    probes = {"unbounded_attack", "eps_monotone", "more_iterations"}
    assert probes <= set(adaptive) and not probes & set(paper)  # probes: the cascade's only
    (v,) = section["verdicts"]
    assert "randomness_without_eot" in v["paper_checks"]
    assert "randomness_without_eot" not in v["checks"]
    assert "randomness_without_eot" not in upper_bound_reasons(section, v)


# -- 5. RNA as the paper draws it -----------------------------------------------------------

def test_cluster_sign_flip_and_holm():
    from advdefense.evaluation.stats import cluster_sign_flip, holm

    a = [True] * 6 + [False] * 2
    b = [False] * 6 + [True] * 2
    # clusters of 4: differences +4 and 0 (cluster 2: +2 - 2); one informative cluster
    t = cluster_sign_flip(a, b, [0, 0, 0, 0, 1, 1, 1, 1])
    assert (t.clusters, t.p_value, t.min_p) == (1, 1.0, 1.0)
    # four clusters of +1 each: only the all-same patterns reach |T| = 4: p = 2 / 16
    t = cluster_sign_flip([True] * 4 + [False] * 4, [False] * 8, [0, 1, 2, 3, 0, 1, 2, 3])
    assert t.p_value == pytest.approx(2 / 16) and t.exact and t.min_p == pytest.approx(1 / 8)
    # Monte Carlo beyond the exact limit
    many = cluster_sign_flip([True] * 30, [False] * 30, list(range(30)), exact_limit=8)
    assert not many.exact and many.p_value < 0.001
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])


def test_rna_paper_protocol_takes_a_path_pair_per_batch_of_128_and_the_exact_attack_counts(
        few, monkeypatch, one_thread):
    from advdefense.analysis import rna_report as rna_module
    from advdefense.defenses import rna
    from advdefense.evaluation import harness

    batches = _Spy(rna_module.evaluate)
    monkeypatch.setattr(rna_module, "evaluate", batches)
    runs = _Spy(harness.evaluate)
    monkeypatch.setattr(harness, "evaluate", runs)
    plan = _plan("rna_at", make_evaluator("rna", TINY),
                 defense={"rna": {"space": ["bn", "in"], "granularity": "call"}})
    model = _model(plan)
    section = plan.evaluate(model, *few, plan)
    assert batches.calls and all(kw.get("batch_size") == 128 for _, kw in batches.calls)
    specs = [s for args, kw in runs.calls for s in (args[2] if len(args) > 2
                                                    else kw.get("specs", []))]
    exact = [s for s in specs if len(getattr(getattr(s.attack, "objective", None), "paths",
                                             [])) > 1]
    assert exact and len(exact[0].attack.objective.paths) == rna.num_paths(model) <= 256
    v = section["verdicts"][0]
    assert v["clusters"] == [0, 0, 0, 0] and len(v["paper_draws"]) == TINY["path_pairs"]


def test_rna_verdicts_hold_at_every_path_pair_draw_and_show_the_cluster_test():
    worst = [True] * 30 + [False] * 270
    high = [True] * 290 + [False] * 10
    low = [True] * 31 + [False] * 269  # a draw of path pairs barely above the worst case
    rna = _verdict("RNA", worst, paper=high, paper_draws=[high, low],
                   clusters=[i // 128 for i in range(300)])
    summary = paired_summary([_section("rna_at", "rna_at", 0, [rna])])
    vp = summary["rows"][0]["vs_paper"]
    assert vp["p_value"] == pytest.approx(1.0)  # the largest p over the draws
    assert vp["paper_range"] == pytest.approx([31 / 300, 290 / 300])
    assert vp["cluster"]["clusters"] == 3 and vp["cluster"]["min_p"] == pytest.approx(0.25)
    assert vp["status"] == "not decided"


def test_rna_against_a_baseline_without_clusters_gets_the_cluster_test():
    """RNA's verdict (clustered by path pair) against PGD-AT (no clusters): the paired test
    clusters by RNA's batches and the report is written."""
    n = 300
    rna = _verdict("RNA", [True] * 30 + [False] * (n - 30),
                   clusters=[i // 128 for i in range(n)])
    at = _verdict("PGD-AT", [i % 2 == 0 for i in range(n)])  # spread over every batch
    sections = [_section("pgd_at", "pgd_at", 0, [at]), _section("rna", "rna", 0, [rna],
                                                               ("pgd_at",))]
    summary = paired_summary(sections)
    test = next(r for r in summary["rows"] if r["group"] == "rna")["vs_baselines"][0]
    assert test["cluster"]["clusters"] == 3 and (test["only_a"], test["only_b"]) == (15, 135)
    assert "sign-flip over 3 clusters" in "\n".join(paired_markdown(summary, sections))


# -- 6. smoothing at the paper's settings ---------------------------------------------------

def test_smoothing_grid_covers_the_paper_range_and_reports_a_lost_headline():
    from advdefense.presets import (
        SMOOTHING_MS,
        _smoothing_choice_markdown,
        build_plans,
        paper_sigmas,
    )

    sigmas = paper_sigmas("mnist5k")
    assert sigmas[0] == 0 and sigmas[-1] == pytest.approx(0.37 * 0.3081, abs=1e-3)
    for p in build_plans("mnist5k"):
        if "smoothing" in p.extra:
            assert p.extra["smoothing"]["sigmas"] == sigmas
            assert min(p.extra["smoothing"]["ms"]) >= 16 and p.extra["smoothing"]["ms"] == list(
                SMOOTHING_MS)
    records = [{"sigma": s, "m": 16, "clean": 0.9, "attacked": 0.5} for s in sigmas]
    text = _smoothing_choice_markdown(0.0, 16, "chosen on val", records)
    assert "lost here" in text and "**(chosen)**" in text and text.count("| 16 |") == 4
    assert "lost here" not in _smoothing_choice_markdown(sigmas[2], 16, "chosen", records)


# -- 7. how sure: Holm, seeds ---------------------------------------------------------------

def _seeded_pair(only_a, only_b):
    """A defense against its baseline at two seeds: 70% against 50% at seed 0 (decided); at
    seed 1, ``only_a`` examples only the defense survives and ``only_b`` only the baseline."""
    base = [True] * 50 + [False] * 50
    at0 = [True] * 70 + [False] * 30
    at1 = [True] * (50 - only_b) + [False] * only_b + [True] * only_a + [False] * (50 - only_a)
    return [_section("b", "b", 0, [_verdict("B", base)]),
            _section("b_s1", "b", 1, [_verdict("B", base)]),
            _section("d", "d", 0, [_verdict("D", at0)], ("b",)),
            _section("d_s1", "d", 1, [_verdict("D", at1)], ("b",))]


def test_holm_adjusts_every_test_and_a_verdict_must_hold_at_every_seed():
    summary = paired_summary(_seeded_pair(26, 10))
    rows = summary["rows"]
    raw = [r["vs_paper"]["p_value"] for r in rows] + [
        b["p_value"] for r in rows for b in r["vs_baselines"]]
    assert summary["tests"] == len(raw) == 6
    assert all(r["vs_paper"]["p_holm"] >= r["vs_paper"]["p_value"] for r in rows)
    d = {r["seed"]: r["vs_baselines"][0] for r in rows if r["group"] == "d"}
    assert d[0]["status"] == "decided"
    # 26 against 10 discordant examples at seed 1: raw p < 0.05, after Holm not
    assert d[1]["p_value"] < 0.05 <= d[1]["p_holm"] and d[1]["status"] == "not decided"
    verdict = next(v for v in summary["verdicts"] if v["group"] == "d" and v["against"] == "b")
    # the two seeds (70% and 66%) differ by 4 points: two suffice, but seed 1 is not decided
    assert summary["groups"]["d"]["required"] == 2 and verdict["verdict"] == "undecided"
    text = "\n".join(paired_markdown(summary, _seeded_pair(26, 10)))
    assert "p_Holm" in text and "seed 1: not decided" in text
    decided = paired_summary(_seeded_pair(30, 6))
    v = next(v for v in decided["verdicts"] if v["group"] == "d" and v["against"] == "b")
    assert v["verdict"] == "decided" and v["direction"] == "higher"


def test_seeds_that_differ_by_more_than_5_points_need_a_third():
    from advdefense.reproduction import extra_seed_plans

    sections = _seeded_pair(2, 0)  # seed 0: 70%, seed 1: 52%
    summary = paired_summary(sections)
    assert summary["groups"]["d"]["required"] == 3 and not summary["groups"]["d"]["sufficient"]
    v = next(v for v in summary["verdicts"] if v["group"] == "d" and v["against"] == "b")
    assert v["verdict"] == "insufficient seeds" and "d: 2 of 3" in v["why"]
    assert "insufficient: 2" in "\n".join(paired_markdown(summary, sections))
    plans = [Plan(k, k, {"seed": s, "name": k}, None, extra={"group": g, "seed": s})
             for k, g, s in (("b", "b", 0), ("b_s1", "b", 1), ("d", "d", 0), ("d_s1", "d", 1))]
    more = extra_seed_plans(plans, sections)
    assert [(p.key, p.config["seed"], p.extra["group"]) for p in more] == [("d_s2", 2, "d")]
    # one seed alone is not extended (the report marks it insufficient)
    assert extra_seed_plans(plans, sections[:1] + sections[2:3]) == []


def _by_seed(model, x, y, plan):
    """A stand-in evaluation whose worst case depends on the training seed only."""
    k = {0: 20, 1: 12, 2: 18}[plan.config["seed"]]
    flags = [True] * k + [False] * (len(y) - k)
    return {"tables": [], "checks": [],
            "verdicts": [_verdict(plan.extra["group"], flags, paper=[True] * len(y))]}


def _seed_plans():
    plans = []
    for s in (0, 1):
        cfg = mnist5k_config(f"d{s}", epochs=1, seed=s, monitor_size=0, limit=20)
        cfg["model"]["kwargs"] = {"width": 4}
        plans.append(Plan("d" if s == 0 else "d_s1", "d", cfg, _by_seed,
                          extra={"group": "d", "seed": s, "skip_curve": True}))
    return plans


def test_the_pipeline_adds_a_third_seed_where_two_differ_by_more_than_5_points(tmp_path):
    from advdefense.reproduction import run_plans

    run_plans(_seed_plans(), tmp_path, title="t", command="test", seed=0, n_eval=40)
    data = json.loads((tmp_path / "report.json").read_text())
    assert [s["key"] for s in data["sections"]] == ["d", "d_s1", "d_s2"]
    assert data["sections"][-1]["seed"] == 2 and (tmp_path / "d_s2" / "last.pt").exists()
    assert data["paired"]["groups"]["d"]["sufficient"]


# -- 8. one source of settings --------------------------------------------------------------

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("preset", ["mnist5k", "cifar10-jpeg"])
def test_the_committed_configs_are_the_preset(preset):
    from advdefense.config import load_config, to_dict
    from advdefense.presets import preset_configs

    folder = CONFIGS / preset
    wanted = preset_configs(preset)
    assert sorted(p.stem for p in folder.glob("*.yaml")) == sorted(wanted), (
        f"regenerate: advdefense reproduce --preset {preset} --write-configs configs/{preset}")
    for key, cfg in wanted.items():
        assert to_dict(load_config(folder / f"{key}.yaml")) == cfg, key


def test_write_configs_writes_what_train_reads(tmp_path, capsys):
    from advdefense.cli import main
    from advdefense.config import load_config, to_dict
    from advdefense.presets import build_plans

    assert main(["reproduce", "--preset", "mnist5k-quick", "--write-configs",
                 str(tmp_path)]) == 0
    (tmp_path / "stale.yaml").write_text("name: stale\n")
    assert main(["reproduce", "--preset", "mnist5k-quick", "--write-configs",
                 str(tmp_path)]) == 0
    assert not (tmp_path / "stale.yaml").exists()
    for plan in build_plans("mnist5k-quick"):
        cfg = copy.deepcopy(plan.config)
        cfg["output_dir"] = f"runs/reproduce_mnist5k-quick/{plan.key}"
        assert to_dict(load_config(tmp_path / f"{plan.key}.yaml")) == to_dict(
            config_from_dict(cfg))


# -- caching: an entry whose evaluation changed is evaluated again --------------------------

class _Described:
    """A stand-in evaluator with a description, like :class:`advdefense.presets.Evaluator`."""

    def __init__(self, version, legacy=False):
        self.version, self.legacy, self.calls = version, legacy, 0

    def describe(self, plan):
        return {"kind": "x", "version": self.version, "legacy": self.legacy}

    def __call__(self, model, x, y, plan):
        self.calls += 1
        return {"tables": [], "checks": []}


def test_a_changed_evaluation_is_evaluated_again_and_an_unchanged_one_is_reused(tmp_path):
    from advdefense.reproduction import evaluate_entry

    cfg = mnist5k_config("e", epochs=1, monitor_size=0, limit=20)
    cfg["model"]["kwargs"] = {"width": 4}
    first = _Described(1)
    evaluate_entry(Plan("e", "e", cfg, first), tmp_path, seed=0, n_eval=4)
    evaluate_entry(Plan("e", "e", cfg, first), tmp_path, seed=0, n_eval=4)
    assert first.calls == 1
    changed = _Described(2)
    evaluate_entry(Plan("e", "e", cfg, changed), tmp_path, seed=0, n_eval=4)
    assert changed.calls == 1
    # a section cached before evaluations were described: reused only where the evaluation
    # declares itself unchanged since
    cache = tmp_path / "e" / "evaluation.json"
    section = json.loads(cache.read_text())
    legacy = _Described(3, legacy=True)
    plan = Plan("e", "e", cfg, legacy)
    from advdefense.reproduction import _comparable, _digest

    section.pop("evaluation")
    section["digest"] = _digest({"config": _comparable(cfg), "n": 4, "curve": None,
                                 "epoch": 1, "extra": {}})
    cache.write_text(json.dumps(section))
    evaluate_entry(plan, tmp_path, seed=0, n_eval=4)
    assert legacy.calls == 0 and json.loads(cache.read_text())["evaluation"]["version"] == 3
    cache.write_text(json.dumps(section))
    strict = _Described(3)
    evaluate_entry(Plan("e", "e", cfg, strict), tmp_path, seed=0, n_eval=4)
    assert strict.calls == 1
