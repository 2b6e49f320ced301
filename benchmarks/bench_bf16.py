"""bf16 autocast on the CPU: speed of attacks and training steps, and whether the attack
still finds what it finds in fp32, in one run.

* ``PGD-20``: ``advdefense.attacks.PGD`` (defaults) under ``precision.attack_autocast("bf16")``
  vs the same attack in fp32, batch ``--batch`` (ratio > 1: bf16 faster).
* ``train step``: one PGD-AT step (PGD-``--train-steps`` inner attack and the outer
  forward/backward under bf16 autocast, Adam; the Trainer's ``train.amp: bf16`` with
  ``train.attack_precision: amp``) vs the same step in fp32.
* ``robust accuracy``: a smallcnn PGD-trained on mnist5k for ``--epochs`` epochs (Adam, eps
  0.3, PGD-5), then ``evaluate`` with PGD-20 on ``--n`` test images with
  ``attack_precision="bf16"`` and ``"fp32"`` (verdicts always fp32). The row's ratio is the
  absolute difference in accuracy points (goal: at most 1 point).

Run: ``python benchmarks/bench_bf16.py``
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from advdefense.analysis.transfer import train_model  # noqa: E402
from advdefense.attacks import PGD  # noqa: E402
from advdefense.data import as_tensors, dataset_info, load_split  # noqa: E402
from advdefense.evaluation.harness import AttackSpec, evaluate  # noqa: E402
from advdefense.models import build_model  # noqa: E402
from advdefense.precision import attack_autocast  # noqa: E402

EPS, ALPHA = 8 / 255, 2 / 255


def attack_in(precision, attack, model, x, y):
    with attack_autocast(precision, x.device):
        return attack(model, x, y)


def train_step(model, x, y, *, precision: str, steps: int):
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    attack = PGD(eps=EPS, steps=steps, step_size=ALPHA, seed=0)

    def step():
        with attack_autocast(precision, x.device):
            x_adv = attack(model, x, y)
        model.train()
        with attack_autocast(precision, x.device):
            loss = F.cross_entropy(model(x_adv).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.eval()
    return step


def accuracy_rows(args) -> list[dict]:
    info = dataset_info("mnist5k")
    x, y = as_tensors(load_split("mnist5k", "train", limit=args.train_limit))
    torch.manual_seed(0)
    model = build_model("smallcnn", num_classes=10, in_channels=1, image_size=28,
                        mean=info.mean, std=info.std)
    model = train_model(model, x, y, epochs=args.epochs, seed=0,
                        attack=PGD(eps=0.3, steps=5, step_size=0.1, seed=1)).eval()
    xt, yt = as_tensors(load_split("mnist5k", "test", limit=args.n))
    spec = [AttackSpec("pgd", PGD(eps=0.3, steps=20, step_size=0.075, seed=0))]
    accs, secs = {}, {}
    for precision in ("fp32", "bf16"):
        res = evaluate(model, (xt, yt), spec, seed=0, checks=False,
                       attack_precision=precision)
        accs[precision] = res.accuracy("pgd/fresh").value
        secs[precision] = res.seconds
    diff = 100 * abs(accs["bf16"] - accs["fp32"])
    return [common.row(
        benchmark="robust accuracy", model="smallcnn (PGD-AT)",
        setting=f"PGD-20 eps 0.3, {len(yt)} mnist5k test images, bf16 attack vs fp32",
        metric="accuracy %", ours=100 * accs["bf16"], reference="fp32 attack",
        ref_value=100 * accs["fp32"], ratio=diff, goal=1.0, higher_is_better=False,
        seconds=secs, note="ratio = |difference| in accuracy points")]


def main(argv=None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--train-steps", type=int, default=7)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--n", type=int, default=500)
    p.set_defaults(repeats=3)
    args = p.parse_args(argv)
    common.setup(args)
    if args.quick:
        args.batch, args.train_steps, args.epochs, args.train_limit, args.n = 4, 1, 1, 200, 20
    rows = []
    for name in args.models.split(","):
        x, y = common.batch(name, args.batch)
        model = common.build(name)
        pgd = PGD(eps=EPS, steps=2 if args.quick else 20, step_size=ALPHA, seed=0)
        fns = {"fp32": partial(attack_in, "fp32", pgd, model, x, y),
               "bf16": partial(attack_in, "bf16", pgd, model, x, y)}
        times = common.interleaved(fns, warmup=args.warmup, repeats=args.repeats)
        rows.append(common.compare(times, "bf16", "fp32", n=args.batch, benchmark="PGD-20",
                                   model=name, setting=f"batch {args.batch}, bf16 autocast",
                                   metric="img/s", reference="fp32", goal=None,
                                   seconds=times))
        fns = {p_: train_step(common.build(name), x, y, precision=p_, steps=args.train_steps)
               for p_ in ("fp32", "bf16")}
        times = common.interleaved(fns, warmup=args.warmup, repeats=args.repeats)
        rows.append(common.compare(
            times, "bf16", "fp32", n=args.batch, benchmark="PGD-AT train step", model=name,
            setting=f"batch {args.batch}, PGD-{args.train_steps} inner attack and outer step "
                    "under bf16 autocast", metric="img/s", reference="fp32",
            goal=None, seconds=times))
    rows += accuracy_rows(args)
    common.write("bf16", args, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
