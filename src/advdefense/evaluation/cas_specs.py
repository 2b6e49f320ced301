"""The attacks a CAS model is evaluated with (Bai et al. 2021, "Improving Adversarial Robustness
via Channel-wise Activation Suppressing", Sec. 4; reference ``reg_attack.py``).

:func:`cas_attack_specs` builds :class:`~.harness.AttackSpec` rows for
:func:`~.harness.evaluate`: PGD on the main logits alone and on the adaptive loss
``main + aux_weight * mean aux`` (:class:`advdefense.attacks.HeadsObjective`, the reference's),
and APGD-DLR (Croce & Hein 2020) with both losses. :func:`cas_adaptive_attacks` gives the
``(label, attack)`` pairs that join a CAS model's AutoAttack-style cascade, so the adaptive loss
is part of its worst case and not only of its paper protocol. The defense
(:mod:`advdefense.defenses.cas`) provides the model and the objective; assembling the
evaluation is this module's part.
"""

from __future__ import annotations

from ..attacks import PGD, HeadsObjective, build_attack
from .harness import AttackSpec

__all__ = ["cas_adaptive_attacks", "cas_attack_specs"]


def cas_attack_specs(
    eps: float,
    *,
    aux_weight: float = 2.0,
    steps: int = 20,
    step_size: float | None = None,
    seed: int = 0,
    apgd: bool = True,
    adaptive: bool = True,
) -> list[AttackSpec]:
    """PGD-``steps`` (main, main + ``aux_weight``·aux) and APGD-DLR (the same two losses) rows.

    ``step_size`` defaults to ``eps / 4``. With ``adaptive=False`` only the main-logit rows are
    built (for models without heads, where both losses coincide); ``apgd=False`` drops the
    APGD-DLR rows.
    """
    step = eps / 4 if step_size is None else float(step_size)
    specs = [AttackSpec(f"pgd-{steps} main", PGD(eps=eps, steps=steps, step_size=step,
                                                 seed=seed))]
    if adaptive:
        specs.append(AttackSpec(f"pgd-{steps} main+{aux_weight:g}aux", PGD(
            eps=eps, steps=steps, step_size=step, seed=seed,
            loss=HeadsObjective("ce", aux_weight=aux_weight))))
    if apgd:
        specs.append(AttackSpec("apgd-dlr main", build_attack("apgd-dlr", eps=eps, seed=seed)))
        if adaptive:
            specs.append(AttackSpec(f"apgd-dlr main+{aux_weight:g}aux", build_attack(
                "apgd-dlr", eps=eps, seed=seed,
                loss=HeadsObjective("dlr", aux_weight=aux_weight))))
    return specs


def cas_adaptive_attacks(eps: float, *, aux_weight: float = 2.0, seed: int = 0,
                         n_iter: int = 100) -> list[tuple[str, object]]:
    """APGD-CE and APGD-DLR (``n_iter`` iterations) on ``main + aux_weight * mean aux``.

    ``(label, attack)`` pairs for :func:`~.suite.run_suite` (``attacks=``): appended to the
    standard cascade of a CAS model, the adaptive loss of the CAS reference (``reg_attack.py``)
    counts in the model's worst case beside the attacks on the main logits.
    """
    b = f"{aux_weight:g}"
    return [
        (f"apgd-ce main+{b}·aux", build_attack(
            "apgd-ce", eps=eps, seed=seed, n_iter=n_iter,
            loss=HeadsObjective("ce", aux_weight=aux_weight))),
        (f"apgd-dlr main+{b}·aux", build_attack(
            "apgd-dlr", eps=eps, seed=seed, n_iter=n_iter,
            loss=HeadsObjective("dlr", aux_weight=aux_weight))),
    ]
