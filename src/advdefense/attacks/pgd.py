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

from torch import nn

from ..randomness import fresh_seed
from .base import (
    Attack,
    AttackRecorder,
    BestIterate,
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
    ``eot_resample``: ``"step"`` (default) draws fresh randomness at every step (classic EOT);
    ``"run"`` keeps the same ``eot_samples`` draws for a whole run (a deterministic objective).
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
        eot_samples: int | None = None,
        eot_resample: str = "step",
        max_batch: int = 4096,
        seed: int | None = None,
        restarts: int = 1,
        targeted: bool = False,
    ) -> None:
        super().__init__(eps=eps, norm=norm, eot_samples=eot_samples, max_batch=max_batch,
                         seed=seed, restarts=restarts, targeted=targeted)
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if eot_resample not in ("step", "run"):
            raise ValueError(f"eot_resample must be 'step' or 'run', got {eot_resample!r}")
        self.steps = int(steps)
        self.step_size = self.eps / 4 if step_size is None else float(step_size)
        self.random_start = bool(random_start)
        self.objective = as_objective(loss)
        self.loss = self.objective
        self.eot_resample = eot_resample

    def _eot(self, model, x, y, target, k, recorder, *, need_grad=True, seed=None):
        return eot_loss_grad(model, x, y, self.objective, eot_samples=k,
                             max_batch=self.max_batch, target=target, need_grad=need_grad,
                             seed=seed, recorder=recorder)

    def run(self, model: nn.Module, x, y, target, recorder: AttackRecorder):
        k = self.effective_eot(model, x, y)
        best = BestIterate(x)
        for _ in range(self.restarts):
            recorder.begin_run()
            draws = fresh_seed() if self.eot_resample == "run" else None
            x_adv = random_start(x, self.eps, self.norm) if self.random_start else x.clone()
            for _step in range(self.steps):
                res = self._eot(model, x_adv, y, target, k, recorder, seed=draws)
                best.offer(None, x_adv, res, y, target, recorder)
                grad = recorder.sanitize(res.grad)
                recorder.step(res.loss, grad.flatten(1).norm(dim=1))
                x_adv = project(x_adv + self.step_size * normalize_step(grad, self.norm), x,
                                self.eps, self.norm)
            final = self._eot(model, x_adv, y, target, k, recorder, need_grad=False, seed=draws)
            best.offer(None, x_adv, final, y, target, recorder)
            recorder.step(final.loss)
        recorder.returned_adversarial = best.adversarial
        return best.x


class FGSM(PGD):
    """Fast gradient sign method (Goodfellow et al. 2015): one step of size eps.

    ``random_start=True`` gives the "FGSM with random init" of Wong et al. 2020 (use
    ``step_size=1.25*eps``) and the CAS evaluation's FGSM (a step of eps after a random start).
    """

    name = "fgsm"

    def __init__(self, *, eps: float, random_start: bool = False, step_size: float | None = None,
                 norm: str = "linf", loss: str | LossFn | Objective = "ce",
                 eot_samples: int | None = None, max_batch: int = 4096, seed: int | None = None,
                 restarts: int = 1, targeted: bool = False) -> None:
        super().__init__(eps=eps, steps=1, step_size=eps if step_size is None else step_size,
                         random_start=random_start, norm=norm, loss=loss,
                         eot_samples=eot_samples, max_batch=max_batch, seed=seed,
                         restarts=restarts, targeted=targeted)


class CWLinf(PGD):
    """CW-L-inf: PGD on the margin loss ``max_{c≠y} z_c − z_y`` (Carlini & Wagner 2017, eq. 6,
    as used by TRADES/CAS evaluations), per example rather than the CAS code's batch-summed
    ReLU of the margin."""

    name = "cw"

    def __init__(self, *, eps: float, steps: int = 30, step_size: float | None = None,
                 norm: str = "linf", random_start: bool = True,
                 loss: str | LossFn | Objective = "margin", eot_samples: int | None = None,
                 eot_resample: str = "step", max_batch: int = 4096, seed: int | None = None,
                 restarts: int = 1, targeted: bool = False) -> None:
        super().__init__(eps=eps, steps=steps, step_size=step_size, norm=norm,
                         random_start=random_start, loss=loss, eot_samples=eot_samples,
                         eot_resample=eot_resample, max_batch=max_batch, seed=seed,
                         restarts=restarts, targeted=targeted)
