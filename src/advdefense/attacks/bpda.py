"""BPDA: Backward Pass Differentiable Approximation (Athalye, Carlini & Wagner 2018,
"Obfuscated Gradients Give a False Sense of Security", ICML, Sec. 4.1).

A non-differentiable (or gradient-masking) part ``f`` of a model is replaced, on the backward
pass only, by a differentiable approximation ``g`` with ``g(x) ~ f(x)``:

    forward:  BPDA(f, g)(x) = f(x)          (exactly, bit for bit)
    backward: d BPDA(f, g)(x) / dx = d g(x) / dx     (``g`` = identity when not given)

Implemented with the straight-through construction
``f(x).detach() + (g(x) - g(x).detach())``: the second term is exactly zero in value and
carries ``g``'s gradient. ``f`` runs without autograd (its gradient is never used); ``g`` runs
only when gradients are being recorded for ``x`` (so evaluation costs one pass of ``f``).

BPDA is an ``nn.Module`` and composes with everything else: put it around an input
transformation inside a model (``nn.Sequential(BPDA(Quantize()), net)``: identity backward,
the case of Sec. 4.1) or around a whole classifier (e.g. forward = the hard majority vote of a
smoothed classifier, backward = the mean of its base model's softmax). Stochastic layers inside
``f`` or ``g`` still obey :func:`advdefense.randomness.draw_groups`/``freeze`` because they are
ordinary submodules, so batched EOT works through BPDA (Athalye et al. combine BPDA and EOT the
same way). ``f`` and ``g`` draw their randomness independently.

Departure from advertorch's ``BPDAWrapper`` (the only maintained-era implementation): we do
not take a custom gradient function, only a module whose autograd gradient is used; ``f``'s
output must have ``g``'s shape (identity: the input's shape).

Example::

    model = nn.Sequential(BPDA(JpegLike()), classifier)       # identity on the backward pass
    x_adv = PGD(eps=0.3)(model, x, y)
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AdvDefenseError
from ..randomness import is_stochastic

__all__ = ["BPDA"]


class BPDA(nn.Module):
    """``forward_module`` on the forward pass, ``backward_module``'s gradient (identity if
    ``None``) on the backward pass (Athalye et al. 2018, Sec. 4.1)."""

    batched_draws = True  # its random parts are StochasticModules of its submodules

    def __init__(self, forward_module: nn.Module, backward_module: nn.Module | None = None) -> None:
        super().__init__()
        if not callable(forward_module):
            raise AdvDefenseError("BPDA needs a module (or callable) for the forward pass")
        self.forward_module = forward_module
        self.backward_module = backward_module

    @property
    def stochastic(self) -> bool:
        """Random if either part is (so attacks turn EOT on for it)."""
        parts = [self.forward_module, self.backward_module]
        return any(isinstance(p, nn.Module) and is_stochastic(p) for p in parts)

    def _approx(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.backward_module is None else self.backward_module(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            exact = self.forward_module(x)
        if not (torch.is_grad_enabled() and x.requires_grad):
            return exact
        approx = self._approx(x)
        if approx.shape != exact.shape:
            raise AdvDefenseError(
                f"BPDA: forward output {tuple(exact.shape)} and backward approximation "
                f"{tuple(approx.shape)} must have the same shape")
        exact = exact.to(approx.dtype)
        return exact.detach() + (approx - approx.detach())
