"""``advdefense certify --checkpoint C --sigma 0.25 [options]``: Cohen et al. (2019) CERTIFY of
the Gaussian-smoothed version of a checkpoint's model (any weight noise stays on).

Writes ``certify.json`` (per-example prediction, radius, p_A lower bound, label) and
``certify.md`` (certified accuracy at each radius of ``--radii``) into ``--output``.

Example::

    advdefense certify --checkpoint runs/cni_w_at/last.pt --sigma 0.25 --n 1000 --n0 100 \\
        --alpha 0.001 --limit 100 --output runs/cni_w_at/certify
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..errors import AdvDefenseError
from ..provenance import relative_path


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint written by train")
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
    parser.add_argument("--max-batch", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=20, help="examples per certify call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None,
                        help="output folder (default: <checkpoint folder>/certify)")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data import as_tensors, load_split
    from ..defenses.smoothing import certify
    from ..randomness import seeded
    from ..training.checkpoint import load_model_from_checkpoint

    if args.limit < 1 or args.batch < 1:
        raise AdvDefenseError("--limit and --batch must be >= 1")
    model, cfg = load_model_from_checkpoint(args.checkpoint)
    model.eval()
    x, y = as_tensors(load_split(cfg.data.name, args.split, root=getattr(cfg.data, "root", "data"),
                                 limit=args.limit))
    out = Path(args.output) if args.output else Path(args.checkpoint).parent / "certify"
    out.mkdir(parents=True, exist_ok=True)
    preds, radii, plow, t0 = [], [], [], time.perf_counter()
    with seeded(args.seed):
        for s in range(0, x.shape[0], args.batch):
            r = certify(model, x[s : s + args.batch], sigma=args.sigma, n0=args.n0, n=args.n,
                        alpha=args.alpha, max_batch=args.max_batch,
                        batch_samples=args.batch_samples)
            preds.append(r.prediction)
            radii.append(r.radius)
            plow.append(r.p_lower)
    seconds = time.perf_counter() - t0
    pred, radius, p_lower = torch.cat(preds), torch.cat(radii), torch.cat(plow)
    correct = pred == y
    table = {f"{r:g}": float((correct & (radius >= r)).float().mean()) for r in args.radii}
    payload = {"checkpoint": relative_path(args.checkpoint), "sigma": args.sigma, "n0": args.n0,
               "n": args.n, "alpha": args.alpha, "split": args.split, "examples": len(y),
               "seconds": seconds, "abstain_rate": float((pred == -1).float().mean()),
               "certified_accuracy": table,
               "per_example": [{"label": int(a), "prediction": int(b), "radius": float(c),
                                "p_lower": float(d)}
                               for a, b, c, d in zip(y, pred, radius, p_lower, strict=True)]}
    (out / "certify.json").write_text(json.dumps(payload, indent=1))
    lines = [f"Certified accuracy (Cohen et al. CERTIFY), sigma={args.sigma:g}, n0={args.n0}, "
             f"n={args.n}, alpha={args.alpha:g}, {len(y)} {args.split} examples, "
             f"abstain {100 * payload['abstain_rate']:.1f}%, {seconds:.0f} s", "",
             "| L2 radius | " + " | ".join(table) + " |", "|---|" + "---|" * len(table),
             "| certified acc % | " + " | ".join(f"{100 * v:.1f}" for v in table.values())
             + " |", ""]
    (out / "certify.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0
