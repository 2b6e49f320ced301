"""The attack contract (DESIGN.md, contract 3) and the machinery every attack shares.

An attack is configured once and called as ``attack(model, x, y) -> x_adv``. Every attack:

* keeps ``x_adv`` inside the eps-ball around ``x`` and inside [0, 1];
* runs the model in eval mode and restores each module's mode afterwards, so BatchNorm
  running statistics never move;
* runs convolutional models in channels_last where that is faster (:mod:`advdefense.layout`;
  the weights' layout is restored afterwards);
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
import inspect
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import AdvDefenseError
from ..layout import channels_last_weights
from ..precision import full_precision, reduced_precision
from ..randomness import (
    DrawOutputs,
    draw_seed,
    fresh_seed,
    is_stochastic,
    replicated_forward,
    seeded,
    stochastic_modules,
)
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

    def select(self, index: slice | torch.Tensor) -> Objective:
        """This objective on examples ``index`` of the batch it is evaluated on (an example
        chunk, or the rows an fp32 confirmation recomputes). Objectives that hold
        per-example state (TRADES' clean probabilities) return one restricted to those
        rows; the default holds none and returns itself."""
        return self


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


# -- the recorder: what happened inside one attack call -------------------------------------
@dataclass
class RunTrace:
    """One run of an attack (a restart, a target class) over the examples ``idx`` of the call:
    ``losses`` (steps, m) the objective of each iterate (its own scale: CE, margin, ...),
    ``grad_norms`` (steps, m) the input-gradient norms (empty for gradient-free attacks)."""

    idx: torch.Tensor
    losses: list[torch.Tensor] = field(default_factory=list)
    grad_norms: list[torch.Tensor] = field(default_factory=list)
    new: torch.Tensor | int = 0   # examples first seen adversarial in this run

    @property
    def new_adversarial(self) -> int:
        return int(self.new)

    def loss_matrix(self) -> torch.Tensor:
        """(steps, m) on the CPU (the steps stay on the attack's device while it runs)."""
        if not self.losses:
            return torch.empty(0, len(self.idx))
        return torch.stack(self.losses).cpu()


class AttackRecorder:
    """Observer of one attack call, owned by the caller (after secml-torch's trackers).

    Attack loops report to it: :meth:`begin_run` for every run (restart or target),
    :meth:`step` with each iterate's per-example loss and gradient norm, :meth:`saw` with the
    examples whose iterate was adversarial on all EOT draws, :meth:`sanitize` for each gradient
    (non-finite entries are counted and zeroed), :meth:`count` for the rows pushed through the
    model. The base :class:`Attack` sets ``returned_adversarial``. Nothing is kept on the attack
    object: two calls never share state. Per-step records stay on the attack's device (no host
    synchronisation inside the loop); they are moved when read.
    """

    def __init__(self, n: int, device: torch.device | str = "cpu") -> None:
        self.n = n
        self.runs: list[RunTrace] = []
        self._nonfinite: torch.Tensor | int = 0
        self.forward_rows = 0
        self.backward_rows = 0
        self.ever_adversarial = torch.zeros(n, dtype=torch.bool, device=device)
        self.returned_adversarial: torch.Tensor | None = None
        #: transfer attacks: examples adversarial on the substitute model
        self.substitute_adversarial: torch.Tensor | None = None

    # -- reported by the attack loops --------------------------------------------------------
    def begin_run(self, idx: torch.Tensor | None = None) -> RunTrace:
        if idx is None:
            idx = torch.arange(self.n)
        run = RunTrace(idx.detach())
        self.runs.append(run)
        return run

    def step(self, loss: torch.Tensor, grad_norm: torch.Tensor | None = None) -> None:
        if not self.runs:
            self.begin_run()
        run = self.runs[-1]
        run.losses.append(loss.detach().float())
        if grad_norm is not None:
            run.grad_norms.append(grad_norm.detach().float())

    def saw(self, idx: torch.Tensor | None, adversarial: torch.Tensor) -> None:
        """Examples ``idx`` (all when ``None``) whose current iterate is adversarial."""
        if idx is None:  # the whole batch: masked updates, no host synchronisation
            adversarial = adversarial.to(self.ever_adversarial.device)
            if self.runs:
                self.runs[-1].new = self.runs[-1].new + (adversarial
                                                         & ~self.ever_adversarial).sum()
            self.ever_adversarial |= adversarial
            return
        hit = idx[adversarial]
        if self.runs:
            self.runs[-1].new = self.runs[-1].new + (~self.ever_adversarial[hit]).sum()
        self.ever_adversarial[hit] = True

    def sanitize(self, grad: torch.Tensor) -> torch.Tensor:
        """The gradient with NaN/inf entries set to zero; their number is recorded."""
        bad = ~torch.isfinite(grad)
        self._nonfinite = self._nonfinite + bad.sum()
        return torch.where(bad, torch.zeros_like(grad), grad)

    @property
    def nonfinite(self) -> int:
        """Non-finite gradient entries seen (zeroed by :meth:`sanitize`)."""
        return int(self._nonfinite)

    def count(self, rows: int, backward: bool) -> None:
        self.forward_rows += int(rows)
        if backward:
            self.backward_rows += int(rows)

    # -- read by the evaluation and the tests ------------------------------------------------
    @property
    def losses(self) -> list[torch.Tensor]:
        """Per-step losses of every run, in order (each (m,) for the run's examples)."""
        return [t.cpu() for r in self.runs for t in r.losses]

    @property
    def grad_norms(self) -> list[torch.Tensor]:
        return [t.cpu() for r in self.runs for t in r.grad_norms]

    def loss_matrix(self) -> torch.Tensor:
        """(steps, n) losses when every run covers all examples; else the first run's."""
        full = [r for r in self.runs if len(r.idx) == self.n]
        if len(full) == len(self.runs) and full:
            return torch.cat([r.loss_matrix() for r in full], dim=0)
        return self.runs[0].loss_matrix() if self.runs else torch.empty(0)


class BestIterate:
    """The point an attack returns, per example: the iterate adversarial on the largest
    fraction of EOT draws, ties broken by the higher loss. An adversarial point, once found, is
    never lost (Pintor et al. 2022's "silent success" cannot happen by construction). Inside a
    bf16 attack the fractions come from fp32-confirmed logits (:func:`eot_loss_grad`)."""

    def __init__(self, x: torch.Tensor) -> None:
        n = x.shape[0]
        self.x = x.clone()
        self.frac = torch.full((n,), -1.0, device=x.device)
        self.loss = torch.full((n,), float("-inf"), device=x.device)

    def update(self, idx: torch.Tensor | None, x_cur: torch.Tensor, frac: torch.Tensor,
               loss: torch.Tensor) -> None:
        """Offer iterate ``x_cur`` of examples ``idx`` (all when ``None``)."""
        if idx is None:  # whole batch: masked updates, no host synchronisation
            better = (frac > self.frac) | ((frac == self.frac) & (loss > self.loss))
            view = better.view((-1,) + (1,) * (x_cur.dim() - 1))
            self.x = torch.where(view, x_cur, self.x)
            self.frac = torch.where(better, frac, self.frac)
            self.loss = torch.where(better, loss, self.loss)
            return
        better = (frac > self.frac[idx]) | ((frac == self.frac[idx]) & (loss > self.loss[idx]))
        view = better.view((-1,) + (1,) * (x_cur.dim() - 1))
        self.x[idx] = torch.where(view, x_cur, self.x[idx])
        self.frac[idx] = torch.where(better, frac, self.frac[idx])
        self.loss[idx] = torch.where(better, loss, self.loss[idx])

    def offer(self, idx, x_cur: torch.Tensor, res: EOTResult, y: torch.Tensor,
              target: torch.Tensor | None, recorder: AttackRecorder) -> torch.Tensor:
        """Offer an EOT-evaluated iterate and tell the recorder which were adversarial on
        every draw. Returns the per-example adversarial fraction."""
        frac = res.wrong_fraction(y, target)
        self.update(idx, x_cur, frac, res.loss)
        recorder.saw(idx, frac == 1.0)
        return frac

    @property
    def adversarial(self) -> torch.Tensor:
        return self.frac == 1.0


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
    seed: int | None = None,
    recorder: AttackRecorder | None = None,
) -> EOTResult:
    """Mean loss over ``eot_samples`` independent draws of the model's randomness, and its
    gradient with respect to ``x``, evaluated batched.

    The draws come from :func:`~advdefense.randomness.replicated_forward`: the batch is
    repeated along dim 0 (copy ``j`` = draw ``j``), chunked by ``max_batch`` rows, one
    backward pass per chunk; a model whose randomness does not honour ``draw_groups`` gets one
    forward call per draw. ``seed`` fixes the draws (the same seed gives the same draws,
    whatever the chunking); ``None`` draws fresh ones from the global RNG.
    ``objective`` is an :class:`Objective` or a loss name/function of :mod:`.losses`.

    Under a reduced-precision autocast (:mod:`advdefense.precision`) the logits of every
    example that any draw misclassifies are recomputed in fp32 on the same draws
    (:func:`confirm_logits`), so every verdict read from the result (``wrong_fraction``) is an
    fp32 verdict; the loss and the gradient stay those of the autocast pass.
    """
    objective = as_objective(objective)
    if x.shape[0] and seed is None:
        seed = fresh_seed()  # the draw replicated_forward would take; kept for confirmation
    res = _eot_pass(model, x, y, objective, eot_samples=eot_samples, max_batch=max_batch,
                    target=target, need_grad=need_grad, seed=seed, recorder=recorder)
    res.logits = confirm_logits(model, x, y, res.logits, objective, target=target,
                                seed=seed, max_batch=max_batch, recorder=recorder)
    return res


def _eot_pass(model, x, y, objective: Objective, *, eot_samples, max_batch, target,
              need_grad, seed, recorder) -> EOTResult:
    n = x.shape[0]
    k = max(1, int(eot_samples))
    loss_sum = torch.zeros(n, device=x.device)
    grad = torch.zeros_like(x) if need_grad else None
    outputs = DrawOutputs(k, n)

    def body(xr: torch.Tensor, start: int, k0: int, kc: int) -> None:
        m = xr.shape[0] // kc
        chunk = objective if m == n else objective.select(slice(start, start + m))
        xi = x[start : start + m].detach().clone().requires_grad_(need_grad)
        ys = y[start : start + m].repeat(kc)
        ts = None if target is None else target[start : start + m].repeat(kc)
        with torch.enable_grad() if need_grad else torch.inference_mode():
            inp = xi.repeat(kc, *([1] * (x.dim() - 1))) if kc > 1 else xi
            row_losses, out = chunk(model, inp, ys, ts)
            if out.dim() != 2 or out.shape[0] != inp.shape[0]:
                raise AdvDefenseError(
                    f"model must return logits (N, classes); got shape {tuple(out.shape)}")
            losses = row_losses.view(kc, m)
            if need_grad:
                (g,) = torch.autograd.grad(losses.sum() / k, xi)
                grad[start : start + m] += g  # type: ignore[index]
        if recorder is not None:
            recorder.count(inp.shape[0], need_grad)
        loss_sum[start : start + m] += losses.detach().sum(dim=0)
        outputs.put(out.detach(), start, k0, kc)

    replicated_forward(model, x, k, body, max_batch=max_batch, seed=seed)
    if outputs.value is None:
        return EOTResult(loss_sum, grad, torch.zeros(k, 0, 0, device=x.device))
    return EOTResult(loss_sum / k, grad, outputs.value)


def confirm_logits(model: nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor,
                   objective: str | LossFn | Objective = "ce", *,
                   target: torch.Tensor | None = None, seed: int | None = None,
                   max_batch: int = 4096, recorder: AttackRecorder | None = None
                   ) -> torch.Tensor:
    """``logits`` (k, n, classes) of ``k`` draws seeded with ``seed``, with the examples that
    any draw misclassifies recomputed in fp32 on the same draws when they came from a
    reduced-precision autocast; unchanged otherwise.

    An example adversarial only in bf16 thus never counts as adversarial inside an attack;
    one adversarial in fp32 but not in bf16 is missed (the attack is only weaker)."""
    if logits.numel() == 0 or not reduced_precision(x.device):
        return logits
    hit = (logits.argmax(dim=2) != y[None]).any(dim=0)
    rows = hit.nonzero().squeeze(1)
    if rows.numel() == 0:
        return logits
    with full_precision(x.device):
        exact = _eot_pass(model, x[rows], y[rows], as_objective(objective).select(rows),
                          eot_samples=logits.shape[0], max_batch=max_batch,
                          target=None if target is None else target[rows], need_grad=False,
                          seed=seed, recorder=recorder).logits
    logits = logits.float().clone()
    logits[:, rows] = exact.float()
    return logits


def majority_adversarial(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                         target: torch.Tensor | None = None, *, draws: int = 10,
                         max_batch: int = 4096, recorder: AttackRecorder | None = None
                         ) -> torch.Tensor:
    """A repeated verdict for an attack's own stopping rule: True where ``x`` is adversarial
    (misclassified, or on the target) on more than half of ``draws`` fresh draws. Always in
    fp32, also inside a bf16 attack (:func:`advdefense.precision.full_precision`)."""
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=x.device)
    with full_precision(x.device):
        res = eot_loss_grad(model, x, y, "ce", eot_samples=draws, max_batch=max_batch,
                            need_grad=False, recorder=recorder)
    return res.wrong_fraction(y, target) > 0.5


def check_adversarial_output(x_adv, x: torch.Tensor, eps: float, norm: str,
                             name: str = "attack") -> torch.Tensor:
    """Validate an attack's output before it is counted: same shape as ``x``, finite, inside
    [0, 1] and the eps-ball (with a small float tolerance). Raises :class:`AdvDefenseError`."""
    if not isinstance(x_adv, torch.Tensor) or x_adv.shape != x.shape:
        shape = tuple(x_adv.shape) if isinstance(x_adv, torch.Tensor) else type(x_adv).__name__
        raise AdvDefenseError(f"{name} returned {shape}, expected a tensor of shape "
                              f"{tuple(x.shape)}")
    if not torch.isfinite(x_adv).all():
        raise AdvDefenseError(f"{name} returned non-finite values")
    tol = 1e-5
    if x_adv.min() < -tol or x_adv.max() > 1 + tol:
        raise AdvDefenseError(f"{name} returned values outside [0, 1] "
                              f"([{float(x_adv.min()):.4g}, {float(x_adv.max()):.4g}])")
    delta = (x_adv - x).flatten(1)
    size = delta.abs().max(1).values if norm == "linf" else delta.norm(dim=1)
    worst = float(size.max()) if size.numel() else 0.0
    if worst > eps * (1 + 1e-4) + tol:
        raise AdvDefenseError(f"{name} left the {norm} eps-ball: perturbation {worst:.4g} > "
                              f"eps {eps:g}")
    return x_adv


class Attack(ABC):
    """Base of every attack: ``attack(model, x, y, target=None) -> x_adv``.

    Keyword-only settings common to all attacks (every subclass lists them explicitly):
    ``eps`` (radius, in [0,1] pixel units), ``norm`` (``"linf"`` or ``"l2"``),
    ``eot_samples`` (``None``: the attack's default :attr:`default_eot`; see
    :meth:`effective_eot`), ``max_batch`` (rows per forward pass: the memory budget), ``seed``,
    ``restarts``, ``targeted``. ``repr(attack)`` lists every setting of the constructor: it is
    the attack's identity in reports and in suite fingerprints.

    A call takes an optional ``seed`` (default: the attack's own; the evaluation passes one per
    batch so batches and processes never replay the same random starts and draws) and an
    optional :class:`AttackRecorder` (default: a new one, readable as ``attack.trace`` after
    the call).
    """

    name = "attack"
    #: the recorded loss is maximized (judged by the convergence check); False for FAB
    maximizes_loss = True
    #: how the attack finds its points: "white-box" (gradients), "gradient-free" (scores
    #: only: Square, NAttack) or "transfer" (crafted on another model)
    access = "white-box"
    #: EOT draws when ``eot_samples`` is not given
    default_eot = 1

    def __init__(
        self,
        *,
        eps: float,
        norm: str = "linf",
        eot_samples: int | None = None,
        max_batch: int = 4096,
        seed: int | None = None,
        restarts: int = 1,
        targeted: bool = False,
    ) -> None:
        self.eps = check_eps(eps)
        if norm not in NORMS:
            raise AdvDefenseError(f"unknown norm {norm!r}; choose linf or l2")
        #: whether the caller set ``eot_samples`` (then it is never lowered)
        self.eot_given = eot_samples is not None
        eot_samples = self.default_eot if eot_samples is None else eot_samples
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
        self.targeted = bool(targeted)
        self.trace = AttackRecorder(0)

    #: settings left out of :meth:`settings` (so of the repr, which names an attack in stored
    #: evaluations and their digests) while they hold these values: options that change
    #: only the cost, added after such evaluations were stored
    quiet_defaults: dict[str, object] = {"early_stop": False}

    def settings(self) -> dict[str, object]:
        """Every keyword setting of the constructor with its current value (those of
        :attr:`quiet_defaults` only when they differ from it)."""
        out: dict[str, object] = {}
        for cls in type(self).__mro__:
            init = cls.__dict__.get("__init__")
            if init is None or cls is object:
                continue
            for p in inspect.signature(init).parameters.values():
                if p.kind is p.KEYWORD_ONLY and p.name not in out and hasattr(self, p.name):
                    out[p.name] = getattr(self, p.name)
        return {k: v for k, v in out.items()
                if k not in self.quiet_defaults or v != self.quiet_defaults[k]}

    def __repr__(self) -> str:
        def show(v: object) -> str:
            if isinstance(v, Objective):
                return repr(v.name)
            if isinstance(v, float):
                return f"{v:.6g}"
            if isinstance(v, (nn.Module, Attack)):
                return type(v).__name__ if isinstance(v, nn.Module) else repr(v)
            return repr(v)

        args = ", ".join(f"{k}={show(v)}" for k, v in self.settings().items())
        return f"{type(self).__name__}({args})"

    def effective_eot(self, model: nn.Module, x: torch.Tensor | None = None,
                      y: torch.Tensor | None = None) -> int:
        """EOT draws actually used: ``eot_samples``, lowered to 1 (and logged) only where the
        repeats would be identical and nobody asked for them: a default EOT (not given by
        the caller), or a model whose stochastic layers the caller froze (fixed-draw
        protocols), on a model with no live randomness
        (:func:`~advdefense.randomness.is_stochastic`) whose outputs (and, for a white-box
        attack, input gradients) agree over two calls on a few rows of ``x``. An EOT the
        caller set on a model that declares no randomness is never lowered: randomness can
        hide where a probe does not look (a backward hook, a rare branch)."""
        k = self.eot_samples
        if k == 1 or is_stochastic(model):
            return k
        frozen = bool(stochastic_modules(model))  # all frozen, or is_stochastic would say so
        if self.eot_given and not frozen:
            return k
        grads = self.access == "white-box"
        what = "outputs and gradients" if grads else "outputs"
        if x is None or not x.shape[0] or varies_between_calls(model, x, y, gradients=grads):
            log.info("%s: the model declares no live randomness, but its %s differ between "
                     "calls (or were not probed): keeping eot_samples=%d", self.name, what, k)
            return k
        log.info("%s: %s model (%s agree over two calls): eot_samples=%d lowered to 1",
                 self.name, "frozen" if frozen else "deterministic", what, k)
        return 1

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, target=None,
        seed: int | None = None, recorder: AttackRecorder | None = None,
    ) -> torch.Tensor:
        check_inputs(x, y)
        if self.targeted and target is None:
            raise AdvDefenseError(f"{self.name} is targeted: pass target=")
        x, y = x.detach(), y.detach()
        recorder = AttackRecorder(x.shape[0], x.device) if recorder is None else recorder
        self.trace = recorder
        if self.eps == 0 or x.shape[0] == 0:
            recorder.returned_adversarial = torch.zeros(x.shape[0], dtype=torch.bool)
            return x.clone()
        seed = self.seed if seed is None else seed
        with eval_mode(model), seeded(seed), channels_last_weights(model):
            x_adv = self.run(model, x, y, target if self.targeted else None, recorder)
        if recorder.returned_adversarial is None:
            recorder.returned_adversarial = recorder.ever_adversarial.clone()
        return project(x_adv.detach(), x, self.eps, self.norm)

    @abstractmethod
    def run(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
        recorder: AttackRecorder,
    ) -> torch.Tensor:
        """Return adversarial examples; the model is already in eval mode and seeded. Report
        to ``recorder``; set ``recorder.returned_adversarial`` for the returned points."""


def varies_between_calls(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, *,
                          gradients: bool, rows: int = 4) -> bool:
    """Whether two calls of ``model`` on the first ``rows`` examples give different outputs
    (or, with ``gradients``, different input gradients of the true-class logit). The
    caller's RNG is left as it was."""
    xs = x[:rows].detach()
    idx = (y[:rows] if y is not None else torch.zeros(xs.shape[0], dtype=torch.long,
                                                      device=x.device))[:, None]
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    outs, grads = [], []
    with torch.random.fork_rng(devices=devices):
        for _ in range(2):
            xi = xs.clone().requires_grad_(gradients)
            with torch.enable_grad() if gradients else torch.no_grad():
                out = model(xi)
                if gradients:
                    (g,) = torch.autograd.grad(out.gather(1, idx).sum(), xi)
                    grads.append(g.float())
            outs.append(out.detach().float())

    def differ(a: torch.Tensor, b: torch.Tensor) -> bool:
        return not torch.allclose(a, b, rtol=1e-5, atol=1e-6 * float(a.abs().max()) + 1e-12)

    return differ(*outs) or (gradients and differ(*grads))


def batch_seed(seed: int | None, index: int) -> int | None:
    """The seed of batch ``index`` (e.g. the position of its first example in the dataset) of
    an attack seeded with ``seed``: batches and processes get independent random streams."""
    return None if seed is None else draw_seed(seed, index, 7)
