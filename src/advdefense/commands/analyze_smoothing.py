"""``advdefense analyze smoothing --checkpoint C [options]``: sigma / m / vote sweeps of smoothed
inference, chosen on ``val``, then the chosen setting evaluated once on ``test``.

Writes into ``--output``: ``sweep.json`` / ``sweep.md`` (val sweep), ``acc_vs_sigma.png``,
``acc_vs_m.png``, ``chosen.json`` / ``chosen.md`` (the test evaluation of the chosen
``(sigma, m, vote)`` with the harness: clean and the attacks of ``--test-attacks``, every
accuracy scored with the full m-sample vote, repeated ``--repeats`` times) and
``throughput.json`` (images/s vs m).

Example::

    advdefense analyze smoothing --checkpoint runs/cni_w_at/last.pt --sigmas 0,0.05,0.1,0.2 \\
        --ms 1,4,16,64 --attack pgd --n-val 200 --n-test 200 --output runs/cni_w_at/smoothing
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from ..errors import AdvDefenseError


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint written by train")
    parser.add_argument("--sigmas", type=_floats, default=[0.0, 0.05, 0.1, 0.2],
                        help="input-noise std in [0,1] pixel units (default 0,0.05,0.1,0.2)")
    parser.add_argument("--ms", type=_ints, default=[1, 4, 16, 64],
                        help="Monte-Carlo sample counts (default 1,4,16,64; paper up to 512)")
    parser.add_argument("--votes", type=_names, default=["prediction", "weighted", "topk", "soft"])
    parser.add_argument("--k", type=int, default=3, help="k of the top-k vote (default 3)")
    parser.add_argument("--attack", choices=("pgd", "epgd", "smoothadv", "none"), default="pgd",
                        help="attack of the sweep (pgd = one noise draw per step, as the paper)")
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--norm", choices=("linf", "l2"), default="linf")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--step-size", type=float, default=None, help="default eps/4")
    parser.add_argument("--attack-samples", type=int, default=8,
                        help="draws per step of epgd/smoothadv (paper m_train 8)")
    parser.add_argument("--n-val", type=int, default=200, help="val examples for the sweep")
    parser.add_argument("--n-test", type=int, default=200,
                        help="test examples for the chosen setting (0 = skip)")
    parser.add_argument("--test-attacks", type=_names, default=["pgd", "epgd", "smoothadv"],
                        help="attacks for the test evaluation of the chosen setting")
    parser.add_argument("--repeats", type=int, default=3,
                        help="stochastic predictions per test verdict (default 3)")
    parser.add_argument("--max-batch", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None,
                        help="output folder (default: <checkpoint folder>/smoothing)")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from ..analysis.smoothing_sweeps import (choose, make_attack, plot_sweeps, sweep,
                                             throughput, write_tables)
    from ..data import as_tensors, load_split
    from ..defenses.smoothing import SmoothedClassifier
    from ..training.checkpoint import load_model_from_checkpoint

    if args.n_val < 1 or args.n_test < 0 or args.repeats < 1 or args.eps < 0:
        raise AdvDefenseError("need --n-val >= 1, --n-test >= 0, --repeats >= 1, --eps >= 0")
    model, cfg = load_model_from_checkpoint(args.checkpoint)
    root = getattr(cfg.data, "root", "data")
    out = Path(args.output) if args.output else Path(args.checkpoint).parent / "smoothing"
    progress = not args.no_progress
    xv, yv = as_tensors(load_split(cfg.data.name, "val", root=root, limit=args.n_val))
    records = sweep(model, xv, yv, sigmas=args.sigmas, ms=args.ms, votes=args.votes,
                    attack=args.attack, eps=args.eps, steps=args.steps,
                    step_size=args.step_size, attack_samples=args.attack_samples,
                    norm=args.norm, k=args.k, split="val", seed=args.seed,
                    max_batch=args.max_batch, progress=progress)
    best = choose(records)
    settings = {k: getattr(args, k) for k in ("sigmas", "ms", "votes", "k", "attack", "eps",
                                                "norm", "steps", "step_size", "attack_samples",
                                                "n_val", "seed")}
    write_tables(records, out, extra={"checkpoint": str(args.checkpoint), "settings": settings,
                                      "chosen_on_val": asdict(best)})
    plot_sweeps(records, out)
    print((out / "sweep.md").read_text())
    print(f"chosen on val: sigma={best.sigma:g} m={best.m} vote={best.vote} "
          f"(val clean {100 * best.clean:.1f}%, {args.attack} {100 * best.attacked:.1f}%)")
    speed = throughput(model, xv[:100], sigma=best.sigma, ms=args.ms, max_batch=args.max_batch)
    (out / "throughput.json").write_text(json.dumps({str(k): v for k, v in speed.items()},
                                                    indent=2))
    print("images/s vs m: " + ", ".join(f"m={k}: {v:.0f}" for k, v in speed.items()))
    if args.n_test:
        from ..attacks import build_attack
        from ..evaluation import AttackSpec, evaluate
        from ..evaluation.report import to_markdown, write_report

        smooth = SmoothedClassifier(model, sigma=best.sigma, m=best.m, vote=best.vote,
                                    k=args.k, max_batch=args.max_batch)
        specs = []
        for name in args.test_attacks:
            if name in ("pgd", "epgd", "smoothadv"):
                atk = make_attack(name, sigma=best.sigma, eps=args.eps, steps=args.steps,
                                  step_size=args.step_size, samples=args.attack_samples,
                                  norm=args.norm, seed=args.seed, max_batch=args.max_batch)
            else:
                atk = build_attack(name, eps=args.eps, norm=args.norm, seed=args.seed)
            specs.append(AttackSpec(name, atk))
        data = load_split(cfg.data.name, "test", root=root, limit=args.n_test)
        result = evaluate(smooth, data, specs, repeats=args.repeats, seed=args.seed,
                          progress=progress, max_batch=args.max_batch, checks=False)
        write_report(result, out / "chosen", extra={
            "checkpoint": str(args.checkpoint), "sigma": best.sigma, "m": best.m,
            "vote": best.vote, "chosen_on": "val"})
        print(to_markdown(result, title=f"test: smoothed sigma={best.sigma:g} m={best.m} "
                                        f"vote={best.vote} (chosen on val)"))
    return 0
