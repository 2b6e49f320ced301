"""Exact McNemar test of paired per-example correctness vectors."""

from __future__ import annotations

import math

import pytest
import torch

from advdefense.evaluation.stats import mcnemar_exact


def test_exact_p_value_from_the_discordant_pairs():
    # 8 examples only a gets right, 1 only b, plus concordant pairs (which do not matter)
    a = [1] * 8 + [0] * 1 + [1] * 20 + [0] * 30
    b = [0] * 8 + [1] * 1 + [1] * 20 + [0] * 30
    t = mcnemar_exact(a, b)
    assert (t.n, t.only_a, t.only_b, t.both, t.neither) == (59, 8, 1, 20, 30)
    # two-sided exact binomial: P(X <= 1) + P(X >= 8) for X ~ Bin(9, 1/2) = 2 * 10 / 512
    assert t.p_value == pytest.approx(20 / 512)
    assert t.decided() and not t.decided(alpha=0.01)
    assert t.difference == pytest.approx(7 / 59)
    # symmetric in the two sides, and concordant pairs change nothing
    assert mcnemar_exact(b, a).p_value == pytest.approx(t.p_value)
    assert mcnemar_exact(a[:9], b[:9]).p_value == pytest.approx(t.p_value)


def test_no_discordant_pairs_and_tensor_inputs():
    x = torch.tensor([True, False, True])
    t = mcnemar_exact(x, x.clone())
    assert t.p_value == 1.0 and t.difference == 0.0
    # a worst case is a per-example AND, so it is never above the figure it is taken from
    paper = torch.tensor([1, 1, 1, 1, 1, 1, 0], dtype=torch.bool)
    worst = paper & torch.tensor([0, 0, 0, 0, 0, 0, 1], dtype=torch.bool)
    t = mcnemar_exact(worst, paper)
    assert t.only_a == 0 and t.only_b == 6 and t.p_value == pytest.approx(2 * 0.5**6)
    assert t.as_dict()["difference"] == pytest.approx(-6 / 7)
    assert math.isclose(mcnemar_exact([1], [0]).p_value, 1.0)


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same length"):
        mcnemar_exact([1, 0], [1, 0, 1])
