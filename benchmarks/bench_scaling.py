"""Per-step costs on this machine and the wall-time estimates of docs/scaling.md.

Per model (random weights, 32x32x3 inputs, 10 classes), interleaved in one run:

* ``train``  train-mode forward + backward + SGD step, img/s
* ``attack`` eval-mode forward + backward to the input only (one PGD step), img/s
* ``fwd``    eval-mode forward under ``torch.no_grad`` (one smoothing sample), img/s

at ``--batch`` images (128; WRN-34-10 at ``--wrn-batch``, 16 by default, because one batch of
128 takes minutes here). The rows compare the measured train img/s with the figures quoted in
DESIGN.md (ResNet-20 about 200, ResNet-18 about 26 img/s); WRN-34-10 is compared with
ResNet-18. The JSON also holds the CPU wall-time estimates of the paper configurations
computed from these numbers (see docs/scaling.md for the formulas and the GPU assumptions).

Run: ``python benchmarks/bench_scaling.py``
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from advdefense.models import build_model  # noqa: E402
from advdefense.models.resnet import CIFAR_MEAN, CIFAR_STD  # noqa: E402

DESIGN = {"resnet20": 200.0, "resnet18": 26.0}


def cifar(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, num_classes=10, in_channels=3, image_size=32, mean=CIFAR_MEAN,
                       std=CIFAR_STD)


def fns_for(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def train():
        model.train()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def attack():
        model.eval()
        xr = x.detach().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(xr), y), xr)

    def fwd():
        model.eval()
        with torch.no_grad():
            model(x)

    return {"train": train, "attack": attack, "fwd": fwd}


def estimates(ips: dict[str, dict[str, float]]) -> dict[str, float]:
    """CPU wall-time estimates (hours) of the paper configurations from measured img/s."""
    out = {}
    for name in ("resnet18", "wrn34_10"):
        if name not in ips:
            continue
        r = ips[name]
        # PGD-10 adversarial training: per image 10 attack steps + 1 gradient-free forward
        # (our PGD's best-iterate check) + 1 training step; 50,000 images per epoch.
        per_img = 10 / r["attack"] + 1 / r["fwd"] + 1 / r["train"]
        out[f"{name} PGD-10 AT 200 epochs (h)"] = 200 * 50_000 * per_img / 3600
        out[f"{name} PGD-10 AT one epoch (h)"] = 50_000 * per_img / 3600
        out[f"{name} m=512 smoothing, 10,000 images (h)"] = 10_000 * 512 / r["fwd"] / 3600
        pgd20 = 20 / r["attack"] + 1 / r["fwd"]
        out[f"{name} PGD-20 eval, 10,000 images (h)"] = 10_000 * pgd20 / 3600
    return out


def main(argv=None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--wrn-batch", type=int, default=16)
    p.set_defaults(models="resnet20,resnet18,wrn34_10", repeats=3)
    args = p.parse_args(argv)
    common.setup(args)
    names = args.models.split(",")
    if args.quick:
        args.batch, args.wrn_batch = 2, 2
        names = ["resnet20"]
    rows, ips = [], {}
    for name in names:
        n = args.wrn_batch if name.startswith("wrn") else args.batch
        g = torch.Generator().manual_seed(1)
        x, y = torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
        times = common.interleaved(fns_for(cifar(name), x, y), warmup=args.warmup,
                                   repeats=args.repeats)
        ips[name] = {k: n / common.median(v) for k, v in times.items()}
        if name in DESIGN:
            ref, ref_value = "DESIGN.md figure", DESIGN[name]
        elif "resnet18" in ips:
            ref, ref_value = "resnet18 train img/s", ips["resnet18"]["train"]
        else:
            ref, ref_value = "-", ips[name]["train"]
        rows.append(common.row(
            benchmark="train step", model=name, setting=f"batch {n}, fwd+bwd+SGD",
            metric="img/s", ours=ips[name]["train"], reference=ref, ref_value=ref_value,
            ratio=ips[name]["train"] / ref_value, goal=None, seconds=times,
            attack_img_s=ips[name]["attack"], fwd_img_s=ips[name]["fwd"], batch=n))
    common.write("scaling", args, rows, extra={"img_per_s": ips, "cpu_estimates_h": estimates(ips)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
