"""Reports of an evaluation: JSON (everything, per example) and Markdown (tables).

``to_json(result)`` returns a JSON-ready dict with the per-example results as lists of
booleans (clean, every attack, worst case; all/majority/single verdicts), accuracies with
their 95% Clopper–Pearson intervals, the configuration, the checks, library versions and
the seed. ``to_markdown(result)`` renders the attack table
(attack | protocol | accuracy [95% CI] | n | seconds) and the checks table.
``write_report(result, out_dir, sweep=...)`` writes ``report.json``, ``report.md`` and (with
matplotlib, Agg) ``accuracy_vs_eps.png``, each atomically. ``robustbench_fields(result, ...)``
is the block in RobustBench's field names (``clean_acc``, ``autoattack_acc``, ``eps``,
``threat_model``, ...); ``summary(result)`` a small dict of the headline numbers.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_json, atomic_write_text
from .protocols import Verdict
from .results import EvalResult, clean_float, main_eps, summary
from .stats import accuracy

__all__ = ["AUTOATTACK_SOURCE", "STANDARD_STAGES", "robustbench_fields", "summary", "to_json",
           "to_markdown", "versions", "write_report"]

STANDARD_STAGES = ("apgd-ce", "apgd-t", "fab-t", "square")
"""Labels of the ``standard`` suite's stages (AutoAttack's standard version), in order."""

AUTOATTACK_SOURCE = "advdefense standard suite (reimplementation)"


def versions() -> dict[str, str]:
    import numpy
    import torch

    from .. import __version__ as advdefense_version

    return {"advdefense": str(advdefense_version), "torch": torch.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


def _verdict_lists(v: Verdict) -> dict[str, list[bool]]:
    return {k: v.get(k).tolist() for k in Verdict.KINDS}


_clean_float = clean_float
_main_eps = main_eps


def _acc(a) -> dict[str, Any]:
    return {k: _clean_float(v) for k, v in a.as_dict().items()}


def to_json(result: EvalResult, *, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """JSON-ready dict of ``result``; ``extra`` is merged in at the top level."""
    rows = []
    for r in result.rows():
        rows.append({"label": r["label"], "attack": r["attack"], "protocol": r["protocol"],
                     "seconds": r["seconds"], "ran": r["ran"],
                     **{k: _acc(r[k]) for k in Verdict.KINDS}})
    per_example: dict[str, Any] = {"labels": result.labels.tolist(),
                                   "clean": _verdict_lists(result.clean.verdict),
                                   "worst": _verdict_lists(result.worst)}
    attacks = {}
    for label, e in result.entries.items():
        d: dict[str, Any] = {"name": e.name, "protocol": e.protocol, "attack": e.attack,
                             "seconds": e.seconds, "correct": _verdict_lists(e.verdict)}
        if e.ran is not None:
            d["ran"] = e.ran.tolist()
        if e.cumulative is not None:
            d["robust_after"] = _verdict_lists(e.cumulative)
        passes = getattr(e, "passes", None)  # rows through the model, when the core counts them
        if passes is not None:
            d["passes"] = dict(passes)
        if e.trace is not None:
            d["trace"] = {"eot_samples": e.trace.eot_samples, "nonfinite": e.trace.nonfinite,
                          "mean_loss": None if e.trace.losses is None
                          else [_clean_float(float(v)) for v in e.trace.losses.mean(1)]}
        attacks[label] = d
    per_example["attacks"] = attacks
    out = {"kind": result.kind, "n": result.n, "stochastic": result.stochastic,
           "repeats": result.repeats, "seed": result.config.get("seed"),
           "seconds": result.seconds, "config": result.config, "accuracies": rows,
           "checks": [c.as_dict() for c in result.checks],
           "upper_bound": bool(failed_check_names(result)), "versions": versions(),
           "per_example": per_example}
    if extra:
        out.update(extra)
    return out


def _fmt(a) -> str:
    return str(a)


def failed_check_names(result: EvalResult) -> list[str]:
    """Names of the attack-failure checks that failed on ``result``: while any is listed, its
    worst case is only an upper bound (docs/verdicts.md)."""
    return [c.name for c in result.checks if c.passed is False]


def _upper_bound_line(result: EvalResult) -> list[str]:
    failed = failed_check_names(result)
    if not failed:
        return []
    return ["", f"**Upper bound:** the worst case ({result.accuracy('worst')}) is only an "
            f"upper bound: the attack-failure check(s) {', '.join(failed)} failed (remedies "
            "below). Do not publish it as the model's robust accuracy."]


def to_markdown(result: EvalResult, *, title: str = "Robustness evaluation",
                sweep: dict[float, EvalResult] | None = None) -> str:
    """Markdown tables: accuracies (+ CI, n, seconds) and the checks with remedies."""
    lines = [f"# {title}", ""]
    cfg = result.config
    desc = f"{result.n} examples, seed {cfg.get('seed')}"
    if result.stochastic:
        desc += (f"; stochastic model: robust = all {result.repeats} stochastic predictions "
                 "correct (majority vote in its own column)")
    else:
        desc += "; deterministic model: one prediction per example"
    if result.kind == "suite":
        desc += (f"; suite `{cfg.get('suite')}` ({cfg.get('norm')}, eps={cfg.get('eps')}), "
                 "cascade: each row is the robust accuracy after that attack")
    lines += [desc, ""]
    escalation = cfg.get("escalation")
    if escalation:
        lines += [("Escalated to the reference suite's "
                   + ", ".join(escalation.get("ran", escalation["stages"]))
                   + " (" + "; ".join(escalation["reasons"]) + ")") if escalation["escalated"]
                  else ("No warning sign: the escalation stages (" +
                        ", ".join(escalation["stages"]) + ") did not run. A quick first "
                        "look: run `--suite standard` (deterministic) or `rand` (random "
                        "model) before publishing this figure."), ""]
    head = "| attack | protocol | accuracy [95% CI] |"
    sep = "|---|---|---|"
    if result.stochastic:
        head += " majority vote [95% CI] | single draw [95% CI] |"
        sep += "---|---|"
    head += " n | seconds |"
    sep += "---|---|"
    if result.kind == "suite":
        head += " attacked |"
        sep += "---|"
    lines += [head, sep]
    for r in result.rows():
        # a suite's stages by their labels, which carry the budget (apgd-t/3, square+eot)
        name = r["label"] if result.kind == "suite" and r["label"] != "worst" else r["attack"]
        row = f"| {name} | {r['protocol']} | {_fmt(r['all'])} |"
        if result.stochastic:
            row += f" {_fmt(r['majority'])} | {_fmt(r['single'])} |"
        row += f" {r['all'].n} | {r['seconds']:.1f} |"
        if result.kind == "suite":
            row += f" {'' if r['ran'] is None else r['ran']} |"
        lines.append(row)
    lines += _upper_bound_line(result)
    if sweep and len(sweep) > 1:
        lines += ["", "## Accuracy against eps (worst case over attacks)", "",
                  "| eps | clean | worst case [95% CI] |", "|---|---|---|"]
        for eps in sorted(sweep):
            r = sweep[eps]
            lines.append(f"| {eps:g} | {r.accuracy('clean')} | {r.accuracy('worst')} |")
    if result.checks:
        failed = sum(c.passed is False for c in result.checks)
        lines += ["", f"## Attack-failure checks ({failed} failed)", ""]
        spent = result.config.get("checks_seconds")
        if spent is not None:
            share = f" ({100 * spent / result.seconds:.0f}% on top of the evaluation's " \
                f"{result.seconds:.1f} s)" if result.seconds else ""
            lines += [f"The checks' own cost: {spent:.1f} s{share}; they reuse the attacks' "
                      "traces and, with an eps sweep, its accuracies.", ""]
        lines += ["| check | result | detail | remedy |", "|---|---|---|---|"]
        for c in result.checks:
            detail = c.detail.replace("|", "\\|")
            remedy = c.remedy.replace("|", "\\|") if c.passed is False else ""
            lines.append(f"| {c.name} | {c.status} | {detail} | {remedy} |")
    lines.append("")
    return "\n".join(lines)


def write_report(result: EvalResult, out_dir: str | Path, *,
                 sweep: dict[float, EvalResult] | None = None,
                 extra: dict[str, Any] | None = None, plot: bool = True,
                 title: str = "Robustness evaluation") -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``accuracy_vs_eps.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = to_json(result, extra=extra)
    if sweep:
        payload["sweep"] = {f"{eps:g}": {"rows": to_json(r)["accuracies"],
                                         "per_example_worst": r.worst.all.tolist()}
                            for eps, r in sorted(sweep.items())}
    paths = {"json": out / "report.json", "markdown": out / "report.md"}
    markdown = to_markdown(result, title=title, sweep=sweep)
    atomic_write_json(paths["json"], payload)
    atomic_write_text(paths["markdown"], markdown)
    if plot:
        from .plots import plot_accuracy_vs_eps

        paths["plot"] = plot_accuracy_vs_eps(sweep or {_main_eps(result): result},
                                             out / "accuracy_vs_eps.png")
    return paths


def _pct(a) -> float | None:
    return None if not a.n else round(100 * a.value, 2)


def _eps_text(eps: float) -> str:
    k = eps * 255
    return f"{round(k)}/255" if k > 0 and abs(k - round(k)) < 1e-6 else f"{eps:g}"


def standard_suite_accuracy(result: EvalResult, kind: str = "all"):
    """Robust accuracy after the four stages of the ``standard`` suite (AutoAttack's standard
    version) when they ran in this result (suites ``standard`` and ``full``), else ``None``."""
    if result.kind != "suite" or result.config.get("suite") not in ("standard", "full"):
        return None
    stages = [result.entries.get(label) for label in STANDARD_STAGES]
    if any(e is None for e in stages) or stages[-1].cumulative is None:
        return None
    return accuracy(stages[-1].cumulative.get(kind))


def robustbench_fields(result: EvalResult, *, dataset: str, eps: float, norm: str,
                       model: str | None = None) -> dict[str, Any]:
    """The RobustBench ``model_info`` fields this evaluation can fill, accuracies in percent.

    ``autoattack_acc`` is the robust accuracy after advdefense's reimplementation of
    AutoAttack's standard version (``null`` when that suite did not run); for a stochastic
    model it is the all-repeats verdict (``number_forward_passes`` says how many).
    """
    aa = standard_suite_accuracy(result)
    attacks = {}
    for label, e in result.entries.items():
        a = accuracy((e.cumulative if e.cumulative is not None else e.verdict).all)
        attacks[label] = {"robust_acc": _pct(a), "passes": getattr(e, "passes", None)}
    out = {"dataset": dataset, "threat_model": {"linf": "Linf", "l2": "L2"}.get(norm, norm),
           "eps": float(eps), "eps_text": _eps_text(float(eps)), "n_examples": result.n,
           "clean_acc": _pct(result.accuracy("clean")),
           "autoattack_acc": None if aa is None else _pct(aa),
           "autoattack_acc_source": AUTOATTACK_SOURCE if aa is not None else None,
           "number_forward_passes": result.repeats if result.stochastic else 1,
           "attacks": attacks, "upper_bound": bool(failed_check_names(result)),
           "failed_checks": failed_check_names(result)}
    if model is not None:
        out["model"] = model
    return out
