"""Checkpoints: weights_only round trip, atomic writes, clear errors, RNG capture/restore."""

from __future__ import annotations

import io
import pickle
import random

import numpy as np
import pytest
import torch

from advdefense.config import build_from_config, config_from_dict, to_dict
from advdefense.errors import CheckpointError
from advdefense.training import checkpoint as C


def small_cfg(**data):
    return config_from_dict({"name": "ckpt", "data": {"limit": 10, **data}})


def model_and_ckpt(seed=0):
    cfg = small_cfg()
    torch.manual_seed(seed)
    model, _ = build_from_config(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.rand(4, 1, 28, 28)).sum().backward()
    opt.step()
    ckpt = C.make_checkpoint(config=to_dict(cfg), model=model, optimizer=opt, epoch=3,
                             metrics={"acc": 0.5})
    return cfg, model, opt, ckpt


def test_round_trip_is_weights_only(tmp_path):
    cfg, model, opt, ckpt = model_and_ckpt()
    path = C.save_checkpoint(ckpt, tmp_path / "last.pt")
    raw = torch.load(path, weights_only=True)  # must not need pickled code
    assert raw["format"] == C.FORMAT and raw["version"] == C.VERSION
    loaded = C.load_checkpoint(path)
    assert loaded["epoch"] == 3 and loaded["metrics"] == {"acc": 0.5}
    assert loaded["config"] == to_dict(cfg)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded["model"][k], v)
    opt2 = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(loaded["optimizer"])
    assert not list(tmp_path.glob(".*tmp"))


def test_load_model_from_checkpoint_rebuilds_the_model(tmp_path):
    cfg, model, _opt, ckpt = model_and_ckpt(seed=1)
    path = C.save_checkpoint(ckpt, tmp_path / "m.pt")
    rebuilt, cfg2 = C.load_model_from_checkpoint(path)
    assert cfg2 == cfg
    assert not rebuilt.training
    model.eval()
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_crash_during_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    _cfg, _model, _opt, good = model_and_ckpt(seed=2)
    path = C.save_checkpoint(good, tmp_path / "last.pt")
    before = path.read_bytes()
    _cfg, _model, _opt, newer = model_and_ckpt(seed=3)

    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])  # half written, then "crash"
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        C.save_checkpoint(newer, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert C.load_checkpoint(path)["epoch"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp debris


def test_missing_corrupt_truncated_foreign_and_unsafe_files(tmp_path):
    def one_line_error(path):
        with pytest.raises(CheckpointError) as info:
            C.load_checkpoint(path)
        msg = str(info.value)
        assert "\n" not in msg and str(path) in msg
        return msg

    assert "not found" in one_line_error(tmp_path / "missing.pt")

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint" * 10)
    assert "corrupt" in one_line_error(junk)

    _cfg, _m, _o, ckpt = model_and_ckpt()
    good = C.save_checkpoint(ckpt, tmp_path / "good.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:2000])
    one_line_error(truncated)

    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    assert "not an advdefense checkpoint" in one_line_error(foreign)

    raw_sd = tmp_path / "raw.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), raw_sd)
    assert "not an advdefense checkpoint" in one_line_error(raw_sd)

    unsafe = tmp_path / "unsafe.pt"
    torch.save({"format": C.FORMAT, "version": 1, "obj": pickle.PicklingError}, unsafe)
    assert "weights_only" in one_line_error(unsafe)

    future = tmp_path / "future.pt"
    torch.save({**ckpt, "version": 99}, future)
    assert "version" in one_line_error(future)


def test_checkpoint_of_another_model_is_rejected_cleanly(tmp_path):
    _cfg, _m, _o, ckpt = model_and_ckpt()
    ckpt["config"]["model"]["norm"] = "gn"  # weights are BN weights
    path = C.save_checkpoint(ckpt, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        C.load_model_from_checkpoint(path)


def test_rng_capture_restore_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.randn()  # populate numpy's cached gaussian path
    state = C.capture_rng({"loader": gen})
    first = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(2, generator=gen),
             np.random.randn())
    # the state survives a weights_only save/load
    C.save_checkpoint({**model_and_ckpt()[3], "rng": state}, tmp_path / "r.pt")
    state = C.load_checkpoint(tmp_path / "r.pt")["rng"]
    torch.rand(7), np.random.rand(7), random.random(), torch.rand(3, generator=gen)
    C.restore_rng(state, {"loader": gen})
    second = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(2, generator=gen),
              np.random.randn())
    assert torch.equal(first[0], second[0])
    assert np.array_equal(first[1], second[1])
    assert first[2] == second[2]
    assert torch.equal(first[3], second[3])
    assert first[4] == second[4]
