"""Attack-failure checks, run with every evaluation.

Each check returns a :class:`CheckResult` ``(name, passed, detail, remedy)``; ``passed`` is
``True``/``False``, or ``None`` when the check could not be judged (say, no black-box attack was
run). The checks are our own implementation of ideas from Pintor et al. 2022, "Indicators of
Attack Failure: Debugging and Improving Optimization of Adversarial Examples" (silent success,
non-converging loss, unbounded attack, transfer/black-box beating white-box, incomplete
optimization) and from AutoAttack's ``checks.py`` (Croce & Hein 2020: randomness without EOT,
zero gradients, Square beating white-box) and Carlini et al. 2019, "On Evaluating Adversarial
Robustness" (accuracy must fall to ~0 for an unbounded attack and decrease with eps).

=====================  =================================================================
name                   fails when
=====================  =================================================================
randomness_without_eot two forward passes of the same input differ while an attack in the
                       evaluation ran with ``eot_samples == 1`` on the live model (or the
                       randomness is not declared through :mod:`advdefense.randomness`)
nonfinite_gradients    an attack or the probe saw NaN/inf gradients
zero_gradients         more than ``zero_grad_fraction`` of probed examples (or of first
                       attack steps) have an all-zero input gradient
unbounded_attack       PGD with eps = ``unbounded_eps`` (1.0 L-inf: every image reachable),
                       ``unbounded_steps`` steps, leaves accuracy above ``unbounded_max_acc``
eps_monotone           PGD accuracy rises by more than ``monotone_tol`` when eps grows, or
                       does not fall at all between eps/4 and 2 eps
more_iterations        PGD with ``iterations_factor`` x steps and ``iterations_restarts``
                       restarts changes accuracy by more than ``iterations_tol``
blackbox_beats_whitebox a black-box (Square) or transfer (``paper`` protocol) attack fools
                       more than ``blackbox_tol`` examples that every white-box attack missed
silent_success         an attack found an adversarial iterate but did not return it
loss_not_converged     the mean loss over still-robust examples changed by more than
                       ``converge_tol`` (relative) over the last 10% of the iterations
=====================  =================================================================

The probes (gradient probe, unbounded attack, eps sweep, more iterations) run on the first
``n_probe`` examples, with the EOT of the evaluation's attacks, and are seeded.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..attacks import PGD
from ..attacks.base import eot_loss_grad, eval_mode
from ..randomness import is_stochastic, seeded
from .protocols import verdict

log = logging.getLogger(__name__)

__all__ = ["CHECK_NAMES", "CheckResult", "BLACK_BOX_ATTACKS", "format_checks", "run_checks",
           "check_randomness", "check_gradients", "check_unbounded", "check_eps_monotone",
           "check_more_iterations", "check_blackbox", "check_silent_success",
           "check_convergence"]

#: names of all checks, in the order they are reported
CHECK_NAMES = ("randomness_without_eot", "nonfinite_gradients", "zero_gradients",
               "unbounded_attack", "eps_monotone", "more_iterations", "blackbox_beats_whitebox",
               "silent_success", "loss_not_converged")

#: registry names of attacks that use no gradients
BLACK_BOX_ATTACKS = frozenset({"square"})


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


# ----------------------------------------------------------------------------------------
def _probe_acc(model, x, y, repeats: int) -> float:
    v = verdict(model, x, y, repeats=repeats)
    return float(v.all.float().mean()) if len(y) else math.nan


def check_randomness(model: nn.Module, x: torch.Tensor, result=None, *,
                     forwards: int = 2) -> CheckResult:
    """(a) Randomness detected without EOT (AutoAttack ``check_randomized``)."""
    with eval_mode(model), torch.inference_mode():
        outs = [model(x) for _ in range(max(2, forwards))]
    random = any(not torch.allclose(outs[0], o, rtol=1e-5, atol=1e-6) for o in outs[1:])
    remedy = ("attack with EOT (eot_samples >= 20, the 'rand' suite) and report the "
              "repeated-prediction verdict")
    if not random:
        return CheckResult("randomness_without_eot", True,
                           "two forward passes of the same input agree (deterministic model)")
    if not is_stochastic(model):
        return CheckResult(
            "randomness_without_eot", False,
            "forward passes differ but the model declares no stochastic layer, so attacks "
            "ran without EOT and verdicts used one prediction",
            "implement the randomness as an advdefense.randomness.StochasticModule (or set "
            "model.stochastic = True) so EOT and repeated verdicts apply; " + remedy)
    if result is None:
        return CheckResult("randomness_without_eot", None,
                           "model is stochastic; no attack results to inspect")
    fresh = [e for e in result.entries.values() if e.protocol == "fresh"]
    if result.entries and not fresh:
        return CheckResult("randomness_without_eot", False,
                           "model is stochastic but every attack ran on one frozen draw "
                           "(paper/fixed protocols only)", remedy)
    no_eot = [e.label for e in fresh if e.trace is not None and e.trace.eot_samples <= 1]
    if no_eot:
        return CheckResult("randomness_without_eot", False,
                           f"model is stochastic but {', '.join(no_eot)} ran with eot_samples=1",
                           remedy)
    return CheckResult("randomness_without_eot", True,
                       "model is stochastic and every fresh-protocol attack used EOT")


def check_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, result=None, *,
                    eot_samples: int = 1, zero_grad_fraction: float = 0.05,
                    zero_grad_eps: float = 0.0) -> list[CheckResult]:
    """(b) Zero and non-finite input gradients: a direct CE-gradient probe on ``x`` plus the
    gradient norms recorded in the attack traces (first step of each attack).

    An example's gradient counts as zero when its L2 norm is ``<= zero_grad_eps``.
    """
    with eval_mode(model):
        res = eot_loss_grad(model, x, y, "ce", eot_samples=eot_samples)
    g = res.grad.flatten(1)
    nonfinite = int((~torch.isfinite(g)).sum())
    norms = torch.where(torch.isfinite(g), g, torch.zeros_like(g)).norm(dim=1)
    zero = float((norms <= zero_grad_eps).float().mean()) if len(norms) else 0.0
    detail_zero = f"probe: {100 * zero:.1f}% of {len(norms)} examples have a zero gradient"
    trace_nonfinite, trace_zero = 0, []
    if result is not None:
        for e in result.entries.values():
            t = e.trace
            if t is None:
                continue
            trace_nonfinite += t.nonfinite
            if t.grad_norms is not None and t.grad_norms.numel():
                first = t.grad_norms[0]
                frac = float((first <= zero_grad_eps).float().mean())
                if frac > zero_grad_fraction:
                    trace_zero.append(f"{e.label} {100 * frac:.0f}%")
    zero_fail = zero > zero_grad_fraction or bool(trace_zero)
    if trace_zero:
        detail_zero += "; zero first-step gradients in " + ", ".join(trace_zero)
    zero_remedy = ("gradient masking suspected (non-differentiable or saturated layer): use "
                   "BPDA for the non-differentiable part, a margin/DLR loss, or Square")
    nonfinite_total = nonfinite + trace_nonfinite
    return [
        CheckResult("nonfinite_gradients", nonfinite_total == 0,
                    f"{nonfinite} non-finite entries in the probe gradient, "
                    f"{trace_nonfinite} in attack gradients",
                    "find the NaN/inf source (log of 0, division by a norm); use a margin loss "
                    "or BPDA; results of gradient attacks are unreliable"),
        CheckResult("zero_gradients", not zero_fail, detail_zero, zero_remedy),
    ]


def check_unbounded(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str = "linf",
                    unbounded_eps: float | None = None, unbounded_steps: int = 100,
                    unbounded_max_acc: float = 0.02, eot_samples: int = 1, repeats: int = 10,
                    seed: int = 0) -> CheckResult:
    """(c) Accuracy must reach ~0 when eps covers the whole input box.

    ``unbounded_eps`` defaults to 1.0 (L-inf) or ``sqrt(d)`` (L2, the diameter of [0,1]^d).
    """
    if unbounded_eps is None:
        unbounded_eps = 1.0 if norm == "linf" else math.sqrt(x[0].numel())
    attack = PGD(eps=unbounded_eps, norm=norm, steps=unbounded_steps, eot_samples=eot_samples,
                 seed=seed)
    with eval_mode(model), seeded(seed):
        x_adv = attack(model, x, y)
        acc = _probe_acc(model, x_adv, y, repeats)
    return CheckResult(
        "unbounded_attack", acc <= unbounded_max_acc,
        f"PGD-{unbounded_steps} with eps={unbounded_eps:g} ({norm}) leaves "
        f"{100 * acc:.1f}% accuracy on {len(y)} examples (allowed {100 * unbounded_max_acc:g}%)",
        "gradient masking suspected: the attack cannot succeed even without a budget; use "
        "BPDA/EOT, another loss, or a black-box attack (Square)")


def check_eps_monotone(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                       norm: str = "linf", sweep_factors=(0.25, 0.5, 1.0, 2.0), steps: int = 20,
                       monotone_tol: float = 0.03, eot_samples: int = 1, repeats: int = 10,
                       seed: int = 0, accuracies: dict[float, float] | None = None
                       ) -> CheckResult:
    """(d) Accuracy must not rise as eps grows, and must fall somewhere along the sweep.

    ``accuracies`` (eps -> accuracy) from an existing sweep is used when given; otherwise PGD
    runs at ``eps * sweep_factors`` on the probe.
    """
    if accuracies is None:
        accuracies = {}
        with eval_mode(model), seeded(seed):
            for f in sweep_factors:
                e = eps * f
                atk = PGD(eps=e, norm=norm, steps=steps, eot_samples=eot_samples, seed=seed)
                accuracies[e] = _probe_acc(model, atk(model, x, y), y, repeats)
    pts = sorted(accuracies.items())
    shown = ", ".join(f"{e:g}: {100 * a:.1f}%" for e, a in pts)
    if len(pts) < 2:
        return CheckResult("eps_monotone", None, f"need at least two eps values ({shown})")
    rises = [(pts[i][0], pts[i + 1][0]) for i in range(len(pts) - 1)
             if pts[i + 1][1] > pts[i][1] + monotone_tol]
    flat = pts[-1][1] >= pts[0][1] - monotone_tol and pts[0][1] > 0
    passed = not rises and not flat
    detail = f"accuracy by eps: {shown}"
    if rises:
        detail += "; rises between " + ", ".join(f"{a:g}->{b:g}" for a, b in rises)
    if flat:
        detail += "; no decrease over the sweep"
    return CheckResult("eps_monotone", passed, detail,
                       "the attack is not optimizing (masked gradients, bad step size or "
                       "randomness): check gradients, use EOT/BPDA, tune the step size")


def check_more_iterations(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                          norm: str = "linf", steps: int = 20, iterations_factor: int = 5,
                          iterations_restarts: int = 2, iterations_tol: float = 0.03,
                          eot_samples: int = 1, repeats: int = 10, seed: int = 0
                          ) -> CheckResult:
    """(e) A stronger PGD (more steps and restarts) must not *raise* robust accuracy by more
    than ``iterations_tol``; dropping it by more than that means the base attack is too weak."""
    base = PGD(eps=eps, norm=norm, steps=steps, eot_samples=eot_samples, seed=seed)
    strong = PGD(eps=eps, norm=norm, steps=steps * iterations_factor,
                 restarts=iterations_restarts, eot_samples=eot_samples, seed=seed + 1)
    with eval_mode(model), seeded(seed):
        a_base = _probe_acc(model, base(model, x, y), y, repeats)
        a_strong = _probe_acc(model, strong(model, x, y), y, repeats)
    detail = (f"PGD-{steps}: {100 * a_base:.1f}%, PGD-{steps * iterations_factor} x "
              f"{iterations_restarts} restarts: {100 * a_strong:.1f}% on {len(y)} examples")
    if a_strong > a_base + iterations_tol:
        return CheckResult("more_iterations", False, detail + " (stronger attack did worse)",
                           "the optimization is unstable (randomness without EOT, too large a "
                           "step, masked gradients); use EOT and a smaller step size")
    if a_strong < a_base - iterations_tol:
        return CheckResult("more_iterations", False, detail + " (base attack not converged)",
                           "report attacks with more iterations and restarts (APGD, suite "
                           "'standard' or 'full')")
    return CheckResult("more_iterations", True, detail)


def check_blackbox(result, *, blackbox_tol: int = 0) -> CheckResult:
    """(f) Black-box (Square) or transfer (``paper`` protocol) attacks must not succeed on
    examples that every white-box attack missed."""
    white = [e for e in result.entries.values()
             if e.name not in BLACK_BOX_ATTACKS and e.protocol in ("fresh", "fixed")]
    other = [e for e in result.entries.values()
             if e.name in BLACK_BOX_ATTACKS or e.protocol == "paper"]
    if not white or not other:
        return CheckResult("blackbox_beats_whitebox", None,
                           "needs both white-box and black-box/transfer attacks (add 'square' "
                           "or the 'paper' protocol)")
    robust_white = result.clean.verdict.all.clone()
    for e in white:
        robust_white &= e.verdict.all if e.ran is None else (e.verdict.all | ~e.ran)
    beaten = []
    for e in other:
        fooled = ~e.verdict.all if e.ran is None else (~e.verdict.all & e.ran)
        count = int((robust_white & fooled).sum())
        if count > blackbox_tol:
            beaten.append(f"{e.label} on {count}")
    if beaten:
        return CheckResult("blackbox_beats_whitebox", False,
                           "examples robust to every white-box attack fooled by " +
                           ", ".join(beaten),
                           "the white-box attacks are failing (gradient masking): use BPDA, "
                           "EOT, other losses; trust the worst case only")
    return CheckResult("blackbox_beats_whitebox", True,
                       f"{', '.join(e.label for e in other)} fool no example that the white-box "
                       "attacks missed")


def check_silent_success(result) -> CheckResult:
    """(g) An adversarial iterate was found but the attack returned a non-adversarial point."""
    silent = []
    judged = False
    for e in result.entries.values():
        t = e.trace
        if t is None or t.ever_adversarial is None or t.returned_adversarial is None:
            continue
        judged = True
        count = int((t.ever_adversarial & ~t.returned_adversarial).sum())
        if count:
            silent.append(f"{e.label} on {count}")
    if not judged:
        return CheckResult("silent_success", None, "no attack recorded ever/returned flags")
    if silent:
        return CheckResult("silent_success", False,
                           "adversarial iterates found but not returned: " + ", ".join(silent),
                           "return the best iterate (most draws adversarial, then highest "
                           "loss) instead of the last one")
    return CheckResult("silent_success", True, "every adversarial iterate found was returned")


def _last_run(losses: torch.Tensor, steps: int | None, restarts: int) -> torch.Tensor:
    if steps and restarts > 1 and losses.shape[0] % restarts == 0:
        per = losses.shape[0] // restarts
        return losses[-per:]
    return losses


def check_convergence(result, *, converge_tol: float = 0.05, converge_fraction: float = 0.1,
                      min_steps: int = 10) -> CheckResult:
    """(h) Relative change of the mean loss of still-robust examples over the last
    ``converge_fraction`` of the iterations (at least 2) must stay below ``converge_tol``.
    Attacks with fewer than ``min_steps`` recorded iterations are not judged."""
    bad, judged = [], []
    for e in result.entries.values():
        t = e.trace
        if t is None or t.losses is None or t.losses.shape[0] < min_steps:
            continue
        losses = _last_run(t.losses, t.steps, t.restarts)
        if losses.shape[0] < min_steps:
            continue
        keep = torch.ones(losses.shape[1], dtype=torch.bool)
        if t.returned_adversarial is not None and len(t.returned_adversarial) == losses.shape[1]:
            keep = ~t.returned_adversarial
        if e.ran is not None and len(e.ran) == losses.shape[1]:
            keep &= e.ran
        if not keep.any():
            judged.append(e.label)
            continue
        curve = losses[:, keep].mean(dim=1)
        if not torch.isfinite(curve).all():
            bad.append(f"{e.label} (non-finite loss)")
            continue
        k = max(2, math.ceil(converge_fraction * curve.shape[0]))
        a, b = float(curve[-k]), float(curve[-1])
        rel = abs(b - a) / max(abs(a), 1e-8)
        judged.append(e.label)
        if rel > converge_tol:
            bad.append(f"{e.label} {100 * rel:.1f}%")
    if bad:
        return CheckResult("loss_not_converged", False,
                           "mean loss of robust examples still moving over the last "
                           f"{100 * converge_fraction:g}% of steps: " + ", ".join(bad),
                           "run more iterations, reduce the step size or use APGD's step-size "
                           "schedule")
    if not judged:
        return CheckResult("loss_not_converged", None,
                           f"no attack recorded at least {min_steps} iterations")
    return CheckResult("loss_not_converged", True,
                       f"loss converged (<{100 * converge_tol:g}% change) for " + ", ".join(judged))


def _infer_attack_setting(result) -> tuple[float | None, str, int]:
    eps, norm, eot = None, "linf", 1
    for e in (result.entries.values() if result is not None else []):
        if e.trace is not None and e.protocol == "fresh":
            eot = max(eot, e.trace.eot_samples)
    for spec in (result.config.get("specs", []) if result is not None else []):
        if spec.get("eps") is not None:
            eps = spec["eps"] if eps is None else max(eps, spec["eps"])
            norm = spec.get("norm", norm)
    if result is not None and eps is None:
        eps = result.config.get("eps")
        norm = result.config.get("norm", norm)
    return eps, norm, eot


def run_checks(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    result=None,
    *,
    eps: float | None = None,
    norm: str | None = None,
    eot_samples: int | None = None,
    repeats: int | None = None,
    n_probe: int = 64,
    seed: int = 0,
    probes: bool = True,
    skip: tuple[str, ...] | list[str] = (),
    eps_accuracies: dict[float, float] | None = None,
    zero_grad_fraction: float = 0.05,
    unbounded_steps: int = 100,
    unbounded_max_acc: float = 0.02,
    monotone_tol: float = 0.03,
    iterations_factor: int = 5,
    iterations_restarts: int = 2,
    iterations_tol: float = 0.03,
    blackbox_tol: int = 0,
    converge_tol: float = 0.05,
) -> list[CheckResult]:
    """Run every check; see the module docstring for what each one tests.

    ``eps``/``norm``/``eot_samples`` default to those of the evaluation's attacks (largest eps,
    largest EOT of the fresh-protocol attacks). ``probes=False`` skips the checks that run new
    attacks (c, d, e) and keeps the cheap ones; ``skip`` names checks not to run.
    ``eps_accuracies`` (eps -> worst-case accuracy
    of an eps sweep) replaces the probe sweep of check (d).
    Defaults: gradient zero on > 5% of examples; unbounded accuracy > 2%; accuracy rising by
    > 3 points with eps; stronger PGD (5x steps, 2 restarts) moving accuracy by > 3 points;
    any example where black-box beats white-box; > 5% relative loss change over the last 10%.
    """
    from ..errors import AdvDefenseError

    unknown = set(skip) - set(CHECK_NAMES)
    if unknown:
        raise AdvDefenseError(f"unknown check(s) {sorted(unknown)}; choose from {CHECK_NAMES}")
    x, y = data
    inferred_eps, inferred_norm, inferred_eot = _infer_attack_setting(result)
    eps = inferred_eps if eps is None else eps
    norm = norm or inferred_norm
    eot = inferred_eot if eot_samples is None else int(eot_samples)
    repeats = (result.repeats if result is not None and result.stochastic else 10) \
        if repeats is None else repeats
    device = next(model.parameters()).device if any(True for _ in model.parameters()) \
        else torch.device("cpu")
    xp, yp = x[:n_probe].to(device), y[:n_probe].to(device)
    out: list[CheckResult] = []
    with seeded(seed):
        out.append(check_randomness(model, xp[:8], result))
        out += check_gradients(model, xp, yp, result, eot_samples=eot,
                               zero_grad_fraction=zero_grad_fraction)
        if probes and "unbounded_attack" not in skip:
            out.append(check_unbounded(model, xp, yp, norm=norm, unbounded_steps=unbounded_steps,
                                       unbounded_max_acc=unbounded_max_acc, eot_samples=eot,
                                       repeats=repeats, seed=seed))
        if probes:
            if eps is None or eps <= 0:
                out.append(CheckResult("eps_monotone", None, "no positive eps to sweep"))
                out.append(CheckResult("more_iterations", None, "no positive eps"))
            if eps is not None and eps > 0 and "eps_monotone" not in skip:
                out.append(check_eps_monotone(model, xp, yp, eps=eps, norm=norm,
                                              monotone_tol=monotone_tol, eot_samples=eot,
                                              repeats=repeats, seed=seed,
                                              accuracies=eps_accuracies))
            if eps is not None and eps > 0 and "more_iterations" not in skip:
                out.append(check_more_iterations(
                    model, xp, yp, eps=eps, norm=norm, iterations_factor=iterations_factor,
                    iterations_restarts=iterations_restarts, iterations_tol=iterations_tol,
                    eot_samples=eot, repeats=repeats, seed=seed))
    if result is not None:
        out.append(check_blackbox(result, blackbox_tol=blackbox_tol))
        out.append(check_silent_success(result))
        out.append(check_convergence(result, converge_tol=converge_tol))
    out = [c for c in out if c.name not in skip]
    for c in out:
        if c.passed is False:
            log.warning("check %s failed: %s", c.name, c.detail)
    return out
