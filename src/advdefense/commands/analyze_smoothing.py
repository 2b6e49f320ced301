"""``advdefense analyze smoothing --checkpoint C [options]``: sigma / m / vote sweeps of smoothed
inference, chosen on ``val``, then the chosen setting evaluated once on ``test``.

Writes into ``--output``: ``sweep.json`` / ``sweep.md`` (val sweep), ``acc_vs_sigma.png``,
``acc_vs_m.png``, ``test_table.json`` / ``test_table.md`` (the chosen ``(sigma, m)`` on
``test``: the base model and every vote against PGD / EPGD / SmoothAdv, optional NAttack and
transfer, every accuracy scored with the full m-sample vote, an example counting as robust
only if all ``--repeats`` fresh votes are correct; see
:func:`advdefense.analysis.smoothing_sweeps.attack_table`) and ``throughput.json``
(images/s vs m).

Example::

    advdefense analyze smoothing --checkpoint runs/cni_w_at/last.pt --sigmas 0,0.05,0.1,0.2 \\
        --ms 1,4,16,64 --attack pgd --n-val 200 --n-test 200 --output runs/cni_w_at/smoothing

``--model`` (with ``--dataset``) takes any model :mod:`advdefense.loading` reads instead of a
checkpoint; ``--substitute`` takes a checkpoint or any self-contained model file.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from ..errors import AdvDefenseError
from .evaluate import add_model_arguments


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
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
    parser.add_argument("--substitute", default=None,
                        help="an independently trained model for the transfer attack: a "
                             "checkpoint, TorchScript or torch.export file (default: no transfer "
                             "column)")
    parser.add_argument("--nattack-steps", type=int, default=0,
                        help="NAttack iterations on test (0 = skip; paper 500)")
    parser.add_argument("--nattack-population", type=int, default=300,
                        help="NAttack population (default 300)")
    parser.add_argument("--nattack-space", choices=["tanh", "delta"], default="tanh",
                        help="NAttack search space: tanh (the paper) or delta (eps*tanh(z) "
                             "added to the image; stronger on near-binary images like MNIST)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="stochastic predictions per test verdict (default 3)")
    parser.add_argument("--max-batch", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None,
                        help="output folder (default: <checkpoint folder>/smoothing, or "
                             "runs/smoothing_<model> for --model)")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..analysis.smoothing_sweeps import (
        choose,
        plot_sweeps,
        sweep,
        throughput,
        write_tables,
    )
    from ..atomic import atomic_write_json, atomic_write_text
    from ..data import as_tensors, load_split
    from ..loading import open_model
    from ..provenance import relative_path
    from .evaluate import data_root, default_output, model_label, open_from_args, resolve_dataset

    if args.n_val < 1 or args.n_test < 0 or args.repeats < 1 or args.eps < 0:
        raise AdvDefenseError("need --n-val >= 1, --n-test >= 0, --repeats >= 1, --eps >= 0")
    loaded = open_from_args(args)
    model = loaded.model
    dataset, _ = resolve_dataset(args, loaded)
    root = data_root(args, loaded)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    substitute = None  # loaded before any work, so a bad file fails first
    if args.substitute and args.n_test:
        substitute = open_model(args.substitute, device=device).model
    out = Path(args.output) if args.output else default_output(args, "smoothing", loaded)
    progress = not args.no_progress
    xv, yv = as_tensors(load_split(dataset, "val", root=root, limit=args.n_val))
    xv, yv = xv.to(device), yv.to(device)
    records = sweep(model, xv, yv, sigmas=args.sigmas, ms=args.ms, votes=args.votes,
                    attack=args.attack, eps=args.eps, steps=args.steps,
                    step_size=args.step_size, attack_samples=args.attack_samples,
                    norm=args.norm, k=args.k, split="val", seed=args.seed,
                    max_batch=args.max_batch, progress=progress)
    best = choose(records)
    settings = {k: getattr(args, k) for k in ("sigmas", "ms", "votes", "k", "attack", "eps",
                                                "norm", "steps", "step_size", "attack_samples",
                                                "n_val", "seed")}
    write_tables(records, out, extra={"checkpoint": model_label(args), "settings": settings,
                                      "chosen_on_val": asdict(best)})
    plot_sweeps(records, out)
    print((out / "sweep.md").read_text())
    print(f"chosen on val: sigma={best.sigma:g} m={best.m} vote={best.vote} "
          f"(val clean {100 * best.clean:.1f}%, {args.attack} {100 * best.attacked:.1f}%)")
    speed = throughput(model, xv[:100], sigma=best.sigma, ms=args.ms, max_batch=args.max_batch)
    atomic_write_json(out / "throughput.json", {str(k): v for k, v in speed.items()}, indent=2)
    print("images/s vs m: " + ", ".join(f"m={k}: {v:.0f}" for k, v in speed.items()))
    if args.n_test:
        from ..analysis.smoothing_sweeps import attack_table, table_markdown

        nattack = None
        if args.nattack_steps > 0:
            nattack = {"steps": args.nattack_steps, "population": args.nattack_population,
                       "space": args.nattack_space}
        xt, yt = as_tensors(load_split(dataset, "test", root=root, limit=args.n_test))
        xt, yt = xt.to(device), yt.to(device)
        table = attack_table(model, xt, yt, sigma=best.sigma, m=best.m, votes=args.votes,
                             k=args.k, eps=args.eps, steps=args.steps,
                             step_size=args.step_size, attack_samples=args.attack_samples,
                             norm=args.norm, substitute=substitute, nattack=nattack,
                             nattack_vote=best.vote, repeats=args.repeats, seed=args.seed,
                             max_batch=args.max_batch, progress=progress)
        table["chosen_on_val"] = asdict(best)
        table["substitute"] = args.substitute and relative_path(args.substitute)
        atomic_write_json(out / "test_table.json", table)
        md = (f"test: sigma={best.sigma:g}, m={best.m} chosen on val "
              f"(best vote there: {best.vote})\n\n" + table_markdown(table))
        atomic_write_text(out / "test_table.md", md)
        print(md)
    return 0
