"""Attacks: one class per file, all following :class:`~advdefense.attacks.base.Attack`.

``build_attack(name, **kwargs)`` builds one by registry name.
"""

from __future__ import annotations

from ..errors import unknown_name
from .apgd import APGD, APGDDLR, APGDT
from .base import Attack, EOTResult, Objective, eot_loss_grad, eval_mode, project
from .bpda import BPDA
from .fab import FAB, FABT
from .objectives import HeadsObjective
from .pgd import FGSM, PGD, CWLinf
from .square import Square

ATTACKS: dict[str, type[Attack]] = {"fgsm": FGSM, "pgd": PGD, "cw": CWLinf}
ATTACKS.update({"apgd-ce": APGD, "apgd-dlr": APGDDLR, "apgd-t": APGDT, "fab": FAB, "fab-t": FABT,
                "square": Square})


def register_attack(name: str, cls: type[Attack]) -> None:
    ATTACKS[name] = cls


def build_attack(name: str, **kwargs) -> Attack:
    if name not in ATTACKS:
        raise unknown_name("attack", name, ATTACKS)
    return ATTACKS[name](**kwargs)


__all__ = ["ATTACKS", "Attack", "EOTResult", "HeadsObjective", "Objective", "CWLinf", "FGSM",
           "PGD", "build_attack", "eot_loss_grad", "eval_mode", "project", "register_attack",
           "APGD", "APGDDLR", "APGDT", "BPDA", "FAB", "FABT", "Square"]

# smoothing attacks (EPGD, SmoothAdv, NAttack, transfer)
from .epgd import EPGD, SmoothAdv  # noqa: E402
from .nattack import NAttack  # noqa: E402
from .transfer import TransferAttack  # noqa: E402

ATTACKS.update({"epgd": EPGD, "smoothadv": SmoothAdv, "nattack": NAttack,
                "transfer": TransferAttack})
