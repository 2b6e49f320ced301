"""bf16 attacks (advdefense.precision): attacks under autocast, losses and verdicts in fp32."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from advdefense.attacks import APGD, FABT, PGD, NAttack, Square
from advdefense.attacks.losses import LOSSES
from advdefense.errors import AdvDefenseError
from advdefense.evaluation.harness import AttackSpec, evaluate
from advdefense.precision import attack_autocast


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
    inside, dtypes = [False], {"attack": set(), "outside": set()}
    hook = conv.register_forward_hook(
        lambda m, a, out: dtypes["attack" if inside[0] else "outside"].add(out.dtype))
    attack = PGD(eps=0.3, steps=10, step_size=0.075, seed=0)
    run = attack.run

    def watched(*args):  # the passes made by the attack itself, not by the evaluation
        inside[0] = True
        try:
            return run(*args)
        finally:
            inside[0] = False

    attack.run = watched
    specs = [AttackSpec("pgd", attack)]
    try:
        fast = evaluate(robust_model, (x, y), specs, seed=0, checks=False, keep_adv=True,
                        attack_precision="bf16")
    finally:
        hook.remove()
    # inside the attack: gradient passes in bf16, the best-iterate decisions confirmed in
    # fp32; outside it, the clean and final verdicts in fp32
    assert dtypes["attack"] == {torch.bfloat16, torch.float32}, dtypes
    assert dtypes["outside"] == {torch.float32}
    attack.run = run
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


def test_full_precision_switches_autocast_off_inside_it():
    from advdefense.precision import full_precision, reduced_precision

    assert not reduced_precision("cpu")
    with attack_autocast("bf16", "cpu"):
        assert reduced_precision("cpu")
        with full_precision("cpu"):
            assert not reduced_precision("cpu")
            assert nn.Linear(3, 2)(torch.rand(1, 3)).dtype == torch.float32
        assert reduced_precision("cpu")


# -- bf16 attacks decide in fp32 -----------------------------------------------------------
# A toy conv net trained for a second on sklearn's 8x8 digits; bf16 is emulated on most CPUs
# (about 14x slower than fp32), so the attacks are small.
@pytest.fixture(scope="module")
def toy():
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16
    y = torch.tensor(digits.target)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                            nn.Linear(16 * 16, 10))
        opt = torch.optim.Adam(net.parameters(), 1e-2)
        for _ in range(8):
            perm = torch.randperm(1400)
            for i in range(0, 1400, 128):
                b = perm[i : i + 128]
                loss = nn.functional.cross_entropy(net(x[b]), y[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
    return net.eval(), x[1400:], y[1400:]


def _robust_and_false(attack, net, x, y, precision):
    """Robust accuracy (fp32 verdict) and the number of examples the attack reports broken
    that fp32 still classifies correctly at the returned point."""
    with attack_autocast(precision, "cpu"):
        x_adv = attack(net, x, y)
    with torch.no_grad():
        correct = net(x_adv).argmax(1) == y
    reported = attack.trace.returned_adversarial
    return correct.float().mean().item(), int((correct & reported).sum())


# (attack, examples, how far bf16 robust accuracy may lie above fp32's)
_BF16_CASES = {
    # FAB's iterates sit on the boundary: its success test decides everything
    "fab-t": (lambda: FABT(eps=0.1, n_iter=20, n_target_classes=3, seed=0), 40, 0.05),
    # small windows late in the search: the stopping rule meets points near the boundary
    "square": (lambda: Square(eps=0.1, n_queries=300, p_init=0.05, seed=0), 200, 0.03),
    "nattack": (lambda: NAttack(eps=0.15, steps=50, population=30, space="delta", seed=0),
                50, 0.05),
    "apgd-ce": (lambda: APGD(eps=0.1, n_iter=10, seed=0), 100, 0.03),
}


@pytest.mark.parametrize("name", sorted(_BF16_CASES))
def test_bf16_attack_stops_only_on_points_adversarial_in_fp32(toy, name):
    make, n, slack = _BF16_CASES[name]
    net, x, y = toy
    x, y = x[:n], y[:n]
    fp32, false32 = _robust_and_false(make(), net, x, y, "fp32")
    bf16, false16 = _robust_and_false(make(), net, x, y, "bf16")
    assert false32 == 0
    # every example the bf16 attack reports broken (stopped on, kept as adversarial) is
    # misclassified in fp32 at the point it returns
    assert false16 == 0, f"{false16} reported broken but correct in fp32"
    assert bf16 <= fp32 + slack, (bf16, fp32)
