"""BPDA (Athalye et al. 2018, Sec. 4.1): forward exact, backward approximate, composes with EOT."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from advdefense.attacks import APGD, BPDA, PGD, eot_loss_grad
from advdefense.errors import AdvDefenseError
from advdefense.randomness import StochasticModule, current_groups, draw_groups, is_stochastic

from .conftest import make_smallcnn


class Quantize(nn.Module):
    """Round to ``levels`` grey levels: piecewise constant, so its gradient is zero a.e."""

    def __init__(self, levels: int = 4):
        super().__init__()
        self.levels = levels

    def forward(self, x):
        return torch.round(x * (self.levels - 1)) / (self.levels - 1)


class GaussianNoise(StochasticModule):
    """Per-row Gaussian noise; records the draw groups it was asked for."""

    def __init__(self, sigma=0.25):
        super().__init__()
        self.sigma = sigma
        self.groups_seen: list[int] = []

    def sample_state(self, x, groups):
        self.groups_seen.append(current_groups())  # draw groups of the forward call
        return self.sigma * torch.randn_like(x)

    def forward_with_state(self, x, state):
        return x + state


class Votes(nn.Module):
    """Monte-Carlo smoothed classifier over ``m`` noisy copies: hard = vote frequencies of the
    argmax (piecewise constant), soft = mean softmax (differentiable)."""

    def __init__(self, base, noise, m=8, hard=True):
        super().__init__()
        self.base, self.noise, self.m, self.hard = base, noise, m, hard

    def forward(self, x):
        n = x.shape[0]
        out = self.base(self.noise(x.repeat(self.m, *([1] * (x.dim() - 1)))))
        out = out.view(self.m, n, -1)
        if self.hard:
            return F.one_hot(out.argmax(2), out.shape[2]).float().mean(0)
        return out.softmax(2).mean(0)


def test_forward_is_exact_and_gradient_is_the_approximation():
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(5, 3), nn.Hardtanh())
    g = nn.Sequential(nn.Linear(5, 3), nn.Tanh())
    x = torch.randn(7, 5, requires_grad=True)
    out = BPDA(f, g)(x)
    assert torch.equal(out, f(x))
    (grad,) = torch.autograd.grad((out * torch.arange(3.0)).sum(), x)
    x2 = x.detach().clone().requires_grad_(True)
    (ref,) = torch.autograd.grad((g(x2) * torch.arange(3.0)).sum(), x2)
    assert torch.allclose(grad, ref)
    # identity backward
    xq = torch.rand(4, 1, 8, 8, requires_grad=True)
    q = BPDA(Quantize())(xq)
    assert torch.equal(q, Quantize()(xq))
    (gq,) = torch.autograd.grad((q * 3).sum(), xq)
    assert torch.equal(gq, torch.full_like(xq, 3.0))
    # without autograd only the forward module runs
    with torch.no_grad():
        assert torch.equal(BPDA(f, g)(x), f(x))


def test_shape_mismatch_is_a_clear_error():
    x = torch.rand(3, 4, requires_grad=True)
    with pytest.raises(AdvDefenseError, match="same shape"):
        BPDA(nn.Linear(4, 2))(x)


def test_attack_through_bpda_beats_a_quantizing_input_layer(standard_model, mnist_test):
    x, y = mnist_test[0][:100], mnist_test[1][:100]
    masked = nn.Sequential(Quantize(4), standard_model).eval()
    wrapped = nn.Sequential(BPDA(Quantize(4)), standard_model).eval()
    with torch.no_grad():
        clean = (masked(x).argmax(1) == y).float().mean().item()
    assert clean > 0.8
    plain = PGD(eps=0.3, steps=20, step_size=0.3 / 8, random_start=False, seed=0)
    x_plain = plain(masked, x, y)
    assert torch.stack(plain.trace.grad_norms).max() == 0, "quantization must mask gradients"
    with torch.no_grad():
        acc_plain = (masked(x_plain).argmax(1) == y).float().mean().item()
    assert acc_plain == clean
    for atk in (PGD(eps=0.3, steps=20, step_size=0.3 / 8, random_start=False, seed=0),
                APGD(eps=0.3, n_iter=20, seed=0)):
        x_bpda = atk(wrapped, x, y)
        with torch.no_grad():
            acc = (masked(x_bpda).argmax(1) == y).float().mean().item()
        assert acc < 0.3 * clean, (type(atk).__name__, acc, clean)


def test_bpda_composes_with_batched_eot():
    torch.manual_seed(0)
    base = make_smallcnn(dataset="digits").eval()
    noise = GaussianNoise()
    hard, soft = Votes(base, noise, m=8, hard=True), Votes(base, noise, m=8, hard=False)
    model = BPDA(hard, soft)
    assert is_stochastic(model)
    x, y = torch.rand(5, 1, 8, 8), torch.randint(0, 10, (5,))
    # forward = hard votes and gradient = soft votes' gradient, with the same random stream
    torch.manual_seed(3)
    xi = x.clone().requires_grad_(True)
    out = model(xi)
    (g,) = torch.autograd.grad(out[:, 0].sum(), xi)
    torch.manual_seed(3)
    ref_hard = hard(x)
    xr = x.clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(soft(xr)[:, 0].sum(), xr)
    assert torch.equal(out.detach(), ref_hard)
    assert torch.allclose(g, g_ref)
    assert g.abs().sum() > 0
    # batched EOT reaches the stochastic layer as draw groups
    noise.groups_seen.clear()
    res = eot_loss_grad(model, x, y, "ce", eot_samples=4)
    assert res.grad is not None and torch.isfinite(res.grad).all() and res.grad.abs().sum() > 0
    assert res.logits.shape == (4, 5, 10)
    assert set(noise.groups_seen) == {4}
    seen = []
    with draw_groups(2):
        hook = noise.register_forward_pre_hook(lambda m, i: seen.append(current_groups()))
        model(torch.cat([x, x]).requires_grad_(True))
        hook.remove()
    assert seen == [2, 2]  # both the exact and the approximate pass honour the groups
    # an attack uses EOT on it and stays in the ball
    atk = PGD(eps=0.1, steps=3, eot_samples=4, seed=0)
    assert atk.effective_eot(model) == 4
    x_adv = atk(model, x, y)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
