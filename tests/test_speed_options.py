"""Speed options: bf16 autocast, fp16 guard, channels_last, torch.compile fallback."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from advdefense.config import config_from_dict
from advdefense.data import as_tensors, load_split
from advdefense.errors import ConfigError
from advdefense.training.recipes import build_recipe
from advdefense.training.trainer import Trainer

from .conftest import make_smallcnn


def cfg(tmp_path, name, **train):
    return config_from_dict({
        "name": name, "seed": 3, "output_dir": str(tmp_path / name),
        "data": {"limit": 200, "monitor_size": 0, "batch_size": 100},
        "train": {"recipe": "standard", "epochs": 1,
                  "optimizer": {"name": "adam", "lr": 1e-3, "weight_decay": 0.0}, **train},
    })


@pytest.fixture(scope="module")
def batch():
    return as_tensors(load_split("mnist5k", "train", limit=100))


def test_bf16_loss_is_finite_and_close_to_fp32(batch):
    x, y = batch
    model = make_smallcnn(seed=0).train()
    recipe = build_recipe("standard", None)
    loss32, _ = recipe.loss(model, x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, _ = recipe.loss(model, x, y)
    assert torch.isfinite(loss16)
    assert float(loss16.detach()) == pytest.approx(float(loss32.detach()), rel=0.03)
    loss16.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bf16_trainer_epoch_runs(tmp_path):
    trainer = Trainer(cfg(tmp_path, "bf16", amp="bf16", recipe="pgd_at",
                          attack={"eps": 0.3, "steps": 1}), device="cpu", progress=False)
    metrics = trainer.fit()
    assert metrics["train_loss"] == metrics["train_loss"]  # finite, not NaN
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values()
               if v.is_floating_point())


def test_fp16_on_cpu_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        Trainer(cfg(tmp_path, "fp16", amp="fp16"), device="cpu", progress=False)


def test_channels_last_gives_the_same_outputs(batch):
    x, _ = batch
    model = make_smallcnn(seed=1).eval()
    fast = copy.deepcopy(model).to(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model(x)
        out = fast(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(ref, out, atol=1e-5, rtol=1e-4)


def test_channels_last_trainer_matches_default(tmp_path):
    sgd = {"name": "sgd", "lr": 0.05, "momentum": 0.0, "weight_decay": 0.0}
    plain = Trainer(cfg(tmp_path, "plain", channels_last=False, optimizer=sgd), device="cpu",
                    progress=False)
    assert all(p.is_contiguous() for p in plain.model.parameters())
    plain.fit()
    cl = Trainer(cfg(tmp_path, "cl", channels_last=True, optimizer=sgd), device="cpu",
                 progress=False)
    assert any(p.dim() == 4 and not p.is_contiguous() for p in cl.model.parameters())
    cl.fit()
    worst = max(float((a.float() - b.float()).abs().max())
                for a, b in zip(plain.model.state_dict().values(),
                                cl.model.state_dict().values(), strict=True))
    # two SGD steps; only the summation order differs
    assert worst < 1e-3, worst
    moved = max(float((a.float() - b.float()).abs().max()) for a, b in zip(
        plain.model.state_dict().values(), make_smallcnn(seed=3).state_dict().values(),
        strict=True))
    assert moved > 100 * worst


class _Broken(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        raise RuntimeError("simulated inductor failure")


def test_compile_failure_falls_back_to_eager_with_a_warning(tmp_path, monkeypatch, caplog):
    eager = Trainer(cfg(tmp_path, "eager"), device="cpu", progress=False)
    eager.fit()
    monkeypatch.setattr(torch, "compile", lambda model, *a, **k: _Broken(model))
    with caplog.at_level(logging.WARNING, logger="advdefense.training.trainer"):
        trainer = Trainer(cfg(tmp_path, "compiled", compile=True), device="cpu",
                          progress=False)
        assert isinstance(trainer.train_model.compiled, _Broken)
        trainer.fit()
    assert any("torch.compile failed" in r.getMessage() for r in caplog.records)
    assert trainer.train_model is trainer.model
    for a, b in zip(eager.model.state_dict().values(), trainer.model.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)


# -- precision of the inner maximization -----------------------------------------------------
def test_fp16_input_gradients_of_the_trades_objective_underflow(batch):
    """Why training attacks run in fp32: at TRADES' start (x + 0.001 N(0, 1)) the fp16 input
    gradient of the KL objective is zero in a large share of entries; in fp32 almost none."""
    from advdefense.attacks import eot_loss_grad
    from advdefense.training.recipes import KLObjective

    x, y = batch
    model = make_smallcnn(seed=0).eval()
    with torch.no_grad():
        p_nat = torch.softmax(model(x), 1)
    torch.manual_seed(0)
    x0 = x + 0.001 * torch.randn_like(x)
    zeros = {}
    for dtype in (torch.float32, torch.float16):
        with torch.autocast("cpu", dtype=torch.float16, enabled=dtype == torch.float16):
            grad = eot_loss_grad(model, x0, y, KLObjective(p_nat)).grad
        zeros[dtype] = float((grad == 0).float().mean())
    assert zeros[torch.float32] < 0.01 and zeros[torch.float16] > 0.25, zeros


@pytest.mark.parametrize("name", ["trades", "pgd_at"])
def test_training_attacks_under_fp16_autocast_match_fp32(batch, name):
    from advdefense.config import AttackConfig
    from advdefense.randomness import seeded

    x, y = batch
    x, y = x[:32], y[:32]
    recipe = build_recipe(name, AttackConfig(eps=0.3, steps=2, step_size=0.1))
    made = []
    if name == "trades":
        inner = recipe._ascend
        recipe._ascend = lambda *a, **k: made.append(inner(*a, **k)) or made[-1]
    else:
        inner = recipe.attack
        recipe.attack = lambda *a, **k: made.append(inner(*a, **k)) or made[-1]

    def run(dtype, attack_autocast=False):
        recipe.attack_autocast = attack_autocast
        model = make_smallcnn(seed=0).train()  # fresh BN statistics for every run
        with seeded(0), torch.autocast("cpu", dtype=dtype or torch.float16,
                                       enabled=dtype is not None):
            loss, _ = recipe.loss(model, x, y)
        assert torch.isfinite(loss)
        return made[-1]

    ref = run(None)
    torch.testing.assert_close(run(torch.float16), ref, rtol=0, atol=0)
    # under the training autocast (the old behaviour) the fp16 attack goes elsewhere
    assert not torch.equal(run(torch.float16, attack_autocast=True), ref)


def test_attack_precision_option(tmp_path):
    with pytest.raises(ConfigError, match="underflow"):
        cfg(tmp_path, "bad", amp="fp16", attack_precision="amp")
    trainer = Trainer(cfg(tmp_path, "amp", amp="bf16", attack_precision="amp", recipe="pgd_at",
                          attack={"eps": 0.3, "steps": 1}), device="cpu", progress=False)
    assert trainer.recipe.attack_autocast
    assert not Trainer(cfg(tmp_path, "fp32", amp="bf16"), device="cpu",
                       progress=False).recipe.attack_autocast


# -- compile covers forward_with_aux -----------------------------------------------------------
class _Recording(nn.Module):
    """Stands in for a compiled module: records how it is called."""

    calls: list = []

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        type(self).calls.append(kwargs.get("with_aux", False))
        return self.inner(*args, **kwargs)


def test_compile_routes_forward_with_aux_through_the_compiled_module(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda model, *a, **k: _Recording(model))
    monkeypatch.setattr(_Recording, "calls", [])
    c = cfg(tmp_path, "cas", compile=True, recipe="trades", attack={"eps": 0.3, "steps": 1})
    c.defense = {"cas": {}}
    c.data.limit = 100
    trainer = Trainer(c, device="cpu", progress=False)
    trainer.fit()
    # the inner maximization, the clean and the adversarial forward all ran the CAS heads
    # through the compiled module
    assert _Recording.calls == [True] * 4


def test_compile_backend_option(tmp_path):
    with pytest.raises(ConfigError, match="unknown backend"):
        Trainer(cfg(tmp_path, "typo", compile="inductr"), device="cpu", progress=False)
    c = cfg(tmp_path, "eager_backend", compile="eager")
    c.data.limit = 50
    c.data.batch_size = 50
    trainer = Trainer(c, device="cpu", progress=False)
    assert trainer.compile_backend == "eager"
    assert trainer.fit()["train_loss"] > 0


# -- determinism and loader options ------------------------------------------------------------
@pytest.fixture
def restore_determinism():
    import os

    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2], saved[3]
    if saved[4] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[4]


@pytest.mark.parametrize("mode", [True, "strict"])
def test_deterministic_option_sets_the_flags(tmp_path, restore_determinism, mode):
    import os

    torch.backends.cudnn.benchmark = True
    c = cfg(tmp_path, "det", deterministic=mode)
    c.data.persistent_workers = None
    trainer = Trainer(c, device="cpu", progress=False)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled() == (mode is True)
    assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] in (":4096:8", ":16:8")
    assert trainer.loader_options["persistent_workers"] is False
    with pytest.raises(ConfigError, match="deterministic"):
        cfg(tmp_path, "bad", deterministic="sometimes")


def test_loader_options_use_workers_for_per_item_datasets(monkeypatch):
    from advdefense import data

    monkeypatch.setattr(data, "_usable_cpus", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    cuda = data.loader_options("cifar10", "cuda")
    assert cuda == {"num_workers": 4, "pin_memory": True, "persistent_workers": True}
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert data.loader_options("cifar100", "cpu")["num_workers"] == data.MAX_AUTO_WORKERS
    assert data.loader_options("cifar10", "cpu")["pin_memory"] is False
    assert data.loader_options("mnist5k", "cuda") == {
        "num_workers": 0, "pin_memory": True, "persistent_workers": False}
    assert data.loader_options("svhn", "cuda", num_workers=2, pin_memory=False,
                               persistent_workers=False) == {
        "num_workers": 2, "pin_memory": False, "persistent_workers": False}


def test_trainer_passes_the_loader_options(tmp_path):
    c = cfg(tmp_path, "loader")
    c.data.num_workers = 1
    trainer = Trainer(c, device="cpu", progress=False)
    assert trainer.loader.num_workers == 1 and trainer.loader.persistent_workers
    assert not trainer.loader.pin_memory
