"""``advdefense train --config X.yaml [--set key=value ...] [--output DIR] [--resume]``.

Trains with :class:`advdefense.training.Trainer`, then prints the output folder and the final
metrics. Works under ``torchrun --nproc_per_node=N -m advdefense train ...`` (only rank 0
prints). A bad config is reported in one line (exit code 2).
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML experiment config")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.epochs=3 (repeatable)")
    parser.add_argument("--output", help="output folder (default: the config's output_dir)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from <output>/last.pt")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda if available")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..training.trainer import Trainer

    overrides = list(args.overrides)
    if args.output:
        overrides.append(f"output_dir={json.dumps(str(args.output))}")
    cfg = load_config(args.config, overrides)
    trainer = Trainer(cfg, device=args.device, progress=False if args.no_progress else None)
    try:
        metrics = trainer.fit(resume=args.resume)
    finally:
        trainer.close()
    if trainer.is_main:
        print(f"output: {trainer.output_dir}")
        print(f"checkpoint: {trainer.checkpoint_path}")
        for key, value in metrics.items():
            shown = f"{value:.4f}" if isinstance(value, float) else value
            print(f"  {key}: {shown}")
    return 0
