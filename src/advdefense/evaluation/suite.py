"""AutoAttack-style suites: a cascade of attacks, each run only on the points still robust.

``run_suite(model, data, suite=..., norm=..., eps=...)`` (Croce & Hein 2020, "Reliable
evaluation of adversarial robustness with an ensemble of diverse parameter-free attacks"):

``standard`` (AutoAttack's standard version, reference settings)
    APGD-CE (100 iterations), APGD-T (100 iterations, 9 target classes), FAB-T (100
    iterations, 9 target classes), Square (5,000 queries, p_init 0.8).
``rand`` (for randomized defenses)
    APGD-CE and APGD-DLR with batched EOT (``eot_samples``, default 20, as AutoAttack's
    ``eot_iter``), Square on the EOT-averaged loss, and last APGD-CE on one frozen draw
    classified on fresh draws (the ``paper`` protocol), so the adaptive figure can never be
    higher than that transfer's (if it catches points the EOT attacks missed, the
    ``blackbox_beats_whitebox`` check says so). Departing from AutoAttack's ``rand``
    version (one stochastic forward pass decides, issues #104/#105), a point counts as robust
    only if **all** ``repeats`` stochastic predictions are correct; the majority-vote figure is
    reported beside it.
``full``
    ``standard`` ∪ ``rand`` plus PGD-CE and PGD-margin (100 steps of eps/4, 5 restarts, EOT).
    EOT variants that would repeat an attack on a deterministic model are skipped.

Every attack runs on the points that are still robust under the majority or the single-draw
verdict (a superset of the points robust under the all-repeats verdict), so the three
worst-case figures are exact per-example ANDs over the attacks run: an example broken by an
earlier attack can never become robust again. Per attack the result keeps the ``ran`` mask,
its own per-example verdict (``True`` where it did not run) and the cascade's cumulative
verdict after it (the AutoAttack-style "robust accuracy after X" row of the report).

``state_path``: a JSON file (:class:`SuiteState`) saved atomically after the clean pass, after
every batch of an attack and after every attack (per-example masks, attack traces, finished
attacks and batches). Rerunning with the same arguments resumes: finished attacks and the
finished batches of the attack in progress are read back, traces included, so the failure
checks judge a resumed suite as they judge an uninterrupted one. Its fingerprint covers the
data, every setting that shapes the result (suite, eps, norm, EOT, repeats, seed, batch size,
index offset, precision, protocol, the attacks' settings) and the model (weights, buffers,
architecture and every module's configuration: :func:`~.resume.model_fingerprint`), so a
state written for another model or another run is refused with one line. Each attack runs
under its own seed (``seed + 1000 * (position + 1)``), every batch under a seed derived from
that and the position of its first example, and every verdict under a seed derived from
(``seed``, the attack's label, that position) with a salt of its own
(:func:`~.protocols.verdict_seed`), so a resumed run gives the same result as an
uninterrupted one, batches draw independently, and verdicts never reuse an attack's draws.

``protocol`` runs every attack of the suite under that protocol (default ``fresh``; ``paper``
gives the transfer-from-a-frozen-draw figure beside it).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..atomic import atomic_write_json
from ..attacks import ATTACKS, Attack
from ..attacks.base import NORMS, batch_seed, check_eps, eval_mode
from ..errors import AdvDefenseError
from ..layout import channels_last_weights
from ..precision import check_precision
from ..provenance import relative_path
from ..randomness import is_stochastic, seeded
from .checks import CheckSettings, is_blackbox_stage, is_transfer_stage, run_checks
from .harness import (
    AdvKeeper,
    attack_identity,
    batch_runner,
    default_max_batch,
    load_data,
    model_device,
    prepare_model,
    resolve_checks,
    spec_seed,
    suite_eot,
)
from .protocols import Verdict, check_protocol, run_protocol, verdict, verdict_seed
from .results import EntryResult, EvalResult, TraceSummary
from .resume import model_fingerprint, run_fingerprint

log = logging.getLogger(__name__)

__all__ = ["SUITES", "SuiteState", "escalation_plan", "escalation_reasons", "escalation_signs",
           "escalation_stages", "model_fingerprint", "run_suite", "suite_plan"]

SUITES = ("fast", "rand-fast", "standard", "rand", "full")
STATE_VERSION = 3
#: EOT draws of the ``rand-fast`` suite's gradient stages (``rand``: ``eot_samples``)
FAST_EOT = 4
#: targets of the ``fast`` suite's APGD-T and queries of its Square (``standard``: 9, 5,000)
FAST_TARGETS, FAST_QUERIES = 3, 1000
#: queries and EOT draws of the ``rand-fast`` suite's Square
RAND_FAST_QUERIES, RAND_FAST_SQUARE_EOT = 250, 2
#: failed checks after which a fast suite runs its escalation stages: signs that the
#: gradients mislead (masking) or that the attacks stopped short of what they could reach
ESCALATING_CHECKS = ("zero_gradients", "nonfinite_gradients", "unbounded_attack",
                     "more_iterations", "eps_monotone")


def _reference_plans(eps: float, eot_samples: int, targets: int) -> dict[str, list]:
    """The reference suites: AutoAttack's standard and rand versions, and ``full``."""
    standard = [
        ("apgd-ce", "apgd-ce", {"n_iter": 100}),
        ("apgd-t", "apgd-t", {"n_iter": 100, "n_target_classes": targets}),
        ("fab-t", "fab-t", {"n_iter": 100, "n_target_classes": targets}),
        ("square", "square", {"n_queries": 5000, "p_init": 0.8}),
    ]
    eot = {"eot_samples": int(eot_samples)}
    rand = [
        ("apgd-ce+eot", "apgd-ce", {"n_iter": 100, **eot}),
        ("apgd-dlr+eot", "apgd-dlr", {"n_iter": 100, **eot}),
        ("square+eot", "square", {"n_queries": 5000, "p_init": 0.8, **eot}),
        # a transfer from one frozen draw (a new one per batch), classified on fresh draws:
        # the adaptive figure can then never be higher than the paper protocol's
        ("apgd-ce@frozen", "apgd-ce", {"n_iter": 100, "protocol": "paper"}),
    ]
    pgd = [
        ("pgd-ce", "pgd", {"steps": 100, "step_size": eps / 4, "restarts": 5, **eot}),
        ("pgd-margin", "pgd", {"steps": 100, "step_size": eps / 4, "restarts": 5,
                               "loss": "margin", **eot}),
    ]
    return {"standard": standard, "rand": rand, "full": standard + rand + pgd}


def _fast_plans(targets: int) -> dict[str, list]:
    """The quick first looks (see :func:`escalation_plan` for what follows a warning sign).

    ``fast``: APGD-CE and APGD-T on the ``FAST_TARGETS`` most likely classes, both dropping
    an example from the model's passes once it is adversarial (``early_stop``, deterministic
    models only), then Square with ``FAST_QUERIES`` queries on AutoAttack's schedule rescaled
    to them. ``rand-fast``: APGD-CE and APGD-DLR with ``FAST_EOT`` draws (AutoAttack's rand
    version: 20), the frozen-draw transfer and Square with ``RAND_FAST_QUERIES`` queries on
    ``RAND_FAST_SQUARE_EOT`` fresh draws each.
    """
    fast = [
        ("apgd-ce", "apgd-ce", {"n_iter": 100, "early_stop": True}),
        (f"apgd-t/{min(FAST_TARGETS, targets)}", "apgd-t",
         {"n_iter": 100, "n_target_classes": min(FAST_TARGETS, targets), "early_stop": True}),
        (f"square/{FAST_QUERIES}", "square",
         {"n_queries": FAST_QUERIES, "p_init": 0.8, "rescale_schedule": True}),
    ]
    eot = {"eot_samples": FAST_EOT}
    rand_fast = [
        (f"apgd-ce+eot{FAST_EOT}", "apgd-ce", {"n_iter": 100, **eot}),
        (f"apgd-dlr+eot{FAST_EOT}", "apgd-dlr", {"n_iter": 100, **eot}),
        ("apgd-ce@frozen", "apgd-ce", {"n_iter": 100, "protocol": "paper"}),
        (f"square+eot{RAND_FAST_SQUARE_EOT}/{RAND_FAST_QUERIES}", "square",
         {"n_queries": RAND_FAST_QUERIES, "p_init": 0.8, "rescale_schedule": True,
          "eot_samples": RAND_FAST_SQUARE_EOT}),
    ]
    return {"fast": fast, "rand-fast": rand_fast}


def _check_suite(suite: str) -> None:
    if suite not in SUITES:
        raise AdvDefenseError(f"unknown suite {suite!r}; choose one of: {', '.join(SUITES)}")


def suite_plan(suite: str, *, eps: float, norm: str = "linf", eot_samples: int = 20,
               n_classes: int = 10, stochastic: bool = True) -> list[tuple[str, str, dict]]:
    """``(label, registry name, keyword arguments)`` of every attack of a suite, in order; a
    ``protocol`` keyword runs that stage under another protocol than the suite's. ``fast``
    on a stochastic model is ``rand-fast``."""
    _check_suite(suite)
    targets = max(1, min(9, n_classes - 1))
    if suite == "fast" and stochastic:
        suite = "rand-fast"
    plans = {**_reference_plans(eps, eot_samples, targets), **_fast_plans(targets)}
    return _deterministic(plans[suite]) if not stochastic else plans[suite]


def escalation_plan(suite: str, *, eps: float, norm: str = "linf", eot_samples: int = 20,
                    n_classes: int = 10, stochastic: bool = True
                    ) -> list[tuple[str, str, dict]]:
    """What a fast suite runs on the points still robust when it saw a warning sign (a failed
    check, or a black-box or transfer stage that broke points the gradient stages missed):
    the rest of the reference suite of the model (deterministic, ``standard``: APGD-T on every
    target, FAB-T, Square with 5,000 queries; stochastic, ``rand``: its EOT stages at
    ``eot_samples`` draws). Empty for the reference suites."""
    _check_suite(suite)
    if suite not in ("fast", "rand-fast"):
        return []
    reference = "rand" if stochastic else "standard"
    plan = suite_plan(reference, eps=eps, norm=norm, eot_samples=eot_samples,
                      n_classes=n_classes, stochastic=stochastic)
    if reference == "standard":
        plan = [(lab, name, dict(kw, early_stop=True) if name == "apgd-t" else kw)
                for lab, name, kw in plan if lab != "apgd-ce"]
    else:  # the frozen-draw transfer already ran
        plan = [(lab, name, kw) for lab, name, kw in plan if "protocol" not in kw]
    return plan


def _deterministic(plan: list[tuple[str, str, dict]]) -> list[tuple[str, str, dict]]:
    """``plan`` on a deterministic model, where EOT and freezing are no-ops: frozen-draw
    stages go, and stages that differ only in their EOT are run once."""
    plan = [(lab, name, kw) for lab, name, kw in plan if "protocol" not in kw]
    seen, kept = set(), []
    for label, name, kw in plan:
        key = (name, tuple(sorted((k, v) for k, v in kw.items() if k != "eot_samples")))
        if key not in seen:
            seen.add(key)
            kept.append((label, name, kw))
    return kept


def _build(name: str, label: str, kwargs: dict) -> Attack:
    if name not in ATTACKS:
        raise AdvDefenseError(
            f"attack {name!r} (needed by {label}) is not registered in this build; registered: "
            f"{', '.join(sorted(ATTACKS))}")
    try:
        attack = ATTACKS[name](**kwargs)
    except TypeError as exc:
        raise AdvDefenseError(
            f"attack {name!r} does not accept the suite settings: {exc}") from None
    return suite_eot(attack)


@dataclass
class SuiteState:
    """What a suite has finished: the clean verdict and every finished attack's per-example
    verdict, ``ran`` mask and trace (what the failure checks read), under a fingerprint of
    (data, settings, model); for the attack in progress, its finished batches."""

    fingerprint: str
    model: str
    settings: dict[str, Any]
    clean: Verdict | None = None
    clean_seconds: float = 0.0
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the attack in progress: its finished batches (first example -> verdict, trace and
    #: positions of the batch)
    partial: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    @property
    def finished(self) -> list[str]:
        return list(self.entries)

    def finish(self, label: str, own: Verdict, ran: torch.Tensor, seconds: float,
               attack: str, protocol: str = "fresh", trace: TraceSummary | None = None
               ) -> None:
        self.entries[label] = {"verdict": own, "ran": ran, "seconds": seconds,
                               "attack": attack, "protocol": protocol, "trace": trace}
        self.partial.pop(label, None)

    def save(self, path: Path | None) -> None:
        if path is None:
            return

        def entry(v: dict[str, Any]) -> dict[str, Any]:
            return {**v, "verdict": v["verdict"].to_json(), "ran": v["ran"].tolist(),
                    "trace": None if v["trace"] is None else v["trace"].to_json()}

        def batch(b: dict[str, Any]) -> dict[str, Any]:
            return {"verdict": b["verdict"].to_json(), "positions": b["positions"].tolist(),
                    "trace": None if b["trace"] is None else b["trace"].to_json()}

        data = {"version": STATE_VERSION, "fingerprint": self.fingerprint, "model": self.model,
                "settings": self.settings,
                "clean": None if self.clean is None else self.clean.to_json(),
                "clean_seconds": self.clean_seconds,
                "entries": {k: entry(v) for k, v in self.entries.items()},
                "partial": {k: {b: batch(v) for b, v in parts.items()}
                            for k, parts in self.partial.items()}}
        atomic_write_json(path, data, indent=None)

    @classmethod
    def load_or_new(cls, path: Path | None, fingerprint: str, model: str,
                    settings: dict[str, Any]) -> SuiteState:
        """The state saved at ``path`` if it belongs to this run, a new one if there is none;
        a state of another run raises :class:`AdvDefenseError` (one line)."""
        if path is None or not path.exists():
            return cls(fingerprint, model, settings)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise AdvDefenseError(f"state file {path} is unreadable ({exc}); delete it") from None
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise AdvDefenseError(f"state file {path} has another format version; delete it")
        if data.get("model") != model:
            raise AdvDefenseError(
                f"state file {path} was written for another model (weights, architecture or "
                "configuration differ); delete it or pass another state path")
        if data.get("fingerprint") != fingerprint:
            raise AdvDefenseError(
                f"state file {path} belongs to a different run (data, suite or settings "
                "differ); delete it or pass another state path")

        def trace(d):
            return None if d is None else TraceSummary.from_json(d)

        state = cls(fingerprint, model, settings,
                    None if data["clean"] is None else Verdict.from_json(data["clean"]),
                    data.get("clean_seconds", 0.0))
        for k, v in data["entries"].items():
            state.entries[k] = {**v, "verdict": Verdict.from_json(v["verdict"]),
                                "ran": torch.tensor(v["ran"], dtype=torch.bool),
                                "trace": trace(v.get("trace"))}
        for k, parts in data.get("partial", {}).items():
            state.partial[k] = {
                b: {"verdict": Verdict.from_json(v["verdict"]), "trace": trace(v["trace"]),
                    "positions": torch.tensor(v["positions"], dtype=torch.long)}
                for b, v in parts.items()}
        return state


def run_suite(
    model: nn.Module,
    data,
    *,
    suite: str = "standard",
    norm: str = "linf",
    eps: float,
    eot_samples: int = 20,
    repeats: int = 10,
    state_path: str | os.PathLike | None = None,
    attacks: Sequence[tuple] | None = None,
    n_examples: int | None = None,
    batch_size: int = 250,
    seed: int = 0,
    max_batch: int | None = None,
    progress: bool = False,
    checks: CheckSettings | bool | None = True,
    protocol: str = "fresh",
    keep_adv: bool = False,
    index_offset: int = 0,
    attack_precision: str = "fp32",
) -> EvalResult:
    """Run a suite as a cascade and return an :class:`EvalResult` (``kind="suite"``).

    ``attacks`` replaces the suite by a custom list of ``(label, attack)`` pairs, or
    ``(label, attack, protocol)`` triples (``suite`` is then only a name in the report). See
    the module docstring for the semantics. ``attack_precision``: ``fp32`` or ``bf16``
    (attacks under bf16 autocast, verdicts in fp32; :mod:`advdefense.precision`).
    ``index_offset``: the global index of ``data``'s first example when it is a unit of a
    larger set (:mod:`.distributed`): the cascade runs inside the unit, with the seeds the
    unit's examples give, whichever process runs it.
    """
    check_precision(attack_precision)
    eps = check_eps(eps)
    if norm not in NORMS:
        raise AdvDefenseError(f"unknown norm {norm!r}; choose linf or l2")
    if int(repeats) < 1 or int(eot_samples) < 1:
        raise AdvDefenseError("repeats and eot_samples must be >= 1")
    check_protocol(protocol)
    settings_checks = resolve_checks(checks)
    x_all, y_all = load_data(data, n_examples)
    n = x_all.shape[0]
    device = model_device(model)
    model_hash = model_fingerprint(model)
    model, randomness = prepare_model(model, x_all[:8].to(device))
    if max_batch is None:  # rows per pass of every attack and verdict (a memory budget)
        max_batch = default_max_batch(model, x_all[:16].to(device))
    stochastic = is_stochastic(model)
    reps = int(repeats) if stochastic else 1
    if attacks is not None:
        attacks = [tuple(a) for a in attacks]
        plan = [(str(a[0]), str(getattr(a[1], "name", a[0])),
                 {"protocol": a[2]} if len(a) > 2 else None) for a in attacks]
        given = {str(a[0]): a[1] for a in attacks}
        if len(given) != len(plan):
            raise AdvDefenseError("custom suite labels must be unique")
        suite_name = "custom"
        escalation = []
    else:
        if suite not in SUITES:
            raise AdvDefenseError(f"unknown suite {suite!r}; choose one of: {', '.join(SUITES)}")
        with eval_mode(model), torch.inference_mode(), seeded(seed):
            n_classes = int(model(x_all[:1].to(device)).shape[1])
        plan = suite_plan(suite, eps=eps, norm=norm, eot_samples=eot_samples,
                          n_classes=n_classes, stochastic=stochastic)
        escalation = escalation_plan(suite, eps=eps, norm=norm, eot_samples=eot_samples,
                                     n_classes=n_classes, stochastic=stochastic)
        for label, name, _ in plan + escalation:  # fail before any work if one is missing
            if name not in ATTACKS:
                _build(name, label, {})
        suite_name = suite
    if int(batch_size) < 1:
        raise AdvDefenseError(f"batch_size must be >= 1, got {batch_size}")
    batch_size = int(batch_size)
    settings = {"suite": suite_name, "norm": norm, "eps": eps, "eot_samples": eot_samples,
                "repeats": reps, "seed": seed, "n": n, "protocol": protocol,
                "attack_precision": attack_precision, "batch_size": batch_size,
                "index_offset": index_offset, "randomness": randomness,
                "plan": [(lab, name, kw) for lab, name, kw in plan] if attacks is None
                else [(lab, attack_identity(given[lab]), kw) for lab, _, kw in plan]}
    if escalation:  # (absent otherwise: the fingerprints of the other suites stay as they were)
        settings["escalation"] = escalation
    fingerprint = run_fingerprint(x_all, y_all, settings, model_hash)
    path = Path(state_path) if state_path is not None else None
    state = SuiteState.load_or_new(path, fingerprint, model_hash, settings)
    if state.finished:
        log.info("resuming suite from %s (finished: %s)", path, ", ".join(state.finished))
    t_start = time.perf_counter()
    keeper = AdvKeeper(x_all) if keep_adv else None

    def batched(fn, idx: torch.Tensor, label: str | None = None,
                traces: list[TraceSummary] | None = None,
                positions: list[torch.Tensor] | None = None) -> Verdict:
        """Run ``fn(x, y, sel, first)`` batch by batch (``first``: the position of the
        batch's first example, index offset included); with ``label`` every finished batch
        is saved in the state with its trace, and a resumed run reads back the batches
        already there (their seeds depend only on ``first``, so the result, traces included,
        is the uninterrupted one)."""
        parts = []
        done = state.partial.get(label, {}) if label is not None else {}
        for _, pos in batch_runner(len(idx), batch_size, False, ""):
            sel = idx[pos]
            first = index_offset + int(sel[0]) if len(sel) else 0
            saved = done.get(str(first))
            if saved is not None:
                parts.append(saved["verdict"])
                if traces is not None and saved["trace"] is not None:
                    traces.append(saved["trace"])
                    positions.append(saved["positions"])
                continue
            out = fn(x_all[sel].to(device), y_all[sel].to(device), sel, first)
            v, tr = out if isinstance(out, tuple) else (out, None)
            parts.append(v)
            if traces is not None and tr is not None:
                traces.append(tr)
                positions.append(sel)
            if label is not None:
                state.partial.setdefault(label, {})[str(first)] = {
                    "verdict": v, "trace": tr, "positions": sel}
                state.save(path)
        return Verdict.cat(parts) if parts else Verdict.full(0)

    with eval_mode(model), channels_last_weights(model):
        if state.clean is None:
            t0 = time.perf_counter()
            state.clean = batched(
                lambda x, y, sel, first: verdict(model, x, y, repeats=reps, max_batch=max_batch,
                                                 seed=verdict_seed(seed, "clean", first)),
                torch.arange(n))
            state.clean_seconds = time.perf_counter() - t0
            state.save(path)
        clean = EntryResult("clean", "clean", "-", state.clean, state.clean_seconds)
        if keeper is not None:
            keeper.offer("clean", torch.arange(n), x_all, ~state.clean.all)
        robust = clean.verdict
        entries: dict[str, EntryResult] = {}

        def run_stages(stages_plan: list[tuple[str, str, dict]], first_position: int) -> None:
            """Run (or read back) the stages of ``stages_plan``, the first being stage
            ``first_position`` of the suite (its seed), each on the points still robust."""
            nonlocal robust
            stages = tqdm(list(enumerate(stages_plan, start=first_position)),
                          desc=f"suite {suite_name}", disable=not progress, leave=False)
            for i, (label, name, kw) in stages:
                if label in state.entries:
                    rec = state.entries[label]
                    robust = robust & rec["verdict"]
                    entries[label] = EntryResult(label, name, rec.get("protocol", protocol),
                                                 rec["verdict"], rec["seconds"], rec["attack"],
                                                 rec.get("trace"), rec["ran"], robust)
                    continue
                entries[label] = run_stage(i, label, name, kw)
                robust = entries[label].cumulative

        def run_stage(i: int, label: str, name: str, kw: dict | None) -> EntryResult:
            stage_seed = seed + 1000 * (i + 1)
            options = dict(kw or {})
            stage_protocol = check_protocol(options.pop("protocol", protocol))
            if attacks is not None:
                attack = given[label]
                stage_seed = spec_seed(attack, seed, i)
            else:
                attack = _build(name, label, dict(options, eps=eps, norm=norm, seed=stage_seed,
                                                   max_batch=max_batch))
            active = robust.majority | robust.single
            idx = active.nonzero().flatten()
            log.info("suite %s: %s on %d/%d points", suite_name, label, len(idx), n)
            t0 = time.perf_counter()
            traces: list[TraceSummary] = []
            positions: list[torch.Tensor] = []
            frozen: list[Any] = []

            def step(x, y, sel, first):
                out = run_protocol(model, attack, x, y, stage_protocol, repeats=reps,
                                   max_batch=max_batch, seed=batch_seed(stage_seed, first),
                                   precision=attack_precision,
                                   verdict_seed=verdict_seed(seed, label, first))
                eot = int(getattr(attack, "eot_samples", 1)) if (
                    stochastic and stage_protocol == "fresh") else 1
                if out.states is not None:
                    frozen.append(out.states)
                if keeper is not None:
                    keeper.offer(label, sel, out.x_adv, ~out.verdict.all)
                return out.verdict, TraceSummary.from_recorder(out.recorder, attack, sel, eot)

            part = batched(step, idx, label, traces, positions)
            own = Verdict.full(n)
            for k in Verdict.KINDS:
                own.get(k)[idx] = part.get(k)
            ran = torch.zeros(n, dtype=torch.bool)
            ran[idx] = True
            seconds = time.perf_counter() - t0
            trace = TraceSummary.merge(traces, n, positions)
            state.finish(label, own, ran, seconds, repr(attack), stage_protocol, trace)
            state.save(path)
            return EntryResult(label, name, stage_protocol, own, seconds, repr(attack), trace,
                               ran, robust & own, states=frozen)

        def result_of(stages_plan: list[tuple[str, str, dict]]) -> EvalResult:
            config = {"kind": "suite", "suite": suite_name, "eps": eps, "norm": norm,
                      "eot_samples": eot_samples, "repeats": reps, "seed": seed, "n": n,
                      "batch_size": batch_size, "max_batch": max_batch,
                      "stochastic": stochastic, "randomness": randomness, "protocol": protocol,
                      "model_hash": model_hash,
                      "state_path": None if path is None else relative_path(path),
                      "specs": [{"label": lab, "name": name, "protocol": entries[lab].protocol,
                                 "eps": eps, "norm": norm, "attack": entries[lab].attack,
                                 "passes": entries[lab].passes} for lab, name, _ in stages_plan]}
            return EvalResult(n, stochastic, reps, clean, {lab: entries[lab] for lab, *_ in
                                                           stages_plan},
                              robust, y_all.cpu(), time.perf_counter() - t_start, config,
                              kind="suite")

        run_stages(plan, 0)
        result = result_of(plan)
        checks_seconds, checked = 0.0, False
        if escalation:
            if settings_checks is not None:  # judged on the fast stages alone
                t0 = time.perf_counter()
                result.checks = run_checks(model, (x_all, y_all), result, settings_checks)
                checks_seconds, checked = time.perf_counter() - t0, True
            reasons, blackbox = escalation_signs(result)
            ran = escalation_stages(escalation, blackbox) if reasons else []
            if reasons:
                log.info("suite %s: escalating to %s (%s)", suite_name,
                         ", ".join(lab for lab, *_ in ran), "; ".join(reasons))
                run_stages(ran, len(plan))
                result, checked = result_of(plan + ran), False
            result.config["escalation"] = {"escalated": bool(reasons), "reasons": reasons,
                                           "stages": [lab for lab, *_ in escalation],
                                           "ran": [lab for lab, *_ in ran]}
    if keeper is not None:
        result.adv, result.adv_source = keeper.x, keeper.source
    if settings_checks is not None:
        if not checked:
            t0 = time.perf_counter()
            result.checks = run_checks(model, (x_all, y_all), result, settings_checks)
            checks_seconds += time.perf_counter() - t0
        result.config["checks_seconds"] = checks_seconds
    return result


def escalation_signs(result: EvalResult) -> tuple[list[str], bool]:
    """``(reasons, blackbox)``: why a fast suite goes on with its escalation stages (no
    reasons: it need not), and whether the reasons call for the reference's gradient-free
    stages too.

    Signs: a gradient-free stage broke points that every gradient stage before it missed
    (the sign of masked gradients that AutoAttack's Square is there to catch: the whole
    escalation runs); a transfer stage (a frozen draw) broke such points (the EOT gradients
    of the live model were weaker than one draw's: the escalation's gradient stages, with the
    reference's EOT draws, run); one of :data:`ESCALATING_CHECKS` failed in ``result.checks``
    (the whole escalation runs). A point counts as broken by a stage if the majority of its
    repeated predictions is wrong there, and as missed by the gradient stages only if every
    one of their repeated predictions was right: on a random model a point near the boundary
    flips by chance at any stage (Athalye et al. 2018, Sec. 4.1 on randomized defenses).
    The other checks are reported as they are; they ask for more draws or iterations."""
    reasons, blackbox = [], False
    steady = result.clean.verdict.all
    for e in result.entries.values():  # in cascade order
        broke = int((steady & ~e.verdict.majority).sum())
        steady = steady & e.verdict.all
        if broke and is_blackbox_stage(e):
            reasons.append(f"{e.label} broke {broke} points the gradient stages missed")
            blackbox = True
        elif broke and is_transfer_stage(e):
            reasons.append(f"{e.label} broke {broke} points the EOT gradient stages missed")
    failed = [c.name for c in result.checks if c.passed is False and c.name in ESCALATING_CHECKS]
    if failed:
        reasons.append("failed checks: " + ", ".join(failed))
        blackbox = True
    return reasons, blackbox


def escalation_reasons(result: EvalResult) -> list[str]:
    """The reasons of :func:`escalation_signs` (empty: no escalation)."""
    return escalation_signs(result)[0]


def escalation_stages(escalation: list[tuple[str, str, dict]], blackbox: bool
                      ) -> list[tuple[str, str, dict]]:
    """The stages of ``escalation`` a sign calls for: all of them, or (``blackbox`` false: a
    transfer beat the EOT gradients) its gradient stages only. Gradient-free stages come last
    in every escalation plan, so the stages run are always a prefix of it."""
    if blackbox:
        return escalation
    return [st for st in escalation if getattr(ATTACKS[st[1]], "access", "") != "gradient-free"]
