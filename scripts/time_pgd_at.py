"""Time PGD-AT training steps of a model on ``cifar10-jpeg`` and extrapolate an epoch.

    python scripts/time_pgd_at.py --model resnet10_narrow --threads 2 --steps 4

The package's ``pgd_at`` recipe (PGD-10, eps 8/255, step 2/255, random start) and SGD on
batches of the ``fit`` split (shipped subset unless ``--data-root`` says otherwise); one
warm-up step, then ``--steps`` timed steps. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from advdefense.config import AttackConfig  # noqa: E402
from advdefense.data import as_tensors, dataset_info, load_split  # noqa: E402
from advdefense.layout import channels_last_weights  # noqa: E402
from advdefense.models import build_model  # noqa: E402
from advdefense.training.recipes import build_recipe  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet10_narrow")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    info = dataset_info("cifar10-jpeg")
    x, y = as_tensors(load_split("cifar10-jpeg", "fit", root=args.data_root))
    torch.manual_seed(0)
    model = build_model(args.model, num_classes=info.num_classes, in_channels=info.in_channels,
                        image_size=info.image_size, mean=info.mean, std=info.std)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    recipe = build_recipe("pgd_at", AttackConfig(eps=8 / 255, steps=10, step_size=2 / 255))
    b = args.batch

    def step(i: int) -> None:
        loss, _ = recipe.loss(model, x[i * b:(i + 1) * b], y[i * b:(i + 1) * b])
        opt.zero_grad()
        loss.backward()
        opt.step()

    with channels_last_weights(model):  # the Trainer's CPU layout
        step(0)
        start = time.perf_counter()
        for i in range(1, args.steps + 1):
            step(i)
        per_step = (time.perf_counter() - start) / args.steps
    rate = b / per_step
    print(f"{args.model}, {args.threads} threads, batch {b}: {per_step:.2f} s per PGD-AT step, "
          f"{rate:.1f} images/s; epoch of {len(y)} fit images ~ {len(y) / rate:.0f} s, "
          f"of 45,000 ~ {45000 / rate / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
