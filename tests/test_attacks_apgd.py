"""APGD-CE / APGD-DLR / APGD-T (Croce & Hein 2020, Algorithm 1): contract and behaviour."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from advdefense.attacks import APGD, APGDDLR, APGDT, ATTACKS, PGD, build_attack
from advdefense.attacks.apgd import step_checkpoints
from advdefense.attacks.base import project, random_start
from advdefense.errors import AdvDefenseError
from advdefense.randomness import fresh_seed, seeded

from .conftest import make_smallcnn
from .test_attacks_core import NoisyLinear


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_registry_names():
    assert ATTACKS["apgd-ce"] is APGD and ATTACKS["apgd-dlr"] is APGDDLR
    assert ATTACKS["apgd-t"] is APGDT
    assert build_attack("apgd-dlr", eps=0.1).objective.name == "dlr"
    assert build_attack("apgd-t", eps=0.1).n_target_classes == 9
    assert build_attack("apgd-ce", eps=0.1).n_iter == 100


def test_checkpoints_match_the_paper_formula():
    # the paper's recurrence in exact rational arithmetic
    def exact(n):
        p = [Fraction(0), Fraction(22, 100)]
        while True:
            nxt = p[-1] + max(p[-1] - p[-2] - Fraction(3, 100), Fraction(6, 100))
            if nxt > 1:
                break
            p.append(nxt)
        return sorted({math.ceil(pj * n) for pj in p})

    for n in (1, 5, 10, 37, 100, 250, 1000):
        assert step_checkpoints(n) == exact(n), n
    # and the reference code's integer recurrence (first interval 22, shrink by 3, min 6)
    w, length, ref = 0, 22, [0]
    while w + length <= 100:
        w += length
        ref.append(w)
        length = max(length - 3, 6)
    assert step_checkpoints(100) == ref == [0, 22, 41, 57, 70, 80, 87, 93, 99]


@settings(max_examples=12, deadline=None)
@given(eps=st.floats(0.0, 0.5), norm=st.sampled_from(["linf", "l2"]),
       name=st.sampled_from(["apgd-ce", "apgd-dlr", "apgd-t"]), seed=st.integers(0, 10))
def test_apgd_stays_in_ball_and_box(eps, norm, name, seed):
    torch.manual_seed(seed)
    model = make_smallcnn(dataset="digits").eval()
    x = torch.rand(5, 1, 8, 8)
    y = torch.randint(0, 10, (5,))
    kw = dict(n_target_classes=2) if name == "apgd-t" else {}
    x_adv = build_attack(name, eps=eps, norm=norm, n_iter=4, seed=seed, **kw)(model, x, y)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().max(1).values if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-5).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1


@pytest.mark.parametrize("name", ["apgd-ce", "apgd-t"])
def test_restores_mode_and_leaves_batchnorm(standard_model, mnist_test, name):
    x, y = mnist_test[0][:16], mnist_test[1][:16]
    standard_model.train()
    before = {k: v.clone() for k, v in standard_model.state_dict().items()}
    try:
        build_attack(name, eps=0.3, n_iter=3, n_target_classes=2, seed=0)(standard_model, x, y) \
            if name == "apgd-t" else build_attack(name, eps=0.3, n_iter=3)(standard_model, x, y)
        assert standard_model.training
        for k, v in standard_model.state_dict().items():
            assert torch.equal(v, before[k]), k
    finally:
        standard_model.eval()


def test_seeded_and_leaves_global_rng():
    model = make_smallcnn(dataset="digits").eval()
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
    torch.manual_seed(5)
    a = APGDT(eps=0.1, n_iter=5, n_target_classes=3, seed=3)(model, x, y)
    after = torch.rand(1)
    torch.manual_seed(5)
    b = APGDT(eps=0.1, n_iter=5, n_target_classes=3, seed=3)(model, x, y)
    assert torch.equal(a, b)
    assert torch.equal(torch.rand(1), after)


def test_apgd_t_needs_four_classes():
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    x, y = torch.rand(6, 4), torch.randint(0, 3, (6,))
    with pytest.raises(AdvDefenseError, match="at least 4 classes"):
        APGDT(eps=0.1, n_iter=2)(model, x, y)
    with pytest.raises(AdvDefenseError):
        APGDDLR(eps=0.1, n_iter=2)(nn.Sequential(nn.Linear(4, 2)).eval(), x, y % 2)
    APGD(eps=0.1, n_iter=2)(model, x, y)  # CE works with 3 classes


@pytest.mark.parametrize("bad", [dict(eps=0.1, n_iter=0), dict(eps=0.1, rho=0.0),
                                 dict(eps=0.1, n_iter=10, steps=20), dict(eps=-1.0)])
def test_bad_hyperparameters(bad):
    with pytest.raises(AdvDefenseError):
        APGD(**bad)


def test_trace_and_never_losing_a_success(standard_model, mnist_test):
    x, y = mnist_test[0][:40], mnist_test[1][:40]
    atk = APGD(eps=0.15, n_iter=20, restarts=2, seed=0)
    x_adv = atk(standard_model, x, y)
    t = atk.trace
    first = t.runs[0]
    assert first.loss_matrix().shape == (21, 40) and len(first.grad_norms) == 21
    for run in t.runs[1:]:  # the restart runs only on the examples not yet adversarial
        assert run.loss_matrix().shape == (21, len(run.idx)) and len(run.idx) < 40
    with torch.no_grad():
        fooled = standard_model(x_adv).argmax(1) != y
    assert torch.equal(fooled, t.returned_adversarial)
    assert (t.returned_adversarial >= t.ever_adversarial).all(), "an adversarial point was lost"


def test_apgd_breaks_standard_keeps_robust(standard_model, robust_model, mnist_test):
    x, y = mnist_test[0][:100], mnist_test[1][:100]
    assert accuracy(standard_model, x, y) > 0.9
    adv = APGD(eps=0.3, seed=0)(standard_model, x, y)
    assert accuracy(standard_model, adv, y) <= 0.02
    robust_clean = accuracy(robust_model, x, y)
    apgd = accuracy(robust_model, APGD(eps=0.3, seed=0)(robust_model, x, y), y)
    pgd = accuracy(robust_model, PGD(eps=0.3, steps=20, step_size=0.3 / 8, seed=0)(
        robust_model, x, y), y)
    assert apgd > 0.3, "the PGD-trained model should keep some accuracy at eps 0.3"
    assert apgd < robust_clean
    assert apgd <= pgd + 0.02


def test_returned_point_is_the_best_iterate():
    """Examples never made adversarial get the highest-loss iterate of the whole run (x_max
    over restarts); adversarial ones get an adversarial iterate."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 5)).eval()
    with torch.no_grad():
        model[1].weight.mul_(4.0)
    x = torch.rand(30, 16) * 0.5 + 0.25
    with torch.no_grad():
        y = model(x).argmax(1)
    atk = APGD(eps=0.05, n_iter=30, restarts=2, seed=0)
    x_adv = atk(model, x, y)
    best_seen = torch.full((30,), float("-inf"))
    for run in atk.trace.runs:  # highest loss of every example over all runs
        best_seen[run.idx] = torch.maximum(best_seen[run.idx], run.loss_matrix().max(0).values)
    with torch.no_grad():
        out = model(x_adv)
        ret = nn.functional.cross_entropy(out, y, reduction="none")
    adv = atk.trace.returned_adversarial
    assert torch.equal(out.argmax(1) != y, adv)
    assert (~adv).any() and adv.any(), "the test needs both kinds of examples"
    assert torch.allclose(ret[~adv], best_seen[~adv], atol=1e-5)


def test_batched_eot_matches_a_python_loop(monkeypatch):
    """The first three iterates of APGD with eot_samples=k equal a hand-written loop over the
    k draws the attack used (fixed for the run), chunked or not."""
    torch.manual_seed(0)
    model = NoisyLinear()
    x, y = torch.rand(5, 4) * 0.6 + 0.2, torch.randint(0, 3, (5,))
    eps, k = 0.1, 4
    drawn = []
    original = NoisyLinear.sample_state

    def recording(self, xx, groups):
        state = original(self, xx, groups)
        drawn.append(state)
        return state

    monkeypatch.setattr(NoisyLinear, "sample_state", recording)

    def loop_loss_grad(xx, states):
        losses, grads = [], []
        for state in states:
            xi = xx.clone().requires_grad_(True)
            loss = nn.functional.cross_entropy(model.forward_with_state(xi, state), y,
                                               reduction="none")
            grads.append(torch.autograd.grad(loss.sum(), xi)[0])
            losses.append(loss.detach())
        return torch.stack(losses).mean(0), torch.stack(grads).mean(0)

    traces = []
    for max_batch in (4096, 10):
        drawn.clear()
        atk = APGD(eps=eps, n_iter=10, eot_samples=k, max_batch=max_batch, seed=7,
                   eot_resample="run")  # w_1 = 3
        atk(model, x, y)
        states = drawn[:k]           # one state per draw group, in draw order
        assert all(torch.equal(a, b) for a, b in zip(drawn[k:2 * k], states, strict=True)), \
            "eot_resample='run' keeps the same draws for the whole run"
        with seeded(7):
            fresh_seed()             # the run's draw seed
            x0 = random_start(x, eps, "linf")
        l0, g0 = loop_loss_grad(x0, states)
        x1 = project(x0 + 2 * eps * g0.sign(), x, eps, "linf")
        l1, g1 = loop_loss_grad(x1, states)
        z = project(x1 + 2 * eps * g1.sign(), x, eps, "linf")
        x2 = project(x1 + 0.75 * (z - x1) + 0.25 * (x1 - x0), x, eps, "linf")
        l2, _ = loop_loss_grad(x2, states)
        got = atk.trace.losses
        traces.append(torch.stack(got))
        assert torch.allclose(got[0], l0, atol=1e-5)
        assert torch.allclose(got[1], l1, atol=1e-5)
        assert torch.allclose(got[2], l2, atol=1e-5)
        assert torch.allclose(atk.trace.grad_norms[0], g0.norm(dim=1), atol=1e-5)
    assert torch.allclose(traces[0], traces[1], atol=1e-5), "max_batch is only a memory setting"
