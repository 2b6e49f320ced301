"""GPU check: speed, host syncs, memory recovery and reproducible draws of advdefense on one GPU.

One run answers, in one JSON file (``--out``), on synthetic CIFAR-shaped data (uniform pixels,
random labels; random weights) and within a time budget (``--budget``, default 420 s for all
phases, so that a run with start-up fits in 8 minutes):

``pgd_at``
    PGD-AT training steps of the CIFAR ResNet-18 (``configs/pgd_at_cifar10_resnet18.yaml``:
    batch 128, PGD-10, eps 8/255, step 2/255) per second in fp32, with channels_last weights
    (``train.channels_last``), under bf16 autocast (``train.amp: bf16``), both, and with the
    inner attack under the same autocast (``train.attack_precision: amp``, the Trainer's name
    for a bf16 inner maximization; with and without channels_last); each mode times
    ``--train-steps`` (10) steps after ``--train-warmup`` (3), between two
    ``torch.cuda.synchronize()``.
``attacks``
    PGD-20, APGD-CE (``--apgd-iters``, default 20 on both sides: 100 iterations do not fit the
    budget) on ResNet-18 and EOT-PGD (``--eot`` 20 draws, ``--eot-steps`` 10 steps) on the RNA
    ResNet-18 (``configs/rna_cifar10_resnet18.yaml``), batch 128, against torchattacks 3.5.1
    (``PGD``, ``APGD``, ``EOTPGD``) and against the limit: the attack's count of forward +
    backward-to-the-input passes of the same model on the same batch (20 for PGD-20 and
    APGD-20, steps x draws for EOT-PGD), with nothing else. Both sides run in the same memory
    layout, stated in each row: ``contiguous`` (weights as built; the library's CUDA default)
    and ``channels_last`` (4-D weights in channels_last for ours, torchattacks and the limit
    alike). Calls are interleaved round-robin after one untimed round (``common.interleaved``,
    which synchronises the device around every call); ratios are medians of per-round ratios.
``syncs``
    host synchronisations per attack step, counted with
    ``torch.cuda.set_sync_debug_mode("warn")`` (each synchronising call warns once; the
    warnings are recorded and counted) over one call of PGD-20, APGD-CE and EOT-PGD, ours and
    torchattacks', divided by the steps; the source lines that synchronise most are listed.
    CUDA only.
``oom``
    out-of-memory recovery: Monte-Carlo draws (``smoothing.sample_logits``) and an EOT loss and
    gradient (``attacks.eot_loss_grad``) computed once normally and once through a wrapper whose
    first forward raises ``torch.OutOfMemoryError``; the draws must be bit-identical, the
    model outputs equal up to float rounding, and ``randomness.learned_row_limit`` set. On
    CUDA also a real out-of-memory error: ``torch.cuda.set_per_process_memory_fraction`` caps
    the allocator below one full pass (restored afterwards).
``certify``
    ``smoothing.certify`` with n = 10,000, n0 = 100 on a small CIFAR-shaped CNN (float64, so
    that no vote depends on how the batch size changes float rounding): every noise draw is
    distinct (the ``GaussianInput`` of every ``NoisyBase`` is hooked and the unique rows
    counted), and two ``max_batch`` / ``batch_samples`` settings give the same draws and the
    same counts, radii and predictions.
``seeding``
    ``randomness.replicated_forward`` on the device: ``GaussianInput`` and per-sample RNA over
    300 rows give the same draws for the same seed, at ``max_batch`` 64 and 4096, other
    draws for another seed, and leave the caller's CPU and CUDA generators untouched.
``sharded``
    ``torchrun --nproc_per_node=2 -m advdefense evaluate`` (gloo; both processes get
    ``--device`` explicitly, so on one GPU they share ``cuda:0``) against one process, on
    mnist5k with a nearest-class-mean linear model: the gathered per-example clean and FGSM
    verdicts must be the one-process ones, in dataset order.
``pgd_at_compile``
    the PGD-AT step with ``train.compile: true`` (inductor), last because it compiles for a
    minute or more; skipped when less than ``--compile-min-s`` seconds of the budget are left.

The checks of earlier versions stay available, off by default (``--phases old`` or ``all``):
``configs`` (a few training steps of every CIFAR config in fp32/bf16/fp16), ``suite``
(``run_suite(suite="rand")`` on an RNA ResNet-18), ``smoothing`` (m = 512 predictions),
``rna`` (sync-free against host-read RNA forwards) and ``configs_compile``.

Every phase catches its own errors (a failed item inside a phase does not stop the others),
and the JSON file is rewritten atomically after every phase and item, so a run cut short
still leaves what it measured. A phase that would start after the budget is spent is skipped
with the reason recorded; on CUDA a watchdog stops a phase that runs past the budget. Each
phase prints one summary line. The exit status is 1 when any phase failed or was cut by the
budget.

``--cpu-smoke`` runs the same code on the CPU with tiny sizes (a WRN-10-1, batch 4, 1-2
steps, certify n = 100) in well under a minute; sync counting and the memory-fraction cap are
CUDA-only and are skipped with that reason. ``tests/test_benchmarks_smoke.py`` runs it.

Usage::

    python benchmarks/gpu_check.py --out benchmarks/results/gpu/gpu_check.json   # one GPU
    python benchmarks/gpu_check.py --cpu-smoke --out runs/gpu_check_smoke.json   # CPU smoke
    python benchmarks/gpu_check.py --phases attacks,syncs                         # a subset
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

CONFIGS = ROOT / "configs"
DEFAULT_OUT = Path("benchmarks") / "results" / "gpu" / "gpu_check.json"
EPS, ALPHA = 8 / 255, 2 / 255
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
PGD_AT_CONFIG = "pgd_at_cifar10_resnet18"
RNA_CONFIG = "rna_cifar10_resnet18"
SMOKE_MODEL = ["model.name=wrn", "model.kwargs={depth: 10, width: 1}"]
GRACE_S = 20.0  # how far past the budget the watchdog lets a running phase go

NEW_PHASES = ("pgd_at", "attacks", "syncs", "oom", "certify", "seeding", "sharded",
              "pgd_at_compile")
OLD_PHASES = ("configs", "suite", "smoothing", "rna", "configs_compile")
# execution order: the compiled runs last (slowest to start)
ORDER = ("pgd_at", "attacks", "syncs", "oom", "certify", "seeding", "sharded", "configs",
         "suite", "smoothing", "rna", "pgd_at_compile", "configs_compile")
GROUPS = {"new": NEW_PHASES, "default": NEW_PHASES, "old": OLD_PHASES,
          "all": NEW_PHASES + OLD_PHASES, "train": ("configs", "configs_compile")}

# PGD-AT modes of the ``pgd_at`` phase (config overrides)
TRAIN_MODES: dict[str, list[str]] = {
    "fp32": [],
    "channels_last": ["train.channels_last=true"],
    "bf16": ["train.amp=bf16"],
    "bf16_channels_last": ["train.amp=bf16", "train.channels_last=true"],
    "bf16_attack_bf16": ["train.amp=bf16", "train.attack_precision=amp"],
    "bf16_attack_bf16_channels_last": ["train.amp=bf16", "train.attack_precision=amp",
                                       "train.channels_last=true"],
    "compile": ["train.compile=true"],
}
# modes of the old ``configs`` phase
MODES: dict[str, list[str]] = {
    "fp32": [],
    "bf16": ["train.amp=bf16"],
    "fp16": ["train.amp=fp16"],
    "compile": ["train.compile=true"],
}
COMPILE_DEFAULT = ("rna_cifar10_resnet18", "cas_trades_cifar10_resnet18")


class Skip(Exception):
    """A phase or item that does not apply here; its message is the recorded reason."""


class PhaseTimeout(BaseException):
    """Raised by the watchdog. A BaseException, so that library code catching ``Exception``
    (the Trainer's compile fallback) cannot swallow it."""


# -- small helpers ---------------------------------------------------------------------------
def synthetic(n: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(classes, (n,), generator=g)


def cifar_configs() -> list[Path]:
    from advdefense.config import load_config

    return [p for p in sorted(CONFIGS.glob("*.yaml"))
            if load_config(p).data.name in ("cifar10", "cifar100", "svhn")]


def _model_from(config: str, args: argparse.Namespace) -> nn.Module:
    from advdefense.config import build_from_config, load_config

    overrides = SMOKE_MODEL if args.cpu_smoke else []
    torch.manual_seed(0)
    model, _ = build_from_config(load_config(CONFIGS / f"{config}.yaml", overrides))
    return model


def _short(path: str) -> str:
    """A source file name without the machine's folders."""
    p = Path(path)
    for anchor in ("site-packages", "dist-packages"):
        if anchor in p.parts:
            return "/".join(p.parts[p.parts.index(anchor) + 1:])
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return p.name


def _closeness(a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    a, b = a.detach().double(), b.detach().double()
    diff = float((a - b).abs().max()) if a.numel() else 0.0
    scale = float(a.abs().max()) if a.numel() else 0.0
    return {"bit_identical": bool(torch.equal(a, b)), "max_abs_diff": diff,
            "close": diff <= 1e-4 * scale + 1e-6}


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    """fp32 convolutions and matrix products in full fp32 (TF32 rounds at about 1e-3, and
    differently for different batch sizes)."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _git(*cmd: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), *cmd], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine(device: torch.device) -> dict[str, Any]:
    """The machine, the software and the numeric settings of this run."""
    from advdefense.provenance import cpu_name

    try:
        import torchattacks
        ta = torchattacks.__version__
    except ImportError:
        ta = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    info: dict[str, Any] = {
        "device": str(device), "cpu": cpu_name(), "cores": os.cpu_count(),
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "torchattacks": ta, "commit": _git("rev-parse", "HEAD"),
        "uncommitted_changes": None if status is None else bool(status),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(),
                    gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    compute_capability=f"{props.major}.{props.minor}",
                    multiprocessors=props.multi_processor_count,
                    cudnn_benchmark=torch.backends.cudnn.benchmark,
                    tf32={"cudnn_conv": torch.backends.cudnn.allow_tf32,
                          "matmul": torch.backends.cuda.matmul.allow_tf32})
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                  "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=15)
            info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else None
        except (OSError, subprocess.SubprocessError, IndexError):
            info["driver"] = None
    return info


# -- the runner: budget, watchdog, records, atomic JSON ----------------------------------------
@contextlib.contextmanager
def _watchdog(seconds: float, enabled: bool) -> Iterator[None]:
    """Raise :class:`PhaseTimeout` in the main thread after ``seconds`` (Unix, main thread)."""
    if (not enabled or not hasattr(signal, "SIGALRM")
            or threading.current_thread() is not threading.main_thread()):
        yield
        return

    def fire(signum, frame):
        raise PhaseTimeout(f"stopped by the watchdog after {seconds:.0f} s: past the budget")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Runner:
    """Runs phases within the budget, records them in one payload, writes it after each step."""

    def __init__(self, args: argparse.Namespace, device: torch.device, tmp: Path) -> None:
        self.args, self.device, self.tmp = args, device, tmp
        self.start = time.perf_counter()
        self.watchdog = device.type == "cuda" and not args.no_watchdog
        self._models: dict[str, nn.Module] = {}
        self.payload: dict[str, Any] = {
            "tool": "benchmarks/gpu_check.py",
            "command": common.command_line([Path(sys.executable).name, *sys.argv]),
            "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu_smoke": bool(args.cpu_smoke), "budget_s": args.budget,
            "machine": machine(device), "settings": _settings(args),
            "phases_requested": list(args.phase_list), "phases": {}, "rows": [],
            "complete": False,
        }

    # budget and device
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def remaining(self) -> float:
        return self.args.budget - self.elapsed()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mib(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)

    def model(self, kind: str) -> nn.Module:
        """The shared eval-mode models of the attack phases: ``plain`` (ResNet-18) and
        ``rna`` (RNA ResNet-18), built once (a WRN-10-1 in the CPU smoke run)."""
        if kind not in self._models:
            config = {"plain": PGD_AT_CONFIG, "rna": RNA_CONFIG}[kind]
            self._models[kind] = _model_from(config, self.args).to(self.device).eval()
        return self._models[kind]

    def model_name(self, kind: str) -> str:
        base = "wrn-10-1" if self.args.cpu_smoke else "resnet18"
        return base if kind == "plain" else f"rna {base} (bn/in, a path per call)"

    # records
    def save(self) -> None:
        self.payload["seconds"] = round(self.elapsed(), 1)
        if self.args.out:
            from advdefense.atomic import atomic_write_json

            atomic_write_json(self.args.out, self.payload, indent=1, default=str)

    def phase(self, name: str, fn: Callable[[dict[str, Any]], None], *,
              min_s: float = 0.0) -> None:
        """Run ``fn(record)`` as phase ``name``; ``fn`` fills the record as it goes and may
        set ``summary``. Errors are recorded, never raised."""
        rec: dict[str, Any] = {"status": "running"}
        self.payload["phases"][name] = rec
        left = self.remaining()
        if left <= max(min_s, 0.0):
            rec.update(status="skipped", budget=True,
                       reason=f"budget: {max(left, 0):.0f} s of {self.args.budget:.0f} s left"
                       + (f", the phase needs about {min_s:.0f} s" if min_s else ""))
            rec["seconds"] = 0.0
            self.save()
            print(f"SKIPPED {name} (0.0 s): {rec['reason']}", flush=True)
            return
        t0 = time.perf_counter()
        try:
            with _watchdog(left + GRACE_S, self.watchdog):
                fn(rec)
            rec["status"] = "failed" if rec.get("errors") else "ok"
        except Skip as why:
            rec.update(status="skipped", reason=str(why))
        except PhaseTimeout as err:
            rec.update(status="failed", error=str(err))
        except Exception:  # noqa: BLE001 - every failure is recorded, then the exit status
            rec.update(status="failed", error=traceback.format_exc())
        finally:
            if self.device.type == "cuda":
                with contextlib.suppress(Exception):
                    torch.cuda.empty_cache()
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        self.save()
        line = rec.get("summary") or rec.get("reason") or ""
        if rec["status"] == "failed":
            first = (rec.get("error") or "").strip().splitlines()
            items = [e["item"] for e in rec.get("errors", [])]
            line = " | ".join(filter(None, [line, first[-1] if first else "",
                                            f"failed items: {', '.join(items)}" if items
                                            else ""]))
        print(f"{rec['status'].upper():7} {name} ({rec['seconds']:.1f} s): {line}", flush=True)

    def item(self, rec: dict[str, Any], label: str, fn: Callable[[], Any], *,
             min_s: float = 0.0) -> Any:
        """One item of a phase: its error is recorded in ``rec['errors']`` (the phase goes
        on); skipped with a reason when the budget is spent. Returns ``fn()`` or None."""
        if self.remaining() <= min_s:
            rec.setdefault("skipped_items", []).append(
                {"item": label, "reason": f"budget: {max(self.remaining(), 0):.0f} s left",
                 "budget": True})
            self.save()
            return None
        try:
            return fn()
        except Skip as why:
            rec.setdefault("skipped_items", []).append({"item": label, "reason": str(why)})
            return None
        except PhaseTimeout:
            raise
        except Exception:  # noqa: BLE001 - recorded; the phase continues
            rec.setdefault("errors", []).append({"item": label,
                                                 "error": traceback.format_exc()})
            print(f"  FAIL  {label}: {traceback.format_exc().strip().splitlines()[-1]}",
                  flush=True)
            return None
        finally:
            self.save()

    def failures(self) -> list[str]:
        out = []
        for name, rec in self.payload["phases"].items():
            if rec["status"] == "failed":
                out.append(name)
            elif rec["status"] == "skipped" and rec.get("budget"):
                out.append(f"{name} (not run: budget)")
            out += [f"{name}/{s['item']} (not run: budget)"
                    for s in rec.get("skipped_items", []) if s.get("budget")]
        return out


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("train_steps", "train_warmup", "attack_batch", "pgd_steps", "apgd_iters", "eot",
            "eot_steps", "rounds", "eot_rounds", "warmup_rounds", "certify_n", "certify_n0",
            "certify_images", "sharded_examples")
    return {k: getattr(args, k) for k in keys}


# -- phase: PGD-AT training steps ------------------------------------------------------------
def _train_mode(run: Runner, mode: str) -> dict[str, Any]:
    from advdefense.config import load_config
    from advdefense.training.trainer import Trainer

    a = run.args
    overrides = [f"output_dir={run.tmp / f'pgd_at-{mode}'}", "train.epochs=1",
                 "data.monitor_size=0", "data.num_workers=0", "train.init_from=null",
                 *TRAIN_MODES[mode]]
    if a.cpu_smoke:
        overrides += [*SMOKE_MODEL, "data.batch_size=4", "train.attack.steps=1"]
        if mode == "compile":
            overrides.append("train.compile=eager")
    cfg = load_config(CONFIGS / f"{PGD_AT_CONFIG}.yaml", overrides)
    batch = cfg.data.batch_size
    warmup = max(a.train_warmup, 1) if mode == "compile" else a.train_warmup
    total = warmup + a.train_steps
    x, y = synthetic(batch * total, 10, seed=3)
    xd, yd = x.to(run.device), y.to(run.device)
    if mode == "compile":
        from torch import _dynamo

        _dynamo.reset()
        _dynamo.utils.counters.clear()
    trainer = Trainer(cfg, device=run.device, progress=False,
                      train_set=TensorDataset(x[:batch], y[:batch]))
    logs: dict[str, float] = {}
    try:
        trainer.model.train()
        trainer.train_model.train()

        def step(i: int) -> None:
            nonlocal logs
            logs = trainer.train_step(xd[i * batch:(i + 1) * batch],
                                      yd[i * batch:(i + 1) * batch])
            bad = {k: v for k, v in logs.items() if not math.isfinite(float(v))}
            if bad:
                raise RuntimeError(f"non-finite training logs at step {i}: {bad}")

        run.sync()
        t0 = time.perf_counter()
        for i in range(warmup):
            step(i)
        run.sync()
        warm_s = time.perf_counter() - t0
        if mode == "compile" and getattr(trainer.train_model, "compiled", None) is None:
            raise RuntimeError("torch.compile failed and the Trainer fell back to eager "
                               "(see the warning above)")
        run.reset_peak()
        t0 = time.perf_counter()
        for i in range(warmup, total):
            step(i)
        run.sync()
        seconds = time.perf_counter() - t0
        conv = next((p for p in trainer.model.parameters() if p.dim() == 4), None)
        att = cfg.train.attack
        row: dict[str, Any] = {
            "mode": mode, "overrides": TRAIN_MODES[mode], "model": run.model_name("plain"),
            "batch": batch,
            "attack": f"PGD-{att.steps}, eps {att.eps * 255:.3g}/255, step "
                      f"{(att.step_size or att.eps / 4) * 255:.3g}/255",
            "amp": cfg.train.amp, "attack_precision": cfg.train.attack_precision,
            "weights_channels_last": bool(
                conv is not None and conv.is_contiguous(memory_format=torch.channels_last)
                and not conv.is_contiguous()),
            "warmup_steps": warmup, "timed_steps": a.train_steps,
            "warmup_s": round(warm_s, 2), "step_s": round(seconds / a.train_steps, 4),
            "steps_per_s": round(a.train_steps / seconds, 2),
            "img_per_s": round(batch * a.train_steps / seconds, 1),
            "peak_mib": run.peak_mib(), "loss": round(float(logs.get("loss", float("nan"))), 4)}
        if mode == "compile":
            from torch._dynamo.utils import counters

            row["graph_breaks"] = sum(counters["graph_break"].values())
            row["graphs"] = int(counters["stats"].get("unique_graphs", 0))
        return row
    finally:
        trainer.close()


def _train_rows(run: Runner, rec: dict[str, Any], modes: list[str]) -> None:
    rows = rec.setdefault("rows", [])
    for mode in modes:
        row = run.item(rec, mode, partial(_train_mode, run, mode))
        if row is not None:
            rows.append(row)
    fp32 = next((r for r in run.payload["phases"].get("pgd_at", {}).get("rows", [])
                 if r["mode"] == "fp32"), None)
    for r in rows:
        if fp32 is not None:
            r["speedup_vs_fp32"] = round(r["img_per_s"] / fp32["img_per_s"], 3)
    rec["summary"] = ", ".join(f"{r['mode']} {r['steps_per_s']:g} steps/s "
                               f"({r['img_per_s']:g} img/s)" for r in rows)


def phase_pgd_at(run: Runner, rec: dict[str, Any]) -> None:
    rec["what"] = ("PGD-AT training steps per second of the CIFAR ResNet-18 config, synthetic "
                   "data, after warm-up steps, between two device synchronisations")
    _train_rows(run, rec, [m for m in TRAIN_MODES if m != "compile"])


def phase_pgd_at_compile(run: Runner, rec: dict[str, Any]) -> None:
    rec["what"] = "the PGD-AT step with train.compile (inductor; eager backend in the smoke run)"
    _train_rows(run, rec, ["compile"])


# -- phase: attacks against torchattacks and the limit -----------------------------------------
def _fwd_bwd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, passes: int) -> torch.Tensor:
    """``passes`` x (forward + backward to the input): the floor of any gradient attack."""
    g = x
    for _ in range(passes):
        xr = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xr), y), xr)
    return g


@contextlib.contextmanager
def _process_layout(mode: str) -> Iterator[None]:
    from advdefense import layout

    saved = layout.get_memory_format()
    layout.set_memory_format(mode)
    try:
        yield
    finally:
        layout.set_memory_format(saved)


def _ours_in(mode: str, attack, model, x, y) -> torch.Tensor:
    with _process_layout(mode):
        return attack(model, x, y)


def _others_in(mode: str, model: nn.Module, fn: Callable[[], Any]) -> Any:
    """``fn()`` with the model's 4-D weights in ``mode`` (what ours does inside its call)."""
    from advdefense import layout

    with layout.channels_last_weights(model, mode):
        return fn()


def _labels(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1)


def _eot_strategy(run: Runner, attack) -> str:
    """How the library evaluates the EOT draws of the RNA model here."""
    from advdefense import randomness

    model = run.model("rna")
    if run.device.type == "cpu" and not randomness.groups_batch_cheaply(model):
        return "one draw per pass"
    rows = min(attack.max_batch, run.args.attack_batch * run.args.eot)
    return f"draws stacked, passes of up to {rows} rows"


def _attack_rows(run: Runner, kind: str, layout_mode: str) -> list[dict[str, Any]]:
    from advdefense.attacks import PGD, build_attack

    a = run.args
    try:
        import torchattacks
    except ImportError:
        torchattacks = None
    model = run.model("rna" if kind == "eot" else "plain")
    x = synthetic(a.attack_batch, 10, seed=1)[0].to(run.device)
    y = _labels(model, x)  # every image starts correctly classified: all are attacked
    if kind == "pgd":
        steps, passes = a.pgd_steps, a.pgd_steps
        ours = PGD(eps=EPS, steps=steps, step_size=ALPHA, random_start=True, seed=0)
        name, ref, goals = f"PGD-{steps}", "torchattacks.PGD", (1.2, 0.95)
        ta = None if torchattacks is None else torchattacks.PGD(
            model, eps=EPS, alpha=ALPHA, steps=steps, random_start=True)
        setting = f"batch {a.attack_batch}, {steps} steps, eps 8/255, step 2/255"
    elif kind == "apgd":
        steps, passes = a.apgd_iters, a.apgd_iters
        ours = build_attack("apgd-ce", eps=EPS, n_iter=steps, seed=0)
        name, ref, goals = f"APGD-CE {steps} it", "torchattacks.APGD", (1.0, None)
        ta = None if torchattacks is None else torchattacks.APGD(
            model, norm="Linf", eps=EPS, steps=steps, n_restarts=1, seed=0, loss="ce", rho=0.75)
        setting = f"batch {a.attack_batch}, {steps} iterations, eps 8/255, 1 restart"
    else:
        steps, passes = a.eot_steps, a.eot_steps * a.eot
        ours = PGD(eps=EPS, steps=steps, step_size=ALPHA, random_start=True,
                   eot_samples=a.eot, seed=0)
        name, ref, goals = f"EOT-{a.eot} PGD-{steps}", "torchattacks.EOTPGD", (1.0, None)
        ta = None if torchattacks is None else torchattacks.EOTPGD(
            model, eps=EPS, alpha=ALPHA, steps=steps, eot_iter=a.eot, random_start=True)
        setting = (f"batch {a.attack_batch}, EOT {a.eot} draws (ours: {_eot_strategy(run, ours)}"
                   f"), {steps} steps, eps 8/255, step 2/255")
    fns: dict[str, Callable[[], Any]] = {
        "ours": partial(_ours_in, layout_mode, ours, model, x, y),
        "limit": partial(_others_in, layout_mode, model, partial(_fwd_bwd, model, x, y, passes))}
    if ta is not None:
        fns["ta"] = partial(_others_in, layout_mode, model, partial(ta, x, y))
    rounds = a.eot_rounds if kind == "eot" else a.rounds
    times = common.interleaved(fns, warmup=a.warmup_rounds, repeats=rounds)
    where = ("4-D weights in channels_last, on both sides" if layout_mode == "channels_last"
             else "contiguous weights (as built), on both sides")
    base = dict(benchmark=name, model=run.model_name("rna" if kind == "eot" else "plain"),
                setting=setting, metric="img/s", n=a.attack_batch, layout=layout_mode,
                layout_detail=where, seconds=times, rounds=rounds)
    rows = []
    if "ta" in fns:
        rows.append(common.compare(times, "ours", "ta",
                                   reference=f"{ref} {torchattacks.__version__}",
                                   goal=goals[0], **base))
    lim = (f"limit {passes}x(fwd+bwd)" if kind != "eot"
           else f"limit {steps}x{a.eot}x(fwd+bwd), one draw per pass")
    rows.append(common.compare(times, "ours", "limit", reference=lim, goal=goals[1], **base))
    return rows


def phase_attacks(run: Runner, rec: dict[str, Any]) -> None:
    rec["what"] = ("ours vs torchattacks 3.5.1 and vs the forward+backward limit, same model, "
                   "batch and memory layout; ratio = reference time / our time (>1: ours "
                   "faster), median of per-round ratios")
    try:
        import torchattacks  # noqa: F401
    except ImportError:
        rec["torchattacks"] = "not importable: rows against the limit only"
    rows = rec.setdefault("rows", [])
    for kind in ("pgd", "apgd", "eot"):
        for layout_mode in ("contiguous", "channels_last"):
            got = run.item(rec, f"{kind} {layout_mode}",
                           partial(_attack_rows, run, kind, layout_mode))
            rows.extend(got or [])
    rec["summary"] = "; ".join(
        f"{r['benchmark']} {r['layout']}: {r['ratio']:.2f}x {r['reference'].split()[0]}"
        for r in rows)


# -- phase: host syncs per attack step -------------------------------------------------------
def _count_syncs(fn: Callable[[], Any]) -> tuple[int, list[list[Any]]]:
    """Synchronising CUDA calls made by ``fn()`` and the source lines making most of them."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    where = Counter(f"{_short(w.filename)}:{w.lineno}" for w in syncs)
    return len(syncs), [[k, v] for k, v in where.most_common(6)]


def _sync_rows(run: Runner, kind: str) -> list[dict[str, Any]]:
    from advdefense.attacks import PGD, build_attack

    a = run.args
    try:
        import torchattacks
    except ImportError:
        torchattacks = None
    model = run.model("rna" if kind == "eot" else "plain")
    x = synthetic(a.attack_batch, 10, seed=1)[0].to(run.device)
    y = _labels(model, x)
    ta: Callable[[], Any] | None = None
    if kind == "pgd":
        steps = a.pgd_steps
        ours = PGD(eps=EPS, steps=steps, step_size=ALPHA, seed=0)
        if torchattacks is not None:
            ta = torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=steps)
        name = f"PGD-{steps}"
    elif kind == "apgd":
        steps = a.apgd_iters
        ours = build_attack("apgd-ce", eps=EPS, n_iter=steps, seed=0)
        if torchattacks is not None:
            ta = torchattacks.APGD(model, eps=EPS, steps=steps, seed=0, loss="ce")
        name = f"APGD-CE {steps} it"
    else:
        steps = a.eot_steps
        ours = PGD(eps=EPS, steps=steps, step_size=ALPHA, eot_samples=a.eot, seed=0)
        if torchattacks is not None:
            ta = torchattacks.EOTPGD(model, eps=EPS, alpha=ALPHA, steps=steps, eot_iter=a.eot)
        name = f"EOT-{a.eot} PGD-{steps}"
    impls = {"ours": partial(ours, model, x, y)}
    if ta is not None:
        impls["torchattacks"] = partial(ta, x, y)
    rows = []
    for impl, fn in impls.items():
        fn()  # warm-up: cuDNN autotuning and lazy initialisation synchronise once
        count, where = _count_syncs(fn)
        rows.append({"attack": name, "impl": impl, "model": run.model_name(
            "rna" if kind == "eot" else "plain"), "batch": a.attack_batch, "steps": steps,
            "syncs": count, "syncs_per_step": round(count / steps, 2), "top_sources": where})
    return rows


def phase_syncs(run: Runner, rec: dict[str, Any]) -> None:
    if run.device.type != "cuda":
        raise Skip("torch.cuda.set_sync_debug_mode counts CUDA synchronisations: CUDA only")
    try:
        import torchattacks  # noqa: F401
    except ImportError:
        rec["torchattacks"] = "not importable"
    rec["what"] = ("synchronising CUDA calls (torch.cuda.set_sync_debug_mode('warn')) in one "
                   "call after a warm-up call, per attack step; contiguous weights")
    rows = rec.setdefault("rows", [])
    for kind in ("pgd", "eot", "apgd"):
        rows.extend(run.item(rec, kind, partial(_sync_rows, run, kind)) or [])
    rec["summary"] = ", ".join(f"{r['attack']} {r['impl']} {r['syncs_per_step']:g}/step"
                               for r in rows)


# -- phase: out-of-memory recovery -----------------------------------------------------------
class ForcedOOM(nn.Module):
    """``model(x)``, except that its first forward over at least ``rows`` rows raises
    ``torch.OutOfMemoryError`` (once). It owns a parameter, so that
    ``learned_row_limit`` is kept for this wrapper itself."""

    def __init__(self, model: nn.Module, rows: int | None = 2) -> None:
        super().__init__()
        self.model = model
        self.rows = rows
        self.failed_rows: int | None = None
        self.seen: list[int] = []
        self.anchor = nn.Parameter(torch.zeros(1, device=next(
            (p.device for p in model.parameters()), torch.device("cpu"))), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows is not None and self.failed_rows is None and x.shape[0] >= self.rows:
            self.failed_rows = x.shape[0]
            raise torch.OutOfMemoryError(
                f"CUDA out of memory (forced by gpu_check at a pass of {x.shape[0]} rows)")
        self.seen.append(x.shape[0])
        return self.model(x)


class _Flat(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def _oom_draws(run: Runner) -> dict[str, Any]:
    """The noisy inputs themselves (an elementwise base): the retried draws must be the same
    bits."""
    from advdefense.defenses.smoothing import sample_logits
    from advdefense.randomness import learned_row_limit

    n, m = (16, 4) if run.args.cpu_smoke else (64, 8)
    x = synthetic(n, 10, seed=4)[0].to(run.device)
    normal = sample_logits(ForcedOOM(_Flat().to(run.device), rows=None), x, sigma=0.25, m=m,
                           seed=11)
    wrapped = ForcedOOM(_Flat().to(run.device))
    forced = sample_logits(wrapped, x, sigma=0.25, m=m, seed=11)
    limit = learned_row_limit(wrapped)
    out = {"what": f"sample_logits of an elementwise base (the noisy inputs), m={m}, {n} images",
           "failed_pass_rows": wrapped.failed_rows, "learned_row_limit": limit,
           "largest_pass_after": max(wrapped.seen), **_closeness(normal, forced)}
    assert out["bit_identical"], f"the draws changed after the retry: {out}"
    assert limit is not None and limit < wrapped.failed_rows, out
    assert max(wrapped.seen) <= limit, out
    return out


def _oom_logits(run: Runner) -> dict[str, Any]:
    from advdefense.defenses.smoothing import sample_logits
    from advdefense.randomness import learned_row_limit

    n, m = (8, 4) if run.args.cpu_smoke else (64, 8)
    model = copy.deepcopy(run.model("plain"))
    x = synthetic(n, 10, seed=5)[0].to(run.device)
    with torch.no_grad(), _no_tf32():
        normal = sample_logits(ForcedOOM(model, rows=None), x, sigma=0.25, m=m, seed=12)
        wrapped = ForcedOOM(model)
        forced = sample_logits(wrapped, x, sigma=0.25, m=m, seed=12)
    out = {"what": f"sample_logits of {run.model_name('plain')}, m={m}, {n} images (TF32 off)",
           "failed_pass_rows": wrapped.failed_rows,
           "learned_row_limit": learned_row_limit(wrapped), **_closeness(normal, forced)}
    assert out["close"] and out["learned_row_limit"] is not None, out
    return out


def _oom_eot(run: Runner) -> dict[str, Any]:
    from advdefense.attacks import eot_loss_grad
    from advdefense.randomness import learned_row_limit

    n, k = (8, 2) if run.args.cpu_smoke else (64, 8)
    model = copy.deepcopy(run.model("rna"))
    x = synthetic(n, 10, seed=6)[0].to(run.device)
    y = _labels(model, x)
    with _no_tf32():
        normal = eot_loss_grad(ForcedOOM(model, rows=None), x, y, "ce", eot_samples=k, seed=13)
        wrapped = ForcedOOM(model)
        forced = eot_loss_grad(wrapped, x, y, "ce", eot_samples=k, seed=13)
    loss, grad = _closeness(normal.loss, forced.loss), _closeness(normal.grad, forced.grad)
    out = {"what": f"eot_loss_grad (CE) of {run.model_name('rna')}, EOT {k}, {n} images "
                   "(TF32 off)",
           "failed_pass_rows": wrapped.failed_rows,
           "learned_row_limit": learned_row_limit(wrapped), "loss": loss, "grad": grad}
    assert loss["close"] and grad["close"] and out["learned_row_limit"] is not None, out
    return out


def _oom_memory_fraction(run: Runner) -> dict[str, Any]:
    """A real allocator failure: the process may use less than one full pass needs."""
    from advdefense.attacks import eot_loss_grad
    from advdefense.randomness import learned_row_limit

    if run.device.type != "cuda":
        raise Skip("torch.cuda.set_per_process_memory_fraction caps the CUDA allocator: "
                   "CUDA only")
    dev = run.device
    n, k = run.args.attack_batch, 16
    model = copy.deepcopy(run.model("plain"))
    capped = copy.deepcopy(model)
    x = synthetic(n, 10, seed=7)[0].to(dev)
    y = _labels(model, x)
    # cuDNN's heuristics, not autotuning: a benchmark of the halved passes under the cap would
    # try workspaces that cannot fit
    benchmark, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, False
    with _no_tf32(), contextlib.ExitStack() as stack:
        stack.callback(setattr, torch.backends.cudnn, "benchmark", benchmark)
        eot_loss_grad(model, x, y, "ce", eot_samples=k, seed=14)  # lazy initialisation first
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_reserved(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        normal = eot_loss_grad(model, x, y, "ce", eot_samples=k, seed=14)
        torch.cuda.synchronize(dev)
        need = torch.cuda.max_memory_reserved(dev) - base
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(dev).total_memory
        cap = torch.cuda.memory_reserved(dev) + int(0.6 * need)
        torch.cuda.set_per_process_memory_fraction(cap / total, dev)
        try:
            forced = eot_loss_grad(capped, x, y, "ce", eot_samples=k, seed=14)
            torch.cuda.synchronize(dev)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, dev)
            torch.cuda.empty_cache()
    limit = learned_row_limit(capped)
    loss, grad = _closeness(normal.loss, forced.loss), _closeness(normal.grad, forced.grad)
    out = {"what": f"eot_loss_grad of {run.model_name('plain')}, {n} images x EOT {k} = "
                   f"{n * k} rows in one pass, allocator capped at 60% of what that pass "
                   "reserved (TF32 off, cuDNN autotuning off)",
           "pass_needs_mib": round(need / 2**20, 1), "cap_mib": round(cap / 2**20, 1),
           "learned_row_limit": limit, "loss": loss, "grad": grad}
    assert limit is not None and limit < n * k, f"no out-of-memory error was caught: {out}"
    assert loss["close"] and grad["close"], out
    return out


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Hide a logger's warnings (the out-of-memory retries here are expected)."""
    import logging

    log = logging.getLogger(logger)
    saved = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(saved)


def phase_oom(run: Runner, rec: dict[str, Any]) -> None:
    rec["what"] = ("results with a forced out-of-memory error on the first pass against a "
                   "normal run: same seeds, same draws, limit learned")
    for label, fn in (("draws", _oom_draws), ("logits", _oom_logits), ("eot", _oom_eot),
                      ("memory_fraction", _oom_memory_fraction)):
        with _quiet("advdefense.randomness"):
            got = run.item(rec, label, partial(fn, run))
        if got is not None:
            rec[label] = got
    parts = []
    if "draws" in rec:
        d = rec["draws"]
        parts.append(f"draws bit-identical after a forced OOM at {d['failed_pass_rows']} rows "
                     f"(limit {d['learned_row_limit']})")
    for label in ("logits", "eot", "memory_fraction"):
        if label in rec:
            r = rec[label]
            same = (r["bit_identical"] if "bit_identical" in r
                    else r["loss"]["bit_identical"] and r["grad"]["bit_identical"])
            parts.append(f"{label}: {'bit-identical' if same else 'equal to rounding'}, "
                         f"limit {r['learned_row_limit']}")
    skipped = [s["item"] + ": " + s["reason"] for s in rec.get("skipped_items", [])]
    rec["summary"] = "; ".join(parts + skipped)


# -- phase: certify --------------------------------------------------------------------------
@contextlib.contextmanager
def _record_noise(store: list[torch.Tensor]) -> Iterator[None]:
    """Record the raw N(0, I) state of the GaussianInput of every NoisyBase built inside."""
    from advdefense.defenses import smoothing

    real = smoothing.NoisyBase.__init__

    def with_hook(self, base, sigma):
        real(self, base, sigma)
        self.noise.register_forward_hook(
            lambda mod, inp, out: store.append(mod.last_state.detach().flatten(1)))

    smoothing.NoisyBase.__init__ = with_hook
    try:
        yield
    finally:
        smoothing.NoisyBase.__init__ = real


def phase_certify(run: Runner, rec: dict[str, Any]) -> None:
    from advdefense.defenses import smoothing
    from advdefense.models import build_model

    a = run.args
    dev = run.device
    torch.manual_seed(0)
    net = build_model("smallcnn", num_classes=10, in_channels=3, image_size=32,
                      mean=CIFAR_MEAN, std=CIFAR_STD).double().to(dev).eval()
    x = synthetic(a.certify_images, 10, seed=8)[0].double().to(dev)
    settings = ((4096, 1000), (300, 37)) if not a.cpu_smoke else ((4096, 1000), (50, 7))
    rec["what"] = (f"certify(n={a.certify_n}, n0={a.certify_n0}, sigma 0.25, seed 0) of "
                   f"{a.certify_images} CIFAR-shaped images on a smallcnn in float64, at "
                   f"(max_batch, batch_samples) = {settings[0]} and {settings[1]}")
    results = []
    for max_batch, batch_samples in settings:
        draws: list[torch.Tensor] = []
        with _record_noise(draws):
            run.sync()
            t0 = time.perf_counter()
            res = smoothing.certify(net, x, sigma=0.25, n0=a.certify_n0, n=a.certify_n,
                                    max_batch=max_batch, batch_samples=batch_samples, seed=0)
            run.sync()
            seconds = time.perf_counter() - t0
        results.append((res, torch.cat(draws), seconds))
    expected = a.certify_images * (a.certify_n0 + a.certify_n)
    (r1, d1, s1), (r2, d2, s2) = results
    u1 = torch.unique(d1, dim=0)
    same_draws = d1.shape == d2.shape and torch.equal(u1, torch.unique(d2, dim=0))
    same_result = all(torch.equal(getattr(r1, f), getattr(r2, f))
                      for f in ("prediction", "radius", "p_lower", "count"))
    rec.update({
        "noise_rows": [int(d1.shape[0]), int(d2.shape[0])], "expected_rows": expected,
        "unique_rows": int(u1.shape[0]), "same_draws_at_both_settings": bool(same_draws),
        "identical_results": bool(same_result),
        "certify_seconds": [round(s1, 2), round(s2, 2)],
        "samples_per_s": round(expected / s1, 1),
        "predictions": r1.prediction.tolist(), "counts": r1.count.tolist(),
        "radii": [round(float(v), 4) for v in r1.radius]})
    rec["summary"] = (f"{u1.shape[0]} distinct draws of {expected}; draws "
                      f"{'identical' if same_draws else 'DIFFERENT'} and results "
                      f"{'identical' if same_result else 'DIFFERENT'} at both settings; "
                      f"{expected / s1:.0f} samples/s")
    assert d1.shape[0] == expected and d2.shape[0] == expected, rec["noise_rows"]
    assert u1.shape[0] == expected, f"only {u1.shape[0]} distinct draws of {expected}"
    assert same_draws, "the two max_batch settings drew different noise"
    assert same_result, "same draws, different certificates (votes flipped by rounding?)"


# -- phase: seeding on the device ------------------------------------------------------------
def phase_seeding(run: Runner, rec: dict[str, Any]) -> None:
    from advdefense.defenses.noise import GaussianInput
    from advdefense.defenses.rna import RandomNormalization
    from advdefense.randomness import DrawOutputs, replicated_forward

    dev = run.device
    rows, copies = 300, 3
    torch.manual_seed(0)
    models = {
        "gaussian_input": nn.Sequential(GaussianInput(0.5), nn.Flatten()),
        "rna_per_sample": nn.Sequential(nn.Conv2d(3, 4, 3, padding=1),
                                        RandomNormalization(4, ("bn", "in"), granularity="sample"),
                                        nn.Flatten())}
    x = torch.rand(1, 3, 8, 8, device=dev).repeat(rows, 1, 1, 1)  # the same image in every row

    def draws(model: nn.Module, max_batch: int, seed: int) -> torch.Tensor:
        out = DrawOutputs(copies, rows)

        def body(xr, start, k0, kc):
            out.put(model(xr), start, k0, kc)

        with torch.no_grad():
            replicated_forward(model, x, copies, body, max_batch=max_batch, seed=seed)
        return out.value

    rec["what"] = (f"replicated_forward on {dev.type}: {copies} draws over {rows} rows of one "
                   "image, seeds 3 (twice) and 4, max_batch 4096 and 64")
    for name, model in models.items():
        def check(model: nn.Module = model, name: str = name) -> dict[str, Any]:
            model = model.to(dev).eval()
            cpu_state = torch.get_rng_state()
            cuda_state = torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None
            a, b = draws(model, 4096, 3), draws(model, 4096, 3)
            c, d = draws(model, 64, 3), draws(model, 4096, 4)
            out = {"device": str(a.device),
                   "same_seed_same_draws": bool(torch.equal(a, b)),
                   "max_batch_64_equals_4096": bool(torch.equal(a, c)),
                   "other_seed_other_draws": not torch.equal(a, d),
                   "examples_differ_across_chunks": not torch.equal(a[:, :64], a[:, 64:128]),
                   "caller_cpu_rng_untouched": bool(torch.equal(cpu_state, torch.get_rng_state())),
                   "caller_cuda_rng_untouched": None if cuda_state is None else bool(
                       torch.equal(cuda_state, torch.cuda.get_rng_state(dev)))}
            bad = [k for k, v in out.items() if v is False]
            assert not bad, f"{name}: {bad}"
            return out

        got = run.item(rec, name, check)
        if got is not None:
            rec[name] = got
    ok = [n for n in models if n in rec]
    rec["summary"] = (f"{', '.join(ok) or 'none'}: reproducible, independent of max_batch, "
                      f"caller's RNG untouched on {dev.type}")


# -- phase: sharded evaluate -----------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_processes(cmds: dict[str, list[str]], env: dict[str, str], timeout: float
                   ) -> dict[str, tuple[str, float]]:
    """Run the commands side by side, each in its own process group; returns each one's
    stdout and seconds. On a failure, a timeout or any interruption every group still running
    (torchrun and its workers) is killed."""
    t0 = time.perf_counter()
    procs = {label: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env, cwd=str(ROOT), start_new_session=True)
             for label, cmd in cmds.items()}
    done: dict[str, tuple[str, float]] = {}
    try:
        for label, proc in procs.items():
            left = max(timeout - (time.perf_counter() - t0), 5.0)
            out, err = proc.communicate(timeout=left)
            if proc.returncode != 0:
                raise RuntimeError(f"{label}: {' '.join(cmds[label][:6])} ... exited "
                                   f"{proc.returncode}:\n{err[-3000:]}")
            done[label] = (out, time.perf_counter() - t0)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return done


def mnist_linear() -> nn.Module:
    """The sharded evaluate's model (``--model benchmarks/gpu_check.py:mnist_linear``): a
    linear classifier of 28x28 grey images; its weights come from ``--weights``."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))


def phase_sharded(run: Runner, rec: dict[str, Any]) -> None:
    import importlib.util
    import inspect

    import advdefense
    from advdefense.commands import evaluate as evaluate_command

    if (importlib.util.find_spec("advdefense.evaluation.distributed") is None
            or "torchrun" not in inspect.getsource(evaluate_command)):
        raise Skip("no sharded evaluate entry point (advdefense.evaluation.distributed and "
                   "torchrun support in the evaluate command)")
    from advdefense.data import as_tensors, load_split

    a = run.args
    folder = run.tmp / "sharded"
    folder.mkdir(parents=True, exist_ok=True)
    # nearest class mean of the mnist5k training images: most test images start correct
    images, labels = as_tensors(load_split("mnist5k", "train"))
    means = torch.stack([images[labels == c].flatten(1).mean(0) for c in range(10)])
    weights = folder / "weights.pt"
    torch.save({"1.weight": means, "1.bias": -0.5 * means.pow(2).sum(1)}, weights)
    dev = str(run.device)  # cuda:N: on one GPU both processes share it
    evaluate = ["-m", "advdefense", "evaluate", "--model", "benchmarks/gpu_check.py:mnist_linear",
                "--weights", str(weights),
                "--dataset", "mnist5k", "--attacks", "fgsm,pgd", "--eps", "0.3", "--steps", "3",
                "--examples", str(a.sharded_examples), "--batch-size", "16", "--seed", "0",
                "--device", dev, "--no-progress", "--no-checks"]
    src = str(Path(advdefense.__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    rec["what"] = (f"advdefense evaluate (fgsm, pgd-3, eps 0.3) of {a.sharded_examples} mnist5k "
                   f"test images on {dev}, a nearest-class-mean linear classifier: torchrun "
                   "with 2 processes (gloo) against 1 process")
    prefixes = {"one": [sys.executable],
                "two": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        "--master_addr=127.0.0.1", f"--master_port={_free_port()}"]}
    done = _run_processes({label: [*prefix, *evaluate, "--output", str(folder / label)]
                           for label, prefix in prefixes.items()},
                          env, timeout=min(180.0, run.remaining() + GRACE_S))
    reports = {label: json.loads((folder / label / "report.json").read_text()) for label in done}
    # both ran side by side; each is collected (and timed) once the one before it is done
    rec["seconds_side_by_side"] = {label: round(t, 1) for label, (_, t) in done.items()}
    rec["reports_written"] = done["two"][0].count("wrote ")
    p1, p2 = reports["one"]["per_example"], reports["two"]["per_example"]

    def fgsm(p):
        return next(v for k, v in p["attacks"].items() if k.startswith("fgsm"))["correct"]

    rec.update({"processes": reports["two"].get("processes"), "n": reports["two"].get("n"),
                "labels_equal": p1["labels"] == p2["labels"],
                "clean_equal": p1["clean"] == p2["clean"], "fgsm_equal": fgsm(p1) == fgsm(p2),
                "clean_correct": sum(p1["clean"]["all"])})
    same = rec["labels_equal"] and rec["clean_equal"] and rec["fgsm_equal"]
    rec["summary"] = (f"2 processes on {dev}: n={rec['n']}, labels/clean/FGSM per example "
                      f"{'equal' if same else 'DIFFERENT'} to 1 process")
    assert rec["processes"] == 2 and rec["n"] == a.sharded_examples, rec
    assert rec["clean_correct"] > 0, "no example starts correct: the comparison is empty"
    assert rec["labels_equal"] and rec["clean_equal"] and rec["fgsm_equal"], rec
    assert rec["reports_written"] == 1, "more than one process reported"


# -- the earlier checks (off by default) -----------------------------------------------------
def train_check(run: Runner, path: Path, mode: str) -> dict[str, Any]:
    from advdefense.config import load_config
    from advdefense.data import dataset_info
    from advdefense.training.trainer import Trainer

    args = run.args
    overrides = [f"output_dir={run.tmp / f'{path.stem}-{mode}'}", "train.epochs=1",
                 "data.monitor_size=0", "data.num_workers=0", "train.init_from=null",
                 *MODES[mode]]
    if args.cpu_smoke:
        overrides += [*SMOKE_MODEL, "data.batch_size=4", "train.attack.steps=1"]
        if mode == "compile":
            overrides.append("train.compile=eager")
    cfg = load_config(path, overrides)
    batch = cfg.data.batch_size
    total = max(args.warmup, 1) + args.steps
    x, y = synthetic(batch * total, dataset_info(cfg.data.name).num_classes)
    if mode == "compile":
        from torch import _dynamo

        _dynamo.reset()
        _dynamo.utils.counters.clear()
    trainer = Trainer(cfg, device=run.device, progress=False, train_set=TensorDataset(x, y))
    trainer.model.train()
    trainer.train_model.train()
    logs: dict[str, float] = {}

    def step(i: int) -> None:
        nonlocal logs
        logs = trainer.train_step(x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch])
        bad = {k: v for k, v in logs.items() if not math.isfinite(float(v))}
        if bad:
            raise RuntimeError(f"non-finite training logs at step {i}: {bad}")

    warmup = max(args.warmup, 1) if mode == "compile" else args.warmup
    try:
        for i in range(warmup):
            step(i)
        if mode == "compile" and getattr(trainer.train_model, "compiled", None) is None:
            raise RuntimeError("torch.compile failed and the Trainer fell back to eager "
                               "(see the warning above)")
        run.sync()
        run.reset_peak()
        t0 = time.perf_counter()
        for i in range(warmup, warmup + args.steps):
            step(i)
        run.sync()
        seconds = time.perf_counter() - t0
    finally:
        trainer.close()
    row: dict[str, Any] = {
        "check": f"train {path.stem} {mode}", "config": path.stem, "mode": mode,
        "model": cfg.model.name, "recipe": cfg.train.recipe, "batch": batch,
        "img_per_s": round(batch * args.steps / seconds, 1),
        "step_s": round(seconds / args.steps, 4), "peak_mib": run.peak_mib(),
        "loss": round(float(logs.get("loss", float("nan"))), 4)}
    if mode == "compile":
        from torch._dynamo.utils import counters

        row["graph_breaks"] = sum(counters["graph_break"].values())
        row["graphs"] = int(counters["stats"].get("unique_graphs", 0))
    return row


def _old_row(run: Runner, rec: dict[str, Any], label: str, fn: Callable[[], dict]) -> None:
    t0 = time.perf_counter()
    row = run.item(rec, label, fn)
    if row is not None:
        row.setdefault("check", label)
        row["wall_s"] = round(time.perf_counter() - t0, 2)
        run.payload["rows"].append(row)
        rec.setdefault("rows", []).append(row)


def _selected_configs(args: argparse.Namespace) -> list[Path]:
    configs = cifar_configs()
    if args.configs != "all":
        wanted = set(args.configs.split(","))
        configs = [p for p in configs if p.stem in wanted]
    return configs


def phase_configs(run: Runner, rec: dict[str, Any], *, compiled: bool = False) -> None:
    args = run.args
    configs = _selected_configs(args)
    if compiled:
        wanted = ({p.stem for p in configs} if args.compile_configs == "all"
                  else set(args.compile_configs.split(",")))
        todo = [(p, "compile") for p in configs if p.stem in wanted and "compile" in args.modes]
    else:
        todo = [(p, m) for p in configs for m in args.modes if m != "compile"]
    for path, mode in todo:
        _old_row(run, rec, f"train {path.stem} {mode}", partial(train_check, run, path, mode))
    rows = rec.get("rows", [])
    rec["summary"] = f"{len(rows)} of {len(todo)} config runs ok"


def suite_check(run: Runner) -> dict[str, Any]:
    from advdefense.evaluation.suite import run_suite

    args = run.args
    model = _model_from(RNA_CONFIG, args).to(run.device).eval()
    x, _ = synthetic(args.images, 10, seed=1)
    with torch.no_grad():  # attack every image: labels = the model's own predictions
        y = torch.cat([model(x[i:i + 100].to(run.device)).argmax(1).cpu()
                       for i in range(0, len(x), 100)])
    run.reset_peak()
    t0 = time.perf_counter()
    res = run_suite(model, (x, y), suite="rand", eps=8 / 255, eot_samples=args.eot_samples,
                    repeats=args.repeats, batch_size=args.images, seed=0, progress=False,
                    checks=not args.cpu_smoke)
    run.sync()
    return {"check": "evaluate --suite rand", "model": run.model_name("rna"),
            "images": args.images, "eot_samples": args.eot_samples, "repeats": args.repeats,
            "seconds": round(time.perf_counter() - t0, 2), "peak_mib": run.peak_mib(),
            "checks": not args.cpu_smoke, "robust": str(res.accuracy("worst"))}


def smoothing_check(run: Runner) -> dict[str, Any]:
    from advdefense.defenses.smoothing import SmoothedClassifier

    args = run.args
    base = _model_from("cni_w_cifar10_resnet20", args).to(run.device).eval()
    smoothed = SmoothedClassifier(base, sigma=0.25, m=args.m).eval()
    x, _ = synthetic(args.images, 10, seed=2)
    x = x.to(run.device)
    run.reset_peak()
    t0 = time.perf_counter()
    with torch.no_grad():
        pred = smoothed.predict(x)
    run.sync()
    seconds = time.perf_counter() - t0
    if pred.shape != (args.images,):
        raise RuntimeError(f"smoothed predictions have shape {tuple(pred.shape)}")
    return {"check": f"smoothing m={args.m}",
            "model": "cni-w resnet20" if not args.cpu_smoke else "cni-w wrn-10-1",
            "images": args.images, "m": args.m, "seconds": round(seconds, 2),
            "forwards_per_s": round(args.images * args.m / seconds, 1),
            "peak_mib": run.peak_mib()}


def rna_forward_check(run: Runner) -> dict[str, Any]:
    from advdefense.defenses import rna

    args = run.args
    batch = 4 if args.cpu_smoke else 128
    reps = 1 if args.cpu_smoke else 10
    x = synthetic(batch, 10, seed=3)[0].to(run.device)
    variants = {"plain_bn": _model_from(PGD_AT_CONFIG, args).to(run.device)}
    for name, value in (("sync_free", True), ("host_reads", False)):
        model = _model_from(RNA_CONFIG, args).to(run.device)
        for la in rna.rna_layers(model):
            la.sync_free = value
        variants[name] = model

    def attack_step(model: nn.Module) -> None:
        model.eval()
        xi = x.clone().requires_grad_(True)
        torch.autograd.grad(model(xi).logsumexp(1).sum(), xi)

    def train_step(model: nn.Module) -> None:
        model.train()
        model.zero_grad(set_to_none=True)
        model(x).logsumexp(1).sum().backward()

    row: dict[str, Any] = {"check": "rna forward", "batch": batch}
    for kind, fn in (("attack", attack_step), ("train", train_step)):
        for name, model in variants.items():
            fn(model)  # warm-up (cuDNN autotuning)
            run.sync()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn(model)
            run.sync()
            row[f"{kind}_{name}_img_per_s"] = round(batch * reps / (time.perf_counter() - t0), 1)
    return row


def _one_old(check: Callable[[Runner], dict]) -> Callable[[Runner, dict], None]:
    def phase(run: Runner, rec: dict[str, Any]) -> None:
        _old_row(run, rec, check.__name__, partial(check, run))
        rows = rec.get("rows", [])
        rec["summary"] = "  ".join(f"{k}={v}" for k, v in rows[0].items()
                                   if k not in ("check",)) if rows else ""
    return phase


PHASES: dict[str, tuple[Callable[[Runner, dict], None], str]] = {
    "pgd_at": (phase_pgd_at, "PGD-AT ResNet-18 training steps"),
    "attacks": (phase_attacks, "attacks vs torchattacks and the limit"),
    "syncs": (phase_syncs, "host syncs per attack step"),
    "oom": (phase_oom, "out-of-memory recovery"),
    "certify": (phase_certify, "certify draws"),
    "seeding": (phase_seeding, "seeding on the device"),
    "sharded": (phase_sharded, "2-process sharded evaluate"),
    "pgd_at_compile": (phase_pgd_at_compile, "PGD-AT step with torch.compile"),
    "configs": (phase_configs, "training steps of every CIFAR config"),
    "configs_compile": (partial(phase_configs, compiled=True), "compiled config training"),
    "suite": (_one_old(suite_check), "evaluate --suite rand"),
    "smoothing": (_one_old(smoothing_check), "smoothed predictions"),
    "rna": (_one_old(rna_forward_check), "RNA forward variants"),
}


# -- command line ----------------------------------------------------------------------------
def _phase_list(spec: str, skip: str) -> list[str]:
    wanted: set[str] = set()
    for name in filter(None, (s.strip() for s in spec.split(","))):
        if name in GROUPS and name != "train":
            wanted |= set(GROUPS[name])
        elif name in PHASES:
            wanted.add(name)
        else:
            raise ValueError(f"unknown phase {name!r}; choose from {', '.join(ORDER)} or "
                             f"{', '.join(g for g in GROUPS if g != 'train')}")
    for name in filter(None, (s.strip() for s in skip.split(","))):
        wanted -= set(GROUPS.get(name, (name,)))
    return [p for p in ORDER if p in wanted]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny sizes on the CPU (what the test suite runs)")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --cpu-smoke)")
    p.add_argument("--budget", type=float, default=420.0,
                   help="seconds for all phases (default 420: with start-up, within 8 minutes)")
    p.add_argument("--out", default=None,
                   help=f"the JSON file (default: {DEFAULT_OUT} on a GPU, none in the smoke run)")
    p.add_argument("--phases", default="new",
                   help="comma-separated phases or groups: new (default), old, all, or any of "
                        + ", ".join(ORDER))
    p.add_argument("--skip", default="", help="comma-separated phases to leave out")
    p.add_argument("--no-watchdog", action="store_true",
                   help="do not stop a phase that runs past the budget (CUDA)")
    g = p.add_argument_group("new phases")
    g.add_argument("--train-steps", type=int, default=10, help="timed PGD-AT steps per mode")
    g.add_argument("--train-warmup", type=int, default=3, help="untimed PGD-AT steps first")
    g.add_argument("--attack-batch", type=int, default=128)
    g.add_argument("--pgd-steps", type=int, default=20)
    g.add_argument("--apgd-iters", type=int, default=20,
                   help="APGD-CE iterations on both sides (100 do not fit the budget)")
    g.add_argument("--eot", type=int, default=20, help="EOT draws of the RNA EOT-PGD rows")
    g.add_argument("--eot-steps", type=int, default=10, help="PGD steps of the EOT-PGD rows")
    g.add_argument("--rounds", type=int, default=5, help="timed rounds of the PGD/APGD rows")
    g.add_argument("--eot-rounds", type=int, default=3, help="timed rounds of the EOT rows")
    g.add_argument("--warmup-rounds", type=int, default=1, help="untimed rounds first")
    g.add_argument("--certify-n", type=int, default=10_000)
    g.add_argument("--certify-n0", type=int, default=100)
    g.add_argument("--certify-images", type=int, default=4)
    g.add_argument("--sharded-examples", type=int, default=45)
    g.add_argument("--compile-min-s", type=float, default=150.0,
                   help="budget seconds pgd_at_compile needs to start")
    o = p.add_argument_group("old phases (configs, suite, smoothing, rna, configs_compile)")
    o.add_argument("--modes", default="fp32,bf16,fp16,compile")
    o.add_argument("--configs", default="all", help="comma-separated config stems, or all")
    o.add_argument("--compile-configs", default=",".join(COMPILE_DEFAULT),
                   help="configs also run with compile (comma-separated stems, or all)")
    o.add_argument("--steps", type=int, default=2, help="timed training steps per config run")
    o.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    o.add_argument("--images", type=int, default=100)
    o.add_argument("--m", type=int, default=512, help="smoothing samples per image")
    o.add_argument("--eot-samples", type=int, default=20)
    o.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.device = args.device or "cpu"
        args.train_steps, args.train_warmup = 1, 0  # compile still warms up one step
        args.attack_batch, args.pgd_steps, args.apgd_iters = 4, 2, 2
        args.eot, args.eot_steps = 2, 1
        args.rounds, args.eot_rounds, args.warmup_rounds = 1, 1, 0
        args.certify_n, args.certify_n0, args.certify_images = 100, 10, 2
        args.sharded_examples = 12
        args.compile_min_s = 0.0
        args.steps, args.warmup, args.images, args.m = 1, 0, 4, 8
        args.eot_samples, args.repeats = 2, 2
        args.compile_configs = "rna_cifar10_resnet18"
        args.modes = ",".join(m for m in args.modes.split(",") if m != "fp16")
    elif args.out is None:
        args.out = str(ROOT / DEFAULT_OUT)
    args.device = args.device or "cuda"
    args.modes = [m for m in args.modes.split(",") if m]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        print(f"FAIL  unknown modes {unknown}; choose from {', '.join(MODES)}", flush=True)
        return 1
    try:
        args.phase_list = _phase_list(args.phases, args.skip)
    except ValueError as exc:
        print(f"FAIL  {exc}", flush=True)
        return 1
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("FAIL  no CUDA device; run on a GPU machine, or pass --cpu-smoke", flush=True)
        return 1
    if device.type == "cuda":
        if device.index is None:  # some CUDA calls take only an indexed device
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # what the Trainer sets on CUDA: every phase alike
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        run = Runner(args, device, Path(tmp))
        m = run.payload["machine"]
        print(f"gpu_check on {device} ({m.get('gpu') or m['cpu']}), torch {m['torch']}, "
              f"CUDA {m['cuda_runtime']}, budget {args.budget:.0f} s, phases "
              f"{','.join(args.phase_list)}{' [cpu smoke]' if args.cpu_smoke else ''}",
              flush=True)
        run.save()
        for name in args.phase_list:
            fn, _ = PHASES[name]
            min_s = args.compile_min_s if name in ("pgd_at_compile", "configs_compile") else 0.0
            run.phase(name, partial(fn, run), min_s=min_s)
        failures = run.failures()
        run.payload["failures"] = failures
        run.payload["complete"] = True
        run.save()
    statuses = Counter(rec["status"] for rec in run.payload["phases"].values())
    print(f"done in {run.elapsed():.1f} s: "
          + ", ".join(f"{v} {k}" for k, v in statuses.items())
          + (f"; wrote {args.out}" if args.out else ""), flush=True)
    if failures:
        print("FAILED: " + ", ".join(failures), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
