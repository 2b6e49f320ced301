"""Attacks that must not quietly do less than asked: EOT kept where randomness hides in the
backward pass, and Square's proposals (window side, windows that actually change)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from advdefense.attacks import APGD, EPGD, FAB, PGD, Square
from advdefense.attacks.base import AttackRecorder
from advdefense.randomness import StochasticModule, freeze


def tiny_net(seed: int = 0) -> nn.Sequential:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                             nn.Linear(4 * 8 * 8, 10)).eval()


def backward_noise(model: nn.Sequential, scale: float = 1.0) -> nn.Sequential:
    """Deterministic forward passes; Gaussian noise added to the input gradient by a full
    backward hook (randomness that a forward probe cannot see)."""

    def hook(module, grad_input, grad_output):
        return tuple(None if g is None else g + scale * torch.randn_like(g) for g in grad_input)

    model[0].register_full_backward_hook(hook)
    return model


class ForwardNoise(nn.Module):
    """A user's random model outside the randomness mechanism: nothing is declared."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x + 0.05 * torch.randn_like(x))


def data(n: int = 6):
    gen = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def backward_rows(attack, model, x, y) -> tuple[int, torch.Tensor]:
    recorder = AttackRecorder(x.shape[0])
    x_adv = attack(model, x, y, recorder=recorder)
    return recorder.backward_rows, x_adv


# -- EOT the caller set is never lowered -------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda k: PGD(eps=0.1, steps=3, eot_samples=k, seed=0),
    lambda k: APGD(eps=0.1, n_iter=3, eot_samples=k, seed=0),
    lambda k: FAB(eps=0.1, n_iter=2, eot_samples=k, seed=0),
], ids=["pgd", "apgd", "fab"])
def test_explicit_eot_is_kept_when_noise_hides_in_the_backward_pass(make):
    model = backward_noise(tiny_net())
    x, y = data()
    rows1, adv1 = backward_rows(make(1), model, x, y)
    rows8, adv8 = backward_rows(make(8), model, x, y)
    assert rows8 == 8 * rows1        # every gradient averaged over the 8 draws asked for
    if not isinstance(make(1), FAB):  # FAB's minimal points may coincide
        assert not torch.equal(adv1, adv8)


def test_explicit_eot_is_kept_on_a_deterministic_model_too():
    model = tiny_net()
    x, y = data()
    atk = PGD(eps=0.1, steps=2, eot_samples=4, seed=0)
    rows, _ = backward_rows(atk, model, x, y)
    assert rows == 2 * 4 * x.shape[0]
    assert atk.eot_given and atk.effective_eot(model, x, y) == 4


def test_default_eot_is_lowered_only_where_forward_and_gradients_agree(caplog):
    x, y = data()
    atk = EPGD(eps=0.1, steps=2, seed=0)          # EOT 8 by default
    for model in (backward_noise(tiny_net()), ForwardNoise(tiny_net())):
        with caplog.at_level(logging.INFO, logger="advdefense.attacks.base"):
            rows, _ = backward_rows(atk, model, x, y)
        assert rows == 2 * 8 * x.shape[0], type(model).__name__
        assert any("keeping eot_samples=8" in r.getMessage() for r in caplog.records)
        caplog.clear()
    with caplog.at_level(logging.INFO, logger="advdefense.attacks.base"):
        rows, _ = backward_rows(atk, tiny_net(), x, y)
    assert rows == 2 * x.shape[0]                # deterministic: one draw, and it is logged
    assert any("lowered to 1" in r.getMessage() for r in caplog.records)
    assert atk.eot_samples == 8 and not atk.eot_given
    assert "eot_samples=8" in repr(atk) and "eot_given" not in repr(atk)


def test_eot_on_a_frozen_model_is_lowered_unless_gradients_still_vary():
    """Fixed-draw protocols freeze the declared randomness on purpose: the repeats of one
    frozen draw are identical, unless randomness hides in the backward pass."""
    x, y = data()
    atk = PGD(eps=0.1, steps=2, eot_samples=4, seed=0)
    for model, rows in ((nn.Sequential(ShiftNoise(), tiny_net()).eval(), 1),
                        (nn.Sequential(ShiftNoise(), backward_noise(tiny_net())).eval(), 4)):
        with freeze(model):
            got, _ = backward_rows(atk, model, x, y)
        assert got == 2 * rows * x.shape[0]


def test_default_eot_probe_leaves_the_callers_rng_alone():
    x, y = data()
    model = backward_noise(tiny_net())
    torch.manual_seed(5)
    EPGD(eps=0.1, steps=1, seed=0).effective_eot(model, x, y)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(3), after)


# -- Square's proposals ------------------------------------------------------------------------
def test_square_window_side_is_capped_below_the_image_side():
    # p = 1 would cover the whole image: one position only, every proposal the same window
    x = torch.full((64, 1, 8, 8), 0.5)
    cand = Square(eps=0.1)._propose_linf(x, x.clone(), 1.0)
    changed = (cand != x)[:, 0]
    side_rows = changed.any(dim=2).sum(dim=1)
    side_cols = changed.any(dim=1).sum(dim=1)
    assert side_rows.max() <= 7 and side_cols.max() <= 7 and side_rows.min() >= 1
    # the window moves: more than one position is used
    assert len({tuple(r.nonzero()[0].tolist()) for r in changed.any(dim=2)}) > 1
    from advdefense.attacks.square import window_side

    assert window_side(1.0, 8, 8) == 7 and window_side(1.0, 28, 28) == 27
    assert window_side(0.0, 8, 8) == 1 and window_side(1.0, 1, 5) == 1
    for h in (5, 8, 28):
        s = window_side(1.0, h, h, "l2")
        assert 1 <= s <= h - 1
    assert window_side(0.01, 28, 28, "l2") == 3 and window_side(0.1, 28, 28, "l2") % 2 == 1


@pytest.mark.parametrize("channels", [1, 3])
def test_square_linf_proposal_always_changes_the_window(channels):
    torch.manual_seed(0)
    eps = 0.1
    atk = Square(eps=eps)
    x = torch.rand(500, channels, 8, 8)
    for xb in ((x + eps).clamp(0, 1),                  # one sign everywhere
               atk._init_linf(x)):                      # AutoAttack's vertical stripes
        for p in (0.01, 0.05, 0.3):
            cand = atk._propose_linf(x, xb, p)
            assert (cand != xb).flatten(1).any(dim=1).all(), (channels, p)
            assert ((cand - x).abs() <= eps + 1e-6).all()
            assert (cand >= 0).all() and (cand <= 1).all()


class ShiftNoise(StochasticModule):
    """Adds one random scalar per draw group."""

    def sample_state(self, x, groups):
        return 0.3 * torch.randn(groups)

    def forward_with_state(self, x, state):
        return x + state.repeat_interleave(x.shape[0] // state.shape[0]).view(
            -1, *([1] * (x.dim() - 1)))


def test_square_margin_never_rises_deterministic_but_can_under_eot():
    """What the docstring says: the recorded margin of the current point is monotone on a
    deterministic model; under EOT it is re-estimated on fresh draws at every query."""
    x, _ = data(8)
    with torch.no_grad():
        y = tiny_net()(x).argmax(1)  # all correct at the start
    atk = Square(eps=0.05, n_queries=30, seed=0)
    atk(tiny_net(), x, y)
    neg_margin = atk.trace.loss_matrix()
    assert (neg_margin[1:] >= neg_margin[:-1] - 1e-6).all()
    model = nn.Sequential(ShiftNoise(), tiny_net()).eval()
    atk = Square(eps=0.05, n_queries=30, eot_samples=2, seed=0)
    atk(model, x, y)
    neg_margin = atk.trace.loss_matrix()
    assert (neg_margin[1:] < neg_margin[:-1] - 1e-6).any()
