"""EPGD, SmoothAdv, NAttack and the transfer attack."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from advdefense import randomness
from advdefense.attacks import ATTACKS, PGD, build_attack, eot_loss_grad
from advdefense.attacks.base import AttackRecorder
from advdefense.attacks.epgd import EPGD, SmoothAdv, smoothadv_loss_grad
from advdefense.attacks.nattack import NAttack
from advdefense.attacks.transfer import TransferAttack
from advdefense.defenses.noise import inject, select_group
from advdefense.defenses.smoothing import NoisyBase, SmoothedClassifier
from advdefense.errors import AdvDefenseError
from advdefense.randomness import freeze, get_states, seeded

from .conftest import make_smallcnn


def _noisy(kind="pni", where="both"):
    return NoisyBase(inject(make_smallcnn(), kind=kind, where=where).eval(), 0.1)


def test_registry_names():
    for name in ("epgd", "smoothadv", "nattack", "transfer"):
        assert name in ATTACKS


def test_epgd_batched_gradient_equals_loop_over_draws(monkeypatch):
    model = _noisy()
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    m = 5
    # all draws stacked in one pass (the CPU default for weight noise is a pass per draw)
    monkeypatch.setattr(randomness, "groups_batch_cheaply", lambda model: True)
    res = eot_loss_grad(model, x, y, "ce", eot_samples=m, max_batch=1000)
    states = get_states(model)
    losses, grads = [], []
    for j in range(m):
        with freeze(model, states=[select_group(s, j, m) for s in states]):
            xi = x.clone().requires_grad_(True)
            loss = F.cross_entropy(model(xi), y, reduction="none")
            grads.append(torch.autograd.grad(loss.sum(), xi)[0])
            losses.append(loss.detach())
    torch.testing.assert_close(res.loss, torch.stack(losses).mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(res.grad, torch.stack(grads).mean(0), rtol=1e-3, atol=1e-6)


def test_smoothadv_below_epgd_on_same_draws_and_chunking_exact():
    model = _noisy("cni")
    x, y = torch.rand(3, 1, 28, 28), torch.randint(0, 10, (3,))
    with seeded(1):
        epgd = eot_loss_grad(model, x, y, "ce", eot_samples=6, max_batch=1000)
    with seeded(1):
        sadv = smoothadv_loss_grad(model, x, y, samples=6, max_batch=1000)
    torch.testing.assert_close(sadv.logits, epgd.logits)  # the same draws
    assert (sadv.loss <= epgd.loss + 1e-6).all() and (sadv.loss < epgd.loss).any()
    # direct formula from the logits
    p = sadv.logits.softmax(2).gather(2, y.view(1, -1, 1).expand(6, -1, 1)).squeeze(2).mean(0)
    torch.testing.assert_close(sadv.loss, -p.log())
    # the two-pass chunked path gives the exact gradient of its own (re-seeded) draws:
    # check it against a central finite difference on a smooth (linear, float64) noisy model
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)).double()
    smooth_model = NoisyBase(inject(lin, kind="cni", where="weights").eval(), 0.1)
    xd = x.double()
    with seeded(2):
        chunked = smoothadv_loss_grad(smooth_model, xd, y, samples=6, max_batch=4)
    assert chunked.logits.shape == (6, 3, 10)
    direction = torch.randn_like(xd)
    h = 1e-5
    with seeded(2):
        plus = smoothadv_loss_grad(smooth_model, xd + h * direction, y, samples=6,
                                   max_batch=4, need_grad=False)
    with seeded(2):
        minus = smoothadv_loss_grad(smooth_model, xd - h * direction, y, samples=6,
                                    max_batch=4, need_grad=False)
    fd = (plus.loss - minus.loss) / (2 * h)
    analytic = (chunked.grad * direction).flatten(1).sum(1)
    torch.testing.assert_close(analytic, fd, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("cls", [EPGD, SmoothAdv])
@pytest.mark.parametrize("norm,eps", [("linf", 0.3), ("l2", 2.0)])
def test_smoothing_attacks_reduce_accuracy_and_stay_in_ball(cls, norm, eps, standard_model,
                                                              mnist_test):
    x, y = mnist_test[0][:40], mnist_test[1][:40]
    smooth = SmoothedClassifier(standard_model, sigma=0.1, m=16, max_batch=2000)
    attack = cls(eps=eps, norm=norm, steps=10, step_size=eps / 4, eot_samples=4, seed=0)
    x_adv = attack(smooth, x, y)
    delta = (x_adv - x).flatten(1)
    if norm == "linf":
        assert delta.abs().max() <= eps + 1e-6
    else:
        assert delta.norm(dim=1).max() <= eps + 1e-4
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        clean = (smooth(x).argmax(1) == y).float().mean()
        adv = (smooth(x_adv).argmax(1) == y).float().mean()
    assert adv < clean - 0.3, (clean, adv)


def test_nattack_reduces_accuracy_of_standard_model(standard_model, mnist_test):
    x, y = mnist_test[0][:12], mnist_test[1][:12]
    with torch.no_grad():
        ok = standard_model(x).argmax(1) == y
    x, y = x[ok][:8], y[ok][:8]
    attack = NAttack(eps=0.3, steps=40, population=50, space="delta", seed=0, max_batch=2000)
    x_adv = attack(standard_model, x, y)
    assert (x_adv - x).abs().max() <= 0.3 + 1e-6
    with torch.no_grad():
        acc = (standard_model(x_adv).argmax(1) == y).float().mean()
    assert acc <= 0.5, acc
    assert attack.trace.forward_rows > 0
    assert attack.trace.ever_adversarial.float().mean() >= 0.5


def test_nattack_uses_probabilities_of_a_smoothed_model(standard_model, mnist_test):
    x, y = mnist_test[0][:3], mnist_test[1][:3]
    smooth = SmoothedClassifier(standard_model, sigma=0.0, m=2, vote="soft")
    attack = NAttack(eps=0.3, steps=2, population=10, check_every=1, seed=0)
    with torch.no_grad():
        probs = smooth(x)
        logp = attack._log_probs(smooth, x, 1, AttackRecorder(3))
        torch.testing.assert_close(logp, probs.clamp_min(1e-12).log())  # not log_softmax
        torch.testing.assert_close(attack._log_probs(standard_model, x, 1, AttackRecorder(3)),
                                   standard_model(x).log_softmax(1))
    seen = []  # rows the smoothed model really classified (its scores and its votes)
    sample_logits = smooth.sample_logits
    smooth.sample_logits = lambda xs: (seen.append(xs.shape[0]), sample_logits(xs))[1]
    x_adv = attack(smooth, x, y)
    assert x_adv.shape == x.shape and (x_adv - x).abs().max() <= 0.3 + 1e-6
    # the queries counted are the queries made: mean checks, candidates and the confirmations
    # of candidates on fresh draws
    assert attack.trace.forward_rows == sum(seen) > 0
    assert attack.trace.forward_rows <= 2 * 3 + 2 * 3 * 10 + 2 * 2 * 3 * attack.confirm_draws
    with pytest.raises(AdvDefenseError):
        NAttack(eps=0.1, norm="l2")


def test_transfer_crafts_on_substitute_only(standard_model, mnist_test):
    x, y = mnist_test[0][:20], mnist_test[1][:20]
    inner = PGD(eps=0.3, steps=10, step_size=0.075, seed=0)
    transfer = TransferAttack(substitute=standard_model, attack=inner)

    class Forbidden(torch.nn.Module):
        def forward(self, x):
            raise AssertionError("the target model must not be queried")

    x_adv = transfer(Forbidden(), x, y)
    torch.testing.assert_close(x_adv, PGD(eps=0.3, steps=10, step_size=0.075, seed=0)(
        standard_model, x, y))
    built = build_attack("transfer", substitute=standard_model, attack="pgd", eps=0.3,
                         attack_options={"steps": 2})
    assert built.eps == 0.3 and built.inner.steps == 2
    # the substitute is a model; loading a checkpoint is the caller's part (commands, presets)
    with pytest.raises(AdvDefenseError, match="load_model_from_checkpoint"):
        TransferAttack(substitute="runs/substitute/last.pt", attack=inner)
