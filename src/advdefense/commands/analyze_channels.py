"""``advdefense analyze channels``: channel activation magnitude and frequency, natural vs PGD
(Bai et al. 2021, Figs. 1-2), for any trained checkpoint (CAS or not).

Example::

    advdefense analyze channels --checkpoint runs/cas_at_mnist5k/last.pt --layer features.13 \\
        --class 3 --eps 0.3 --output runs/channels_cas_at
    advdefense analyze channels --checkpoint runs/at_mnist5k/last.pt --layer features.13 \\
        --class 3 --eps 0.3 --output runs/channels_at
    advdefense analyze channels --model robustbench:wrn-28-10 --weights W.pt --dataset cifar10 \\
        --layer stages.2 --class 3 --eps 0.031 --output runs/channels_rb

Writes ``channels.json`` (per-channel numbers, summary with entropy and Gini of the frequency
distribution, attack used), ``magnitude.png`` and ``frequency.png`` into ``--output``.
"""

from __future__ import annotations

import argparse

from ..errors import AdvDefenseError
from .evaluate import add_model_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--layer", required=True,
                        help="module path whose output is analysed (e.g. stages.3.1, features.13); "
                             "append ':in' for a module's input")
    parser.add_argument("--class", dest="cls", type=int, required=True,
                        help="class whose examples are analysed")
    parser.add_argument("--eps", type=float, required=True, help="L-inf radius of the PGD attack")
    parser.add_argument("--steps", type=int, default=20, help="PGD steps (default 20)")
    parser.add_argument("--step-size", type=float, default=None, help="PGD step (default eps/8)")
    parser.add_argument("--objective", choices=("adaptive", "main"), default="adaptive",
                        help="PGD loss: main + beta*aux over CAS heads (default; equals CE for "
                             "models without heads) or the main logits only")
    parser.add_argument("--aux-weight", type=float, default=None,
                        help="beta of the adaptive loss (default: the checkpoint's "
                             "train.recipe_args.aux_weight, else 2)")
    parser.add_argument("--threshold", type=float, default=0.01,
                        help="a channel is active if its mean exceeds this fraction of the "
                             "sample's largest channel mean (default 0.01)")
    parser.add_argument("--split", default="test", help="data split (default test)")
    parser.add_argument("--max-examples", type=int, default=None,
                        help="use at most this many examples of the class")
    parser.add_argument("--after-mask", action="store_true",
                        help="at a CAS site, analyse the masked features "
                             "(default: before the mask)")
    parser.add_argument("--absolute", action="store_true", help="pool |activation|")
    parser.add_argument("--seed", type=int, default=0, help="attack seed")
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--output", required=True, help="output directory")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..analysis.channels import analyze_channels, save_report
    from ..attacks import PGD, HeadsObjective
    from ..data import as_tensors, load_split
    from .evaluate import data_root, model_label, open_from_args, resolve_dataset

    if args.eps < 0 or args.steps < 1 or args.batch_size < 1:
        raise AdvDefenseError("--eps must be >= 0, --steps and --batch-size >= 1")
    if args.max_examples is not None and args.max_examples < 1:
        raise AdvDefenseError("--max-examples must be >= 1")
    loaded = open_from_args(args)
    model, cfg = loaded.model, loaded.config
    dataset, _ = resolve_dataset(args, loaded)
    from ..data import dataset_info

    num_classes = dataset_info(dataset).num_classes
    if not 0 <= args.cls < num_classes:
        raise AdvDefenseError(f"--class must be in [0, {num_classes - 1}], got {args.cls}")
    x, y = as_tensors(load_split(dataset, args.split, root=data_root(args, loaded)))
    sel = (y == args.cls).nonzero().flatten()
    if args.max_examples is not None:
        sel = sel[: args.max_examples]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x, y = x[sel].to(device), y[sel].to(device)
    beta = args.aux_weight
    if beta is None:
        beta = 2.0 if cfg is None else float(cfg.train.recipe_args.get("aux_weight", 2.0) or 2.0)
    name = cfg.name if cfg is not None else model_label(args)
    loss = HeadsObjective("ce", aux_weight=beta) if args.objective == "adaptive" else "ce"
    step = args.eps / 8 if args.step_size is None else args.step_size
    attack = PGD(eps=args.eps, steps=args.steps, step_size=step, loss=loss, seed=args.seed)
    report = analyze_channels(model, x, y, layer=args.layer, cls=args.cls, attack=attack,
                              threshold=args.threshold, after_mask=args.after_mask,
                              absolute=args.absolute, batch_size=args.batch_size)
    paths = save_report(report, args.output,
                        title=f"{name} {args.layer} class {args.cls}")
    s = report.summary()
    print(f"{name}: layer {args.layer}, class {args.cls}, {report.natural.n} examples, "
          f"{report.natural.magnitude.numel()} channels; attack {report.attack}")
    print(f"accuracy clean {report.clean_accuracy:.3f}, adversarial {report.adv_accuracy:.3f}")
    print("            mean magnitude  mean frequency  entropy/log K  Gini")
    for key in ("natural", "adversarial"):
        r = s[key]
        print(f"{key:<12}{r['mean_magnitude']:>14.4g}{r['mean_frequency']:>16.3f}"
              f"{r['normalized_entropy']:>15.3f}{r['gini']:>6.3f}")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
