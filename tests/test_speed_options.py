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
    plain = Trainer(cfg(tmp_path, "plain", optimizer=sgd), device="cpu", progress=False)
    plain.fit()
    cl = Trainer(cfg(tmp_path, "cl", channels_last=True, optimizer=sgd), device="cpu",
                 progress=False)
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
        assert isinstance(trainer.train_model, _Broken)
        trainer.fit()
    assert any("torch.compile failed" in r.getMessage() for r in caplog.records)
    assert trainer.train_model is trainer.model
    for a, b in zip(eager.model.state_dict().values(), trainer.model.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
