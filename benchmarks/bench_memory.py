"""Peak memory of the EOT (and, when present, smoothing) paths as eot_samples / m grows.

Each configuration runs in a fresh subprocess (``--child``) so the peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``; tracemalloc does not see torch's CPU
allocations) belongs to that configuration alone. The child builds the model, runs one small
warm-up call, records its RSS high-water mark (the baseline), then runs the measured call and
records the new high-water mark. Reported: peak minus baseline, in MB.

* EOT path: one ``eot_loss_grad`` call (the per-step work of every EOT attack) on
  ``--batch`` images of a noisy ResNet-20, with ``eot_samples = k`` for growing ``k``, once at
  a fixed row budget ``max_batch`` (chunked) and once with ``max_batch = k * batch``
  (everything in one pass) for contrast.
* Smoothing path: ``SmoothedClassifier`` prediction with ``m`` growing at a fixed
  ``max_batch`` (only if ``advdefense.defenses.smoothing`` is importable).

The chunked rows must stay flat once the row budget is full: ratio = extra(largest k) /
extra(smallest k with k x batch >= max_batch), goal <= 1.5 (allocator noise); the unchunked
rows grow about linearly in k. Every value's numbers are in the JSON (``per_value``).

Run: ``python benchmarks/bench_memory.py``
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def child(path: str, model_name: str, n: int, k: int, max_batch: int, threads: int) -> dict:
    import torch
    from bench_eot import stochastic

    from advdefense import randomness

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    randomness.CPU_ROWS = None  # ``max_batch`` is the one row budget under test
    x, y = common.batch(model_name, n)
    if path == "eot":
        from advdefense.attacks import eot_loss_grad

        model = stochastic(model_name)
        eot_loss_grad(model, x[:1], y[:1], "ce", eot_samples=1, max_batch=max_batch)
        base = _rss_mb()
        eot_loss_grad(model, x, y, "ce", eot_samples=k, max_batch=max_batch)
    elif path == "smooth":
        from advdefense.defenses.smoothing import SmoothedClassifier

        base_model = common.build(model_name)
        SmoothedClassifier(base_model, sigma=0.25, m=1, max_batch=max_batch).predict(x[:1])
        base = _rss_mb()
        SmoothedClassifier(base_model, sigma=0.25, m=k, max_batch=max_batch).predict(x)
    else:
        raise SystemExit(f"unknown path {path}")
    peak = _rss_mb()
    return {"baseline_mb": base, "peak_mb": peak, "extra_mb": peak - base}


def have_smoothing() -> bool:
    try:
        import advdefense.defenses.smoothing as s  # noqa: F401
        return hasattr(s, "SmoothedClassifier")
    except ImportError:
        return False


def run_child(args, path, n, k, max_batch) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", path, args.model,
           str(n), str(k), str(max_batch), str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--child":
        _, path, model, n, k, mb, threads = argv
        print(json.dumps(child(path, model, int(n), int(k), int(mb), int(threads))))
        return 0
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--ks", default="1,8,32,64", help="eot_samples / m values")
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--smooth-ms", default="100,512,2048")
    p.add_argument("--smooth-batch", type=int, default=4)
    args = p.parse_args(argv)
    common.setup(args)
    ks = [int(k) for k in args.ks.split(",")]
    ms = [int(m) for m in args.smooth_ms.split(",")]
    n, smooth_n = args.batch, args.smooth_batch
    if args.quick:
        ks, ms, n, smooth_n, args.max_batch = [2, 4], [4, 16], 2, 2, 4
    rows, detail = [], {}
    series = [("eot", f"EOT chunked, max_batch {args.max_batch}", n, ks, lambda k: args.max_batch),
              ("eot", "EOT unchunked, max_batch = k x batch", n, ks, lambda k: k * n)]
    if have_smoothing():
        series.append(("smooth", f"smoothing, max_batch {args.max_batch}", smooth_n, ms,
                       lambda k: args.max_batch))
    for path, label, nn_, values, budget in series:
        res = {k: run_child(args, path, nn_, k, budget(k)) for k in values}
        detail[label] = res
        # flatness is judged from the first value that fills the row budget: below it a
        # call simply uses fewer rows (k=1 runs ``batch`` rows, not ``max_batch``)
        full = [k for k in values if k * nn_ >= budget(k)]
        lo, hi = (full[0] if full else values[0]), values[-1]
        ratio = max(res[hi]["extra_mb"], 1.0) / max(res[lo]["extra_mb"], 1.0)
        chunked = "unchunked" not in label
        rows.append(common.row(
            benchmark="peak memory", model=common_model(args.model, path),
            setting=f"{label}, batch {nn_}, k/m {lo} -> {hi}", metric="extra MB",
            ours=res[hi]["extra_mb"], reference=f"same at k/m={lo}", ref_value=res[lo]["extra_mb"],
            ratio=ratio, goal=1.5 if chunked else None, higher_is_better=False,
            per_value={str(k): v for k, v in res.items()}))
    common.write("memory", args, rows)
    return 0


def common_model(name: str, path: str) -> str:
    return f"{name}+noise" if path == "eot" else f"{name} smoothed"


if __name__ == "__main__":
    raise SystemExit(main())
