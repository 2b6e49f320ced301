"""PNI/CNI noise injection: freshness, freeze, draw groups, gradients, options."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advdefense.defenses import apply_defenses
from advdefense.defenses.noise import (
    GaussianInput,
    NoisyLayer,
    WithInputNoise,
    apply,
    inject,
    noisy_layers,
    select_group,
)
from advdefense.errors import AdvDefenseError
from advdefense.randomness import draw_groups, freeze, get_states, is_stochastic, seeded

from .conftest import make_smallcnn

COMBOS = [(k, w) for k in ("pni", "cni") for w in ("weights", "inputs", "both")]


def _model(kind="pni", where="weights", **kw):
    return inject(make_smallcnn(), kind=kind, where=where, **kw).eval()


@pytest.mark.parametrize("kind,where", COMBOS)
def test_fresh_per_forward_and_frozen_under_freeze(kind, where):
    model = _model(kind, where)
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        a, b = model(x), model(x)
        assert not torch.allclose(a, b), "noise must be fresh on every forward"
        with freeze(model):
            c, d = model(x), model(x)
        assert torch.equal(c, d), "frozen noise must be reused"
        e = model(x)
    assert not torch.allclose(c, e), "leaving freeze must restore fresh draws"


def test_every_conv_and_linear_is_wrapped():
    model = make_smallcnn()
    n_layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    inject(model)
    assert len(noisy_layers(model)) == n_layers == 6
    assert all(isinstance(m.layer, (nn.Conv2d, nn.Linear)) for m in noisy_layers(model).values())
    assert is_stochastic(model)


@pytest.mark.parametrize("kind,where", COMBOS)
def test_draw_groups_batched_equals_loop(kind, where):
    model = _model(kind, where)
    x = torch.rand(5, 1, 28, 28)
    k = 3
    with torch.no_grad(), draw_groups(k):
        batched = model(x.repeat(k, 1, 1, 1))
    states = get_states(model)
    loop = []
    for j in range(k):
        with torch.no_grad(), freeze(model, states=[select_group(s, j, k) for s in states]):
            loop.append(model(x))
    torch.testing.assert_close(batched, torch.cat(loop), rtol=1e-4, atol=1e-5)
    # independent noise per group: the copies of the same input differ
    rows = batched.view(k, 5, -1)
    assert not torch.allclose(rows[0], rows[1]) and not torch.allclose(rows[1], rows[2])


def test_grouped_linear_and_bias_conv_equal_loop():
    torch.manual_seed(0)
    for layer in (nn.Linear(7, 4), nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
                  nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect")):
        noisy = NoisyLayer(layer, kind="pni", mode="elementwise")
        x = (torch.randn(6, 7) if isinstance(layer, nn.Linear)
             else torch.randn(6, layer.in_channels, 8, 8))
        with draw_groups(2):
            out = noisy(x)
        st = noisy.last_state
        w = layer.weight.unsqueeze(0) + noisy.weight_noise_tensor(st)
        for j in range(2):
            rows = x[j * 3 : (j + 1) * 3]
            ref = (nn.functional.linear(rows, w[j], layer.bias) if isinstance(layer, nn.Linear)
                   else layer._conv_forward(rows, w[j], layer.bias))
            torch.testing.assert_close(out[j * 3 : (j + 1) * 3], ref, rtol=1e-5, atol=1e-5)


def test_pni_noise_scale_and_std_detached():
    layer = nn.Linear(200, 100)
    noisy = NoisyLayer(layer, kind="pni", alpha_init=0.5)
    st = noisy.sample_state(torch.zeros(1, 200), 1)
    noise = noisy.weight_noise_tensor(st)
    expected = 0.5 * layer.weight.detach().std()
    assert abs(noise.std().item() / expected.item() - 1) < 0.05
    noise.sum().backward()
    assert layer.weight.grad is None, "std(W) must be detached (PNI reference uses .item())"
    assert noisy.alpha_w.grad is not None


@pytest.mark.parametrize("kind,mode,shape", [("pni", "layerwise", (1,)),
                                             ("pni", "channelwise", (32, 1, 1, 1)),
                                             ("pni", "elementwise", (32, 1, 3, 3)),
                                             ("cni", "layerwise", (288,))])
def test_alpha_gets_gradients_and_no_weight_decay(kind, mode, shape):
    model = _model(kind, "both", mode=mode)
    model.train()
    first = next(iter(noisy_layers(model).values()))
    assert tuple(first.alpha_w.shape) == shape
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    nn.functional.cross_entropy(model(x), y).backward()
    noise_params = [p for n, p in model.named_parameters() if "alpha" in n or "factor" in n]
    assert noise_params
    for p in noise_params:
        assert getattr(p, "_no_weight_decay", False) is True
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    weights = [p for n, p in model.named_parameters() if n.endswith("layer.weight")]
    assert all(not getattr(p, "_no_weight_decay", False) for p in weights)


def test_cni_covariance_matches_formula():
    torch.manual_seed(0)
    layer = nn.Linear(3, 2, bias=False)
    noisy = NoisyLayer(layer, kind="cni", rank=2)
    with torch.no_grad():
        noisy.factor_w.copy_(torch.randn(6, 2) * 0.3)
    st = noisy.sample_state(torch.zeros(1, 3), 20000)
    samples = noisy.weight_noise_tensor(st).detach().reshape(20000, -1)
    std = layer.weight.detach().std()
    sigma = torch.diag((std * noisy.alpha_w.detach()).abs()) + noisy.factor_w @ noisy.factor_w.t()
    emp = samples.t().cov()
    torch.testing.assert_close(emp, sigma.detach(), atol=0.02, rtol=0.1)


def test_cni_init_scales_follow_the_options():
    """``alpha_init`` sets alpha_d = alpha_init^2 and ``factor_init`` the scale of F, through
    the defense registry (the small-init CNI-W config relies on both)."""
    torch.manual_seed(0)
    model = apply(make_smallcnn(), {"kind": "cni", "alpha_init": 0.035, "factor_init": 0.001},
                  None)
    for layer in noisy_layers(model).values():
        torch.testing.assert_close(layer.alpha_w.detach(),
                                   torch.full_like(layer.alpha_w, 0.035**2))
        assert 0.0007 < layer.factor_w.detach().std().item() < 0.0013


def test_seeded_is_reproducible():
    model = _model("cni", "both")
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad(), seeded(5):
        a = model(x)
    with torch.no_grad(), seeded(5):
        b = model(x)
    torch.testing.assert_close(a, b)


def test_gaussian_input_train_only_and_registry(mnist_train):
    from advdefense.data import dataset_info
    info = dataset_info("mnist5k")
    model = apply_defenses(make_smallcnn(), {"noise": {"kind": "cni", "input_sigma": 0.2}}, info)
    assert isinstance(model, WithInputNoise) and isinstance(model.noise, GaussianInput)
    x = mnist_train[0][:4]
    model.eval()
    with freeze(model):
        a = model(x)
        b = model.model(x)
    torch.testing.assert_close(a, b)  # eval: no pixel noise
    g = GaussianInput(0.5)
    out = g(torch.zeros(10000))
    assert abs(out.std().item() - 0.5) < 0.02


@pytest.mark.parametrize("options", [{"kind": "xyz"}, {"where": "outputs"}, {"mode": "row"},
                                     {"rank": -1}, {"alpha": 1}, {"input_sigma": -0.1},
                                     {"rank": "five"}, {"factor_init": -0.01}])
def test_bad_options_raise_one_line(options):
    with pytest.raises(AdvDefenseError) as err:
        apply(make_smallcnn(), options, None)
    assert "\n" not in str(err.value)
