"""One shared mechanism for every stochastic part of a model (DESIGN.md, contract 2).

Every stochastic layer (an RNA normalization path, PNI/CNI noise, Gaussian input noise)
subclasses :class:`StochasticModule`. By default it draws **fresh randomness on every forward
call**. Callers control it from outside, for the whole model at once:

``freeze(model)``
    context manager: the next forward draws a state, and every later forward reuses it, until
    the context exits (a "fixed-path" attack runs inside it). ``freeze(model, states=...)``
    sets explicit states instead (e.g. one chosen RNA path).
``draw_groups(k)``
    context manager used by batched EOT and Monte-Carlo sampling: the batch is ``k`` stacked
    copies (rows ``[j*n:(j+1)*n]`` form copy ``j``) and each copy gets its *own* independent
    draw. Without it a forward call is one draw for the whole batch.
``seeded(seed)``
    context manager: forks the global torch RNG and seeds it, so a seeded attack or evaluation
    is reproducible and leaves the caller's RNG untouched. Stochastic layers draw from the
    global torch RNG, so ``torch.manual_seed`` seeds them too.
``is_stochastic(model)`` / ``stochastic_modules(model)``
    introspection.

Subclasses implement two methods:

``sample_state(x, groups)``
    draw ``groups`` independent states for input ``x`` (``x.shape[0]`` is divisible by
    ``groups``); returns any object.
``forward_with_state(x, state)``
    the layer's computation under that state.

A frozen state drawn with one group is broadcast to all groups.
Nothing here changes train/eval mode.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = [
    "StochasticModule",
    "draw_groups",
    "current_groups",
    "freeze",
    "seeded",
    "is_stochastic",
    "stochastic_modules",
    "get_states",
]

_local = threading.local()
_UNSET = object()


def current_groups() -> int:
    """Number of independent draws requested for the current forward call (default 1)."""
    return getattr(_local, "groups", 1)


@contextlib.contextmanager
def draw_groups(groups: int) -> Iterator[None]:
    """Treat each batch as ``groups`` stacked copies that get independent randomness."""
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    previous = current_groups()
    _local.groups = groups
    try:
        yield
    finally:
        _local.groups = previous


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Fork the global torch RNG (CPU and CUDA) and seed it; ``None`` leaves it unseeded."""
    if seed is None:
        yield
        return
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class StochasticModule(nn.Module):
    """Base class of layers whose forward pass is random (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._frozen = False
        self._frozen_state: Any = _UNSET
        self.last_state: Any = None

    # -- to implement -------------------------------------------------------------------
    def sample_state(self, x: torch.Tensor, groups: int) -> Any:  # pragma: no cover
        raise NotImplementedError

    def forward_with_state(self, x: torch.Tensor, state: Any) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    # -- shared machinery ---------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._frozen:
            if self._frozen_state is _UNSET:
                self._frozen_state = self.sample_state(x, 1)
            state = self._frozen_state
        else:
            groups = current_groups()
            if x.shape[0] % groups != 0:
                raise ValueError(
                    f"batch of {x.shape[0]} rows cannot be split into {groups} draw groups"
                )
            state = self.sample_state(x, groups)
        self.last_state = state
        return self.forward_with_state(x, state)

    @property
    def frozen(self) -> bool:
        return self._frozen


def stochastic_modules(model: nn.Module) -> list[StochasticModule]:
    """All stochastic layers of ``model`` in module order."""
    return [m for m in model.modules() if isinstance(m, StochasticModule)]


def is_stochastic(model: nn.Module) -> bool:
    """True if ``model`` holds at least one stochastic layer that is not frozen.

    Wrappers that are random without holding a :class:`StochasticModule` can declare it with an
    attribute ``stochastic = True``.
    """
    if getattr(model, "stochastic", False):
        return True
    return any(not m.frozen for m in stochastic_modules(model))


def get_states(model: nn.Module) -> list[Any]:
    """The state each stochastic layer used in its last forward call (module order)."""
    return [m.last_state for m in stochastic_modules(model)]


@contextlib.contextmanager
def freeze(model: nn.Module, states: list[Any] | None = None) -> Iterator[nn.Module]:
    """Freeze the randomness of every stochastic layer of ``model`` for the duration.

    Without ``states`` each layer draws once on its next forward and then reuses that draw.
    With ``states`` (one entry per stochastic layer, module order; ``None`` = draw lazily)
    each layer uses the given state. Previous frozen/unfrozen settings are restored on exit,
    so freezes nest.
    """
    modules = stochastic_modules(model)
    if states is not None and len(states) != len(modules):
        raise ValueError(f"got {len(states)} states for {len(modules)} stochastic layers")
    saved = [(m._frozen, m._frozen_state) for m in modules]
    try:
        for i, m in enumerate(modules):
            m._frozen = True
            given = None if states is None else states[i]
            m._frozen_state = _UNSET if given is None else given
        yield model
    finally:
        for m, (was_frozen, was_state) in zip(modules, saved, strict=True):
            m._frozen, m._frozen_state = was_frozen, was_state
