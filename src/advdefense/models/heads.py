"""Auxiliary outputs: how losses and attacks reach heads beyond the main logits.

A model with auxiliary heads (CAS) defines ``forward_with_aux(x, y=None) -> (logits, [aux...])``;
``y`` is the label some heads need in training (the CAS mask uses the true class). ``model(x)``
still returns the main logits only (contract 1). Plain models have no auxiliary heads.
"""

from __future__ import annotations

import torch
from torch import nn


def forward_with_aux(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Main logits and the list of auxiliary logits (empty for plain models)."""
    fwa = getattr(model, "forward_with_aux", None)
    if fwa is None:
        inner = getattr(model, "module", None)  # DistributedDataParallel / compiled wrappers
        fwa = getattr(inner, "forward_with_aux", None) if inner is not None else None
        if fwa is not None and isinstance(model, nn.parallel.DistributedDataParallel):
            fwa = None  # DDP must run its own forward to sync gradients
    if fwa is None:
        return model(x), []
    return fwa(x, y)
