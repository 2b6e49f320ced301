"""Confidence intervals for accuracies (DESIGN.md contract 4).

Every accuracy this package reports carries an exact two-sided 95% Clopper–Pearson interval
(Clopper & Pearson 1934): the interval of binomial proportions whose tails contain the observed
count with probability alpha/2 each, i.e. ``Beta(alpha/2; k, n-k+1)`` and
``Beta(1-alpha/2; k+1, n-k)`` (quantiles from ``scipy.stats.beta``; the same numbers as
``scipy.stats.binomtest(k, n).proportion_ci(method="exact")``). It is conservative
(coverage >= 95%), which suits robustness claims. :func:`clopper_pearson_lower` is the
one-sided lower bound smoothing certification uses (Cohen et al. 2019).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from scipy.stats import beta

__all__ = ["Accuracy", "accuracy", "clopper_pearson", "clopper_pearson_lower"]


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
