"""``advdefense demo [--output DIR]``: train a standard and a PGD-AT smallcnn on mnist5k (CPU,
a few minutes), evaluate both (clean, FGSM, PGD-20, CW, APGD-CE at eps 0.3, with 95% CIs and
attack-failure checks) and write a Markdown report and a robust-accuracy-vs-eps plot."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=300, help="test images to evaluate (max 1000)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    from ..presets import CURVE_EPS, demo_plans
    from ..provenance import command_line
    from ..reproduction import run_plans

    out = Path(args.output)
    print(f"advdefense demo: writing into {out.resolve()}")
    report = run_plans(
        demo_plans(args.seed), out, title="advdefense demo: standard vs PGD-AT on mnist5k",
        command=command_line(["advdefense", "demo",
                              *(sys.argv[2:] if sys.argv[1:2] == ["demo"] else [])]),
        seed=args.seed, curve_eps=CURVE_EPS, n_eval=args.n,
        progress=not args.no_progress and sys.stderr.isatty(),
        intro="smallcnn on the offline mnist5k digits (4,000 train / 1,000 test). "
              "Attacks at L-inf eps 0.3; accuracies with 95% Clopper-Pearson intervals.")
    print(report.read_text())
    print(f"report: {report.resolve()}")
    return 0
