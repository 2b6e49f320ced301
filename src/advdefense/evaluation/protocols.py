"""How an attack meets a stochastic model, and how a verdict is reached.

Three protocols (the names used throughout reports and the CLI):

``fresh`` (adaptive, the default)
    the attack runs as configured, EOT included (Athalye et al. 2018), on the live model; the
    adversarial example is then classified with fresh randomness.
``paper`` (RNA's protocol, Dong et al. 2022, ``evaluate.py`` of the reference code)
    the attack is crafted under :func:`~advdefense.randomness.freeze` (one random draw A, a new
    one for every batch, as the authors draw a new path per batch) and classified on fresh
    draws B. It is a *transfer* attack from path A to other paths and over-estimates
    robustness; it is reported so results can be compared to the paper, whose figure is the
    **single-draw** one (the authors classify once, on one fresh path B).
``fixed`` (fixed-path white-box)
    attack and classification happen inside the same freeze (the model is deterministic there);
    a new frozen draw per batch.

The frozen draw of a batch is made under the batch's seed, and the states used are returned
(``get_states``), so a report can say which paths were attacked.

Verdict (:func:`verdict`): for a stochastic model every prediction is repeated ``repeats``
times through :func:`~advdefense.randomness.replicated_forward` (batched where the model's
layers honour draw groups, one seeded forward call per repeat otherwise; chunked by
``max_batch`` rows). An example counts as correct only if **all** repeats are
correct; the majority-vote figure (the true class strictly outvotes every other class; a tie
counts as wrong) and the single-draw figure (the first draw) are kept beside it, so
``all <= majority`` and ``all <= single`` hold per example. A deterministic model is predicted
once and the three coincide.

Verdict draws are seeded on their own (:func:`verdict_seed`): from the evaluation's seed, the
stage (clean or an attack's label) and the batch's first example, under a salt of their own,
so they never reuse an attack's draws and never depend on the caller's RNG. The attack gets
private copies of ``x`` and ``y``; its output is checked against, and judged with, the
evaluation's own copies, so an attack that writes into its inputs cannot move the
reference.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..attacks.base import Attack, AttackRecorder, check_adversarial_output
from ..errors import AdvDefenseError
from ..precision import attack_autocast
from ..randomness import (
    draw_seed,
    freeze,
    get_states,
    is_stochastic,
    replicated_forward,
    seeded,
)

__all__ = ["PROTOCOLS", "VERDICT_SALT", "ProtocolOutcome", "Verdict", "check_protocol",
           "predictions", "run_protocol", "verdict", "verdict_from_predictions",
           "verdict_seed"]

PROTOCOLS = ("fresh", "paper", "fixed")

#: salt of every verdict seed: verdict draws never coincide with an attack's draws, which
#: are derived from the attack's seed without it
VERDICT_SALT = 0x5E4D1C7


def _stage_key(stage: str | int) -> int:
    if isinstance(stage, int):
        return stage
    return int.from_bytes(hashlib.sha256(str(stage).encode()).digest()[:8], "little")


def verdict_seed(seed: int | None, stage: str | int, first: int) -> int | None:
    """Seed of the verdict on the batch that starts at example ``first`` (process offset
    included) of ``stage`` (``"clean"``, an attack's label, a check's probe) in an evaluation
    seeded with ``seed``; ``None`` when ``seed`` is ``None``. Salted with
    :data:`VERDICT_SALT`, so independent of every draw the attacks make."""
    if seed is None:
        return None
    return draw_seed(draw_seed(int(seed), _stage_key(stage), VERDICT_SALT), int(first),
                     VERDICT_SALT)


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

    def to_json(self) -> dict[str, list[bool]]:
        return {k: self.get(k).tolist() for k in self.KINDS}

    @staticmethod
    def from_json(d: dict[str, list[bool]]) -> Verdict:
        return Verdict(*(torch.tensor(d[k], dtype=torch.bool) for k in Verdict.KINDS))

    @staticmethod
    def full(n: int, value: bool = True) -> Verdict:
        return Verdict(*(torch.full((n,), value, dtype=torch.bool) for _ in range(3)))


def predictions(model: nn.Module, x: torch.Tensor, *, repeats: int = 1,
                max_batch: int = 4096, seed: int | None = None) -> torch.Tensor:
    """Predicted classes ``(repeats, n)``, each row an independent draw of the randomness;
    draw ``j`` is seeded from (``seed``, ``j``) (``None``: from the global RNG).

    Runs under ``torch.inference_mode``; the caller sets eval mode.
    """
    n = x.shape[0]
    r = max(1, int(repeats))
    out = torch.empty(r, n, dtype=torch.long, device=x.device)

    def body(xr, start, k0, kc):
        logits = model(xr)
        if logits.dim() != 2 or logits.shape[0] != xr.shape[0]:
            raise AdvDefenseError(
                f"model must return logits (N, classes); got {tuple(logits.shape)}")
        m = xr.shape[0] // kc
        out[k0 : k0 + kc, start : start + m] = logits.argmax(1).view(kc, m)

    with torch.inference_mode():
        replicated_forward(model, x, r, body, max_batch=max_batch, seed=seed)
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
            max_batch: int = 4096, seed: int | None = None) -> Verdict:
    """Repeated-prediction verdict for a stochastic model, one prediction otherwise; the
    draws are seeded from ``seed`` (see :func:`predictions`)."""
    r = int(repeats) if is_stochastic(model) else 1
    return verdict_from_predictions(
        predictions(model, x, repeats=r, max_batch=max_batch, seed=seed), y)


@dataclass
class ProtocolOutcome:
    """What one protocol run on a batch gives: the adversarial points, their verdict, the
    attack's recorder and the frozen states the attack saw (``paper``/``fixed``)."""

    x_adv: torch.Tensor
    verdict: Verdict
    recorder: AttackRecorder
    states: list[Any] | None = None

    def __iter__(self):
        """Unpacks as ``x_adv, verdict``."""
        return iter((self.x_adv, self.verdict))


def run_protocol(model: nn.Module, attack, x: torch.Tensor, y: torch.Tensor, protocol: str, *,
                 repeats: int = 10, max_batch: int = 4096, seed: int | None = None,
                 precision: str = "fp32", verdict_seed: int | None = None) -> ProtocolOutcome:
    """Run ``attack`` on ``(x, y)`` under ``protocol``; see the module docstring.

    The caller puts the model in eval mode. ``seed`` seeds this batch: the frozen draw of
    ``paper``/``fixed`` and the attack's own randomness (default: the attack's seed).
    ``verdict_seed`` seeds the verdict's draws (default: derived from ``seed`` under
    :data:`VERDICT_SALT`, never the attack's own draws). The attack works on copies of ``x``
    and ``y``; its output (also a user's callable's) is checked against the caller's ``x``
    to lie in [0, 1] and the eps-ball, and judged against the caller's ``y``. ``attack``
    may be an :class:`~advdefense.attacks.Attack` or any callable ``attack(model, x, y) ->
    x_adv`` with ``eps`` and ``norm`` attributes. ``precision="bf16"`` crafts under bf16
    autocast (:mod:`advdefense.precision`); the verdict is always fp32.
    """
    check_protocol(protocol)
    recorder = AttackRecorder(x.shape[0], x.device)
    states = None
    if verdict_seed is None and seed is not None:
        verdict_seed = draw_seed(int(seed), 0, VERDICT_SALT)
    x_ref, y_ref = x.detach().clone(), y.detach().clone()

    def craft() -> torch.Tensor:
        x_own, y_own = x_ref.clone(), y_ref.clone()  # the attack's private copies
        with attack_autocast(precision, x.device):
            if isinstance(attack, Attack):
                out = attack(model, x_own, y_own, seed=seed, recorder=recorder)
            else:
                with seeded(seed):
                    out = attack(model, x_own, y_own)
        out = out.float() if isinstance(out, torch.Tensor) else out
        eps = getattr(attack, "eps", None)
        norm = getattr(attack, "norm", "linf")
        name = getattr(attack, "name", type(attack).__name__)
        if eps is None:
            raise AdvDefenseError(f"attack {name!r} has no eps attribute; the evaluation "
                                  "cannot check its output")
        return check_adversarial_output(out, x_ref, float(eps), norm, name).detach()

    if protocol in ("fixed", "paper"):
        with freeze(model):
            with seeded(seed), torch.no_grad():  # draw the batch's frozen state
                model(x_ref[:1])
            states = get_states(model)
            x_adv = craft()
            if protocol == "fixed":
                v = verdict(model, x_adv, y_ref, repeats=repeats, max_batch=max_batch,
                            seed=verdict_seed)
                return ProtocolOutcome(x_adv, v, recorder, states)
    else:
        x_adv = craft()
    v = verdict(model, x_adv, y_ref, repeats=repeats, max_batch=max_batch, seed=verdict_seed)
    return ProtocolOutcome(x_adv, v, recorder, states)
