"""FAB / FAB-T (Croce & Hein 2020) and Square (Andriushchenko et al. 2020)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import Bounds, LinearConstraint, linprog, minimize
from torch import nn

from advdefense.attacks import ATTACKS, FAB, FABT, Square, build_attack
from advdefense.attacks.fab import project_hyperplane_box
from advdefense.attacks.square import pseudo_gaussian, square_p
from advdefense.errors import AdvDefenseError
from advdefense.randomness import StochasticModule, current_groups

from .conftest import make_smallcnn


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_registry():
    assert ATTACKS["fab"] is FAB and ATTACKS["fab-t"] is FABT and ATTACKS["square"] is Square
    fab = build_attack("fab-t", eps=0.3)
    assert (fab.n_iter, fab.n_target_classes, fab.alpha_max, fab.eta, fab.beta) == (
        100, 9, 0.1, 1.05, 0.9)
    sq = build_attack("square", eps=0.3)
    assert (sq.n_queries, sq.p_init) == (5000, 0.8)


# --------------------------------------------------------------------------- projection
def _reference_projection(x, w, c, norm):
    d = len(x)
    bounds = [(-a, 1 - a) for a in x]
    if norm == "l2":
        r = minimize(lambda z: (z ** 2).sum(), np.zeros(d), jac=lambda z: 2 * z,
                     hess=lambda z: 2 * np.eye(d), method="trust-constr",
                     constraints=[LinearConstraint(w[None], c, c)],
                     bounds=Bounds([b[0] for b in bounds], [b[1] for b in bounds]),
                     options={"gtol": 1e-12, "xtol": 1e-12, "maxiter": 3000})
        return np.sqrt(r.fun)
    a_ub = np.block([[np.eye(d), -np.ones((d, 1))], [-np.eye(d), -np.ones((d, 1))]])
    r = linprog(np.r_[np.zeros(d), 1.0], A_ub=a_ub, b_ub=np.zeros(2 * d),
                A_eq=np.r_[w, 0.0][None], b_eq=[c], bounds=bounds + [(0, None)])
    return r.fun if r.status == 0 else None


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_hyperplane_projection_is_the_constrained_minimum(norm):
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for _ in range(40):
        d = 7
        x = torch.rand(1, d, generator=gen, dtype=torch.float64)
        w = torch.randn(1, d, generator=gen, dtype=torch.float64)
        w[0, 0] = 0.0  # a zero coordinate must stay still
        c = torch.randn(1, generator=gen, dtype=torch.float64)
        delta = project_hyperplane_box(x, w, c, norm)
        assert ((x + delta) >= -1e-12).all() and ((x + delta) <= 1 + 1e-12).all()
        assert delta[0, 0] == 0
        hi = (w.clamp_min(0) * (1 - x) - w.clamp_max(0) * x).sum().item()   # max <w, delta>
        lo = (w.clamp_max(0) * (1 - x) - w.clamp_min(0) * x).sum().item()   # min <w, delta>
        if not lo <= c.item() <= hi:  # infeasible: the box vertex that gets closest
            assert abs((w * delta).sum().item() - (hi if c > 0 else lo)) < 1e-9
            continue
        ref = _reference_projection(x[0].numpy(), w[0].numpy(), c.item(), norm)
        checked += 1
        assert abs((w * delta).sum().item() - c.item()) < 1e-9
        size = delta.abs().max().item() if norm == "linf" else delta.norm().item()
        assert size == pytest.approx(ref, rel=1e-4, abs=1e-6)
    assert checked >= 10


def test_fab_finds_the_exact_boundary_distance_of_a_linear_model():
    """For an affine classifier the minimal L-inf distance to class c's boundary is
    (z_y - z_c) / ||w_y - w_c||_1 (box inactive); FAB must get within eta (1.05) of it."""
    torch.manual_seed(0)
    lin = nn.Linear(20, 4)
    with torch.no_grad():
        lin.weight.mul_(0.2)
    model = nn.Sequential(nn.Flatten(), lin).eval()
    x = 0.5 + 0.02 * torch.randn(12, 20)
    with torch.no_grad():
        z = model(x)
    y = z.argmax(1)
    w, zz = lin.weight, z
    dist = torch.full((12,), float("inf"))
    for c in range(4):
        dc = (zz[torch.arange(12), y] - zz[:, c]) / (w[y] - w[c]).abs().sum(1)
        dist = torch.where(y == c, dist, torch.minimum(dist, dc.detach()))
    assert (dist < 0.4).all()  # the box constraint never binds
    for atk in (FAB(eps=1.0, n_iter=30), FABT(eps=1.0, n_iter=30, n_target_classes=3)):
        x_adv = atk(model, x, y)
        found = (x_adv - x).abs().flatten(1).max(1).values
        assert atk.trace.returned_adversarial.all()
        assert (found >= dist * (1 - 1e-4)).all(), "closer than the exact minimum: wrong"
        assert (found <= dist * 1.06).all(), (found / dist)
        losses = atk.trace.loss_matrix()
        assert torch.isfinite(losses).all() and not atk.maximizes_loss


@settings(max_examples=6, deadline=None)
@given(eps=st.floats(0.0, 0.6), norm=st.sampled_from(["linf", "l2"]),
       name=st.sampled_from(["fab", "fab-t", "square"]), seed=st.integers(0, 10))
def test_fab_and_square_stay_in_ball_and_box(eps, norm, name, seed):
    torch.manual_seed(seed)
    model = make_smallcnn(dataset="digits").eval()
    x = torch.rand(5, 1, 8, 8)
    y = torch.randint(0, 10, (5,))
    kw = dict(n_queries=20) if name == "square" else dict(n_iter=3)
    if name == "fab-t":
        kw["n_target_classes"] = 2
    x_adv = build_attack(name, eps=eps, norm=norm, seed=seed, **kw)(model, x, y)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().max(1).values if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-5).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1


@pytest.mark.parametrize("name", ["fab-t", "square"])
def test_mode_batchnorm_and_seed(standard_model, mnist_test, name):
    x, y = mnist_test[0][:12], mnist_test[1][:12]
    kw = dict(n_queries=40) if name == "square" else dict(n_iter=4, n_target_classes=2)
    standard_model.train()
    before = {k: v.clone() for k, v in standard_model.state_dict().items()}
    try:
        a = build_attack(name, eps=0.2, seed=4, **kw)(standard_model, x, y)
        assert standard_model.training
        for k, v in standard_model.state_dict().items():
            assert torch.equal(v, before[k]), k
        b = build_attack(name, eps=0.2, seed=4, **kw)(standard_model, x, y)
        assert torch.equal(a, b)
    finally:
        standard_model.eval()


def test_fab_t_returns_minimal_points_within_eps(standard_model, mnist_test):
    x, y = mnist_test[0][:40], mnist_test[1][:40]
    atk = FABT(eps=0.3, n_iter=30, n_target_classes=3, seed=0)
    x_adv = atk(standard_model, x, y)
    with torch.no_grad():
        fooled = standard_model(x_adv).argmax(1) != y
    ret = atk.trace.returned_adversarial
    assert torch.equal(fooled & ret, ret)
    assert torch.equal(x_adv[~ret], x[~ret]), "a failed minimum-norm attack returns x itself"
    assert ret.float().mean() > 0.5
    size = (x_adv - x).abs().flatten(1).max(1).values
    assert (size[ret] > 0).all() and (size <= 0.3 + 1e-6).all()


# --------------------------------------------------------------------------- square
def test_p_schedule_and_pattern():
    assert square_p(0, 10000, 0.8) == 0.8 and square_p(10, 10000, 0.8) == 0.8
    assert square_p(11, 10000, 0.8) == 0.4 and square_p(8001, 10000, 0.8) == 0.8 / 512
    # AutoAttack's standard version: the raw query index, whatever the budget
    for n_queries in (1000, 5000, 10000):
        assert square_p(2500, n_queries, 0.8) == 0.8 / 64   # 2500 in (2000, 4000]
        assert square_p(50, n_queries, 0.8) == 0.4 and square_p(51, n_queries, 0.8) == 0.2
    assert square_p(4999, 5000, 0.8) == 0.8 / 128         # 4999 in (4000, 6000]
    # the paper's rescaling to the budget, as an option: j = i / n_queries * 10^4
    assert square_p(2500, 5000, 0.8, rescale=True) == 0.8 / 128  # j = 5000
    assert square_p(2500, 10000, 0.8, rescale=True) == 0.8 / 64  # j = 2500
    pat = pseudo_gaussian(5)
    assert pat.norm().item() == pytest.approx(1.0)
    assert (pat[:2] > 0).all() and (pat[2:] < 0).all()
    assert pat[1, 2] == pat[1].max()  # peak at the centre of each half


def test_square_best_margin_never_gets_worse_and_only_queries_unfooled(standard_model,
                                                                      mnist_test):
    x, y = mnist_test[0][:30], mnist_test[1][:30]
    sizes = []

    class Counting(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, z):
            sizes.append(z.shape[0])
            return self.inner(z)

    for norm, eps in (("linf", 0.3), ("l2", 3.0)):
        sizes.clear()
        atk = Square(eps=eps, norm=norm, n_queries=150, seed=0)
        x_adv = atk(Counting(standard_model), x, y)
        losses = atk.trace.loss_matrix()
        assert losses.shape == (len(sizes), 30)
        assert (losses[1:] >= losses[:-1] - 1e-6).all(), "best-so-far loss got worse"
        assert all(a >= b for a, b in zip(sizes, sizes[1:], strict=False)), "queried fooled points"
        with torch.no_grad():
            fooled = standard_model(x_adv).argmax(1) != y
        assert torch.equal(fooled, atk.trace.returned_adversarial)
        # the number of rows of the last query is the number of examples still unfooled then
        assert sizes[-1] >= int((~fooled).sum())
        assert fooled.float().mean() > 0.1


class ShiftNoise(StochasticModule):
    """Adds one random scalar per draw group."""

    def __init__(self):
        super().__init__()
        self.groups_seen: list[int] = []

    def sample_state(self, x, groups):
        self.groups_seen.append(current_groups())  # draw groups of the forward call
        return 0.05 * torch.randn(groups)

    def forward_with_state(self, x, state):
        return x + state.repeat_interleave(x.shape[0] // state.shape[0]).view(
            -1, *([1] * (x.dim() - 1)))


def test_square_eot_is_batched_under_draw_groups():
    torch.manual_seed(0)
    noise = ShiftNoise()
    model = nn.Sequential(noise, make_smallcnn(dataset="digits")).eval()
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,))
    rows = []
    model.register_forward_pre_hook(lambda m, inp: rows.append((inp[0].shape[0],
                                                                current_groups())))
    Square(eps=0.1, n_queries=5, eot_samples=4, seed=0)(model, x, y)
    # scoring passes use the 4 EOT draws; confirming a success uses confirm_draws = 10
    assert rows and all(g in (4, 10) and r % g == 0 for r, g in rows)
    assert set(noise.groups_seen) <= {4, 10} and 4 in noise.groups_seen


def test_square_rejects_non_images():
    with pytest.raises(AdvDefenseError):
        Square(eps=0.1, n_queries=3)(nn.Linear(4, 3).eval(), torch.rand(2, 4),
                                     torch.zeros(2, dtype=torch.long))


def test_logit_difference_gradients_match_a_loop_over_draws_and_classes():
    """FAB's batched EOT Jacobian of z_y - z_c equals a loop over draws and classes, chunked
    or not."""
    from advdefense.attacks.fab import logit_diff_grads

    from .test_attacks_core import NoisyLinear

    torch.manual_seed(0)
    model = NoisyLinear(4, 5)
    x, y = torch.rand(6, 4), torch.randint(0, 5, (6,))
    others = torch.stack([(y + j) % 5 for j in range(1, 5)], dim=1)
    k = 3
    torch.manual_seed(2)
    logit_diff_grads(model, x, y, others, eot_samples=k)
    states = model.last_state  # the k draws of that call
    assert states.shape[0] == k
    ref_d = torch.zeros(6, 4)
    ref_g = torch.zeros(6, 4, 4)
    for j in range(k):
        for c in range(4):
            xi = x.clone().requires_grad_(True)
            z = model.forward_with_state(xi, states[j:j + 1])
            d = z.gather(1, y[:, None])[:, 0] - z.gather(1, others[:, c:c + 1])[:, 0]
            (g,) = torch.autograd.grad(d.sum(), xi)
            ref_d[:, c] += d.detach() / k
            ref_g[:, c] += g / k
    for max_batch in (4096, 12):  # 12 rows: two draws per pass
        torch.manual_seed(2)
        d, g = logit_diff_grads(model, x, y, others, eot_samples=k, max_batch=max_batch)
        assert torch.allclose(d, ref_d, atol=1e-6) and torch.allclose(g, ref_g, atol=1e-6)
