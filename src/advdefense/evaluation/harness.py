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
the evaluation unless ``checks=None``.

Before attacking, the model's randomness is probed (:func:`prepare_model`): a model that is
random without declaring it through :mod:`advdefense.randomness` is wrapped so that EOT draws
and repeated predictions are separate seeded forward calls, never one draw standing in for
many. Every attack works on private copies of the batch; its output is checked against the
evaluation's own copy (inside [0, 1] and the eps-ball) and judged against the evaluation's own
labels before it counts. Verdicts are seeded on their own (:func:`~.protocols.verdict_seed`).

For a deterministic model the three protocols coincide, so an attack object listed under
several protocols is run once and its result shared.

Example::

    specs = standard_attack_specs(0.3, protocols=("fresh", "paper"))
    result = evaluate(model, (x, y), specs, n_examples=500)
    print(result.accuracy("worst"))            # e.g. "12.4% [9.7, 15.6]"
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from ..attacks import ATTACKS, Attack, build_attack
from ..attacks.base import batch_seed, check_eps, eval_mode
from ..data import as_tensors
from ..errors import AdvDefenseError
from ..layout import channels_last_weights
from ..precision import check_precision
from ..randomness import SeededRandomness, is_stochastic, probe_randomness
from .checks import CheckSettings, run_checks
from .protocols import Verdict, check_protocol, run_protocol, verdict, verdict_seed
from .results import EntryResult, EvalResult, RunRecord, TraceSummary
from .resume import BatchStore, describe, model_fingerprint, run_fingerprint

log = logging.getLogger(__name__)

__all__ = ["AttackSpec", "EntryResult", "EvalResult", "RunRecord", "TraceSummary",
           "attack_identity", "evaluate", "load_data", "model_device", "prepare_model",
           "standard_attack_specs"]


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


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    if p is None:
        p = next(model.buffers(), None)
    return p.device if p is not None else torch.device("cpu")


def prepare_model(model: nn.Module, x_probe: torch.Tensor) -> tuple[nn.Module, str]:
    """Probe the model's randomness (two forward passes of the same input, in eval mode) and
    wrap a model that is random without declaring it in
    :class:`~advdefense.randomness.SeededRandomness`, so its EOT draws and repeated verdicts
    are real (separate seeded forward calls). Returns ``(model, kind)``."""
    with eval_mode(model):
        kind = probe_randomness(model, x_probe)
    if kind == "undeclared":
        log.warning("the model is random but its randomness does not honour "
                    "advdefense.randomness draw groups: every EOT draw and every repeated "
                    "prediction is a separate seeded forward call")
        model = SeededRandomness(model)
        with eval_mode(model):
            if probe_randomness(model, x_probe) == "undeclared":
                log.warning("the model stays random under a fixed torch seed (NumPy or Python "
                            "random?): freezing is impossible, so the paper/fixed protocols "
                            "are not frozen")
    return model, kind


def default_max_batch(model: nn.Module, x_probe: torch.Tensor, *, fraction: float = 0.5,
                      cap: int = 65536) -> int:
    """Rows per forward(+backward) pass: 4096 on CPU (where ``randomness.CPU_ROWS`` caps the
    working set anyway); on a GPU, ``fraction`` of the free device memory divided by the
    memory one row of forward and backward was measured to take (16 probe rows). A pass that
    still runs out of memory is halved and retried (:func:`~advdefense.randomness.
    replicated_forward`)."""
    if x_probe.device.type != "cuda":
        return 4096
    dev = x_probe.device
    rows = min(16, x_probe.shape[0])
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    xi = x_probe[:rows].detach().clone().requires_grad_(True)
    with eval_mode(model), torch.enable_grad():
        model(xi).float().logsumexp(1).sum().backward()
    per_row = max(1, (torch.cuda.max_memory_allocated(dev) - base) // rows)
    free, _ = torch.cuda.mem_get_info(dev)
    return int(max(16, min(cap, fraction * free // per_row)))


def batch_runner(n: int, batch_size: int, progress: bool, desc: str):
    """The one batch loop of evaluations: ``(start, positions)`` per batch."""
    starts = range(0, n, int(batch_size))
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        yield start, torch.arange(start, min(start + int(batch_size), n))


def resolve_checks(checks) -> CheckSettings | None:
    """``checks`` argument of evaluate/run_suite: settings, ``None``/``False`` (no checks) or
    ``True`` (defaults)."""
    if checks is True:
        return CheckSettings()
    if checks is None or checks is False:
        return None
    if not isinstance(checks, CheckSettings):
        raise AdvDefenseError(f"checks must be a CheckSettings or None, got "
                              f"{type(checks).__name__}")
    return checks


class AdvKeeper:
    """Keeps, per example, the worst-case adversarial input and the label of its attack:
    the first attack whose point the verdict counts as not robust (else the clean input;
    ``"clean"`` also where the clean input is already misclassified)."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x.detach().cpu().clone()
        self.source = ["clean"] * x.shape[0]
        self.taken = torch.zeros(x.shape[0], dtype=torch.bool)

    def offer(self, label: str, positions: torch.Tensor, x_adv: torch.Tensor,
              broken: torch.Tensor) -> None:
        new = broken.cpu() & ~self.taken[positions]
        if bool(new.any()):
            pos = positions[new]
            self.x[pos] = x_adv.detach().cpu()[new]
            self.taken[pos] = True
            for p in pos.tolist():
                self.source[p] = label


def spec_seed(attack: Any, seed: int, position: int) -> int:
    own = getattr(attack, "seed", None)
    return int(own) if own is not None else int(seed) + 1000 * (position + 1)


_MAX_BATCH = re.compile(r"(, )?max_batch=\d+")


def attack_identity(attack: Any) -> str:
    """What identifies an attack in fingerprints: its repr (every setting of an
    :class:`~advdefense.attacks.Attack`) without memory addresses and without ``max_batch``
    (a memory setting: processes on GPUs with other free memory share results), with
    ``eps``/``norm`` and the fingerprint of every model it holds (a transfer attack's
    substitute)."""
    held = sorted(f"{k}={model_fingerprint(v)}" for k, v in vars(attack).items()
                  if isinstance(v, nn.Module)) if hasattr(attack, "__dict__") else []
    return (f"{_MAX_BATCH.sub('', describe(attack))} eps={getattr(attack, 'eps', None)!r} "
            f"norm={getattr(attack, 'norm', None)!r} models=[{', '.join(held)}]")


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
    max_batch: int | None = None,
    checks: CheckSettings | bool | None = True,
    keep_adv: bool = False,
    index_offset: int = 0,
    state_path: str | os.PathLike | None = None,
    attack_precision: str = "fp32",
) -> EvalResult:
    """Evaluate ``model`` on clean data and under every spec; see the module docstring.

    ``repeats`` (default 10) is the number of stochastic predictions per verdict; ignored for
    deterministic models. ``max_batch`` bounds the rows of one forward pass of the verdicts
    (``None``: :func:`default_max_batch`; attacks keep their own). ``checks``:
    :class:`~.checks.CheckSettings` for the attack-failure checks afterwards (``None``: none).
    ``keep_adv`` keeps the worst-case adversarial input per example (``result.adv``,
    ``result.adv_source``). Every batch's attack is seeded from (the spec's seed, the position
    of its first example + ``index_offset``), and every verdict from (``seed``, the stage:
    clean or the spec's label, that position) under a salt of its own
    (:func:`~.protocols.verdict_seed`), so batches draw independently, verdicts never reuse
    an attack's draws and the caller's RNG changes nothing; ``index_offset`` is the global
    index of ``data``'s first example when it is a unit of a larger set
    (:mod:`.distributed`), so a unit gives the same results whichever process runs it.
    ``state_path``: a :class:`~.resume.BatchStore` file saved after every batch (verdicts and
    attack traces); rerun with it, the finished batches are read back, so a resumed run
    equals an uninterrupted one, checks included (kept inputs and frozen draws of those
    batches are not restored). ``attack_precision``: ``fp32`` or ``bf16`` (attacks under bf16
    autocast, verdicts in fp32; :mod:`advdefense.precision`).
    """
    check_precision(attack_precision)
    repeats = 10 if repeats is None else int(repeats)
    if repeats < 1:
        raise AdvDefenseError(f"repeats must be >= 1, got {repeats}")
    if int(batch_size) < 1:
        raise AdvDefenseError(f"batch_size must be >= 1, got {batch_size}")
    settings = resolve_checks(checks)
    specs = list(specs)
    for s in specs:
        if not isinstance(s, AttackSpec):
            raise AdvDefenseError(f"specs must be AttackSpec objects, got {type(s).__name__}")
    x_all, y_all = load_data(data, n_examples)
    device = model_device(model)
    n = x_all.shape[0]
    labels = []
    for s in specs:
        label, i = s.label, 2
        while label in labels:
            label, i = f"{s.label}#{i}", i + 1
        labels.append(label)
    store = BatchStore(state_path, run_fingerprint(
        x_all, y_all, {"specs": [(lab, s.protocol, attack_identity(s.attack)) for s, lab in
                                 zip(specs, labels, strict=True)], "repeats": repeats,
                       "seed": seed, "batch_size": int(batch_size),
                       "index_offset": index_offset, "attack_precision": attack_precision},
        model_fingerprint(model) if state_path is not None else ""))
    model, randomness = prepare_model(model, x_all[:8].to(device))
    if max_batch is None:
        max_batch = default_max_batch(model, x_all[:16].to(device))
    stochastic = is_stochastic(model)

    clean_parts: list[Verdict] = []
    parts: dict[str, list[Verdict]] = {lab: [] for lab in labels}
    traces: dict[str, list[TraceSummary]] = {lab: [] for lab in labels}
    states: dict[str, list[Any]] = {lab: [] for lab in labels}
    positions: dict[str, list[torch.Tensor]] = {lab: [] for lab in labels}
    seconds = dict.fromkeys(labels, 0.0)
    clean_seconds = 0.0
    keeper = AdvKeeper(x_all) if keep_adv else None
    t_start = time.perf_counter()
    with eval_mode(model), channels_last_weights(model):
        for start, pos in batch_runner(n, batch_size, progress, "evaluate"):
            x, y = x_all[pos].to(device), y_all[pos].to(device)
            first = index_offset + start
            t0 = time.perf_counter()
            if f"clean:{start}" in store:
                clean_parts.append(Verdict.from_json(store.get(f"clean:{start}")))
            else:
                clean_parts.append(verdict(model, x, y, repeats=repeats, max_batch=max_batch,
                                           seed=verdict_seed(seed, "clean", first)))
                store.put(f"clean:{start}", clean_parts[-1].to_json())
            if keeper is not None:
                keeper.offer("clean", pos, x, ~clean_parts[-1].all)
            clean_seconds += time.perf_counter() - t0
            shared: dict[int, tuple[Verdict, TraceSummary, torch.Tensor]] = {}
            for i, (spec, label) in enumerate(zip(specs, labels, strict=True)):
                t0 = time.perf_counter()
                key = id(spec.attack)
                saved = store.get(f"{label}:{start}")
                if saved is not None:  # finished in an earlier run
                    parts[label].append(Verdict.from_json(saved["verdict"]))
                    traces[label].append(TraceSummary.from_json(saved["trace"]))
                    positions[label].append(pos)
                    seconds[label] += float(saved.get("seconds", 0.0))
                    continue
                if not stochastic and key in shared:
                    v, tr, x_adv = shared[key]
                else:
                    bseed = batch_seed(spec_seed(spec.attack, seed, i), first)
                    out = run_protocol(model, spec.attack, x, y, spec.protocol,
                                       repeats=repeats, max_batch=max_batch, seed=bseed,
                                       precision=attack_precision,
                                       verdict_seed=verdict_seed(seed, label, first))
                    eot = 1 if spec.protocol != "fresh" or not stochastic else int(
                        getattr(spec.attack, "eot_samples", 1))
                    v, x_adv = out.verdict, out.x_adv
                    tr = TraceSummary.from_recorder(out.recorder, spec.attack, pos, eot)
                    shared[key] = (v, tr, x_adv)
                    if out.states is not None:
                        states[label].append(out.states)
                parts[label].append(v)
                traces[label].append(tr)
                positions[label].append(pos)
                spent = time.perf_counter() - t0
                seconds[label] += spent
                store.put(f"{label}:{start}", {"verdict": v.to_json(), "trace": tr.to_json(),
                                               "seconds": spent})
                if keeper is not None:
                    keeper.offer(label, pos, x_adv, ~v.all)
    total = time.perf_counter() - t_start
    clean = EntryResult("clean", "clean", "-", Verdict.cat(clean_parts), clean_seconds)
    entries = {}
    worst = clean.verdict
    for spec, label in zip(specs, labels, strict=True):
        e = EntryResult(label, spec.name, spec.protocol, Verdict.cat(parts[label]),
                        seconds[label], repr(spec.attack),
                        TraceSummary.merge(traces[label], n, positions[label]),
                        states=states[label])
        entries[label] = e
        worst = worst & e.verdict
    config = {"n": n, "repeats": repeats if stochastic else 1, "batch_size": int(batch_size),
              "seed": seed, "max_batch": max_batch, "stochastic": stochastic,
              "attack_precision": attack_precision,
              "randomness": randomness,
              "specs": [{"label": lab, "name": s.name, "protocol": s.protocol,
                         "attack": repr(s.attack), "eps": getattr(s.attack, "eps", None),
                         "norm": getattr(s.attack, "norm", None),
                         "passes": entries[lab].passes}
                        for s, lab in zip(specs, labels, strict=True)]}
    result = EvalResult(n, stochastic, repeats if stochastic else 1, clean, entries, worst,
                        y_all.cpu(), total, config)
    if keeper is not None:
        result.adv, result.adv_source = keeper.x, keeper.source
    if settings is not None:
        t0 = time.perf_counter()
        result.checks = run_checks(model, (x_all, y_all), result, settings)
        result.config["checks_seconds"] = time.perf_counter() - t0
    return result


def suite_eot(attack: Attack) -> Attack:
    """Mark ``attack``'s EOT as a setting of the evaluation, not a demand on one model: on a
    model whose outputs and input gradients agree over two calls it is lowered to 1
    (:meth:`~advdefense.attacks.base.Attack.effective_eot`), so a suite's EOT costs nothing
    on a deterministic model while randomness hidden in a backward pass still gets it."""
    if hasattr(attack, "eot_given"):
        attack.eot_given = False
    return attack



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

    ``eot_samples`` is passed to every attack; it is an evaluation setting (see
    :func:`suite_eot`), lowered to 1 on a model whose outputs and
    input gradients agree over two calls.
    """
    eps = check_eps(eps)
    for p in protocols:
        check_protocol(p)
    common = dict(eps=eps, norm=norm, eot_samples=eot_samples, seed=seed, max_batch=max_batch)
    attacks: list[tuple[str, Attack]] = [
        ("fgsm", suite_eot(build_attack("fgsm", **common))),
        ("pgd", suite_eot(build_attack("pgd", steps=steps, step_size=eps / 4, **common))),
        ("cw", suite_eot(build_attack("cw", steps=steps, step_size=eps / 4, **common))),
    ]
    if "apgd-ce" in ATTACKS:
        attacks.append(("apgd-ce", suite_eot(build_attack("apgd-ce", **common))))
    else:
        log.warning("apgd-ce is not registered in this build; standard_attack_specs omits it")
    return [AttackSpec(name, atk, p) for p in protocols for name, atk in attacks]
