"""FAB: the fast adaptive boundary attack (Croce & Hein 2020, "Minimally distorted adversarial
examples with a fast adaptive boundary attack", ICML), L-inf and L2, untargeted (``fab``) and
targeted as in AutoAttack (``fab-t``), with batched EOT.

One iteration (paper, Sec. 3, eq. 5-9), for the current iterate ``x_k`` and original ``x_0``:

* linearize the decision boundary between the true class ``y`` and a class ``c``:
  ``f_c(z) ~ d_c + <g_c, z - x_k>`` with ``d_c = z_y(x_k) - z_c(x_k)`` and ``g_c`` its
  input gradient; untargeted FAB takes the class with the smallest distance
  ``|d_c| / ||g_c||_q`` (``q`` the dual norm: L1 for L-inf, L2 for L2), FAB-T the target;
* ``delta_k``, ``delta_0``: minimal-norm steps from ``x_k`` and from ``x_0`` onto that
  hyperplane inside the box [0, 1] (:func:`project_hyperplane_box`, exact, sort-based);
* ``alpha = min(||delta_k|| / (||delta_k|| + ||delta_0||), alpha_max)`` and
  ``x_{k+1} = clip((1 - alpha)(x_k + eta delta_k) + alpha (x_0 + eta delta_0), 0, 1)``;
* when ``x_{k+1}`` is adversarial its distance to ``x_0`` is recorded if it is the smallest so
  far, and the iterate moves back: ``x_{k+1} = x_0 + beta (x_{k+1} - x_0)``.

FAB is a minimum-norm attack: the returned point is the closest adversarial point found when
its distance is ``<= eps``, else the original ``x``. ``trace.losses`` records, per iteration,
the running maximum of ``z_c - z_y`` (c the class whose boundary is followed) and
``trace.grad_norms`` the L2 norm of its gradient. Defaults are AutoAttack's standard version:
``n_iter=100``, ``alpha_max=0.1``, ``eta=1.05``, ``beta=0.9``, ``restarts=1`` (the first run
starts at ``x``; later runs start at a random point at distance ``min(best, eps) / 2``), and
for FAB-T ``n_target_classes=9`` (the classes with the highest clean logits other than ``y``,
one after the other, each only on examples not yet broken within eps).

Departures from the reference code (``fra31/auto-attack``, ``fab_pt.py``), on purpose:

* the box-constrained hyperplane projection is our own exact sort-based solver of the KKT
  conditions (one scalar multiplier), equivalent in result to the reference's search;
* EOT (``eot_samples = k``): logit differences and their gradients are averaged over k draws
  evaluated batched along the batch dimension; an iterate counts as adversarial only if all k
  draws misclassify it (AutoAttack's FAB has no EOT);
* gradients of all needed logit differences come from one forward pass and one backward pass
  per class (the reference also backprops once per class, on the whole batch);
* inside a bf16 attack (:mod:`advdefense.precision`) the linearization runs under autocast
  but the success test that records a point and moves the iterate back is made in fp32: the
  iterates sit on the boundary, where a bf16 verdict would keep points that are not
  adversarial.

Example::

    x_adv = FABT(eps=0.3, seed=0)(model, x, y)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import AdvDefenseError
from ..precision import full_precision
from ..randomness import replicated_forward
from .base import Attack, AttackRecorder, eot_loss_grad

log = logging.getLogger(__name__)

__all__ = ["FAB", "FABT", "project_hyperplane_box"]

_BIG = 1e30


def _norm(v: torch.Tensor, norm: str) -> torch.Tensor:
    flat = v.flatten(1)
    return flat.abs().amax(dim=1) if norm == "linf" else flat.norm(dim=1)


def project_hyperplane_box(x: torch.Tensor, w: torch.Tensor, c: torch.Tensor,
                           norm: str) -> torch.Tensor:
    """Minimal-norm ``delta`` (rows of ``x``) with ``<w, delta> = c`` and ``x + delta`` in
    [0, 1]; when no such ``delta`` exists, the box point that gets closest (``<w, delta>``
    maximal in the direction of ``c``).

    ``x``, ``w``: (B, d) with ``x`` in [0, 1]; ``c``: (B,). KKT: with ``s = sign(c)``,
    ``delta_i = sign(s w_i) min(lam, tau_i) * (|w_i| for L2, 1 for L-inf)`` for one scalar
    ``lam >= 0``, where ``tau_i`` is where coordinate ``i`` hits the box. ``<w, delta>`` is
    piecewise linear and non-decreasing in ``lam``; sorting the breakpoints ``tau`` gives the
    segment holding ``|c|`` and ``lam`` in closed form. O(d log d) per row, no loop.
    """
    sign_c = torch.where(c < 0, -1.0, 1.0).to(x.dtype)
    we = w * sign_c[:, None]
    cabs = c.abs()
    aw = we.abs()
    room = torch.where(we > 0, 1.0 - x, x).clamp_min(0.0)
    zero = aw == 0
    if norm == "linf":
        a = aw
        tau = room
    else:
        a = aw * aw
        tau = room / aw.clamp_min(1e-30)
    a = torch.where(zero, torch.zeros_like(a), a)
    tau = torch.where(zero, torch.full_like(tau, _BIG), tau)
    tau_s, order = tau.sort(dim=1)
    a_s = a.gather(1, order)
    capped = torch.where(tau_s >= _BIG, torch.zeros_like(a_s), a_s * tau_s)
    cum_capped = capped.cumsum(dim=1)                      # sum_{j <= i} a_j tau_j
    rest = a_s.flip(1).cumsum(dim=1).flip(1)                # sum_{j >= i} a_j
    value = cum_capped + torch.where(tau_s >= _BIG, torch.zeros_like(tau_s),
                                     tau_s * (rest - a_s))  # <w, delta> at lam = tau_i
    kstar = (value < cabs[:, None]).sum(dim=1)              # breakpoints below the solution
    d = x.shape[1]
    feasible = kstar < d
    ks = kstar.clamp(max=d - 1)
    prev = torch.where(kstar > 0, cum_capped.gather(1, (ks - 1).clamp_min(0)[:, None])[:, 0],
                       torch.zeros_like(cabs))
    free = rest.gather(1, ks[:, None])[:, 0]
    lam = (cabs - prev) / free.clamp_min(1e-30)
    lam = torch.where(feasible, lam, torch.full_like(lam, _BIG))
    mag = torch.minimum(lam[:, None].expand_as(tau), tau)
    mag = torch.where(zero, torch.zeros_like(mag), mag)
    scale = aw if norm == "l2" else torch.ones_like(aw)
    return we.sign() * scale * mag


def logit_diff_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                     others: torch.Tensor, *, eot_samples: int = 1,
                     max_batch: int = 4096, recorder: AttackRecorder | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``d[i, j] = z_{y_i}(x_i) - z_{others[i, j]}(x_i)`` (n, m) and its input gradient
    (n, m, ...), both averaged over ``eot_samples`` draws evaluated batched
    (:func:`~advdefense.randomness.replicated_forward`). One forward pass and ``m`` backward
    passes per chunk."""
    n, m = others.shape
    k = max(1, int(eot_samples))
    diffs = torch.zeros(n, m, device=x.device)
    grads = torch.zeros((n, m) + tuple(x.shape[1:]), device=x.device)

    def body(xr, start, k0, kc):
        s = xr.shape[0] // kc
        ys, os_ = y[start:start + s], others[start:start + s]
        xi = x[start:start + s].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            inp = xi.repeat(kc, *([1] * (x.dim() - 1))) if kc > 1 else xi
            out = model(inp)
            if out.dim() != 2 or out.shape[0] != inp.shape[0]:
                raise AdvDefenseError(
                    f"model must return logits (N, classes); got shape {tuple(out.shape)}")
            z = out.view(kc, s, -1)
            zy = z.gather(2, ys[None, :, None].expand(kc, s, 1))
            zo = z.gather(2, os_[None].expand(kc, s, m))
            dd = zy - zo                                               # (kc, s, m)
            g = torch.stack([torch.autograd.grad(dd[:, :, j].sum() / k, xi,
                                                 retain_graph=j < m - 1)[0]
                             for j in range(m)], dim=1)
        grads[start:start + s] += g   # accumulated after the last allocation (OOM retry)
        if recorder is not None:
            recorder.count(inp.shape[0], True)
        diffs[start:start + s] += dd.detach().sum(dim=0) / k

    replicated_forward(model, x, k, body, max_batch=max_batch)
    return diffs, grads


@dataclass
class _Best:
    """Per-call state of FAB: the smallest adversarial perturbation found per example."""

    x: torch.Tensor
    dist: torch.Tensor

    def robust(self, eps: float) -> torch.Tensor:
        return (self.dist > eps).nonzero().squeeze(1)


class FAB(Attack):
    """FAB (Croce & Hein 2020), untargeted: the boundary of the closest class (linearized).

    Keyword-only hyper-parameters: ``n_iter=100`` (``steps`` alias), ``alpha_max=0.1``,
    ``eta=1.05``, ``beta=0.9``, ``restarts=1``; plus the common ones of
    :class:`~.base.Attack`. ``x``: (N, C, H, W) in [0, 1]; ``y``: (N,).
    The recorder gets ``z_c - z_y`` of the followed class per iteration; FAB minimizes a
    distance, so its loss is not judged for convergence (``maximizes_loss = False``).
    """

    name = "fab"
    maximizes_loss = False

    def __init__(self, *, eps: float, norm: str = "linf", n_iter: int | None = None,
                 steps: int | None = None, alpha_max: float = 0.1, eta: float = 1.05,
                 beta: float = 0.9, eot_samples: int | None = None, max_batch: int = 4096,
                 seed: int | None = None, restarts: int = 1, targeted: bool = False) -> None:
        if targeted:
            raise AdvDefenseError(f"{self.name} does not take a target; use fab-t")
        super().__init__(eps=eps, norm=norm, eot_samples=eot_samples, max_batch=max_batch,
                         seed=seed, restarts=restarts)
        n = n_iter if n_iter is not None else (steps if steps is not None else 100)
        if int(n) < 1:
            raise AdvDefenseError(f"n_iter must be >= 1, got {n}")
        if not 0.0 <= alpha_max <= 1.0 or eta <= 0 or not 0.0 < beta < 1.0:
            raise AdvDefenseError("FAB needs 0 <= alpha_max <= 1, eta > 0 and 0 < beta < 1")
        self.n_iter = int(n)
        self.alpha_max = float(alpha_max)
        self.eta = float(eta)
        self.beta = float(beta)

    @property
    def steps(self) -> int:
        return self.n_iter

    # -- helpers -----------------------------------------------------------------------------
    def _adversarial(self, model, x, y, k, recorder) -> torch.Tensor:
        """The success test, in fp32 also inside a bf16 attack: FAB's iterates sit on the
        decision boundary, where bf16 and fp32 disagree most."""
        with full_precision(x.device):
            res = eot_loss_grad(model, x, y, "ce", eot_samples=k, max_batch=self.max_batch,
                                need_grad=False, recorder=recorder)
        return res.wrong_fraction(y) == 1.0

    def _direction(self, model, x1, y, others, k, recorder):
        """Linearized boundary (d (m,), g (m, d)) of the chosen class for each row."""
        diffs, grads = logit_diff_grads(model, x1, y, others, eot_samples=k,
                                        max_batch=self.max_batch, recorder=recorder)
        grads = recorder.sanitize(grads.flatten(2))
        if others.shape[1] == 1:
            return diffs[:, 0], grads[:, 0]
        dual = grads.abs().sum(dim=2) if self.norm == "linf" else grads.norm(dim=2)
        dist = diffs.abs() / (dual + 1e-12)
        j = dist.argmin(dim=1)
        rows = torch.arange(x1.shape[0], device=x1.device)
        return diffs[rows, j], grads[rows, j]

    def _random_start(self, x0: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
        view = (-1,) + (1,) * (x0.dim() - 1)
        if self.norm == "linf":
            t = torch.rand_like(x0) * 2 - 1
            t = t / t.flatten(1).abs().amax(dim=1).clamp_min(1e-12).view(view)
        else:
            t = torch.randn_like(x0)
            t = t / t.flatten(1).norm(dim=1).clamp_min(1e-12).view(view)
        return (x0 + 0.5 * radius.view(view) * t).clamp(0.0, 1.0)

    # -- one run on a subset -----------------------------------------------------------------
    def _single_run(self, model, x_all, y_all, idx, others_all, k, random_init: bool,
                    best: _Best, recorder: AttackRecorder) -> None:
        x0, y = x_all[idx], y_all[idx]
        others = others_all[idx]
        m = x0.shape[0]
        view = (m,) + (1,) * (x0.dim() - 1)
        flat0 = x0.flatten(1)
        recorder.begin_run(idx)
        if random_init:
            radius = torch.minimum(best.dist[idx], torch.full_like(best.dist[idx], self.eps))
            x1 = self._random_start(x0, radius)
        else:
            x1 = x0.clone()
        for _ in range(self.n_iter):
            d, g = self._direction(model, x1, y, others, k, recorder)
            flat1 = x1.flatten(1)
            c1 = -d
            c0 = (g * (flat1 - flat0)).sum(dim=1) - d
            delta = project_hyperplane_box(torch.cat([flat1, flat0]), torch.cat([g, g]),
                                           torch.cat([c1, c0]), self.norm)
            d1, d0 = delta[:m], delta[m:]
            n1 = _norm(d1, self.norm).clamp_min(1e-8)
            n0 = _norm(d0, self.norm).clamp_min(1e-8)
            alpha = (n1 / (n1 + n0)).clamp(0.0, self.alpha_max)[:, None]
            new = ((1 - alpha) * (flat1 + self.eta * d1) + alpha * (flat0 + self.eta * d0))
            x1 = new.clamp(0.0, 1.0).view_as(x0)
            adv = self._adversarial(model, x1, y, k, recorder)
            dist = _norm(x1 - x0, self.norm)
            recorder.saw(idx, adv & (dist <= self.eps * (1 + 1e-6)))
            better = adv & (dist < best.dist[idx])
            sel = idx[better]
            best.x[sel] = x1[better]
            best.dist[sel] = dist[better]
            if bool(adv.any()):
                x1 = torch.where(adv.view(view), x0 + self.beta * (x1 - x0), x1)
            recorder.step(-d, g.norm(dim=1))

    def _finish(self, x: torch.Tensor, best: _Best, recorder: AttackRecorder) -> torch.Tensor:
        ok = best.dist <= self.eps * (1 + 1e-6)
        recorder.returned_adversarial = ok.clone()
        return torch.where(ok.view((-1,) + (1,) * (x.dim() - 1)), best.x, x)

    def _clean_logits(self, model, x, y, k, recorder) -> torch.Tensor:
        clean = eot_loss_grad(model, x, y, "ce", eot_samples=k, max_batch=self.max_batch,
                              need_grad=False, recorder=recorder)
        return clean.logits.mean(dim=0)

    @staticmethod
    def _new_best(x: torch.Tensor) -> _Best:
        return _Best(x.clone(), torch.full((x.shape[0],), float("inf"), device=x.device))

    def run(self, model: nn.Module, x, y, target, recorder: AttackRecorder):
        k = self.effective_eot(model, x, y)
        logits = self._clean_logits(model, x, y, k, recorder)
        n_classes = logits.shape[1]
        if n_classes < 2:
            raise AdvDefenseError("FAB needs a model with at least 2 classes")
        all_cls = torch.arange(n_classes, device=x.device).expand(x.shape[0], n_classes)
        others = all_cls[all_cls != y[:, None]].view(x.shape[0], n_classes - 1)
        best = self._new_best(x)
        for r in range(self.restarts):
            idx = torch.arange(x.shape[0], device=x.device) if r == 0 else best.robust(self.eps)
            if idx.numel() == 0:
                break
            self._single_run(model, x, y, idx, others, k, r > 0, best, recorder)
        return self._finish(x, best, recorder)


class FABT(FAB):
    """FAB-T (Croce & Hein 2020; AutoAttack's ``fab-t``): FAB towards one target class at a
    time, the ``n_target_classes`` (default 9) classes with the highest clean logits other than
    ``y``, each run only on examples not yet broken within eps. The goal stays
    misclassification (any wrong class counts)."""

    name = "fab-t"

    def __init__(self, *, eps: float, n_target_classes: int = 9, norm: str = "linf",
                 n_iter: int | None = None, steps: int | None = None, alpha_max: float = 0.1,
                 eta: float = 1.05, beta: float = 0.9, eot_samples: int | None = None,
                 max_batch: int = 4096, seed: int | None = None, restarts: int = 1,
                 targeted: bool = False) -> None:
        super().__init__(eps=eps, norm=norm, n_iter=n_iter, steps=steps, alpha_max=alpha_max,
                         eta=eta, beta=beta, eot_samples=eot_samples, max_batch=max_batch,
                         seed=seed, restarts=restarts, targeted=targeted)
        if int(n_target_classes) < 1:
            raise AdvDefenseError(f"n_target_classes must be >= 1, got {n_target_classes}")
        self.n_target_classes = int(n_target_classes)

    def run(self, model: nn.Module, x, y, target, recorder: AttackRecorder):
        k = self.effective_eot(model, x, y)
        logits = self._clean_logits(model, x, y, k, recorder)
        n_classes = logits.shape[1]
        if n_classes < 2:
            raise AdvDefenseError("FAB-T needs a model with at least 2 classes")
        n_targets = min(self.n_target_classes, n_classes - 1)
        masked = logits.clone()
        masked.scatter_(1, y[:, None], float("-inf"))
        ranked = masked.argsort(dim=1, descending=True)[:, :n_targets]
        best = self._new_best(x)
        first = True
        for j in range(n_targets):
            tgt = ranked[:, j:j + 1].contiguous()
            for r in range(self.restarts):
                idx = torch.arange(x.shape[0], device=x.device) if first else best.robust(self.eps)
                first = False
                if idx.numel() == 0:
                    break
                self._single_run(model, x, y, idx, tgt, k, r > 0, best, recorder)
        return self._finish(x, best, recorder)
