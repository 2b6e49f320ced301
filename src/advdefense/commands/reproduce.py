"""``advdefense reproduce --preset NAME [--output DIR]``: train every defense and evaluate
each under its paper's protocol and under adaptive attacks, side by side, in one Markdown
report (with robust-accuracy-vs-eps curves and the attack-failure checks).

Presets: ``mnist5k``, ``mnist5k-quick``, ``cifar10-jpeg``, ``cifar10-jpeg-quick`` (CPU) and
``cifar10`` (GPU); sizes and estimated times in docs/datasets.md ("Presets").

Resumable: rerunning the same command reuses finished models and evaluations, from the output
folder or from the model zoo (``zoo/<preset>/<entry>-s<seed>/``), where every entry is copied
as it finishes; a run stopped at any point therefore continues on a fresh clone. Where two
training seeds of an entry differ by more than 5 points, a third seed is trained before the
report is written. ``--write-configs DIR`` writes every entry's resolved config to
``DIR/<entry>.yaml`` (``advdefense train --config`` trains that entry exactly) and exits.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from ..errors import AdvDefenseError
from ..provenance import command_line

PRESETS = ("mnist5k", "mnist5k-quick", "cifar10-jpeg", "cifar10-jpeg-quick", "cifar10")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="mnist5k",
                        help="mnist5k (CPU, converged, two or three seeds per entry; about "
                             "6 h with --jobs 2), mnist5k-quick (CPU, about 30 min), "
                             "cifar10-jpeg (CPU, CIFAR-10 (JPEG copy), two or three seeds; "
                             "about 4 h with --jobs 2, 7.4 min on one H200), "
                             "cifar10-jpeg-quick (CPU, under 20 min) or cifar10 (GPU)")
    parser.add_argument("--output", help="output folder (default runs/reproduce_<preset>)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", help="comma-separated training seeds of the multi-seed "
                                        "entries (default: the preset's, from --seed)")
    parser.add_argument("--n", type=int, default=None,
                        help="test images per evaluation (default: the preset's)")
    parser.add_argument("--only", help="comma-separated subset of entries (e.g. pgd_at,rna_at)")
    parser.add_argument("--full-budget", action="store_true",
                        help="reference AutoAttack budgets (9 targets, 5,000 Square queries, "
                             "EOT 20) instead of the CPU budget")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 epoch, 300 training images, tiny attack budgets")
    parser.add_argument("--eot", type=int, help="override the budget's EOT samples")
    parser.add_argument("--repeats", type=int, help="override the budget's repeated predictions")
    parser.add_argument("--no-curve", action="store_true", help="skip the eps curves")
    parser.add_argument("--train-only", action="store_true",
                        help="train (or resume) every model, evaluate nothing")
    parser.add_argument("--jobs", type=int, default=1,
                        help="run the entries in this many processes, longest first, each "
                             "with threads/jobs torch threads (2 on a 2-core CPU)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:N (default: cuda:LOCAL_RANK when CUDA is "
                             "available, else cpu); models train and load there")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--write-configs", metavar="DIR",
                        help="write every entry's resolved config to DIR/<entry>.yaml (e.g. "
                             "configs/mnist5k) and exit without training")
    parser.add_argument("--zoo", default=None, metavar="DIR",
                        help="model zoo folder: entries found there with the same config are "
                             "not trained (nor evaluated) again, and every finished entry is "
                             "copied to DIR/<preset>/<entry>-s<seed>/ (default: $ADVDEFENSE_ZOO, "
                             "else ./zoo); runs with --quick, --n, budget overrides or "
                             "--no-curve only read it")
    parser.add_argument("--no-zoo", action="store_true", help="neither read nor write the zoo")
    parser.add_argument("--no-extra-seeds", action="store_true",
                        help="do not add a third training seed where two seeds differ by "
                             "more than 5 points (the report then marks those entries)")


def run(args: argparse.Namespace) -> int:
    from .. import presets
    from ..loading import resolve_device
    from ..reproduction import run_plans

    if args.preset not in PRESETS:
        raise AdvDefenseError(f"unknown preset {args.preset!r}; choose one of: "
                              f"{', '.join(PRESETS)}")
    settings = presets.preset_settings(args.preset)
    if args.write_configs:
        written = presets.write_preset_configs(args.preset, args.write_configs)
        print(f"wrote {len(written)} configs into {args.write_configs}")
        return 0
    budget = presets.FULL_BUDGET if args.full_budget else settings["budget"]
    if args.quick:
        budget = presets.QUICK_BUDGET
    budget = dict(budget)
    if args.eot:
        budget["eot"] = args.eot
    if args.repeats:
        budget["repeats"] = args.repeats
    if args.jobs < 1:
        raise AdvDefenseError("--jobs must be >= 1")
    device = str(resolve_device(args.device))
    seeds = None
    if args.seeds:
        try:
            seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
        except ValueError:
            raise AdvDefenseError(f"--seeds must be comma-separated integers, got "
                                  f"{args.seeds!r}") from None
    rebuild = functools.partial(presets.build_plans, args.preset, seed=args.seed,
                                budget=budget, quick=args.quick, seeds=seeds)
    plans = rebuild()
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        unknown = sorted(set(wanted) - {p.key for p in plans})
        if unknown:
            raise AdvDefenseError(f"unknown entries {', '.join(unknown)}; choose from: "
                                  f"{', '.join(p.key for p in plans)}")
        plans = [p for p in plans if p.key in wanted]
    out = Path(args.output or f"runs/reproduce_{args.preset}")
    zoo = None
    if not args.no_zoo:
        from ..zoo import Zoo, default_root

        # only a run at the preset's own settings adds to the zoo (a smoke run must not
        # replace its entries); every run may reuse what matches
        own = not (args.quick or args.full_budget or args.eot or args.repeats or args.no_curve
                   or (args.n is not None and args.n != settings["n"]))
        zoo = Zoo(Path(args.zoo) if args.zoo else default_root(), args.preset, write=own)
    print(f"advdefense reproduce: {len(plans)} models into {out.resolve()}"
          + (f"; zoo {zoo.root}/{args.preset}" + ("" if zoo.write else " (read only)")
             if zoo is not None else ""))
    report = run_plans(
        plans, out, title=presets.preset_title(args.preset),
        command=command_line(["advdefense", *sys.argv[1:]]), seed=args.seed,
        curve_eps=None if args.no_curve else
        (settings["curve_eps"] if not args.quick else [0.0, settings["eps"]]),
        n_eval=args.n or settings["n"], progress=not args.no_progress and sys.stderr.isatty(),
        intro=presets.preset_intro(args.preset, budget), train_only=args.train_only,
        jobs=args.jobs, rebuild=rebuild, device=device, add_seeds=not args.no_extra_seeds,
        zoo=zoo)
    if report is None:
        print("trained; rerun without --train-only to evaluate")
        return 0
    print(report.read_text())
    print(f"report: {report.resolve()}")
    return 0
