"""The smoothing paper's training noise: CNI-I noise shared by the batch (SIAM's sampling,
per-example selectable) and train-time input noise seen by the training recipes' inner
attacks (SIAM's forward always adds it; EPGD, eq. 24, averages over it)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advdefense.config import AttackConfig
from advdefense.defenses.noise import (
    GaussianInput,
    NoisyLayer,
    WithInputNoise,
    apply,
    noisy_layers,
    training_noise,
)
from advdefense.errors import ConfigError
from advdefense.randomness import draw_groups
from advdefense.training.recipes import build_recipe

from .conftest import make_smallcnn


def _input_noise(layer, x, groups=1):
    state = layer.sample_state(x, groups)
    return (layer._input_noise(x, state) - x).detach()


@pytest.mark.parametrize("kind", ["cni", "pni"])
def test_per_batch_input_noise_is_one_draw_shared_by_the_batch(kind):
    torch.manual_seed(0)
    layer = NoisyLayer(nn.Conv2d(3, 4, 3), kind=kind, weight_noise=False, input_noise=True,
                       input_sample="per_batch")
    x = torch.rand(5, 3, 6, 6) * torch.arange(1, 6).view(5, 1, 1, 1)  # rows of different std
    noise = _input_noise(layer, x)
    assert all(torch.allclose(noise[0], noise[i], atol=1e-6) for i in range(1, 5))
    if kind == "pni":  # scaled by the std of the whole batch
        one = NoisyLayer(nn.Conv2d(3, 4, 3), kind="pni", weight_noise=False, input_noise=True,
                         input_sample="per_batch", alpha_init=1.0)
        state = one.sample_state(x, 1)
        out = one._input_noise(x, state) - x
        torch.testing.assert_close(out.detach(), x.std() * state.i1.expand_as(x))
    # under draw_groups, each group of rows has its own shared draw
    xk = x.repeat(2, 1, 1, 1)
    with draw_groups(2):
        state = layer.sample_state(xk, 2)
    grouped = (layer._input_noise(xk, state) - xk).detach()
    assert torch.allclose(grouped[0], grouped[4], atol=1e-6)
    assert torch.allclose(grouped[5], grouped[9], atol=1e-6)
    assert not torch.allclose(grouped[0], grouped[5], atol=1e-3)
    per_example = NoisyLayer(nn.Conv2d(3, 4, 3), kind=kind, weight_noise=False,
                             input_noise=True, input_sample="per_example")
    noise = _input_noise(per_example, x)
    assert not torch.allclose(noise[0], noise[1], atol=1e-3)


def test_cni_defaults_to_the_authors_per_batch_sampling_and_per_example_is_selectable():
    cni = noisy_layers(apply(make_smallcnn(), {"kind": "cni", "where": "inputs"}))
    assert {m.input_sample for m in cni.values()} == {"per_batch"}
    pni = noisy_layers(apply(make_smallcnn(), {"kind": "pni", "where": "inputs"}))
    assert {m.input_sample for m in pni.values()} == {"per_example"}
    ours = noisy_layers(apply(make_smallcnn(), {"kind": "cni", "where": "both",
                                                "input_sample": "per_example"}))
    assert {m.input_sample for m in ours.values()} == {"per_example"}
    with pytest.raises(ConfigError, match="input_sample"):
        apply(make_smallcnn(), {"kind": "cni", "where": "inputs", "input_sample": "per_pixel"})
    # the whole model runs with a batch size that differs from a frozen draw's
    model = apply(make_smallcnn(), {"kind": "cni", "where": "both"}).eval()
    with torch.no_grad():
        assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)


class _Recorder(nn.Module):
    """Records the inputs it sees while in eval mode (where the inner attacks run)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.eval_inputs: list[torch.Tensor] = []

    def forward(self, x):
        if not self.training:
            self.eval_inputs.append(x.detach().clone())
        return self.inner(x)


def test_training_attack_sees_the_train_time_input_noise():
    torch.manual_seed(0)
    recorder = _Recorder(make_smallcnn(width=4))
    model = WithInputNoise(recorder, GaussianInput(0.5, train_only=True)).train()
    x, y = torch.full((6, 1, 28, 28), 0.5), torch.randint(0, 10, (6,))
    recipe = build_recipe("pgd_at", AttackConfig(eps=0.01, steps=2, step_size=0.005))
    recipe.loss(model, x, y)
    assert recorder.eval_inputs, "the inner attack runs in eval mode"
    # without the noise every attack input would lie within eps = 0.01 of x
    assert all((inp - 0.5).abs().max() > 0.2 for inp in recorder.eval_inputs)
    # outside training the noise stays off (the smoothed classifier adds its own at test time)
    recorder.eval_inputs.clear()
    model.eval()
    with torch.no_grad():
        model(x)
    assert torch.equal(recorder.eval_inputs[0], x)
    with torch.no_grad(), training_noise():
        model(x)
    assert not torch.equal(recorder.eval_inputs[1], x)


def test_gaussian_fine_tuning_starts_from_a_cni_w_checkpoint(tmp_path):
    """``input_sigma`` wraps the model (``WithInputNoise``), so its tensors are named
    ``model.<name>``; ``train.init_from`` of a plain CNI-W checkpoint still finds them."""
    from advdefense.config import config_from_dict
    from advdefense.training.checkpoint import load_checkpoint
    from advdefense.training.trainer import Trainer

    base = {"name": "cni", "output_dir": str(tmp_path / "cni"),
            "data": {"name": "digits", "batch_size": 50, "monitor_size": 0, "limit": 50},
            "model": {"name": "smallcnn", "kwargs": {"width": 4}},
            "defense": {"noise": {"kind": "cni", "where": "weights"}},
            "train": {"epochs": 1, "optimizer": {"name": "adam", "lr": 1e-3}}}
    t = Trainer(config_from_dict(base), progress=False)
    t.fit()
    t.close()
    src = load_checkpoint(tmp_path / "cni" / "last.pt")["model"]
    ft = dict(base, name="ft", output_dir=str(tmp_path / "ft"),
              defense={"noise": {"kind": "cni", "where": "both", "input_sigma": 0.1}},
              train=dict(base["train"], init_from=str(tmp_path / "cni" / "last.pt")))
    t2 = Trainer(config_from_dict(ft), progress=False)
    state = t2.model.state_dict()
    assert isinstance(t2.model, WithInputNoise)
    for k, v in src.items():
        torch.testing.assert_close(state["model." + k].cpu(), v)
    t2.close()
