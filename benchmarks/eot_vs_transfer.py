"""Is a white-box EOT attack at least as strong as a transfer from one frozen draw?

APGD-CE on a randomized model (e.g. PNI-W trained with ``configs/pni_at_mnist5k.yaml``), on the
same test examples, under three settings:

* ``paper``: crafted on one frozen draw (a new one per batch), classified on fresh draws;
* ``fresh``, ``eot_resample="run"`` (the default): EOT over draws fixed for each run;
* ``fresh``, ``eot_resample="step"``: fresh EOT draws at every step (AutoAttack's ``rand``).

Robust accuracy is the all-repeats verdict (and the single-draw one beside it).

    python benchmarks/eot_vs_transfer.py --checkpoint runs/pni_at_mnist5k/last.pt --n 200 \\
        --eot 16 --out benchmarks/results/eot_vs_transfer.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from advdefense.attacks import APGD  # noqa: E402
from advdefense.data import as_tensors, load_split  # noqa: E402
from advdefense.evaluation import AttackSpec, evaluate  # noqa: E402
from advdefense.evaluation.stats import mcnemar_exact  # noqa: E402
from advdefense.provenance import command_line, machine, relative_path  # noqa: E402
from advdefense.training.checkpoint import load_model_from_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--eot", type=int, default=16)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, cfg = load_model_from_checkpoint(args.checkpoint)
    x, y = as_tensors(load_split(cfg.data.name, "test", limit=args.n))
    common_kw = dict(eps=args.eps, n_iter=args.iters, seed=args.seed)
    specs = [
        AttackSpec("apgd-ce", APGD(**common_kw), "paper"),
        AttackSpec("apgd-ce eot run", APGD(eot_samples=args.eot, eot_resample="run",
                                           **common_kw)),
        AttackSpec("apgd-ce eot step", APGD(eot_samples=args.eot, eot_resample="step",
                                            **common_kw)),
    ]
    t0 = time.perf_counter()
    res = evaluate(model, (x, y), specs, repeats=args.repeats, seed=args.seed, checks=None)
    rows = {}
    for label, e in res.entries.items():
        rows[label] = {"all": 100 * e.accuracy("all").value,
                       "ci": [100 * e.accuracy("all").low, 100 * e.accuracy("all").high],
                       "single": 100 * e.accuracy("single").value, "seconds": e.seconds,
                       "passes": e.passes}
    paper = res.entries["apgd-ce/paper"].verdict.all
    for label in ("apgd-ce eot run/fresh", "apgd-ce eot step/fresh"):
        test = mcnemar_exact(res.entries[label].verdict.all, paper)
        rows[label]["mcnemar_vs_paper_p"] = test.p_value
        rows[label]["robust_only_here"] = test.only_a
        rows[label]["robust_only_under_paper"] = test.only_b
    out = {"command": command_line(["python", *sys.argv]), "checkpoint":
           relative_path(args.checkpoint), "n": res.n, "eps": args.eps, "eot": args.eot,
           "iters": args.iters, "repeats": args.repeats, "seed": args.seed,
           "clean": 100 * res.accuracy("clean").value, "rows": rows,
           "seconds": time.perf_counter() - t0, "machine": machine(),
           "commit": common._git_commit(), "load_average": list(os.getloadavg())}
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
