"""Seconds of each stage of the standard suite, ours vs torchattacks, one attack at a time.

Diagnoses the ``standard suite`` row of ``bench_apgd.py``: the same four attacks (APGD-CE,
APGD-T and FAB-T with 9 targets and 100 iterations, Square) on the same random-weight smallcnn
batch, each run once by itself (no cascade, no interleaving), so per-attack costs can be
compared without the suite's bookkeeping. No result file; it prints one line per attack.
Ours runs with its defaults (channels_last weights for each call on the CPU); torchattacks gets
the model's weights in the same layout for each call (``--ta-layout channels_last``, the
default, converted as ours converts them) or as the model is (``--ta-layout contiguous``, its
own default). Each line names the layout.

Run: ``OMP_NUM_THREADS=1 python benchmarks/suite_stages.py [--queries 300]``
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torchattacks

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from advdefense.attacks import build_attack  # noqa: E402
from advdefense.evaluation.suite import suite_plan  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--eps", type=float, default=2 / 255)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ta-layout", choices=("channels_last", "contiguous"),
                   default="channels_last", help="torchattacks' weights during its calls")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = common.build("smallcnn")
    x, _ = common.batch("smallcnn", args.batch)
    with torch.no_grad():
        y = model(x).argmax(1)
    settings = {"n_iter": args.steps, "n_queries": args.queries}
    ours = [(label, build_attack(reg, eps=args.eps,
                                 **{k: settings.get(k, v) for k, v in kw.items()}))
            for label, reg, kw in suite_plan("standard", eps=args.eps, stochastic=False)]
    kw = dict(eps=args.eps, norm="Linf", seed=0, n_restarts=1)
    theirs = [
        ("apgd-ce", torchattacks.APGD(model, loss="ce", steps=args.steps, **kw)),
        ("apgd-t", torchattacks.APGDT(model, n_classes=10, steps=args.steps, **kw)),
        ("fab-t", torchattacks.FAB(model, multi_targeted=True, n_classes=10, steps=args.steps,
                                   **kw)),
        ("square", torchattacks.Square(model, n_queries=args.queries, **kw)),
    ]
    ours_layout = common.weights_layout(model)
    ta_layout = common.weights_layout(model, args.ta_layout)
    for label, atk in ours:
        t = time.perf_counter()
        atk(model, x, y)
        print(f"ours {label} ({ours_layout}): {time.perf_counter() - t:.1f} s", flush=True)
    for label, atk in theirs:
        t = time.perf_counter()
        common.ref_in_layout(args.ta_layout, model, partial(atk, x, y))
        print(f"torchattacks {label} ({ta_layout}): {time.perf_counter() - t:.1f} s",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
