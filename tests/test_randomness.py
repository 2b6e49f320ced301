"""The shared randomness mechanism (DESIGN.md contract 2)."""

from __future__ import annotations

import torch

from advdefense.randomness import (
    StochasticModule,
    draw_groups,
    freeze,
    get_states,
    is_stochastic,
    seeded,
)


class Offset(StochasticModule):
    def sample_state(self, x, groups):
        return torch.randn(groups)

    def forward_with_state(self, x, state):
        return x + state.repeat_interleave(x.shape[0] // state.shape[0])[:, None]


def test_fresh_by_default_and_frozen_inside_freeze():
    layer, x = Offset(), torch.zeros(4, 1)
    assert not torch.equal(layer(x), layer(x))
    with freeze(layer):
        a, b = layer(x), layer(x)
        assert torch.equal(a, b)
        assert not is_stochastic(layer)
    assert is_stochastic(layer)
    assert not torch.equal(layer(x), layer(x))


def test_freeze_with_explicit_state_and_nesting():
    layer, x = Offset(), torch.zeros(2, 1)
    with freeze(layer, states=[torch.tensor([3.0])]):
        assert torch.equal(layer(x), torch.full((2, 1), 3.0))
        with freeze(layer, states=[torch.tensor([5.0])]):
            assert torch.equal(layer(x), torch.full((2, 1), 5.0))
        assert torch.equal(layer(x), torch.full((2, 1), 3.0))


def test_draw_groups_gives_one_draw_per_copy():
    layer, x = Offset(), torch.zeros(3, 1)
    with draw_groups(4):
        out = layer(x.repeat(4, 1)).view(4, 3)
    assert (out == out[:, :1]).all()  # one value per copy
    assert len(out[:, 0].unique()) == 4  # independent copies
    assert get_states(layer)[0].shape == (4,)


def test_seeded_reproduces_and_restores_rng():
    layer, x = Offset(), torch.zeros(2, 1)
    torch.manual_seed(0)
    with seeded(7):
        a = layer(x)
    after = torch.rand(1)
    torch.manual_seed(0)
    with seeded(7):
        b = layer(x)
    assert torch.equal(a, b) and torch.equal(torch.rand(1), after)


def _rows_per_forward(model, run):
    rows = []
    hook = model.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    try:
        result = run()
    finally:
        hook.remove()
    return rows, result


def test_cpu_eot_runs_one_draw_per_pass_where_groups_cost_extra(monkeypatch):
    """Weight noise and per-call RNA paths pay per draw group (a kernel or a norm per group),
    so on the CPU each EOT draw gets its own pass; per-row input noise stays batched. The
    estimate is the same either way: draws are seeded per copy, not per pass."""
    from advdefense import randomness
    from advdefense.attacks.base import eot_loss_grad
    from advdefense.defenses import noise, rna

    from .conftest import make_smallcnn

    x, y = torch.rand(3, 1, 28, 28), torch.tensor([0, 1, 2])
    models = {
        "pni": noise.inject(make_smallcnn(), kind="pni", where="weights").eval(),
        "rna": rna.convert(make_smallcnn(), space=("bn", "in")).eval(),
        "input": noise.WithInputNoise(make_smallcnn(), noise.GaussianInput(0.1)).eval(),
    }
    for kind, model in models.items():
        def run(m=model):
            return eot_loss_grad(m, x, y, "ce", eot_samples=4, seed=5)
        rows, per_pass = _rows_per_forward(model, run)
        assert rows == ([3] * 4 if kind != "input" else [12]), kind
        with monkeypatch.context() as mp:  # force the stacked pass: the same draws
            mp.setattr(randomness, "groups_batch_cheaply", lambda m: True)
            rows, stacked = _rows_per_forward(model, run)
        assert rows == [12], kind
        torch.testing.assert_close(per_pass.loss, stacked.loss, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(per_pass.grad, stacked.grad, rtol=1e-3, atol=1e-6)
    # per-example RNA paths cost the same whatever the groups: stacked
    sample = rna.convert(make_smallcnn(), space=("bn", "in"), granularity="sample").eval()
    rows, _ = _rows_per_forward(sample, lambda: eot_loss_grad(sample, x, y, "ce",
                                                              eot_samples=4, seed=5))
    assert rows == [12]
