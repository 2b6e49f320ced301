"""Projected gradient descent (Madry et al. 2018, eq. 2.2), L-inf and L2, with batched EOT.

``x_{t+1} = Proj_{B(x, eps) ∩ [0,1]}(x_t + alpha * s(grad_x L(f(x_t), y)))`` with ``s = sign``
for L-inf and ``s = g / ||g||_2`` for L2. With ``eot_samples = k`` the gradient is that of the
mean loss over k independent draws of the model's randomness (EOT, Athalye et al. 2018).

Departures from torchattacks/the reference code, on purpose:

* the returned point is, per example, the best iterate seen (most EOT draws adversarial, then
  highest loss), not the last one: an adversarial point found mid-attack is never lost;
* restarts keep the per-example best over restarts;
* gradients never accumulate across steps (the SIAM code's PGD has that bug).

Example::

    attack = PGD(eps=0.3, steps=20, step_size=0.3 / 8, seed=0)
    x_adv = attack(model, x, y)          # x in [0,1], (N, C, H, W); y (N,)
"""

from __future__ import annotations

import torch
from torch import nn

from .base import (
    Attack,
    Objective,
    as_objective,
    eot_loss_grad,
    normalize_step,
    project,
    random_start,
)
from .losses import LossFn


class PGD(Attack):
    """PGD with random start, restarts, any loss of :mod:`.losses` or an :class:`Objective`,
    optional target.

    ``step_size`` defaults to ``eps / 4`` (the 2/255-at-8/255 convention of the papers).
    """

    name = "pgd"

    def __init__(
        self,
        *,
        eps: float,
        steps: int = 20,
        step_size: float | None = None,
        norm: str = "linf",
        random_start: bool = True,
        loss: str | LossFn | Objective = "ce",
        **common,
    ) -> None:
        super().__init__(eps=eps, norm=norm, **common)
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.steps = int(steps)
        self.step_size = self.eps / 4 if step_size is None else float(step_size)
        self.random_start = random_start
        self.objective = as_objective(loss)

    def run(self, model: nn.Module, x, y, target):
        k = self.effective_eot(model)
        best_x = x.clone()
        best_frac = torch.full((x.shape[0],), -1.0, device=x.device)
        best_loss = torch.full((x.shape[0],), float("-inf"), device=x.device)
        ever = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)

        def keep(x_cur, res):
            nonlocal ever
            frac = res.wrong_fraction(y, target)
            better = (frac > best_frac) | ((frac == best_frac) & (res.loss > best_loss))
            best_x[better] = x_cur[better]
            best_frac[better] = frac[better]
            best_loss[better] = res.loss[better]
            ever = ever | (frac == 1.0)

        for _ in range(self.restarts):
            x_adv = random_start(x, self.eps, self.norm) if self.random_start else x.clone()
            for _step in range(self.steps):
                res = eot_loss_grad(model, x_adv, y, self.objective, eot_samples=k,
                                    max_batch=self.max_batch, target=target)
                keep(x_adv, res)
                grad = res.grad
                self.trace.losses.append(res.loss)
                self.trace.grad_norms.append(grad.flatten(1).norm(dim=1))
                nonfinite = ~torch.isfinite(grad)
                self.trace.nonfinite += int(nonfinite.sum())
                grad = torch.where(nonfinite, torch.zeros_like(grad), grad)
                x_adv = project(x_adv + self.step_size * normalize_step(grad, self.norm), x,
                                self.eps, self.norm)
            final = eot_loss_grad(model, x_adv, y, self.objective, eot_samples=k,
                                  max_batch=self.max_batch, target=target, need_grad=False)
            keep(x_adv, final)
            self.trace.losses.append(final.loss)
        self.trace.ever_adversarial = ever
        self.trace.returned_adversarial = best_frac == 1.0
        return best_x


class FGSM(PGD):
    """Fast gradient sign method (Goodfellow et al. 2015): one step of size eps.

    ``random_start=True`` gives the "FGSM with random init" of Wong et al. 2020 (use
    ``step_size=1.25*eps``) and the CAS evaluation's FGSM (a step of eps after a random start).
    """

    name = "fgsm"

    def __init__(self, *, eps: float, random_start: bool = False, step_size: float | None = None,
                 **common) -> None:
        super().__init__(eps=eps, steps=1, step_size=eps if step_size is None else step_size,
                         random_start=random_start, **common)


class CWLinf(PGD):
    """CW-L-inf: PGD on the margin loss ``max_{c≠y} z_c − z_y`` (Carlini & Wagner 2017, eq. 6,
    as used by TRADES/CAS evaluations), per example rather than the CAS code's batch-summed
    ReLU of the margin."""

    name = "cw"

    def __init__(self, *, eps: float, steps: int = 30, **common) -> None:
        common.setdefault("loss", "margin")
        super().__init__(eps=eps, steps=steps, **common)
