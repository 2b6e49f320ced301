"""Attack-failure checks, run with every evaluation.

Each check returns a :class:`CheckResult` ``(name, passed, detail, remedy)``; ``passed`` is
``True``/``False``, or ``None`` when the check could not be judged (say, no black-box attack was
run). The checks are our own implementation of the indicators of Pintor et al. 2022,
"Indicators of Attack Failure: Debugging and Improving Optimization of Adversarial Examples"
(silent success, non-converging loss, unbounded attack, transfer failure, non-converging
restarts, incomplete optimization), of AutoAttack's ``checks.py`` (Croce & Hein 2020:
randomness without EOT, zero gradients, output range, dynamic model, Square beating white-box)
and of Carlini et al. 2019, "On Evaluating Adversarial Robustness" (accuracy must fall to ~0
for an unbounded attack and decrease with eps).

======================= ===============================================================
name                    fails when
======================= ===============================================================
randomness_without_eot  the model is random and an attack ran on the live model with
                        ``eot_samples == 1`` (or only frozen-draw protocols ran)
nonfinite_gradients     an attack or the probe saw NaN/inf gradients
zero_gradients          any example (more than ``gradients.max_zero_examples``) has an
                        all-zero input gradient of the margin loss in the probe or at the
                        first step of an attack (AutoAttack flags any such point)
output_range            the model's outputs are probabilities (non-negative rows summing to
                        one) instead of logits
dynamic_model           the model's parameters or buffers change during forward passes in
                        eval mode
batch_dependence        a deterministic model's logits for an example change with the other
                        examples of its batch (batch statistics at test time)
unbounded_attack        PGD from the clean point (no random start) with eps covering the
                        whole input box leaves more than ``unbounded.max_accuracy`` accuracy
eps_monotone            robust accuracy rises with eps or does not fall over the sweep
more_iterations         PGD with 5x steps and 2 restarts lowers the reported worst case
                        (the base PGD's accuracy without a result) by > 3 points, or does
                        worse than the base PGD by > 3 points
blackbox_beats_whitebox a gradient-free attack (Square, NAttack) or a transfer (a
                        ``TransferAttack``, the ``paper`` protocol) fools examples that every
                        white-box attack missed
silent_success          an attack saw an adversarial point during its run, but the point it
                        returned is classified correctly by the final repeated verdict
transfer_failure        of the examples a transfer's substitute (or the ``paper``
                        protocol's frozen draw) was fooled on, fewer than
                        ``transfer.min_rate`` fool the target
loss_not_converged      a run's mean loss over its still-robust examples changed by more
                        than ``convergence.tol`` between the last two windows of 10% of its
                        steps (each run, restart or target judged on its own tail)
restarts_not_converging the last restart of an attack with restarts > 1 still found new
                        adversarial examples
======================= ===============================================================

Settings live in one frozen :class:`CheckSettings` (a group per check); ``skip`` removes
checks before anything runs. The probes run on the first ``n_probe`` examples, with the EOT
of the evaluation's attacks; they are seeded, and the verdict of each probe has its own seed
(:func:`~.protocols.verdict_seed` under the probe's name), never the probe attack's draws.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..attacks import PGD
from ..attacks.base import eot_loss_grad, eval_mode
from ..errors import AdvDefenseError
from ..randomness import is_stochastic, seeded
from .protocols import verdict, verdict_seed

log = logging.getLogger(__name__)

__all__ = ["CHECK_NAMES", "CHECKS", "CheckResult", "CheckSettings", "format_checks",
           "run_checks"]


@dataclass(frozen=True)
class GradientSettings:
    """Zero gradients: fail when more than ``max_zero_examples`` examples have a gradient
    norm ``<= zero_eps``."""

    max_zero_examples: int = 0
    zero_eps: float = 0.0


@dataclass(frozen=True)
class UnboundedSettings:
    """``eps`` default: 1.0 (L-inf) or sqrt(d) (L2); PGD from the clean point."""

    eps: float | None = None
    steps: int = 100
    max_accuracy: float = 0.02


@dataclass(frozen=True)
class MonotoneSettings:
    """``accuracies`` (eps -> accuracy of an existing sweep) replaces the probe sweep."""

    factors: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
    steps: int = 20
    tol: float = 0.03
    accuracies: tuple[tuple[float, float], ...] | None = None


@dataclass(frozen=True)
class IterationsSettings:
    steps: int = 20
    factor: int = 5
    restarts: int = 2
    tol: float = 0.03


@dataclass(frozen=True)
class BlackboxSettings:
    tol: int = 0


@dataclass(frozen=True)
class TransferSettings:
    min_rate: float = 0.5
    min_examples: int = 5


@dataclass(frozen=True)
class ConvergenceSettings:
    tol: float = 0.05
    fraction: float = 0.1
    min_steps: int = 10


@dataclass(frozen=True)
class RestartSettings:
    max_new: int = 0


@dataclass(frozen=True)
class CheckSettings:
    """Every setting of the attack-failure checks, one group per check.

    ``eps``/``norm``/``eot_samples``/``repeats`` default to those of the evaluation (largest
    eps, largest EOT of the fresh-protocol attacks, the verdict's repeats). ``probes=False``
    skips the checks that run new attacks (unbounded, eps sweep, more iterations);
    ``skip`` names checks not to run at all.
    """

    eps: float | None = None
    norm: str | None = None
    eot_samples: int | None = None
    repeats: int | None = None
    n_probe: int = 64
    seed: int = 0
    probes: bool = True
    skip: tuple[str, ...] = ()
    gradients: GradientSettings = GradientSettings()
    unbounded: UnboundedSettings = UnboundedSettings()
    monotone: MonotoneSettings = MonotoneSettings()
    iterations: IterationsSettings = IterationsSettings()
    blackbox: BlackboxSettings = BlackboxSettings()
    transfer: TransferSettings = TransferSettings()
    convergence: ConvergenceSettings = ConvergenceSettings()
    restarts: RestartSettings = RestartSettings()

    def __post_init__(self) -> None:
        unknown = set(self.skip) - set(CHECK_NAMES)
        if unknown:
            raise AdvDefenseError(
                f"unknown check(s) {sorted(unknown)}; choose from {', '.join(CHECK_NAMES)}")

    def with_(self, **changes) -> CheckSettings:
        """A copy with some settings changed (groups as objects)."""
        return replace(self, **changes)


@dataclass
class CheckResult:
    """Outcome of one check: ``passed`` is True, False or None (could not be judged)."""

    name: str
    passed: bool | None
    detail: str
    remedy: str = ""

    @property
    def status(self) -> str:
        return {True: "pass", False: "FAIL", None: "n/a"}[self.passed]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "status": self.status,
                "detail": self.detail, "remedy": self.remedy}


def format_checks(checks: list[CheckResult]) -> str:
    """Plain-text lines ``[pass] name: detail`` (+ remedy on failure)."""
    lines = []
    for c in checks:
        line = f"[{c.status}] {c.name}: {c.detail}"
        if c.passed is False and c.remedy:
            line += f" -> {c.remedy}"
        lines.append(line)
    return "\n".join(lines)


@dataclass
class Context:
    """What every check may read: the model, the probe examples, the evaluation's result and
    the resolved settings."""

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    result: Any
    settings: CheckSettings
    eps: float | None
    norm: str
    eot: int
    repeats: int
    #: all-repeats worst case of the evaluation on the probe examples (None without one)
    reported: torch.Tensor | None = None

    @property
    def seed(self) -> int:
        return self.settings.seed

    def entries(self):
        return [] if self.result is None else list(self.result.entries.values())

    def correct(self, x_adv: torch.Tensor, probe: str) -> torch.Tensor:
        """Per-example all-repeats verdict of ``x_adv``, its draws seeded from (the checks'
        seed, ``probe``) apart from every attack's draws."""
        v = verdict(self.model, x_adv, self.y, repeats=self.repeats,
                    seed=verdict_seed(self.seed, f"check:{probe}", 0))
        return v.all

    def acc(self, x_adv: torch.Tensor, probe: str) -> float:
        return float(self.correct(x_adv, probe).float().mean()) if len(self.y) else math.nan

    def pgd(self, **kw) -> PGD:
        return PGD(norm=self.norm, eot_samples=self.eot, seed=self.seed, **kw)


# -- the checks ------------------------------------------------------------------------------
_EOT_REMEDY = ("attack with EOT (eot_samples >= 20, the 'rand' suite) and report the "
               "repeated-prediction verdict")


def check_randomness(ctx: Context) -> CheckResult:
    """Randomness detected without EOT (AutoAttack ``check_randomized``)."""
    name = "randomness_without_eot"
    with eval_mode(ctx.model), torch.inference_mode():
        outs = [ctx.model(ctx.x[:8]) for _ in range(2)]
    random = not torch.allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    if not random and not is_stochastic(ctx.model):
        return CheckResult(name, True, "two forward passes of the same input agree "
                           "(deterministic model)")
    if not is_stochastic(ctx.model):
        return CheckResult(name, False, "forward passes differ but the model declares no "
                           "stochastic layer, so attacks ran without EOT and verdicts used one "
                           "prediction", "evaluate through advdefense.evaluation (it wraps such "
                           "models) or use advdefense.randomness.StochasticModule; " + _EOT_REMEDY)
    if ctx.result is None:
        return CheckResult(name, None, "model is stochastic; no attack results to inspect")
    fresh = [e for e in ctx.entries() if e.protocol == "fresh"]
    if ctx.entries() and not fresh:
        return CheckResult(name, False, "model is stochastic but every attack ran on one frozen "
                           "draw (paper/fixed protocols only)", _EOT_REMEDY)
    no_eot = [e.label for e in fresh if e.trace is not None and e.trace.eot_samples <= 1
              and e.trace.access != "transfer"]
    if no_eot:
        return CheckResult(name, False, f"model is stochastic but {', '.join(no_eot)} ran with "
                           "eot_samples=1", _EOT_REMEDY)
    unknown = [e.label for e in fresh if e.trace is None]
    if unknown:
        return CheckResult(name, None, "model is stochastic and no record says which EOT "
                           f"{', '.join(unknown)} used")
    return CheckResult(name, True, "model is stochastic and every fresh-protocol attack used EOT")


def _probe_gradient(ctx: Context) -> torch.Tensor:
    with eval_mode(ctx.model):
        res = eot_loss_grad(ctx.model, ctx.x, ctx.y, "margin", eot_samples=ctx.eot)
    return res.grad.flatten(1)


def check_nonfinite(ctx: Context) -> CheckResult:
    g = _probe_gradient(ctx)
    nonfinite = int((~torch.isfinite(g)).sum())
    traced = sum(e.trace.nonfinite for e in ctx.entries() if e.trace is not None)
    return CheckResult("nonfinite_gradients", nonfinite + traced == 0,
                       f"{nonfinite} non-finite entries in the probe gradient, {traced} in "
                       "attack gradients",
                       "find the NaN/inf source (log of 0, division by a norm); use a margin "
                       "loss or BPDA; results of gradient attacks are unreliable")


def check_zero_gradients(ctx: Context) -> CheckResult:
    """Zero input gradients (AutoAttack ``check_zero_gradients``): the count of examples, any
    of them flagged by default."""
    opts = ctx.settings.gradients
    g = _probe_gradient(ctx)
    norms = torch.where(torch.isfinite(g), g, torch.zeros_like(g)).norm(dim=1)
    zero = int((norms <= opts.zero_eps).sum())
    parts = [f"probe (margin loss): {zero} of {len(norms)} examples have a zero gradient"]
    worst = zero
    for e in ctx.entries():
        t = e.trace
        if t is None or t.grad_norms is None or t.access != "white-box":
            continue
        first = t.grad_norms[~torch.isnan(t.grad_norms)]
        count = int((first <= opts.zero_eps).sum())
        if count:
            parts.append(f"{e.label}: {count} of {len(first)} at the first step")
        worst = max(worst, count)
    return CheckResult("zero_gradients", worst <= opts.max_zero_examples, "; ".join(parts),
                       "gradient masking suspected (non-differentiable or saturated layer): "
                       "use BPDA for the non-differentiable part, a margin/DLR loss, or Square")


def check_output_range(ctx: Context) -> CheckResult:
    """AutoAttack ``check_range_output``: logits expected, probabilities flagged."""
    with eval_mode(ctx.model), torch.inference_mode():
        out = ctx.model(ctx.x[:16]).float()
    probs = bool((out >= -1e-6).all() and (out <= 1 + 1e-6).all()
                 and torch.allclose(out.sum(1), torch.ones(out.shape[0]), atol=1e-4))
    if probs:
        return CheckResult("output_range", False, "the outputs are probabilities (rows in "
                           "[0, 1] summing to 1), not logits: cross-entropy and DLR losses "
                           "on them are flat where the model is confident",
                           "return logits (drop the final softmax), or attack with the margin "
                           "loss, EPGD/SmoothAdv for smoothed classifiers, and Square")
    return CheckResult("output_range", True, f"outputs look like logits (range "
                       f"[{float(out.min()):.3g}, {float(out.max()):.3g}])")


def _state_hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_dynamic(ctx: Context) -> CheckResult:
    """AutoAttack ``check_dynamic``: a model whose weights or buffers change while it is
    evaluated (BatchNorm statistics updating, a counter, test-time training) is a moving
    target: attacks and verdicts see different models."""
    before = _state_hash(ctx.model)
    with eval_mode(ctx.model), torch.no_grad():
        ctx.model(ctx.x[:8])
        ctx.model(ctx.x[:8])
    if _state_hash(ctx.model) != before:
        return CheckResult("dynamic_model", False, "parameters or buffers changed during two "
                           "forward passes in eval mode",
                           "freeze the model's state for evaluation (no BatchNorm updates in "
                           "eval mode, no test-time adaptation), or evaluate an adaptive "
                           "attack that models the update")
    return CheckResult("dynamic_model", True, "parameters and buffers unchanged by forward passes")


def check_batch_dependence(ctx: Context) -> CheckResult:
    """A model whose output for an example depends on the other examples of its batch
    (BatchNorm on batch statistics at test time, per-batch input normalisation, test-time
    adaptation over the batch) answers the attack's batch one way and the verdict's batch
    another: the figure then measures batch compositions, not examples, and can read too high.
    Compared on the first 8 probe examples: their logits in one batch, in two halves, and in
    reversed order. Judged on deterministic models only (a random model's calls differ anyway;
    its draws depend on the batch by design)."""
    name = "batch_dependence"
    x = ctx.x[:8]
    if len(x) < 2:
        return CheckResult(name, None, "needs at least 2 probe examples")
    half = len(x) // 2
    with eval_mode(ctx.model), torch.inference_mode():
        whole = ctx.model(x).float()
        again = ctx.model(x).float()
        if is_stochastic(ctx.model) or not torch.allclose(whole, again, rtol=1e-5, atol=1e-6):
            return CheckResult(name, None, "random model: not judged (its calls differ anyway)")
        halves = torch.cat([ctx.model(x[:half]), ctx.model(x[half:])]).float()
        reversed_ = ctx.model(x.flip(0)).float().flip(0)
    # kernels for other batch sizes round differently; batch statistics move logits by O(1)
    tol = 1e-2 * max(1.0, float(whole.abs().max()))
    gap = max(float((whole - halves).abs().max()), float((whole - reversed_).abs().max()))
    if gap > tol:
        flipped = int(((whole.argmax(1) != halves.argmax(1))
                       | (whole.argmax(1) != reversed_.argmax(1))).sum())
        return CheckResult(name, False, f"logits of an example change by up to {gap:.3g} with "
                           f"the other examples of its batch (prediction changed on {flipped} "
                           f"of {len(x)})", "evaluate a model whose eval-mode output is per "
                           "example (BatchNorm with running statistics, no per-batch "
                           "normalisation), or with batch size 1; the figure is an upper "
                           "bound until then")
    return CheckResult(name, True, f"logits unchanged by the rest of the batch (largest change "
                       f"{gap:.2g}, tolerance {tol:.2g})")


def check_unbounded(ctx: Context) -> CheckResult:
    """Accuracy must reach ~0 when eps covers the whole input box (Carlini et al. 2019);
    the attack starts from the clean point, since a random start in such a ball is already
    noise that can fool a gradient-masked model without any optimization."""
    opts = ctx.settings.unbounded
    eps = opts.eps if opts.eps is not None else (
        1.0 if ctx.norm == "linf" else math.sqrt(ctx.x[0].numel()))
    attack = ctx.pgd(eps=eps, steps=opts.steps, step_size=eps / 10, random_start=False)
    with eval_mode(ctx.model), seeded(ctx.seed):
        acc = ctx.acc(attack(ctx.model, ctx.x, ctx.y), "unbounded_attack")
    return CheckResult(
        "unbounded_attack", acc <= opts.max_accuracy,
        f"PGD-{opts.steps} from the clean point with eps={eps:g} ({ctx.norm}) leaves "
        f"{100 * acc:.1f}% accuracy on {len(ctx.y)} examples (allowed "
        f"{100 * opts.max_accuracy:g}%)",
        "gradient masking suspected: the attack cannot succeed even without a budget; use "
        "BPDA/EOT, another loss, or a black-box attack (Square)")


def check_eps_monotone(ctx: Context) -> CheckResult:
    """Accuracy must not rise as eps grows, and must fall somewhere along the sweep."""
    opts = ctx.settings.monotone
    if ctx.eps is None or ctx.eps <= 0:
        return CheckResult("eps_monotone", None, "no positive eps to sweep")
    if opts.accuracies is not None:
        accuracies = dict(opts.accuracies)
    else:
        accuracies = {}
        with eval_mode(ctx.model), seeded(ctx.seed):
            for f in opts.factors:
                e = ctx.eps * f
                accuracies[e] = ctx.acc(ctx.pgd(eps=e, steps=opts.steps)(ctx.model, ctx.x,
                                                                          ctx.y),
                                        f"eps_monotone:{e!r}")
    pts = sorted(accuracies.items())
    shown = ", ".join(f"{e:g}: {100 * a:.1f}%" for e, a in pts)
    if len(pts) < 2:
        return CheckResult("eps_monotone", None, f"need at least two eps values ({shown})")
    rises = [(pts[i][0], pts[i + 1][0]) for i in range(len(pts) - 1)
             if pts[i + 1][1] > pts[i][1] + opts.tol]
    flat = pts[-1][1] >= pts[0][1] - opts.tol and pts[0][1] > 0
    detail = f"accuracy by eps: {shown}"
    if rises:
        detail += "; rises between " + ", ".join(f"{a:g}->{b:g}" for a, b in rises)
    if flat:
        detail += "; no decrease over the sweep"
    return CheckResult("eps_monotone", not rises and not flat, detail,
                       "the attack is not optimizing (masked gradients, bad step size or "
                       "randomness): check gradients, use EOT/BPDA, tune the step size")


def check_more_iterations(ctx: Context) -> CheckResult:
    """A stronger PGD (``factor`` x the steps, ``restarts`` restarts) must not lower the
    figure the report gives, the evaluation's worst case over its attacks on the probe
    examples (without an evaluation: the base PGD-``steps``), by more than ``tol``: lower
    means that figure overstates robustness. It must not do worse than the base PGD by more
    than ``tol`` either: that means unstable optimization."""
    opts = ctx.settings.iterations
    if ctx.eps is None or ctx.eps <= 0:
        return CheckResult("more_iterations", None, "no positive eps")
    base = ctx.pgd(eps=ctx.eps, steps=opts.steps)
    strong = PGD(eps=ctx.eps, norm=ctx.norm, steps=opts.steps * opts.factor,
                 restarts=opts.restarts, eot_samples=ctx.eot, seed=ctx.seed + 1)
    with eval_mode(ctx.model), seeded(ctx.seed):
        a_base = ctx.acc(base(ctx.model, ctx.x, ctx.y), "more_iterations:base")
        a_strong = ctx.acc(strong(ctx.model, ctx.x, ctx.y), "more_iterations:strong")
    detail = (f"PGD-{opts.steps}: {100 * a_base:.1f}%, PGD-{opts.steps * opts.factor} x "
              f"{opts.restarts} restarts: {100 * a_strong:.1f}%")
    if ctx.reported is not None:
        a_reported = float(ctx.reported.float().mean()) if len(ctx.reported) else math.nan
        detail += f", reported worst case: {100 * a_reported:.1f}%"
    detail += f" on {len(ctx.y)} examples"
    if a_strong > a_base + opts.tol:
        return CheckResult("more_iterations", False, detail + " (stronger attack did worse)",
                           "the optimization is unstable (randomness without EOT, too large a "
                           "step, masked gradients); use EOT and a smaller step size")
    if ctx.reported is not None:
        if a_strong < a_reported - opts.tol:
            return CheckResult("more_iterations", False,
                               detail + " (the reported worst case is not converged)",
                               "the reported figure overstates robustness: add attacks with "
                               "more iterations and restarts (APGD, suite 'standard' or "
                               "'full')")
    elif a_strong < a_base - opts.tol:
        return CheckResult("more_iterations", False, detail + " (base attack not converged)",
                           "report attacks with more iterations and restarts (APGD, suite "
                           "'standard' or 'full')")
    return CheckResult("more_iterations", True, detail)


def is_transfer_stage(e) -> bool:
    """Whether a result entry is a transfer (a substitute model, or a frozen draw)."""
    return e.protocol == "paper" or (e.trace is not None and e.trace.access == "transfer")


def is_blackbox_stage(e) -> bool:
    """Whether a result entry is a gradient-free attack (Square, NAttack)."""
    return e.trace is not None and e.trace.access == "gradient-free"


def check_blackbox(ctx: Context) -> CheckResult:
    """Gradient-free (Square, NAttack) or transfer (``TransferAttack``, the ``paper``
    protocol) attacks must not succeed on examples that every white-box attack missed. What
    an attack is comes from its class (``Attack.access``), not from its label."""
    name = "blackbox_beats_whitebox"
    entries = ctx.entries()
    other = [e for e in entries if is_blackbox_stage(e) or is_transfer_stage(e)]
    white = [e for e in entries if e not in other]
    if not white or not other:
        return CheckResult(name, None, "needs both white-box and black-box/transfer attacks "
                           "(add 'square' or the 'paper' protocol)")
    robust_white = ctx.result.clean.verdict.all.clone()
    for e in white:
        robust_white &= e.verdict.all if e.ran is None else (e.verdict.all | ~e.ran)
    beaten = []
    for e in other:
        fooled = ~e.verdict.all if e.ran is None else (~e.verdict.all & e.ran)
        count = int((robust_white & fooled).sum())
        if count > ctx.settings.blackbox.tol:
            beaten.append(f"{e.label} on {count}")
    if beaten:
        return CheckResult(name, False, "examples robust to every white-box attack fooled by "
                           + ", ".join(beaten),
                           "the white-box attacks are failing (gradient masking): use BPDA, "
                           "EOT, other losses; trust the worst case only")
    return CheckResult(name, True, f"{', '.join(e.label for e in other)} fool no example that "
                       "the white-box attacks missed")


def check_silent_success(ctx: Context) -> CheckResult:
    """Pintor et al.'s silent success: an attack saw an adversarial point during its run (on
    all of its EOT draws), yet the point it returned is classified correctly by the final
    repeated verdict. Transfers are judged by ``transfer_failure`` instead."""
    silent, judged = [], False
    for e in ctx.entries():
        t = e.trace
        if t is None or t.ever_adversarial is None or is_transfer_stage(e):
            continue
        judged = True
        robust = e.verdict.all if e.ran is None else (e.verdict.all & e.ran)
        count = int((t.ever_adversarial & robust).sum())
        if count:
            silent.append(f"{e.label} on {count}")
    if not judged:
        return CheckResult("silent_success", None, "no attack recorded what it saw")
    if silent:
        return CheckResult("silent_success", False, "an adversarial point was found but the "
                           "returned point is classified correctly: " + ", ".join(silent),
                           "return the best iterate (most draws adversarial, then highest "
                           "loss); for random models use more EOT draws so that success on "
                           "the attack's draws carries over to fresh ones")
    return CheckResult("silent_success", True, "every adversarial point an attack found stayed "
                       "adversarial under the final verdict")


def check_transfer(ctx: Context) -> CheckResult:
    """Pintor et al.'s transfer failure: the substitute (or the frozen draw of the ``paper``
    protocol) is fooled, the target is not."""
    opts = ctx.settings.transfer
    rows, low = [], []
    for e in ctx.entries():
        t = e.trace
        if t is None or not is_transfer_stage(e):
            continue
        sub = t.substitute_adversarial if t.access == "transfer" else t.returned_adversarial
        if sub is None:
            continue
        n_sub = int(sub.sum())
        n_hit = int((sub & ~e.verdict.all).sum())
        rows.append(f"{e.label}: {n_hit} of {n_sub}")
        if n_sub >= opts.min_examples and n_hit < opts.min_rate * n_sub:
            low.append(e.label)
    if not rows:
        return CheckResult("transfer_failure", None, "no transfer attack was run")
    detail = "fooled on the target of those fooled on the substitute: " + ", ".join(rows)
    if low:
        return CheckResult("transfer_failure", False, detail,
                           "the transfer figures overstate robustness: report the adaptive "
                           "(fresh-protocol, EOT) figures, which attack the target itself")
    return CheckResult("transfer_failure", True, detail)


def _window_change(curve: torch.Tensor, fraction: float) -> float:
    k = max(1, math.ceil(fraction * curve.shape[0]))
    if curve.shape[0] < 2 * k:
        k = curve.shape[0] // 2
    last, prev = curve[-k:].mean(), curve[-2 * k:-k].mean()
    return float((last - prev).abs() / prev.abs().clamp_min(1e-8))


def check_convergence(ctx: Context) -> CheckResult:
    """Each run (restart, target) of a loss-maximizing attack: the mean loss of its examples
    not returned adversarial must change by less than ``tol`` (relative) between the last two
    windows of ``fraction`` of its steps. Ragged runs are judged each on their own."""
    opts = ctx.settings.convergence
    bad: dict[str, int] = {}
    judged: dict[str, int] = {}
    for e in ctx.entries():
        t = e.trace
        if t is None or not t.maximizes_loss or not t.runs:
            continue
        for r in t.runs:
            if r.losses.shape[0] < opts.min_steps or r.losses.numel() == 0:
                continue
            keep = torch.ones(len(r.idx), dtype=torch.bool)
            if t.returned_adversarial is not None:
                keep = ~t.returned_adversarial[r.idx]
            if not keep.any():
                continue
            curve = r.losses[:, keep].nanmean(dim=1)
            judged[e.label] = judged.get(e.label, 0) + 1
            if not torch.isfinite(curve).all() or _window_change(curve, opts.fraction) > opts.tol:
                bad[e.label] = bad.get(e.label, 0) + 1
    if bad:
        return CheckResult("loss_not_converged", False, "mean loss of robust examples still "
                           f"moving over the last {100 * opts.fraction:g}% of steps in: " +
                           ", ".join(f"{k} ({v} of {judged[k]} runs)" for k, v in bad.items()),
                           "run more iterations, reduce the step size or use APGD's step-size "
                           "schedule; for random models, more EOT draws")
    if not judged:
        return CheckResult("loss_not_converged", None,
                           f"no attack recorded a run of at least {opts.min_steps} steps")
    return CheckResult("loss_not_converged", True, f"loss converged (<{100 * opts.tol:g}% "
                       "change) in every run of " + ", ".join(judged))


def check_restarts(ctx: Context) -> CheckResult:
    """Pintor et al.'s non-converging restarts: with restarts > 1, the last restart of each
    call must not find new adversarial examples (else more restarts would find more)."""
    rows, bad = [], []
    for e in ctx.entries():
        t = e.trace
        if t is None or t.restarts <= 1 or t.new_in_last_run is None:
            continue
        rows.append(f"{e.label}: {t.new_in_last_run}")
        if t.new_in_last_run > ctx.settings.restarts.max_new:
            bad.append(e.label)
    if not rows:
        return CheckResult("restarts_not_converging", None, "no attack ran with restarts > 1")
    detail = "new adversarial examples found by the last restart: " + ", ".join(rows)
    if bad:
        return CheckResult("restarts_not_converging", False, detail,
                           "increase the restarts until the last one finds nothing new")
    return CheckResult("restarts_not_converging", True, detail)


#: every check in report order: (name, function, needs an evaluation result, runs new attacks)
CHECKS: tuple[tuple[str, Callable[[Context], CheckResult], bool, bool], ...] = (
    ("randomness_without_eot", check_randomness, False, False),
    ("nonfinite_gradients", check_nonfinite, False, False),
    ("zero_gradients", check_zero_gradients, False, False),
    ("output_range", check_output_range, False, False),
    ("dynamic_model", check_dynamic, False, False),
    ("batch_dependence", check_batch_dependence, False, False),
    ("unbounded_attack", check_unbounded, False, True),
    ("eps_monotone", check_eps_monotone, False, True),
    ("more_iterations", check_more_iterations, False, True),
    ("blackbox_beats_whitebox", check_blackbox, True, False),
    ("silent_success", check_silent_success, True, False),
    ("transfer_failure", check_transfer, True, False),
    ("loss_not_converged", check_convergence, True, False),
    ("restarts_not_converging", check_restarts, True, False),
)

#: names of all checks, in the order they are reported
CHECK_NAMES = tuple(name for name, *_ in CHECKS)


def _infer_attack_setting(result) -> tuple[float | None, str, int]:
    eps, norm, eot = None, "linf", 1
    for e in (result.entries.values() if result is not None else []):
        if e.trace is not None and e.protocol == "fresh":
            eot = max(eot, e.trace.eot_samples)
    for spec in (result.config.get("specs", []) if result is not None else []):
        if spec.get("eps") is not None:
            eps = spec["eps"] if eps is None else max(eps, spec["eps"])
            norm = spec.get("norm", norm) or norm
    if result is not None and eps is None:
        eps = result.config.get("eps")
        norm = result.config.get("norm", norm)
    return eps, norm, eot


def run_checks(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], result=None,
               settings: CheckSettings | None = None) -> list[CheckResult]:
    """Run every check of :data:`CHECKS` not skipped; see the module docstring."""
    settings = CheckSettings() if settings is None else settings
    if not isinstance(settings, CheckSettings):
        raise AdvDefenseError("run_checks takes a CheckSettings")
    x, y = data
    inferred_eps, inferred_norm, inferred_eot = _infer_attack_setting(result)
    repeats = settings.repeats if settings.repeats is not None else (
        result.repeats if result is not None and result.stochastic else 10)
    device = next(iter(list(model.parameters()) + list(model.buffers())),
                  torch.zeros(0)).device
    eps = inferred_eps if settings.eps is None else settings.eps
    norm = settings.norm or inferred_norm
    reported = None
    if (result is not None and result.entries and eps is not None and inferred_eps is not None
            and math.isclose(float(eps), float(inferred_eps)) and norm == inferred_norm):
        reported = result.worst.all[:settings.n_probe].cpu()
    ctx = Context(model, x[:settings.n_probe].to(device), y[:settings.n_probe].to(device),
                  result, settings, eps, norm,
                  inferred_eot if settings.eot_samples is None else int(settings.eot_samples),
                  int(repeats), reported)
    out: list[CheckResult] = []
    with seeded(settings.seed):
        for name, check, needs_result, probes in CHECKS:
            if name in settings.skip or (probes and not settings.probes):
                continue
            if needs_result and result is None:
                continue
            out.append(check(ctx))
    for c in out:
        if c.passed is False:
            log.warning("check %s failed: %s", c.name, c.detail)
    return out
