"""bf16 attacks (advdefense.precision): attacks under autocast, losses and verdicts in fp32."""

from __future__ import annotations

import pytest
import torch

from advdefense.attacks import PGD
from advdefense.attacks.losses import LOSSES
from advdefense.errors import AdvDefenseError
from advdefense.evaluation.harness import AttackSpec, evaluate


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_are_fp32_for_bf16_logits(name):
    logits = torch.randn(6, 10).to(torch.bfloat16)
    y = torch.arange(6)
    assert LOSSES[name](logits, y, None).dtype == torch.float32


def test_bf16_attacks_fp32_verdicts_same_robust_accuracy(robust_model, mnist_test):
    # 120 examples, 10 steps (eps reached in 4): on a CPU without bf16 instructions autocast
    # is emulated and about 14x slower than fp32, so the test is kept small
    x, y = mnist_test[0][:120], mnist_test[1][:120]
    conv = next(m for m in robust_model.modules() if isinstance(m, torch.nn.Conv2d))
    dtypes = []
    hook = conv.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    specs = [AttackSpec("pgd", PGD(eps=0.3, steps=10, step_size=0.075, seed=0))]
    try:
        fast = evaluate(robust_model, (x, y), specs, seed=0, checks=False, keep_adv=True,
                        attack_precision="bf16")
    finally:
        hook.remove()
    # the attack's passes ran in bf16, the clean and final verdicts in fp32
    assert torch.bfloat16 in dtypes and torch.float32 in dtypes
    assert fast.config["attack_precision"] == "bf16"
    ref = evaluate(robust_model, (x, y), specs, seed=0, checks=False)
    a, b = fast.accuracy("pgd/fresh").value, ref.accuracy("pgd/fresh").value
    assert 0.2 < b < 0.98
    assert abs(a - b) <= 0.03, (a, b)
    # every example counted as broken is misclassified in fp32 at its kept input
    broken = ~fast.worst.all
    with torch.no_grad():
        pred = robust_model.eval()(fast.adv[broken]).argmax(1)
    assert bool((pred != y[broken]).all())


def test_unknown_precision_is_one_clear_error(standard_model, mnist_test):
    with pytest.raises(AdvDefenseError, match="attack precision"):
        evaluate(standard_model, (mnist_test[0][:4], mnist_test[1][:4]), [],
                 attack_precision="fp8")


def test_emulated_bf16_is_reported_once(monkeypatch, caplog):
    from advdefense import precision

    monkeypatch.setattr(precision, "_cpu_has_bf16", lambda: False)
    monkeypatch.setattr(precision, "_warned", False)
    with caplog.at_level("WARNING", logger="advdefense.precision"):
        with precision.attack_autocast("bf16", "cpu"):
            pass
        with precision.attack_autocast("bf16", "cpu"):
            pass
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "no bf16 instructions" in caplog.records[0].message
    assert precision.bf16_is_native("cpu") is False
    monkeypatch.setattr(precision, "_cpu_has_bf16", lambda: True)
    monkeypatch.setattr(precision, "_warned", False)
    assert precision.warn_if_bf16_emulated("cpu") is False
