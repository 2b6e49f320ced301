"""Attack-failure checks: each one must fire on a broken evaluation and stay quiet on a sound
one (a test of each kind per check)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advdefense.attacks import PGD, TransferAttack
from advdefense.attacks.base import Attack
from advdefense.errors import AdvDefenseError
from advdefense.evaluation import AttackSpec, evaluate, format_checks, run_checks
from advdefense.evaluation.checks import (
    CHECK_NAMES,
    CheckSettings,
    IterationsSettings,
    MonotoneSettings,
)
from advdefense.evaluation.harness import EntryResult, EvalResult, RunRecord, TraceSummary
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


def by_name(checks):
    return {c.name: c for c in checks}


def only(*names, **kw) -> CheckSettings:
    """Settings that run just the named checks."""
    return CheckSettings(skip=tuple(n for n in CHECK_NAMES if n not in names), **kw)


def linear_task(n=24, d=16, seed=0):
    """A linear 3-class model and inputs it classifies with a margin."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, 3)).eval()
    x = torch.rand(n, d) * 0.6 + 0.2
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def result_of(entries: dict, n: int, stochastic=False) -> EvalResult:
    clean = EntryResult("clean", "clean", "-", Verdict.full(n))
    worst = clean.verdict
    for e in entries.values():
        worst = worst & e.verdict
    return EvalResult(n, stochastic, 1, clean, entries, worst, torch.zeros(n, dtype=torch.long))


def verdict_of(robust: list[bool]) -> Verdict:
    t = torch.tensor(robust)
    return Verdict(t, t.clone(), t.clone())


# -- randomness ------------------------------------------------------------------------------
def test_randomness_without_eot_fires_on_eot1_and_passes_with_eot():
    from .test_evaluation import InputNoise

    model, x, y = linear_task()
    noisy = nn.Sequential(InputNoise(0.2), model).eval()
    res = evaluate(noisy, (x, y), [AttackSpec("pgd", PGD(eps=0.1, steps=2))], repeats=3,
                   checks=only("randomness_without_eot"))
    c = by_name(res.checks)["randomness_without_eot"]
    assert c.passed is False and "EOT" in c.remedy
    res = evaluate(noisy, (x, y), [AttackSpec("pgd", PGD(eps=0.1, steps=2, eot_samples=4))],
                   repeats=3, checks=only("randomness_without_eot"))
    assert by_name(res.checks)["randomness_without_eot"].passed is True


def test_undeclared_randomness_is_wrapped_and_still_flagged_without_eot():
    model, x, y = linear_task()
    noisy = UndeclaredNoise(model).eval()
    res = evaluate(noisy, (x, y), [AttackSpec("fgsm", PGD(eps=0.1, steps=1))], repeats=4,
                   checks=only("randomness_without_eot"))
    assert res.stochastic and res.repeats == 4 and res.config["randomness"] == "undeclared"
    assert by_name(res.checks)["randomness_without_eot"].passed is False


# -- gradients -------------------------------------------------------------------------------
class NaNGrad(nn.Module):
    """Logits whose input gradient is NaN (the slope of sqrt at 0, times 0)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        extra = torch.sqrt(x.flatten(1) * 0).sum(1, keepdim=True)
        return self.model(x) + extra


def test_nonfinite_gradients_fire_and_pass():
    model, x, y = linear_task()
    settings = only("nonfinite_gradients")
    assert run_checks(NaNGrad(model), (x, y), None, settings)[0].passed is False
    assert run_checks(model, (x, y), None, settings)[0].passed is True


def test_zero_gradients_flag_a_single_example():
    model, x, y = linear_task()
    masked = nn.Sequential(Quantize(), model).eval()
    c = run_checks(masked, (x, y), None, only("zero_gradients"))[0]
    assert c.passed is False and f"{len(y)} of {len(y)}" in c.detail and "BPDA" in c.remedy
    assert run_checks(model, (x, y), None, only("zero_gradients"))[0].passed is True

    class OneFlat(nn.Module):  # zero gradient on the first example only
        def forward(self, inp):
            mask = torch.ones_like(inp)
            mask[0] = 0
            return model(inp * mask + inp.detach() * (1 - mask))

    c = run_checks(OneFlat(), (x, y), None, only("zero_gradients"))[0]
    assert c.passed is False and "1 of" in c.detail


# -- output range and dynamic models ---------------------------------------------------------
def test_output_range_fires_on_probabilities():
    model, x, y = linear_task()
    probs = nn.Sequential(model, nn.Softmax(dim=1)).eval()
    assert run_checks(probs, (x, y), None, only("output_range"))[0].passed is False
    assert run_checks(model, (x, y), None, only("output_range"))[0].passed is True


class Counter(nn.Module):
    """A model that changes at every call (a buffer counting forward passes)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.model(x)


def test_dynamic_model_fires_on_a_changing_model():
    model, x, y = linear_task()
    assert run_checks(Counter(model), (x, y), None, only("dynamic_model"))[0].passed is False
    assert run_checks(model, (x, y), None, only("dynamic_model"))[0].passed is True


class BatchStatistics(nn.Module):
    """Inputs normalised by their batch's statistics at test time (BatchNorm without running
    statistics): an example's logits depend on the rest of its batch."""

    def __init__(self, model, d=16):
        super().__init__()
        self.norm, self.model = nn.BatchNorm1d(d, track_running_stats=False), model

    def forward(self, x):
        return self.model(self.norm(x))


def test_batch_dependence_fires_on_batch_statistics_and_not_on_a_per_example_model():
    model, x, y = linear_task()
    dependent = BatchStatistics(model).eval()
    c = run_checks(dependent, (x, y), None, only("batch_dependence"))[0]
    assert c.passed is False and "other examples of its batch" in c.detail
    assert run_checks(model, (x, y), None, only("batch_dependence"))[0].passed is True
    # the same model with running statistics (a per-example eval-mode BatchNorm) passes
    tracked = nn.Sequential(nn.BatchNorm1d(16), model).eval()
    assert run_checks(tracked, (x, y), None, only("batch_dependence"))[0].passed is True
    # a random model is not judged (its calls differ anyway)
    noisy = UndeclaredNoise(model).eval()
    assert run_checks(noisy, (x, y), None, only("batch_dependence"))[0].passed is None


# -- probes ----------------------------------------------------------------------------------
def test_unbounded_attack_starts_from_x_and_fires_on_a_masked_model():
    """Quantized inputs have zero gradients: from the clean point the attack cannot move, so
    the check fires (a random start in the eps-1 ball would already be noise that fools it)."""
    model, x, y = linear_task()
    masked = nn.Sequential(Quantize(), model).eval()
    settings = only("unbounded_attack").with_(eps=0.3)
    c = run_checks(masked, (x, y), None, settings)[0]
    assert c.passed is False and "from the clean point" in c.detail
    assert run_checks(model, (x, y), None, settings)[0].passed is True


def test_eps_monotone_from_given_accuracies():
    model, x, y = linear_task()

    def run(acc):
        s = only("eps_monotone", monotone=MonotoneSettings(accuracies=tuple(acc.items())))
        return run_checks(model, (x, y), None, s.with_(eps=0.3))[0].passed

    assert run({0.1: 0.8, 0.2: 0.5, 0.3: 0.2}) is True
    assert run({0.1: 0.5, 0.2: 0.7, 0.3: 0.2}) is False   # rises
    assert run({0.1: 0.6, 0.2: 0.6, 0.3: 0.6}) is False   # flat


class FarIsRight(nn.Module):
    """Right (class 0) only on inputs far from the grey image: mean |x - 0.5| above
    ``t``. The rule has a zero gradient, so PGD stays at its random start, and the larger the
    eps, the farther that start and the higher the accuracy."""

    def __init__(self, t: float):
        super().__init__()
        self.t = t

    def forward(self, x):
        far = ((x - 0.5).abs().flatten(1).mean(1) > self.t).float()
        return 4 * torch.stack([far, 1 - far], 1) + 0 * x.flatten(1).sum(1, keepdim=True)


def test_eps_monotone_fires_from_its_own_probe_sweep():
    """No accuracies given: the check runs its PGD sweep (eps x 0.25, 0.5, 1, 2) and sees the
    accuracy rise with eps (random starts of mean distance eps/2 against a threshold 0.07)."""
    x, y = torch.full((16, 16), 0.5), torch.zeros(16, dtype=torch.long)
    settings = only("eps_monotone", monotone=MonotoneSettings(steps=2)).with_(eps=0.2)
    c = run_checks(FarIsRight(0.07).eval(), (x, y), None, settings)[0]
    assert c.passed is False and "rises between 0.1->0.2" in c.detail, c.detail
    model, x, y = linear_task()
    assert run_checks(model, (x, y), None, settings.with_(eps=0.3))[0].passed is True


class Threshold(nn.Module):
    """Class 1 when sum(x) exceeds ``threshold``, class 0 below: the inputs of
    :func:`threshold_task` all sum to d/2, so the label flips only when an attack raises the
    sum by ``margin`` eps."""

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = threshold

    def forward(self, x):
        s = x.flatten(1).sum(1)
        return torch.stack([torch.full_like(s, self.threshold), s], dim=1)


def threshold_task(n=32, d=16, eps=0.05, margin=12):
    """Inputs around 0.5 with zero-sum noise, label 0, and a :class:`Threshold` model whose
    label flips after a rise of ``margin`` eps in sum(x): PGD-2 of step eps/4 from a random
    start gets about 7 eps, PGD-10 reaches the corner (16 eps)."""
    torch.manual_seed(0)
    noise = torch.rand(n, d) * 0.4 - 0.2
    x = 0.5 + noise - noise.mean(1, keepdim=True)
    y = torch.zeros(n, dtype=torch.long)
    return Threshold(0.5 * d + margin * eps).eval(), x, y, eps


def test_more_iterations_fires_when_the_base_attack_is_too_short():
    """Without an evaluation the base PGD is judged: PGD-2 is not converged, PGD-10 is."""
    net, x, y, eps = threshold_task()
    s = only("more_iterations", iterations=IterationsSettings(steps=2, factor=5, restarts=1))
    c = run_checks(net, (x, y), None, s.with_(eps=eps, n_probe=32))[0]
    assert c.passed is False and "base attack not converged" in c.detail, c.detail
    s = only("more_iterations", iterations=IterationsSettings(steps=10, factor=2, restarts=1))
    assert run_checks(net, (x, y), None, s.with_(eps=eps, n_probe=32))[0].passed is True


class Tiring(nn.Module):
    """Fooled by a small rise of sum(x) for its first ``fresh_calls`` forward calls, then
    right on everything (a moving target: the longer attack meets the other model)."""

    def __init__(self, model: nn.Module, fresh_calls: int):
        super().__init__()
        self.model, self.fresh_calls, self.calls = model, fresh_calls, 0

    def forward(self, x):
        self.calls += 1
        out = self.model(x)
        if self.calls > self.fresh_calls:
            out = 0 * out + torch.tensor([10.0, 0.0])
        return out


def test_more_iterations_fires_when_the_stronger_attack_does_worse():
    """PGD-2 fools every example (a rise of 2 eps flips it); PGD-10's verdict meets a model
    that no longer is fooled: the stronger attack reports a higher accuracy."""
    net, x, y, eps = threshold_task(margin=2)
    s = only("more_iterations", iterations=IterationsSettings(steps=2, factor=5, restarts=1))
    c = run_checks(Tiring(net, fresh_calls=8).eval(), (x, y), None,
                   s.with_(eps=eps, n_probe=32))[0]
    assert c.passed is False and "stronger attack did worse" in c.detail, c.detail
    assert "PGD-2: 0.0%, PGD-10 x 1 restarts: 100.0%" in c.detail
    assert "unstable" in c.remedy


# -- checks on the evaluation's own results --------------------------------------------------
def test_blackbox_is_decided_by_the_attack_class_not_its_label():
    n = 4
    fooled = verdict_of([True, False, True, True])
    white = EntryResult("pgd/fresh", "pgd", "fresh", Verdict.full(n),
                        trace=TraceSummary(1, access="white-box"))
    black = EntryResult("rs/fresh", "my-random-search", "fresh", fooled,
                        trace=TraceSummary(1, access="gradient-free"))
    settings = only("blackbox_beats_whitebox")
    model, x, y = linear_task()
    r = result_of({"pgd/fresh": white, "rs/fresh": black}, n)
    assert run_checks(model, (x, y), r, settings)[0].passed is False
    # a white-box attack that happens to be called "square" is not a black box
    misnamed = EntryResult("square/fresh", "square", "fresh", fooled,
                           trace=TraceSummary(1, access="white-box"))
    r = result_of({"pgd/fresh": white, "square/fresh": misnamed}, n)
    assert run_checks(model, (x, y), r, settings)[0].passed is None
    r = result_of({"pgd/fresh": white, "rs/fresh": EntryResult(
        "rs/fresh", "rs", "fresh", Verdict.full(n), trace=TraceSummary(1, access="gradient-free"))},
        n)
    assert run_checks(model, (x, y), r, settings)[0].passed is True


class SilentAttack(Attack):
    """Finds the adversarial point and then returns the clean input."""

    name = "silent"

    def __init__(self, *, eps: float, norm: str = "linf", eot_samples: int = 1,
                 max_batch: int = 4096, seed: int | None = None, restarts: int = 1,
                 targeted: bool = False) -> None:
        super().__init__(eps=eps, norm=norm, eot_samples=eot_samples, max_batch=max_batch,
                         seed=seed, restarts=restarts, targeted=targeted)

    def run(self, model, x, y, target, recorder):
        x_adv = PGD(eps=self.eps, steps=10)(model, x, y)
        with torch.no_grad():
            recorder.saw(None, model(x_adv).argmax(1) != y)
        return x.clone()


def test_silent_success_fires_on_a_lost_adversarial_point():
    model, x, y = linear_task()
    settings = only("silent_success")
    res = evaluate(model, (x, y), [AttackSpec("silent", SilentAttack(eps=0.5))], checks=settings)
    c = by_name(res.checks)["silent_success"]
    assert c.passed is False and "silent/fresh on" in c.detail
    res = evaluate(model, (x, y), [AttackSpec("pgd", PGD(eps=0.5, steps=10))], checks=settings)
    assert by_name(res.checks)["silent_success"].passed is True


def test_transfer_failure_fires_when_the_substitute_is_another_model():
    model, x, y = linear_task(seed=0)
    other, _, _ = linear_task(seed=1)
    settings = only("transfer_failure")
    bad = TransferAttack(substitute=other, attack=PGD(eps=0.5, steps=10))
    res = evaluate(model, (x, y), [AttackSpec("transfer", bad)], checks=settings)
    c = by_name(res.checks)["transfer_failure"]
    own = TransferAttack(substitute=model, attack=PGD(eps=0.5, steps=10))
    res_own = evaluate(model, (x, y), [AttackSpec("transfer", own)], checks=settings)
    assert by_name(res_own.checks)["transfer_failure"].passed is True
    fooled_sub = int(res.entries["transfer/fresh"].trace.substitute_adversarial.sum())
    assert fooled_sub >= 5
    if c.passed is not False:  # the other model's points must mostly fail on the target
        pytest.fail(c.detail)


def test_convergence_judges_each_ragged_run_on_its_own_tail():
    steps = torch.arange(1, 41, dtype=torch.float32)
    flat = torch.ones(40, 4)
    flat[:20] = torch.linspace(0, 1, 20)[:, None]
    rising = steps[:30, None].repeat(1, 2)      # a restart on 2 examples, still climbing
    returned = torch.zeros(4, dtype=torch.bool)
    model, x, y = linear_task()
    settings = only("loss_not_converged")

    def judge(runs):
        t = TraceSummary(1, 40, runs=runs, returned_adversarial=returned)
        r = result_of({"a/fresh": EntryResult("a/fresh", "a", "fresh", Verdict.full(4),
                                              trace=t)}, 4)
        return run_checks(model, (x, y), r, settings)[0]

    assert judge([RunRecord(torch.arange(4), flat)]).passed is True
    c = judge([RunRecord(torch.arange(4), flat), RunRecord(torch.tensor([1, 3]), rising)])
    assert c.passed is False and "1 of 2 runs" in c.detail
    assert judge([RunRecord(torch.arange(4), flat[:5])]).passed is None
    # attacks that minimize a distance (FAB) are not judged
    t = TraceSummary(1, 40, maximizes_loss=False,
                     runs=[RunRecord(torch.arange(4), flat * steps[:, None])],
                     returned_adversarial=returned)
    r = result_of({"f/fresh": EntryResult("f/fresh", "fab", "fresh", Verdict.full(4),
                                          trace=t)}, 4)
    assert run_checks(model, (x, y), r, settings)[0].passed is None


def test_restarts_not_converging_fires_when_the_last_restart_still_finds_points():
    model, x, y = linear_task()
    settings = only("restarts_not_converging")

    def judge(new):
        t = TraceSummary(1, 10, restarts=3, new_in_last_run=new)
        r = result_of({"a/fresh": EntryResult("a/fresh", "a", "fresh", Verdict.full(4),
                                              trace=t)}, 4)
        return run_checks(model, (x, y), r, settings)[0].passed

    assert judge(2) is False and judge(0) is True
    # a real PGD with restarts reports how many points its last restart found: at eps 0.5
    # the first restart already fools every example, so the last one finds nothing new
    res = evaluate(model, (x, y), [AttackSpec("pgd", PGD(eps=0.5, steps=5, restarts=3))],
                   checks=settings)
    assert res.accuracy("pgd/fresh").correct == 0
    assert res.entries["pgd/fresh"].trace.new_in_last_run == 0
    assert by_name(res.checks)["restarts_not_converging"].passed is True


# -- settings --------------------------------------------------------------------------------
def test_settings_are_typed_and_skip_runs_nothing(monkeypatch):
    from advdefense.evaluation import checks as checks_module

    with pytest.raises(AdvDefenseError, match="unknown check"):
        CheckSettings(skip=("no_such_check",))
    model, x, y = linear_task()
    called = []
    monkeypatch.setattr(checks_module, "CHECKS", tuple(
        (name, (lambda ctx, name=name: called.append(name) or checks_module.CheckResult(
            name, True, "ok")), needs, probes)
        for name, _, needs, probes in checks_module.CHECKS))
    out = run_checks(model, (x, y), None, CheckSettings(skip=("unbounded_attack",),
                                                        probes=False))
    assert "unbounded_attack" not in called and "eps_monotone" not in called
    assert [c.name for c in out] == called and "zero_gradients" in called


def test_every_check_runs_on_a_real_evaluation(standard_model, mnist_test):
    x, y = mnist_test[0][:16], mnist_test[1][:16]
    specs = [AttackSpec("pgd", PGD(eps=0.3, steps=10, seed=0))]
    settings = CheckSettings(n_probe=16).with_(
        unbounded=CheckSettings().unbounded.__class__(steps=20),
        monotone=MonotoneSettings(steps=3))
    res = evaluate(standard_model, (x, y), specs, checks=settings)
    checks = by_name(res.checks)
    for name in ("nonfinite_gradients", "unbounded_attack", "randomness_without_eot",
                 "silent_success", "output_range", "dynamic_model"):
        assert checks[name].passed is True, format_checks(res.checks)
    assert set(checks) == set(CHECK_NAMES) - {"transfer_failure"} or set(checks) == set(
        CHECK_NAMES)
    for c in res.checks:
        assert c.passed in (True, False, None) and c.detail


def test_a_failed_check_marks_the_evaluation_report_an_upper_bound():
    from advdefense.evaluation.report import robustbench_fields, to_json, to_markdown

    model, x, y = linear_task()
    specs = [AttackSpec("pgd", PGD(eps=0.05, steps=3, seed=0))]
    settings = only("batch_dependence", "output_range")
    flagged = evaluate(BatchStatistics(model).eval(), (x, y), specs, checks=settings)
    sound = evaluate(model, (x, y), specs, checks=settings)
    text = to_markdown(flagged)
    assert "**Upper bound:**" in text and "batch_dependence" in text.split("Upper bound")[1]
    assert to_json(flagged)["upper_bound"] is True
    rb = robustbench_fields(flagged, dataset="toy", eps=0.05, norm="linf")
    assert rb["upper_bound"] is True and rb["failed_checks"] == ["batch_dependence"]
    assert "Upper bound" not in to_markdown(sound) and to_json(sound)["upper_bound"] is False
