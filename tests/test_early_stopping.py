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


def test_plateaus_decay_the_rate_before_the_rule_stops():
    # patience 2: the plateau after epoch 2 decays (not a stop), the next improvement resets
    # the count, the second plateau decays again, the third (decays spent) stops the run
    values = [0.5, 0.6, 0.6, 0.6, 0.7, 0.7, 0.7, 0.72, 0.72, 0.72]
    plain = stopping_state(_history(values), RULE)
    assert plain.stop and plain.epochs == 4 and plain.decays == 0
    state = stopping_state(_history(values), RULE, decays=2)
    assert state.stop and state.epochs == 10 and state.decays == 2
    assert state.best_epoch == 8 and state.best_value == 0.72
    # before the last plateau: two decays done, still running
    mid = stopping_state(_history(values[:9]), RULE, decays=2)
    assert not mid.stop and mid.decays == 2 and mid.since_best == 1


def test_trainer_decays_on_plateaus_logs_the_rate_and_resumes_at_it(tmp_path, monkeypatch):
    values = [0.30, 0.50, 0.49, 0.49, 0.7, 0.69, 0.69, 0.69, 0.69, 0.69]
    _fake_monitor(monkeypatch, values)
    schedule = {"name": "plateau", "gamma": 0.1, "decays": 1}

    def cfg(epochs):
        c = _cfg(tmp_path, "plateau", epochs=epochs)
        c.train.schedule = type(c.train.schedule)(**schedule)
        return c

    first = Trainer(cfg(4), device="cpu", progress=False)
    first.fit()  # stops at the cap of 4, after the decay at epoch 4
    again = Trainer(cfg(10), device="cpu", progress=False)
    again.fit(resume=True)
    lines = [json.loads(x)
             for x in (again.output_dir / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in lines]
    # epochs 1-4 at 1e-3; the plateau of epochs 3-4 decays; 5-7 at 1e-4; the plateau of
    # 6-7 (decays spent) stops the run at epoch 7
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4, 5, 6, 7]
    assert lrs[:4] == pytest.approx([1e-3] * 4) and lrs[4:] == pytest.approx([1e-4] * 3)
    assert [r["lr_decays"] for r in lines] == [0, 0, 0, 1, 1, 1, 1]
    from advdefense.reproduction import _finished, training_summary

    last = load_checkpoint(again.checkpoint_path)
    summary = training_summary(last, again.cfg)
    assert summary["stopped_early"] and summary["best_epoch"] == 5
    assert summary["lr_decays"] == 1 and _finished(last, again.cfg)
    # the checkpoint names the machine it was trained on, and the summary carries it
    from advdefense.provenance import machine_line

    assert summary["machine"] == last["extra"]["machine"] == machine_line("cpu")


def test_code_version_names_the_commit_of_a_checkout_without_git(monkeypatch):
    from advdefense.reproduction import code_version

    monkeypatch.setenv("ADVDEFENSE_COMMIT", "abc1234")
    assert code_version() == "abc1234"
    monkeypatch.delenv("ADVDEFENSE_COMMIT")
    assert code_version() != "abc1234"


def test_plateau_schedule_needs_early_stopping():
    with pytest.raises(ConfigError, match="plateau"):
        config_from_dict({"train": {"schedule": {"name": "plateau"}}})
