"""Reduced precision for the attacks of an evaluation: ``bf16`` autocast, fp32 verdicts.

With ``attack_precision="bf16"`` the attacks' forward and backward passes run under
``torch.autocast(device, dtype=torch.bfloat16)`` (convolutions and matrix products in bf16 on
CPUs with avx512_bf16/AMX and on GPUs); the losses (:mod:`advdefense.attacks.losses`), the
steps and the projections stay in fp32, and every verdict that decides robust accuracy is made
in fp32 outside autocast. A bf16 attack can only be weaker, never report a lower accuracy
than the model has: ``benchmarks/bench_bf16.py`` measures both its speed and its robust
accuracy beside fp32 on a trained model.
"""

from __future__ import annotations

import contextlib

import torch

from .errors import AdvDefenseError

__all__ = ["PRECISIONS", "attack_autocast", "check_precision"]

PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise AdvDefenseError(f"attack precision must be one of {', '.join(PRECISIONS)}, "
                              f"got {precision!r}")
    return precision


def attack_autocast(precision: str, device: torch.device | str):
    """The context an attack runs in: bf16 autocast on ``device``, or nothing for fp32."""
    if check_precision(precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
