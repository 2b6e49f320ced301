"""Train-then-evaluate pipelines behind ``advdefense demo`` and ``advdefense reproduce``.

A *preset* is a list of :class:`Plan` entries, each a full experiment config (saved next to its
checkpoint) plus how to evaluate the trained model. Every step is resumable: a model whose
checkpoint already holds all epochs (or whose early stopping has stopped) is not retrained,
and a half-trained one resumes from its last epoch; evaluations are cached as JSON next to
the checkpoint. With ``train.early_stopping`` the best val epoch (``best.pt``) is evaluated.

The report opens with the verdicts: per defense, its paper-protocol and worst-case accuracy,
the exact McNemar test of its worst case against its baselines (PGD-AT on the same network,
the recipe without CAS) and against its own paper-protocol figure, the epochs each entry
trained, and the spread over training seeds (:func:`paired_summary`).
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
    from .training.early_stopping import stopping_state

    history = list((checkpoint.get("metrics") or {}).get("history", []))
    out: dict[str, Any] = {"epochs": int(checkpoint.get("epoch", len(history))),
                           "cap": int(cfg.train.epochs), "early_stopping": None,
                           "checkpoint": "last.pt"}
    rule = cfg.train.early_stopping
    if rule is not None and history:
        state = stopping_state(history, rule)
        out.update(early_stopping={"metric": rule.metric, "patience": rule.patience,
                                   "min_delta": rule.min_delta},
                   best_epoch=state.best_epoch, best_value=state.best_value,
                   stopped_early=state.stop, checkpoint="best.pt")
    return out


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
        try:
            saved = load_checkpoint(ckpt)
            if _comparable(saved.get("config")) != _comparable(to_dict(cfg)):
                # another experiment in this folder (e.g. an older version of the preset)
                log.warning("%s was trained with another config; training %s from scratch",
                            ckpt, plan.key)
                resume = False
                for stale in ("best.pt", "evaluation.json"):
                    (out / stale).unlink(missing_ok=True)
            else:
                done = _finished(saved, cfg)
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
    """The git commit of the package source (``+dirty`` if it has local changes), if known."""
    import subprocess

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
            lines += [f"Evaluated with advdefense commit {sec['code']}.", ""]
        if sec.get("train_seconds") is not None:
            lines += [f"Training took {sec['train_seconds']:.0f} s "
                      f"({_epochs_text(sec.get('training'))}); evaluation "
                      f"{sec.get('eval_seconds', 0):.0f} s.", ""]
        for block in sec.get("markdown", []):
            lines += [block, ""]
        for table in sec.get("tables", []):
            lines += [markdown_table(table), ""]
        if sec.get("checks"):
            lines += ["Attack-failure checks:", "", markdown_checks(sec["checks"]), ""]
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
        text += f" ({why}); evaluated: best val epoch {training.get('best_epoch')}"
    return text


def _examples(k: int) -> str:
    return f"{k} example" + ("" if k == 1 else "s")


def _acc_dict(flags: list[bool]) -> dict[str, Any]:
    from .evaluation.stats import accuracy

    acc = accuracy(torch.tensor(flags, dtype=torch.bool))
    return {"accuracy": acc.value, "ci": [acc.low, acc.high], "n": acc.n}


def paired_summary(sections: list[dict[str, Any]], *, alpha: float = 0.05) -> dict[str, Any]:
    """Paired statistics over the report's sections (those that carry ``verdicts``).

    For every verdict: paper-protocol and worst-case accuracy; the exact McNemar test of the
    worst case against the paper-protocol figure of the same model (what the adaptive attacks
    took away) and against the first verdict of each baseline group (its worst case, same
    examples; the baseline of the same training seed if present, else its first seed). For
    groups with several seeds, the worst-case accuracy per seed, its mean and its range.
    """
    from .evaluation.stats import mcnemar_exact

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
            test = mcnemar_exact(v["worst"], v["paper"])
            row = {"key": sec.get("key"), "group": sec.get("group"), "seed": sec.get("seed"),
                   "arch": sec.get("arch"), "name": v["name"], "index": i,
                   "paper_label": v.get("paper_label", ""), "paper": _acc_dict(v["paper"]),
                   "worst": _acc_dict(v["worst"]), "training": sec.get("training"),
                   "vs_paper": {**test.as_dict(), "decided": test.decided(alpha)},
                   "vs_baselines": []}
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
                t = mcnemar_exact(v["worst"], bv["worst"])
                row["vs_baselines"].append({
                    "group": group, "key": base.get("key"), "name": bv["name"],
                    "seed": base.get("seed"), "baseline_worst": _acc_dict(bv["worst"]),
                    **t.as_dict(), "decided": t.decided(alpha)})
            rows.append(row)
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
    return {"alpha": alpha, "rows": rows, "spread": spread}


def _p(p: float) -> str:
    return f"= {p:.2g}" if p >= 1e-4 else "< 1e-4"


def paired_markdown(summary: dict[str, Any], sections: list[dict[str, Any]]) -> list[str]:
    """The report's opening section: verdict table, one sentence per comparison, seed spread
    and the epochs of every entry."""
    lines: list[str] = []
    rows = summary.get("rows") or []
    alpha = summary.get("alpha", 0.05)
    if rows:
        lines += [
            "## Verdicts (paired, per example)", "",
            "Worst case = per example, correct under every attack run on the model (paper "
            "protocol and adaptive). p = exact two-sided McNemar test on the same test images "
            f"(decided: p < {alpha:g}). Δ in accuracy points.", "",
            "| defense | seed | network | paper protocol % | worst case % [95% CI] | worst vs "
            "own paper figure: Δ, p | vs baseline (same network): Δ, p |",
            "|---|---|---|---|---|---|---|"]
        for r in rows:
            w = r["worst"]
            vs = "; ".join(
                f"{b.get('name', b['group'])}: n/a ({b.get('why', 'not in this run')})"
                if b.get("missing")
                else f"{b['name']} ({100 * b['baseline_worst']['accuracy']:.1f}): "
                     f"{100 * b['difference']:+.1f}, p {_p(b['p_value'])}"
                for b in r["vs_baselines"]) or "–"
            lines.append(
                f"| {r['name']} | {r['seed']} | {r['arch'] or '–'} | "
                f"{100 * r['paper']['accuracy']:.1f} | {100 * w['accuracy']:.1f} "
                f"[{100 * w['ci'][0]:.1f}, {100 * w['ci'][1]:.1f}] | "
                f"{100 * r['vs_paper']['difference']:+.1f}, p {_p(r['vs_paper']['p_value'])} "
                f"| {vs} |")
        lines.append("")
        sentences = []
        for r in rows:
            for b in r["vs_baselines"]:
                if b.get("missing"):
                    continue
                verdict = (f"decided at the {100 * alpha:g}% level" if b["decided"] else
                           f"**not** decided at the {100 * alpha:g}% level: these test images "
                           "do not tell the two apart")
                sentences.append(
                    f"- {r['name']} (seed {r['seed']}) vs {b['name']} (seed {b['seed']}): "
                    f"worst case {100 * r['worst']['accuracy']:.1f}% vs "
                    f"{100 * b['baseline_worst']['accuracy']:.1f}% "
                    f"({100 * b['difference']:+.1f} points; {_examples(b['only_a'])} only the "
                    f"defense survives, {b['only_b']} only the baseline), p "
                    f"{_p(b['p_value'])}: {verdict}.")
            vp = r["vs_paper"]
            sentences.append(
                f"- {r['name']} (seed {r['seed']}), its paper-protocol figure "
                f"{100 * r['paper']['accuracy']:.1f}% against its worst case "
                f"{100 * r['worst']['accuracy']:.1f}% ({_examples(vp['only_b'])} broken only by "
                f"attacks outside the paper's protocol), p {_p(vp['p_value'])}: "
                + ("the paper protocol over-states it (decided)." if vp["decided"] else
                   "no decided difference."))
        lines += sentences + [""]
    spread = summary.get("spread") or []
    if spread:
        lines += ["### Spread over training seeds", "",
                  "| defense | seeds | worst case % per seed | mean | range (points) | "
                  "paper protocol % per seed |", "|---|---|---|---|---|---|"]
        for sp in spread:
            lines.append(
                f"| {sp['name']} | {', '.join(map(str, sp['seeds']))} | "
                f"{', '.join(f'{100 * w:.1f}' for w in sp['worst'])} | "
                f"{100 * sp['worst_mean']:.1f} | {100 * sp['worst_range']:.1f} | "
                f"{', '.join(f'{100 * w:.1f}' for w in sp['paper'])} |")
        lines.append("")
    trained = [s for s in sections if s.get("training")]
    if trained:
        lines += ["### Training: epochs per entry", "",
                  "| entry | epochs trained | cap | stopped early | evaluated epoch | "
                  "val metric at that epoch | training s |", "|---|---|---|---|---|---|---|"]
        for s in trained:
            t = s["training"]
            es = t.get("early_stopping")
            value = t.get("best_value")
            metric = (f"{es['metric']} {100 * value:.1f}%" if es and value is not None
                      else "–")
            lines.append(
                f"| {s['title']} | {t['epochs']} | {t['cap']} | "
                f"{('yes' if t.get('stopped_early') else 'no') if es else '–'} | "
                f"{t.get('best_epoch') if es else t['epochs']} | "
                f"{metric} | "
                f"{s.get('train_seconds') or 0:.0f} |")
        lines += ["", "Early stopping (every entry): "
                  + "; ".join(sorted({_rule_text(s['training']['early_stopping'])
                                      for s in trained
                                      if s['training'].get('early_stopping')}))
                  + ". The checkpoint of the best val epoch is the one evaluated.", ""]
    return lines


def _rule_text(rule: dict[str, Any]) -> str:
    return (f"{rule['metric']} on the val split, patience {rule['patience']} epochs, "
            f"min_delta {100 * rule['min_delta']:g} points")


def evaluate_entry(plan: Plan, root: Path, *, seed: int, n_eval: int,
                   curve_eps: list[float] | None = None, progress: bool = False,
                   train_only: bool = False, device: str | None = None
                   ) -> dict[str, Any] | None:
    """Train (or reuse) one entry's model and evaluate it (or reuse ``evaluation.json``).

    Returns the entry's report section, or None with ``train_only``.
    """
    from .data import as_tensors, load_split

    log.info("== %s", plan.title)
    model, cfg, train_seconds, training = train_plan(plan, root, progress=progress,
                                                     device=device)
    if train_only:
        return None
    cache = root / plan.key / "evaluation.json"
    # what the cached evaluation depends on: the experiment, the evaluated epoch, the examples
    # and the evaluation options (a changed one re-evaluates); a raised epoch cap alone does
    # not, when the evaluated (best) epoch stays the same
    digest = _digest({"config": _comparable(plan.config), "n": n_eval, "curve": curve_eps,
                      "epoch": training.get("best_epoch") or training.get("epochs"),
                      "extra": {k: v for k, v in plan.extra.items() if not callable(v)}})
    section = None
    if cache.exists():
        section = json.loads(cache.read_text())
        if section.get("digest") != digest:
            log.info("%s: evaluation options or model changed; evaluating again", plan.key)
            section = None
    if section is None:
        x, y = as_tensors(load_split(cfg.data.name, "test", root=cfg.data.root))
        x, y = x[:n_eval], y[:n_eval]
        t0 = time.perf_counter()
        section = plan.evaluate(model, x, y, plan)
        if curve_eps and not plan.extra.get("skip_curve"):
            section["curve"] = eps_curve(model, x, y, curve_eps, seed=seed,
                                         **plan.extra.get("curve", {}))
        section["eval_seconds"] = time.perf_counter() - t0
        section["code"] = code_version()
        section["digest"] = digest
        atomic_write_text(cache, json.dumps(section, default=str))
    section.update(title=plan.title, notes=plan.notes, train_seconds=train_seconds,
                   training=training, key=plan.key,
                   **{k: plan.extra[k] for k in ("group", "seed", "arch", "baselines")
                      if k in plan.extra})
    return section


def _entry_worker(rebuild: Callable[[], list[Plan]], key: str, root: Path, threads: int,
                  options: dict[str, Any]) -> str:
    """One entry in a worker process (``run_plans(jobs=N)``): plans hold closures, so the
    worker rebuilds them with ``rebuild`` (a picklable module-level callable)."""
    # force: a worker runs several entries, each line names the current one
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [{key}] %(message)s",
                        datefmt="%H:%M:%S", force=True)
    torch.set_num_threads(threads)
    plan = next(p for p in rebuild() if p.key == key)
    evaluate_entry(plan, root, **options)
    return key


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
              device: str | None = None) -> Path | None:
    """Train and evaluate every plan, then write one report into ``root``.

    ``train_only`` trains (or resumes) every model and stops before evaluating (returns None).
    ``jobs > 1`` runs the entries in that many processes first (``rebuild`` must then be a
    picklable callable returning the same plans); the report is assembled from their caches.
    """
    root.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    options = dict(seed=seed, n_eval=n_eval, curve_eps=curve_eps, train_only=train_only,
                   device=device)
    if jobs > 1 and len(plans) > 1:
        if rebuild is None:
            raise ValueError("run_plans(jobs > 1) needs rebuild= to recreate the plans")
        _run_parallel(plans, root, jobs=jobs, rebuild=rebuild, options=options)
    sections, curves = [], {}
    for plan in plans:
        section = evaluate_entry(plan, root, progress=progress, **options)
        if section is None:
            continue
        if section.get("curve"):
            curves[plan.title] = section["curve"]
        sections.append(section)
    if train_only:
        return None
    return write_report(root, title=title, command=command, seed=seed, sections=sections,
                        curves=curves, intro=intro,
                        total_seconds=time.perf_counter() - t_start)
