"""Objectives beyond a plain logit loss.

``HeadsObjective`` (CAS, Bai et al. 2021, Sec. 4 / reference ``reg_attack.py``): the adaptive
loss ``L(main) + beta * mean_s L(aux_s)`` over every auxiliary head reachable through
:func:`advdefense.models.heads.forward_with_aux`. With ``beta = 0`` or a model without
auxiliary heads it equals the plain loss on the main logits.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.heads import forward_with_aux
from .base import Objective
from .losses import LossFn


class HeadsObjective(Objective):
    """``loss(main) + aux_weight * mean over auxiliary heads of loss(aux)``."""

    def __init__(self, loss: str | LossFn = "ce", *, aux_weight: float = 2.0) -> None:
        super().__init__(loss)
        self.aux_weight = float(aux_weight)
        self.name = f"{self.name}+{self.aux_weight:g}*aux"

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target=None):
        logits, aux = forward_with_aux(model, x)
        loss = self.loss_fn(logits, y, target)
        if aux and self.aux_weight:
            aux_loss = torch.stack([self.loss_fn(a, y, target) for a in aux]).mean(0)
            loss = loss + self.aux_weight * aux_loss
        return loss, logits
