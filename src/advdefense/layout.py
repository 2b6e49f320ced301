"""Memory layout of convolutional models: channels_last where it is measured faster.

oneDNN (CPU) runs a convolution in channels_last (NHWC) when its input *or its weight* is in
that layout, and the layout then carries through the following layers. Converting only the
4-D weights is therefore enough, and the attack's own tensors (inputs, random starts, steps)
keep their layout, so results do not depend on it beyond float rounding of the convolutions.
``benchmarks/bench_pgd.py`` measures the gain (``docs/benchmarks.md``).

``auto`` (the default) uses channels_last on the CPU for models with a ``Conv2d``; on CUDA,
where the gain depends on the GPU and the precision, it leaves the layout as it is (set
``"channels_last"`` to force it). :func:`set_memory_format` changes the default for the
process; :func:`channels_last_weights` is what attacks, evaluations and training use.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["MODES", "channels_last_weights", "get_memory_format", "match_layout",
           "set_memory_format", "to_channels_last", "wants_channels_last"]

MODES = ("auto", "channels_last", "contiguous")
_mode = "auto"


def set_memory_format(mode: str) -> None:
    """The process-wide default: ``auto``, ``channels_last`` or ``contiguous`` (off)."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"memory format must be one of {', '.join(MODES)}, got {mode!r}")
    _mode = mode


def get_memory_format() -> str:
    return _mode


def _device_type(model: nn.Module) -> str | None:
    for p in model.parameters():
        return p.device.type
    return None


def _convertible(model: nn.Module) -> bool:
    if isinstance(model, torch.jit.ScriptModule):
        return False
    return not any(isinstance(m, nn.parallel.DistributedDataParallel) for m in model.modules())


def wants_channels_last(model: nn.Module, mode: str | None = None) -> bool:
    """Whether ``mode`` (default: the process default) puts this model's convolutions in
    channels_last."""
    mode = _mode if mode is None else mode
    if mode not in MODES:
        raise ValueError(f"memory format must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "contiguous" or not _convertible(model):
        return False
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return False
    return mode == "channels_last" or _device_type(model) == "cpu"


def to_channels_last(model: nn.Module, mode: str | None = None) -> list[nn.Parameter]:
    """Put the model's contiguous 4-D parameters in channels_last when
    :func:`wants_channels_last` (values untouched, parameters keep their identity, so
    optimizers and hooks still see them); returns the parameters it converted."""
    changed: list[nn.Parameter] = []
    if wants_channels_last(model, mode):
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 4 and p.is_contiguous() and p.stride() != _nhwc_strides(p.shape):
                    p.data = p.data.clone(memory_format=torch.channels_last)
                    changed.append(p)
    return changed


def match_layout(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` in exact channels_last strides when ``ref`` (a weight) has them and ``t`` (a value
    computed from it, such as a noisy weight) lost them; otherwise ``t`` itself."""
    if (t.dim() == 4 and ref.dim() == 4 and ref.stride() == _nhwc_strides(ref.shape)
            and t.shape == ref.shape and t.stride() != ref.stride()):
        return t.clone(memory_format=torch.channels_last)
    return t


def _nhwc_strides(shape: torch.Size) -> tuple[int, ...]:
    """The exact channels_last strides of a 4-D shape. A weight with one input channel (the
    stem of a grey-scale model) or a 1x1 kernel is contiguous in both layouts, and
    ``.contiguous(memory_format=channels_last)`` leaves its contiguous strides; oneDNN then
    reads it as contiguous and runs that convolution, and everything after it, in NCHW
    until the next weight forces a conversion (a copy of the activations, forward and
    backward). Cloning into these strides makes the layout unambiguous."""
    n, c, h, w = shape
    return (c * h * w, 1, w * c, c)


@contextlib.contextmanager
def channels_last_weights(model: nn.Module, mode: str | None = None) -> Iterator[nn.Module]:
    """:func:`to_channels_last` for the duration of the block; afterwards exactly the
    converted parameters are contiguous again. Nested blocks convert nothing more."""
    changed = to_channels_last(model, mode)
    try:
        yield model
    finally:
        with torch.no_grad():
            for p in changed:
                p.data = p.data.clone(memory_format=torch.contiguous_format)
