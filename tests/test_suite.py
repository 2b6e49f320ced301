"""AutoAttack-style cascade: exact worst case, resumable state, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from advdefense.attacks import ATTACKS, FGSM, PGD
from advdefense.errors import AdvDefenseError
from advdefense.evaluation import AttackSpec, evaluate
from advdefense.evaluation.suite import run_suite, suite_plan


def det_attacks(eps=0.15):
    """Attacks whose result per example does not depend on the rest of the batch."""
    return [("fgsm", FGSM(eps=eps)),
            ("pgd", PGD(eps=eps, steps=5, random_start=False)),
            ("pgd-margin", PGD(eps=eps, steps=5, random_start=False, loss="margin"))]


def test_cascade_worst_case_equals_and_of_separate_runs(standard_model, mnist_test):
    x, y = mnist_test[0][:150], mnist_test[1][:150]
    res = run_suite(standard_model, (x, y), eps=0.15, attacks=det_attacks(), checks=False,
                    batch_size=64)
    sep = evaluate(standard_model, (x, y), [AttackSpec(n, a) for n, a in det_attacks()],
                   checks=False, batch_size=64)
    assert torch.equal(res.worst.all, sep.worst.all)
    # later attacks ran only on points still robust
    ran = [e.ran.sum().item() for e in res.entries.values()]
    assert ran[0] == int(sep.clean.verdict.all.sum())
    assert ran[0] >= ran[1] >= ran[2]
    cum = [e.cumulative.all.float().mean().item() for e in res.entries.values()]
    assert cum == sorted(cum, reverse=True)
    assert res.accuracy("worst").value < res.accuracy("clean").value


class FlakyPGD(PGD):
    """Raises on its first call (an interrupted run), works afterwards."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls = 0

    def __call__(self, *args, **kw):
        self.calls += 1
        if self.calls == 1:
            raise KeyboardInterrupt
        return super().__call__(*args, **kw)


class CountingFGSM(FGSM):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls = 0

    def __call__(self, *args, **kw):
        self.calls += 1
        return super().__call__(*args, **kw)


def test_state_file_resumes_to_the_uninterrupted_result(standard_model, mnist_test, tmp_path):
    x, y = mnist_test[0][:80], mnist_test[1][:80]
    kw = dict(eps=0.15, seed=3, checks=False, batch_size=40)
    first = CountingFGSM(eps=0.15, random_start=True, seed=1)
    flaky = FlakyPGD(eps=0.15, steps=5, seed=2)
    state = tmp_path / "state.json"
    with pytest.raises(KeyboardInterrupt):
        run_suite(standard_model, (x, y), attacks=[("fgsm", first), ("pgd", flaky)],
                  state_path=state, **kw)
    saved = json.loads(state.read_text())
    assert list(saved["entries"]) == ["fgsm"]
    calls_before = first.calls
    resumed = run_suite(standard_model, (x, y), attacks=[("fgsm", first), ("pgd", flaky)],
                        state_path=state, **kw)
    assert first.calls == calls_before  # the finished attack was skipped
    assert list(json.loads(state.read_text())["entries"]) == ["fgsm", "pgd"]
    full = run_suite(standard_model, (x, y),
                     attacks=[("fgsm", FGSM(eps=0.15, random_start=True, seed=1)),
                              ("pgd", PGD(eps=0.15, steps=5, seed=2))], **kw)
    for label in ("fgsm", "pgd"):
        assert torch.equal(resumed.entries[label].verdict.all, full.entries[label].verdict.all)
        assert torch.equal(resumed.entries[label].ran, full.entries[label].ran)
    assert torch.equal(resumed.worst.all, full.worst.all)
    # a state from another run is refused with one line
    with pytest.raises(AdvDefenseError, match="different run"):
        run_suite(standard_model, (x, y), attacks=[("fgsm", FGSM(eps=0.2))], state_path=state,
                  eps=0.2, checks=False)


def test_state_file_of_another_model_is_refused(standard_model, mnist_test, tmp_path):
    """The fingerprint covers the weights: a state written for one model never resumes
    another (same architecture, same data, same settings)."""
    import copy

    x, y = mnist_test[0][:20], mnist_test[1][:20]
    state = tmp_path / "state.json"
    kw = dict(eps=0.15, checks=False, state_path=state,
              attacks=[("fgsm", FGSM(eps=0.15))])
    run_suite(standard_model, (x, y), **kw)
    other = copy.deepcopy(standard_model)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    with pytest.raises(AdvDefenseError, match="another model"):
        run_suite(other, (x, y), **kw)
    run_suite(standard_model, (x, y), **kw)  # the same model resumes


def test_missing_attack_is_a_clear_error(standard_model, mnist_test, monkeypatch):
    monkeypatch.delitem(ATTACKS, "square", raising=False)
    with pytest.raises(AdvDefenseError, match="square.*not registered"):
        run_suite(standard_model, (mnist_test[0][:4], mnist_test[1][:4]), eps=0.3,
                  suite="standard", checks=False)
    with pytest.raises(AdvDefenseError, match="unknown suite"):
        run_suite(standard_model, (mnist_test[0][:4], mnist_test[1][:4]), eps=0.3,
                  suite="plus", checks=False)


def test_suite_plans_follow_autoattack_settings():
    std = suite_plan("standard", eps=0.3)
    assert [name for _, name, _ in std] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert std[1][2]["n_target_classes"] == 9 and std[3][2]["n_queries"] == 5000
    rand = suite_plan("rand", eps=0.3, eot_samples=20)
    assert [name for _, name, _ in rand] == ["apgd-ce", "apgd-dlr", "square", "apgd-ce"]
    assert all(kw["eot_samples"] == 20 for _, _, kw in rand[:3])
    assert rand[3][2]["protocol"] == "paper"  # the transfer from one frozen draw
    assert all("protocol" not in kw for _, _, kw in suite_plan("rand", eps=0.3,
                                                                stochastic=False))
    full = suite_plan("full", eps=0.3, stochastic=True)
    assert len(full) == len(std) + len(rand) + 2
    det = suite_plan("full", eps=0.3, stochastic=False)
    assert [lab for lab, _, _ in det].count("apgd-ce+eot") == 0  # duplicate of apgd-ce
    assert suite_plan("standard", eps=0.3, n_classes=4)[1][2]["n_target_classes"] == 3


def test_stochastic_cascade_keeps_all_below_majority(standard_model, mnist_test):
    from .test_evaluation import InputNoise

    x, y = mnist_test[0][:40], mnist_test[1][:40]
    model = nn.Sequential(InputNoise(0.3), standard_model).eval()
    res = run_suite(model, (x, y), eps=0.1, repeats=5, checks=False,
                    attacks=[("pgd", PGD(eps=0.1, steps=3, eot_samples=3, seed=0))])
    assert res.stochastic and res.repeats == 5
    assert not (res.worst.all & ~res.worst.majority).any()
    assert not (res.worst.all & ~res.worst.single).any()


def test_standard_suite_runs_with_registered_attacks(standard_model, mnist_test):
    x, y = mnist_test[0][:10], mnist_test[1][:10]
    res = run_suite(standard_model, (x, y), eps=0.3, suite="standard", checks=False)
    assert list(res.entries) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert res.entries["apgd-ce"].ran.sum() == res.clean.verdict.all.sum()
    # eps 0.3 breaks a standard mnist model: APGD-CE leaves little for the later attacks
    assert res.accuracy("worst").value <= 0.2


class FailsOnCall(PGD):
    """Raises on call number ``fail_at`` (an interruption inside an attack)."""

    def __init__(self, fail_at, **kw):
        super().__init__(**kw)
        self.calls, self.fail_at = 0, fail_at

    def __call__(self, *args, **kw):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        return super().__call__(*args, **kw)


def test_suite_resumes_inside_an_attack_batch_by_batch(standard_model, mnist_test, tmp_path):
    x, y = mnist_test[0][:60], mnist_test[1][:60]
    kw = dict(eps=0.15, seed=3, checks=False, batch_size=20)
    state = tmp_path / "state.json"
    flaky = FailsOnCall(3, eps=0.15, steps=3, seed=2)
    with pytest.raises(KeyboardInterrupt):
        run_suite(standard_model, (x, y), attacks=[("pgd", flaky)], state_path=state, **kw)
    saved = json.loads(state.read_text())
    assert list(saved["partial"]["pgd"]) and len(saved["partial"]["pgd"]) == 2
    resumed = run_suite(standard_model, (x, y), attacks=[("pgd", flaky)], state_path=state,
                        **kw)
    assert flaky.calls == 4  # two batches were done, the third ran on resume (call 4)
    assert json.loads(state.read_text())["partial"] == {}
    full = run_suite(standard_model, (x, y),
                     attacks=[("pgd", FailsOnCall(0, eps=0.15, steps=3, seed=2))], **kw)
    assert torch.equal(resumed.worst.all, full.worst.all)


def test_evaluate_resumes_batch_by_batch(standard_model, mnist_test, tmp_path):
    """``evaluate(state_path=...)`` keeps every finished batch; an interrupted run resumed
    from it gives the uninterrupted result and recomputes only the missing batches."""
    x, y = mnist_test[0][:60], mnist_test[1][:60]
    state = tmp_path / "eval_state.json"
    flaky = FailsOnCall(3, eps=0.15, steps=3, seed=2)
    specs = [AttackSpec("pgd", flaky)]
    with pytest.raises(KeyboardInterrupt):
        evaluate(standard_model, (x, y), specs, batch_size=20, checks=None, state_path=state)
    resumed = evaluate(standard_model, (x, y), specs, batch_size=20, checks=None,
                       state_path=state)
    assert flaky.calls == 4  # batches 1 and 2 read back, batch 3 computed on resume
    full = evaluate(standard_model, (x, y), [AttackSpec("pgd", FailsOnCall(
        0, eps=0.15, steps=3, seed=2))], batch_size=20, checks=None)
    assert torch.equal(resumed.worst.all, full.worst.all)
    with pytest.raises(AdvDefenseError, match="another run"):
        evaluate(standard_model, (x, y), [AttackSpec("pgd", PGD(eps=0.2, steps=3))],
                 batch_size=20, checks=None, state_path=state)
