"""``advdefense certify --checkpoint C --sigma 0.25 [options]``: Cohen et al. (2019) CERTIFY of
the Gaussian-smoothed version of a model (any weight noise stays on): an advdefense checkpoint
or any model ``--model`` names (see :mod:`advdefense.loading`; then ``--dataset`` is needed).

Writes ``certify.json`` (per-example prediction, radius, p_A lower bound, label) and
``certify.md`` (certified accuracy at each radius of ``--radii``) into ``--output``, each
atomically.

The work is cut into items (:class:`advdefense.evaluation.units.UnitJob`): units of ``--unit``
consecutive examples, each seeded from the seed and the index of its first example, and, with
``--shard-samples S``, shards of ``S`` of the ``--n`` estimation samples, seeded from (that
seed, the shard's index) (:func:`advdefense.defenses.smoothing.estimation_seed`). Every item
writes its vote counts to its own file under ``--units`` (default ``OUTPUT/units``); the
process that finishes the last item adds the shards' counts and computes the Clopper–Pearson
bound once on the sums (:func:`~advdefense.defenses.smoothing.certify_from_counts`). Under
``torchrun`` the processes take items from a counter in torchrun's store, so the radii do not
depend on the number of processes (many images: units; a few images at a large ``--n``:
shards); running the same command again computes only the missing items.

Example::

    advdefense certify --checkpoint runs/cni_w_at/last.pt --sigma 0.25 --n 1000 --n0 100 \\
        --alpha 0.001 --limit 100 --output runs/cni_w_at/certify
    advdefense certify --model my_models.py:Net --weights net.pt --dataset cifar10 --sigma 0.25
    torchrun --nproc_per_node=8 -m advdefense certify --checkpoint C --sigma 0.25 \\
        --limit 10 --unit 10 --samples 1000000 --shard-samples 100000
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import AdvDefenseError
from .evaluate import add_model_arguments


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--sigma", type=float, required=True, help="noise std, [0,1] pixels")
    parser.add_argument("--n0", type=int, default=100, help="selection samples (default 100)")
    parser.add_argument("--n", "--samples", dest="n", type=int, default=100000,
                        help="estimation samples (default 100000, Cohen et al.; --samples "
                             "under torchrun, whose own options make --n ambiguous)")
    parser.add_argument("--alpha", type=float, default=0.001, help="failure probability")
    parser.add_argument("--limit", type=int, default=100, help="number of examples")
    parser.add_argument("--split", default="test")
    parser.add_argument("--radii", type=_floats, default=[0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0])
    parser.add_argument("--batch-samples", type=int, default=1000,
                        help="noise samples per pass (default 1000)")
    parser.add_argument("--max-batch", type=int, default=None,
                        help="rows per forward pass (default: 4096 on the CPU, sized from "
                             "free device memory on a GPU)")
    parser.add_argument("--unit", "--batch", dest="unit", type=int, default=20, metavar="N",
                        help="examples per unit of work (default 20), seeded by its first "
                             "example")
    parser.add_argument("--shard-samples", type=int, default=None, metavar="S",
                        help="cut the --n estimation samples into shards of S, each an item "
                             "of work seeded on its own (default: one shard)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--units", "--state", dest="units", default=None, metavar="DIR",
                        help="folder of the per-item vote counts (default: OUTPUT/units); run "
                             "the same command again to compute the missing items")
    parser.add_argument("--output", default=None,
                        help="output folder (default: <checkpoint folder>/certify, or "
                             "runs/certify_<model> for --model)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import distributed as D
    from ..atomic import atomic_write_json, atomic_write_text
    from ..attacks.base import batch_seed
    from ..data import as_tensors, dataset_info, load_split
    from ..defenses.smoothing import (
        certify_from_counts,
        counts,
        estimation_seed,
        selection_seed,
        shard_sizes,
    )
    from ..evaluation.harness import default_max_batch
    from ..evaluation.resume import model_fingerprint, run_fingerprint
    from ..evaluation.units import UnitJob, unit_bounds
    from ..loading import check_logits
    from ..provenance import relative_path, relative_value
    from ..randomness import seeded
    from .evaluate import data_root, default_output, model_label, open_from_args, resolve_dataset

    if args.limit < 1 or args.unit < 1:
        raise AdvDefenseError("--limit and --unit must be >= 1")
    if args.shard_samples is not None and args.shard_samples < 1:
        raise AdvDefenseError("--shard-samples must be >= 1")
    D.use_local_device()
    rank, world = D.env_rank(), D.env_world_size()
    loaded = open_from_args(args)
    model = loaded.model.eval()
    dataset, _ = resolve_dataset(args, loaded)
    x, y = as_tensors(load_split(dataset, args.split, root=data_root(args, loaded),
                                 limit=args.limit))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    check_logits(model, x[:2].to(device), num_classes=dataset_info(dataset).num_classes,
                 what=f"{dataset} images")
    if args.max_batch is not None and args.max_batch < 1:
        raise AdvDefenseError("--max-batch must be >= 1")
    max_batch = args.max_batch or default_max_batch(model, x[:16].to(device))
    out = Path(args.output) if args.output else default_output(args, "certify", loaded)
    sizes = shard_sizes(args.n, args.shard_samples)
    bounds = unit_bounds(x.shape[0], args.unit)
    settings = {"sigma": args.sigma, "n0": args.n0, "n": args.n, "unit": args.unit,
                "seed": args.seed, "shards": sizes}
    fingerprint = run_fingerprint(x, y, settings, model_fingerprint(model))
    shards = len(sizes)
    names = [f"unit-{u:06d}" + (f"-shard-{s:04d}" if shards > 1 else "")
             for u in range(len(bounds)) for s in range(shards)]
    units_dir = Path(args.units) if args.units else out / "units"
    job = UnitJob(units_dir / f"certify-{fingerprint}", fingerprint, names,
                  meta={"kind": "certify", "n": x.shape[0], "unit": args.unit,
                        "units": len(bounds), "shards": shards})

    def work(i: int, _state: Path) -> dict:
        """Vote counts of one shard of one unit (the selection counts with shard 0)."""
        u, shard = divmod(i, shards)
        a, b = bounds[u]
        seed = batch_seed(args.seed, a)
        xb = x[a:b].to(device)
        kw = dict(sigma=args.sigma, max_batch=max_batch, batch_samples=args.batch_samples)
        with seeded(seed):
            est = counts(model, xb, num=sizes[shard], seed=estimation_seed(seed, shard), **kw)
            sel = counts(model, xb, num=args.n0, seed=selection_seed(seed), **kw) \
                if shard == 0 else None
        return {"estimation": est.tolist(), "selection": None if sel is None else sel.tolist()}

    if not job.run(work, progress=not args.no_progress and rank == 0, desc="certify"):
        return 0  # the process that finishes the last item writes the report
    files = job.load_all()
    seconds = sum(job.seconds.values())
    parts = []
    for u in range(len(bounds)):
        items = files[u * shards:(u + 1) * shards]
        est = sum(torch.tensor(f["estimation"], dtype=torch.long) for f in items)
        sel = torch.tensor(items[0]["selection"], dtype=torch.long)
        parts.append(certify_from_counts(sel, est, sigma=args.sigma, alpha=args.alpha))
    pred = torch.cat([r.prediction for r in parts])
    radius = torch.cat([r.radius for r in parts]).double()
    p_lower = torch.cat([r.p_lower for r in parts]).double()
    correct = pred == y
    table = {f"{r:g}": float((correct & (radius >= r)).float().mean()) for r in args.radii}
    name = model_label(args)
    payload = {"checkpoint": args.checkpoint and relative_path(args.checkpoint),
               "model": relative_value(loaded.source), "dataset": dataset,
               "sigma": args.sigma, "n0": args.n0,
               "n": args.n, "alpha": args.alpha, "split": args.split, "examples": len(y),
               "seed": args.seed, "seconds": seconds, "processes": world,
               "units": {"size": args.unit, "count": len(bounds), "shards": sizes,
                         "folder": relative_path(job.folder)},
               "abstain_rate": float((pred == -1).float().mean()),
               "certified_accuracy": table,
               "per_example": [{"label": int(a), "prediction": int(b), "radius": float(c),
                                "p_lower": float(d)}
                               for a, b, c, d in zip(y, pred, radius, p_lower, strict=True)]}
    lines = [f"Certified accuracy of {name} (Cohen et al. CERTIFY), sigma={args.sigma:g}, "
             f"n0={args.n0}, n={args.n}, alpha={args.alpha:g}, {len(y)} {dataset} "
             f"{args.split} examples, abstain {100 * payload['abstain_rate']:.1f}%, "
             f"{seconds:.0f} s", "",
             "| L2 radius | " + " | ".join(table) + " |", "|---|" + "---|" * len(table),
             "| certified acc % | " + " | ".join(f"{100 * v:.1f}" for v in table.values())
             + " |", ""]
    atomic_write_json(out / "certify.json", payload)
    atomic_write_text(out / "certify.md", "\n".join(lines))
    print("\n".join(lines))
    return 0
