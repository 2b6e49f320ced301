"""Per-example attack losses, all oriented so that the attacker **maximizes** them.

``ce``
    cross-entropy of the true class (untargeted) or minus the cross-entropy of the target.
``margin`` (Carlini & Wagner 2017, eq. 6 without kappa)
    ``max_{c != y} z_c - z_y``; targeted: ``z_t - max_{c != t} z_c``.
``dlr`` (Croce & Hein 2020, eq. 6; targeted eq. 7)
    ``-(z_y - max_{c != y} z_c) / (z_pi1 - z_pi3)``; targeted
    ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``. Needs at least 3 (4 for targeted) classes.

Every loss is computed in fp32 (logits of a bf16 autocast forward are cast first).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

from ..errors import unknown_name

LossFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _other_max(logits: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    masked = logits.clone()
    masked.scatter_(1, cls[:, None], float("-inf"))
    return masked.max(dim=1).values


def ce_loss(logits, y, target=None):
    logits = logits.float()  # fp32 losses also under bf16 autocast
    if target is None:
        return F.cross_entropy(logits, y, reduction="none")
    return -F.cross_entropy(logits, target, reduction="none")


def margin_loss(logits, y, target=None):
    logits = logits.float()
    if target is None:
        return _other_max(logits, y) - logits.gather(1, y[:, None]).squeeze(1)
    return logits.gather(1, target[:, None]).squeeze(1) - _other_max(logits, target)


def dlr_loss(logits, y, target=None):
    logits = logits.float()
    z_sorted = logits.sort(dim=1, descending=True).values
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    if target is None:
        if logits.shape[1] < 3:
            raise ValueError("the DLR loss needs at least 3 classes")
        denom = z_sorted[:, 0] - z_sorted[:, 2] + 1e-12
        return -(z_y - _other_max(logits, y)) / denom
    if logits.shape[1] < 4:
        raise ValueError("the targeted DLR loss needs at least 4 classes")
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    denom = z_sorted[:, 0] - 0.5 * (z_sorted[:, 2] + z_sorted[:, 3]) + 1e-12
    return -(z_y - z_t) / denom


LOSSES: dict[str, LossFn] = {"ce": ce_loss, "margin": margin_loss, "cw": margin_loss,
                             "dlr": dlr_loss}


def get_loss(name: str | LossFn) -> LossFn:
    if callable(name):
        return name
    if name not in LOSSES:
        raise unknown_name("attack loss", name, LOSSES)
    return LOSSES[name]
