"""Smoothed prediction throughput vs the raw m-forward limit, in one run.

``SmoothedClassifier(base, sigma=0.25, m=m).predict(x)`` (hard vote) on ``--batch`` images,
m = 100 and 512, against the raw limit: ``m x batch`` rows of plain ``base`` forwards under
``torch.no_grad`` in chunks of the same rows per pass (``max_batch``, capped on the CPU by
``randomness.CPU_ROWS`` as ours is), with no noise and no voting. Images/s = images
classified per second.

Run: ``python benchmarks/bench_smoothing.py``
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from advdefense import randomness  # noqa: E402
from advdefense.defenses.smoothing import SmoothedClassifier  # noqa: E402


def limit_fn(model, x, m, max_batch):
    n = x.shape[0]
    rows = max_batch
    if x.device.type == "cpu" and randomness.CPU_ROWS is not None:
        rows = min(rows, randomness.CPU_ROWS)
    per_pass = max(1, rows // n)
    sizes = {min(per_pass, m - k0) for k0 in range(0, m, per_pass)}
    reps = {kc: x.repeat(kc, 1, 1, 1) for kc in sizes}

    def run():
        with torch.no_grad():
            for k0 in range(0, m, per_pass):
                out = model(reps[min(per_pass, m - k0)])
        return out
    return run


def main(argv=None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ms", default="100,512")
    p.add_argument("--max-batch", type=int, default=1024)
    p.add_argument("--sigma", type=float, default=0.25)
    args = p.parse_args(argv)
    common.setup(args)
    ms = [int(m) for m in args.ms.split(",")]
    if args.quick:
        args.batch, ms, args.max_batch = 2, [4], 4
    rows = []
    for name in args.models.split(","):
        model = common.build(name)
        x, _ = common.batch(name, args.batch)
        for m in ms:
            smoothed = SmoothedClassifier(model, sigma=args.sigma, m=m, max_batch=args.max_batch)
            fns = {"ours": partial(smoothed.predict, x),
                   "limit": limit_fn(model, x, m, args.max_batch)}
            times = common.interleaved(fns, warmup=args.warmup, repeats=args.repeats)
            rows.append(common.compare(
                times, "ours", "limit", n=args.batch, benchmark=f"smoothed predict m={m}",
                model=name, metric="img/s", reference=f"limit {m} forwards", goal=0.9,
                setting=f"batch {args.batch}, sigma {args.sigma}, max_batch {args.max_batch}",
                seconds=times, m=m))
    common.write("smoothing", args, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
