"""PGD-20 throughput: ours vs torchattacks.PGD vs the raw limit, measured in one run.

The raw limit of a PGD-20 call is 20 x (one forward + one backward to the input) of the same
model on the same batch, with nothing else (no projection, no bookkeeping). Compared, per
model, at the same eps / step size / steps / random start / batch:

* ``ours``      ``advdefense.attacks.PGD`` with its defaults (channels_last weights on the
  CPU for the duration of each call, :mod:`advdefense.layout`; keeps the best iterate: one
  extra gradient-free forward after the last step)
* ``ours_contig`` the same with ``layout.set_memory_format("contiguous")`` (the old default)
* ``ta``        ``torchattacks.PGD`` on the same model object as it is: contiguous weights
  (ours leaves them contiguous after each call), torchattacks' default
* ``ta_cl``     ``torchattacks.PGD`` with the model's weights in channels_last for each call,
  converted exactly as ours converts them (``layout.channels_last_weights``; inputs untouched
  on both sides)
* ``limit``     20 x forward+backward-to-input in the layout ours uses
* ``ours_cmp``  ours on ``torch.compile(model)``, and ``limit_cmp`` the limit of the compiled
  model (compile time excluded; skipped with ``--no-compile`` and in ``--quick`` mode)

Every row names the layout of both sides. The goal (>= 1.2x torchattacks) is judged on the
same-layout row in channels_last (ours' default layout, given to torchattacks too); the
default-against-default row (ours channels_last, torchattacks contiguous) and the
both-contiguous row stand beside it without a goal.

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


TA = "torchattacks.PGD"

# (ours entry, reference entry, reference, goal): the rows of one model, the goal rows first.
# The 1.2x goal is judged where both sides run in ours' default layout (channels_last on the
# CPU); the default-against-default and both-contiguous rows stand beside it without a goal.
COMPARISONS = [
    ("ours", "ta_cl", TA, 1.2),
    ("ours", "ta", TA, None),
    ("ours_contig", "ta", TA, None),
    ("ours", "limit", "limit", 0.95),
]
COMPILED = [("ours_cmp", "ta_cl", TA, None), ("ours_cmp", "limit_cmp", "compiled limit", None)]


def entries(model, x, y, ours, ta, steps):
    """The timed callables of one model and the memory layout each one's convolutions run in.

    ``ours`` is called as ``ours(model, x, y)``, ``ta`` (built on ``model``) as ``ta(x, y)``.
    Nothing is called here."""
    call_ours, call_ta = partial(ours, model, x, y), partial(ta, x, y)
    fns = {"ours": call_ours,
           "ours_contig": partial(common.ours_in_layout, "contiguous", call_ours),
           "ta": call_ta,
           "ta_cl": partial(common.ref_in_layout, "channels_last", model, call_ta),
           "limit": partial(limit, model, x, y, steps)}
    layouts = {"ours": common.weights_layout(model),
               "ours_contig": common.weights_layout(model, "contiguous"),
               "ta": common.current_layout(model),
               "ta_cl": common.weights_layout(model, "channels_last"),
               "limit": common.weights_layout(model)}
    return fns, layouts


def comparisons(layouts: dict[str, str], setting: str, compiled: bool = False) -> list[dict]:
    """The rows' specifications: entries, reference, goal (kept only where both sides run in
    the same layout) and the setting naming both sides' layouts."""
    out = []
    for ours, ref, reference, goal in COMPARISONS + (COMPILED if compiled else []):
        where = setting + (", torch.compile(model)" if ours == "ours_cmp" else "")
        out.append(dict(ours=ours, ref=ref, reference=reference, **common.layout_fields(
            layouts, ours, ref, where, goal=goal, defaults=(ours, ref) == ("ours", "ta"),
            ref_name="torchattacks" if reference == TA else "limit")))
    return out


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
        fns, layouts = entries(model, x, y, ours, ta, args.steps)
        if not args.no_compile:
            model_cmp = torch.compile(common.build(name))
            fns["ours_cmp"] = partial(ours, model_cmp, x, y)
            fns["limit_cmp"] = partial(limit, model_cmp, x, y, args.steps)
            layouts["ours_cmp"] = layouts["limit_cmp"] = common.weights_layout(model_cmp)
            fns["ours_cmp"]()  # compile outside the timed rounds, whatever --warmup says
        times = common.interleaved(fns, warmup=args.warmup, repeats=args.repeats)
        setting = f"batch {args.batch}, {args.steps} steps, eps 8/255"
        lim = f"limit {args.steps}x(fwd+bwd)"
        base = dict(benchmark=f"PGD-{args.steps}", model=name, metric="img/s", n=args.batch,
                    seconds=times)
        for c in comparisons(layouts, setting, compiled="ours_cmp" in fns):
            ours_key, ref_key, reference = c.pop("ours"), c.pop("ref"), c.pop("reference")
            reference = {"limit": lim, "compiled limit": "compiled " + lim}.get(reference,
                                                                                 reference)
            rows.append(common.compare(times, ours_key, ref_key, **base, **c,
                                       reference=reference))
    common.write("pgd", args, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
