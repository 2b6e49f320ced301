"""Early stopping on the val monitor: the rule on fake monitor sequences, the Trainer keeping
the best epoch's checkpoint and stopping (also after a resume), and config validation."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from advdefense.config import config_from_dict
from advdefense.errors import ConfigError
from advdefense.training.checkpoint import load_checkpoint
from advdefense.training.early_stopping import stopping_state
from advdefense.training.trainer import Trainer

RULE = SimpleNamespace(metric="monitor_pgd_acc", patience=2, min_delta=0.005)


def _history(values):
    return [{"epoch": i + 1, "monitor_pgd_acc": v} for i, v in enumerate(values)]


def test_rule_on_a_fake_monitor_sequence():
    # 0.603 does not clear 0.6 + 0.005 (no reset), 0.65 does; 0.64 and 0.652 do not -> stop
    state = stopping_state(_history([0.5, 0.6, 0.603, 0.65, 0.64, 0.652]), RULE)
    assert (state.best_epoch, state.best_value, state.stop, state.epochs) == (4, 0.65, True, 6)
    # one epoch without improvement is not enough with patience 2
    state = stopping_state(_history([0.5, 0.6, 0.59]), RULE)
    assert not state.stop and state.best_epoch == 2 and state.since_best == 1
    # a rising sequence never stops; the best is the last epoch
    state = stopping_state(_history([0.1, 0.2, 0.3, 0.4]), RULE)
    assert not state.stop and state.best_epoch == 4
    # the rule stops at the first point where it fires, whatever comes after
    assert stopping_state(_history([0.5, 0.4, 0.4, 0.9]), RULE).epochs == 3
    with pytest.raises(KeyError):
        stopping_state([{"epoch": 1}], RULE)


def _cfg(tmp_path, name, epochs=8, **es):
    return config_from_dict({
        "name": name, "seed": 3, "output_dir": str(tmp_path / name),
        "data": {"limit": 60, "batch_size": 30, "train_split": "fit", "monitor_split": "val",
                 "monitor_size": 4},
        "model": {"name": "smallcnn", "kwargs": {"width": 4}},
        "train": {"recipe": "standard", "epochs": epochs,
                  "optimizer": {"name": "adam", "lr": 1e-3, "weight_decay": 0.0},
                  "monitor_attack": {"steps": 1},
                  "early_stopping": {"patience": 2, "min_delta": 0.005, **es}}})


def _fake_monitor(monkeypatch, values):
    """Replace the monitor by a fixed sequence of val accuracies (one per epoch)."""
    def monitor(self, epoch):
        return {"monitor_clean_acc": 1.0, "monitor_pgd_acc": values[epoch]}
    monkeypatch.setattr(Trainer, "monitor", monitor)


def test_trainer_stops_keeps_the_best_epoch_and_resume_does_not_train_on(tmp_path,
                                                                           monkeypatch):
    _fake_monitor(monkeypatch, [0.30, 0.50, 0.49, 0.505, 0.7, 0.8, 0.9, 0.95])
    trainer = Trainer(_cfg(tmp_path, "es"), device="cpu", progress=False)
    trainer.fit()
    lines = [json.loads(x) for x in (trainer.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4]  # stopped, cap 8 not reached
    assert [r["best_epoch"] for r in lines] == [1, 2, 2, 2]
    best = load_checkpoint(trainer.output_dir / "best.pt")
    last = load_checkpoint(trainer.checkpoint_path)
    assert (best["epoch"], last["epoch"]) == (2, 4)
    assert not torch.equal(best["model"]["features.1.weight"], last["model"]["features.1.weight"])
    # resuming a stopped run trains nothing more
    again = Trainer(_cfg(tmp_path, "es"), device="cpu", progress=False)
    again.fit(resume=True)
    assert load_checkpoint(again.checkpoint_path)["epoch"] == 4
    # the reproduction pipeline sees it as finished and evaluates best.pt
    from advdefense.reproduction import _finished, training_summary

    summary = training_summary(last, trainer.cfg)
    assert summary["stopped_early"] and summary["best_epoch"] == 2
    assert summary["checkpoint"] == "best.pt" and summary["cap"] == 8
    assert _finished(last, trainer.cfg)


def test_early_stopping_config_is_validated(tmp_path):
    with pytest.raises(ConfigError, match="monitor_split"):
        config_from_dict({"data": {"monitor_split": "test"},
                          "train": {"early_stopping": {}}})
    with pytest.raises(ConfigError, match="monitor_size"):
        config_from_dict({"data": {"monitor_split": "val", "monitor_size": 0},
                          "train": {"early_stopping": {}}})
    with pytest.raises(ConfigError, match="metric"):
        _cfg(tmp_path, "x", metric="val_loss")
    with pytest.raises(ConfigError, match="patience"):
        _cfg(tmp_path, "x", patience=0)
    assert config_from_dict({}).train.early_stopping is None
