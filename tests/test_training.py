"""Trainer resume equality, recipes (losses, heads composition, draw policies), optimizer and
schedules."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from advdefense.config import AttackConfig, OptimizerConfig, ScheduleConfig, config_from_dict
from advdefense.data import as_tensors, load_split
from advdefense.errors import ConfigError
from advdefense.randomness import StochasticModule, seeded
from advdefense.training.checkpoint import load_checkpoint
from advdefense.training.optim import EpochSchedule, build_optimizer
from advdefense.training.recipes import RECIPES, build_recipe
from advdefense.training.trainer import Trainer

from .conftest import make_smallcnn

ATTACK = AttackConfig(eps=0.3, steps=3, step_size=0.1)


def tiny_cfg(tmp_path, name, **train):
    raw = {
        "name": name,
        "seed": 7,
        "output_dir": str(tmp_path / name),
        "data": {"limit": 200, "monitor_size": 40, "batch_size": 50},
        "model": {"name": "smallcnn", "kwargs": {"width": 8}},
        "train": {"recipe": "pgd_at", "epochs": 2,
                  "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9,
                                "weight_decay": 5e-4},
                  "schedule": {"name": "step", "milestones": [1], "gamma": 0.5},
                  "attack": {"eps": 0.3, "steps": 2, "step_size": 0.15},
                  "monitor_attack": {"steps": 2}, **train},
    }
    return config_from_dict(raw)


# ------------------------------------------------------------------------------------------
# Trainer


def test_resume_reaches_exactly_the_uninterrupted_weights(tmp_path):
    straight = Trainer(tiny_cfg(tmp_path, "straight"), device="cpu", progress=False)
    final = straight.fit()

    first = Trainer(tiny_cfg(tmp_path, "resumed", epochs=1), device="cpu", progress=False)
    first.fit()
    assert load_checkpoint(first.checkpoint_path)["epoch"] == 1
    second = Trainer(tiny_cfg(tmp_path, "resumed"), device="cpu", progress=False)
    resumed_final = second.fit(resume=True)

    a, b = straight.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the batch-norm statistics moved and the schedule decayed (the run really trained)
    assert second.optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5)
    timing = {"seconds", "train_seconds"}
    assert {k: v for k, v in final.items() if k not in timing} == \
        {k: v for k, v in resumed_final.items() if k not in timing}

    lines = [json.loads(s) for s in second.metrics_path.read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert lines[0]["lr"] == 0.05 and lines[1]["lr"] == 0.025
    for key in ("train_loss", "train_acc", "train_adv_acc", "monitor_clean_acc",
                "monitor_pgd_acc", "seconds"):
        assert key in lines[1]
    assert 0.0 <= lines[1]["monitor_pgd_acc"] <= lines[1]["monitor_clean_acc"] <= 1.0
    assert (second.output_dir / "config.yaml").is_file()
    assert sorted(p.name for p in second.output_dir.iterdir()) == \
        ["config.yaml", "last.pt", "metrics.jsonl"]


def test_resume_without_checkpoint_or_with_other_config_fails_clearly(tmp_path):
    from advdefense.errors import CheckpointError

    trainer = Trainer(tiny_cfg(tmp_path, "none", epochs=1, recipe="standard"), device="cpu",
                      progress=False)
    with pytest.raises(CheckpointError, match="not found"):
        trainer.fit(resume=True)
    trainer.fit()
    other = tiny_cfg(tmp_path, "none", epochs=2, recipe="standard")
    other.data.limit = 100
    with pytest.raises(CheckpointError, match="data"):
        Trainer(other, device="cpu", progress=False).fit(resume=True)
    # loader options only change speed: a resume may change them (and older checkpoints
    # lack some of them)
    loader = tiny_cfg(tmp_path, "none", epochs=2, recipe="standard")
    loader.data.num_workers = 1
    loader.data.persistent_workers = False
    assert Trainer(loader, device="cpu", progress=False).fit(resume=True)["epoch"] == 2


def test_adv_start_epoch_uses_standard_training_first(tmp_path):
    trainer = Trainer(tiny_cfg(tmp_path, "delay", epochs=1, adv_start_epoch=1,
                               monitor_attack={"steps": 0}), device="cpu", progress=False)
    metrics = trainer.fit()
    assert "train_adv_acc" not in metrics and "monitor_pgd_acc" not in metrics
    assert metrics["epoch"] == 1


# ------------------------------------------------------------------------------------------
# recipes


@pytest.fixture(scope="module")
def batch():
    x, y = as_tensors(load_split("mnist5k", "train", limit=64))
    return x, y


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_each_recipe_decreases_its_loss(name, batch):
    x, y = batch[0][:32], batch[1][:32]
    model = make_smallcnn(seed=0, width=8)
    recipe = build_recipe(name, ATTACK)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    model.train()

    def measured():
        with seeded(123):
            loss, logs = recipe.loss(model, x, y)
        return float(loss.detach()), logs

    before, logs = measured()
    assert all(isinstance(v, float) and v == v for v in logs.values())
    assert logs["loss"] == pytest.approx(before)
    assert 0.0 <= logs["acc"] <= 1.0
    for _ in range(10):
        loss, logs = recipe.loss(model, x, y)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after, _ = measured()
    assert after < 0.9 * before, (before, after)
    assert model.training  # recipes do not switch the model's mode


def test_unknown_recipe_args_are_config_errors():
    with pytest.raises(ConfigError, match="valid keys: .*beta"):
        build_recipe("trades", ATTACK, betta=3)
    with pytest.raises(ConfigError, match="choose one of: fresh, shared, independent"):
        build_recipe("pgd_at", ATTACK, draw="sometimes")
    with pytest.raises(ConfigError, match="unknown recipe"):
        build_recipe("fgsm_at", ATTACK)
    assert build_recipe("pgd_at", ATTACK, attack_label=True).attack_label == "true"


class HeadsNet(nn.Module):
    """Tiny model with two auxiliary heads; the main logits do not depend on ``y``."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU())
        self.main = nn.Linear(32, 10)
        self.aux = nn.ModuleList([nn.Linear(32, 10), nn.Linear(32, 10)])
        self.aux_calls = 0

    def forward(self, x):
        return self.main(self.body(x))

    def forward_with_aux(self, x, y=None):
        self.aux_calls += 1
        h = self.body(x)
        return self.main(h), [head(h) for head in self.aux]


class PlainView(nn.Module):
    """The same weights without auxiliary heads."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_aux_weight_zero_equals_the_plain_recipe_exactly(name, batch):
    x, y = batch
    torch.manual_seed(0)
    net = HeadsNet().train()
    recipe = build_recipe(name, ATTACK, aux_weight=0.0)
    with seeded(5):
        loss_heads, _ = recipe.loss(net, x, y)
    with seeded(5):
        loss_plain, _ = recipe.loss(PlainView(net).train(), x, y)
    assert torch.equal(loss_heads, loss_plain)

    with_aux = build_recipe(name, ATTACK, aux_weight=2.0)
    with seeded(5):
        loss_aux, logs = with_aux.loss(net, x, y)
    assert torch.isfinite(loss_aux) and not torch.equal(loss_aux, loss_heads)
    grads = torch.autograd.grad(loss_aux, list(net.aux[0].parameters()))
    assert all(g.abs().sum() > 0 for g in grads)  # the heads are trained


def test_standard_heads_formula(batch):
    x, y = batch
    torch.manual_seed(0)
    net = HeadsNet().train()
    loss, _ = build_recipe("standard", None, aux_weight=2.0).loss(net, x, y)
    main, aux = net.forward_with_aux(x, y)
    expected = F.cross_entropy(main, y) + 2.0 * torch.stack(
        [F.cross_entropy(a, y) for a in aux]).mean()
    assert torch.allclose(loss, expected)


class RecordingNoise(StochasticModule):
    """Adds a random scalar per draw group and records every state it uses."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[bool, float]] = []
        self.groups: list[tuple[bool, int]] = []

    def sample_state(self, x, groups):
        return torch.randn(groups)

    def forward_with_state(self, x, state):
        self.groups.append((self.training, state.numel()))
        if state.numel() == 1:
            self.seen.append((self.training, float(state)))
            return x + state
        n = x.shape[0] // state.numel()
        return x + state.repeat_interleave(n).view(-1, *([1] * (x.dim() - 1)))


def noisy_model():
    torch.manual_seed(0)
    noise = RecordingNoise()
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), noise, nn.ReLU(), nn.Linear(16, 10))
    return model.train(), noise


@pytest.mark.parametrize("draw", ["fresh", "shared", "independent"])
def test_draw_policies(draw, batch):
    x, y = batch
    model, noise = noisy_model()
    recipe = build_recipe("pgd_at", ATTACK, draw=draw)
    recipe.loss(model, x, y)
    attack_states = [s for training, s in noise.seen if not training]
    train_states = [s for training, s in noise.seen if training]
    assert len(attack_states) == ATTACK.steps + 1 and len(train_states) == 1
    if draw == "fresh":
        assert len(set(attack_states)) == len(attack_states)
        assert train_states[0] not in attack_states
    elif draw == "shared":
        assert set(attack_states) == set(train_states)
    else:  # independent: attack on one frozen draw A, training on a fresh draw B
        assert len(set(attack_states)) == 1
        assert train_states[0] != attack_states[0]
    assert not noise.frozen  # the freeze is released afterwards


def test_predicted_label_attack_and_clean_weight(batch):
    x, y = batch
    model = make_smallcnn(seed=0).train()
    recipe = build_recipe("pgd_at", ATTACK, clean_weight=0.5, attack_label="predicted")
    with seeded(1):
        loss, logs = recipe.loss(model, x, y)
    assert {"clean_acc", "adv_acc", "adv_loss"} <= logs.keys()
    # the loss is half clean CE + half adversarial CE
    with torch.no_grad():
        clean_ce = F.cross_entropy(model(x), y)
    assert float(loss.detach()) == pytest.approx(0.5 * float(clean_ce) + 0.5 * logs["adv_loss"],
                                        rel=1e-4)


def test_eot_training_attack_averages_draws(batch, monkeypatch):
    from advdefense import randomness

    monkeypatch.setattr(randomness, "CPU_ROWS", None)  # all draws of a step in one pass
    x, y = batch
    model, noise = noisy_model()
    cfg = AttackConfig(eps=0.3, steps=2, step_size=0.1, eot_samples=4)
    build_recipe("pgd_at", cfg).loss(model, x, y)
    # every attack forward is one batched pass with 4 independent draws (EPGD); the training
    # forward is a single draw
    attack_groups = [g for training, g in noise.groups if not training]
    assert attack_groups == [4] * (cfg.steps + 1)
    assert [g for training, g in noise.groups if training] == [1]


# ------------------------------------------------------------------------------------------
# optimizer and schedules


def test_no_weight_decay_parameters_get_their_own_group():
    model = nn.Linear(3, 3)
    model.bias._no_weight_decay = True
    opt = build_optimizer(model, OptimizerConfig(name="sgd", lr=0.1, weight_decay=1e-3))
    groups = {len(g["params"]): g["weight_decay"] for g in opt.param_groups}
    assert opt.param_groups[0]["params"][0] is model.weight
    assert opt.param_groups[1]["params"][0] is model.bias
    assert groups == {1: 0.0} or [g["weight_decay"] for g in opt.param_groups] == [1e-3, 0.0]
    adam = build_optimizer(model, OptimizerConfig(name="adam", lr=1e-3, weight_decay=0.0))
    assert isinstance(adam, torch.optim.Adam)


def test_noise_lr_scale_slows_only_the_noise_parameters():
    """``noise_lr_scale`` gives PNI/CNI's alpha and F their own group at lr * scale: after one
    Adam step (each element moves by about its group's lr) the noise parameters moved 100x less
    than the weights; with scale 1 they stay in the shared undecayed group."""
    from advdefense.defenses.noise import inject

    torch.manual_seed(0)
    model = inject(make_smallcnn(), kind="cni")
    noise = [p for n, p in model.named_parameters() if "alpha" in n or "factor" in n]
    weights = [p for n, p in model.named_parameters() if n.endswith("layer.weight")]
    opt = build_optimizer(model, OptimizerConfig(name="adam", lr=1e-2, weight_decay=0.0,
                                                 noise_lr_scale=0.01))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-2, 1e-4])
    before = [p.detach().clone() for p in noise + weights]
    model(torch.rand(4, 1, 28, 28)).logsumexp(1).sum().backward()
    opt.step()
    moved = [(p.detach() - b).abs().max().item() for p, b in zip(noise + weights, before,
                                                                   strict=True)]
    assert max(moved[:len(noise)]) <= 1.01e-4 < 0.5e-2 < max(moved[len(noise):])
    plain = build_optimizer(model, OptimizerConfig(name="adam", lr=1e-2, weight_decay=0.0))
    assert len(plain.param_groups) == 2 and all(g["lr"] == 1e-2 for g in plain.param_groups)
    with pytest.raises(ConfigError):
        OptimizerConfig(noise_lr_scale=0.0).validate("train.optimizer")


def test_schedules_follow_milestones_at_epoch_end():
    model = nn.Linear(2, 2)
    opt = build_optimizer(model, OptimizerConfig(lr=0.1))
    sched = EpochSchedule(opt, ScheduleConfig(name="step", milestones=[2, 4], gamma=0.1),
                          epochs=6)
    lrs = []
    for _ in range(6):
        lrs.append(sched.get_last_lr()[0])
        sched.step()
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    state = sched.state_dict()
    opt2 = build_optimizer(model, OptimizerConfig(lr=0.1))
    again = EpochSchedule(opt2, ScheduleConfig(name="step", milestones=[2, 4]), epochs=6)
    again.load_state_dict(state)
    assert again.get_last_lr() == sched.get_last_lr()

    cos = EpochSchedule(build_optimizer(model, OptimizerConfig(lr=1.0)),
                        ScheduleConfig(name="cosine"), epochs=4)
    values = []
    for _ in range(5):
        values.append(cos.get_last_lr()[0])
        cos.step()
    assert values == pytest.approx([1.0, 0.8535534, 0.5, 0.1464466, 0.0], abs=1e-6)


def test_init_from_copies_matching_weights(tmp_path):
    """train.init_from starts fine-tuning from a checkpoint's weights (new tensors keep init)."""
    import torch

    from advdefense.config import config_from_dict
    from advdefense.training.checkpoint import load_checkpoint
    from advdefense.training.trainer import Trainer

    base = {"name": "src", "output_dir": str(tmp_path / "src"),
            "data": {"name": "digits", "batch_size": 50, "monitor_size": 0, "limit": 100},
            "model": {"name": "smallcnn"},
            "train": {"epochs": 1, "optimizer": {"name": "adam", "lr": 1e-3}}}
    t = Trainer(config_from_dict(base), progress=False)
    t.fit()
    t.close()
    src = load_checkpoint(tmp_path / "src" / "last.pt")["model"]
    ft = dict(base, name="ft", output_dir=str(tmp_path / "ft"),
              defense={"noise": {"kind": "pni", "where": "weights"}},
              train=dict(base["train"], init_from=str(tmp_path / "src" / "last.pt")))
    t2 = Trainer(config_from_dict(ft), progress=False)
    state = t2.model.state_dict()
    shared = [k for k in src if k in state]
    assert shared, "the noisy model keeps the base weights' names"
    for k in shared:
        assert torch.equal(state[k].cpu(), src[k]), k
    assert any(k not in src for k in state), "noise scales are new tensors"
    t2.close()
