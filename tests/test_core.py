"""The evaluation core: declared settings and an exact identity, draws that do not depend on
chunking, fresh randomness per batch and per stage, and adaptive attacks that never lose to a
transfer from one draw."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from advdefense.attacks import APGD, ATTACKS, PGD, Square
from advdefense.attacks.base import eot_loss_grad
from advdefense.evaluation import AttackSpec, evaluate
from advdefense.evaluation.suite import run_suite
from advdefense.randomness import StochasticModule, get_states, replicated_forward


def test_repr_is_the_attack_identity():
    assert repr(PGD(eps=0.3, steps=20)) != repr(PGD(eps=0.3, steps=100))
    text = repr(PGD(eps=0.3, steps=20, step_size=0.01, loss="margin", seed=5))
    for part in ("steps=20", "step_size=0.01", "loss='margin'", "seed=5", "eot_samples=1",
                 "restarts=1", "random_start=True"):
        assert part in text, text
    assert "n_queries=5000" in repr(Square(eps=0.1)) and "p_init=0.8" in repr(Square(eps=0.1))
    assert repr(APGD(eps=0.1, n_iter=10)) != repr(APGD(eps=0.1, n_iter=100))


def test_every_attack_declares_its_settings():
    for name, cls in ATTACKS.items():
        params = inspect.signature(cls.__init__).parameters.values()
        assert not any(p.kind is p.VAR_KEYWORD for p in params), f"{name} takes **kwargs"


class Shift(StochasticModule):
    """Adds one random vector per draw group (the same shape in both layers below)."""

    def sample_state(self, x, groups):
        return torch.randn(groups, x.shape[1])

    def forward_with_state(self, x, state):
        return x + state.repeat_interleave(x.shape[0] // state.shape[0], dim=0)


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.lin, self.b = Shift(), nn.Linear(6, 6), Shift()
        self.out = nn.Linear(6, 4)

    def forward(self, x):
        return self.out(torch.tanh(self.b(self.lin(self.a(x)))))


def test_draws_do_not_depend_on_chunking_with_two_stochastic_layers():
    torch.manual_seed(0)
    model = TwoLayers().eval()
    x, y = torch.rand(5, 6), torch.randint(0, 4, (5,))
    ref = eot_loss_grad(model, x, y, "ce", eot_samples=8, seed=11)
    a, b = get_states(model)
    assert not torch.equal(a, b), "two layers of one draw must not share their noise"
    for max_batch in (10, 7, 5):  # 2, 1 and 1 draws per pass
        got = eot_loss_grad(model, x, y, "ce", eot_samples=8, seed=11, max_batch=max_batch)
        assert torch.allclose(got.loss, ref.loss, atol=1e-6)
        assert torch.allclose(got.grad, ref.grad, atol=1e-6)
        assert torch.allclose(got.logits, ref.logits, atol=1e-6)
    # consecutive calls without a seed draw fresh randomness
    first = eot_loss_grad(model, x, y, "ce", eot_samples=8)
    second = eot_loss_grad(model, x, y, "ce", eot_samples=8)
    assert not torch.allclose(first.loss, second.loss)


def test_replicated_forward_restores_the_callers_random_stream():
    model = TwoLayers().eval()
    x = torch.rand(3, 6)
    torch.manual_seed(0)
    replicated_forward(model, x, 4, lambda xr, s, k0, kc: model(xr), max_batch=6)
    after_small = torch.rand(1)
    torch.manual_seed(0)
    replicated_forward(model, x, 4, lambda xr, s, k0, kc: model(xr), max_batch=4096)
    assert torch.equal(after_small, torch.rand(1))


class Capture(PGD):
    """PGD that keeps every output."""

    def __call__(self, *args, **kw):
        out = super().__call__(*args, **kw)
        self.outputs.append(out)
        return out


def test_every_batch_gets_its_own_random_start():
    """The same example in two batches must not replay the same random start."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 3)).eval()
    x1 = torch.rand(1, 6) * 0.5 + 0.25
    x, y = x1.repeat(4, 1), torch.zeros(4, dtype=torch.long)
    runs = []
    for _ in range(2):
        atk = Capture(eps=0.1, steps=1, step_size=1e-6, seed=3)  # x_adv ~ the random start
        atk.outputs = []
        evaluate(model, (x, y), [AttackSpec("pgd", atk)], batch_size=2, checks=None)
        runs.append(torch.cat(atk.outputs))
    assert not torch.allclose(runs[0][0], runs[0][2]), "batch 2 replayed batch 1's start"
    assert torch.equal(runs[0], runs[1]), "seeded: reproducible"


def test_suite_stages_keep_their_own_seeds():
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 4)).eval()
    x, y = torch.rand(6, 1, 1, 6), torch.randint(0, 4, (6,))
    res = run_suite(model, (x, y), suite="standard", eps=0.01, seed=7, checks=None,
                    batch_size=3)
    seeds = [e.attack.split("seed=")[1].split(",")[0].rstrip(")")
             for e in res.entries.values() if "seed=" in e.attack]
    assert len(seeds) >= 2 and len(set(seeds)) == len(seeds), seeds


class MisleadingNoise(StochasticModule):
    """Logits get ``s * 20 * (v . x)`` on the last class with ``s = +-1`` per draw: on one draw
    the input gradient is dominated by ``+-v``, whose effect averages out over draws."""

    def __init__(self, v: torch.Tensor):
        super().__init__()
        self.register_buffer("v", v)

    def sample_state(self, x, groups):
        return torch.randint(0, 2, (groups,)).float() * 2 - 1

    def forward_with_state(self, x, state):
        s = state.repeat_interleave(x.shape[0] // state.shape[0])
        return s * 20 * (x.flatten(1) @ self.v)


class Misleading(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        torch.manual_seed(1)
        self.lin = nn.Linear(d, 3)
        self.noise = MisleadingNoise(torch.randn(d))

    def forward(self, x):
        z = self.lin(x.flatten(1))
        extra = self.noise(x)
        return torch.cat([z[:, :2], z[:, 2:] + extra[:, None]], dim=1)


def test_eot_apgd_is_not_weaker_than_a_transfer_from_one_draw():
    torch.manual_seed(0)
    model = Misleading().eval()
    x = torch.rand(40, 16) * 0.5 + 0.25
    with torch.no_grad():
        y = model.lin(x).argmax(1)
    specs = [AttackSpec("apgd", APGD(eps=0.15, n_iter=30, seed=0), "paper"),
             AttackSpec("apgd", APGD(eps=0.15, n_iter=30, eot_samples=8, seed=0), "fresh")]
    res = evaluate(model, (x, y), specs, repeats=10, checks=None)
    paper = res.accuracy("apgd/paper").value
    fresh = res.accuracy("apgd/fresh").value
    assert fresh <= paper, (fresh, paper)
    assert len(res.entries["apgd/paper"].states) == 1  # one frozen draw per batch, recorded


def test_frozen_protocols_run_gradient_attacks_on_weight_noise():
    """The frozen draw of a batch is made without autograd but must be usable by it (PNI's
    weight noise is multiplied into the weights inside the attack's backward pass)."""
    from advdefense.defenses.noise import inject

    torch.manual_seed(0)
    model = inject(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), kind="pni",
                   where="weights").eval()
    x, y = torch.rand(8, 16), torch.randint(0, 3, (8,))
    specs = [AttackSpec("pgd", PGD(eps=0.1, steps=3), p) for p in ("paper", "fixed")]
    res = evaluate(model, (x, y), specs, repeats=3, checks=None, batch_size=4)
    assert all(len(e.states) == 2 for e in res.entries.values())  # one frozen draw per batch


class MemoryLimit(nn.Module):
    """Raises the device's out-of-memory error above ``limit`` rows (a fake allocator)."""

    def __init__(self, model, limit):
        super().__init__()
        self.model, self.limit, self.rows = model, limit, []

    def forward(self, x):
        self.rows.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"fake: {x.shape[0]} rows > {self.limit}")
        return self.model(x)


def test_out_of_memory_halves_the_chunk_and_keeps_the_draws():
    torch.manual_seed(0)
    inner = TwoLayers().eval()
    x, y = torch.rand(6, 6), torch.randint(0, 4, (6,))
    ref = eot_loss_grad(inner, x, y, "ce", eot_samples=8, seed=5)
    limited = MemoryLimit(inner, limit=7)
    got = eot_loss_grad(limited, x, y, "ce", eot_samples=8, seed=5, max_batch=4096)
    assert max(limited.rows) > 7 and any(r <= 7 for r in limited.rows)  # it retried smaller
    assert torch.allclose(got.loss, ref.loss, atol=1e-6)
    assert torch.allclose(got.grad, ref.grad, atol=1e-6)
    # the verdict and FAB's Jacobians go through the same loop
    from advdefense.attacks.fab import logit_diff_grads
    from advdefense.evaluation.protocols import predictions

    limited.rows.clear()
    assert predictions(limited, x, repeats=4).shape == (4, 6)
    others = torch.stack([(y + j) % 4 for j in (1, 2)], dim=1)
    torch.manual_seed(0)
    d0, g0 = logit_diff_grads(inner, x, y, others, eot_samples=4)
    torch.manual_seed(0)
    d1, g1 = logit_diff_grads(MemoryLimit(inner, limit=5), x, y, others, eot_samples=4)
    assert torch.allclose(d0, d1, atol=1e-6) and torch.allclose(g0, g1, atol=1e-6)


def test_rna_shared_paths_stay_shared_under_seeded_draw_groups(monkeypatch):
    """mixed=False: every RNA layer of one draw uses the same type, also when each draw group
    is drawn under its own seed; the groups differ and the draws do not depend on chunking."""
    from advdefense import randomness
    from advdefense.defenses import rna

    # the draws stacked in one pass (the CPU default for per-call paths is a pass per draw)
    monkeypatch.setattr(randomness, "groups_batch_cheaply", lambda model: True)

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Flatten(), nn.Linear(4 * 36, 3))
    model = rna.convert(net, space=("bn", "in", "ln"), mixed=False).eval()
    x, y = torch.rand(2, 1, 6, 6), torch.randint(0, 3, (2,))
    ref = eot_loss_grad(model, x, y, "ce", eot_samples=12, seed=3)
    first, second = (s.types for s in get_states(model))
    assert torch.equal(first, second) and len(first) == 12 and len(first.unique()) > 1
    got = eot_loss_grad(model, x, y, "ce", eot_samples=12, seed=3, max_batch=4)
    assert torch.allclose(got.loss, ref.loss, atol=1e-6)
