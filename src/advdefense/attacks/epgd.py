"""Attacks on smoothed classifiers: EPGD (Nemcovsky et al., arXiv 1911.07198, Sec. 4.2, eq. 8)
and SmoothAdv (Salman et al., NeurIPS 2019, eq. 5 / Sec. 3).

Both attack the **noisy base** ``f(x + eta; W + xi)`` — Gaussian pixel noise of std ``sigma``
plus any PNI/CNI weight noise — with ``m`` Monte-Carlo draws per step, batched along the batch
dimension (:func:`~advdefense.randomness.draw_groups`, chunked by ``max_batch`` rows):

EPGD
    ``L = (1/m) sum_i CE(f(x + eta_i), y)``: the mean of per-draw cross-entropies. This is
    exactly PGD with EOT and CE, so :class:`EPGD` is PGD (``eot_samples = m``) run on
    :class:`~advdefense.defenses.smoothing.NoisyBase`. Reference default m_train = 8.
SmoothAdv
    ``L = -log((1/m) sum_i softmax(f(x + eta_i))_y)``: the softmaxes are averaged first and
    the log taken outside (the CE of the soft-smoothed classifier). By Jensen,
    ``L_SmoothAdv <= L_EPGD`` on the same draws. The loss is computed in two passes over the
    *same* draws (:func:`~advdefense.randomness.replicated_forward` with one seed, so memory
    never holds the whole ``m x n`` graph): pass 1 gives the mean probability ``p_bar``, pass 2
    backpropagates ``-(1/(m p_bar)) sum_i softmax_i,y`` chunk by chunk, the exact gradient.

If the attacked ``model`` is a :class:`~advdefense.defenses.smoothing.SmoothedClassifier`,
its base and ``sigma`` are used (``sigma=None``). Steps: sign for L-inf, normalised gradient
for L2 (Salman et al. use L2 steps; the smoothing paper's L-inf variant uses sign steps).
Departures from the SIAM code: gradients are not accumulated across steps (its PGD bug), the
best iterate is returned, and the success check is per example.
"""

from __future__ import annotations

import torch
from torch import nn

from ..defenses.smoothing import NoisyBase, SmoothedClassifier
from ..errors import AdvDefenseError
from ..randomness import DrawOutputs, fresh_seed, replicated_forward
from .base import AttackRecorder, EOTResult, Objective, confirm_logits
from .losses import LossFn
from .pgd import PGD


def _noisy_view(model: nn.Module, sigma: float | None) -> nn.Module:
    if isinstance(model, SmoothedClassifier):
        return NoisyBase(model.base, model.sigma if sigma is None else sigma)
    if sigma is None or sigma == 0:
        return model
    return NoisyBase(model, sigma)


class EPGD(PGD):
    """Expectation PGD: PGD on the mean over ``eot_samples`` (= m, default 8) draws of
    per-draw CE, on the noisy base with input-noise ``sigma`` (``None``: the smoothed
    classifier's own sigma, or no input noise for a plain model)."""

    name = "epgd"
    default_eot = 8

    def __init__(self, *, eps: float, steps: int = 20, step_size: float | None = None,
                 sigma: float | None = None, norm: str = "linf", random_start: bool = True,
                 loss: str | LossFn | Objective = "ce", eot_samples: int | None = None,
                 eot_resample: str = "step", max_batch: int = 4096, seed: int | None = None,
                 restarts: int = 1, targeted: bool = False) -> None:
        super().__init__(eps=eps, steps=steps, step_size=step_size, norm=norm,
                         random_start=random_start, loss=loss, eot_samples=eot_samples,
                         eot_resample=eot_resample, max_batch=max_batch, seed=seed,
                         restarts=restarts, targeted=targeted)
        if sigma is not None and not sigma >= 0:
            raise AdvDefenseError(f"sigma must be >= 0, got {sigma}")
        self.sigma = sigma

    def run(self, model, x, y, target, recorder):
        return super().run(_noisy_view(model, self.sigma), x, y, target, recorder)


class _SmoothAdvObjective(Objective):
    """Marker objective; the loss itself is computed by :func:`smoothadv_loss_grad`."""

    def __init__(self) -> None:
        super().__init__("ce")
        self.name = "smoothadv"


def smoothadv_loss_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, samples: int,
                        max_batch: int = 4096, target: torch.Tensor | None = None,
                        need_grad: bool = True, recorder: AttackRecorder | None = None
                        ) -> EOTResult:
    """SmoothAdv loss ``-log mean_i softmax(model(x)_i)_y`` over ``samples`` draws and its
    input gradient; targeted: ``+log`` of the target's mean probability. ``model`` is the
    noisy view (input noise included). Two passes over the same seeded draws."""
    n = x.shape[0]
    k = max(1, int(samples))
    cls = y if target is None else target
    sign = 1.0 if target is None else -1.0
    draws = fresh_seed()
    p_sum = torch.zeros(n, device=x.device, dtype=x.dtype)
    outputs = DrawOutputs(k, n)

    def probs_of(out, start, kc):
        s = out.shape[0] // kc
        cs = cls[start : start + s]
        z = out.view(kc, s, -1)
        return z, z.softmax(2).gather(2, cs.view(1, -1, 1).expand(kc, -1, 1)).squeeze(2)

    def first_pass(xr, start, k0, kc):
        with torch.no_grad():
            z, p = probs_of(model(xr), start, kc)
        p_sum[start : start + z.shape[1]] += p.sum(0)
        outputs.put(z.reshape(-1, z.shape[2]), start, k0, kc)
        if recorder is not None:
            recorder.count(xr.shape[0], False)

    replicated_forward(model, x, k, first_pass, max_batch=max_batch, seed=draws)
    p_bar = p_sum / k
    loss = -sign * torch.log(p_bar.clamp_min(1e-30))
    logits = outputs.value
    logits = confirm_logits(model, x, y, logits, seed=draws, max_batch=max_batch,
                            recorder=recorder)  # fp32 verdicts inside a bf16 attack
    grad = None
    if need_grad:
        grad = torch.zeros_like(x)
        coef = -sign / (k * p_bar.clamp_min(1e-30))

        def second_pass(xr, start, k0, kc):
            s = xr.shape[0] // kc
            xi = x[start : start + s].detach().clone().requires_grad_(True)
            with torch.enable_grad():
                inp = xi.repeat(kc, *([1] * (x.dim() - 1))) if kc > 1 else xi
                _, p = probs_of(model(inp), start, kc)
                obj = (p.sum(0) * coef[start : start + s]).sum()
                grad[start : start + s] += torch.autograd.grad(obj, xi)[0]
            if recorder is not None:
                recorder.count(inp.shape[0], True)

        replicated_forward(model, x, k, second_pass, max_batch=max_batch, seed=draws)
    return EOTResult(loss, grad, logits)


class SmoothAdv(PGD):
    """SmoothAdv-PGD (Salman et al. 2019): PGD on ``-log`` of the mean softmax over
    ``eot_samples`` (= m, default 8) draws of the noisy base; L-inf or L2."""

    name = "smoothadv"
    default_eot = 8

    def __init__(self, *, eps: float, steps: int = 20, step_size: float | None = None,
                 sigma: float | None = None, norm: str = "linf", random_start: bool = True,
                 eot_samples: int | None = None, max_batch: int = 4096, seed: int | None = None,
                 restarts: int = 1, targeted: bool = False) -> None:
        super().__init__(eps=eps, steps=steps, step_size=step_size, norm=norm,
                         random_start=random_start, loss=_SmoothAdvObjective(),
                         eot_samples=eot_samples, max_batch=max_batch, seed=seed,
                         restarts=restarts, targeted=targeted)
        if sigma is not None and not sigma >= 0:
            raise AdvDefenseError(f"sigma must be >= 0, got {sigma}")
        self.sigma = sigma

    def _eot(self, model, x, y, target, k, recorder, *, need_grad=True, seed=None):
        return smoothadv_loss_grad(model, x, y, samples=k, max_batch=self.max_batch,
                                   target=target, need_grad=need_grad, recorder=recorder)

    def run(self, model, x, y, target, recorder):
        return super().run(_noisy_view(model, self.sigma), x, y, target, recorder)
