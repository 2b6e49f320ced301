"""Train and evaluate one ``cifar10-jpeg`` entry end to end on a GPU, in a few minutes.

PGD-AT (Madry et al. 2018; PGD-10, eps 8/255, step 2/255, random start) of ResNet-18 with the
papers' optimizer (SGD 0.1, momentum 0.9, weight decay 5e-4, batch 128, crop and flip) on the
``fit`` split of the full CIFAR-10 (JPEG copy) (45,000 images), channels_last weights on CUDA,
for ``--epochs`` epochs with a cosine learning rate (a short run: the papers' step schedule
spans 100-200 epochs), monitored by PGD-10 on 500 ``val`` images; then AutoAttack's standard
cascade (``run_suite(suite="standard")``: APGD-CE, APGD-T and FAB-T with 9 targets, Square with
5,000 queries) and the attack-failure checks on the first ``--n`` test images. Results are
CIFAR-10 (JPEG copy) results, not CIFAR-10 results.

    python scripts/gpu_entry.py --data-root ../shared/data/cifar10-jpeg.tar.gz --output runs/ge
    python scripts/gpu_entry.py --smoke --output runs/gpu_entry_smoke   # the same code, CPU, seconds

On one H200 (PGD-AT of ResNet-18 measured at 1,874 img/s with channels_last): about 25 s per
epoch, so the default 5 epochs and the evaluation take about 4-6 minutes with the decoding of
the JPEG copy. ``--smoke`` runs the same steps on the CPU with the shipped subset, a width-2
``resnet10_narrow``, 64 training images, one epoch of PGD-2 and 8 test images.
Writes ``OUTPUT/summary.json`` and the evaluation report (``OUTPUT/eval/``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from advdefense.config import config_from_dict  # noqa: E402
from advdefense.data import as_tensors, load_split  # noqa: E402
from advdefense.evaluation.checks import CheckSettings  # noqa: E402
from advdefense.evaluation.report import write_report  # noqa: E402
from advdefense.evaluation.suite import run_suite  # noqa: E402
from advdefense.presets import C10_EPS, cifar10_jpeg_config  # noqa: E402
from advdefense.training.checkpoint import load_model_from_checkpoint  # noqa: E402
from advdefense.training.trainer import Trainer  # noqa: E402


def entry_config(args: argparse.Namespace) -> dict:
    """The entry's config: the cifar10-jpeg preset's PGD-AT settings, at ResNet-18 and PGD-10
    (or the smoke sizes)."""
    cfg = cifar10_jpeg_config("gpu_entry_pgd_at_resnet18", recipe="pgd_at", seed=args.seed,
                              epochs=args.epochs, monitor_size=8 if args.smoke else 500,
                              limit=64 if args.smoke else None,
                              train_steps=2 if args.smoke else 10)
    cfg["output_dir"] = str(Path(args.output) / "train")
    cfg["model"] = ({"name": "resnet10_narrow", "norm": "bn", "kwargs": {"width": 2}}
                    if args.smoke else {"name": "resnet18", "norm": "bn"})
    if args.data_root:
        cfg["data"]["root"] = args.data_root
    cfg["train"]["schedule"] = {"name": "cosine"}
    cfg["train"]["early_stopping"] = None
    cfg["train"]["channels_last"] = "auto" if args.smoke else True
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=None,
                        help="the full JPEG copy (cifar10-jpeg.tar.gz or its folder); default: "
                             "the shipped subset")
    parser.add_argument("--epochs", type=int, default=None, help="default 5 (smoke: 1)")
    parser.add_argument("--n", type=int, default=None, help="test images (default 500; smoke 8)")
    parser.add_argument("--output", default="runs/gpu_entry")
    parser.add_argument("--device", default=None, help="default cuda (smoke: cpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true",
                        help="the same code on the CPU in seconds (tiny model and data)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    args.epochs = args.epochs or (1 if args.smoke else 5)
    n = args.n or (8 if args.smoke else 500)
    device = args.device or ("cpu" if args.smoke else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_entry: CUDA is not available here; pass --smoke (or --device cpu)",
              file=sys.stderr)
        return 2
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    out = Path(args.output)
    t_start = time.perf_counter()

    cfg = config_from_dict(entry_config(args))
    trainer = Trainer(cfg, device=device, progress=False)
    try:
        trainer.fit()
    finally:
        trainer.close()
    history = list(trainer.history)
    t_train = time.perf_counter() - t_start
    model, _ = load_model_from_checkpoint(Path(cfg.output_dir) / "last.pt", map_location=device)
    fit_images = len(trainer.train_set)

    t0 = time.perf_counter()
    x, y = as_tensors(load_split("cifar10-jpeg", "test", root=cfg.data.root, limit=n))
    result = run_suite(model, (x.to(device), y.to(device)), suite="standard", eps=C10_EPS,
                       seed=args.seed, checks=CheckSettings(seed=args.seed,
                                                            n_probe=8 if args.smoke else 64))
    result.config["suite"] = "standard"
    t_eval = time.perf_counter() - t0
    title = "PGD-AT ResNet-18 on CIFAR-10 (JPEG copy): standard suite at eps 8/255"
    write_report(result, out / "eval", title=title, plot=False,
                 extra={"dataset": "cifar10-jpeg (CIFAR-10 (JPEG copy))", "eps": C10_EPS})
    epoch_seconds = [float(r.get("train_seconds", r.get("seconds", 0.0))) for r in history]
    summary = {
        "what": title, "smoke": args.smoke, "device": str(device),
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "torch": torch.__version__, "model": cfg.model.name, "epochs": len(history),
        "train_attack": f"PGD-{cfg.train.attack.steps}, eps 8/255, step 2/255",
        "fit_images": fit_images, "epoch_seconds": epoch_seconds,
        "train_img_per_s": (fit_images / min(epoch_seconds)
                            if fit_images and epoch_seconds and min(epoch_seconds) > 0
                            else None),
        "val_monitor": {k: history[-1].get(k) for k in ("monitor_clean_acc", "monitor_pgd_acc",
                                                         "monitor")} if history else None,
        "test_images": int(y.shape[0]),
        "clean": result.accuracy("clean").value, "standard_suite": result.accuracy().value,
        "checks_failed": [c.name for c in result.checks if c.passed is False],
        "train_seconds": round(t_train, 1), "eval_seconds": round(t_eval, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
