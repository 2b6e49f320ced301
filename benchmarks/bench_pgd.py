"""PGD-20 throughput: ours vs torchattacks.PGD vs the raw limit, measured in one run.

The raw limit of a PGD-20 call is 20 x (one forward + one backward to the input) of the same
model on the same batch, with nothing else (no projection, no bookkeeping). Compared, per
model, at the same eps / step size / steps / random start / batch:

* ``ours``      ``advdefense.attacks.PGD`` with its defaults (channels_last weights on the
  CPU, :mod:`advdefense.layout`; keeps the best iterate: one extra gradient-free forward
  after the last step)
* ``ours_contig`` the same with ``layout.set_memory_format("contiguous")`` (the old default)
* ``ta``        ``torchattacks.PGD`` (on the same model object, whose weights ours leaves
  contiguous after each call)
* ``limit``     20 x forward+backward-to-input in the layout ours uses
* ``ours_cmp``  ours on ``torch.compile(model)``, and ``limit_cmp`` the limit of the compiled
  model (compile time excluded; skipped with ``--no-compile`` and in ``--quick`` mode)

Run: ``python benchmarks/bench_pgd.py``
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch
import torchattacks
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from advdefense import layout  # noqa: E402
from advdefense.attacks import PGD  # noqa: E402

EPS, ALPHA = 8 / 255, 2 / 255


def limit(model, x, y, steps):
    """``steps`` x (forward + backward to the input): the floor of any PGD implementation
    (in the layout the attacks use by default)."""
    with layout.channels_last_weights(model):
        for _ in range(steps):
            xr = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(model(xr), y), xr)
    return g


def contiguous(attack, model, x, y):
    """The attack with channels_last off (the library's previous default)."""
    layout.set_memory_format("contiguous")
    try:
        return attack(model, x, y)
    finally:
        layout.set_memory_format("auto")


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
        fns = {"ours": partial(ours, model, x, y), "ta": partial(ta, x, y),
               "limit": partial(limit, model, x, y, args.steps),
               "ours_contig": partial(contiguous, ours, model, x, y)}
        if not args.no_compile:
            model_cmp = torch.compile(common.build(name))
            fns["ours_cmp"] = partial(ours, model_cmp, x, y)
            fns["limit_cmp"] = partial(limit, model_cmp, x, y, args.steps)
            fns["ours_cmp"]()  # compile outside the timed rounds, whatever --warmup says
        times = common.interleaved(fns, warmup=args.warmup, repeats=args.repeats)
        setting = f"batch {args.batch}, {args.steps} steps, eps 8/255"
        lim = f"limit {args.steps}x(fwd+bwd)"
        base = dict(benchmark=f"PGD-{args.steps}", model=name, metric="img/s", n=args.batch,
                    seconds=times)
        rows.append(common.compare(times, "ours", "ta", **base, setting=setting + ", defaults",
                                   reference="torchattacks.PGD", goal=1.2))
        rows.append(common.compare(times, "ours", "limit", **base, setting=setting + ", defaults",
                                   reference=lim, goal=0.95))
        rows.append(common.compare(times, "ours_contig", "ta", **base,
                                   reference="torchattacks.PGD",
                                   setting=setting + ", contiguous (channels_last off)",
                                   goal=None))
        if "ours_cmp" in fns:
            cmp_setting = setting + ", torch.compile(model)"
            rows.append(common.compare(times, "ours_cmp", "ta", **base, setting=cmp_setting,
                                       reference="torchattacks.PGD", goal=None))
            rows.append(common.compare(times, "ours_cmp", "limit_cmp", **base,
                                       setting=cmp_setting, reference="compiled " + lim,
                                       goal=None))
    common.write("pgd", args, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
