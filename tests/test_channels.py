"""Channel statistics (CAS paper, Figs. 1-2): hand computations, hooks, and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from advdefense.analysis.channels import (
    analyze_channels,
    capture_channel_means,
    channel_stats,
    uniformity,
)
from advdefense.attacks import PGD
from advdefense.defenses.cas import attach_cas
from advdefense.errors import AdvDefenseError


def test_channel_stats_match_hand_computation():
    gap = torch.tensor([[1.0, 0.005, 0.5],
                        [0.0, 2.0, 0.03]])
    s = channel_stats(gap, threshold=0.01)
    # sample 0: peak 1 -> threshold 0.01: channels 0 and 2 active (0.005 is not)
    # sample 1: peak 2 -> threshold 0.02: channels 1 and 2 active (0.0 is not; 0.03 > 0.02)
    assert s.count.tolist() == [1, 1, 2]
    assert s.n == 2
    torch.testing.assert_close(s.frequency, torch.tensor([0.5, 0.5, 1.0], dtype=torch.float64))
    torch.testing.assert_close(s.magnitude, torch.tensor([0.5, 1.0025, 0.265], dtype=torch.float64))
    torch.testing.assert_close(s.magnitude_active,
                               torch.tensor([1.0, 2.0, 0.265], dtype=torch.float64))
    u = s.uniformity()
    p = [0.25, 0.25, 0.5]
    entropy = -sum(q * math.log(q) for q in p)
    assert u["entropy"] == pytest.approx(entropy)
    assert u["normalized_entropy"] == pytest.approx(entropy / math.log(3))
    # Gini = sum_ij |p_i - p_j| / (2 K): four ordered pairs differ by 0.25
    assert u["gini"] == pytest.approx(4 * 0.25 / (2 * 3))


def test_threshold_changes_activity():
    gap = torch.tensor([[1.0, 0.05, 0.2]])
    assert channel_stats(gap, threshold=0.01).count.tolist() == [1, 1, 1]
    assert channel_stats(gap, threshold=0.1).count.tolist() == [1, 0, 1]
    assert channel_stats(gap, threshold=0.5).count.tolist() == [1, 0, 0]


def test_uniformity_extremes():
    u = uniformity(torch.tensor([5, 5, 5, 5]))
    assert u["gini"] == pytest.approx(0.0)
    assert u["normalized_entropy"] == pytest.approx(1.0)
    v = uniformity(torch.tensor([0, 0, 7, 0]))
    assert v["gini"] == pytest.approx(3 / 4)
    assert v["entropy"] == pytest.approx(0.0)
    assert math.isnan(uniformity(torch.zeros(3))["gini"])


class Tiny(nn.Module):
    def __init__(self, channels=3, classes=4):
        super().__init__()
        self.feat = nn.Conv2d(1, channels, 1, bias=False)
        self.act = nn.ReLU()
        self.head = nn.Linear(channels, classes)

    def forward(self, x):
        f = self.act(self.feat(x))
        return self.head(f.mean(dim=(2, 3)))


def test_capture_is_a_true_mean_over_examples_and_positions():
    torch.manual_seed(0)
    model = Tiny()
    x = torch.rand(7, 1, 4, 4)
    with torch.no_grad():
        f = model.act(model.feat(x))
    expected = f.mean(dim=(2, 3))
    for bs in (1, 3, 7):  # batching must not change a true mean (the reference's running avg does)
        got = capture_channel_means(model, "act", x, batch_size=bs)
        torch.testing.assert_close(got, expected)
    s = channel_stats(capture_channel_means(model, "act", x, batch_size=2))
    torch.testing.assert_close(s.magnitude, f.mean(dim=(0, 2, 3)).double())
    # ':in' hooks the module's input: the head sees the pooled features
    torch.testing.assert_close(capture_channel_means(model, "head:in", x), expected)
    assert model.training  # mode restored


def test_capture_at_a_cas_site_before_and_after_the_mask():
    torch.manual_seed(0)
    model = attach_cas(Tiny(), ["act"], num_classes=4, input_shape=(1, 4, 4)).eval()
    x = torch.rand(5, 1, 4, 4)
    inner = model.model
    with torch.no_grad():
        f = torch.relu(inner.feat(x))
        pooled = f.mean(dim=(2, 3))
        cas = inner.act.cas
        mask = cas.fc.weight[cas.fc(pooled).argmax(1)]
    torch.testing.assert_close(capture_channel_means(model, "act", x), pooled)
    torch.testing.assert_close(capture_channel_means(model, "model.act", x), pooled)
    torch.testing.assert_close(capture_channel_means(model, "act", x, after_mask=True),
                               pooled * mask)
    torch.testing.assert_close(capture_channel_means(model, "act", x, after_mask=True,
                                                     absolute=True), (pooled * mask).abs())
    with pytest.raises(AdvDefenseError):
        capture_channel_means(model, "feat", x, after_mask=True)
    with pytest.raises(AdvDefenseError, match="no layer"):
        capture_channel_means(model, "nope", x)


def test_analyze_channels_aligns_orders_and_selects_the_class(standard_model, mnist_test):
    x, y = mnist_test
    x, y = x[:200], y[:200]
    attack = PGD(eps=0.3, steps=3, step_size=0.1, seed=0)
    rep = analyze_channels(standard_model, x, y, layer="features.13", cls=3, attack=attack)
    n3 = int((y == 3).sum())
    assert rep.natural.n == rep.adversarial.n == n3
    assert rep.natural.magnitude.numel() == 64
    order = rep.order
    assert torch.all(rep.natural.magnitude[order][:-1] >= rep.natural.magnitude[order][1:])
    d = rep.to_dict()
    assert d["order"] == order.tolist()
    assert rep.adv_accuracy < rep.clean_accuracy  # the attack did something
    with pytest.raises(AdvDefenseError, match="no examples of class"):
        analyze_channels(standard_model, x[y != 3], y[y != 3], layer="features.13", cls=3,
                         attack=attack)


def test_cli_writes_json_and_plots(tmp_path, mnist_train):
    from advdefense.cli import main
    from advdefense.config import build_from_config, config_from_dict, to_dict
    from advdefense.training.checkpoint import make_checkpoint, save_checkpoint

    cfg = config_from_dict({"name": "cas_tiny", "data": {"name": "mnist5k"},
                            "model": {"name": "smallcnn"}, "defense": {"cas": {}},
                            "train": {"recipe_args": {"aux_weight": 2.0}}})
    torch.manual_seed(0)
    model, _ = build_from_config(cfg)
    ckpt = save_checkpoint(make_checkpoint(config=to_dict(cfg), model=model), tmp_path / "m.pt")
    out = tmp_path / "chan"
    code = main(["analyze", "channels", "--checkpoint", str(ckpt), "--layer", "features.13",
                 "--class", "2", "--eps", "0.3", "--steps", "2", "--max-examples", "12",
                 "--output", str(out)])
    assert code == 0
    data = json.loads((out / "channels.json").read_text())
    assert data["class"] == 2 and data["examples"] == 12 and data["channels"] == 64
    assert "loss=ce+2*aux" in data["attack"] and "steps=2" in data["attack"]
    assert set(data["summary"]["natural"]) >= {"gini", "entropy", "mean_magnitude"}
    for png in ("magnitude.png", "frequency.png"):
        assert (out / png).stat().st_size > 1000
    bad = main(["analyze", "channels", "--checkpoint", str(ckpt), "--layer", "nope",
                "--class", "2", "--eps", "0.3", "--output", str(out)])
    assert bad == 2
