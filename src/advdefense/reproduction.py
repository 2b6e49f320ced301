"""Train-then-evaluate pipelines behind ``advdefense demo`` and ``advdefense reproduce``.

A *preset* is a list of :class:`Plan` entries, each a full experiment config (saved next to its
checkpoint) plus how to evaluate the trained model. Every step is resumable: a model whose
checkpoint already holds all epochs (or whose early stopping has stopped) is not retrained,
and a half-trained one resumes from its last epoch; evaluations are cached as JSON next to
the checkpoint. With ``train.early_stopping`` the best val epoch (``best.pt``) is evaluated.

The report opens with the verdicts (:func:`paired_summary`, rules in docs/verdicts.md): per
defense and training seed, its paper-protocol and worst-case accuracy beside its val monitor,
the exact McNemar test of its worst case against its baselines (PGD-AT on the same network,
the recipe without CAS) and against its own paper-protocol figure, every p-value adjusted
with Holm's method over the report; a worst case whose model failed an attack-failure check
(or faced no adaptive attack) is an upper bound, and no verdict is drawn in a direction it
could flip; a defense's verdict is decided only if it holds at every training seed, with at
least two seeds and three where two differ by more than 5 points (:func:`run_plans` adds the
third). Then the spread over seeds and the epochs each entry trained.

A cached evaluation is reused only while the entry's training, examples and evaluation (the
evaluator's ``describe(plan)``: kind, version, budget, every attack) are unchanged; a model
trained under another early-stopping monitor is trained again.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_write_text

log = logging.getLogger(__name__)

# fields of a report section that describe the run, not the evaluation (set on every reuse)
RUN_FIELDS = ("title", "notes", "key", "group", "seed", "arch", "baselines", "train_seconds",
              "training")


@dataclass
class Plan:
    """One model of a preset: a config dict and an evaluation function.

    ``evaluate(model, x, y, plan) -> dict`` returns a JSON-able section of the report
    (``{"tables": [...], "checks": [...], "curves": {...}}``, see :func:`table_from_result`).
    """

    key: str
    title: str
    config: dict[str, Any]
    evaluate: Callable[..., dict[str, Any]]
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    cost: float = 1.0  # relative compute, only used to start the longest entries first


def recorded_train_seconds(run_dir: Path) -> float | None:
    """Training time summed over the epochs logged in ``metrics.jsonl`` (survives resumes)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return None
    total = 0.0
    for line in path.read_text().splitlines():
        if line.strip():
            total += float(json.loads(line).get("seconds", 0.0))
    return total


def training_summary(checkpoint: dict[str, Any], cfg) -> dict[str, Any]:
    """Epochs trained, the cap, and (with early stopping) the best epoch and whether the rule
    stopped the run, from a checkpoint's logged history."""
    from .training.early_stopping import legacy_monitor, lr_decays, stopping_state

    history = list((checkpoint.get("metrics") or {}).get("history", []))
    out: dict[str, Any] = {"epochs": int(checkpoint.get("epoch", len(history))),
                           "cap": int(cfg.train.epochs), "early_stopping": None,
                           "checkpoint": "last.pt"}
    rule = cfg.train.early_stopping
    if rule is not None and history:
        state = stopping_state(history, rule, decays=lr_decays(cfg))
        if lr_decays(cfg):
            out["lr_decays"] = state.decays
        out.update(early_stopping={"metric": rule.metric, "patience": rule.patience,
                                   "min_delta": rule.min_delta},
                   best_epoch=state.best_epoch, best_value=state.best_value,
                   stopped_early=state.stop, checkpoint="best.pt")
    if (checkpoint.get("extra") or {}).get("machine"):
        out["machine"] = checkpoint["extra"]["machine"]
    chosen = history[(out.get("best_epoch") or len(history)) - 1] if history else {}
    if "monitor_clean_acc" in chosen:
        out["monitor"] = chosen.get("monitor", legacy_monitor(cfg))
        out["monitor_clean"] = chosen.get("monitor_clean_acc")
        out["monitor_robust"] = chosen.get("monitor_pgd_acc")
    return out


def _logged_monitor(checkpoint: dict[str, Any], cfg) -> str | None:
    """The monitor that logged a checkpoint's history (``None``: no monitor ran)."""
    from .training.early_stopping import legacy_monitor

    history = list((checkpoint.get("metrics") or {}).get("history", []))
    if not history or "monitor_clean_acc" not in history[0]:
        return None
    return history[0].get("monitor", legacy_monitor(cfg))


def _finished(checkpoint: dict[str, Any], cfg) -> bool:
    summary = training_summary(checkpoint, cfg)
    return summary["epochs"] >= cfg.train.epochs or bool(summary.get("stopped_early"))


def _comparable(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """A saved config without what may change between runs of the same experiment: the output
    folder, the epoch cap and the early-stopping rule (raising the cap resumes the run)."""
    if not isinstance(config, dict):
        return None
    out = copy.deepcopy(config)
    out.pop("output_dir", None)
    train = out.get("train")
    if isinstance(train, dict):
        train.pop("epochs", None)
        train.pop("early_stopping", None)
    return json.loads(json.dumps(out, sort_keys=True, default=str))


def _digest(obj: Any) -> str:
    import hashlib

    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _expected_monitor(cfg) -> str:
    from .randomness import seeded
    from .training.early_stopping import expected_monitor

    with seeded(int(cfg.seed)):  # building the model must not move the caller's RNG
        return expected_monitor(cfg)


def train_plan(plan: Plan, root: Path, *, progress: bool = False, device: str | None = None):
    """Train (or resume, or reuse) the plan's model; returns ``(model, cfg, seconds, training)``
    where ``seconds`` is the training time recorded over all epochs (not just this call's) and
    ``training`` is :func:`training_summary`. With early stopping the model is the best val
    epoch's (``best.pt``), otherwise the last epoch's. ``device``: where to train and load the
    model (``None``: CUDA if available, else CPU)."""
    from .config import config_from_dict, to_dict
    from .training.checkpoint import load_checkpoint, load_model_from_checkpoint
    from .training.trainer import Trainer

    cfg_dict = copy.deepcopy(plan.config)
    cfg_dict["output_dir"] = str(root / plan.key)
    cfg = config_from_dict(cfg_dict)
    out = Path(cfg.output_dir)
    ckpt = out / "last.pt"
    t0 = time.perf_counter()
    done, resume = False, ckpt.exists()
    if ckpt.exists():
        expected = _expected_monitor(cfg)
        try:
            saved = load_checkpoint(ckpt)
            logged = _logged_monitor(saved, cfg)
            if _comparable(saved.get("config")) != _comparable(to_dict(cfg)):
                # another experiment in this folder (e.g. an older version of the preset)
                log.warning("%s was trained with another config; training %s from scratch",
                            ckpt, plan.key)
                resume = False
            elif logged is not None and logged != expected:
                # epochs chosen by another monitor (e.g. a single-draw one on a random model)
                log.warning("%s was monitored by %r; training %s from scratch with %r", ckpt,
                            logged, plan.key, expected)
                resume = False
            else:
                done = _finished(saved, cfg)
            if not resume:
                for stale in ("best.pt", "evaluation.json"):
                    (out / stale).unlink(missing_ok=True)
        except Exception:  # a broken checkpoint is retrained from scratch below
            done, resume = False, False
    if not done:
        trainer = Trainer(cfg, progress=progress, device=device)
        try:
            trainer.fit(resume=resume)
        finally:
            trainer.close()
    training = training_summary(load_checkpoint(ckpt), cfg)
    chosen = Path(cfg.output_dir) / training["checkpoint"]
    if not chosen.exists():  # early stopping without a best.pt (not expected): the last epoch
        chosen, training["checkpoint"] = ckpt, "last.pt"
    model, cfg = load_model_from_checkpoint(
        chosen, map_location=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    recorded = recorded_train_seconds(cfg.output_dir)
    seconds = recorded if recorded is not None else time.perf_counter() - t0
    return model, cfg, seconds, training


def table_from_result(result, *, title: str, protocol_names: dict[str, str] | None = None):
    """A JSON-able table (rows of accuracy with CI) from an :class:`EvalResult`."""
    protocol_names = protocol_names or {}
    rows = []
    for row in result.rows():
        acc = row["all"]
        rows.append({
            "attack": row["attack"],
            "protocol": protocol_names.get(row["protocol"], row["protocol"]),
            "accuracy": acc.value, "ci": [acc.low, acc.high], "n": acc.n,
            "majority": row["majority"].value if result.stochastic else None,
            "single": row["single"].value if result.stochastic else None,
            "seconds": row["seconds"],
        })
    return {"title": title, "stochastic": result.stochastic, "repeats": result.repeats,
            "rows": rows}


def checks_from_result(result) -> list[dict[str, Any]]:
    return [c.as_dict() for c in getattr(result, "checks", [])]


def eps_curve(model, x, y, eps_list, *, steps: int = 20, eot_samples: int = 1,
              repeats: int = 10, protocol: str = "fresh", seed: int = 0) -> list[dict]:
    """Robust accuracy of PGD-``steps`` (step eps/4) at each eps, with CIs."""
    from .attacks import PGD
    from .evaluation.harness import AttackSpec, evaluate

    points = []
    for eps in eps_list:
        if eps == 0:
            res = evaluate(model, (x, y), [], repeats=repeats, checks=False, seed=seed)
            acc = res.accuracy("clean")
        else:
            atk = PGD(eps=eps, steps=steps, step_size=eps / 4, eot_samples=eot_samples,
                      seed=seed)
            res = evaluate(model, (x, y), [AttackSpec("pgd", atk, protocol)], repeats=repeats,
                           checks=False, seed=seed)
            acc = res.accuracy(f"pgd/{protocol}")
        points.append({"eps": eps, "accuracy": acc.value, "ci": [acc.low, acc.high]})
    return points


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def markdown_table(table: dict[str, Any]) -> str:
    stochastic = table.get("stochastic")
    head = "| attack | protocol | accuracy % [95% CI] | n |"
    sep = "|---|---|---|---|"
    if stochastic:
        head += " majority % | single % |"
        sep += "---|---|"
    head += " seconds |"
    sep += "---|"
    lines = [f"**{table['title']}**", "", head, sep]
    for r in table["rows"]:
        line = (f"| {r['attack']} | {r['protocol']} | {_pct(r['accuracy'])} "
                f"[{_pct(r['ci'][0])}, {_pct(r['ci'][1])}] | {r['n']} |")
        if stochastic:
            line += f" {_pct(r['majority'])} | {_pct(r['single'])} |"
        line += f" {r['seconds']:.1f} |"
        lines.append(line)
    if stochastic:
        lines += ["", f"Stochastic model: *accuracy* counts an example only if all "
                  f"{table['repeats']} repeated predictions are correct; *majority* and "
                  "*single* are the majority-vote and one-prediction figures."]
    return "\n".join(lines)


def markdown_checks(checks: list[dict[str, Any]]) -> str:
    if not checks:
        return "_no checks were run_"
    lines = ["| check | result | detail | remedy |", "|---|---|---|---|"]
    for c in checks:
        status = {True: "pass", False: "**FAIL**", None: "n/a"}[c.get("passed")]
        detail = str(c.get("detail", "")).replace("|", "/").replace("\n", " ")
        remedy = "" if c.get("passed") else str(c.get("remedy", "")).replace("|", "/")
        lines.append(f"| {c['name']} | {status} | {detail} | {remedy} |")
    return "\n".join(lines)


def code_version() -> str:
    """The git commit of the package source (``+dirty`` if it has local changes), if known;
    ``$ADVDEFENSE_COMMIT`` names it where the source travelled without its git folder (a copy
    of a checkout on another machine)."""
    import os
    import subprocess

    if os.environ.get("ADVDEFENSE_COMMIT"):
        return os.environ["ADVDEFENSE_COMMIT"]
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit + ("+dirty" if dirty else "")) if commit else "unknown"


def _compute_minutes(sections: list[dict]) -> float:
    return sum((s.get("train_seconds") or 0.0) + (s.get("eval_seconds") or 0.0)
               for s in sections) / 60


def write_report(root: Path, *, title: str, command: str, seed: int, sections: list[dict],
                 curves: dict[str, list[dict]], intro: str = "", total_seconds: float) -> Path:
    """Write ``report.md`` + ``report.json`` + ``accuracy_vs_eps.png`` into ``root``."""
    from .evaluation.plots import plot_curves
    from .provenance import machine_line

    plot = plot_curves(curves, root / "accuracy_vs_eps.png",
                       title="PGD-20 accuracy vs eps (L-inf, 95% CI)") if curves else None
    summary = paired_summary(sections)
    lines = [f"# {title}", "", intro, "",
             f"- command: `{command}`", f"- seed: {seed}",
             f"- code: advdefense commit {code_version()}",
             f"- machine: {machine_line()}",
             f"- compute time, summed over the entries (training + evaluation, including "
             f"parts cached by earlier runs): {_compute_minutes(sections):.1f} min; "
             f"this invocation's wall time: {total_seconds / 60:.1f} min", ""]
    lines += paired_markdown(summary, sections)
    for sec in sections:
        lines += [f"## {sec['title']}", ""]
        if sec.get("notes"):
            lines += [sec["notes"], ""]
        if sec.get("code"):
            lines += [f"Evaluated with advdefense commit {sec['code']}"
                      + (f" on {sec['machine']}" if sec.get("machine") else "") + ".", ""]
        if (sec.get("training") or {}).get("machine"):
            lines += [f"Trained on {sec['training']['machine']}.", ""]
        if sec.get("train_seconds") is not None:
            lines += [f"Training took {sec['train_seconds']:.0f} s "
                      f"({_epochs_text(sec.get('training'))}); evaluation "
                      f"{sec.get('eval_seconds', 0):.0f} s.", ""]
        for block in sec.get("markdown", []):
            lines += [block, ""]
        for table in sec.get("tables", []):
            lines += [markdown_table(table), ""]
        if "paper_checks" not in sec:
            # cached before the two were kept apart: every check counts for the worst case
            if sec.get("checks"):
                lines += ["Attack-failure checks:", "", markdown_checks(sec["checks"]), ""]
        else:
            if sec["paper_checks"]:
                lines += ["Attack-failure checks on the paper protocol (a failure marks the "
                          "paper figure as an upper bound, not the worst case):", "",
                          markdown_checks(sec["paper_checks"]), ""]
            if sec.get("checks"):
                lines += ["Attack-failure checks on the adaptive evaluation (a failure marks "
                          "the worst case as an upper bound and withholds verdicts it could "
                          "flip):", "", markdown_checks(sec["checks"]), ""]
        for i, v in enumerate(sec.get("verdicts") or []):
            reasons = upper_bound_reasons(sec, v, i)
            if reasons:
                lines += [f"**Upper bound:** the worst case of {v['name']} "
                          f"({100 * sum(v['worst']) / max(1, len(v['worst'])):.1f}%) is only an "
                          f"upper bound ({', '.join(reasons)}); no verdict leans on it in a "
                          "direction it could flip.", ""]
    if plot is not None:
        lines += ["## Robust accuracy against eps", "", f"![accuracy vs eps]({plot.name})", ""]
    report = root / "report.md"
    report.write_text("\n".join(lines))
    (root / "report.json").write_text(json.dumps(
        {"title": title, "command": command, "seed": seed, "sections": sections,
         "curves": curves, "total_seconds": total_seconds, "paired": summary}, indent=1,
        default=str))
    return report


def _epochs_text(training: dict[str, Any] | None) -> str:
    if not training:
        return "epochs unknown"
    text = f"{training['epochs']} epochs"
    if training.get("early_stopping"):
        why = (f"stopped early, cap {training['cap']}" if training.get("stopped_early")
               else "the cap")
        if training.get("lr_decays"):
            why += f"; learning rate decayed {training['lr_decays']}x on plateaus"
        text += f" ({why}); evaluated: best val epoch {training.get('best_epoch')}"
    return text


def _examples(k: int) -> str:
    return f"{k} example" + ("" if k == 1 else "s")


def _acc_dict(flags: list[bool]) -> dict[str, Any]:
    from .evaluation.stats import accuracy

    acc = accuracy(torch.tensor(flags, dtype=torch.bool))
    return {"accuracy": acc.value, "ci": [acc.low, acc.high], "n": acc.n}


def _failed_names(checks: list[dict[str, Any]] | None) -> list[str]:
    return sorted({str(c["name"]) for c in checks or [] if c.get("passed") is False})


def _adaptive_of(sec: dict[str, Any], v: dict[str, Any], index: int) -> list[str]:
    """The adaptive attacks run on a verdict's model: recorded in the verdict, or (sections
    cached before verdicts recorded them) the rows of the section's cascade tables, which
    attacked the section's first model only."""
    if "adaptive" in v:
        return list(v["adaptive"] or [])
    if index > 0:
        return []
    return [r["attack"] for t in sec.get("tables") or []
            if "cascade" in str(t.get("title", "")).lower()
            for r in t.get("rows") or [] if r.get("attack") not in ("clean", "worst case")]


def upper_bound_reasons(sec: dict[str, Any], v: dict[str, Any], index: int = 0) -> list[str]:
    """Why a verdict's worst-case figure is only an upper bound (empty: it is not): the
    attack-failure checks that failed on its model (recorded per verdict, else the section's),
    and a model that faced no adaptive attack (DESIGN.md contract 4)."""
    reasons = list(v["checks"]) if "checks" in v else _failed_names(sec.get("checks"))
    if not _adaptive_of(sec, v, index):
        reasons.append("no adaptive attack on this model")
    return reasons


def paper_upper_bound_reasons(v: dict[str, Any]) -> list[str]:
    """Why a verdict's paper-protocol figure is only an upper bound: the checks that failed
    in its paper-protocol evaluation (``paper_checks``; weak by design, they say nothing
    about the worst case). Verdicts cached before they were kept apart have none: all their
    checks count for the worst case (:func:`upper_bound_reasons`)."""
    return list(v.get("paper_checks") or [])


def _paired(a: list[bool], b: list[bool], clusters: list[Any] | None) -> dict[str, Any]:
    """Exact McNemar of ``a`` against ``b``; with ``clusters`` also the sign-flip test over
    the clusters (:func:`~advdefense.evaluation.stats.cluster_sign_flip`)."""
    from .evaluation.stats import cluster_sign_flip, mcnemar_exact

    out: dict[str, Any] = {**mcnemar_exact(a, b).as_dict(), "method": "McNemar"}
    if clusters is not None:
        out["cluster"] = cluster_sign_flip(a, b, clusters).as_dict()
    return out


def _join_clusters(*ids: list[Any] | None) -> list[int] | None:
    """One integer cluster per distinct combination of the given cluster ids (``None``: no
    clustering); two examples share a cluster only if they share it in every list."""
    given = [c for c in ids if c is not None]
    if not given:
        return None
    index: dict[tuple, int] = {}
    return [index.setdefault(tuple(parts), len(index)) for parts in zip(*given, strict=True)]


def _vs_paper(v: dict[str, Any]) -> dict[str, Any]:
    """The worst case against the model's own paper-protocol figure. With ``paper_draws``
    (the paper protocol redrawn, e.g. RNA's path pairs) the test must hold at every draw:
    ``p`` is the largest of the per-draw McNemar p-values (an intersection-union test)."""
    clusters = v.get("clusters")
    test = _paired(v["worst"], v["paper"], clusters)
    draws = v.get("paper_draws") or []
    if len(draws) > 1:
        per = [_paired(v["worst"], d, None) for d in draws]
        accs = [sum(d) / len(d) for d in draws]
        test.update(p_value=max(t["p_value"] for t in per), method=(
            f"McNemar at each of {len(draws)} draws of the paper protocol (largest p)"),
                    draws=[{"accuracy": a, "p_value": t["p_value"]}
                           for a, t in zip(accs, per, strict=True)],
                    paper_range=[min(accs), max(accs)])
    return test


def _status(diff: float, p_holm: float, alpha: float, a_upper: list[str],
            b_upper: list[str]) -> tuple[str, str]:
    """``(status, why)`` of a comparison of figure ``a`` against figure ``b``: ``decided``
    (Holm-adjusted p < alpha, and no upper-bound figure could flip its direction),
    ``withheld`` (significant, but ``a`` is an upper bound and the result says ``a`` is
    higher, or ``b`` is and it says ``b`` is higher) or ``not decided``."""
    if not p_holm < alpha:
        return "not decided", ""
    if diff > 0 and a_upper:
        return "withheld", "its figure is an upper bound (" + ", ".join(a_upper) + ")"
    if diff < 0 and b_upper:
        return "withheld", ("the other figure is an upper bound (" + ", ".join(b_upper)
                            + ")")
    return "decided", ""


def paired_summary(sections: list[dict[str, Any]], *, alpha: float = 0.05) -> dict[str, Any]:
    """Paired statistics over the report's sections (those that carry ``verdicts``).

    For every verdict (one model at one training seed): paper-protocol and worst-case
    accuracy, whether the worst case is an upper bound (:func:`upper_bound_reasons`), and
    the exact McNemar test of the worst case against the paper-protocol figure of the same
    model (what the adaptive attacks took away; over every redraw of the paper protocol where
    there are several) and against the first verdict of each baseline group (its worst case,
    same examples; the baseline of the same training seed if present, else its first seed).
    Verdicts with ``clusters`` also get the sign-flip test over clusters. Every p-value of the
    report is adjusted with Holm's method (``p_holm``) and a comparison is ``decided`` only
    if its adjusted p is below ``alpha`` and no upper-bound figure could flip it.

    ``groups`` (:func:`seed_spread`): the seeds of every defense and the seeds it needs;
    ``verdicts``: per defense and comparison, the verdict over all its seeds (decided only if
    decided, in the same direction, at every seed, with enough seeds); ``spread``: the
    worst-case accuracy per seed of groups with several.
    """
    from .evaluation.stats import holm

    by_group: dict[str, list[dict[str, Any]]] = {}
    for sec in sections:
        if sec.get("verdicts") and sec.get("group"):
            by_group.setdefault(sec["group"], []).append(sec)

    def baseline_of(group: str, seed: Any) -> dict[str, Any] | None:
        candidates = by_group.get(group, [])
        same = [c for c in candidates if c.get("seed") == seed]
        return (same or candidates or [None])[0]

    rows = []
    for sec in sections:
        for i, v in enumerate(sec.get("verdicts") or []):
            upper = upper_bound_reasons(sec, v, i)
            training = sec.get("training") or {}
            row = {"key": sec.get("key"), "group": sec.get("group"), "seed": sec.get("seed"),
                   "arch": sec.get("arch"), "name": v["name"], "index": i,
                   "paper_label": v.get("paper_label", ""), "paper": _acc_dict(v["paper"]),
                   "worst": _acc_dict(v["worst"]), "training": sec.get("training"),
                   "monitor": {"label": training.get("monitor"),
                               "robust": training.get("monitor_robust"),
                               "clean": training.get("monitor_clean")},
                   "upper_bound": upper, "paper_upper_bound": paper_upper_bound_reasons(v),
                   "adaptive": _adaptive_of(sec, v, i),
                   "vs_paper": _vs_paper(v), "vs_baselines": []}
            for group in sec.get("baselines") or []:
                base = baseline_of(group, sec.get("seed"))
                if base is None:
                    row["vs_baselines"].append({"group": group, "missing": True})
                    continue
                bv = base["verdicts"][0]
                if len(bv["worst"]) != len(v["worst"]):
                    row["vs_baselines"].append({"group": group, "key": base.get("key"),
                                                "name": bv["name"], "missing": True,
                                                "why": "evaluated on different examples"})
                    continue
                test = _paired(v["worst"], bv["worst"],
                               _join_clusters(v.get("clusters"), bv.get("clusters")))
                row["vs_baselines"].append({
                    "group": group, "key": base.get("key"), "name": bv["name"],
                    "seed": base.get("seed"), "baseline_worst": _acc_dict(bv["worst"]),
                    "baseline_upper_bound": upper_bound_reasons(base, bv, 0), **test})
            rows.append(row)
    # Holm over every test of the report, then each comparison's status
    tests = [r["vs_paper"] for r in rows] + [b for r in rows for b in r["vs_baselines"]
                                             if not b.get("missing")]
    for t, adjusted in zip(tests, holm([t["p_value"] for t in tests]), strict=True):
        t["p_holm"] = adjusted
        t["decided"] = adjusted < alpha
    for r in rows:
        vp = r["vs_paper"]
        vp["status"], vp["why"] = _status(vp["difference"], vp["p_holm"], alpha,
                                          r["upper_bound"], [])
        for b in r["vs_baselines"]:
            if not b.get("missing"):
                b["status"], b["why"] = _status(b["difference"], b["p_holm"], alpha,
                                                r["upper_bound"], b["baseline_upper_bound"])
    groups = seed_spread(sections)
    spread = []
    for group, secs in by_group.items():
        if len(secs) < 2:
            continue
        for i, v in enumerate(secs[0]["verdicts"]):
            worst = [sum(s["verdicts"][i]["worst"]) / len(s["verdicts"][i]["worst"])
                     for s in secs if len(s["verdicts"]) > i]
            paper = [sum(s["verdicts"][i]["paper"]) / len(s["verdicts"][i]["paper"])
                     for s in secs if len(s["verdicts"]) > i]
            spread.append({"group": group, "name": v["name"],
                           "seeds": [s.get("seed") for s in secs], "worst": worst,
                           "paper": paper, "worst_mean": sum(worst) / len(worst),
                           "worst_range": max(worst) - min(worst)})
    return {"alpha": alpha, "rows": rows, "spread": spread, "groups": groups,
            "tests": len(tests), "verdicts": _over_seeds(rows, groups)}


def _over_seeds(rows: list[dict[str, Any]], groups: dict[str, dict[str, Any]]
                ) -> list[dict[str, Any]]:
    """One verdict per defense (group and verdict index) and comparison, over its seeds."""
    out: list[dict[str, Any]] = []
    index: dict[tuple, dict[str, Any]] = {}

    def entry(r: dict[str, Any], against: str, name: str) -> dict[str, Any]:
        k = (r["group"], r["index"], against)
        if k not in index:
            index[k] = {"group": r["group"], "index": r["index"], "name": r["name"],
                        "against": against, "against_name": name, "seeds": []}
            out.append(index[k])
        return index[k]

    for r in rows:
        if r["group"] is None:
            continue
        vp = r["vs_paper"]
        entry(r, "paper", "its own paper-protocol figure")["seeds"].append(
            {"seed": r["seed"], "difference": vp["difference"], "p_value": vp["p_value"],
             "p_holm": vp["p_holm"], "status": vp["status"], "why": vp["why"]})
        for b in r["vs_baselines"]:
            e = entry(r, b["group"], b.get("name", b["group"]))
            e["seeds"].append({"seed": r["seed"], "missing": True} if b.get("missing") else
                              {"seed": r["seed"], "difference": b["difference"],
                               "p_value": b["p_value"], "p_holm": b["p_holm"],
                               "status": b["status"], "why": b["why"]})
    for e in out:
        needs = [(e["group"], groups.get(e["group"]))]
        if e["against"] != "paper":
            needs.append((e["against"], groups.get(e["against"])))
        short = [f"{g}: {len(info['seeds']) if info else 0} of {info['required'] if info else 2}"
                 " training seeds" for g, info in needs if not (info and info["sufficient"])]
        seeds = e["seeds"]
        signs = {(s["difference"] > 0) - (s["difference"] < 0) for s in seeds
                 if not s.get("missing")}
        if short:
            e["verdict"], e["why"] = "insufficient seeds", "; ".join(short)
        elif any(s.get("missing") for s in seeds):
            e["verdict"], e["why"] = "undecided", "a baseline is missing at some seed"
        elif all(s["status"] == "decided" for s in seeds) and len(signs) == 1:
            sign = signs.pop()
            e["verdict"] = "decided"
            e["direction"] = "higher" if sign > 0 else "lower"
            e["why"] = f"at every one of {len(seeds)} seeds"
        else:
            e["verdict"] = "undecided"
            e["why"] = "; ".join(
                f"seed {s['seed']}: {s['status']}" + (f" ({s['why']})" if s["why"] else "")
                for s in seeds if s["status"] != "decided") or "the seeds disagree in direction"
    return out


def _p(p: float) -> str:
    return f"= {p:.2g}" if p >= 1e-4 else "< 1e-4"


def _figure(acc: dict[str, Any], upper: list[str]) -> str:
    text = (f"{100 * acc['accuracy']:.1f} [{100 * acc['ci'][0]:.1f}, "
            f"{100 * acc['ci'][1]:.1f}]")
    return f"≤ {text} (upper bound: {', '.join(upper)})" if upper else text


def _paper_mark(r: dict[str, Any]) -> str:
    """The suffix of a paper figure whose paper-protocol evaluation failed a check."""
    upper = r.get("paper_upper_bound") or []
    return f" (upper bound: {', '.join(upper)})" if upper else ""


def _monitor_text(r: dict[str, Any]) -> str:
    m = r.get("monitor") or {}
    if m.get("robust") is None and m.get("clean") is None:
        return "–"
    value = m["robust"] if m.get("robust") is not None else m["clean"]
    return f"{100 * value:.1f} ({m.get('label') or 'monitor'})"


def _cluster_text(t: dict[str, Any]) -> str:
    c = t.get("cluster")
    if not c:
        return ""
    return (f"; sign-flip over {c['clusters']} clusters p {_p(c['p_value'])} (smallest "
            f"attainable {c['min_p']:.2g})")


def _verdict_word(status: str, alpha: float) -> str:
    return {"decided": f"decided at the {100 * alpha:g}% level (Holm)",
            "withheld": "withheld",
            "not decided": f"**not** decided at the {100 * alpha:g}% level (Holm)"}[status]


def paired_markdown(summary: dict[str, Any], sections: list[dict[str, Any]]) -> list[str]:
    """The report's opening section: the verdict per defense over its seeds, the per-seed
    table with raw and Holm-adjusted p-values, one sentence per comparison, the seeds per
    defense and the epochs (and val monitor) of every entry."""
    lines: list[str] = []
    rows = summary.get("rows") or []
    alpha = summary.get("alpha", 0.05)
    if rows:
        lines += [
            "## Verdicts (paired, per example)", "",
            "Worst case = per example, correct under every attack run on the model (paper "
            "protocol and adaptive). p = exact two-sided McNemar test on the same test images; "
            f"p_Holm = Holm's adjustment over all {summary.get('tests', 0)} tests of this "
            f"report (decided: p_Holm < {alpha:g}). Δ in accuracy points. A worst case marked "
            "≤ is an upper bound (an attack-failure check failed on that model, or it faced no "
            "adaptive attack): no verdict is drawn in a direction it could flip. A defense's "
            f"verdict is decided only if it is decided at every training seed, with at least "
            f"{MIN_SEEDS} seeds ({MAX_SEEDS} where two seeds differ by more than "
            f"{100 * SEED_SPREAD:g} points). A paper figure followed by (upper bound: ...) "
            "failed a check on the paper protocol, weak by design: that marks the paper's "
            "number, not the worst case. Rules: docs/verdicts.md.", ""]
        verdicts = summary.get("verdicts") or []
        if verdicts:
            lines += ["### Verdict per defense, over its training seeds", "",
                      "| defense | compared with | seeds | Δ per seed | p → p_Holm per seed | "
                      "verdict |", "|---|---|---|---|---|---|"]
            for e in verdicts:
                done = [s for s in e["seeds"] if not s.get("missing")]
                deltas = ", ".join(f"{100 * s['difference']:+.1f}" for s in done) or "–"
                ps = ", ".join(f"{s['p_value']:.2g} → {s['p_holm']:.2g}" for s in done) or "–"
                if e["verdict"] == "decided":
                    if e["against"] == "paper":
                        claim = ("the paper protocol over-states it" if e["direction"] == "lower"
                                 else "the worst case is higher")
                    else:
                        claim = f"{e['direction']} than the baseline"
                    word = f"**decided: {claim}** ({e['why']})"
                else:
                    word = f"{e['verdict']}: {e['why']}"
                lines.append(f"| {e['name']} | {e['against_name']} | "
                             f"{', '.join(str(s['seed']) for s in e['seeds'])} | {deltas} | "
                             f"{ps} | {word} |")
            lines.append("")
        lines += [
            "### Per training seed", "",
            "| defense | seed | network | val monitor % (best epoch) | paper protocol % | "
            "worst case % [95% CI] | worst vs own paper figure: Δ, p, p_Holm | vs baseline "
            "(same network): Δ, p, p_Holm |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            vp = r["vs_paper"]
            own = (f"{100 * vp['difference']:+.1f}, p {_p(vp['p_value'])}, p_Holm "
                   f"{_p(vp['p_holm'])}")
            if vp.get("paper_range"):
                lo, hi = vp["paper_range"]
                own += (f" (largest p over {len(vp['draws'])} paper draws, paper "
                        f"{100 * lo:.1f}-{100 * hi:.1f})")
            own += _cluster_text(vp)
            vs = "; ".join(
                f"{b.get('name', b['group'])}: n/a ({b.get('why', 'not in this run')})"
                if b.get("missing")
                else f"{b['name']} ({_figure(b['baseline_worst'], b['baseline_upper_bound'])})"
                     f": {100 * b['difference']:+.1f}, p {_p(b['p_value'])}, p_Holm "
                     f"{_p(b['p_holm'])}{_cluster_text(b)}"
                for b in r["vs_baselines"]) or "–"
            lines.append(
                f"| {r['name']} | {r['seed']} | {r['arch'] or '–'} | {_monitor_text(r)} | "
                f"{100 * r['paper']['accuracy']:.1f}{_paper_mark(r)} | "
                f"{_figure(r['worst'], r['upper_bound'])} "
                f"| {own} | {vs} |")
        lines.append("")
        sentences = []
        for r in rows:
            for b in r["vs_baselines"]:
                if b.get("missing"):
                    continue
                verdict = _verdict_word(b["status"], alpha)
                if b["status"] == "withheld":
                    verdict += f": {b['why']}, so this direction cannot be claimed"
                elif b["status"] == "not decided":
                    verdict += ": these test images do not tell the two apart"
                sentences.append(
                    f"- {r['name']} (seed {r['seed']}) vs {b['name']} (seed {b['seed']}): "
                    f"worst case {100 * r['worst']['accuracy']:.1f}% vs "
                    f"{100 * b['baseline_worst']['accuracy']:.1f}% "
                    f"({100 * b['difference']:+.1f} points; {_examples(b['only_a'])} only the "
                    f"defense survives, {b['only_b']} only the baseline), p "
                    f"{_p(b['p_value'])}, p_Holm {_p(b['p_holm'])}: {verdict}.")
            vp = r["vs_paper"]
            if vp["status"] == "decided":
                what = ("the paper protocol over-states it (decided, Holm)"
                        if vp["difference"] < 0 else "the worst case is higher (decided)")
            elif vp["status"] == "withheld":
                what = f"withheld: {vp['why']}"
            else:
                what = "no decided difference"
            sentences.append(
                f"- {r['name']} (seed {r['seed']}), its paper-protocol figure "
                f"{100 * r['paper']['accuracy']:.1f}%{_paper_mark(r)} against its worst case "
                f"{100 * r['worst']['accuracy']:.1f}% ({_examples(vp['only_b'])} broken only by "
                f"attacks outside the paper's protocol), p {_p(vp['p_value'])}, p_Holm "
                f"{_p(vp['p_holm'])}: {what}.")
        lines += sentences + [""]
    groups = summary.get("groups") or {}
    spread = summary.get("spread") or []
    if groups:
        lines += ["### Spread over training seeds", "",
                  "| defense | seeds | worst case % per seed | mean | range (points) | "
                  "paper protocol % per seed | seeds needed |", "|---|---|---|---|---|---|---|"]
        names = {(sp["group"], sp["name"]): sp for sp in spread}
        for r in rows:
            if r["group"] not in groups or r["seed"] != groups[r["group"]]["seeds"][0]:
                continue
            g = groups[r["group"]]
            need = (f"{g['required']}" + ("" if g["sufficient"] else
                                          f" (**insufficient: {len(g['seeds'])}**)"))
            sp = names.get((r["group"], r["name"]))
            if sp is None:
                lines.append(f"| {r['name']} | {r['seed']} | "
                             f"{100 * r['worst']['accuracy']:.1f} | – | – | "
                             f"{100 * r['paper']['accuracy']:.1f} | {need} |")
                continue
            lines.append(
                f"| {sp['name']} | {', '.join(map(str, sp['seeds']))} | "
                f"{', '.join(f'{100 * w:.1f}' for w in sp['worst'])} | "
                f"{100 * sp['worst_mean']:.1f} | {100 * sp['worst_range']:.1f} | "
                f"{', '.join(f'{100 * w:.1f}' for w in sp['paper'])} | {need} |")
        lines.append("")
    trained = [s for s in sections if s.get("training")]
    if trained:
        decays = any("lr_decays" in s["training"] for s in trained)
        lines += ["### Training: epochs per entry", "",
                  "| entry | epochs trained | cap | stopped early | "
                  + ("learning-rate decays | " if decays else "") + "evaluated epoch | "
                  "val monitor at that epoch | training s |",
                  "|---|---|---|---|---|---|---|" + ("---|" if decays else "")]
        for s in trained:
            t = s["training"]
            es = t.get("early_stopping")
            value = t.get("best_value")
            metric = (f"{es['metric']} {100 * value:.1f}%" if es and value is not None
                      else "–")
            if t.get("monitor"):
                metric += f" ({t['monitor']})"
            lines.append(
                f"| {s['title']} | {t['epochs']} | {t['cap']} | "
                f"{('yes' if t.get('stopped_early') else 'no') if es else '–'} | "
                + (f"{t.get('lr_decays', '–')} | " if decays else "")
                + f"{t.get('best_epoch') if es else t['epochs']} | "
                f"{metric} | "
                f"{s.get('train_seconds') or 0:.0f} |")
        lines += ["", "Early stopping (every entry): "
                  + "; ".join(sorted({_rule_text(s['training']['early_stopping'])
                                      for s in trained
                                      if s['training'].get('early_stopping')}))
                  + (". Where the schedule is `plateau`, the first plateaus of the rule "
                     "multiply the learning rate by its gamma instead of stopping (the "
                     "learning-rate decays column)" if decays else "")
                  + ". The checkpoint of the best val epoch is the one evaluated. The monitor "
                  "of a random model attacks with EOT and counts an example only if all its "
                  "repeated predictions are correct; a CAS model's monitor attacks main + "
                  "β·aux.", ""]
    return lines


def _rule_text(rule: dict[str, Any]) -> str:
    return (f"{rule['metric']} on the val split, patience {rule['patience']} epochs, "
            f"min_delta {100 * rule['min_delta']:g} points")


def _evaluation_digests(plan: Plan, *, n_eval: int, curve_eps: list[float] | None,
                        training: dict[str, Any]) -> tuple[str, str, dict[str, Any] | None]:
    """``(digest, legacy digest, evaluation description)`` of an entry's evaluation: what a
    cached evaluation depends on (the experiment, the evaluated epoch, the examples, the
    evaluation options and the evaluation itself: its description, with kind, version, budget
    and every attack). A raised epoch cap alone changes none of them when the evaluated (best)
    epoch stays the same."""
    base = {"config": _comparable(plan.config), "n": n_eval, "curve": curve_eps,
            "epoch": training.get("best_epoch") or training.get("epochs"),
            "extra": {k: v for k, v in plan.extra.items() if not callable(v)}}
    describe = getattr(plan.evaluate, "describe", None)
    evaluation = describe(plan) if callable(describe) else None
    legacy_digest = _digest(base)
    digest = legacy_digest if evaluation is None else _digest({**base,
                                                                "evaluation": evaluation})
    return digest, legacy_digest, evaluation


def config_digest(plan: Plan) -> str:
    """The digest of the experiment a plan trains (its config without the output folder, the
    epoch cap and the early-stopping rule, as :func:`train_plan` compares them)."""
    return _digest(_comparable(plan.config))


def _run_section(section: dict[str, Any], plan: Plan, *, train_seconds, training
                 ) -> dict[str, Any]:
    section.update(title=plan.title, notes=plan.notes, train_seconds=train_seconds,
                   training=training, key=plan.key,
                   **{k: plan.extra[k] for k in ("group", "seed", "arch", "baselines")
                      if k in plan.extra})
    return section


def _zoo_config(plan: Plan, preset: str) -> dict[str, Any]:
    from .config import config_from_dict, to_dict

    cfg = copy.deepcopy(plan.config)
    cfg["output_dir"] = f"runs/reproduce_{preset}/{plan.key}"
    return to_dict(config_from_dict(cfg))


def evaluate_entry(plan: Plan, root: Path, *, seed: int, n_eval: int,
                   curve_eps: list[float] | None = None, progress: bool = False,
                   train_only: bool = False, device: str | None = None, zoo=None
                   ) -> dict[str, Any] | None:
    """Train (or reuse) one entry's model and evaluate it (or reuse ``evaluation.json``).

    ``zoo`` (a :class:`~advdefense.zoo.Zoo`): an entry found there with this plan's config
    is not trained again (its weights are loaded), and its evaluation is reused when its
    digest matches; with ``zoo.write`` a finished entry is copied into the zoo (or its record
    updated). Returns the entry's report section, or None with ``train_only``.
    """
    from .data import as_tensors, load_split
    from .provenance import machine_line

    log.info("== %s", plan.title)
    group, run_seed = plan.extra.get("group", plan.key), int(plan.config["seed"])
    cfg_digest = config_digest(plan)
    stored = zoo.find(group, run_seed, cfg_digest) if zoo is not None else None
    if stored is not None:
        training, train_seconds = stored.training, stored.train_seconds
        digest, legacy_digest, evaluation = _evaluation_digests(
            plan, n_eval=n_eval, curve_eps=curve_eps, training=training)
        if train_only:
            return None
        if stored.section.get("digest") == digest:
            log.info("%s: model and evaluation from the zoo (%s)", plan.key, stored.folder)
            section = {k: v for k, v in stored.section.items() if k not in RUN_FIELDS}
            return _run_section(section, plan, train_seconds=train_seconds,
                                training=training)
        log.info("%s: model from the zoo (%s), evaluating", plan.key, stored.folder)
        model, cfg = stored.load_model(device or ("cuda" if torch.cuda.is_available()
                                                  else "cpu"))
    else:
        model, cfg, train_seconds, training = train_plan(plan, root, progress=progress,
                                                         device=device)
        if train_only:
            return None
        digest, legacy_digest, evaluation = _evaluation_digests(
            plan, n_eval=n_eval, curve_eps=curve_eps, training=training)
    cache = root / plan.key / "evaluation.json"
    section = None
    if cache.exists():
        section = json.loads(cache.read_text())
        if section.get("digest") == digest:
            pass
        elif ("evaluation" not in section and evaluation is not None
              and evaluation.get("legacy") and section.get("digest") == legacy_digest):
            # cached before sections recorded their evaluation, by an evaluation that has not
            # changed since (Evaluator.describe): kept, and recorded from now on
            section.update(digest=digest, evaluation=evaluation)
            atomic_write_text(cache, json.dumps(section, default=str))
        else:
            log.info("%s: evaluation options or model changed; evaluating again", plan.key)
            section = None
    x = y = None
    if section is None or (zoo is not None and zoo.write):
        x, y = as_tensors(load_split(cfg.data.name, "test", root=cfg.data.root))
        x, y = x[:n_eval], y[:n_eval]
    if section is None:
        t0 = time.perf_counter()
        section = plan.evaluate(model, x, y, plan)
        if curve_eps and not plan.extra.get("skip_curve"):
            section["curve"] = eps_curve(model, x, y, curve_eps, seed=seed,
                                         **plan.extra.get("curve", {}))
        section["eval_seconds"] = time.perf_counter() - t0
        section["code"] = code_version()
        section["machine"] = machine_line(next(model.parameters(), torch.empty(0)).device)
        section["digest"] = digest
        section["evaluation"] = evaluation
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache, json.dumps(section, default=str))
    section = _run_section(section, plan, train_seconds=train_seconds, training=training)
    if zoo is not None and zoo.write and (stored is None
                                          or stored.section.get("digest") != digest):
        from .zoo import probe_images

        epoch = training.get("best_epoch") or training.get("epochs")
        zoo.save(group, run_seed, model=model, config=_zoo_config(plan, zoo.preset),
                 config_digest=cfg_digest, section=section, epoch=epoch,
                 probes=probe_images(x, plan.extra.get("eps", cfg.train.attack.eps),
                                     seed=run_seed))
    return section


def _entry_worker(rebuild: Callable[[], list[Plan]], key: str, root: Path, threads: int,
                  options: dict[str, Any]) -> str:
    """One entry in a worker process (``run_plans(jobs=N)``): plans hold closures, so the
    worker rebuilds them with ``rebuild`` (a picklable module-level callable)."""
    # force: a worker runs several entries, each line names the current one
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [{key}] %(message)s",
                        datefmt="%H:%M:%S", force=True)
    torch.set_num_threads(threads)
    plan = find_plan(rebuild(), key)
    evaluate_entry(plan, root, **options)
    return key


# Training seeds of every verdict: at least MIN_SEEDS, and MAX_SEEDS where two of them differ
# by more than SEED_SPREAD in worst-case accuracy (run_plans adds the seed).
MIN_SEEDS, MAX_SEEDS, SEED_SPREAD = 2, 3, 0.05


def seed_variant(plan: Plan, seed: int) -> Plan:
    """``plan``'s experiment with another training seed: key ``<group>_s<seed>``, no eps curve
    (the first seed plots it)."""
    group = plan.extra.get("group", plan.key)
    key = f"{group}_s{seed}"
    config = copy.deepcopy(plan.config)
    config.update(seed=int(seed), name=key)
    extra = {**copy.deepcopy(plan.extra), "group": group, "seed": int(seed),
             "skip_curve": True}
    title = f"{plan.extra.get('verdict_name', plan.title)} (seed {seed})"
    return Plan(key, title, config, plan.evaluate, notes=plan.notes, extra=extra,
                cost=plan.cost)


def find_plan(plans: list[Plan], key: str) -> Plan:
    """The plan called ``key``, or the seed variant ``<group>_s<seed>`` of a group's first
    plan (an extra seed :func:`extra_seed_plans` added)."""
    for p in plans:
        if p.key == key:
            return p
    group, _, seed = key.rpartition("_s")
    first = next((p for p in plans if p.extra.get("group", p.key) == group), None)
    if first is None or not seed.isdigit():
        raise KeyError(f"no entry {key!r} in the plans")
    return seed_variant(first, int(seed))


def seed_spread(sections: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per group with verdicts: its training seeds, worst-case accuracy per seed (per verdict
    of the section), the largest range over seeds and the seeds a verdict needs."""
    out: dict[str, dict[str, Any]] = {}
    for sec in sections:
        if sec.get("verdicts") and sec.get("group"):
            g = out.setdefault(sec["group"], {"seeds": [], "worst": []})
            g["seeds"].append(sec.get("seed"))
            g["worst"].append([sum(v["worst"]) / max(1, len(v["worst"]))
                               for v in sec["verdicts"]])
    for g in out.values():
        ranges = [max(col) - min(col) for col in zip(*g["worst"], strict=False)] or [0.0]
        g["range"] = max(ranges) if len(g["worst"]) > 1 else 0.0
        g["required"] = MAX_SEEDS if g["range"] > SEED_SPREAD + 1e-12 else MIN_SEEDS
        g["sufficient"] = len(g["seeds"]) >= g["required"]
    return out


def extra_seed_plans(plans: list[Plan], sections: list[dict[str, Any]]) -> list[Plan]:
    """A further training seed for every group whose seeds differ by more than
    :data:`SEED_SPREAD` in worst-case accuracy and that has fewer than :data:`MAX_SEEDS`
    (and at least :data:`MIN_SEEDS`: a single-seed run stays one, marked insufficient)."""
    more = []
    for group, g in seed_spread(sections).items():
        seeds = [s for s in g["seeds"] if isinstance(s, int)]
        if g["sufficient"] or not (MIN_SEEDS <= len(seeds) < MAX_SEEDS):
            continue
        first = next((p for p in plans if p.extra.get("group", p.key) == group), None)
        if first is not None:
            more.append(seed_variant(first, max(seeds) + 1))
    return more


def _run_parallel(plans: list[Plan], root: Path, *, jobs: int,
                  rebuild: Callable[[], list[Plan]], options: dict[str, Any]) -> None:
    """Run the entries in ``jobs`` spawned processes, longest (``Plan.cost``) first, each with
    ``torch.get_num_threads() // jobs`` threads; results land in each entry's cache."""
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    threads = max(1, torch.get_num_threads() // jobs)
    order = sorted(plans, key=lambda p: -p.cost)
    log.info("running %d entries in %d processes x %d threads", len(order), jobs, threads)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = [pool.submit(_entry_worker, rebuild, p.key, root, threads,
                               {**options, "progress": False}) for p in order]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for fut in pending:
            fut.cancel()
        for fut in done:
            fut.result()  # re-raises a worker's error in the parent


def run_plans(plans: list[Plan], root: Path, *, title: str, command: str, seed: int,
              intro: str = "", curve_eps: list[float] | None = None, n_eval: int = 500,
              progress: bool = False, train_only: bool = False, jobs: int = 1,
              rebuild: Callable[[], list[Plan]] | None = None,
              device: str | None = None, add_seeds: bool = True, zoo=None) -> Path | None:
    """Train and evaluate every plan, then write one report into ``root``.

    ``train_only`` trains (or resumes) every model and stops before evaluating (returns None).
    ``jobs > 1`` runs the entries in that many processes first (``rebuild`` must then be a
    picklable callable returning the same plans); the report is assembled from their caches.
    ``add_seeds``: where two training seeds of an entry differ by more than
    :data:`SEED_SPREAD` in worst-case accuracy, a third seed is trained and evaluated
    (:func:`extra_seed_plans`) before the report is written. ``zoo`` (a
    :class:`~advdefense.zoo.Zoo`): entries found there with the same config and evaluation
    are neither trained nor evaluated again, and (``zoo.write``) every entry is copied there
    as it finishes, so a stopped run continues from the zoo where ``root`` is empty.
    """
    root.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    options = dict(seed=seed, n_eval=n_eval, curve_eps=curve_eps, train_only=train_only,
                   device=device, zoo=zoo)

    def run(batch: list[Plan]) -> list[dict[str, Any]]:
        if jobs > 1 and len(batch) > 1:
            if rebuild is None:
                raise ValueError("run_plans(jobs > 1) needs rebuild= to recreate the plans")
            _run_parallel(batch, root, jobs=jobs, rebuild=rebuild, options=options)
        out = []
        for plan in batch:
            section = evaluate_entry(plan, root, progress=progress, **options)
            if section is not None:
                out.append(section)
        return out

    sections = run(plans)
    if train_only:
        return None
    if add_seeds:
        for section in run(extra_seed_plans(plans, sections)):
            # after the last section of its group, so the report keeps groups together
            last = max(i for i, s in enumerate(sections) if s.get("group") == section["group"])
            sections.insert(last + 1, section)
    curves = {s["title"]: s["curve"] for s in sections if s.get("curve")}
    return write_report(root, title=title, command=command, seed=seed, sections=sections,
                        curves=curves, intro=intro,
                        total_seconds=time.perf_counter() - t_start)
