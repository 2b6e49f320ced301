"""``advdefense analyze transfer``: transferability matrix across normalization types (RNA).

Example::

    advdefense analyze transfer --dataset mnist5k --norms bn,in,ln,gn --epochs 3 --eps 0.3 \\
        --output runs/transfer
    advdefense analyze transfer --norms "" --rna-checkpoint runs/rna_mnist5k/last.pt \\
        --output runs/transfer_rna
"""

from __future__ import annotations

import argparse
import time

from ..errors import AdvDefenseError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="mnist5k", help="dataset (default mnist5k)")
    parser.add_argument("--norms", default="bn,in,ln,gn",
                        help="normalization types, one model each (comma list; '' to skip)")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs per model")
    parser.add_argument("--adversarial-eps", type=float, default=None,
                        help="PGD-AT eps for the per-norm models (default: standard training)")
    parser.add_argument("--eps", type=float, default=0.3, help="L-inf radius of the PGD attack")
    parser.add_argument("--steps", type=int, default=20, help="PGD steps (step size eps/4)")
    parser.add_argument("--examples", type=int, default=500, help="test examples used")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rna-checkpoint", default=None,
                        help="RNA model for the path matrix: a checkpoint, TorchScript or "
                             "torch.export file (default: train one here)")
    parser.add_argument("--rna-space", default="bn,in",
                        help="space of the RNA model trained here when no checkpoint is given")
    parser.add_argument("--random-paths", type=int, default=3,
                        help="random mixed RNA paths besides the all-<type> paths")
    parser.add_argument("--train-limit", type=int, default=None,
                        help="use only the first N training examples (quick runs)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cpu",
                        help="device (default cpu; the study trains and attacks its small "
                             "models on the CPU, so only cpu is supported for now)")
    parser.add_argument("--output", required=True, help="output directory")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..analysis.transfer import run_transfer_study

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.epochs < 1 or args.examples < 1 or args.steps < 1 or (
            args.train_limit is not None and args.train_limit < 1):
        raise AdvDefenseError("--epochs, --examples, --steps and --train-limit must be >= 1")
    norms = [s.strip() for s in args.norms.split(",") if s.strip()]
    from ..loading import open_model, resolve_device

    if resolve_device(args.device).type != "cpu":
        raise AdvDefenseError("analyze transfer trains and attacks its models on the CPU; "
                              "--device must be cpu for now")
    rna_model = None
    if args.rna_checkpoint:
        rna_model = open_model(args.rna_checkpoint, device=args.device).model
    t0 = time.perf_counter()
    results = run_transfer_study(
        args.output, dataset=args.dataset, norms=norms, epochs=args.epochs, eps=args.eps,
        steps=args.steps, n_examples=args.examples, seed=args.seed,
        adversarial_eps=args.adversarial_eps, rna_model=rna_model, rna_space=args.rna_space,
        random_paths=args.random_paths, train_limit=args.train_limit)
    for name, res in results.items():
        print(res.to_markdown(name))
    print(f"wrote {args.output}/transfer.json, transfer.md and heatmaps "
          f"in {time.perf_counter() - t0:.0f}s")
    return 0
