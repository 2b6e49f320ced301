"""Contract tests for the attack base and PGD/FGSM/CW (DESIGN.md contract 3)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from advdefense.attacks import FGSM, PGD, CWLinf, eot_loss_grad
from advdefense.errors import AdvDefenseError
from advdefense.randomness import StochasticModule

from .conftest import make_smallcnn


class NoisyLinear(StochasticModule):
    """Toy stochastic layer: adds a random per-draw offset (one per draw group)."""

    def __init__(self, d_in=4, classes=3):
        super().__init__()
        self.lin = nn.Linear(d_in, classes)

    def sample_state(self, x, groups):
        # one small draw per group, so chunking does not change the random stream
        return torch.cat([torch.randn(1, 1, self.lin.in_features) for _ in range(groups)])

    def forward_with_state(self, x, state):
        g = state.shape[0]
        noise = state.repeat_interleave(x.shape[0] // g, dim=0)[:, 0]
        return self.lin(x.flatten(1) * (1 + noise))


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@settings(max_examples=15, deadline=None)
@given(eps=st.floats(0.0, 0.5), norm=st.sampled_from(["linf", "l2"]),
       steps=st.integers(1, 3), seed=st.integers(0, 10))
def test_pgd_stays_in_ball_and_box(eps, norm, steps, seed):
    torch.manual_seed(seed)
    model = make_smallcnn(dataset="digits").eval()
    x = torch.rand(6, 1, 8, 8)
    y = torch.randint(0, 10, (6,))
    x_adv = PGD(eps=eps, steps=steps, norm=norm, seed=seed)(model, x, y)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().max(1).values if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-5).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_eps_zero_gives_clean_accuracy(standard_model, mnist_test):
    x, y = mnist_test[0][:200], mnist_test[1][:200]
    x_adv = PGD(eps=0.0, steps=5)(standard_model, x, y)
    assert torch.equal(x_adv, x)
    assert accuracy(standard_model, x_adv, y) == accuracy(standard_model, x, y)


def test_attack_keeps_batchnorm_statistics_and_mode(standard_model, mnist_test):
    x, y = mnist_test[0][:64], mnist_test[1][:64]
    standard_model.train()
    before = {k: v.clone() for k, v in standard_model.state_dict().items()}
    PGD(eps=0.3, steps=3)(standard_model, x, y)
    assert standard_model.training, "attack must restore train mode"
    for k, v in standard_model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed during the attack"
    standard_model.eval()


def test_pgd_breaks_standard_model_but_not_robust(standard_model, robust_model, mnist_test):
    x, y = mnist_test[0][:300], mnist_test[1][:300]
    pgd = PGD(eps=0.3, steps=20, step_size=0.3 / 8, seed=0)
    assert accuracy(standard_model, x, y) > 0.9
    assert accuracy(standard_model, pgd(standard_model, x, y), y) < 0.05
    assert accuracy(robust_model, pgd(robust_model, x, y), y) > 0.4


def test_stronger_attacks_are_not_weaker(standard_model, mnist_test):
    x, y = mnist_test[0][:300], mnist_test[1][:300]
    fgsm = accuracy(standard_model, FGSM(eps=0.1)(standard_model, x, y), y)
    pgd = accuracy(standard_model, PGD(eps=0.1, steps=20, seed=0)(standard_model, x, y), y)
    assert pgd <= fgsm
    cw = accuracy(standard_model, CWLinf(eps=0.1, seed=0)(standard_model, x, y), y)
    assert cw < accuracy(standard_model, x, y)


def test_targeted_pgd_hits_target(standard_model, mnist_test):
    x, y = mnist_test[0][:100], mnist_test[1][:100]
    target = (y + 1) % 10
    x_adv = PGD(eps=0.3, steps=30, targeted=True, seed=0)(standard_model, x, y, target=target)
    with torch.no_grad():
        hit = (standard_model(x_adv).argmax(1) == target).float().mean()
    assert hit > 0.8


def test_batched_eot_matches_loop():
    torch.manual_seed(0)
    model = NoisyLinear()
    x, y = torch.rand(5, 4), torch.randint(0, 3, (5,))
    batched = eot_loss_grad(model, x, y, "ce", eot_samples=8, seed=1)
    # the same 8 draws (the states the batched pass used), one per forward call, in a loop
    states = model.last_state
    assert states.shape[0] == 8 and len(states.unique(dim=0)) == 8
    grads, losses = [], []
    for j in range(8):
        xi = x.clone().requires_grad_(True)
        out = model.forward_with_state(xi, states[j : j + 1])
        loss = nn.functional.cross_entropy(out, y, reduction="none")
        grads.append(torch.autograd.grad(loss.sum(), xi)[0])
        losses.append(loss.detach())
    assert torch.allclose(batched.grad, torch.stack(grads).mean(0), atol=1e-6)
    assert torch.allclose(batched.loss, torch.stack(losses).mean(0), atol=1e-6)
    # chunked (memory budget of 10 rows = 2 draws per pass): the same draws, the same estimate
    chunked = eot_loss_grad(model, x, y, "ce", eot_samples=8, max_batch=10, seed=1)
    assert torch.allclose(chunked.grad, batched.grad, atol=1e-6)
    assert torch.allclose(chunked.loss, batched.loss, atol=1e-6)


def test_pgd_is_seeded_and_leaves_global_rng():
    model = make_smallcnn(dataset="digits").eval()
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
    torch.manual_seed(5)
    a = PGD(eps=0.1, steps=2, seed=3)(model, x, y)
    after = torch.rand(1)
    torch.manual_seed(5)
    b = PGD(eps=0.1, steps=2, seed=3)(model, x, y)
    assert torch.equal(a, b)
    torch.manual_seed(5)
    PGD(eps=0.1, steps=2, seed=3)(model, x, y)
    assert torch.equal(torch.rand(1), after)


@pytest.mark.parametrize("bad", [
    dict(eps=-0.1), dict(eps=float("nan")), dict(eps=0.1, norm="l3"), dict(eps=0.1, eot_samples=0)])
def test_bad_hyperparameters_raise_clear_error(bad):
    with pytest.raises(AdvDefenseError):
        PGD(**bad)


def test_bad_inputs_raise_clear_error():
    model = make_smallcnn(dataset="digits").eval()
    with pytest.raises(AdvDefenseError, match=r"\[0, 1\]"):
        PGD(eps=0.1)(model, torch.rand(2, 1, 8, 8) * 255, torch.zeros(2, dtype=torch.long))
    with pytest.raises(AdvDefenseError, match="shape"):
        PGD(eps=0.1)(model, torch.rand(2, 1, 8, 8), torch.zeros(3, dtype=torch.long))
