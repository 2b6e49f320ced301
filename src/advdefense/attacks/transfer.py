"""Transfer attack (Papernot et al. 2017; the smoothing paper's black-box evaluation, Sec. 5):
adversarial examples are crafted on an independently trained **substitute** model with an
inner white-box attack and then given to the target model unchanged.

``TransferAttack(substitute=model, attack=PGD(eps=0.3, steps=20))`` and then
``x_adv = attack(target_model, x, y)``; the target model is never queried. The reference
(SIAM ``run_attack_transfer.py``) transfers PGD-7 from a same-architecture substitute; here
any inner attack and any substitute work. ``attack`` may be an :class:`Attack` or a registry
name with ``attack_options``. The substitute is a model: loading one from a checkpoint is the
caller's part (``advdefense.training.load_model_from_checkpoint``, as ``advdefense analyze
smoothing --substitute`` does).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import AdvDefenseError
from .base import Attack, AttackRecorder


class TransferAttack(Attack):
    """Craft on ``substitute`` with ``attack``; return those points for the target model."""

    name = "transfer"

    def __init__(self, *, substitute: nn.Module, attack: Attack | str = "pgd",
                 attack_options: dict[str, Any] | None = None, eps: float | None = None,
                 norm: str | None = None, eot_samples: int | None = None, max_batch: int = 4096,
                 seed: int | None = None, restarts: int = 1, targeted: bool = False) -> None:
        if isinstance(attack, str):
            from . import build_attack
            options = dict(attack_options or {})
            if eps is not None:
                options.setdefault("eps", eps)
            if "eps" not in options:
                raise AdvDefenseError("TransferAttack needs eps (or an Attack instance)")
            options.setdefault("seed", seed)
            attack = build_attack(attack, **options)
        if not isinstance(attack, Attack):
            raise AdvDefenseError(f"inner attack must be an Attack, got {type(attack).__name__}")
        super().__init__(eps=attack.eps, norm=norm or attack.norm, eot_samples=eot_samples,
                         max_batch=max_batch, seed=seed, restarts=restarts, targeted=targeted)
        self.attack = attack
        if not isinstance(substitute, nn.Module):
            raise AdvDefenseError(
                f"substitute must be a model, got {type(substitute).__name__}; load a checkpoint "
                "with advdefense.training.load_model_from_checkpoint(path) first")
        self.substitute = substitute
        self.inner = attack

    access = "transfer"

    def run(self, model, x, y, target, recorder):
        inner = AttackRecorder(x.shape[0], x.device)
        x_adv = self.inner(self.substitute, x, y, target=target, recorder=inner)
        # what the substitute saw, for the transfer-failure check; the target is never queried
        recorder.substitute_adversarial = inner.returned_adversarial
        recorder.returned_adversarial = torch.zeros(x.shape[0], dtype=torch.bool)
        return x_adv.detach()
