"""Train-then-evaluate pipelines behind ``advdefense demo`` and ``advdefense reproduce``.

A *preset* is a list of :class:`Plan` entries, each a full experiment config (saved next to its
checkpoint) plus how to evaluate the trained model. Every step is resumable: a model whose
checkpoint already holds all epochs is not retrained, and a half-trained one resumes from its
last epoch; evaluations are cached as JSON next to the checkpoint.
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


def train_plan(plan: Plan, root: Path, *, progress: bool = False, device: str | None = None):
    """Train (or resume, or reuse) the plan's model; returns ``(model, cfg, seconds)`` where
    ``seconds`` is the training time recorded over all epochs (not just this call's).
    ``device``: where to train and load the model (``None``: CUDA if available, else CPU)."""
    from .config import config_from_dict
    from .training.checkpoint import load_checkpoint, load_model_from_checkpoint
    from .training.trainer import Trainer

    cfg_dict = copy.deepcopy(plan.config)
    cfg_dict["output_dir"] = str(root / plan.key)
    cfg = config_from_dict(cfg_dict)
    ckpt = Path(cfg.output_dir) / "last.pt"
    t0 = time.perf_counter()
    done = False
    if ckpt.exists():
        try:
            # "epoch" counts completed epochs
            done = int(load_checkpoint(ckpt).get("epoch", 0)) >= cfg.train.epochs
        except Exception:  # a broken checkpoint is retrained from scratch below
            done = False
    if not done:
        trainer = Trainer(cfg, progress=progress, device=device)
        try:
            trainer.fit(resume=ckpt.exists())
        finally:
            trainer.close()
    model, cfg = load_model_from_checkpoint(
        ckpt, map_location=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    recorded = recorded_train_seconds(cfg.output_dir)
    return model, cfg, recorded if recorded is not None else time.perf_counter() - t0


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
    lines = [f"# {title}", "", intro, "",
             f"- command: `{command}`", f"- seed: {seed}",
             f"- code: advdefense commit {code_version()}",
             f"- machine: {machine_line()}",
             f"- compute time, summed over the entries (training + evaluation, including "
             f"parts cached by earlier runs): {_compute_minutes(sections):.1f} min; "
             f"this invocation's wall time: {total_seconds / 60:.1f} min", ""]
    for sec in sections:
        lines += [f"## {sec['title']}", ""]
        if sec.get("notes"):
            lines += [sec["notes"], ""]
        if sec.get("code"):
            lines += [f"Evaluated with advdefense commit {sec['code']}.", ""]
        if sec.get("train_seconds") is not None:
            lines += [f"Training took {sec['train_seconds']:.0f} s; evaluation "
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
         "curves": curves, "total_seconds": total_seconds}, indent=1, default=str))
    return report


def evaluate_entry(plan: Plan, root: Path, *, seed: int, n_eval: int,
                   curve_eps: list[float] | None = None, progress: bool = False,
                   train_only: bool = False, device: str | None = None
                   ) -> dict[str, Any] | None:
    """Train (or reuse) one entry's model and evaluate it (or reuse ``evaluation.json``).

    Returns the entry's report section, or None with ``train_only``.
    """
    from .data import as_tensors, load_split

    log.info("== %s", plan.title)
    model, cfg, train_seconds = train_plan(plan, root, progress=progress, device=device)
    if train_only:
        return None
    cache = root / plan.key / "evaluation.json"
    if cache.exists():
        section = json.loads(cache.read_text())
    else:
        x, y = as_tensors(load_split(cfg.data.name, "test", root=cfg.data.root))
        x, y = x[:n_eval], y[:n_eval]
        t0 = time.perf_counter()
        section = plan.evaluate(model, x, y, plan)
        if curve_eps:
            section["curve"] = eps_curve(model, x, y, curve_eps, seed=seed,
                                         **plan.extra.get("curve", {}))
        section["eval_seconds"] = time.perf_counter() - t0
        section["code"] = code_version()
        atomic_write_text(cache, json.dumps(section, default=str))
    section.update(title=plan.title, notes=plan.notes, train_seconds=train_seconds)
    return section


def _entry_worker(rebuild: Callable[[], list[Plan]], key: str, root: Path, threads: int,
                  options: dict[str, Any]) -> str:
    """One entry in a worker process (``run_plans(jobs=N)``): plans hold closures, so the
    worker rebuilds them with ``rebuild`` (a picklable module-level callable)."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [{key}] %(message)s",
                        datefmt="%H:%M:%S")
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
