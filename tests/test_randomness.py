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
