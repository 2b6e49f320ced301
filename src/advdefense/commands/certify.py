"""``advdefense certify --checkpoint C --sigma 0.25 [options]``: Cohen et al. (2019) CERTIFY of
the Gaussian-smoothed version of a model (any weight noise stays on): an advdefense checkpoint
or any model ``--model`` names (see :mod:`advdefense.loading`; then ``--dataset`` is needed).

Writes ``certify.json`` (per-example prediction, radius, p_A lower bound, label) and
``certify.md`` (certified accuracy at each radius of ``--radii``) into ``--output``, each
atomically, with a progress bar over the examples. Every batch of examples is seeded on its
own; with ``--state FILE`` each finished batch is saved and a rerun resumes from it.

Example::

    advdefense certify --checkpoint runs/cni_w_at/last.pt --sigma 0.25 --n 1000 --n0 100 \\
        --alpha 0.001 --limit 100 --output runs/cni_w_at/certify
    advdefense certify --model my_models.py:Net --weights net.pt --dataset cifar10 --sigma 0.25
"""

from __future__ import annotations

import argparse
import time
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
    parser.add_argument("--n", type=int, default=100000,
                        help="estimation samples (default 100000, Cohen et al.)")
    parser.add_argument("--alpha", type=float, default=0.001, help="failure probability")
    parser.add_argument("--limit", type=int, default=100, help="number of examples")
    parser.add_argument("--split", default="test")
    parser.add_argument("--radii", type=_floats, default=[0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0])
    parser.add_argument("--batch-samples", type=int, default=1000,
                        help="noise samples per pass (default 1000)")
    parser.add_argument("--max-batch", type=int, default=None,
                        help="rows per forward pass (default: 4096 on the CPU, sized from "
                             "free device memory on a GPU)")
    parser.add_argument("--batch", type=int, default=20, help="examples per certify call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--state", default=None, metavar="FILE",
                        help="save every finished batch to FILE; rerun with it to resume")
    parser.add_argument("--output", default=None,
                        help="output folder (default: <checkpoint folder>/certify, or "
                             "runs/certify_<model> for --model)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from ..atomic import atomic_write_json, atomic_write_text
    from ..attacks.base import batch_seed
    from ..data import as_tensors, dataset_info, load_split
    from ..defenses.smoothing import certify
    from ..evaluation.harness import default_max_batch
    from ..evaluation.resume import BatchStore, model_fingerprint, run_fingerprint
    from ..loading import check_logits
    from ..provenance import relative_path, relative_value
    from ..randomness import seeded
    from .evaluate import data_root, default_output, model_label, open_from_args, resolve_dataset

    if args.limit < 1 or args.batch < 1:
        raise AdvDefenseError("--limit and --batch must be >= 1")
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
    settings = {k: getattr(args, k) for k in ("sigma", "n0", "n", "alpha", "batch", "seed",
                                               "batch_samples")}
    store = BatchStore(args.state, run_fingerprint(x, y, settings, model_fingerprint(model)))
    preds, radii, plow, t0 = [], [], [], time.perf_counter()
    bar = tqdm(total=x.shape[0], desc="certify", unit="img", disable=args.no_progress)
    with bar:
        for s in range(0, x.shape[0], args.batch):
            if str(s) not in store:  # each batch seeded on its own: resumable
                with seeded(batch_seed(args.seed, s)):
                    r = certify(model, x[s : s + args.batch].to(device), sigma=args.sigma,
                                n0=args.n0, n=args.n, alpha=args.alpha,
                                max_batch=max_batch, batch_samples=args.batch_samples,
                                seed=batch_seed(args.seed, s))
                store.put(str(s), {"prediction": r.prediction.tolist(),
                                   "radius": r.radius.tolist(), "p_lower": r.p_lower.tolist()})
            done = store.get(str(s))
            preds.append(torch.tensor(done["prediction"], dtype=torch.long))
            radii.append(torch.tensor(done["radius"], dtype=torch.float64))
            plow.append(torch.tensor(done["p_lower"], dtype=torch.float64))
            bar.update(min(args.batch, x.shape[0] - s))
    seconds = time.perf_counter() - t0
    pred, radius, p_lower = torch.cat(preds), torch.cat(radii), torch.cat(plow)
    correct = pred == y
    table = {f"{r:g}": float((correct & (radius >= r)).float().mean()) for r in args.radii}
    name = model_label(args)
    payload = {"checkpoint": args.checkpoint and relative_path(args.checkpoint),
               "model": relative_value(loaded.source), "dataset": dataset,
               "sigma": args.sigma, "n0": args.n0,
               "n": args.n, "alpha": args.alpha, "split": args.split, "examples": len(y),
               "seconds": seconds, "abstain_rate": float((pred == -1).float().mean()),
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
