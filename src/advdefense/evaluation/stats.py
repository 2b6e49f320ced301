"""Confidence intervals for accuracies (DESIGN.md contract 4).

Every accuracy this package reports carries an exact two-sided 95% Clopper–Pearson interval
(Clopper & Pearson 1934): the interval of binomial proportions whose tails contain the observed
count with probability alpha/2 each, i.e. ``Beta(alpha/2; k, n-k+1)`` and
``Beta(1-alpha/2; k+1, n-k)`` (quantiles from ``scipy.stats.beta``; the same numbers as
``scipy.stats.binomtest(k, n).proportion_ci(method="exact")``). It is conservative
(coverage >= 95%), which suits robustness claims. :func:`clopper_pearson_lower` is the
one-sided lower bound smoothing certification uses (Cohen et al. 2019).

Two models evaluated on the same examples are compared per example with the exact McNemar test
(:func:`mcnemar_exact`), not by overlapping intervals. Where the examples are not independent
(a random draw shared by a batch, as RNA's path pair per batch), :func:`cluster_sign_flip`
tests the per-cluster differences instead. :func:`holm` adjusts a report's family of p-values
for multiple testing (Holm 1979).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from scipy.stats import beta

__all__ = ["Accuracy", "ClusterTest", "McNemar", "accuracy", "cluster_sign_flip",
           "clopper_pearson", "clopper_pearson_lower", "holm", "mcnemar_exact"]


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


@dataclass(frozen=True)
class ClusterTest:
    """Sign-flip test of paired correctness vectors whose examples come in clusters.

    ``clusters``: clusters with a non-zero difference (the others carry no information);
    ``exact``: every sign pattern was enumerated (else ``resamples`` random ones); ``min_p``:
    the smallest p-value this many clusters can give, so a reader sees when the design cannot
    decide anything.
    """

    n: int
    clusters: int
    only_a: int
    only_b: int
    p_value: float
    exact: bool
    min_p: float

    @property
    def difference(self) -> float:
        return (self.only_a - self.only_b) / self.n if self.n else math.nan

    def decided(self, alpha: float = 0.05) -> bool:
        return self.p_value < alpha

    def as_dict(self) -> dict[str, float | int | bool]:
        return {"n": self.n, "clusters": self.clusters, "only_a": self.only_a,
                "only_b": self.only_b, "p_value": self.p_value, "exact": self.exact,
                "min_p": self.min_p, "difference": self.difference}


def cluster_sign_flip(a, b, clusters, *, exact_limit: int = 16, resamples: int = 20000,
                      seed: int = 0) -> ClusterTest:
    """Two-sided sign-flip (randomization) test of ``accuracy(a) - accuracy(b)`` over clusters.

    ``clusters`` gives each example's cluster id (e.g. the batch whose examples shared one
    random path pair). The statistic is ``T = |sum_c d_c|`` with ``d_c = sum_{i in c} (a_i -
    b_i)``. Under the null hypothesis that ``a`` and ``b`` are exchangeable within each cluster
    the sign of every ``d_c`` is a fair coin, independently across clusters (the clusters, not
    the examples, are the independent units), so ``p = P(|sum_c s_c d_c| >= T)`` over random
    signs ``s_c``: exact over all ``2^C`` patterns when ``C <= exact_limit`` non-zero clusters,
    else Monte Carlo with ``resamples`` seeded draws, ``p = (1 + hits) / (1 + resamples)``.
    """
    a = torch.as_tensor(a).bool().flatten()
    b = torch.as_tensor(b).bool().flatten()
    ids = torch.as_tensor(clusters).flatten()
    if a.shape != b.shape or ids.shape != a.shape:
        raise ValueError(f"a, b and clusters must have the same length, got {a.numel()}, "
                         f"{b.numel()} and {ids.numel()}")
    diff = a.long() - b.long()
    _, inverse = torch.unique(ids, return_inverse=True)
    per = torch.zeros(int(inverse.max()) + 1 if inverse.numel() else 0,
                      dtype=torch.long).index_add_(0, inverse, diff)
    d = [int(v) for v in per.tolist() if v != 0]
    only_a, only_b = int((diff > 0).sum()), int((diff < 0).sum())
    n, c = int(a.numel()), len(d)
    if c == 0:
        return ClusterTest(n, 0, only_a, only_b, 1.0, True, 1.0)
    t = abs(sum(d))
    if c <= exact_limit:
        hits = sum(abs(sum(s * v for s, v in zip(signs, d, strict=True))) >= t
                   for signs in itertools.product((1, -1), repeat=c))
        return ClusterTest(n, c, only_a, only_b, hits / 2**c, True, min(1.0, 2 / 2**c))
    gen = torch.Generator().manual_seed(int(seed))
    values = torch.tensor(d, dtype=torch.float64)
    hits = 0
    for start in range(0, int(resamples), 4096):
        k = min(4096, int(resamples) - start)
        signs = torch.randint(0, 2, (k, c), generator=gen, dtype=torch.float64) * 2 - 1
        hits += int(((signs @ values).abs() >= t - 1e-9).sum())
    return ClusterTest(n, c, only_a, only_b, (1 + hits) / (1 + int(resamples)), False,
                       1 / (1 + int(resamples)))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979), in the input order.

    With ``m`` tests sorted so that ``p_(1) <= ... <= p_(m)``, ``adj_(i) = max_{j <= i}
    min(1, (m - j + 1) p_(j))``; rejecting where ``adj < alpha`` controls the family-wise
    error rate at ``alpha`` under any dependence between the tests.
    """
    p = [float(v) for v in p_values]
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out = [1.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out
