"""The ``fast`` and ``rand-fast`` suites: the standard suite's decisions at a fraction of its
passes, early-stopping APGD, and escalation to the reference suite on a warning sign."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advdefense.attacks import APGD, APGDT
from advdefense.commands.evaluate import SUITE_NAMES
from advdefense.evaluation.suite import (
    ESCALATING_CHECKS,
    SUITES,
    escalation_plan,
    run_suite,
    suite_plan,
)
from advdefense.evaluation.units import merge_results


def total_passes(result) -> int:
    return sum(e.passes["forward"] + e.passes["backward"] for e in result.entries.values())


def test_early_stopping_apgd_returns_the_full_runs_verdicts_with_fewer_passes(
        standard_model, mnist_test, one_thread):
    x, y = mnist_test[0][:24], mnist_test[1][:24]
    for attack in (APGD, APGDT):
        kw = {"n_target_classes": 3} if attack is APGDT else {}
        full, quick = attack(eps=0.1, seed=0, **kw), attack(eps=0.1, seed=0, early_stop=True,
                                                             **kw)
        x_full, x_quick = full(standard_model, x, y), quick(standard_model, x, y)
        with torch.no_grad():
            robust_full = standard_model(x_full).argmax(1) == y
            robust_quick = standard_model(x_quick).argmax(1) == y
        assert torch.equal(robust_full, robust_quick)
        assert not robust_full.all() and robust_full.any()  # both kinds of example present
        # APGD-T's later targets already skip the examples misclassified: it saves less
        share = 0.7 if attack is APGD else 0.95
        assert quick.trace.forward_rows < share * full.trace.forward_rows
        assert quick.trace.backward_rows < share * full.trace.backward_rows


def test_early_stopping_is_off_on_a_random_model(standard_model, mnist_test, one_thread):
    from .test_evaluation import InputNoise

    model = nn.Sequential(InputNoise(0.2), standard_model).eval()
    x, y = mnist_test[0][:16], mnist_test[1][:16]
    full = APGD(eps=0.15, seed=0, n_iter=10, eot_samples=2)
    quick = APGD(eps=0.15, seed=0, n_iter=10, eot_samples=2, early_stop=True)
    full(model, x, y)
    quick(model, x, y)
    assert quick.trace.forward_rows == full.trace.forward_rows


def test_fast_plans_and_their_escalations():
    assert set(SUITE_NAMES) == set(SUITES)  # the command line offers every suite
    fast = suite_plan("fast", eps=0.3, stochastic=False)
    assert [name for _, name, _ in fast] == ["apgd-ce", "apgd-t", "square"]
    assert fast[1][2]["n_target_classes"] == 3 and fast[2][2]["n_queries"] == 1000
    assert all(kw.get("early_stop") for _, name, kw in fast if name.startswith("apgd"))
    # on a random model, fast is rand-fast: EOT on every live stage, the frozen transfer
    assert suite_plan("fast", eps=0.3, stochastic=True) == suite_plan("rand-fast", eps=0.3)
    rand_fast = suite_plan("rand-fast", eps=0.3)
    assert all(kw["eot_samples"] >= 2 for _, _, kw in rand_fast if "protocol" not in kw)
    assert any(kw.get("protocol") == "paper" for _, _, kw in rand_fast)
    # escalation: the rest of the reference suite, never a stage already run
    up = escalation_plan("fast", eps=0.3, stochastic=False)
    assert [name for _, name, _ in up] == ["apgd-t", "fab-t", "square"]
    assert up[0][2]["n_target_classes"] == 9 and up[2][2]["n_queries"] == 5000
    up_rand = escalation_plan("rand-fast", eps=0.3, eot_samples=20)
    assert [kw["eot_samples"] for _, _, kw in up_rand] == [20, 20, 20]
    for suite, stochastic in (("fast", False), ("rand-fast", True)):
        labels = [lab for lab, *_ in suite_plan(suite, eps=0.3, stochastic=stochastic)]
        labels += [lab for lab, *_ in escalation_plan(suite, eps=0.3, stochastic=stochastic)]
        assert len(labels) == len(set(labels))
    assert escalation_plan("standard", eps=0.3) == []


def test_fast_suite_matches_standard_per_example_at_a_third_of_its_passes(
        standard_model, mnist_test, one_thread):
    """Pins the fast suite's decisions on a small CNN at a radius that leaves some examples
    robust: every example it leaves robust is robust under the standard suite too, and with
    no warning sign it does not escalate."""
    x, y = mnist_test[0][:12], mnist_test[1][:12]
    kw = dict(eps=0.15, seed=0, batch_size=12)
    fast = run_suite(standard_model, (x, y), suite="fast", **kw)
    standard = run_suite(standard_model, (x, y), suite="standard", checks=False, **kw)
    assert list(fast.entries) == ["apgd-ce", "apgd-t/3", "square/1000"]
    assert fast.config["escalation"]["escalated"] is False
    assert fast.checks and not any(c.passed is False and c.name in ESCALATING_CHECKS
                                   for c in fast.checks)
    assert torch.equal(fast.worst.all, standard.worst.all)
    assert 0 < int(fast.worst.all.sum()) < int(fast.clean.verdict.all.sum())
    assert total_passes(fast) < total_passes(standard) / 3


class Quantized(nn.Module):
    """Input rounded to 2 levels before the network: zero input gradients (masking), while
    a score-based attack still finds the flips."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(torch.round(x))


@pytest.fixture(scope="module")
def masked_fast(standard_model, mnist_test):
    """The fast suite on examples 5..9 of a model with masked gradients."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    x, y = mnist_test[0][5:10], mnist_test[1][5:10]
    res = run_suite(Quantized(standard_model).eval(), (x, y), suite="fast", eps=0.3, seed=0,
                    checks=False, index_offset=5)
    torch.set_num_threads(threads)
    return res


def test_fast_suite_escalates_on_masked_gradients(masked_fast):
    res = masked_fast
    esc = res.config["escalation"]
    assert esc["escalated"], esc
    assert any("square/1000 broke" in r for r in esc["reasons"])
    assert list(res.entries) == ["apgd-ce", "apgd-t/3", "square/1000", "apgd-t", "fab-t",
                                 "square"]
    assert res.entries["square"].ran.any()  # the reference Square ran on the survivors
    # the gradient stages broke nothing: what fell, fell to the black box
    assert torch.equal(res.entries["apgd-ce"].cumulative.all, res.clean.verdict.all)


def test_units_merge_when_only_some_escalated(standard_model, mnist_test, masked_fast,
                                              one_thread):
    """A unit without a warning sign stops before the escalation stages; merged with one
    that escalated, its examples keep their verdicts in those stages."""
    x, y = mnist_test[0][:5], mnist_test[1][:5]
    calm = run_suite(standard_model, (x, y), suite="fast", eps=0.06, seed=0, checks=False)
    assert not calm.config["escalation"]["escalated"]
    merged = merge_results([(5, masked_fast), (0, calm)])
    assert list(merged.entries) == list(masked_fast.entries)
    assert merged.config["escalation"]["units_escalated"] == 1
    assert not merged.entries["fab-t"].ran[:5].any()
    assert torch.equal(merged.worst.all, torch.cat([calm.worst.all, masked_fast.worst.all]))


def test_report_says_the_suite_escalated_and_names_each_stage(masked_fast):
    from advdefense.evaluation.report import to_markdown

    md = to_markdown(masked_fast)
    assert "Escalated to the reference suite's apgd-t, fab-t, square (square/1000 broke" in md
    for label in ("apgd-t/3", "square/1000", "apgd-t", "fab-t", "square"):
        assert f"| {label} | fresh |" in md


def _stage(label: str, all_: list[bool], majority: list[bool], *, protocol: str = "fresh",
           access: str = "white-box"):
    from types import SimpleNamespace

    from advdefense.evaluation.protocols import Verdict
    from advdefense.evaluation.results import EntryResult

    v = Verdict(torch.tensor(all_), torch.tensor(majority), torch.tensor(majority))
    return EntryResult(label, label, protocol, v, trace=SimpleNamespace(access=access))


def _result(*entries):
    from advdefense.evaluation.protocols import Verdict
    from advdefense.evaluation.results import EvalResult

    n = entries[0].verdict.all.numel()
    clean = _stage("clean", [True] * n, [True] * n)
    return EvalResult(n, True, 10, clean, {e.label: e for e in entries}, Verdict.full(n),
                      torch.zeros(n, dtype=torch.long))


def test_escalation_ignores_boundary_flips_and_scales_with_its_sign():
    """Point 0 sits at the boundary: the EOT gradient stage already got one of its repeated
    predictions wrong (majority still right), so a later stage flipping its majority is
    chance, not a sign. Point 1 stayed right on every repeat of the gradient stage: a
    transfer breaking it asks for the reference's EOT gradient stages, a gradient-free
    stage breaking it for the whole escalation (its Square too)."""
    from advdefense.evaluation.suite import escalation_signs, escalation_stages

    grad = _stage("apgd-ce+eot4", [False, True, True], [True, True, True])
    boundary = _stage("apgd-ce@frozen", [False, True, True], [False, True, True],
                      protocol="paper")
    assert escalation_signs(_result(grad, boundary)) == ([], False)
    transfer = _stage("apgd-ce@frozen", [False, False, True], [False, False, True],
                      protocol="paper")
    reasons, blackbox = escalation_signs(_result(grad, transfer))
    assert reasons == ["apgd-ce@frozen broke 1 points the EOT gradient stages missed"]
    assert blackbox is False
    square = _stage("square+eot2/250", [True, False, True], [True, False, True],
                    access="gradient-free")
    reasons, blackbox = escalation_signs(_result(grad, square))
    assert reasons == ["square+eot2/250 broke 1 points the gradient stages missed"]
    assert blackbox is True

    up = escalation_plan("rand-fast", eps=0.3, eot_samples=20)
    assert [lab for lab, *_ in escalation_stages(up, False)] == ["apgd-ce+eot", "apgd-dlr+eot"]
    assert escalation_stages(up, True) == up
    det = escalation_plan("fast", eps=0.3, stochastic=False)
    assert [lab for lab, *_ in escalation_stages(det, False)] == ["apgd-t", "fab-t"]
