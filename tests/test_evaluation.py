"""Harness, protocols, verdicts and confidence intervals (DESIGN.md contract 4)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import beta
from torch import nn

from advdefense.attacks import FGSM, PGD, HeadsObjective
from advdefense.errors import AdvDefenseError
from advdefense.evaluation import (
    AttackSpec,
    Verdict,
    cas_attack_specs,
    clopper_pearson,
    evaluate,
    standard_attack_specs,
)
from advdefense.evaluation.protocols import verdict, verdict_from_predictions
from advdefense.randomness import StochasticModule, freeze, is_stochastic


class InputNoise(StochasticModule):
    """Gaussian input noise of scale ``sigma``; one draw per draw group (per example rows)."""

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = sigma

    def sample_state(self, x, groups):
        return torch.randn_like(x) * self.sigma

    def forward_with_state(self, x, state):
        if state.shape[0] != x.shape[0]:  # frozen draw taken on another batch size
            state = state[:1].expand_as(x)
        return (x + state).clamp(0, 1)


class LinearToy(nn.Module):
    """A random linear classifier on flattened inputs, optionally behind input noise."""

    def __init__(self, d: int, classes: int, sigma: float, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.noise = InputNoise(sigma)
        self.lin = nn.Linear(d, classes)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(classes, d, generator=g))
            self.lin.bias.zero_()

    def forward(self, x):
        return self.lin(self.noise(x).flatten(1))


def test_clopper_pearson_matches_beta_quantiles():
    for k, n in [(0, 10), (3, 10), (10, 10), (412, 500), (1, 1000)]:
        low, high = clopper_pearson(k, n)
        exp_low = 0.0 if k == 0 else beta.ppf(0.025, k, n - k + 1)
        exp_high = 1.0 if k == n else beta.ppf(0.975, k + 1, n - k)
        assert low == pytest.approx(exp_low, abs=1e-10)
        assert high == pytest.approx(exp_high, abs=1e-10)
        assert low <= k / n <= high


def test_evaluate_deterministic_per_example_and_worst(standard_model, mnist_test):
    x, y = mnist_test[0][:120], mnist_test[1][:120]
    specs = standard_attack_specs(0.3, steps=10, protocols=("fresh", "paper"))
    names = [s.name for s in specs]
    assert names[:3] == ["fgsm", "pgd", "cw"] and names.count("pgd") == 2
    assert specs[1].attack.step_size == pytest.approx(0.3 / 4) and specs[1].attack.steps == 10
    specs = [s for s in specs if s.name != "apgd-ce"]  # APGD has its own tests; keep this fast
    standard_model.train()  # the harness must evaluate in eval mode and restore this
    res = evaluate(standard_model, (x, y), specs, batch_size=50, checks=False)
    assert standard_model.training
    standard_model.eval()
    with torch.no_grad():
        clean = standard_model(x).argmax(1) == y
    assert torch.equal(res.clean.verdict.all, clean)
    assert not res.stochastic and res.repeats == 1
    worst = clean.clone()
    for label, e in res.entries.items():
        assert e.verdict.all.shape == (120,)
        assert torch.equal(e.verdict.all, e.verdict.majority)
        worst &= e.verdict.all
        assert res.accuracy(label).value <= res.accuracy("clean").value + 1e-9
    assert torch.equal(res.worst.all, worst)
    # eps=0.3 PGD breaks a standard model far below its clean accuracy
    assert res.accuracy("pgd/fresh").value < res.accuracy("clean").value - 0.3
    # per-spec verdict agrees with classifying a recomputed attack on the same batch split
    # for a deterministic model the paper protocol shares the fresh run (same attack object)
    assert torch.equal(res.entries["pgd/paper"].verdict.all, res.entries["pgd/fresh"].verdict.all)
    atk = specs[1].attack
    x_adv = torch.cat([atk(standard_model, x[i:i + 50], y[i:i + 50]) for i in (0, 50, 100)])
    with torch.no_grad():
        direct = standard_model(x_adv).argmax(1) == y
    assert torch.equal(res.entries["pgd/fresh"].verdict.all, direct)


def test_evaluate_dataset_input_and_n_examples(standard_model):
    from advdefense.data import load_split

    ds = load_split("mnist5k", "test")
    res = evaluate(standard_model, ds, [AttackSpec("fgsm", FGSM(eps=0.1))], n_examples=30,
                   checks=False)
    assert res.n == 30 and res.entries["fgsm/fresh"].verdict.all.shape == (30,)


def test_bad_inputs_raise_one_line_errors(standard_model, mnist_test):
    x, y = mnist_test[0][:4], mnist_test[1][:4]
    with pytest.raises(AdvDefenseError):
        AttackSpec("pgd", PGD(eps=0.1), protocol="nope")
    with pytest.raises(AdvDefenseError):
        evaluate(standard_model, (x, y), [], repeats=0)
    with pytest.raises(AdvDefenseError):
        evaluate(standard_model, (x * 3, y), [])
    with pytest.raises(AdvDefenseError):
        standard_attack_specs(-0.1)


def test_verdict_from_predictions_majority_and_ties():
    y = torch.tensor([0, 1, 2, 3])
    pred = torch.tensor([[0, 1, 2, 0],
                         [0, 0, 1, 3],
                         [0, 1, 1, 0],
                         [0, 1, 2, 3]])
    v = verdict_from_predictions(pred, y)
    assert v.all.tolist() == [True, False, False, False]
    assert v.majority.tolist() == [True, True, False, False]  # 2-2 tie counts as wrong
    assert v.single.tolist() == [True, True, True, False]


@settings(max_examples=12, deadline=None)
@given(sigma=st.floats(0.05, 1.0), seed=st.integers(0, 1000), repeats=st.integers(1, 12),
       max_batch=st.sampled_from([7, 64, 4096]))
def test_repeated_verdict_never_above_single(sigma, seed, repeats, max_batch):
    torch.manual_seed(seed)
    model = LinearToy(16, 4, sigma, seed).eval()
    x, y = torch.rand(40, 1, 4, 4), torch.randint(0, 4, (40,))
    v = verdict(model, x, y, repeats=repeats, max_batch=max_batch)
    assert not (v.all & ~v.single).any()
    assert not (v.all & ~v.majority).any()
    if repeats == 1:
        assert torch.equal(v.all, v.single)


def test_stochastic_protocols(monkeypatch):
    torch.manual_seed(0)
    model = LinearToy(16, 4, 0.3, 1).eval()
    assert is_stochastic(model)
    x = torch.rand(60, 1, 4, 4)
    with torch.no_grad(), freeze(model):
        y = model(x).argmax(1)  # labels = predictions on one frozen draw
    calls = []
    specs = [AttackSpec("pgd", PGD(eps=0.2, steps=5, eot_samples=4, seed=0), p)
             for p in ("fresh", "paper", "fixed")]
    # record whether the model is frozen when each attack forward runs
    orig = InputNoise.forward

    def spy(self, inp):
        calls.append(self.frozen)
        return orig(self, inp)

    monkeypatch.setattr(InputNoise, "forward", spy)
    res = evaluate(model, (x, y), specs, repeats=7, batch_size=30, checks=False)
    assert res.stochastic and res.repeats == 7
    assert set(res.entries) == {"pgd/fresh", "pgd/paper", "pgd/fixed"}
    assert calls.count(True) > 0 and calls.count(False) > 0
    for e in res.entries.values():
        assert not (e.verdict.all & ~e.verdict.single).any()
    # the fixed-path verdict is a single deterministic prediction under the freeze
    fixed = res.entries["pgd/fixed"].verdict
    assert torch.equal(fixed.all, fixed.single) and torch.equal(fixed.all, fixed.majority)
    # repeated clean verdict: with noise, "all 7 correct" is strictly rarer than one draw
    assert res.accuracy("clean", "all").value <= res.accuracy("clean", "single").value
    assert res.accuracy("worst").value <= min(res.accuracy(k).value for k in res.entries)


def test_verdict_cat_and_and():
    a = Verdict.full(3, True)
    b = Verdict(torch.tensor([True, False, True]), torch.tensor([True] * 3),
                torch.tensor([False] * 3))
    c = a & b
    assert c.all.tolist() == [True, False, True] and not c.single.any()
    assert Verdict.cat([a, b]).all.shape == (6,)


def test_cas_attack_specs_rows():
    # main-logit and adaptive (main + beta*aux) rows of PGD and APGD-DLR (Bai et al. 2021)
    specs = cas_attack_specs(0.3, aux_weight=1.5, steps=7, seed=3)
    assert [s.name for s in specs] == ["pgd-7 main", "pgd-7 main+1.5aux", "apgd-dlr main",
                                       "apgd-dlr main+1.5aux"]
    main, adaptive = specs[0].attack, specs[1].attack
    assert main.step_size == pytest.approx(0.075) and main.steps == 7
    assert not isinstance(main.objective, HeadsObjective)
    assert isinstance(adaptive.objective, HeadsObjective)
    assert adaptive.objective.aux_weight == 1.5 and adaptive.objective.name == "ce+1.5*aux"
    assert isinstance(specs[3].attack.objective, HeadsObjective)
    assert specs[3].attack.objective.name == "dlr+1.5*aux"
    assert [s.name for s in cas_attack_specs(0.1, apgd=False, adaptive=False)] == ["pgd-20 main"]
