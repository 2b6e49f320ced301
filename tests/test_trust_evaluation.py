"""The referee cannot be fooled: re-checked files probe the model's randomness, resumed runs
keep what the checks read, fingerprints see the configuration, attacks cannot move what they
are judged against, verdicts are seeded on their own, and ``more_iterations`` judges the
reported figure."""

from __future__ import annotations

import ast
import json
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import advdefense.evaluation
from advdefense.attacks import FGSM, PGD
from advdefense.attacks.base import Attack
from advdefense.errors import AdvDefenseError
from advdefense.evaluation import AttackSpec, Verdict, evaluate
from advdefense.evaluation.checks import IterationsSettings
from advdefense.evaluation.suite import run_suite

from .test_checks import by_name, only, threshold_task
from .test_evaluation import InputNoise, LinearToy

EVALUATION = Path(advdefense.evaluation.__file__).parent


def noisy_task(n=40, d=16, classes=4, sigma=0.5, seed=0):
    """A linear classifier behind declared Gaussian input noise; labels are its noiseless
    predictions, so many examples are right on some draws and wrong on others."""
    model = LinearToy(d, classes, sigma, seed).eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 4, 4, generator=g)
    with torch.no_grad():
        y = model.lin(x.flatten(1)).argmax(1)
    return model, x, y


class UndeclaredNoise(nn.Module):
    """Input noise drawn with ``torch.randn`` inside ``forward``; nothing is declared."""

    def __init__(self, model: nn.Module, sigma: float):
        super().__init__()
        self.model, self.sigma = model, sigma

    def forward(self, x):
        return self.model(x + self.sigma * torch.randn_like(x))


class FailsOnCall(PGD):
    """Raises on call number ``fail_at`` (an interruption), works otherwise."""

    def __init__(self, fail_at, **kw):
        super().__init__(**kw)
        self.calls, self.fail_at = 0, fail_at

    def __call__(self, *args, **kw):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        return super().__call__(*args, **kw)


# -- --adv-file: the randomness probe -------------------------------------------------------
def test_recheck_probes_undeclared_randomness_and_repeats_predictions():
    from advdefense.advfile import recheck

    model, x, y = noisy_task(n=64)
    noisy = UndeclaredNoise(nn.Sequential(nn.Flatten(), model.lin), sigma=0.5).eval()
    v = recheck(noisy, x, y, repeats=10, batch_size=32)
    # ten real predictions per example: all-correct is strictly rarer than one draw
    assert int(v.all.sum()) < int(v.single.sum())
    assert not (v.all & ~v.majority).any()
    again = recheck(noisy, x, y, repeats=10, batch_size=32)
    assert torch.equal(v.all, again.all)  # seeded, whatever the caller's RNG did


USER_MODEL = """
    import torch
    from torch import nn


    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            return self.fc((x + 0.3 * torch.randn_like(x)).flatten(1))
    """


def test_adv_file_recheck_of_an_undeclared_random_model_repeats_predictions(tmp_path, capsys):
    from advdefense.advfile import save_adversarial
    from advdefense.cli import main
    from advdefense.data import as_tensors, load_split

    xt, yt = as_tensors(load_split("digits", "train"))
    means = torch.stack([xt[yt == c].flatten(1).mean(0) for c in range(10)])
    torch.save({"fc.weight": means, "fc.bias": -0.5 * (means ** 2).sum(1)},
               tmp_path / "noisy.pt")
    (tmp_path / "user_model.py").write_text(textwrap.dedent(USER_MODEL))
    x, y = as_tensors(load_split("digits", "test", limit=40))
    adv = tmp_path / "adv.pt"
    save_adversarial(adv, x_adv=x, y=y, source=["clean"] * 40, indices=torch.arange(40),
                     dataset="digits", split="test", eps=0.1, norm="linf", model="clean")
    rc = main(["evaluate", "--model", f"{tmp_path}/user_model.py:Noisy", "--weights",
               str(tmp_path / "noisy.pt"), "--adv-file", str(adv), "--repeats", "10",
               "--output", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert rc == 0 and "all 10 stochastic predictions correct" in printed, printed
    report = json.loads((tmp_path / "out" / "adv_check.json").read_text())
    assert report["stochastic"] is True and report["repeats"] == 10
    assert report["randomness"] == "undeclared"


# -- resumed runs keep the traces the checks read --------------------------------------------
def test_resumed_suite_still_fires_randomness_without_eot(tmp_path):
    model, x, y = noisy_task()
    settings = only("randomness_without_eot")
    kw = dict(eps=0.05, seed=1, checks=settings, batch_size=20, repeats=3)
    state = tmp_path / "state.json"
    flaky = FailsOnCall(2, eps=0.05, steps=2, seed=0)          # EOT 1 on a random model
    with pytest.raises(KeyboardInterrupt):
        run_suite(model, (x, y), attacks=[("pgd", flaky)], state_path=state, **kw)
    resumed = run_suite(model, (x, y), attacks=[("pgd", flaky)], state_path=state, **kw)
    full = run_suite(model, (x, y), attacks=[("pgd", FailsOnCall(0, eps=0.05, steps=2,
                                                                  seed=0))], **kw)
    assert by_name(full.checks)["randomness_without_eot"].passed is False
    assert by_name(resumed.checks)["randomness_without_eot"].passed is False
    # every attack finished: the whole suite is read back, traces included
    again = run_suite(model, (x, y), attacks=[("pgd", flaky)], state_path=state, **kw)
    assert flaky.calls == 3
    c = by_name(again.checks)["randomness_without_eot"]
    assert c.passed is False and "pgd ran with eot_samples=1" in c.detail
    for res in (resumed, again):
        t, u = res.entries["pgd"].trace, full.entries["pgd"].trace
        assert t.eot_samples == 1 and len(t.runs) == len(u.runs)
        assert torch.equal(t.ever_adversarial, u.ever_adversarial)
        assert torch.allclose(t.grad_norms, u.grad_norms, equal_nan=True)
        assert torch.equal(t.losses, u.losses)
        assert torch.equal(res.worst.all, full.worst.all)


def test_resumed_evaluation_still_fires_randomness_without_eot(tmp_path):
    model, x, y = noisy_task()
    specs = [AttackSpec("pgd", PGD(eps=0.05, steps=2, seed=0))]
    kw = dict(repeats=3, batch_size=20, checks=only("randomness_without_eot"),
              state_path=tmp_path / "state.json")
    first = evaluate(model, (x, y), specs, **kw)
    again = evaluate(model, (x, y), specs, **kw)             # every batch read back
    for res in (first, again):
        assert by_name(res.checks)["randomness_without_eot"].passed is False
    assert torch.equal(again.entries["pgd/fresh"].trace.losses,
                       first.entries["pgd/fresh"].trace.losses)


# -- fingerprints: the configuration and every setting ---------------------------------------
def test_model_fingerprint_sees_the_module_configuration():
    from advdefense.defenses.noise import GaussianInput
    from advdefense.defenses.smoothing import SmoothedClassifier
    from advdefense.evaluation.resume import model_fingerprint

    base = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    a = model_fingerprint(SmoothedClassifier(base, sigma=0.25, m=512))
    assert a != model_fingerprint(SmoothedClassifier(base, sigma=1.0, m=4, vote="soft"))
    assert a == model_fingerprint(SmoothedClassifier(base, sigma=0.25, m=512))
    noise = GaussianInput(0.1)
    before = model_fingerprint(noise)
    assert before != model_fingerprint(GaussianInput(0.9))
    noise(torch.rand(2, 3))  # a draw is not configuration
    assert model_fingerprint(noise) == before


def test_suite_state_of_another_noise_level_is_refused(tmp_path):
    from advdefense.defenses.noise import GaussianInput

    lin = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    x, y = torch.rand(8, 1, 4, 4), torch.zeros(8, dtype=torch.long)
    kw = dict(eps=0.05, checks=False, repeats=2, state_path=tmp_path / "state.json",
              attacks=[("fgsm", FGSM(eps=0.05, eot_samples=2))])
    run_suite(nn.Sequential(GaussianInput(0.1), lin).eval(), (x, y), **kw)
    with pytest.raises(AdvDefenseError, match="another model"):
        run_suite(nn.Sequential(GaussianInput(0.9), lin).eval(), (x, y), **kw)


def test_suite_state_of_another_batch_size_is_refused(tmp_path):
    model, x, y = noisy_task(n=60, sigma=0.0)
    state = tmp_path / "state.json"
    flaky = FailsOnCall(3, eps=0.05, steps=2, seed=0)
    kw = dict(eps=0.05, checks=False, state_path=state, attacks=[("pgd", flaky)])
    with pytest.raises(KeyboardInterrupt):
        run_suite(model, (x, y), batch_size=20, **kw)
    with pytest.raises(AdvDefenseError, match="different run"):
        run_suite(model, (x, y), batch_size=30, **kw)
    run_suite(model, (x, y), batch_size=20, **kw)  # the same settings resume


# -- attacks get private copies --------------------------------------------------------------
class ZeroesItsInput(Attack):
    """Writes zeros into the ``x`` it was given and returns it (no perturbation relative to
    what it now holds)."""

    name = "zeroes"

    def __init__(self, *, eps: float, norm: str = "linf", eot_samples: int = 1,
                 max_batch: int = 4096, seed: int | None = None, restarts: int = 1,
                 targeted: bool = False) -> None:
        super().__init__(eps=eps, norm=norm, eot_samples=eot_samples, max_batch=max_batch,
                         seed=seed, restarts=restarts, targeted=targeted)

    def run(self, model, x, y, target, recorder):
        x.mul_(0)
        return x


class RewritesLabels(Attack):
    """Returns ``x`` unchanged after writing other labels into ``y``: the model's own
    predictions (``shift=0``) or the next class (``shift=1``)."""

    name = "rewrites"

    def __init__(self, *, eps: float, shift: int = 0, norm: str = "linf", eot_samples: int = 1,
                 max_batch: int = 4096, seed: int | None = None, restarts: int = 1,
                 targeted: bool = False) -> None:
        super().__init__(eps=eps, norm=norm, eot_samples=eot_samples, max_batch=max_batch,
                         seed=seed, restarts=restarts, targeted=targeted)
        self.shift = shift

    def run(self, model, x, y, target, recorder):
        with torch.no_grad():
            y.copy_((y + self.shift) % 3 if self.shift else model(x).argmax(1))
        return x.clone()


def linear_task(n=30):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    x = torch.rand(n, 16) * 0.6 + 0.2
    y = torch.randint(0, 3, (n,))                 # about a third right without attack
    return model, x, y


def test_an_attack_that_zeroes_its_input_leaves_the_eps_ball():
    model, x, y = linear_task()
    with pytest.raises(AdvDefenseError, match="eps-ball"):
        evaluate(model, (x, y), [AttackSpec("zeroes", ZeroesItsInput(eps=0.05))], checks=None)
    with pytest.raises(AdvDefenseError, match="eps-ball"):
        run_suite(model, (x, y), eps=0.05, attacks=[("zeroes", ZeroesItsInput(eps=0.05))],
                  checks=False)


def test_an_attack_that_rewrites_the_labels_is_judged_on_the_true_ones():
    model, x, y = linear_task()
    honest = FGSM(eps=0.0)  # returns x: judged exactly like the clean input
    res = evaluate(model, (x, y), [AttackSpec("liar", RewritesLabels(eps=0.05)),
                                   AttackSpec("honest", honest)], checks=None, batch_size=30)
    clean = res.clean.verdict.all
    assert 0 < int(clean.sum()) < len(y)
    assert torch.equal(res.entries["liar/fresh"].verdict.all, clean)
    assert torch.equal(res.entries["honest/fresh"].verdict.all, clean)
    # in a suite the attack runs on correctly classified points: new labels there would
    # count them as broken although the returned input is the clean one
    res = run_suite(model, (x, y), eps=0.05,
                    attacks=[("liar", RewritesLabels(eps=0.05, shift=1))], checks=False)
    assert torch.equal(res.worst.all, clean)


# -- verdicts: seeded on their own -----------------------------------------------------------
def test_verdicts_do_not_depend_on_the_callers_rng():
    model, x, y = noisy_task()
    specs = [AttackSpec("pgd", PGD(eps=0.05, steps=2, eot_samples=2, seed=0))]
    runs = []
    for caller in (1, 2):
        torch.manual_seed(caller)
        runs.append(evaluate(model, (x, y), specs, repeats=5, batch_size=20, checks=None))
    a, b = runs
    v = a.entries["pgd/fresh"].verdict
    assert 0 < int(v.all.sum()) < int(v.single.sum())  # the draws matter here
    for kind in Verdict.KINDS:
        assert torch.equal(v.get(kind), b.entries["pgd/fresh"].verdict.get(kind))
        assert torch.equal(a.clean.verdict.get(kind), b.clean.verdict.get(kind))


def test_interrupted_evaluation_resumes_to_the_uninterrupted_stochastic_result(tmp_path):
    model, x, y = noisy_task(n=60)
    state = tmp_path / "state.json"
    flaky = FailsOnCall(3, eps=0.05, steps=2, eot_samples=2, seed=0)
    kw = dict(repeats=5, batch_size=20, checks=None)
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, (x, y), [AttackSpec("pgd", flaky)], state_path=state, **kw)
    torch.manual_seed(0)
    resumed = evaluate(model, (x, y), [AttackSpec("pgd", flaky)], state_path=state, **kw)
    torch.manual_seed(0)
    full = evaluate(model, (x, y), [AttackSpec("pgd", FailsOnCall(
        0, eps=0.05, steps=2, eot_samples=2, seed=0))], **kw)
    for kind in Verdict.KINDS:
        assert torch.equal(resumed.entries["pgd/fresh"].verdict.get(kind),
                           full.entries["pgd/fresh"].verdict.get(kind))
    assert torch.equal(resumed.worst.all, full.worst.all)


class RecordingNoise(InputNoise):
    """Input noise that logs every draw it uses, tagged with where the draw was made."""

    where = {"protocol": False, "verdict": False}
    log: list = []

    def sample_state(self, x, groups):
        state = super().sample_state(x, groups)
        tag = "verdict" if self.where["verdict"] else (
            "attack" if self.where["protocol"] else "other")
        RecordingNoise.log.append((tag, groups, state.detach().clone()))
        return state


def test_suite_verdicts_never_reuse_the_attacks_draws(monkeypatch):
    """FGSM (no random start) on a noisy model: its gradient pass and the verdict after it
    must not see the same noise."""
    from advdefense.evaluation import protocols, suite

    def flagging(fn, key):
        def wrapped(*args, **kw):
            RecordingNoise.where[key] = True
            try:
                return fn(*args, **kw)
            finally:
                RecordingNoise.where[key] = False
        return wrapped

    monkeypatch.setattr(protocols, "verdict", flagging(protocols.verdict, "verdict"))
    monkeypatch.setattr(suite, "run_protocol", flagging(suite.run_protocol, "protocol"))
    monkeypatch.setattr(RecordingNoise, "log", [])
    model, x, y = noisy_task(n=20)
    model.noise = RecordingNoise(0.5)
    run_suite(model, (x, y), eps=0.05, repeats=4, batch_size=20, checks=False,
              attacks=[("fgsm", FGSM(eps=0.05))])

    def draws(tag):  # one noise tensor per draw
        return [d for t, g, s in RecordingNoise.log if t == tag
                for d in s.split(s.shape[0] // g)]

    attack, verdicts = draws("attack"), draws("verdict")
    assert attack and len(verdicts) >= 4
    for v in verdicts:
        assert not any(torch.equal(v, a) for a in attack)


# -- more_iterations judges the reported worst case ------------------------------------------
def test_more_iterations_judges_the_reported_worst_case():
    """PGD-2 alone is too short on this model, but the evaluation reports PGD-10, which
    PGD-10 x 1 cannot lower: the reported figure is converged. A report of PGD-1 is not."""
    net, x, y, eps = threshold_task()
    settings = only("more_iterations", iterations=IterationsSettings(
        steps=2, factor=5, restarts=1)).with_(n_probe=32)
    res = evaluate(net, (x, y), [AttackSpec("pgd-10", PGD(eps=eps, steps=10))],
                   batch_size=32, checks=settings)
    c = by_name(res.checks)["more_iterations"]
    assert c.passed is True and "reported worst case: 0.0%" in c.detail, c.detail
    res = evaluate(net, (x, y), [AttackSpec("pgd-1", PGD(eps=eps, steps=1))],
                   batch_size=32, checks=settings)
    c = by_name(res.checks)["more_iterations"]
    assert c.passed is False and "reported worst case is not converged" in c.detail, c.detail


# -- the evaluation modules import each other in one direction ------------------------------
def _imports(module: str) -> set[str]:
    tree = ast.parse((EVALUATION / f"{module}.py").read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out.add(node.module or "")
    return out


def test_harness_report_and_plots_import_no_circle():
    assert not {"report", "plots"} & _imports("harness")
    assert "harness" not in _imports("report") and "harness" not in _imports("plots")
    assert "results" in _imports("report") and "results" in _imports("plots")


def test_an_evaluations_eot_is_lowered_on_a_deterministic_model_but_not_on_hidden_noise():
    """A suite's or the standard specs' EOT is an evaluation setting: one draw on a model
    whose outputs and gradients agree over two calls, all draws where noise hides in the
    backward pass."""
    from advdefense.evaluation.harness import standard_attack_specs
    from advdefense.evaluation.suite import _build

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    hidden = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    hidden[1].register_full_backward_hook(
        lambda mod, gin, gout: (gin[0] + torch.randn_like(gin[0]),))
    x, y = torch.rand(4, 1, 4, 4), torch.randint(0, 3, (4,))
    attacks = [s.attack for s in standard_attack_specs(0.1, eot_samples=8)]
    attacks.append(_build("pgd", "pgd-ce", {"eps": 0.1, "steps": 2, "eot_samples": 8}))
    for attack in attacks:
        assert attack.effective_eot(plain, x, y) == 1, attack
        if attack.access == "white-box" and attack.name != "fgsm":
            assert attack.effective_eot(hidden, x, y) == 8, attack
