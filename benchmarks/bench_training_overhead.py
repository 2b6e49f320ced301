"""Training-step time of defended models relative to the same model with plain BatchNorm.

One step = train-mode forward (with auxiliary heads through ``forward_with_aux``), loss,
backward, SGD(momentum 0.9, weight decay 5e-4) step, on a batch of ``--batch`` random
images. The loss is cross-entropy, plus ``2.0 x`` the mean auxiliary cross-entropy for CAS
(the paper's beta = 2). Variants, each built from the same random initialisation:

* ``bn``       the plain model (reference)
* ``rna``      ``advdefense.defenses.rna.convert(model)`` (default space, one random
  normalization type per call)
* ``cas``      CAS at the paper's default placement (``defenses.cas.apply``)
* ``pni`` / ``cni``  ``defenses.noise.inject(model, kind=...)`` (weight noise, layer-wise)

All variants are interleaved in one run; the ratio is (defended step time) / (bn step time),
lower is better (goal <= 1.5 for RNA and CAS; PNI/CNI reported without a goal).

Run: ``python benchmarks/bench_training_overhead.py``
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from advdefense.defenses import cas, noise, rna  # noqa: E402
from advdefense.models.heads import forward_with_aux  # noqa: E402

AUX_WEIGHT = 2.0


def variants(name: str) -> dict[str, torch.nn.Module]:
    c, h, _ = common.SHAPES[name]
    info = SimpleNamespace(num_classes=10, in_channels=c, image_size=h)
    return {
        "bn": common.build(name),
        "rna": rna.convert(common.build(name)),
        "cas": cas.apply(common.build(name), {}, info),
        "pni": noise.inject(common.build(name), kind="pni"),
        "cni": noise.inject(common.build(name), kind="cni"),
    }


def step_fn(model, x, y):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def step():
        logits, aux = forward_with_aux(model, x, y)
        loss = F.cross_entropy(logits, y)
        if aux:
            loss = loss + AUX_WEIGHT * torch.stack([F.cross_entropy(a, y) for a in aux]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss
    return step


def main(argv=None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="training steps per timed call")
    args = p.parse_args(argv)
    common.setup(args)
    if args.quick:
        args.batch, args.steps = 4, 1
    rows = []
    for name in args.models.split(","):
        x, y = common.batch(name, args.batch)
        models = variants(name)
        fns = {}
        for key, model in models.items():
            step = step_fn(model, x, y)
            fns[key] = lambda s=step: [s() for _ in range(args.steps)]
        times = common.interleaved(fns, warmup=args.warmup, repeats=args.repeats)
        for key in ("rna", "cas", "pni", "cni"):
            rows.append(common.compare(
                times, key, "bn", n=args.steps, time_ratio=True, benchmark="train step time",
                model=name, setting=f"{key} vs plain BN, batch {args.batch}, SGD",
                metric="s/step", reference="plain BN",
                goal=1.5 if key in ("rna", "cas") else None, seconds=times))
    common.write("training_overhead", args, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
