"""``advdefense evaluate``: writes the three report files; bad input is one line, exit 2."""

from __future__ import annotations

import json

import torch

from advdefense.cli import main
from advdefense.config import build_from_config, config_from_dict, to_dict
from advdefense.training.checkpoint import make_checkpoint, save_checkpoint


def _checkpoint(tmp_path):
    cfg = config_from_dict({"name": "eval_cli", "data": {"name": "digits"},
                            "model": {"name": "smallcnn"}})
    torch.manual_seed(0)
    model, _ = build_from_config(cfg)
    path = tmp_path / "model.pt"
    save_checkpoint(make_checkpoint(config=to_dict(cfg), model=model), path)
    return path


def test_evaluate_cli_writes_reports(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the report records paths relative to the working folder
    ckpt = _checkpoint(tmp_path)
    out = tmp_path / "eval"
    rc = main(["evaluate", "--checkpoint", str(ckpt), "--attacks", "fgsm,pgd", "--eps", "0.1",
               "--eps-sweep", "0.05,0.1", "--n", "16", "--steps", "3", "--output", str(out),
               "--no-progress"])
    assert rc == 0
    for name in ("report.json", "report.md", "accuracy_vs_eps.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    report = json.loads((out / "report.json").read_text())
    assert report["n"] == 16 and len(report["per_example"]["clean"]["all"]) == 16
    assert {r["label"] for r in report["accuracies"]} >= {"clean", "fgsm/fresh", "pgd/fresh",
                                                           "worst"}
    assert set(report["sweep"]) == {"0.05", "0.1"}
    assert report["checks"] and report["versions"]["torch"]
    assert report["checkpoint"] == "model.pt" and report["command"]["output"] == "eval"
    assert str(tmp_path) not in (out / "report.json").read_text()
    printed = capsys.readouterr().out
    assert "| attack | protocol | accuracy [95% CI]" in printed and "[pass]" in printed


def test_evaluate_cli_errors_are_one_line(tmp_path, capsys):
    rc = main(["evaluate", "--checkpoint", str(tmp_path / "missing.pt")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "not found" in err
    ckpt = _checkpoint(tmp_path)
    for bad in (["--attacks", "nope"], ["--eps", "-0.1"], ["--protocols", "fresh,bogus"]):
        rc = main(["evaluate", "--checkpoint", str(ckpt), *bad])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("advdefense: error:")


def test_evaluation_is_reproduced_from_its_config_file(tmp_path, capsys, monkeypatch):
    """An evaluation config file supplies every option not given on the command line; the
    report writes the resolved section, and running from it gives the same per-example
    results. A bad file is one line, exit 2."""
    import yaml

    monkeypatch.chdir(tmp_path)
    ckpt = _checkpoint(tmp_path)
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(
        {"eval": {"attacks": ["fgsm", "pgd"], "eps": 0.1, "n": 12, "steps": 2,
                  "checks": False}}))
    rc = main(["evaluate", "--checkpoint", str(ckpt), "--config", "eval.yaml", "--output",
               "first", "--no-progress", "--seed", "4"])
    assert rc == 0
    first = json.loads((tmp_path / "first" / "report.json").read_text())
    resolved = yaml.safe_load((tmp_path / "first" / "eval_config.yaml").read_text())["eval"]
    assert resolved["attacks"] == ["fgsm", "pgd"] and resolved["n"] == 12
    assert resolved["seed"] == 4 and resolved["eps"] == 0.1 and resolved["checks"] is False
    assert first["eps_source"] == "evaluation config" and first["n"] == 12
    assert first["checks"] == []
    rc = main(["evaluate", "--checkpoint", str(ckpt), "--config", "first/eval_config.yaml",
               "--output", "second", "--no-progress"])
    assert rc == 0
    second = json.loads((tmp_path / "second" / "report.json").read_text())
    for key in ("clean", "worst"):
        assert second["per_example"][key] == first["per_example"][key]
    for label, entry in first["per_example"]["attacks"].items():
        assert second["per_example"]["attacks"][label]["correct"] == entry["correct"]
        assert second["per_example"]["attacks"][label]["attack"] == entry["attack"]
    (tmp_path / "bad.yaml").write_text("eval: {suite: nonsense}\n")
    capsys.readouterr()
    rc = main(["evaluate", "--checkpoint", str(ckpt), "--config", "bad.yaml", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "eval.suite" in err[0]
