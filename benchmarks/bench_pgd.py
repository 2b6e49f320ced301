"""PGD-20 throughput: ours vs torchattacks.PGD vs the raw limit, measured in one run.

The raw limit of a PGD-20 call is 20 x (one forward + one backward to the input) of the same
model on the same batch, with nothing else (no projection, no bookkeeping). Compared, per
model, at the same eps / step size / steps / random start / batch:

* ``ours``      ``advdefense.attacks.PGD`` (keeps the best iterate, one extra forward at the end)
* ``ta``        ``torchattacks.PGD``
* ``limit``     20 x forward+backward-to-input
* ``ours_cl``   ours with model and input in channels_last
* ``ours_cmp``  ours on ``torch.compile(model)`` (compile time excluded by the warm-up;
  skipped with ``--no-compile`` and in ``--quick`` mode)

Run: ``flock /work/cpu.lock python benchmarks/bench_pgd.py``
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torchattacks
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from advdefense.attacks import PGD  # noqa: E402

EPS, ALPHA = 8 / 255, 2 / 255


def limit_fn(model, x, y, steps):
    def run():
        for _ in range(steps):
            xr = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(model(xr), y), xr)
        return g
    return run


def main(argv=None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args(argv)
    common.setup(args)
    if args.quick:
        args.batch, args.steps, args.no_compile = 4, 2, True
    rows = []
    for name in args.models.split(","):
        model = common.build(name)
        x, y = common.batch(name, args.batch)
        ours = PGD(eps=EPS, steps=args.steps, step_size=ALPHA, random_start=True, seed=0)
        ta = torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=args.steps, random_start=True)
        fns = {
            "ours": lambda m=model: ours(m, x, y),
            "ta": lambda: ta(x, y),
            "limit": limit_fn(model, x, y, args.steps),
        }
        model_cl = common.build(name).to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        fns["ours_cl"] = lambda: ours(model_cl, x_cl, y)
        if not args.no_compile:
            model_cmp = torch.compile(common.build(name))
            fns["ours_cmp"] = lambda: ours(model_cmp, x, y)
            fns["limit_cmp"] = limit_fn(model_cmp, x, y, args.steps)
            # compile outside the timed rounds, whatever --warmup says
            fns["ours_cmp"]()
        times = common.interleaved(fns, warmup=args.warmup, repeats=args.repeats)
        ips = {k: args.batch / common.median(v) for k, v in times.items()}
        setting = f"batch {args.batch}, {args.steps} steps, eps 8/255"
        base = dict(benchmark=f"PGD-{args.steps}", model=name, metric="img/s",
                    seconds=times)
        rows.append(common.row(**base, setting=setting, ours=ips["ours"], reference="torchattacks.PGD",
                               ref_value=ips["ta"], ratio=common.speed_ratio(times, "ours", "ta"),
                               goal=1.0))
        rows.append(common.row(**base, setting=setting, ours=ips["ours"],
                               reference=f"limit {args.steps}x(fwd+bwd)", ref_value=ips["limit"],
                               ratio=common.speed_ratio(times, "ours", "limit"), goal=0.95))
        rows.append(common.row(**base, setting=setting + ", channels_last", ours=ips["ours_cl"],
                               reference="torchattacks.PGD", ref_value=ips["ta"],
                               ratio=common.speed_ratio(times, "ours_cl", "ta"), goal=None))
        if "ours_cmp" in fns:
            rows.append(common.row(**base, setting=setting + ", torch.compile(model)",
                                   ours=ips["ours_cmp"], reference="torchattacks.PGD",
                                   ref_value=ips["ta"],
                                   ratio=common.speed_ratio(times, "ours_cmp", "ta"), goal=None))
            rows.append(common.row(**base, setting=setting + ", torch.compile(model)",
                                   ours=ips["ours_cmp"],
                                   reference=f"compiled limit {args.steps}x(fwd+bwd)",
                                   ref_value=ips["limit_cmp"],
                                   ratio=common.speed_ratio(times, "ours_cmp", "limit_cmp"),
                                   goal=None))
    common.write("pgd", args, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
