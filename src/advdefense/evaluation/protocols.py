"""How an attack meets a stochastic model, and how a verdict is reached.

Three protocols (the names used throughout reports and the CLI):

``fresh`` (adaptive, the default)
    the attack runs as configured, EOT included (Athalye et al. 2018), on the live model; the
    adversarial example is then classified with fresh randomness.
``paper`` (RNA's protocol, Dong et al. 2022, ``evaluate.py`` of the reference code)
    the attack is crafted under :func:`~advdefense.randomness.freeze` (one random draw A) and
    classified on fresh draws B. It is a *transfer* attack from path A to other paths and
    over-estimates robustness; it is reported so results can be compared to the paper.
``fixed`` (fixed-path white-box)
    attack and classification happen inside the same freeze (the model is deterministic there);
    a new frozen draw per batch.

Verdict (:func:`verdict`): for a stochastic model every prediction is repeated ``repeats``
times, batched along the batch dimension under :func:`~advdefense.randomness.draw_groups` and
chunked by ``max_batch`` rows. An example counts as correct only if **all** repeats are
correct; the majority-vote figure (the true class strictly outvotes every other class; a tie
counts as wrong) and the single-draw figure (the first draw) are kept beside it, so
``all <= majority`` and ``all <= single`` hold per example. A deterministic model is predicted
once and the three coincide.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import AdvDefenseError
from ..randomness import draw_groups, freeze, is_stochastic

__all__ = ["PROTOCOLS", "Verdict", "check_protocol", "predictions", "run_protocol", "verdict",
           "verdict_from_predictions"]

PROTOCOLS = ("fresh", "paper", "fixed")


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise AdvDefenseError(
            f"unknown protocol {protocol!r}; choose one of: {', '.join(PROTOCOLS)}")
    return protocol


@dataclass
class Verdict:
    """Per-example correctness (bool tensors of shape (n,))."""

    all: torch.Tensor
    majority: torch.Tensor
    single: torch.Tensor

    KINDS = ("all", "majority", "single")

    def get(self, kind: str) -> torch.Tensor:
        if kind not in self.KINDS:
            raise AdvDefenseError(f"unknown verdict kind {kind!r}; choose all, majority or single")
        return getattr(self, kind)

    def __and__(self, other: Verdict) -> Verdict:
        return Verdict(self.all & other.all, self.majority & other.majority,
                       self.single & other.single)

    @staticmethod
    def cat(parts: list[Verdict]) -> Verdict:
        return Verdict(*(torch.cat([getattr(p, k) for p in parts]) for k in Verdict.KINDS))

    @staticmethod
    def full(n: int, value: bool = True) -> Verdict:
        return Verdict(*(torch.full((n,), value, dtype=torch.bool) for _ in range(3)))


def predictions(model: nn.Module, x: torch.Tensor, *, repeats: int = 1,
                max_batch: int = 4096) -> torch.Tensor:
    """Predicted classes ``(repeats, n)``, each row an independent draw of the randomness.

    The batch is repeated along dim 0 under ``draw_groups`` in chunks of at most ``max_batch``
    rows. Runs under ``torch.inference_mode``; the caller sets eval mode.
    """
    n = x.shape[0]
    r = max(1, int(repeats))
    out = torch.empty(r, n, dtype=torch.long, device=x.device)
    if n == 0:
        return out
    ex_chunk = max(1, min(n, max_batch // r))
    per_pass = max(1, max_batch // ex_chunk)
    with torch.inference_mode():
        for start in range(0, n, ex_chunk):
            xs = x[start : start + ex_chunk]
            m = xs.shape[0]
            for k0 in range(0, r, per_pass):
                kc = min(per_pass, r - k0)
                xr = xs.repeat(kc, *([1] * (x.dim() - 1))) if kc > 1 else xs
                with draw_groups(kc):
                    logits = model(xr)
                if logits.dim() != 2 or logits.shape[0] != xr.shape[0]:
                    raise AdvDefenseError(
                        f"model must return logits (N, classes); got {tuple(logits.shape)}")
                out[k0 : k0 + kc, start : start + m] = logits.argmax(1).view(kc, m)
    return out


def verdict_from_predictions(pred: torch.Tensor, y: torch.Tensor) -> Verdict:
    """Verdict from ``(repeats, n)`` predictions; see the module docstring."""
    correct = pred == y[None]
    classes = int(max(int(pred.max()) if pred.numel() else 0, int(y.max()) if y.numel() else 0)) + 1
    votes = torch.zeros(pred.shape[1], classes, dtype=torch.long, device=pred.device)
    votes.scatter_add_(1, pred.t(), torch.ones_like(pred.t()))
    true_votes = votes.gather(1, y[:, None]).squeeze(1)
    votes.scatter_(1, y[:, None], -1)
    majority = true_votes > votes.max(dim=1).values
    return Verdict(correct.all(0).cpu(), majority.cpu(), correct[0].cpu())


def verdict(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, repeats: int = 10,
            max_batch: int = 4096) -> Verdict:
    """Repeated-prediction verdict for a stochastic model, one prediction otherwise."""
    r = int(repeats) if is_stochastic(model) else 1
    return verdict_from_predictions(predictions(model, x, repeats=r, max_batch=max_batch), y)


def run_protocol(model: nn.Module, attack, x: torch.Tensor, y: torch.Tensor, protocol: str, *,
                 repeats: int = 10, max_batch: int = 4096) -> tuple[torch.Tensor, Verdict]:
    """Run ``attack`` on ``(x, y)`` under ``protocol`` and return ``(x_adv, verdict)``.

    The caller puts the model in eval mode. ``fixed`` draws one frozen state for this call
    (attack and verdict share it); ``paper`` freezes the attack only; ``fresh`` freezes nothing.
    """
    check_protocol(protocol)
    if protocol == "fixed":
        with freeze(model):
            x_adv = attack(model, x, y)
            return x_adv, verdict(model, x_adv, y, repeats=repeats, max_batch=max_batch)
    if protocol == "paper":
        with freeze(model):
            x_adv = attack(model, x, y)
    else:
        x_adv = attack(model, x, y)
    return x_adv, verdict(model, x_adv, y, repeats=repeats, max_batch=max_batch)
