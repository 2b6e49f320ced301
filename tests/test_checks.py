"""Attack-failure checks: they must fire on broken evaluations and stay quiet on sound ones."""

from __future__ import annotations

import torch
from torch import nn

from advdefense.attacks import PGD
from advdefense.evaluation import AttackSpec, evaluate, format_checks, run_checks
from advdefense.evaluation.checks import (
    CHECK_NAMES,
    check_convergence,
    check_eps_monotone,
    check_silent_success,
)
from advdefense.evaluation.harness import EntryResult, EvalResult, TraceSummary
from advdefense.evaluation.protocols import Verdict


class Quantize(nn.Module):
    """x -> round(4x)/4: piecewise constant, so every input gradient is exactly zero."""

    def forward(self, x):
        return torch.round(x * 4) / 4


class UndeclaredNoise(nn.Module):
    """Random input noise drawn with torch.randn, NOT declared through advdefense.randomness."""

    def __init__(self, model, sigma=0.3):
        super().__init__()
        self.model, self.sigma = model, sigma

    def forward(self, x):
        return self.model((x + self.sigma * torch.randn_like(x)).clamp(0, 1))


CHEAP = ("eps_monotone", "more_iterations")  # probes covered by their own tests below


def by_name(checks):
    return {c.name: c for c in checks}


def test_masked_model_trips_gradient_and_unbounded_checks(standard_model, mnist_test):
    x, y = mnist_test[0][:32], mnist_test[1][:32]
    masked = nn.Sequential(Quantize(), standard_model).eval()
    specs = [AttackSpec("pgd", PGD(eps=0.3, steps=10, seed=0))]
    res = evaluate(masked, (x, y), specs, checks=True,
                   check_options={"n_probe": 32, "unbounded_steps": 30, "skip": CHEAP})
    checks = by_name(res.checks)
    assert checks["zero_gradients"].passed is False, format_checks(res.checks)
    assert "BPDA" in checks["zero_gradients"].remedy
    assert checks["unbounded_attack"].passed is False, format_checks(res.checks)
    assert checks["randomness_without_eot"].passed is True


def test_clean_model_passes_gradient_and_unbounded_checks(standard_model, mnist_test):
    x, y = mnist_test[0][:32], mnist_test[1][:32]
    specs = [AttackSpec("pgd", PGD(eps=0.3, steps=10, seed=0))]
    res = evaluate(standard_model, (x, y), specs, checks=True,
                   check_options={"n_probe": 32, "unbounded_steps": 30, "skip": CHEAP})
    checks = by_name(res.checks)
    for name in ("zero_gradients", "nonfinite_gradients", "unbounded_attack",
                 "randomness_without_eot", "silent_success"):
        assert checks[name].passed is True, format_checks(res.checks)
    assert set(checks) == set(CHECK_NAMES) - set(CHEAP)
    for c in res.checks:
        assert c.passed in (True, False, None) and c.detail


def test_randomness_without_eot_is_detected(standard_model, mnist_test):
    x, y = mnist_test[0][:16], mnist_test[1][:16]
    noisy = UndeclaredNoise(standard_model).eval()
    res = evaluate(noisy, (x, y), [AttackSpec("fgsm", PGD(eps=0.1, steps=1))], checks=False)
    c = by_name(run_checks(noisy, (x, y), res, probes=False))["randomness_without_eot"]
    assert c.passed is False and "EOT" in c.remedy


def test_declared_randomness_with_eot1_fails_and_with_eot_passes(mnist_test, standard_model):
    from .test_evaluation import InputNoise

    x, y = mnist_test[0][:16], mnist_test[1][:16]
    model = nn.Sequential(InputNoise(0.2), standard_model).eval()
    res = evaluate(model, (x, y), [AttackSpec("pgd", PGD(eps=0.1, steps=2))], repeats=3,
                   checks=False)
    assert by_name(run_checks(model, (x, y), res, probes=False))[
        "randomness_without_eot"].passed is False
    res = evaluate(model, (x, y), [AttackSpec("pgd", PGD(eps=0.1, steps=2, eot_samples=4))],
                   repeats=3, checks=False)
    assert by_name(run_checks(model, (x, y), res, probes=False))[
        "randomness_without_eot"].passed is True


def _result_with_trace(trace, verdict=None, name="pgd", protocol="fresh"):
    n = trace.losses.shape[1] if trace.losses is not None else len(trace.ever_adversarial)
    v = verdict or Verdict.full(n)
    entry = EntryResult(f"{name}/{protocol}", name, protocol, v, trace=trace)
    return EvalResult(n, False, 1, EntryResult("clean", "clean", "-", Verdict.full(n)),
                      {entry.label: entry}, v, torch.zeros(n, dtype=torch.long))


def test_silent_success_check():
    t = TraceSummary(1, ever_adversarial=torch.tensor([True, False, True]),
                     returned_adversarial=torch.tensor([True, False, False]))
    assert check_silent_success(_result_with_trace(t)).passed is False
    t.returned_adversarial = torch.tensor([True, False, True])
    assert check_silent_success(_result_with_trace(t)).passed is True


def test_convergence_check_uses_last_ten_percent():
    steps = torch.arange(1, 41, dtype=torch.float32)
    rising = torch.stack([steps, steps]).t()        # loss still growing linearly
    flat = torch.ones(40, 2)
    flat[:20] = torch.linspace(0, 1, 20)[:, None]   # converged after step 20
    no_adv = torch.tensor([False, False])
    r = _result_with_trace(TraceSummary(1, 40, losses=rising, returned_adversarial=no_adv))
    assert check_convergence(r).passed is False
    r = _result_with_trace(TraceSummary(1, 40, losses=flat, returned_adversarial=no_adv))
    assert check_convergence(r).passed is True
    r = _result_with_trace(TraceSummary(1, 5, losses=rising[:5], returned_adversarial=no_adv))
    assert check_convergence(r).passed is None


def test_eps_monotone_from_given_accuracies(standard_model):
    x = torch.zeros(1, 1, 28, 28)
    y = torch.zeros(1, dtype=torch.long)
    kw = dict(eps=0.3, accuracies=None)
    kw["accuracies"] = {0.1: 0.8, 0.2: 0.5, 0.3: 0.2}
    assert check_eps_monotone(standard_model, x, y, **kw).passed is True
    kw["accuracies"] = {0.1: 0.5, 0.2: 0.7, 0.3: 0.2}
    assert check_eps_monotone(standard_model, x, y, **kw).passed is False
    kw["accuracies"] = {0.1: 0.6, 0.2: 0.6, 0.3: 0.6}
    assert check_eps_monotone(standard_model, x, y, **kw).passed is False


def test_blackbox_beats_whitebox_via_paper_protocol():
    from advdefense.evaluation.checks import check_blackbox

    n = 4
    clean = EntryResult("clean", "clean", "-", Verdict.full(n))
    white = EntryResult("pgd/fresh", "pgd", "fresh", Verdict.full(n))
    fooled = Verdict(torch.tensor([True, False, True, True]), torch.ones(n, dtype=torch.bool),
                     torch.ones(n, dtype=torch.bool))
    black = EntryResult("square/fresh", "square", "fresh", fooled)
    r = EvalResult(n, False, 1, clean, {"pgd/fresh": white, "square/fresh": black},
                   fooled, torch.zeros(n, dtype=torch.long))
    assert check_blackbox(r).passed is False
    r.entries["square/fresh"] = EntryResult("square/fresh", "square", "fresh", Verdict.full(n))
    assert check_blackbox(r).passed is True
    del r.entries["square/fresh"]
    assert check_blackbox(r).passed is None


def test_more_iterations_and_sweep_probes_run_on_real_model(standard_model, mnist_test):
    from advdefense.evaluation.checks import check_more_iterations

    x, y = mnist_test[0][:32], mnist_test[1][:32]
    c = check_eps_monotone(standard_model, x, y, eps=0.3, steps=5)
    assert c.passed is True, c.detail  # a standard model loses accuracy as eps grows
    c = check_more_iterations(standard_model, x, y, eps=0.1, steps=3, iterations_factor=2,
                              iterations_restarts=1)
    assert c.passed in (True, False) and "PGD-3" in c.detail
