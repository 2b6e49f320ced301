"""Confidence intervals for accuracies (DESIGN.md contract 4).

Every accuracy this package reports carries an exact two-sided 95% Clopper–Pearson interval
(Clopper & Pearson 1934): the interval of binomial proportions whose tails contain the observed
count with probability alpha/2 each, i.e. ``Beta(alpha/2; k, n-k+1)`` and
``Beta(1-alpha/2; k+1, n-k)`` (quantiles from ``scipy.stats.beta``; the same numbers as
``scipy.stats.binomtest(k, n).proportion_ci(method="exact")``). It is conservative
(coverage >= 95%), which suits robustness claims. :func:`clopper_pearson_lower` is the
one-sided lower bound smoothing certification uses (Cohen et al. 2019).

Two models evaluated on the same examples are compared per example with the exact McNemar test
(:func:`mcnemar_exact`), not by overlapping intervals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from scipy.stats import beta

__all__ = ["Accuracy", "McNemar", "accuracy", "clopper_pearson", "clopper_pearson_lower",
           "mcnemar_exact"]


def _check_counts(correct: int, n: int) -> None:
    if n < 0 or correct < 0 or correct > n:
        raise ValueError(f"need 0 <= correct <= n, got correct={correct}, n={n}")


def clopper_pearson(correct: int, n: int, *, alpha: float = 0.05) -> tuple[float, float]:
    """Exact two-sided ``1 - alpha`` interval for a proportion ``correct / n``;
    ``(nan, nan)`` if n == 0."""
    _check_counts(correct, n)
    if n == 0:
        return math.nan, math.nan
    k, n = int(correct), int(n)
    low = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high


def clopper_pearson_lower(correct: int, n: int, alpha: float = 0.05) -> float:
    """One-sided ``1 - alpha`` Clopper–Pearson lower bound on ``correct / n`` (0 if none)."""
    _check_counts(correct, n)
    if correct == 0:
        return 0.0
    return float(beta.ppf(alpha, int(correct), int(n) - int(correct) + 1))


@dataclass(frozen=True)
class Accuracy:
    """``correct`` out of ``n`` with its Clopper–Pearson interval ``[low, high]``."""

    correct: int
    n: int
    low: float
    high: float

    @property
    def value(self) -> float:
        return self.correct / self.n if self.n else math.nan

    def as_dict(self) -> dict[str, float | int]:
        return {"accuracy": self.value, "correct": self.correct, "n": self.n,
                "ci_low": self.low, "ci_high": self.high}

    def __str__(self) -> str:
        if not self.n:
            return "n/a"
        return f"{100 * self.value:.1f}% [{100 * self.low:.1f}, {100 * self.high:.1f}]"


def accuracy(mask: torch.Tensor, *, alpha: float = 0.05) -> Accuracy:
    """Accuracy of a per-example boolean tensor, with its interval."""
    mask = torch.as_tensor(mask).bool().flatten()
    k, n = int(mask.sum()), int(mask.numel())
    low, high = clopper_pearson(k, n, alpha=alpha)
    return Accuracy(k, n, low, high)


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test of two paired per-example correctness vectors ``a`` and ``b``.

    ``only_a``: examples ``a`` gets right and ``b`` wrong; ``only_b``: the reverse; ``both`` and
    ``neither`` are the concordant pairs (they carry no information on the difference).
    ``p_value`` is two-sided.
    """

    n: int
    both: int
    only_a: int
    only_b: int
    neither: int
    p_value: float

    @property
    def difference(self) -> float:
        """``accuracy(a) - accuracy(b)`` on the paired examples."""
        return (self.only_a - self.only_b) / self.n if self.n else math.nan

    def decided(self, alpha: float = 0.05) -> bool:
        """True when the two accuracies differ at level ``alpha``."""
        return self.p_value < alpha

    def as_dict(self) -> dict[str, float | int]:
        return {"n": self.n, "both": self.both, "only_a": self.only_a, "only_b": self.only_b,
                "neither": self.neither, "p_value": self.p_value,
                "difference": self.difference}


def mcnemar_exact(a, b) -> McNemar:
    """Exact two-sided McNemar test (McNemar 1947) of per-example boolean correctness vectors
    ``a`` and ``b`` of the same examples (tensors, arrays or lists, same length).

    Under the null hypothesis that both have the same accuracy, each of the ``d = only_a +
    only_b`` discordant pairs is equally likely to favour either side, so ``only_a ~
    Binomial(d, 1/2)``; the p-value is the exact two-sided binomial test
    (``scipy.stats.binomtest``). With no discordant pair the p-value is 1.
    """
    from scipy.stats import binomtest

    a = torch.as_tensor(a).bool().flatten()
    b = torch.as_tensor(b).bool().flatten()
    if a.shape != b.shape:
        raise ValueError(f"paired vectors must have the same length, got {a.numel()} and "
                         f"{b.numel()}")
    both = int((a & b).sum())
    only_a = int((a & ~b).sum())
    only_b = int((~a & b).sum())
    neither = int((~a & ~b).sum())
    d = only_a + only_b
    p = 1.0 if d == 0 else float(binomtest(only_a, d, 0.5, alternative="two-sided").pvalue)
    return McNemar(int(a.numel()), both, only_a, only_b, neither, min(1.0, p))
