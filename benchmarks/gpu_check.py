"""GPU check: does every paper-sized configuration run on this GPU, how fast, in how much memory?

On synthetic CIFAR-shaped data (uniform pixels, random labels), within a time budget (default
600 s on one GPU):

1. **training**: a few optimizer steps of every CIFAR config in ``configs/`` (the config's own
   model, defense, recipe, attack and batch size) in ``fp32``, ``bf16`` and ``fp16`` autocast,
   and with ``torch.compile`` (default inductor backend) for an RNA and a CAS config
   (``--compile-configs all`` for every one; compilation takes about a minute per config);
   throughput (training images per second, inner attack included) and peak memory
   per step;
2. **evaluation**: ``advdefense.evaluation.run_suite(..., suite="rand")`` on 100 images of an
   RNA ResNet-18 (labels = the model's own predictions, so every image is attacked; with
   random weights the images fall within the first iterations, so this row shows that the
   evaluation runs end to end on the GPU, not what evaluating a trained model costs);
3. **smoothing**: ``SmoothedClassifier(m=512)`` predictions on 100 images of the CNI-W
   ResNet-20;
4. **RNA forward**: attack steps (eval mode, gradient to the input) and training steps of the
   RNA ResNet-18 at batch 128 with the sync-free forward (every type, merged on the device:
   the CUDA default) and with the drawn-types-only forward (reads the draw on the host: the CPU
   default), beside plain BatchNorm; says what the sync-free forward costs on this GPU.

The compiled runs come last (they are the slowest to start). Every failure (an exception, a
non-finite loss, a compile that fell back to eager, the budget running out) is printed with
its traceback and makes the exit status 1.

``--cpu-smoke`` shrinks everything (a WRN-10-1 for every model, batch 4, one attack step, one
timed step, four images, m = 8, ``compile`` with the ``eager`` backend, no fp16) so the same code
runs on a CPU in seconds; the test suite runs it.

Usage::

    python benchmarks/gpu_check.py                      # on a CUDA machine, about 10 minutes
    python benchmarks/gpu_check.py --out gpu_check.json # also write the rows as JSON
    python benchmarks/gpu_check.py --cpu-smoke          # the CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
MODES: dict[str, list[str]] = {
    "fp32": [],
    "bf16": ["train.amp=bf16"],
    "fp16": ["train.amp=fp16"],
    "compile": ["train.compile=true"],
}
COMPILE_DEFAULT = ("rna_cifar10_resnet18", "cas_trades_cifar10_resnet18")
SMOKE_MODEL = ["model.name=wrn", "model.kwargs={depth: 10, width: 1}"]


def cifar_configs() -> list[Path]:
    from advdefense.config import load_config

    return [p for p in sorted(CONFIGS.glob("*.yaml"))
            if load_config(p).data.name in ("cifar10", "cifar100", "svhn")]


def synthetic(n: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(classes, (n,), generator=g)


class Check:
    """Runs named checks within a budget, collects rows and failures."""

    def __init__(self, device: torch.device, budget: float) -> None:
        self.device = device
        self.budget = budget
        self.start = time.perf_counter()
        self.rows: list[dict[str, Any]] = []
        self.failures: list[str] = []

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

    def run(self, name: str, fn: Callable[[], dict[str, Any]]) -> None:
        elapsed = time.perf_counter() - self.start
        if elapsed > self.budget:
            self.failures.append(f"{name}: not run, the {self.budget:.0f} s budget is spent")
            print(f"FAIL  {name}: not run (budget of {self.budget:.0f} s spent)", flush=True)
            return
        t0 = time.perf_counter()
        try:
            row = {"check": name, **fn()}
        except Exception:  # noqa: BLE001 - every failure is reported, then the exit status
            self.failures.append(f"{name}:\n{traceback.format_exc()}")
            print(f"FAIL  {name}\n{traceback.format_exc()}", flush=True)
            return
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        row["wall_s"] = round(time.perf_counter() - t0, 2)
        self.rows.append(row)
        shown = {k: v for k, v in row.items() if k != "check"}
        print(f"ok    {name}  " + "  ".join(f"{k}={v}" for k, v in shown.items()), flush=True)


def _dynamo_counts() -> tuple[int, int]:
    from torch._dynamo.utils import counters

    return (sum(counters["graph_break"].values()),
            int(counters["stats"].get("unique_graphs", 0)))


def train_check(check: Check, path: Path, mode: str, args: argparse.Namespace,
                workdir: Path) -> dict[str, Any]:
    from advdefense.config import load_config
    from advdefense.training.trainer import Trainer

    overrides = [f"output_dir={workdir / f'{path.stem}-{mode}'}", "train.epochs=1",
                 "data.monitor_size=0", "data.num_workers=0", "train.init_from=null",
                 *MODES[mode]]
    if args.cpu_smoke:
        overrides += [*SMOKE_MODEL, "data.batch_size=4", "train.attack.steps=1"]
        if mode == "compile":
            overrides.append("train.compile=eager")
    cfg = load_config(path, overrides)
    batch = cfg.data.batch_size
    total = max(args.warmup, 1) + args.steps
    from advdefense.data import dataset_info

    x, y = synthetic(batch * total, dataset_info(cfg.data.name).num_classes)
    if mode == "compile":
        import torch._dynamo

        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
    trainer = Trainer(cfg, device=check.device, progress=False,
                      train_set=TensorDataset(x, y))
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
    for i in range(warmup):
        step(i)
    if mode == "compile" and getattr(trainer.train_model, "compiled", None) is None:
        raise RuntimeError("torch.compile failed and the Trainer fell back to eager "
                           "(see the warning above)")
    check.sync()
    check.reset_peak()
    t0 = time.perf_counter()
    for i in range(warmup, warmup + args.steps):
        step(i)
    check.sync()
    seconds = time.perf_counter() - t0
    row: dict[str, Any] = {
        "config": path.stem, "mode": mode, "model": cfg.model.name, "recipe": cfg.train.recipe,
        "batch": batch, "img_per_s": round(batch * args.steps / seconds, 1),
        "step_s": round(seconds / args.steps, 4), "peak_mib": check.peak_mib(),
        "loss": round(float(logs.get("loss", float("nan"))), 4)}
    if mode == "compile":
        row["graph_breaks"], row["graphs"] = _dynamo_counts()
    trainer.close()
    return row


def _model_from(config: str, args: argparse.Namespace) -> torch.nn.Module:
    from advdefense.config import build_from_config, load_config

    overrides = SMOKE_MODEL if args.cpu_smoke else []
    torch.manual_seed(0)
    model, _ = build_from_config(load_config(CONFIGS / f"{config}.yaml", overrides))
    return model


def suite_check(check: Check, args: argparse.Namespace) -> dict[str, Any]:
    try:
        from advdefense.evaluation import run_suite
    except ImportError:  # older layouts export it from the suite module only
        from advdefense.evaluation.suite import run_suite

    model = _model_from("rna_cifar10_resnet18", args).to(check.device).eval()
    x, _ = synthetic(args.images, 10, seed=1)
    with torch.no_grad():  # attack every image: labels = the model's own predictions
        y = torch.cat([model(x[i:i + 100].to(check.device)).argmax(1).cpu()
                       for i in range(0, len(x), 100)])
    check.reset_peak()
    t0 = time.perf_counter()
    res = run_suite(model, (x, y), suite="rand", eps=8 / 255, eot_samples=args.eot_samples,
                    repeats=args.repeats, batch_size=args.images, seed=0, progress=False,
                    checks=not args.cpu_smoke)
    check.sync()
    return {"model": "rna resnet18" if not args.cpu_smoke else "rna wrn-10-1",
            "images": args.images, "eot_samples": args.eot_samples, "repeats": args.repeats,
            "seconds": round(time.perf_counter() - t0, 2), "peak_mib": check.peak_mib(),
            "checks": not args.cpu_smoke, "robust": str(res.accuracy("worst"))}


def smoothing_check(check: Check, args: argparse.Namespace) -> dict[str, Any]:
    from advdefense.defenses.smoothing import SmoothedClassifier

    base = _model_from("cni_w_cifar10_resnet20", args).to(check.device).eval()
    smoothed = SmoothedClassifier(base, sigma=0.25, m=args.m).eval()
    x, _ = synthetic(args.images, 10, seed=2)
    x = x.to(check.device)
    check.reset_peak()
    t0 = time.perf_counter()
    with torch.no_grad():
        pred = smoothed.predict(x)
    check.sync()
    seconds = time.perf_counter() - t0
    if pred.shape != (args.images,):
        raise RuntimeError(f"smoothed predictions have shape {tuple(pred.shape)}")
    return {"model": "cni-w resnet20" if not args.cpu_smoke else "cni-w wrn-10-1",
            "images": args.images, "m": args.m, "seconds": round(seconds, 2),
            "forwards_per_s": round(args.images * args.m / seconds, 1),
            "peak_mib": check.peak_mib()}


def rna_forward_check(check: Check, args: argparse.Namespace) -> dict[str, Any]:
    from advdefense.defenses import rna

    batch = 4 if args.cpu_smoke else 128
    reps = 1 if args.cpu_smoke else 10
    x, _ = synthetic(batch, 10, seed=3)
    x = x.to(check.device)
    plain_overrides = SMOKE_MODEL if args.cpu_smoke else []
    from advdefense.config import build_from_config, load_config

    torch.manual_seed(0)
    plain, _ = build_from_config(load_config(CONFIGS / "pgd_at_cifar10_resnet18.yaml",
                                             plain_overrides))
    variants = {"plain_bn": plain.to(check.device)}
    for name, value in (("sync_free", True), ("host_reads", False)):
        model = _model_from("rna_cifar10_resnet18", args).to(check.device)
        for la in rna.rna_layers(model):
            la.sync_free = value
        variants[name] = model

    def attack_step(model: torch.nn.Module) -> None:
        model.eval()
        xi = x.clone().requires_grad_(True)
        torch.autograd.grad(model(xi).logsumexp(1).sum(), xi)

    def train_step(model: torch.nn.Module) -> None:
        model.train()
        model.zero_grad(set_to_none=True)
        model(x).logsumexp(1).sum().backward()

    row: dict[str, Any] = {"batch": batch}
    for kind, fn in (("attack", attack_step), ("train", train_step)):
        for name, model in variants.items():
            fn(model)  # warm-up (cuDNN autotuning)
            check.sync()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn(model)
            check.sync()
            row[f"{kind}_{name}_img_per_s"] = round(batch * reps / (time.perf_counter() - t0), 1)
    return row


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny sizes on the CPU (what the test suite runs)")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --cpu-smoke)")
    p.add_argument("--budget", type=float, default=600.0, help="seconds for all checks")
    p.add_argument("--modes", default="fp32,bf16,fp16,compile")
    p.add_argument("--configs", default="all", help="comma-separated config stems, or all")
    p.add_argument("--compile-configs", default=",".join(COMPILE_DEFAULT),
                   help="configs also run with compile (comma-separated stems, or all)")
    p.add_argument("--steps", type=int, default=2, help="timed training steps per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--m", type=int, default=512, help="smoothing samples per image")
    p.add_argument("--eot-samples", type=int, default=20)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--skip", default="", help="comma-separated phases to skip: "
                   "train,suite,smoothing,rna")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.device = args.device or "cpu"
        args.steps, args.warmup, args.images, args.m = 1, 0, 4, 8
        args.eot_samples, args.repeats = 2, 2
        args.compile_configs = "rna_cifar10_resnet18"
        args.modes = ",".join(m for m in args.modes.split(",") if m != "fp16")
    args.device = args.device or "cuda"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("FAIL  no CUDA device; run on a GPU machine, or pass --cpu-smoke", flush=True)
        return 1
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"gpu_check on {device} ({name}), torch {torch.__version__}, budget "
          f"{args.budget:.0f} s{' [cpu smoke]' if args.cpu_smoke else ''}", flush=True)
    check = Check(device, args.budget)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        print(f"FAIL  unknown modes {unknown}; choose from {', '.join(MODES)}", flush=True)
        return 1
    skip = set(filter(None, args.skip.split(",")))
    configs = cifar_configs()
    if args.configs != "all":
        wanted = set(args.configs.split(","))
        configs = [p for p in configs if p.stem in wanted]
    compile_set = ({p.stem for p in configs} if args.compile_configs == "all"
                   else set(args.compile_configs.split(",")))
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        def train(path: Path, mode: str) -> None:
            check.run(f"train {path.stem} {mode}",
                      lambda: train_check(check, path, mode, args, Path(tmp)))

        if "train" not in skip:
            for path in configs:
                for mode in modes:
                    if mode != "compile":
                        train(path, mode)
        if "suite" not in skip:
            check.run("evaluate --suite rand", lambda: suite_check(check, args))
        if "smoothing" not in skip:
            check.run(f"smoothing m={args.m}", lambda: smoothing_check(check, args))
        if "rna" not in skip:
            check.run("rna forward", lambda: rna_forward_check(check, args))
        if "train" not in skip and "compile" in modes:
            for path in configs:
                if path.stem in compile_set:
                    train(path, "compile")
    total = time.perf_counter() - check.start
    print(f"{len(check.rows)} checks passed, {len(check.failures)} failed, {total:.1f} s",
          flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({
            "device": str(device), "name": name, "torch": torch.__version__,
            "cpu_smoke": args.cpu_smoke, "seconds": round(total, 1), "rows": check.rows,
            "failures": check.failures}, indent=1))
    if check.failures:
        print("FAILED:\n" + "\n".join(f.splitlines()[0] for f in check.failures), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
