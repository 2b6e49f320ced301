"""NAttack (Li, Li, Wang, Zhang & Gong, "NATTACK: Learning the Distributions of Adversarial
Examples", ICML 2019, Algorithm 1): a black-box, score-based L-inf attack.

It learns the mean ``mu`` of an isotropic Gaussian ``N(mu, sigma^2 I)`` over a perturbation
``z`` in tanh space. A candidate is

    ``x' = x + clip_eps(0.5 * (tanh(arctanh(2x - 1) + z) + 1) - x)``, ``z = mu + sigma * e_i``

and each iteration draws a population of ``b`` candidates, scores them with the margin loss on
log-probabilities ``f = max(log p_y - max_{c != y} log p_c, 0)`` (0 = adversarial), z-scores
the losses ``A_i = (f_i - mean f) / std f`` and takes the NES step
``mu <- mu - lr / (b * sigma) * sum_i A_i e_i``. Success is checked on the candidate at ``mu``
every ``check_every`` (10) iterations; examples that succeed stop. Defaults are the paper's:
``population=300``, ``sigma=0.1``, ``lr=0.02``, 500 iterations.

``space="delta"`` (a departure, for near-binary images such as MNIST): the paper's tanh
parametrisation saturates at pixels that are exactly 0 or 1 (``arctanh(+-1)`` is clamped to
``+-7.25`` where ``tanh' ~ 1e-6``), so those pixels practically cannot move; the ``delta``
space searches ``x' = clip_[0,1](x + eps * tanh(z))`` instead (``z = 0`` is the clean image).
Default ``"tanh"`` (the paper).

Only model outputs are used (no gradients), so it detects gradient masking. The population is
evaluated batched: ``n * population`` rows in chunks of ``max_batch``. If the model has a
``soft_scores(x)`` method (a :class:`SmoothedClassifier`: the mean softmax of its samples) the
candidates are scored with it, since a hard vote is flat almost everywhere and gives the
search no direction; else if it declares ``outputs_probabilities = True`` its outputs are
taken as probabilities, else as logits. On a stochastic model every score is the mean
probability over ``eot_samples`` draws, and an example stops only when its candidate is
adversarial on the majority of ``confirm_draws`` fresh draws, not after one lucky draw.
Inside a bf16 attack (:mod:`advdefense.precision`) the population is scored under autocast,
but a candidate is accepted (and its example stops) only once it is adversarial in fp32.
Departures from the reference code (``Cold-Winter/Nattack``): batched over examples instead
of one example at a time; ``mu`` is initialised to zero (the reference uses
``0.001 * N(0, 1)``); L-inf only.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import AdvDefenseError
from ..precision import reduced_precision
from ..randomness import is_stochastic, replicated_forward
from .base import Attack, AttackRecorder, majority_adversarial


class NAttack(Attack):
    """``NAttack(eps=0.031, population=300, sigma=0.1, lr=0.02, steps=500)``."""

    name = "nattack"
    access = "gradient-free"

    def __init__(self, *, eps: float, steps: int = 500, population: int = 300,
                 sigma: float = 0.1, lr: float = 0.02, check_every: int = 10,
                 space: str = "tanh", confirm_draws: int = 10, norm: str = "linf",
                 eot_samples: int | None = None, max_batch: int = 4096, seed: int | None = None,
                 restarts: int = 1, targeted: bool = False) -> None:
        super().__init__(eps=eps, norm=norm, eot_samples=eot_samples, max_batch=max_batch,
                         seed=seed, restarts=restarts, targeted=targeted)
        if self.norm != "linf":
            raise AdvDefenseError("NAttack is an L-inf attack; use norm='linf'")
        if self.targeted:
            raise AdvDefenseError("this NAttack implementation is untargeted")
        if int(population) < 2 or int(steps) < 1 or sigma <= 0 or lr <= 0 or check_every < 1:
            raise AdvDefenseError("NAttack needs population >= 2, steps >= 1, sigma > 0, lr > 0,"
                                  " check_every >= 1")
        self.steps, self.population = int(steps), int(population)
        self.sigma, self.lr, self.check_every = float(sigma), float(lr), int(check_every)
        if space not in ("tanh", "delta"):
            raise AdvDefenseError(f"NAttack space must be tanh or delta, got {space!r}")
        self.space = space
        self.confirm_draws = int(confirm_draws)

    def _log_probs(self, model: nn.Module, x: torch.Tensor, k: int,
                   recorder: AttackRecorder) -> torch.Tensor:
        """Log of the mean probabilities over ``k`` draws (soft scores where available)."""
        score = getattr(model, "soft_scores", None)
        probs_given = callable(score) or getattr(model, "outputs_probabilities", False)
        total = torch.zeros(x.shape[0], 0, device=x.device)

        def body(xr, start, k0, kc):
            nonlocal total
            with torch.no_grad():
                out = score(xr) if callable(score) else model(xr)
            p = out if probs_given else F.softmax(out, dim=1)
            p = p.view(kc, -1, p.shape[1]).sum(0)
            if total.shape[1] == 0:
                total = torch.zeros(x.shape[0], p.shape[1], device=x.device)
            total[start : start + p.shape[0]] += p
            recorder.count(xr.shape[0], False)

        replicated_forward(model, x, k, body, max_batch=self.max_batch)
        return torch.log((total / k).clamp_min(1e-12))

    @staticmethod
    def _margin(logp: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        true = logp.gather(1, y[:, None]).squeeze(1)
        other = logp.clone()
        other.scatter_(1, y[:, None], float("-inf"))
        return (true - other.max(1).values).clamp_min(0)

    def _candidates(self, x_atanh, x, z):
        if self.space == "delta":
            return (x + self.eps * torch.tanh(z)).clamp(0, 1)
        cand = 0.5 * (torch.tanh(x_atanh + z) + 1)
        return (x + (cand - x).clamp(-self.eps, self.eps)).clamp(0, 1)

    def _adversarial(self, model, x, y, wrong, stochastic, recorder):
        """``wrong`` (by the scores) confirmed in fp32: on the majority of ``confirm_draws``
        fresh draws for a random model, on one pass for a deterministic model in a bf16
        attack; as it is for a deterministic model in fp32 (the scores are the verdict)."""
        if not bool(wrong.any()) or not (stochastic or reduced_precision(x.device)):
            return wrong
        out = wrong.clone()
        sel = wrong.nonzero().squeeze(1)
        out[sel] = majority_adversarial(model, x[sel], y[sel],
                                        draws=self.confirm_draws if stochastic else 1,
                                        max_batch=self.max_batch, recorder=recorder)
        return out

    def run(self, model, x, y, target, recorder: AttackRecorder):
        k = self.effective_eot(model, x, y)
        stochastic = is_stochastic(model) or k > 1
        n, shape = x.shape[0], x.shape[1:]
        b = self.population
        x_atanh = torch.atanh((2 * x - 1).clamp(-1 + 1e-6, 1 - 1e-6))
        mu = torch.zeros_like(x)
        best = x.clone()
        active = torch.ones(n, dtype=torch.bool, device=x.device)
        found = torch.zeros(n, dtype=torch.bool, device=x.device)
        recorder.begin_run()
        for step in range(self.steps):
            if step % self.check_every == 0:
                x_mu = self._candidates(x_atanh, x, mu)
                wrong = active & (self._log_probs(model, x_mu, k, recorder).argmax(1) != y)
                newly = self._adversarial(model, x_mu, y, wrong, stochastic, recorder)
                best[newly] = x_mu[newly]
                found |= newly
                active &= ~newly
                if not active.any():
                    break
            idx = active.nonzero().squeeze(1)
            na = idx.numel()
            if na == 0:  # the last ones were found by the previous population
                break
            eps_noise = torch.randn(na, b, *shape, device=x.device)
            z = mu[idx, None] + self.sigma * eps_noise
            cand = self._candidates(x_atanh[idx, None], x[idx, None], z)
            logp = self._log_probs(model, cand.reshape(na * b, *shape), k, recorder)
            loss = self._margin(logp, y[idx].repeat_interleave(b)).view(na, b)
            row = torch.full((n,), float("nan"), device=x.device)
            row[idx] = loss.mean(1)
            row[found] = 0.0
            recorder.step(-row)
            adv = loss.eq(0)
            if adv.any():  # a population member looks adversarial: keep it once confirmed
                hit = adv.any(1)
                first = adv.float().argmax(1)
                rows = idx[hit]
                pick = cand[hit, first[hit]]
                ok = self._adversarial(model, pick, y[rows],
                                       torch.ones(len(rows), dtype=torch.bool, device=x.device),
                                       stochastic, recorder)
                best[rows[ok]] = pick[ok]
                found[rows[ok]] = True
                active[rows[ok]] = False
            a = (loss - loss.mean(1, keepdim=True)) / (loss.std(1, keepdim=True) + 1e-7)
            step_dir = (a.view(na, b, *([1] * len(shape))) * eps_noise).sum(1)
            mu[idx] = mu[idx] - self.lr / (b * self.sigma) * step_dir
        if active.any():
            best[active] = self._candidates(x_atanh, x, mu)[active]
        recorder.saw(None, found)
        recorder.returned_adversarial = found.clone()
        return best
