"""The evaluation harness: per-example results for clean data and every attack spec.

``evaluate(model, data, specs)`` runs each :class:`AttackSpec` (an attack under a protocol,
see :mod:`.protocols`) on every example, in batches, and returns an :class:`EvalResult` that
keeps **per-example** boolean correctness for clean data and for each spec, so the worst case
over specs is an exact per-example AND (DESIGN.md contract 4). For a stochastic model
(:func:`advdefense.randomness.is_stochastic`) each prediction is repeated ``repeats`` times
(default 10) and an example counts as correct only if all repeats are correct; the
majority-vote and single-draw figures are kept beside it. Every accuracy has a 95%
Clopper–Pearson interval (:mod:`.stats`).

The worst case (``result.worst``) is the AND of clean correctness and every spec: an example
misclassified without attack is not robust. Attack-failure checks (:mod:`.checks`) run after
the evaluation unless ``checks=False``.

For a deterministic model the three protocols coincide, so an attack object listed under
several protocols is run once and its result shared.

Example::

    specs = standard_attack_specs(0.3, protocols=("fresh", "paper"))
    result = evaluate(model, (x, y), specs, n_examples=500)
    print(result.accuracy("worst"))            # e.g. "12.4% [9.7, 15.6]"
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from ..attacks import ATTACKS, Attack, build_attack
from ..attacks.base import check_eps, eval_mode
from ..data import as_tensors
from ..errors import AdvDefenseError
from ..randomness import is_stochastic, seeded
from .protocols import Verdict, check_protocol, run_protocol, verdict
from .stats import Accuracy, accuracy

log = logging.getLogger(__name__)

__all__ = ["AttackSpec", "EntryResult", "EvalResult", "TraceSummary", "evaluate",
           "load_data", "standard_attack_specs"]


@dataclass
class AttackSpec:
    """One row of an evaluation: a registry ``name``, a configured ``attack``, a protocol."""

    name: str
    attack: Attack
    protocol: str = "fresh"

    def __post_init__(self) -> None:
        check_protocol(self.protocol)
        if not callable(self.attack):
            raise AdvDefenseError(f"attack of spec {self.name!r} is not callable")

    @property
    def label(self) -> str:
        return f"{self.name}/{self.protocol}"


@dataclass
class TraceSummary:
    """The parts of :class:`~advdefense.attacks.base.AttackTrace` the failure checks need,
    concatenated over batches (columns = examples in evaluation order)."""

    eot_samples: int
    steps: int | None = None
    restarts: int = 1
    losses: torch.Tensor | None = None          # (T, n) or None
    grad_norms: torch.Tensor | None = None      # (S, n) or None
    nonfinite: int = 0
    ever_adversarial: torch.Tensor | None = None
    returned_adversarial: torch.Tensor | None = None

    @staticmethod
    def merge(parts: list[TraceSummary]) -> TraceSummary | None:
        if not parts:
            return None
        first = parts[0]

        def cat_rows(attr):
            mats = [getattr(p, attr) for p in parts]
            if any(m is None or m.numel() == 0 for m in mats):
                return None
            if len({m.shape[0] for m in mats}) != 1:
                return None
            return torch.cat(mats, dim=1)

        def cat_flags(attr):
            flags = [getattr(p, attr) for p in parts]
            return None if any(f is None for f in flags) else torch.cat(flags)

        return TraceSummary(first.eot_samples, first.steps, first.restarts, cat_rows("losses"),
                            cat_rows("grad_norms"), sum(p.nonfinite for p in parts),
                            cat_flags("ever_adversarial"), cat_flags("returned_adversarial"))


def _summarize_trace(attack: Any, model: nn.Module, frozen: bool) -> TraceSummary:
    trace = getattr(attack, "trace", None)
    eot = int(getattr(attack, "eot_samples", 1))
    if frozen or not is_stochastic(model):
        eot = 1
    steps = getattr(attack, "steps", None) or getattr(attack, "n_iter", None)
    summary = TraceSummary(eot, steps, int(getattr(attack, "restarts", 1)))
    if trace is None:
        return summary
    if getattr(trace, "losses", None):
        summary.losses = torch.stack([t.detach().float().cpu() for t in trace.losses])
    if getattr(trace, "grad_norms", None):
        summary.grad_norms = torch.stack([t.detach().float().cpu() for t in trace.grad_norms])
    summary.nonfinite = int(getattr(trace, "nonfinite", 0))
    for attr in ("ever_adversarial", "returned_adversarial"):
        value = getattr(trace, attr, None)
        setattr(summary, attr, None if value is None else value.detach().bool().cpu())
    return summary


@dataclass
class EntryResult:
    """Per-example results of clean data or of one spec."""

    label: str
    name: str
    protocol: str
    verdict: Verdict
    seconds: float = 0.0
    attack: str = ""
    trace: TraceSummary | None = None
    ran: torch.Tensor | None = None   # suites: examples the attack actually ran on
    cumulative: Verdict | None = None  # suites: robust after this stage of the cascade

    def accuracy(self, kind: str = "all") -> Accuracy:
        return accuracy(self.verdict.get(kind))


@dataclass
class EvalResult:
    """Everything an evaluation measured, per example.

    ``clean`` and each of ``entries`` (keyed by label ``name/protocol``) hold per-example
    verdicts; ``worst`` is their per-example AND; ``checks`` the attack-failure checks.
    """

    n: int
    stochastic: bool
    repeats: int
    clean: EntryResult
    entries: dict[str, EntryResult]
    worst: Verdict
    labels: torch.Tensor
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)
    checks: list = field(default_factory=list)
    kind: str = "specs"

    def accuracy(self, label: str = "worst", kind: str = "all") -> Accuracy:
        """Accuracy with CI of ``"clean"``, ``"worst"`` or an entry label."""
        if label == "worst":
            return accuracy(self.worst.get(kind))
        if label == "clean":
            return self.clean.accuracy(kind)
        if label not in self.entries:
            raise AdvDefenseError(
                f"no result {label!r}; choose clean, worst or one of: {', '.join(self.entries)}")
        return self.entries[label].accuracy(kind)

    def worst_over(self, protocol: str) -> Verdict:
        """Per-example AND of clean and the entries run under ``protocol``."""
        out = self.clean.verdict
        for e in self.entries.values():
            if e.protocol == protocol:
                out = out & e.verdict
        return out

    def rows(self) -> list[dict[str, Any]]:
        """One row per line of the report table (clean, entries, worst case)."""
        rows = []
        for e in [self.clean, *self.entries.values()]:
            v = e.cumulative if e.cumulative is not None else e.verdict
            rows.append({"label": e.label, "attack": e.name, "protocol": e.protocol,
                         "all": accuracy(v.all), "majority": accuracy(v.majority),
                         "single": accuracy(v.single), "seconds": e.seconds,
                         "ran": None if e.ran is None else int(e.ran.sum())})
        rows.append({"label": "worst", "attack": "worst case", "protocol": "all", "ran": None,
                     "all": self.accuracy("worst", "all"),
                     "majority": self.accuracy("worst", "majority"),
                     "single": self.accuracy("worst", "single"), "seconds": self.seconds})
        return rows


def load_data(data, n_examples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` tensors from a tuple or a Dataset, keeping the first ``n_examples``."""
    if n_examples is not None and int(n_examples) < 1:
        raise AdvDefenseError(f"n_examples must be >= 1, got {n_examples}")
    if isinstance(data, Dataset):
        if n_examples is not None and n_examples < len(data):  # type: ignore[arg-type]
            data = Subset(data, range(int(n_examples)))
        x, y = as_tensors(data)
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = torch.as_tensor(data[0]), torch.as_tensor(data[1])
    else:
        raise AdvDefenseError("data must be an (x, y) pair of tensors or a torch Dataset")
    if n_examples is not None:
        x, y = x[: int(n_examples)], y[: int(n_examples)]
    if x.shape[0] != y.shape[0] or y.dim() != 1:
        raise AdvDefenseError(f"x has {x.shape[0]} rows but y has shape {tuple(y.shape)}")
    if x.shape[0] == 0:
        raise AdvDefenseError("no examples to evaluate")
    if not torch.is_floating_point(x) or x.min() < -1e-6 or x.max() > 1 + 1e-6:
        raise AdvDefenseError("x must be floats in [0, 1] (models normalize inside)")
    return x, y.long()


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def evaluate(
    model: nn.Module,
    data,
    specs: Sequence[AttackSpec],
    *,
    repeats: int | None = None,
    batch_size: int = 250,
    n_examples: int | None = None,
    seed: int = 0,
    progress: bool = False,
    max_batch: int = 4096,
    checks: bool = True,
    check_options: dict[str, Any] | None = None,
) -> EvalResult:
    """Evaluate ``model`` on clean data and under every spec; see the module docstring.

    ``repeats`` (default 10) is the number of stochastic predictions per verdict; ignored for
    deterministic models. ``max_batch`` bounds the rows of one forward pass of the verdict.
    ``checks`` runs :func:`advdefense.evaluation.checks.run_checks` afterwards with
    ``check_options`` (its keyword arguments).
    """
    repeats = 10 if repeats is None else int(repeats)
    if repeats < 1:
        raise AdvDefenseError(f"repeats must be >= 1, got {repeats}")
    if int(batch_size) < 1:
        raise AdvDefenseError(f"batch_size must be >= 1, got {batch_size}")
    specs = list(specs)
    for s in specs:
        if not isinstance(s, AttackSpec):
            raise AdvDefenseError(f"specs must be AttackSpec objects, got {type(s).__name__}")
    x_all, y_all = load_data(data, n_examples)
    device = _model_device(model)
    n = x_all.shape[0]
    stochastic = is_stochastic(model)
    labels = []
    for s in specs:
        label, i = s.label, 2
        while label in labels:
            label, i = f"{s.label}#{i}", i + 1
        labels.append(label)

    clean_parts: list[Verdict] = []
    parts: dict[str, list[Verdict]] = {lab: [] for lab in labels}
    traces: dict[str, list[TraceSummary]] = {lab: [] for lab in labels}
    seconds = dict.fromkeys(labels, 0.0)
    clean_seconds = 0.0
    t_start = time.perf_counter()
    with eval_mode(model), seeded(seed):
        batches = range(0, n, int(batch_size))
        for start in tqdm(batches, desc="evaluate", disable=not progress, leave=False):
            x = x_all[start : start + batch_size].to(device)
            y = y_all[start : start + batch_size].to(device)
            t0 = time.perf_counter()
            clean_parts.append(verdict(model, x, y, repeats=repeats, max_batch=max_batch))
            clean_seconds += time.perf_counter() - t0
            shared: dict[int, tuple[Verdict, TraceSummary]] = {}
            for spec, label in zip(specs, labels, strict=True):
                t0 = time.perf_counter()
                key = id(spec.attack)
                if not stochastic and key in shared:
                    v, tr = shared[key]
                else:
                    _, v = run_protocol(model, spec.attack, x, y, spec.protocol,
                                        repeats=repeats, max_batch=max_batch)
                    tr = _summarize_trace(spec.attack, model, spec.protocol != "fresh")
                    shared[key] = (v, tr)
                parts[label].append(v)
                traces[label].append(tr)
                seconds[label] += time.perf_counter() - t0
    total = time.perf_counter() - t_start
    clean = EntryResult("clean", "clean", "-", Verdict.cat(clean_parts), clean_seconds)
    entries = {}
    worst = clean.verdict
    for spec, label in zip(specs, labels, strict=True):
        e = EntryResult(label, spec.name, spec.protocol, Verdict.cat(parts[label]),
                        seconds[label], repr(spec.attack), TraceSummary.merge(traces[label]))
        entries[label] = e
        worst = worst & e.verdict
    config = {"n": n, "repeats": repeats if stochastic else 1, "batch_size": int(batch_size),
              "seed": seed, "max_batch": max_batch, "stochastic": stochastic,
              "specs": [{"label": lab, "name": s.name, "protocol": s.protocol,
                         "attack": repr(s.attack), "eps": getattr(s.attack, "eps", None),
                         "norm": getattr(s.attack, "norm", None)}
                        for s, lab in zip(specs, labels, strict=True)]}
    result = EvalResult(n, stochastic, repeats if stochastic else 1, clean, entries, worst,
                        y_all.cpu(), total, config)
    if checks:
        from .checks import run_checks

        t0 = time.perf_counter()
        result.checks = run_checks(model, (x_all, y_all), result, **(check_options or {}))
        result.config["checks_seconds"] = time.perf_counter() - t0
    return result


def standard_attack_specs(
    eps: float,
    *,
    norm: str = "linf",
    steps: int = 20,
    eot_samples: int = 1,
    seed: int = 0,
    protocols: Sequence[str] = ("fresh",),
    max_batch: int = 4096,
) -> list[AttackSpec]:
    """The demo set of attacks, one spec per attack and protocol (clean is always evaluated).

    * ``fgsm``: one step of size eps (Goodfellow et al. 2015), no random start;
    * ``pgd``: PGD-``steps`` (Madry et al. 2018) with random start and step size **eps/4** (the
      2/255-at-8/255 convention of RNA/CAS papers; Madry's MNIST setting is 0.01 for 100 steps);
    * ``cw``: CW-L-inf, PGD on the margin loss (Carlini & Wagner 2017, eq. 6), ``steps``
      steps of eps/4;
    * ``apgd-ce``: APGD with cross-entropy (Croce & Hein 2020), 100 iterations, when it is
      registered in :data:`advdefense.attacks.ATTACKS` (a warning is logged otherwise).

    ``eot_samples`` is passed to every attack (it only matters for stochastic models).
    """
    eps = check_eps(eps)
    for p in protocols:
        check_protocol(p)
    common = dict(eps=eps, norm=norm, eot_samples=eot_samples, seed=seed, max_batch=max_batch)
    attacks: list[tuple[str, Attack]] = [
        ("fgsm", build_attack("fgsm", **common)),
        ("pgd", build_attack("pgd", steps=steps, step_size=eps / 4, **common)),
        ("cw", build_attack("cw", steps=steps, step_size=eps / 4, **common)),
    ]
    if "apgd-ce" in ATTACKS:
        attacks.append(("apgd-ce", build_attack("apgd-ce", **common)))
    else:
        log.warning("apgd-ce is not registered in this build; standard_attack_specs omits it")
    return [AttackSpec(name, atk, p) for p in protocols for name, atk in attacks]
