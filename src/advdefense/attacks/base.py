"""The attack contract (DESIGN.md, contract 3) and the machinery every attack shares.

An attack is configured once and called as ``attack(model, x, y) -> x_adv``. Every attack:

* keeps ``x_adv`` inside the eps-ball around ``x`` and inside [0, 1];
* runs the model in eval mode and restores each module's mode afterwards, so BatchNorm
  running statistics never move;
* takes ``seed`` (the global RNG is forked, so the caller's RNG is untouched);
* takes ``eot_samples``: the expectation over the model's randomness (Athalye et al. 2018) is
  estimated by repeating the batch ``eot_samples`` times along the batch dimension, with one
  independent draw per copy (:func:`advdefense.randomness.draw_groups`), in chunks of at most
  ``max_batch`` rows: no Python loop over EOT samples unless memory forces chunks.

Template (after foolbox's gradient-descent base): :class:`Attack` handles validation, mode,
seeding and restarts; :func:`eot_loss_grad` computes batched EOT losses and input gradients;
subclasses implement :meth:`Attack.run`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import AdvDefenseError
from ..randomness import draw_groups, is_stochastic, seeded
from .losses import LossFn, get_loss

log = logging.getLogger(__name__)

NORMS = ("linf", "l2")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module in eval mode and restore each module's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def check_inputs(x: torch.Tensor, y: torch.Tensor) -> None:
    """Validate an attack's inputs; raise :class:`AdvDefenseError` with one clear line."""
    if not torch.is_floating_point(x) or x.dim() < 2:
        raise AdvDefenseError(f"x must be a float tensor (N, ...), got {x.dtype} {tuple(x.shape)}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise AdvDefenseError(
            f"y must have shape ({x.shape[0]},) to match x, got {tuple(y.shape)}")
    if x.numel() and (x.min() < -1e-6 or x.max() > 1 + 1e-6):
        raise AdvDefenseError(
            f"x must lie in [0, 1] (got [{x.min():.3g}, {x.max():.3g}]); models normalize inside")


def check_eps(eps: float) -> float:
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0:
        raise AdvDefenseError(f"eps must be a finite number >= 0, got {eps}")
    return eps


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project onto the eps-ball around ``x`` (L-inf or L2) intersected with [0, 1]."""
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        flat = delta.flatten(1)
        norms = flat.norm(dim=1).clamp_min(1e-12)
        factor = (eps / norms).clamp(max=1.0)
        delta = (flat * factor[:, None]).view_as(delta)
    return (x + delta).clamp(0.0, 1.0)


def random_start(x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Uniform point of the L-inf ball, or uniform point of the L2 ball (direction x radius)."""
    if norm == "linf":
        delta = torch.empty_like(x).uniform_(-eps, eps)
    else:
        direction = torch.randn_like(x).flatten(1)
        direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
        radius = torch.rand(x.shape[0], 1, device=x.device) ** (1.0 / direction.shape[1])
        delta = (direction * radius * eps).view_as(x)
    return (x + delta).clamp(0.0, 1.0)


def normalize_step(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """Steepest-ascent direction of unit size: sign (L-inf) or grad / ||grad||_2 (L2)."""
    if norm == "linf":
        return grad.sign()
    flat = grad.flatten(1)
    return (flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)).view_as(grad)


class Objective:
    """What an attack maximizes: ``objective(model, x, y, target) -> (loss_rows, logits)``.

    The default applies a logit loss (:mod:`.losses`) to ``model(x)``. Defenses with extra
    outputs subclass it (e.g. CAS: main + beta * auxiliary cross-entropy) so every attack can
    use an adaptive loss without knowing the defense. ``logits`` are what decides success.
    """

    def __init__(self, loss: str | LossFn = "ce") -> None:
        self.loss_fn = get_loss(loss)
        self.name = loss if isinstance(loss, str) else getattr(loss, "__name__", "custom")

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 target: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)
        return self.loss_fn(logits, y, target), logits


def as_objective(loss: str | LossFn | Objective) -> Objective:
    return loss if isinstance(loss, Objective) else Objective(loss)


@dataclass
class EOTResult:
    """Losses (n,), input gradients (n, ...) and logits (k, n, classes) of one EOT evaluation."""

    loss: torch.Tensor
    grad: torch.Tensor | None
    logits: torch.Tensor

    def wrong_fraction(self, y: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """Fraction of the k draws that are adversarial (misclassified / hit the target)."""
        pred = self.logits.argmax(dim=2)
        hit = pred == target[None] if target is not None else pred != y[None]
        return hit.float().mean(dim=0)


# Rows per pass of replicated EOT draws on CPU. ``max_batch`` is a memory budget; on a GPU
# filling it is fastest, but on CPU a larger working set only costs cache misses: for smallcnn
# + PNI, batch 128 x EOT 8 took 4.5 s with all 1,024 rows in one pass and 3.1 s with one draw
# per pass (1 thread). Set to None to batch up to ``max_batch`` on CPU too.
CPU_EOT_ROWS: int | None = 256


def eot_loss_grad(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    objective: str | LossFn | Objective,
    *,
    eot_samples: int = 1,
    max_batch: int = 4096,
    target: torch.Tensor | None = None,
    need_grad: bool = True,
) -> EOTResult:
    """Mean loss over ``eot_samples`` independent draws of the model's randomness, and its
    gradient with respect to ``x``, evaluated batched.

    The batch is repeated ``k`` times along dim 0 (copy ``j`` = rows ``j*n..(j+1)*n``) and run
    under :func:`draw_groups` so each copy sees its own draw. Rows are processed in chunks of
    at most ``max_batch`` (whole copies when possible; on CPU at most :data:`CPU_EOT_ROWS` rows
    of replicated copies); this is the only loop.
    ``objective`` is an :class:`Objective` or a loss name/function of :mod:`.losses`.
    """
    objective = as_objective(objective)
    n = x.shape[0]
    k = max(1, int(eot_samples))
    ex_chunk = max(1, min(n, max_batch))
    loss_sum = torch.zeros(n, device=x.device)
    grad = torch.zeros_like(x) if need_grad else None
    logits_parts: list[torch.Tensor] = []
    for start in range(0, n, ex_chunk):
        xs, ys = x[start : start + ex_chunk], y[start : start + ex_chunk]
        ts = None if target is None else target[start : start + ex_chunk]
        m = xs.shape[0]
        rows = max_batch
        if x.device.type == "cpu" and CPU_EOT_ROWS is not None:
            rows = min(rows, CPU_EOT_ROWS)
        per_pass = max(1, rows // m)
        chunk_logits = []
        for k0 in range(0, k, per_pass):
            kc = min(per_pass, k - k0)
            xi = xs.detach().clone().requires_grad_(need_grad)
            xr = xi.repeat(kc, *([1] * (x.dim() - 1))) if kc > 1 else xi
            yr = ys.repeat(kc)
            tr = None if ts is None else ts.repeat(kc)
            with torch.set_grad_enabled(need_grad), draw_groups(kc):
                row_losses, out = objective(model, xr, yr, tr)
                if out.dim() != 2 or out.shape[0] != xr.shape[0]:
                    raise AdvDefenseError(
                        f"model must return logits (N, classes); got shape {tuple(out.shape)}")
                losses = row_losses.view(kc, m)
                if need_grad:
                    (g,) = torch.autograd.grad(losses.sum() / k, xi)
                    grad[start : start + m] += g  # type: ignore[index]
            loss_sum[start : start + m] += losses.detach().sum(dim=0)
            chunk_logits.append(out.detach().view(kc, m, -1))
        logits_parts.append(torch.cat(chunk_logits, dim=0))
    return EOTResult(loss_sum / k, grad, torch.cat(logits_parts, dim=1))


@dataclass
class AttackTrace:
    """What happened inside the last call, for the attack-failure checks.

    ``losses``: (steps, n) mean EOT loss of each iterate; ``grad_norms``: (steps, n) norm of
    each step's gradient; ``nonfinite``: number of non-finite gradient entries seen;
    ``ever_adversarial``: (n,) whether any iterate was adversarial on *all* EOT draws (for
    deterministic models: misclassified), ``returned_adversarial``: the same for the returned
    point.
    """

    losses: list[torch.Tensor] = field(default_factory=list)
    grad_norms: list[torch.Tensor] = field(default_factory=list)
    nonfinite: int = 0
    ever_adversarial: torch.Tensor | None = None
    returned_adversarial: torch.Tensor | None = None

    def loss_matrix(self) -> torch.Tensor:
        return torch.stack(self.losses) if self.losses else torch.empty(0)


class Attack(ABC):
    """Base of every attack: ``attack(model, x, y, target=None) -> x_adv``.

    Keyword-only hyper-parameters common to all attacks: ``eps`` (radius, in [0,1] pixel
    units), ``norm`` (``"linf"`` or ``"l2"``), ``eot_samples``, ``max_batch`` (rows per forward
    pass: the memory budget), ``seed``, ``restarts``, ``targeted``.
    """

    name = "attack"

    def __init__(
        self,
        *,
        eps: float,
        norm: str = "linf",
        eot_samples: int = 1,
        max_batch: int = 4096,
        seed: int | None = None,
        restarts: int = 1,
        targeted: bool = False,
    ) -> None:
        self.eps = check_eps(eps)
        if norm not in NORMS:
            raise AdvDefenseError(f"unknown norm {norm!r}; choose linf or l2")
        if int(eot_samples) < 1:
            raise AdvDefenseError(f"eot_samples must be >= 1, got {eot_samples}")
        if int(restarts) < 1:
            raise AdvDefenseError(f"restarts must be >= 1, got {restarts}")
        if int(max_batch) < 1:
            raise AdvDefenseError(f"max_batch must be >= 1, got {max_batch}")
        self.norm = norm
        self.eot_samples = int(eot_samples)
        self.max_batch = int(max_batch)
        self.seed = seed
        self.restarts = int(restarts)
        self.targeted = targeted
        self.trace = AttackTrace()

    def __repr__(self) -> str:
        keys = ("eps", "norm", "eot_samples", "restarts", "targeted")
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in keys)
        return f"{type(self).__name__}({args})"

    def effective_eot(self, model: nn.Module) -> int:
        """EOT draws actually used: 1 for a deterministic model (repeats would be identical)."""
        return self.eot_samples if is_stochastic(model) else 1

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, target=None
    ) -> torch.Tensor:
        check_inputs(x, y)
        if self.targeted and target is None:
            raise AdvDefenseError(f"{self.name} is targeted: pass target=")
        x, y = x.detach(), y.detach()
        self.trace = AttackTrace()
        if self.eps == 0 or x.shape[0] == 0:
            return x.clone()
        with eval_mode(model), seeded(self.seed):
            x_adv = self.run(model, x, y, target if self.targeted else None)
        return project(x_adv.detach(), x, self.eps, self.norm)

    @abstractmethod
    def run(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None
    ) -> torch.Tensor:
        """Return adversarial examples; the model is already in eval mode and seeded."""
