"""Draws that do not depend on chunking, devices or out-of-memory retries, and freezes that
keep every Monte-Carlo draw of a smoothed model (DESIGN.md contracts 2 and 4)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from advdefense import randomness
from advdefense.attacks.base import eot_loss_grad
from advdefense.defenses.noise import GaussianInput, NoisyLayer
from advdefense.defenses.rna import RandomNormalization
from advdefense.defenses.smoothing import SmoothedClassifier, certify, sample_logits
from advdefense.randomness import (
    DrawOutputs,
    SeededRandomness,
    freeze,
    learned_row_limit,
    probe_randomness,
    replicated_forward,
    rng_devices,
    seed_current,
)


def _outputs(model, x, copies, *, max_batch, seed=3):
    out = DrawOutputs(copies, x.shape[0])

    def body(xr, start, k0, kc):
        out.put(model(xr), start, k0, kc)

    with torch.no_grad():
        replicated_forward(model, x, copies, body, max_batch=max_batch, seed=seed)
    return out.value


class _Flat(nn.Module):
    def forward(self, x):
        return x.flatten(1)


def _per_row_models():
    torch.manual_seed(0)
    pni_in = NoisyLayer(nn.Conv2d(1, 2, 3, padding=1), kind="pni", weight_noise=False,
                        input_noise=True, input_sample="per_example")
    rna = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1),
                        RandomNormalization(2, ("bn", "in"), granularity="sample"), _Flat())

    class Undeclared(nn.Module):
        stochastic = True                      # random through torch's generator only

        def forward(self, x):
            return (x + torch.randn_like(x)).flatten(1)

    return {"gaussian": nn.Sequential(GaussianInput(0.5), _Flat()).eval(),
            "pni_per_example": nn.Sequential(pni_in, _Flat()).eval(),
            "rna_per_sample": rna.eval(),
            "undeclared": SeededRandomness(Undeclared()).eval()}


@pytest.mark.parametrize("kind", ["gaussian", "pni_per_example", "rna_per_sample"])
def test_per_row_draws_do_not_depend_on_max_batch(kind):
    """n = 70 rows, more than max_batch: chunks of 4 (partial blocks) and of 40 give the
    draws of one chunk of 70, row by row."""
    model = _per_row_models()[kind]
    x = torch.rand(1, 1, 6, 6).repeat(70, 1, 1, 1)
    whole = _outputs(model, x, 3, max_batch=4096)
    for mb in (4, 40):
        assert torch.equal(_outputs(model, x, 3, max_batch=mb), whole), mb


@pytest.mark.parametrize("kind", ["gaussian", "pni_per_example", "rna_per_sample",
                                  "undeclared"])
def test_per_row_draws_never_repeat_across_example_chunks(kind):
    """The same input in two example chunks gets two different draws."""
    model = _per_row_models()[kind]
    x = torch.rand(1, 1, 6, 6).repeat(8, 1, 1, 1)
    out = _outputs(model, x, 2, max_batch=4)          # chunks [0, 4) and [4, 8)
    if kind == "rna_per_sample":                       # a type per row: compare all rows
        assert not torch.equal(out[:, :4], out[:, 4:])
    else:
        assert not torch.equal(out[:, 0], out[:, 4])


def test_eot_loss_does_not_depend_on_max_batch():
    torch.manual_seed(1)
    model = nn.Sequential(GaussianInput(0.3), nn.Flatten(), nn.Linear(36, 4)).eval()
    x, y = torch.rand(40, 1, 6, 6), torch.randint(0, 4, (40,))
    big = eot_loss_grad(model, x, y, "ce", eot_samples=4, max_batch=4096, seed=5)
    small = eot_loss_grad(model, x, y, "ce", eot_samples=4, max_batch=4, seed=5)
    torch.testing.assert_close(small.loss, big.loss)
    torch.testing.assert_close(small.grad, big.grad)


class _OOMOnce(nn.Module):
    """A base model that fails its ``fail_at``-th forward call with ``error`` once."""

    def __init__(self, error, fail_at=2):
        super().__init__()
        self.lin = nn.Linear(36, 4)
        self.calls, self.fail_at, self.error, self.rows = 0, fail_at, error, []

    def forward(self, x):
        self.calls += 1
        if self.calls == self.fail_at:
            raise self.error
        self.rows.append(x.shape[0])
        return self.lin(x.flatten(1))


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory"),
                                   RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED")])
def test_a_transient_out_of_memory_error_mid_call_is_retried_and_remembered(error):
    torch.manual_seed(0)
    base = _OOMOnce(error, fail_at=0)                  # no failure yet
    x = torch.rand(8, 1, 6, 6)
    expected = sample_logits(base, x, sigma=0.2, m=3, max_batch=8, seed=9)
    base.calls, base.fail_at, base.rows = 0, 2, []   # fail on draw 1's full 8-row pass
    got = sample_logits(base, x, sigma=0.2, m=3, max_batch=8, seed=9)
    torch.testing.assert_close(got, expected)            # the same draws, re-planned
    assert base.rows[0] == 8 and max(base.rows[1:]) == 4
    assert learned_row_limit(base) == 4
    base.rows = []
    sample_logits(base, x, sigma=0.2, m=3, max_batch=8, seed=9)  # a later call
    assert max(base.rows) == 4


def test_other_runtime_errors_are_not_retried():
    base = _OOMOnce(RuntimeError("shape mismatch"), fail_at=1)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        sample_logits(base, torch.rand(4, 1, 6, 6), sigma=0.2, m=2, max_batch=8, seed=1)


def test_seeds_go_to_the_generator_of_the_tensors_device(monkeypatch):
    """A draw on cuda:1 seeds cuda:1's generator (not the current device's), and the forked
    RNG saves that device. Checked without a GPU through the two CUDA calls it makes."""
    calls = []

    class FakeDevice:
        def __init__(self, d):
            self.index = torch.device(d).index

        def __enter__(self):
            calls.append(("current", self.index))

        def __exit__(self, *exc):
            calls.append(("restore",))

    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda s: calls.append(("seed", s)))
    seed_current(5, torch.device("cuda", 1))
    assert calls == [("current", 1), ("seed", 5), ("restore",)]
    assert rng_devices(torch.device("cuda", 1)) == [1]
    assert rng_devices(torch.device("cpu")) == []


def test_seeded_draws_name_the_device_they_are_made_on(monkeypatch):
    devices = []
    real = randomness.seed_current

    def spy(seed, device=None):
        devices.append(device)
        real(seed, device)

    monkeypatch.setattr(randomness, "seed_current", spy)
    model = nn.Sequential(NoisyLayer(nn.Linear(6, 3), kind="pni"), GaussianInput(0.1))
    _outputs(model.eval(), torch.rand(5, 6), 3, max_batch=4)
    assert devices and all(d is not None and torch.device(d).type == "cpu" for d in devices)


def test_local_rank_is_the_current_device_for_every_backend(monkeypatch):
    from advdefense import distributed

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda: "gloo")
    for var, value in (("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(var, value)
    distributed.init_from_env("cpu")
    assert chosen == [1]


def _pni_smoothed(m=8):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Flatten(), NoisyLayer(nn.Linear(36, 4), kind="pni",
                                                  alpha_init=0.5)).eval()
    return SmoothedClassifier(base, sigma=0.0, m=m, vote="soft").eval()


def test_a_frozen_smoothed_model_keeps_m_distinct_weight_draws_and_replays_them():
    sm = _pni_smoothed()
    x = torch.rand(3, 1, 6, 6)
    with torch.no_grad(), freeze(sm):
        a, b = sm.sample_logits(x), sm.sample_logits(x)
        assert not randomness.is_stochastic(sm)
    assert a.std(0).max() > 1e-3                       # m distinct weight draws
    assert torch.equal(a, b)                           # replayed exactly
    with torch.no_grad():
        assert not torch.equal(sm.sample_logits(x), a)  # fresh outside the freeze


def test_an_undeclared_model_that_uses_torchs_generator_freezes_once_wrapped():
    class Noisy(nn.Module):
        stochastic = True

        def forward(self, x):
            return x.flatten(1) + torch.randn(x.shape[0], 36)

    x = torch.rand(4, 1, 6, 6)
    assert probe_randomness(Noisy(), x) == "undeclared"
    assert probe_randomness(SeededRandomness(Noisy()), x) == "declared"


def test_prepare_model_does_not_warn_falsely(caplog):
    from advdefense.evaluation.harness import prepare_model

    class Noisy(nn.Module):
        stochastic = True

        def forward(self, x):
            return x.flatten(1)[:, :4] + torch.randn(x.shape[0], 4)

    with caplog.at_level(logging.WARNING):
        model, kind = prepare_model(Noisy(), torch.rand(4, 1, 6, 6))
    assert kind == "undeclared" and isinstance(model, SeededRandomness)
    assert not any("stays random" in r.getMessage() for r in caplog.records)


def test_certify_draws_are_distinct_and_do_not_depend_on_max_batch(monkeypatch):
    from advdefense.defenses import smoothing

    torch.manual_seed(0)
    base = nn.Sequential(nn.Flatten(), nn.Linear(36, 3)).eval()
    x = torch.rand(5, 1, 6, 6)
    a = certify(base, x, sigma=0.5, n0=20, n=200, max_batch=4096, batch_samples=1000, seed=4)
    b = certify(base, x, sigma=0.5, n0=20, n=200, max_batch=7, batch_samples=3, seed=4)
    assert torch.equal(a.count, b.count) and torch.equal(a.radius, b.radius)
    seen = []
    real = smoothing.NoisyBase.__init__

    def with_spy(self, base_, sigma):
        real(self, base_, sigma)
        self.noise.register_forward_hook(lambda mod, inp, out: seen.append(out - inp[0]))

    monkeypatch.setattr(smoothing.NoisyBase, "__init__", with_spy)
    certify(base, x[:1], sigma=0.5, n0=10, n=300, max_batch=16, seed=2)
    draws = torch.cat([s.flatten(1) for s in seen])
    assert draws.shape[0] == 310
    assert torch.unique(draws, dim=0).shape[0] == 310       # every sample its own noise


def test_an_objective_with_per_example_state_follows_the_example_chunks():
    """TRADES' KL objective holds the clean probabilities of the whole batch: chunks of
    examples (max_batch below the batch) and fp32 confirmations of a few rows use theirs."""
    from advdefense.training.recipes import KLObjective

    torch.manual_seed(2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 4)).eval()
    x = torch.rand(10, 1, 6, 6)
    y = torch.randint(0, 4, (10,))
    with torch.no_grad():
        p_nat = torch.softmax(model(x), 1)
    x0 = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    whole = eot_loss_grad(model, x0, y, KLObjective(p_nat), max_batch=4096)
    chunked = eot_loss_grad(model, x0, y, KLObjective(p_nat), max_batch=4)
    torch.testing.assert_close(chunked.loss, whole.loss)
    torch.testing.assert_close(chunked.grad, whole.grad)
