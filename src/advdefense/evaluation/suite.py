"""AutoAttack-style suites: a cascade of attacks, each run only on the points still robust.

``run_suite(model, data, suite=..., norm=..., eps=...)`` (Croce & Hein 2020, "Reliable
evaluation of adversarial robustness with an ensemble of diverse parameter-free attacks"):

``standard`` (AutoAttack's standard version, reference settings)
    APGD-CE (100 iterations), APGD-T (100 iterations, 9 target classes), FAB-T (100
    iterations, 9 target classes), Square (5,000 queries, p_init 0.8).
``rand`` (for randomized defenses)
    APGD-CE and APGD-DLR with batched EOT (``eot_samples``, default 20, as AutoAttack's
    ``eot_iter``) and Square on the EOT-averaged loss. Departing from AutoAttack's ``rand``
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

``state_path``: a JSON file saved atomically after the clean pass and after every attack
(per-example masks + finished attacks). Rerunning with the same arguments resumes: finished
attacks are skipped. Each attack runs under its own seed (``seed`` + its position), so a
resumed run gives the same result as an uninterrupted one. Traces (for the failure checks) of
attacks finished in an earlier process are not restored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..attacks import ATTACKS, Attack
from ..attacks.base import NORMS, check_eps, eval_mode
from ..errors import AdvDefenseError
from ..provenance import relative_path
from ..randomness import is_stochastic, seeded
from .harness import (
    EntryResult,
    EvalResult,
    TraceSummary,
    _model_device,
    _summarize_trace,
    load_data,
)
from .protocols import Verdict, run_protocol, verdict

log = logging.getLogger(__name__)

__all__ = ["SUITES", "run_suite", "suite_plan"]

SUITES = ("standard", "rand", "full")
STATE_VERSION = 1


def suite_plan(suite: str, *, eps: float, norm: str = "linf", eot_samples: int = 20,
               n_classes: int = 10, stochastic: bool = True) -> list[tuple[str, str, dict]]:
    """``(label, registry name, keyword arguments)`` of every attack of a suite, in order."""
    if suite not in SUITES:
        raise AdvDefenseError(f"unknown suite {suite!r}; choose one of: {', '.join(SUITES)}")
    targets = max(1, min(9, n_classes - 1))
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
    ]
    pgd = [
        ("pgd-ce", "pgd", {"steps": 100, "step_size": eps / 4, "restarts": 5, **eot}),
        ("pgd-margin", "pgd", {"steps": 100, "step_size": eps / 4, "restarts": 5,
                               "loss": "margin", **eot}),
    ]
    plan = {"standard": standard, "rand": rand, "full": standard + rand + pgd}[suite]
    if not stochastic:  # EOT is a no-op on a deterministic model: drop exact repeats
        seen, kept = set(), []
        for label, name, kw in plan:
            key = (name, tuple(sorted((k, v) for k, v in kw.items() if k != "eot_samples")))
            if key not in seen:
                seen.add(key)
                kept.append((label, name, kw))
        plan = kept
    return plan


def _build(name: str, label: str, kwargs: dict) -> Attack:
    if name not in ATTACKS:
        raise AdvDefenseError(
            f"attack {name!r} (needed by {label}) is not registered in this build; registered: "
            f"{', '.join(sorted(ATTACKS))}")
    try:
        return ATTACKS[name](**kwargs)
    except TypeError as exc:
        raise AdvDefenseError(
            f"attack {name!r} does not accept the suite settings: {exc}") from None


def _fingerprint(x: torch.Tensor, y: torch.Tensor, settings: dict[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(y.cpu().numpy().tobytes())
    h.update(x.cpu().float().numpy().tobytes())
    return h.hexdigest()[:20]


def _verdict_to_json(v: Verdict) -> dict[str, list[bool]]:
    return {k: v.get(k).tolist() for k in Verdict.KINDS}


def _verdict_from_json(d: dict[str, list[bool]]) -> Verdict:
    return Verdict(*(torch.tensor(d[k], dtype=torch.bool) for k in Verdict.KINDS))


def _save_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)


def _load_state(path: Path, fingerprint: str) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdvDefenseError(f"state file {path} is unreadable ({exc}); delete it") from None
    if state.get("version") != STATE_VERSION or state.get("fingerprint") != fingerprint:
        raise AdvDefenseError(
            f"state file {path} belongs to a different run (model data, suite or settings "
            "differ); delete it or pass another state path")
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
    attacks: Sequence[tuple[str, Attack]] | None = None,
    n_examples: int | None = None,
    batch_size: int = 250,
    seed: int = 0,
    max_batch: int = 4096,
    progress: bool = False,
    checks: bool = True,
    check_options: dict[str, Any] | None = None,
) -> EvalResult:
    """Run a suite as a cascade and return an :class:`EvalResult` (``kind="suite"``).

    ``attacks`` replaces the suite by a custom list of ``(label, attack)`` pairs (``suite`` is
    then only a name in the report). See the module docstring for the semantics.
    """
    eps = check_eps(eps)
    if norm not in NORMS:
        raise AdvDefenseError(f"unknown norm {norm!r}; choose linf or l2")
    if int(repeats) < 1 or int(eot_samples) < 1:
        raise AdvDefenseError("repeats and eot_samples must be >= 1")
    x_all, y_all = load_data(data, n_examples)
    n = x_all.shape[0]
    device = _model_device(model)
    stochastic = is_stochastic(model)
    reps = int(repeats) if stochastic else 1
    if attacks is not None:
        plan = [(str(label), str(getattr(a, "name", label)), None) for label, a in attacks]
        given = {str(label): a for label, a in attacks}
        if len(given) != len(plan):
            raise AdvDefenseError("custom suite labels must be unique")
        suite_name = "custom"
    else:
        if suite not in SUITES:
            raise AdvDefenseError(f"unknown suite {suite!r}; choose one of: {', '.join(SUITES)}")
        with eval_mode(model), torch.inference_mode(), seeded(seed):
            n_classes = int(model(x_all[:1].to(device)).shape[1])
        plan = suite_plan(suite, eps=eps, norm=norm, eot_samples=eot_samples,
                          n_classes=n_classes, stochastic=stochastic)
        for label, name, _ in plan:  # fail before any work if an attack is missing
            if name not in ATTACKS:
                _build(name, label, {})
        suite_name = suite
    settings = {"suite": suite_name, "norm": norm, "eps": eps, "eot_samples": eot_samples,
                "repeats": reps, "seed": seed, "n": n,
                "plan": [(lab, name, kw) for lab, name, kw in plan] if attacks is None
                else [(lab, repr(given[lab])) for lab, _, _ in plan]}
    fingerprint = _fingerprint(x_all, y_all, settings)
    path = Path(state_path) if state_path is not None else None
    state = _load_state(path, fingerprint) if path is not None else None
    if state is not None:
        log.info("resuming suite from %s (finished: %s)", path, ", ".join(state["finished"]))
    t_start = time.perf_counter()

    def batched_verdict(fn, idx: torch.Tensor) -> Verdict:
        parts = []
        for s in range(0, len(idx), batch_size):
            sel = idx[s : s + batch_size]
            parts.append(fn(x_all[sel].to(device), y_all[sel].to(device)))
        return Verdict.cat(parts) if parts else Verdict.full(0)

    with eval_mode(model):
        if state is None:
            t0 = time.perf_counter()
            with seeded(seed):
                clean_v = batched_verdict(
                    lambda x, y: verdict(model, x, y, repeats=reps, max_batch=max_batch),
                    torch.arange(n))
            state = {"version": STATE_VERSION, "fingerprint": fingerprint, "settings": settings,
                     "clean": _verdict_to_json(clean_v), "clean_seconds": time.perf_counter() - t0,
                     "finished": [], "entries": {}}
            if path is not None:
                _save_state(path, state)
        clean = EntryResult("clean", "clean", "-", _verdict_from_json(state["clean"]),
                            state["clean_seconds"])
        robust = clean.verdict
        entries: dict[str, EntryResult] = {}
        stages = tqdm(list(enumerate(plan)), desc=f"suite {suite_name}", disable=not progress,
                      leave=False)
        for i, (label, name, kw) in stages:
            if label in state["finished"]:
                rec = state["entries"][label]
                own = _verdict_from_json(rec["verdict"])
                ran = torch.tensor(rec["ran"], dtype=torch.bool)
                robust = robust & own
                entries[label] = EntryResult(label, name, "fresh", own, rec["seconds"],
                                             rec["attack"], None, ran, robust)
                continue
            if attacks is not None:
                attack = given[label]
            else:
                attack = _build(name, label, dict(kw, eps=eps, norm=norm, seed=seed,
                                                   max_batch=max_batch))
            active = robust.majority | robust.single
            idx = active.nonzero().flatten()
            log.info("suite %s: %s on %d/%d points", suite_name, label, len(idx), n)
            t0 = time.perf_counter()
            traces: list[TraceSummary] = []

            def step(x, y, attack=attack, traces=traces):
                _, v = run_protocol(model, attack, x, y, "fresh", repeats=reps,
                                    max_batch=max_batch)
                traces.append(_summarize_trace(attack, model, False))
                return v

            with seeded(seed + 1000 * (i + 1)):
                part = batched_verdict(step, idx)
            own = Verdict.full(n)
            for k in Verdict.KINDS:
                own.get(k)[idx] = part.get(k)
            ran = torch.zeros(n, dtype=torch.bool)
            ran[idx] = True
            robust = robust & own
            seconds = time.perf_counter() - t0
            entries[label] = EntryResult(label, name, "fresh", own, seconds, repr(attack),
                                         TraceSummary.merge(traces), ran, robust)
            state["finished"].append(label)
            state["entries"][label] = {"verdict": _verdict_to_json(own), "ran": ran.tolist(),
                                       "seconds": seconds, "attack": repr(attack)}
            if path is not None:
                _save_state(path, state)
    config = {"kind": "suite", "suite": suite_name, "eps": eps, "norm": norm,
              "eot_samples": eot_samples, "repeats": reps, "seed": seed, "n": n,
              "batch_size": batch_size, "max_batch": max_batch, "stochastic": stochastic,
              "state_path": None if path is None else relative_path(path),
              "specs": [{"label": lab, "name": name, "protocol": "fresh", "eps": eps,
                         "norm": norm, "attack": entries[lab].attack} for lab, name, _ in plan]}
    result = EvalResult(n, stochastic, reps, clean, entries, robust, y_all.cpu(),
                        time.perf_counter() - t_start, config, kind="suite")
    if checks:
        from .checks import run_checks

        t0 = time.perf_counter()
        result.checks = run_checks(model, (x_all, y_all), result, **(check_options or {}))
        result.config["checks_seconds"] = time.perf_counter() - t0
    return result
