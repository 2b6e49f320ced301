"""Reduced precision for the attacks of an evaluation: ``bf16`` autocast, fp32 verdicts.

With ``attack_precision="bf16"`` the attacks' forward and backward passes run under
``torch.autocast(device, dtype=torch.bfloat16)`` (convolutions and matrix products in bf16 on
CPUs with avx512_bf16/AMX and on GPUs); the losses (:mod:`advdefense.attacks.losses`), the
steps and the projections stay in fp32, and every verdict that decides robust accuracy is made
in fp32 outside autocast. Inside the attacks, every decision that ends the attack on an
example or keeps a point as adversarial (success tests, stopping rules, acceptance of a
candidate, best-iterate updates) is confirmed in fp32 (:func:`full_precision`), so an attack
never stops on a point that is adversarial only in bf16. A bf16 attack can only be weaker,
never report a lower accuracy than the model has: ``benchmarks/bench_bf16.py`` measures both
its speed and its robust accuracy beside fp32 on a trained model. On a CPU without bf16
instructions autocast is emulated and much slower than fp32 (11-17x for PGD and training
steps on a 2-core AVX2 machine): a warning says so once per process
(:func:`warn_if_bf16_emulated`).
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch

from .errors import AdvDefenseError

__all__ = ["PRECISIONS", "attack_autocast", "bf16_is_native", "check_precision",
           "full_precision", "reduced_precision", "warn_if_bf16_emulated"]

PRECISIONS = ("fp32", "bf16")
_log = logging.getLogger(__name__)
_warned = False


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise AdvDefenseError(f"attack precision must be one of {', '.join(PRECISIONS)}, "
                              f"got {precision!r}")
    return precision


def attack_autocast(precision: str, device: torch.device | str):
    """The context an attack runs in: bf16 autocast on ``device``, or nothing for fp32."""
    if check_precision(precision) == "fp32":
        return contextlib.nullcontext()
    warn_if_bf16_emulated(device)
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def reduced_precision(device: torch.device | str) -> bool:
    """Whether an autocast (bf16 or fp16) is active for ``device``'s type here."""
    return _autocast_enabled(torch.device(device).type)


def full_precision(device: torch.device | str):
    """fp32 inside an autocast: the context of the decisions an attack takes on a point
    (nothing where no autocast is active)."""
    kind = torch.device(device).type
    if not _autocast_enabled(kind):
        return contextlib.nullcontext()
    return torch.autocast(kind, enabled=False)


def _autocast_enabled(kind: str) -> bool:
    try:
        return torch.is_autocast_enabled(kind)
    except TypeError:  # torch < 2.4 has one query per device type
        return torch.is_autocast_cpu_enabled() if kind == "cpu" else torch.is_autocast_enabled()


def bf16_is_native(device: torch.device | str) -> bool:
    """Whether bf16 convolutions run on bf16 instructions here: always on CUDA; on the CPU
    where oneDNN finds avx512_bf16 or AMX."""
    return torch.device(device).type != "cpu" or _cpu_has_bf16()


@functools.cache
def _cpu_has_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def warn_if_bf16_emulated(device: torch.device | str) -> bool:
    """Log one warning per process when bf16 would be emulated on ``device`` (slower than
    fp32); returns whether it is."""
    global _warned
    emulated = not bf16_is_native(device)
    if emulated and not _warned:
        _warned = True
        _log.warning("this CPU has no bf16 instructions (avx512_bf16 or AMX): bf16 autocast is "
                     "emulated and runs slower than fp32; use fp32 here")
    return emulated
