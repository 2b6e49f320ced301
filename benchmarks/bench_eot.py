"""EOT-PGD throughput: ours (EOT batched along the batch dimension) vs torchattacks.EOTPGD
(a Python loop over EOT samples), on stochastic models, in one run.

The stochastic models (``--kinds``, all on the given ``--models``):

* ``input``: Gaussian noise (sigma 0.1) added to the input, a fresh draw per row;
* ``pni``: PNI-W, layer-wise weight noise on every Conv2d/Linear (He et al. 2019);
* ``cni``: CNI-W, rank-5 correlated weight noise (the smoothing paper's base model);
* ``rna``: RNA over BN/IN, one random path per forward call (Dong et al. 2022).

Each is an :class:`advdefense.randomness.StochasticModule` model: torchattacks gets one fresh
draw per forward call, ours one independent draw per EOT copy under ``draw_groups``, so both
average over the same distribution. Settings: eps 8/255, step 2/255, random start,
``--steps`` steps (default 5; ours also runs one gradient-free EOT evaluation after the last
step to pick the best iterate, that cost is included), EOT samples 8 and 32, batches 128 and
8. Ours runs with its defaults: channels_last weights on the CPU, and the EOT strategy the
library picks for the model (:func:`advdefense.randomness.groups_batch_cheaply`): one draw per
pass for weight noise and RNA paths, stacked copies of at most ``CPU_ROWS`` (128) rows per
pass for per-row input noise. ``--fully-batched`` adds a row with all ``n*k`` rows of a step
in one pass. Configurations run smallest first; those of at least 2,048 rows per step (batch
128 x EOT 32) skip the untimed warm-up round, as the smaller ones warmed the kernels.

Layouts: torchattacks runs on the same model object, whose weights ours leaves contiguous
after each call. Each configuration times it twice: with the model as it is (``ta``; the row
is default against default: ours channels_last / torchattacks contiguous) and with the
model's weights converted for each call exactly as ours converts them (``ta_cl``,
``layout.channels_last_weights``; both channels_last). The goals are judged on the
same-layout rows (``--fully-batched`` rows compare with ``ta_cl``).

Run: ``python benchmarks/bench_eot.py``
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
import torchattacks
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from advdefense import randomness  # noqa: E402
from advdefense.attacks import PGD  # noqa: E402
from advdefense.defenses import noise, rna  # noqa: E402
from advdefense.randomness import StochasticModule  # noqa: E402

EPS, ALPHA = 8 / 255, 2 / 255


class InputNoise(StochasticModule):
    """x + N(0, sigma^2) noise, a fresh draw per row (so per EOT copy too)."""

    def __init__(self, sigma: float = 0.1) -> None:
        super().__init__()
        self.sigma = sigma

    def sample_state(self, x, groups):
        return torch.randn_like(x) * self.sigma

    def forward_with_state(self, x, state):
        return x + state


def stochastic(name: str, kind: str = "input", sigma: float = 0.1) -> nn.Module:
    """``common.build(name)`` with the randomness ``kind`` (see the module docstring)."""
    if kind == "input":
        return nn.Sequential(InputNoise(sigma), common.build(name)).eval()
    if kind in ("pni", "cni"):
        options = {"rank": 5, "alpha_init": 0.035, "factor_init": 0.001} if kind == "cni" else {}
        return noise.inject(common.build(name), kind=kind, where="weights", **options).eval()
    if kind == "rna":
        return rna.convert(common.build(name), space=["bn", "in"], granularity="call").eval()
    raise ValueError(f"unknown kind {kind!r}")


@contextmanager
def cpu_eot_rows(rows):
    """Temporarily set :data:`advdefense.randomness.CPU_ROWS` (restored on exit)."""
    saved, randomness.CPU_ROWS = randomness.CPU_ROWS, rows
    try:
        yield
    finally:
        randomness.CPU_ROWS = saved


def fully_batched(attack, model, x, y):
    """The attack with every replicated EOT row of a step in one pass (no CPU row cap, copies
    stacked whatever the model's layers)."""
    saved = randomness.groups_batch_cheaply
    randomness.groups_batch_cheaply = lambda m: True
    try:
        with cpu_eot_rows(None):
            return attack(model, x, y)
    finally:
        randomness.groups_batch_cheaply = saved


def main(argv=None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batches", default="128,8")
    p.add_argument("--eot", default="8,32")
    p.add_argument("--kinds", default="input,pni,cni,rna")
    p.add_argument("--fully-batched", action="store_true")
    p.set_defaults(repeats=3, models="smallcnn")
    args = p.parse_args(argv)
    common.setup(args)
    # smallest first: the large configurations then run without an untimed warm-up round
    batches = sorted(int(b) for b in args.batches.split(","))
    eots = sorted(int(k) for k in args.eot.split(","))
    if args.quick:
        batches, eots, args.steps = [4], [2], 1
    with cpu_eot_rows(4 if args.quick else randomness.CPU_ROWS):  # quick: 8 rows > 4
        rows = measure(args, batches, eots)
    common.write("eot", args, rows)
    return 0


def measure(args, batches: list[int], eots: list[int]) -> list[dict]:
    rows = []
    for name, kind in [(m, k) for m in args.models.split(",") for k in args.kinds.split(",")]:
        model = stochastic(name, kind)
        for n in batches:
            x, y = common.batch(name, n)
            for k in eots:
                ours = PGD(eot_samples=k, eps=EPS, steps=args.steps, step_size=ALPHA, seed=0)
                ours_mb = PGD(eot_samples=k, eps=EPS, steps=args.steps, step_size=ALPHA, seed=0)
                ta = torchattacks.EOTPGD(model, eps=EPS, alpha=ALPHA, steps=args.steps,
                                         eot_iter=k, random_start=True)
                fns = {"ours": partial(ours, model, x, y), "ta": partial(ta, x, y),
                       "ta_cl": partial(common.ref_in_layout, "channels_last", model,
                                        partial(ta, x, y))}
                layouts = {"ours": common.weights_layout(model),
                           "ta": common.current_layout(model),
                           "ta_cl": common.weights_layout(model, "channels_last")}
                if args.fully_batched and n * k > (randomness.CPU_ROWS or n * k):
                    fns["ours_mb"] = partial(fully_batched, ours_mb, model, x, y)
                # a call of >= 2,048 rows per step takes tens of seconds; the smaller ones
                # before it on the same model warmed the kernels
                warmup = args.warmup if n * k < 2048 else 0
                times = common.interleaved(fns, warmup=warmup, repeats=args.repeats)
                base = dict(benchmark=f"EOT-PGD-{args.steps}", model=f"{name}+{kind}",
                            metric="img/s", reference="torchattacks.EOTPGD", n=n,
                            seconds=times, batch=n, eot_samples=k)
                goal = 1.0 if n >= 128 else 1.5
                how = (f"<= {randomness.CPU_ROWS} rows/pass"
                       if randomness.groups_batch_cheaply(model) else "one draw per pass")
                # the goal row (both channels_last), then default against default
                for ref in ("ta_cl", "ta"):
                    rows.append(common.compare(times, "ours", ref, **base, **common.layout_fields(
                        layouts, "ours", ref, f"batch {n}, EOT {k}, {how}", goal=goal,
                        defaults=ref == "ta")))
                if "ours_mb" in fns:
                    layouts["ours_mb"] = layouts["ours"]
                    rows.append(common.compare(times, "ours_mb", "ta_cl", **base,
                                               **common.layout_fields(
                                                   layouts, "ours_mb", "ta_cl",
                                                   f"batch {n}, EOT {k}, fully batched",
                                                   goal=goal)))
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
