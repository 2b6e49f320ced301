"""Shared helpers of the benchmarks: machine info, models, interleaved timing, result files.

Every benchmark measures *ratios inside one run*: the implementations being compared are
interleaved (round-robin, the order rotating every round) after a warm-up, each round times
every implementation once, and the reported figure is the median over rounds. A ratio is the
median of the per-round ratios, so a slow-down that hits one round (another job on the shared
cores) hits both sides of that round's ratio.

Results: one Markdown row per comparison on stdout and a JSON file per benchmark in
``benchmarks/results/`` (or ``--out-dir``) holding the rows, the command line, the date and
the machine (CPU, cores, torch/torchattacks versions, threads).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# keys every result row has (the smoke test checks them)
ROW_KEYS = ("benchmark", "model", "setting", "metric", "ours", "reference", "ref_value",
            "ratio", "goal", "met")


# -- command line and machine -----------------------------------------------------------------
def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, 1 round, no warm-up: checks the script runs (numbers meaningless)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--models", default="resnet20,smallcnn", help="comma-separated model names")
    p.add_argument("--out-dir", type=Path, default=RESULTS, help="where the JSON result goes")
    return p


def setup(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats, args.warmup = 1, 0
    torch.manual_seed(0)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> dict[str, Any]:
    try:
        import torchattacks
        ta_version = torchattacks.__version__
    except ImportError:  # pragma: no cover
        ta_version = None
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover
        load = None
    return {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torchattacks": ta_version,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.is_available(),
        "load_avg_1min_at_start": load,
        "git_commit": _git_commit(),
    }


# -- models ----------------------------------------------------------------------------------
SHAPES = {"resnet20": (3, 32, 32), "resnet18": (3, 32, 32), "smallcnn": (1, 28, 28)}


def build(name: str, *, seed: int = 0) -> nn.Module:
    """A randomly initialised model in eval mode (random weights are fine for throughput)."""
    from advdefense.models import build_model
    from advdefense.models.resnet import CIFAR_MEAN, CIFAR_STD

    torch.manual_seed(seed)
    c, h, _ = SHAPES[name]
    if name == "smallcnn":
        model = build_model(name, num_classes=10, in_channels=c, image_size=h, mean=(0.1307,),
                            std=(0.3081,))
    else:
        model = build_model(name, num_classes=10, in_channels=c, image_size=h, mean=CIFAR_MEAN,
                            std=CIFAR_STD)
    return model.eval()


def batch(name: str, n: int, *, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *SHAPES[name], generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


# -- timing ----------------------------------------------------------------------------------
def interleaved(fns: dict[str, Callable[[], Any]], *, warmup: int, repeats: int
                ) -> dict[str, list[float]]:
    """Time each callable ``repeats`` times, round-robin with a rotating order, after
    ``warmup`` untimed rounds. Returns seconds per call, per round (round order kept)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num[i] / den[i]."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def speed_ratio(times: dict[str, list[float]], ours: str, ref: str) -> float:
    """How many times faster ``ours`` is than ``ref`` (>1: ours faster), paired per round."""
    return paired_ratio(times[ref], times[ours])


# -- results ---------------------------------------------------------------------------------
def row(*, benchmark: str, model: str, setting: str, metric: str, ours: float, reference: str,
        ref_value: float, ratio: float, goal: float | None, higher_is_better: bool = True,
        **extra) -> dict[str, Any]:
    met = None
    if goal is not None:
        met = bool(ratio >= goal) if higher_is_better else bool(ratio <= goal)
    out = dict(benchmark=benchmark, model=model, setting=setting, metric=metric,
               ours=float(ours), reference=reference, ref_value=float(ref_value),
               ratio=float(ratio), goal=goal, met=met, higher_is_better=higher_is_better)
    out.update(extra)
    return out


def fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    if v is None:
        return "-"
    return str(v)


def markdown(rows: list[dict[str, Any]]) -> str:
    head = "| benchmark | model | setting | metric | ours | reference | ref value | ratio | goal | met |"
    sep = "|" + "---|" * 10
    lines = [head, sep]
    for r in rows:
        goal = "-" if r["goal"] is None else (("≥ " if r.get("higher_is_better", True) else "≤ ")
                                              + fmt(r["goal"]))
        met = {True: "met", False: "missed", None: "-"}[r["met"]]
        lines.append("| " + " | ".join([r["benchmark"], r["model"], r["setting"], r["metric"],
                                         fmt(r["ours"]), r["reference"], fmt(r["ref_value"]),
                                         fmt(r["ratio"]), goal, met]) + " |")
    return "\n".join(lines)


def write(name: str, args: argparse.Namespace, rows: list[dict[str, Any]],
          extra: dict[str, Any] | None = None) -> Path:
    """Print the Markdown rows and write ``<out-dir>/<name>.json``."""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": bool(args.quick),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "machine": machine_info(),
        "rows": rows,
    }
    if extra:
        payload.update(extra)
    path = args.out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    print(markdown(rows))
    print(f"\nwrote {path}")
    return path
