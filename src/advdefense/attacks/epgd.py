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
    ``L_SmoothAdv <= L_EPGD`` on the same draws. When the ``n * m`` rows do not fit in
    ``max_batch`` the loss is computed in two passes over the *same* draws (each chunk is
    re-seeded identically): pass 1 gives the mean probability ``p_bar``, pass 2 backpropagates
    ``-(1/(m p_bar)) sum_i softmax_i,y`` chunk by chunk, which is the exact gradient.

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
from ..randomness import draw_groups, seeded
from .base import EOTResult, Objective, normalize_step, project, random_start
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

    def __init__(self, *, eps: float, steps: int = 20, sigma: float | None = None,
                 eot_samples: int = 8, **kw) -> None:
        super().__init__(eps=eps, steps=steps, eot_samples=eot_samples, **kw)
        if sigma is not None and not sigma >= 0:
            raise AdvDefenseError(f"sigma must be >= 0, got {sigma}")
        self.sigma = sigma

    def run(self, model, x, y, target):
        return super().run(_noisy_view(model, self.sigma), x, y, target)


class _SmoothAdvObjective(Objective):
    """Marker objective; the loss itself is computed by :func:`smoothadv_loss_grad`."""

    def __init__(self) -> None:
        super().__init__("ce")
        self.name = "smoothadv"


def smoothadv_loss_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, samples: int,
                        max_batch: int = 4096, target: torch.Tensor | None = None,
                        need_grad: bool = True) -> EOTResult:
    """SmoothAdv loss ``-log mean_i softmax(model(x)_i)_y`` over ``samples`` draws (rows
    repeated under ``draw_groups``) and its input gradient; targeted: ``+log`` of the target's
    mean probability. ``model`` is the noisy view (input noise included)."""
    n = x.shape[0]
    k = max(1, int(samples))
    cls = y if target is None else target
    sign = 1.0 if target is None else -1.0
    if n * k <= max_batch:
        xi = x.detach().clone().requires_grad_(need_grad)
        with torch.set_grad_enabled(need_grad), draw_groups(k):
            logits = model(xi.repeat(k, *([1] * (x.dim() - 1))))
            probs = logits.view(k, n, -1).softmax(2)
            p_bar = probs.gather(2, cls.view(1, n, 1).expand(k, n, 1)).squeeze(2).mean(0)
            loss = -sign * torch.log(p_bar.clamp_min(1e-30))
            grad = torch.autograd.grad(loss.sum(), xi)[0] if need_grad else None
        return EOTResult(loss.detach(), grad, logits.detach().view(k, n, -1))
    # two passes over identical draws: chunks of whole copies, each re-seeded the same way
    per_pass = max(1, max_batch // n) if n <= max_batch else 1
    ex_chunk = min(n, max_batch)
    base_seed = int(torch.randint(0, 2**31 - 1, (1,)))
    plan = [(s, k0, min(per_pass, k - k0)) for s in range(0, n, ex_chunk)
            for k0 in range(0, k, per_pass)]

    def chunk_forward(j, s, kc, xin):
        with seeded(base_seed + j), draw_groups(kc):
            xs = xin[s : s + ex_chunk]
            return model(xs.repeat(kc, *([1] * (x.dim() - 1)))).view(kc, xs.shape[0], -1)

    p_sum = torch.zeros(n, device=x.device, dtype=x.dtype)
    logit_parts: dict[int, list[torch.Tensor]] = {}
    with torch.no_grad():
        for j, (s, _k0, kc) in enumerate(plan):
            out = chunk_forward(j, s, kc, x)
            cs = cls[s : s + out.shape[1]]
            p_sum[s : s + out.shape[1]] += out.softmax(2).gather(
                2, cs.view(1, -1, 1).expand(kc, -1, 1)).squeeze(2).sum(0)
            logit_parts.setdefault(s, []).append(out)
    p_bar = p_sum / k
    loss = -sign * torch.log(p_bar.clamp_min(1e-30))
    logits = torch.cat([torch.cat(logit_parts[s], 0) for s in sorted(logit_parts)], 1)
    grad = None
    if need_grad:
        grad = torch.zeros_like(x)
        coef = -sign / (k * p_bar.clamp_min(1e-30))
        for j, (s, _k0, kc) in enumerate(plan):
            xi = x.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                out = chunk_forward(j, s, kc, xi)
                cs = cls[s : s + out.shape[1]]
                p = out.softmax(2).gather(2, cs.view(1, -1, 1).expand(kc, -1, 1)).squeeze(2)
                obj = (p.sum(0) * coef[s : s + out.shape[1]]).sum()
                grad += torch.autograd.grad(obj, xi)[0]
    return EOTResult(loss, grad, logits)


class SmoothAdv(PGD):
    """SmoothAdv-PGD (Salman et al. 2019): PGD on ``-log`` of the mean softmax over
    ``eot_samples`` (= m, default 8) draws of the noisy base; L-inf or L2."""

    name = "smoothadv"

    def __init__(self, *, eps: float, steps: int = 20, sigma: float | None = None,
                 eot_samples: int = 8, **kw) -> None:
        kw.pop("loss", None)
        super().__init__(eps=eps, steps=steps, eot_samples=eot_samples,
                         loss=_SmoothAdvObjective(), **kw)
        if sigma is not None and not sigma >= 0:
            raise AdvDefenseError(f"sigma must be >= 0, got {sigma}")
        self.sigma = sigma

    def run(self, model, x, y, target):
        view = _noisy_view(model, self.sigma)
        k = self.effective_eot(view)
        n = x.shape[0]
        best_x = x.clone()
        best_frac = torch.full((n,), -1.0, device=x.device)
        best_loss = torch.full((n,), float("-inf"), device=x.device)
        ever = torch.zeros(n, dtype=torch.bool, device=x.device)

        def evaluate(x_cur, need_grad):
            nonlocal ever
            res = smoothadv_loss_grad(view, x_cur, y, samples=k, max_batch=self.max_batch,
                                      target=target, need_grad=need_grad)
            frac = res.wrong_fraction(y, target)
            better = (frac > best_frac) | ((frac == best_frac) & (res.loss > best_loss))
            best_x[better] = x_cur[better]
            best_frac[better] = frac[better]
            best_loss[better] = res.loss[better]
            ever = ever | (frac == 1.0)
            self.trace.losses.append(res.loss)
            return res

        for _ in range(self.restarts):
            x_adv = random_start(x, self.eps, self.norm) if self.random_start else x.clone()
            for _step in range(self.steps):
                grad = evaluate(x_adv, True).grad
                self.trace.grad_norms.append(grad.flatten(1).norm(dim=1))
                nonfinite = ~torch.isfinite(grad)
                self.trace.nonfinite += int(nonfinite.sum())
                grad = torch.where(nonfinite, torch.zeros_like(grad), grad)
                x_adv = project(x_adv + self.step_size * normalize_step(grad, self.norm), x,
                                self.eps, self.norm)
            evaluate(x_adv, False)
        self.trace.ever_adversarial = ever
        self.trace.returned_adversarial = best_frac == 1.0
        return best_x
