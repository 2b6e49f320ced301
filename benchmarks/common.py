"""Shared helpers of the benchmarks: machine info, models, interleaved timing, result files.

Every benchmark measures *ratios inside one run*: the implementations being compared are
interleaved (round-robin, the order rotating every round) after a warm-up, each round times
every implementation once, and the reported figure is the median over rounds. A ratio is the
median of the per-round ratios, so a slow-down that hits one round (another job on the shared
cores) hits both sides of that round's ratio.

Results: one Markdown row per comparison on stdout and a JSON file per benchmark in
``benchmarks/results/`` (or ``--out-dir``) holding the rows, the command line (paths relative
to the working folder: :mod:`advdefense.provenance`), the date and the machine (CPU, cores,
torch/torchattacks versions, threads).
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

from advdefense import layout
from advdefense.provenance import command_line, cpu_name

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# keys every result row has (the smoke test checks them)
ROW_KEYS = ("benchmark", "model", "setting", "metric", "ours", "reference", "ref_value",
            "ratio", "goal", "met")


# -- command line and machine -----------------------------------------------------------------
def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, 1 round, no warm-up: checks that the script runs "
                   "(the numbers mean nothing)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--models", default="resnet20,smallcnn", help="comma-separated model names")
    p.add_argument("--out-dir", type=Path, default=RESULTS, help="where the JSON result goes")
    p.add_argument("--name", default=None, help="result file name (default: the benchmark's)")
    return p


def setup(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats, args.warmup = 1, 0
    torch.manual_seed(0)


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
        "cpu": cpu_name(),
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


# -- memory layout of each side -------------------------------------------------------------
# Ours puts a convolutional model's 4-D weights in channels_last for the duration of a call
# (``advdefense.layout.channels_last_weights``; inputs untouched) and contiguous again after.
# torchattacks, on the same model object, therefore runs on contiguous weights unless it is
# given the same layout (:func:`ref_in_layout`). Every row comparing the two says which layout
# each side had (:func:`layout_label`).
def weights_layout(model: nn.Module, mode: str | None = None) -> str:
    """The layout the model's convolutions run in under the library ``mode`` (default: the
    process default, as ours uses): ``"channels_last"`` or ``"contiguous"``."""
    return "channels_last" if layout.wants_channels_last(model, mode) else "contiguous"


def current_layout(model: nn.Module) -> str:
    """The layout of the model's 4-D weights as they are now, outside any call of ours (what
    a reference implementation given the model as it is runs in)."""
    weights = [p for p in model.parameters() if p.dim() == 4]
    if weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights):
        return "channels_last"
    return "contiguous"


def ours_in_layout(mode: str, fn: Callable[[], Any]) -> Any:
    """``fn()`` (a call of ours) with the library memory format ``mode`` (restored after)."""
    saved = layout.get_memory_format()
    layout.set_memory_format(mode)
    try:
        return fn()
    finally:
        layout.set_memory_format(saved)


def ref_in_layout(mode: str, model: nn.Module, fn: Callable[[], Any]) -> Any:
    """``fn()`` (a reference implementation's call on ``model``) with the model's weights as
    ours has them under ``mode``: the same :func:`advdefense.layout.channels_last_weights`
    converts them for the call and makes them contiguous again after; the inputs keep their
    layout, as ours leaves them."""
    with layout.channels_last_weights(model, mode):
        return fn()


def layout_label(ours: str, ref: str, *, ref_name: str = "torchattacks",
                 defaults: bool = False) -> str:
    """The layouts of both sides of a row: ``both channels_last (same layout)``, or
    ``ours channels_last / torchattacks contiguous (default against default)``."""
    if ours == ref:
        return f"both {ours} (same layout)"
    return f"ours {ours} / {ref_name} {ref}" + (" (default against default)" if defaults else "")


def layout_fields(layouts: dict[str, str], ours: str, ref: str, setting: str, *,
                  goal: float | None, defaults: bool = False,
                  ref_name: str = "torchattacks") -> dict[str, Any]:
    """The :func:`row` fields that depend on the layouts (``layouts``: entry -> layout) of the
    entries ``ours`` and ``ref``: the setting with both layouts named (:func:`layout_label`),
    and the goal, kept only where both sides run in the same layout."""
    lo, lr = layouts[ours], layouts[ref]
    label = layout_label(lo, lr, ref_name=ref_name, defaults=defaults)
    return dict(setting=f"{setting}, {label}", goal=goal if lo == lr else None,
                layout_ours=lo, layout_ref=lr, same_layout=lo == lr)


# -- timing ----------------------------------------------------------------------------------
def _cpu_ticks() -> tuple[float, float] | None:
    """(busy, total) jiffies of the whole machine from /proc/stat, or None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    vals = [float(v) for v in fields]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0.0)
    return sum(vals) - idle, sum(vals)


def _own_cpu() -> float:
    import resource

    self_ = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return self_.ru_utime + self_.ru_stime + kids.ru_utime + kids.ru_stime


_START = (_cpu_ticks(), _own_cpu(), time.monotonic())


def contention() -> dict[str, float] | None:
    """CPU used by *other* processes since this script started, in cores (of ``cores``)."""
    ticks, own, t0 = _START
    now = _cpu_ticks()
    if ticks is None or now is None:
        return None
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    wall = max(time.monotonic() - t0, 1e-9)
    busy = (now[0] - ticks[0]) / hz
    other = max(0.0, busy - (_own_cpu() - own))
    return {"wall_s": wall, "machine_busy_cores": busy / wall,
            "other_processes_cores": other / wall}


CPU_TIMES: dict[str, list[float]] = {}
"""Process CPU seconds of the last :func:`interleaved` call (diagnostics only)."""


def sync() -> None:
    """Wait for the work queued on the current CUDA device (a no-op where CUDA is unused), so
    that a wall-clock interval covers the GPU work it launched, not only the launches."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], Any]], *, warmup: int, repeats: int
                ) -> dict[str, list[float]]:
    """Time each callable ``repeats`` times, round-robin with a rotating order, after
    ``warmup`` untimed rounds. Returns wall seconds per call, per round (round order kept);
    the process CPU seconds of the same calls are left in :data:`CPU_TIMES`. On CUDA every
    call is timed from an idle device to the end of its GPU work (:func:`sync`)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync()
    times: dict[str, list[float]] = {name: [] for name in names}
    CPU_TIMES.clear()
    CPU_TIMES.update({name: [] for name in names})
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            c0, t0 = time.process_time(), time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
            CPU_TIMES[name].append(time.process_time() - c0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num[i] / den[i]."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def speed_ratio(times: dict[str, list[float]], ours: str, ref: str) -> float:
    """How many times faster ``ours`` is than ``ref`` (>1: ours faster), paired per round."""
    return paired_ratio(times[ref], times[ours])


def alt_ratios(times: dict[str, list[float]], ours: str, ref: str, *,
               time_ratio: bool = False) -> dict[str, float]:
    """Cross-checks of the headline ratio, stored beside it: ``ratio_best`` from the
    fastest round of each side (contention only ever slows a round down), ``ratio_range``
    (lowest and highest per-round ratio: how much the machine moved the rounds) and
    ``ratio_cpu`` from process CPU seconds (median of per-round ratios). ``time_ratio``:
    ours/ref (for step-time and memory-like rows) instead of ref/ours."""
    a, b = (ours, ref) if time_ratio else (ref, ours)
    per_round = [x / y for x, y in zip(times[a], times[b], strict=True)]
    out = {"ratio_best": min(times[a]) / min(times[b]),
           "ratio_range": [min(per_round), max(per_round)]}
    if CPU_TIMES.get(a) and CPU_TIMES.get(b) and min(CPU_TIMES[b]) > 0:
        out["ratio_cpu"] = paired_ratio(CPU_TIMES[a], CPU_TIMES[b])
    return out


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


def compare(times: dict[str, list[float]], ours: str, ref: str, *, n: int = 1,
            time_ratio: bool = False, **kw) -> dict[str, Any]:
    """A :func:`row` comparing two timed entries of one :func:`interleaved` run.

    Throughput rows (default): ``ours``/``ref_value`` are ``n / median seconds`` (e.g. img/s)
    and the ratio is ref time / our time (>1: ours faster). ``time_ratio=True``: values are
    median seconds / ``n`` and the ratio is our time / ref time (lower is better)."""
    if time_ratio:
        vals = (median(times[ours]) / n, median(times[ref]) / n)
        ratio = paired_ratio(times[ours], times[ref])
        kw.setdefault("higher_is_better", False)
    else:
        vals = (n / median(times[ours]), n / median(times[ref]))
        ratio = speed_ratio(times, ours, ref)
    return row(ours=vals[0], ref_value=vals[1], ratio=ratio,
               **alt_ratios(times, ours, ref, time_ratio=time_ratio), **kw)


def fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    if v is None:
        return "-"
    return str(v)


def _range(lo_hi: list[float] | None) -> str:
    return "-" if not lo_hi else f"{fmt(lo_hi[0])}-{fmt(lo_hi[1])}"


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| benchmark | model | setting | metric | ours | reference | ref value | ratio "
            "| ratio (best rounds) | rounds' range | goal | met |")
    sep = "|" + "---|" * 12
    lines = [head, sep]
    for r in rows:
        goal = "-" if r["goal"] is None else (("≥ " if r.get("higher_is_better", True) else "≤ ")
                                              + fmt(r["goal"]))
        met = {True: "met", False: "missed", None: "-"}[r["met"]]
        lines.append("| " + " | ".join([r["benchmark"], r["model"], r["setting"], r["metric"],
                                         fmt(r["ours"]), r["reference"], fmt(r["ref_value"]),
                                         fmt(r["ratio"]), fmt(r.get("ratio_best")),
                                         _range(r.get("ratio_range")), goal, met]) + " |")
    return "\n".join(lines)


def write(name: str, args: argparse.Namespace, rows: list[dict[str, Any]],
          extra: dict[str, Any] | None = None) -> Path:
    """Print the Markdown rows and write ``<out-dir>/<name>.json``."""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "command": command_line([Path(sys.executable).name, *sys.argv]),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": bool(args.quick),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "machine": machine_info(),
        "contention": contention(),
        "rows": rows,
    }
    if extra:
        payload.update(extra)
    path = args.out_dir / f"{args.name or name}.json"
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    print(markdown(rows))
    print(f"\nwrote {path}")
    return path
