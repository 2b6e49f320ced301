"""APGD-CE vs torchattacks.APGD, in one run.

* ``APGD-CE``: ``advdefense`` ``apgd-ce`` vs ``torchattacks.APGD(loss="ce")``, both L-inf,
  eps 8/255, 100 iterations, 1 restart, rho 0.75.

The models have random weights, so the labels are the model's own clean predictions: every
example starts correctly classified and both implementations attack the whole batch (both
skip examples that are already misclassified). Images/s = batch / seconds per call.

Run: ``flock /work/cpu.lock python benchmarks/bench_apgd.py``
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch
import torchattacks

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from advdefense.attacks import build_attack  # noqa: E402

EPS = 8 / 255


def main(argv=None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=100)
    p.set_defaults(repeats=3)
    args = p.parse_args(argv)
    common.setup(args)
    if args.quick:
        args.batch, args.steps = 4, 3
    rows = []
    for name in args.models.split(","):
        model = common.build(name)
        x, _ = common.batch(name, args.batch)
        with torch.no_grad():
            y = model(x).argmax(1)
        ours = build_attack("apgd-ce", eps=EPS, n_iter=args.steps, seed=0)
        ta = torchattacks.APGD(model, norm="Linf", eps=EPS, steps=args.steps, n_restarts=1,
                               seed=0, loss="ce", rho=0.75)
        fns = {"ours": partial(ours, model, x, y), "ta": partial(ta, x, y)}
        times = common.interleaved(fns, warmup=args.warmup, repeats=args.repeats)
        rows.append(common.compare(
            times, "ours", "ta", n=args.batch, benchmark=f"APGD-CE {args.steps} it", model=name,
            setting=f"batch {args.batch}, eps 8/255, 1 restart", metric="img/s",
            reference="torchattacks.APGD", goal=1.0, seconds=times))
    common.write("apgd", args, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
