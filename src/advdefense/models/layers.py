"""Building blocks shared by every architecture: input normalization and the norm factory."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

NormFactory = Callable[[int], nn.Module]
"""Builds a 2-d normalization layer for a number of channels (default: ``nn.BatchNorm2d``)."""


class InputNormalization(nn.Module):
    """Per-channel ``(x - mean) / std`` as the first layer of a model.

    Keeping it inside the model lets attacks, noise and smoothing work in [0, 1] pixel space
    (DESIGN.md, contract 1).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError("mean and std must have the same number of channels")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def batchnorm(channels: int) -> nn.Module:
    """The default norm factory."""
    return nn.BatchNorm2d(channels)


def norm_factory(kind: str, *, groups: int = 8) -> NormFactory:
    """A norm factory by name: ``bn``, ``in`` (affine instance norm), ``ln``, ``gn``.

    ``ln`` is GroupNorm with one group, ``gn`` GroupNorm with ``min(groups, channels)`` groups
    (reduced to a divisor of ``channels``).
    """

    def make(channels: int) -> nn.Module:
        if kind == "bn":
            return nn.BatchNorm2d(channels)
        if kind == "in":
            return nn.GroupNorm(channels, channels)
        if kind == "ln":
            return nn.GroupNorm(1, channels)
        if kind == "gn":
            g = min(groups, channels)
            while channels % g:
                g -= 1
            return nn.GroupNorm(g, channels)
        raise ValueError(f"unknown norm kind {kind!r}; choose bn, in, ln or gn")

    return make
