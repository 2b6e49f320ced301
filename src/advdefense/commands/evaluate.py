"""``advdefense evaluate --checkpoint C [options]``: evaluate a trained model honestly.

Loads the model and its config from the checkpoint, the data split named by the config,
runs either named attacks (``--attacks``, default: the demo set of
:func:`advdefense.evaluation.standard_attack_specs`) under the chosen protocols at every eps
of ``--eps-sweep`` (plus ``--eps``), or an AutoAttack-style suite (``--suite``) at ``--eps``;
then the attack-failure checks. Prints the Markdown table and the checks and writes
``report.json``, ``report.md`` and ``accuracy_vs_eps.png`` into ``--output``.

Example::

    advdefense evaluate --checkpoint runs/pgd_at/last.pt --eps 0.3 --eps-sweep 0.1,0.2,0.3 \\
        --protocols fresh,paper,fixed --n 500 --output runs/pgd_at/eval
    torchrun --nproc_per_node=2 -m advdefense evaluate --checkpoint runs/pgd_at/last.pt ...

Under ``torchrun`` every process evaluates the examples ``rank::world`` and the per-example
results are gathered in dataset order (:mod:`advdefense.evaluation.distributed`); rank 0 writes
the report. A ``--state`` file gets a ``.rank<r>`` suffix per process.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..errors import AdvDefenseError, CheckpointError


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}") from None
    return values


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint written by train")
    parser.add_argument("--attacks", type=_names, default=None,
                        help="comma-separated registry names (default: fgsm,pgd,cw[,apgd-ce])")
    parser.add_argument("--eps", type=float, default=0.3, help="attack radius (default 0.3)")
    parser.add_argument("--eps-sweep", type=_floats, default=None,
                        help="comma-separated radii for the accuracy-vs-eps curve")
    parser.add_argument("--suite", choices=("standard", "rand", "full"), default=None,
                        help="run an AutoAttack-style cascade instead of --attacks")
    parser.add_argument("--norm", choices=("linf", "l2"), default="linf")
    parser.add_argument("--protocols", type=_names, default=["fresh"],
                        help="fresh,paper,fixed (stochastic models; default fresh)")
    parser.add_argument("--steps", type=int, default=20, help="PGD/CW iterations (default 20)")
    parser.add_argument("--repeats", type=int, default=10,
                        help="stochastic predictions per verdict (default 10)")
    parser.add_argument("--eot", type=int, default=None,
                        help="EOT samples (default: 20 for stochastic models, else 1)")
    parser.add_argument("--n", "--examples", dest="n", type=int, default=1000,
                        help="number of test examples (--examples under torchrun, whose own "
                             "options make --n ambiguous)")
    parser.add_argument("--split", default="test", help="data split (default test)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--output", default=None,
                        help="output folder (default: <checkpoint folder>/eval)")
    parser.add_argument("--state", default=None, help="suite state file (resumable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-checks", action="store_true", help="skip the failure checks")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _validate(args: argparse.Namespace) -> list[float]:
    from ..attacks import ATTACKS
    from ..errors import unknown_name
    from ..evaluation.protocols import check_protocol

    eps_list = sorted(set((args.eps_sweep or []) + [args.eps]))
    for e in eps_list:
        if not math.isfinite(e) or e < 0:
            raise AdvDefenseError(f"eps must be a finite number >= 0, got {e}")
    for p in args.protocols:
        check_protocol(p)
    for name in args.attacks or []:
        if name not in ATTACKS:
            raise unknown_name("attack", name, ATTACKS)
    for key in ("repeats", "n", "batch_size", "steps"):
        if getattr(args, key) < 1:
            raise AdvDefenseError(f"--{key.replace('_', '-')} must be >= 1")
    if args.eot is not None and args.eot < 1:
        raise AdvDefenseError("--eot must be >= 1")
    if not Path(args.checkpoint).is_file():
        raise CheckpointError(f"checkpoint {args.checkpoint} not found; pass the .pt file "
                              "written by `advdefense train`")
    return eps_list


def _specs(args, eps: float, eot: int):
    from ..attacks import build_attack
    from ..evaluation import AttackSpec, standard_attack_specs

    if not args.attacks:
        return standard_attack_specs(eps, norm=args.norm, steps=args.steps, eot_samples=eot,
                                     seed=args.seed, protocols=tuple(args.protocols))
    specs = []
    for name in args.attacks:
        kw = dict(eps=eps, norm=args.norm, eot_samples=eot, seed=args.seed)
        if name in ("pgd", "cw"):
            kw.update(steps=args.steps, step_size=eps / 4)
        try:
            attack = build_attack(name, **kw)
        except TypeError as exc:
            raise AdvDefenseError(f"attack {name!r} cannot be built from the CLI: {exc}") from None
        specs += [AttackSpec(name, attack, p) for p in args.protocols]
    return specs


def run(args: argparse.Namespace) -> int:
    eps_list = _validate(args)
    try:
        from ..training.checkpoint import load_model_from_checkpoint
    except ImportError as exc:
        raise AdvDefenseError(f"checkpoint loading is not available in this build ({exc})") \
            from None
    from .. import distributed as D
    from ..data import load_split
    from ..evaluation import evaluate, format_checks
    from ..evaluation.distributed import gather_result, shard
    from ..evaluation.harness import load_data
    from ..evaluation.report import to_markdown, write_report
    from ..evaluation.suite import run_suite
    from ..provenance import relative_path, relative_value
    from ..randomness import is_stochastic

    ctx = D.init_from_env("cpu")
    try:
        model, cfg = load_model_from_checkpoint(args.checkpoint)
        data = load_split(cfg.data.name, args.split, root=getattr(cfg.data, "root", "data"),
                          limit=args.n)
        x_all, y_all = load_data(data, args.n)
        n_total = x_all.shape[0]
        x, y = shard(x_all, y_all)  # torchrun: this process's examples rank::world
        stochastic = is_stochastic(model)
        eot = args.eot if args.eot is not None else (20 if stochastic else 1)
        out = Path(args.output) if args.output else Path(args.checkpoint).parent / "eval"
        progress = not args.no_progress and ctx.is_main
        check_options = {"seed": args.seed}
        if args.suite:
            state = args.state
            if state and ctx.enabled:
                state = f"{state}.rank{ctx.rank}"
            result = run_suite(model, (x, y), suite=args.suite, norm=args.norm, eps=args.eps,
                               eot_samples=eot, repeats=args.repeats, state_path=state,
                               batch_size=args.batch_size, seed=args.seed,
                               progress=progress, checks=not args.no_checks,
                               check_options=check_options)
            sweep = None
        else:
            sweep = {}
            for e in eps_list:
                sweep[e] = evaluate(model, (x, y), _specs(args, e, eot), repeats=args.repeats,
                                    batch_size=args.batch_size, seed=args.seed,
                                    progress=progress, checks=False)
            result = sweep[args.eps]
            if not args.no_checks:
                from ..evaluation import run_checks

                accs = ({e: r.accuracy("worst").value for e, r in sweep.items()}
                        if len(sweep) > 2 else None)
                result.checks = run_checks(model, (x, y), result, eps=args.eps,
                                           norm=args.norm, eps_accuracies=accs,
                                           **check_options)
        # per-example verdicts back in dataset order (identity in one process)
        checks = result.checks
        if sweep is not None:
            sweep = {e: gather_result(r, n_total) for e, r in sweep.items()}
            result = sweep[args.eps]
        else:
            result = gather_result(result, n_total)
        result.checks = checks
        if not ctx.is_main:
            return 0
        checkpoint = relative_path(args.checkpoint)
        extra = {"checkpoint": checkpoint, "dataset": cfg.data.name,
                 "split": args.split, "processes": ctx.world_size,
                 "command": {k: relative_value(v) for k, v in vars(args).items()
                             if not k.startswith("_")}}
        paths = write_report(result, out, sweep=sweep, extra=extra,
                             title=f"Evaluation of {checkpoint}")
        print(to_markdown(result, title=f"Evaluation of {checkpoint}", sweep=sweep))
        if result.checks:
            print(format_checks(result.checks))
        print(f"wrote {', '.join(str(p) for p in paths.values())}")
    finally:
        D.cleanup(ctx)
    return 0
