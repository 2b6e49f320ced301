"""Smoothed inference (Nemcovsky et al., "Smoothed Inference for Improving Adversarial
Robustness", arXiv 1911.07198, Sec. 3) and Gaussian certification (Cohen, Rosenfeld & Kolter,
ICML 2019, Theorem 1 and Algorithm CERTIFY/PREDICT).

:class:`SmoothedClassifier` draws ``m`` Monte-Carlo samples of ``f(x + eta)``,
``eta ~ N(0, sigma^2 I)`` in **[0, 1] pixel space**, and aggregates them with a vote:

``prediction`` (hard smoothing, paper eq. 5)
    ``g(x) = argmax_c sum_i 1[argmax f_i(x) = c]``; scores = vote fractions.
``weighted`` (paper Sec. 3, rank-weighted smoothing; reference ``mclogits``)
    every sample ranks all classes by logit; rank ``r`` (0 = top) gets weight ``2^-r``;
    scores = summed weights / (m * sum_r 2^-r).
``topk``
    weight 1 for each of a sample's top-``k`` classes; scores = counts / (m * k), ties
    between equal counts broken by the ``weighted`` vote (which adds under half a vote, then
    the scores are renormalised). Without it, when all samples agree on the same top-k set
    the vote falls to the lowest class index among the k.
``soft`` (soft prediction smoothing, paper eq. 7; Salman et al. 2019)
    mean of ``softmax(f_i(x))``. **Departure:** the SIAM reference (``mcepredict``) averages
    raw logits. We average probabilities because that is a proper probability average (the
    smoothed model's output is again a distribution), it is invariant to a per-sample logit
    scale/shift (raw logits let one over-confident draw with large logits dominate the mean),
    and it is the quantity SmoothAdv attacks (Salman et al.).

Sampling is batched: the batch is repeated along dim 0, chunked by ``max_batch`` rows, and
evaluated under :func:`~advdefense.randomness.draw_groups`, so a noise-injected base model
also gets a fresh weight draw per sample. A forward pass returns ``(N, C)`` normalised vote
scores (argmax = prediction) and is stochastic (``stochastic = True``). For the hard votes
the returned scores carry the gradient of the soft vote (straight-through, value unchanged),
so a gradient attack aimed at the smoothed classifier itself gets a SmoothAdv-like
gradient instead of an error; attacks in :mod:`advdefense.attacks.epgd` instead attack the
noisy base model directly. Departure from the reference: SIAM adds the noise to the
*normalised* tensor (sigma in normalised units).

:func:`certify` implements Cohen et al.'s CERTIFY: select the top class with ``n0`` samples,
lower-bound ``p_A`` with a one-sided Clopper–Pearson bound at level ``alpha`` from ``n``
fresh samples, radius ``sigma * Phi^-1(p_A_lower)``; abstain (-1) when ``p_A_lower <= 0.5``.
The estimation samples may come in shards (:func:`counts` with :func:`estimation_seed`)
computed anywhere: their vote counts add, and :func:`certify_from_counts` bounds the sums
once.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from scipy.stats import beta as beta_dist
from scipy.stats import binomtest, norm
from torch import nn
from torch.nn import functional as F

from ..errors import AdvDefenseError
from ..randomness import (
    DrawOutputs,
    StochasticModule,
    current_groups,
    draw_seed,
    replicated_forward,
)
from .noise import GaussianInput

log = logging.getLogger(__name__)

VOTES = ("prediction", "weighted", "topk", "soft")

__all__ = ["SmoothedClassifier", "NoisyBase", "certify", "certify_from_counts", "CertifyResult",
           "counts", "estimation_seed", "selection_seed", "shard_sizes", "sample_logits",
           "vote_scores", "clopper_pearson_lower", "VOTES"]


class NoisyBase(nn.Module):
    """``base(x + sigma * N(0, I))``: one Monte-Carlo draw of the smoothed classifier's base.

    This is what EOT attacks (EPGD, SmoothAdv, PGD with input noise) differentiate through.
    The Gaussian noise is a :class:`GaussianInput` layer, so it obeys freeze/draw_groups/seed.
    """

    def __init__(self, base: nn.Module, sigma: float) -> None:
        super().__init__()
        self.noise = GaussianInput(sigma)
        self.base = base

    @property
    def sigma(self) -> float:
        return self.noise.sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(self.noise(x))


def _check_sigma(sigma: float) -> float:
    sigma = float(sigma)
    if not math.isfinite(sigma) or sigma < 0:
        raise AdvDefenseError(f"sigma must be a finite number >= 0, got {sigma}")
    return sigma


def sample_logits(base: nn.Module, x: torch.Tensor, *, sigma: float, m: int,
                  max_batch: int = 4096, seed: int | None = None) -> torch.Tensor:
    """(m, N, C) logits of ``m`` independent draws ``base(x + sigma * eta)``, batched.

    The draws come from :func:`~advdefense.randomness.replicated_forward` (copies stacked
    under ``draw_groups``, chunks of at most ``max_batch`` rows, so a noise-injected base also
    gets a fresh weight draw per sample); ``seed`` fixes the m draws whatever the chunking.
    Gradients flow if enabled by the caller.
    """
    noisy = NoisyBase(base, sigma)
    outputs = DrawOutputs(m, x.shape[0])

    def body(xr, start, k0, kc):
        out = noisy(xr)
        if out.dim() != 2 or out.shape[0] != xr.shape[0]:
            raise AdvDefenseError(
                f"base model must return logits (N, classes); got {tuple(out.shape)}")
        outputs.put(out, start, k0, kc)

    replicated_forward(noisy, x, m, body, max_batch=max_batch, seed=seed)
    return outputs.value


class _DrawSeeds(StochasticModule):
    """The smoothed classifier's Monte-Carlo draws as one seed per draw group, so that
    ``freeze`` fixes its m samples and ``draw_groups`` gives each group its own m samples."""

    def sample_state(self, x: torch.Tensor, groups: int) -> torch.Tensor:
        return torch.randint(0, 2**62, (groups,))

    def forward_with_state(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        return x


def vote_scores(logits: torch.Tensor, vote: str, *, k: int = 3) -> torch.Tensor:
    """Normalised (N, C) vote scores from (m, N, C) per-sample logits (see module docstring)."""
    if vote not in VOTES:
        raise AdvDefenseError(f"unknown vote {vote!r}; choose one of: {', '.join(VOTES)}")
    m, _, c = logits.shape
    if vote == "soft":
        return F.softmax(logits, dim=2).mean(0)
    if vote == "prediction":
        return F.one_hot(logits.argmax(2), c).to(logits.dtype).mean(0)
    ranks = logits.argsort(dim=2, descending=True).argsort(dim=2)  # rank of each class
    if vote == "weighted":
        weights = torch.pow(2.0, -ranks.to(logits.dtype))
        return weights.sum(0) / (m * (2.0 - 2.0 ** (1 - c)))
    k = min(int(k), c)
    counts = (ranks < k).to(logits.dtype).sum(0) / (m * k)
    # Ties between equal counts (with little noise every sample votes for the same k classes)
    # are broken by the rank-weighted vote. It adds less than half a vote, so it never
    # reorders classes whose counts differ.
    scores = counts + vote_scores(logits, "weighted") / (2 * m * k)
    return scores / scores.sum(1, keepdim=True)


class SmoothedClassifier(nn.Module):
    """Monte-Carlo smoothed classifier over a (possibly noise-injected) base model.

    ``SmoothedClassifier(base, sigma=0.25, m=512, vote="prediction")``; ``forward(x)`` returns
    (N, C) normalised vote scores from ``m`` fresh samples (paper default m_test = 512).
    ``k`` is the top-k vote's k. ``abstain_alpha``: if set, :meth:`predict` abstains (-1) when
    a two-sided binomial test of the top two hard-vote counts is not significant at that
    level (Cohen et al. PREDICT).
    """

    stochastic = True
    batched_draws = True        # draw groups are split here; see sample_logits
    outputs_probabilities = True

    def __init__(self, base: nn.Module, *, sigma: float, m: int = 512, vote: str = "prediction",
                 k: int = 3, max_batch: int = 4096, abstain_alpha: float | None = None) -> None:
        super().__init__()
        if vote not in VOTES:
            raise AdvDefenseError(f"unknown vote {vote!r}; choose one of: {', '.join(VOTES)}")
        if int(m) < 1:
            raise AdvDefenseError(f"number of samples m must be >= 1, got {m}")
        if int(k) < 1:
            raise AdvDefenseError(f"top-k vote needs k >= 1, got {k}")
        if abstain_alpha is not None and not 0 < abstain_alpha < 1:
            raise AdvDefenseError(f"abstain_alpha must be in (0, 1), got {abstain_alpha}")
        self.base = base
        self.sigma = _check_sigma(sigma)
        self.m, self.vote, self.k = int(m), vote, int(k)
        self.max_batch = int(max_batch)
        self.abstain_alpha = abstain_alpha
        self.draws = _DrawSeeds()

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, m={self.m}, vote={self.vote}, k={self.k}"

    def controlled_children(self) -> list[nn.Module]:
        """Only the draw seeds: freezing this classifier fixes its m seeds, and every sample
        of the base (its weight noise included) is replayed from them, so a frozen smoothed
        model keeps m distinct draws instead of one frozen base draw shared by all m."""
        return [self.draws]

    def noisy_base(self) -> NoisyBase:
        """The base model with this classifier's input noise: what EOT attacks target."""
        return NoisyBase(self.base, self.sigma)

    @property
    def frozen(self) -> bool:
        """Frozen when its draws are (``freeze`` on it or a model holding it)."""
        return self.draws.frozen

    def sample_logits(self, x: torch.Tensor, m: int | None = None) -> torch.Tensor:
        """(m, N, C) per-sample logits. If the caller runs this classifier under
        ``draw_groups(G)`` (e.g. repeated stochastic predictions), each of the G copies gets
        its own m fresh samples, weight noise included; under ``freeze`` the m samples are
        the same at every call."""
        m = self.m if m is None else m
        seeds, groups = self._group_seeds(x)
        n = x.shape[0] // groups
        return torch.cat([sample_logits(self.base, x[j * n : (j + 1) * n], sigma=self.sigma,
                                        m=m, max_batch=self.max_batch, seed=seeds[j])
                          for j in range(groups)], dim=1)

    def soft_scores(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) mean softmax of the m samples: a score that moves with the input even
        where the hard vote is flat (for score-based attacks such as NAttack)."""
        return F.softmax(self.sample_logits(x), dim=2).mean(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad):
            return vote_scores(self.sample_logits(x), self.vote, k=self.k)
        return _VoteWithSoftGradient.apply(x, self)

    def _group_seeds(self, x: torch.Tensor) -> tuple[list[int], int]:
        self.draws(x)
        seeds = [int(s) for s in self.draws.last_state.tolist()]
        return seeds, (current_groups() if len(seeds) > 1 else 1)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted classes (N,), -1 where the abstain test is not significant."""
        logits = self.sample_logits(x)
        pred = vote_scores(logits, self.vote, k=self.k).argmax(1)
        if self.abstain_alpha is None:
            return pred
        counts = F.one_hot(logits.argmax(2), logits.shape[2]).sum(0)
        top2 = counts.topk(min(2, counts.shape[1]), dim=1)
        out = top2.indices[:, 0].clone()
        for i in range(x.shape[0]):
            na = int(top2.values[i, 0])
            nb = int(top2.values[i, 1]) if top2.values.shape[1] > 1 else 0
            if binomtest(na, na + nb, 0.5).pvalue > self.abstain_alpha:
                out[i] = -1
        return out


class _VoteWithSoftGradient(torch.autograd.Function):
    """The vote scores on the forward pass; on the backward pass the gradient of the mean
    softmax over the same m samples (exact for the soft vote, straight-through for the hard
    ones), recomputed chunk by chunk with the forward's seeds, so the m x N graph is never
    held at once (memory of one ``max_batch`` chunk)."""

    @staticmethod
    def forward(ctx, x, smoothed):  # noqa: D401 - autograd API
        seeds, groups = smoothed._group_seeds(x)
        n = x.shape[0] // groups
        with torch.no_grad():
            logits = torch.cat([sample_logits(smoothed.base, x[j * n:(j + 1) * n],
                                              sigma=smoothed.sigma, m=smoothed.m,
                                              max_batch=smoothed.max_batch, seed=seeds[j])
                                for j in range(groups)], dim=1)
        ctx.save_for_backward(x)
        ctx.smoothed, ctx.seeds, ctx.groups = smoothed, seeds, groups
        return vote_scores(logits, smoothed.vote, k=smoothed.k)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        sm, n = ctx.smoothed, x.shape[0] // ctx.groups
        grad = torch.zeros_like(x)
        noisy = NoisyBase(sm.base, sm.sigma)
        for j, seed in enumerate(ctx.seeds[:ctx.groups]):
            xj, gj = x[j * n:(j + 1) * n].detach(), grad_out[j * n:(j + 1) * n]

            def body(xr, start, k0, kc, xj=xj, gj=gj, j=j):
                s = xr.shape[0] // kc
                xi = xj[start:start + s].clone().requires_grad_(True)
                with torch.enable_grad():
                    inp = xi.repeat(kc, *([1] * (x.dim() - 1))) if kc > 1 else xi
                    probs = F.softmax(noisy(inp), dim=1).view(kc, s, -1).sum(0) / sm.m
                    (g,) = torch.autograd.grad((probs * gj[start:start + s]).sum(), xi)
                grad[j * n + start:j * n + start + s] += g

            replicated_forward(noisy, xj, sm.m, body, max_batch=sm.max_batch, seed=seed)
        return grad, None


def clopper_pearson_lower(successes: int, trials: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper–Pearson lower bound on a binomial proportion."""
    if successes <= 0:
        return 0.0
    return float(beta_dist.ppf(alpha, successes, trials - successes + 1))


def counts(base: nn.Module, x: torch.Tensor, *, sigma: float, num: int, seed: int,
           max_batch: int = 4096, batch_samples: int = 1000) -> torch.Tensor:
    """(N, C) hard-vote counts of ``num`` samples ``argmax base(x + sigma * eta)``, draw ``j``
    seeded from (``seed``, ``j``): one replicated pass, at most ``batch_samples`` samples of
    each example and ``max_batch`` rows per forward, which change nothing but memory.

    Counts of independently seeded shards add: :func:`certify` sums the shards
    ``estimation_seed(seed, s)`` and :func:`certify_from_counts` bounds the sum.
    """
    noisy = NoisyBase(base, sigma)
    out_counts: list[torch.Tensor] = []

    def body(xr, start, k0, kc):
        out = noisy(xr)
        m = xr.shape[0] // kc
        votes = F.one_hot(out.argmax(1), out.shape[1]).view(kc, m, -1).sum(0)
        if not out_counts:
            out_counts.append(torch.zeros(x.shape[0], out.shape[1], dtype=torch.long,
                                          device=x.device))
        out_counts[0][start : start + m] += votes

    rows = min(int(max_batch), max(1, int(batch_samples)) * x.shape[0])
    replicated_forward(noisy, x, int(num), body, max_batch=rows, seed=int(seed))
    return out_counts[0]


def selection_seed(seed: int) -> int:
    """Seed of :func:`certify`'s ``n0`` selection samples."""
    return draw_seed(int(seed), 0)


def estimation_seed(seed: int, shard: int = 0) -> int:
    """Seed of shard ``shard`` of :func:`certify`'s ``n`` estimation samples (independent of
    every other shard and of the selection samples)."""
    return draw_seed(int(seed), 1, int(shard))


def shard_sizes(n: int, shard_samples: int | None) -> list[int]:
    """The estimation samples ``n`` cut into shards of ``shard_samples`` (``None``: one)."""
    size = int(n) if shard_samples is None else int(shard_samples)
    if size < 1:
        raise AdvDefenseError(f"shard_samples must be >= 1, got {shard_samples}")
    return [min(size, int(n) - s) for s in range(0, int(n), size)]


@dataclass
class CertifyResult:
    """Per-example certification: ``prediction`` (-1 = abstain), ``radius`` (L2, 0 when
    abstaining), ``p_lower`` (Clopper–Pearson lower bound on p_A), ``count`` (n_A)."""

    prediction: torch.Tensor
    radius: torch.Tensor
    p_lower: torch.Tensor
    count: torch.Tensor


def certify_from_counts(selection: torch.Tensor, estimation: torch.Tensor, *, sigma: float,
                        alpha: float = 0.001) -> CertifyResult:
    """Cohen et al.'s CERTIFY from vote counts: the top class of the ``selection`` counts
    (N, C), its count ``n_A`` in the ``estimation`` counts (N, C; ``n`` = a row's sum), the
    one-sided Clopper–Pearson lower bound ``p_A`` at level ``alpha``, the L2 radius
    ``sigma * Phi^-1(p_A)``; abstain (-1, radius 0) when ``p_A <= 0.5``."""
    sigma = _check_sigma(sigma)
    if sigma == 0:
        raise AdvDefenseError("certification needs sigma > 0")
    if not 0 < alpha < 1:
        raise AdvDefenseError(f"need 0 < alpha < 1; got {alpha}")
    if selection.shape != estimation.shape or selection.dim() != 2:
        raise AdvDefenseError(f"selection and estimation counts must both be (N, classes); got "
                              f"{tuple(selection.shape)} and {tuple(estimation.shape)}")
    top = selection.argmax(1)
    na = estimation.gather(1, top[:, None]).squeeze(1)
    trials = estimation.sum(1)
    p_lower = torch.tensor([clopper_pearson_lower(int(a), int(t), alpha)
                            for a, t in zip(na, trials, strict=True)], dtype=torch.float64)
    certified = p_lower > 0.5
    z = torch.from_numpy(norm.ppf(p_lower.clamp(0.5, 1.0).numpy()))
    radius = torch.where(certified, sigma * z, torch.zeros_like(p_lower))
    pred = torch.where(certified, top.cpu(), torch.full_like(top.cpu(), -1))
    return CertifyResult(pred, radius.float(), p_lower.float(), na.cpu())


@torch.no_grad()
def certify(base: nn.Module, x: torch.Tensor, *, sigma: float, n0: int = 100, n: int = 100000,
            alpha: float = 0.001, max_batch: int = 4096,
            batch_samples: int = 1000, seed: int | None = None,
            shard_samples: int | None = None) -> CertifyResult:
    """Cohen et al. (2019) CERTIFY for every example of ``x`` (Gaussian, L2 radius).

    ``n0`` selection samples, ``n`` estimation samples, failure probability ``alpha``.
    Sampling is batched over examples and samples (``batch_samples`` samples per pass,
    ``max_batch`` rows per forward). Every sample is a distinct seeded draw (selection and
    estimation draws are independent; ``seed=None`` takes one from the global RNG), so the
    result does not depend on ``max_batch``. ``shard_samples`` cuts the estimation samples
    into shards seeded on their own (:func:`estimation_seed`) whose counts are summed before
    the bound: what ``advdefense certify --shard-samples`` spreads over processes (``None``:
    one shard). Run the base model in eval mode before calling.
    """
    sigma = _check_sigma(sigma)
    if sigma == 0:
        raise AdvDefenseError("certification needs sigma > 0")
    if n0 < 1 or n < 1 or not 0 < alpha < 1:
        raise AdvDefenseError(f"need n0 >= 1, n >= 1 and 0 < alpha < 1; got {n0}, {n}, {alpha}")
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    kw = dict(sigma=sigma, max_batch=max_batch, batch_samples=batch_samples)
    c0 = counts(base, x, num=n0, seed=selection_seed(seed), **kw)
    c1 = sum(counts(base, x, num=size, seed=estimation_seed(seed, s), **kw)
             for s, size in enumerate(shard_sizes(n, shard_samples)))
    return certify_from_counts(c0, c1, sigma=sigma, alpha=alpha)
