"""The model zoo on tiny stand-in entries (width-4 smallcnn, 40 mnist5k images, one epoch):
entries copied as they finish, reused on a fresh output folder without training or
evaluation, loaded by name, listed; compact weights only where predictions survive."""

from __future__ import annotations

import json

import pytest
import torch

from advdefense import presets
from advdefense.cli import main
from advdefense.reproduction import Plan, run_plans
from advdefense.zoo import RESULT, WEIGHTS, Zoo, compact_state, list_entries, resolve_name

pytestmark = pytest.mark.usefixtures("one_thread")


class _Eval:
    """A cheap evaluator with a description: clean + FGSM, one verdict; counts its calls."""

    calls = 0

    def __init__(self, version: int = 1) -> None:
        self.version = version

    def describe(self, plan):
        return {"kind": "tiny", "version": self.version}

    def __call__(self, model, x, y, plan):
        from advdefense.attacks import build_attack
        from advdefense.evaluation.harness import AttackSpec, evaluate
        from advdefense.reproduction import table_from_result

        type(self).calls += 1
        res = evaluate(model, (x, y), [AttackSpec("fgsm", build_attack("fgsm", eps=0.3))],
                       checks=False)
        verdict = presets.verdict_record(plan.key, res.worst.all, res.worst.all,
                                         paper_label="fgsm", checks=[], adaptive=["fgsm"])
        return {"tables": [table_from_result(res, title="fgsm")], "checks": [],
                "verdicts": [verdict]}


def tiny_plans(version: int = 1, lr: float = 1e-3) -> list[Plan]:
    """Two entries of a stand-in preset (module level, so worker processes can rebuild it)."""
    plans = []
    for key, seed in (("a", 0), ("b", 0)):
        cfg = presets.mnist5k_config(key, epochs=1, seed=seed, limit=40, monitor_size=0, lr=lr)
        cfg["model"]["kwargs"] = {"width": 4}
        plans.append(Plan(key, key, cfg, _Eval(version),
                          extra={"group": key, "seed": seed, "eps": 0.3}))
    return plans


def _run(plans, out, zoo):
    return run_plans(plans, out, title="t", command="test", seed=0, n_eval=16, zoo=zoo)


@pytest.fixture
def no_training(monkeypatch):
    from advdefense.training import trainer

    def refuse(self, resume=False):
        raise AssertionError("trained although the zoo holds the entry")

    monkeypatch.setattr(trainer.Trainer, "fit", refuse)


def test_entries_go_to_the_zoo_and_a_fresh_run_reuses_them(tmp_path, monkeypatch):
    zoo = Zoo(tmp_path / "zoo", "tiny")
    _Eval.calls = 0
    _run(tiny_plans(), tmp_path / "runs1", zoo)
    assert _Eval.calls == 2
    folder = tmp_path / "zoo" / "tiny" / "a-s0"
    assert {p.name for p in folder.iterdir()} == {WEIGHTS, RESULT, "config.yaml"}
    record = json.loads((folder / RESULT).read_text())
    assert record["zoo"]["dtype"] in ("float16", "float32") and record["verdicts"]
    assert "output_dir: runs/reproduce_tiny/a" in (folder / "config.yaml").read_text()
    first = json.loads((tmp_path / "runs1" / "report.json").read_text())["sections"]

    # a fresh clone: an empty output folder, no training, no evaluation
    from advdefense.training import trainer

    monkeypatch.setattr(trainer.Trainer, "fit", lambda *a, **k: pytest.fail("trained"))
    _run(tiny_plans(), tmp_path / "runs2", zoo)
    assert _Eval.calls == 2
    again = json.loads((tmp_path / "runs2" / "report.json").read_text())["sections"]
    assert [s["verdicts"] for s in again] == [s["verdicts"] for s in first]
    assert [s["training"] for s in again] == [s["training"] for s in first]

    # a changed evaluation runs again on the zoo's weights (still no training) and updates
    # the record; a changed config trains again
    _run(tiny_plans(version=2), tmp_path / "runs3", zoo)
    assert _Eval.calls == 4
    assert json.loads((folder / RESULT).read_text())["evaluation"]["version"] == 2
    monkeypatch.undo()
    _run(tiny_plans(version=2, lr=2e-3)[:1], tmp_path / "runs4", zoo)
    assert (tmp_path / "runs4" / "a" / "last.pt").exists() and _Eval.calls == 5


def test_a_stopped_run_continues_from_the_zoo_and_a_torn_entry_is_ignored(tmp_path,
                                                                          monkeypatch):
    zoo = Zoo(tmp_path / "zoo", "tiny")
    _run(tiny_plans()[:1], tmp_path / "stopped", zoo)  # only entry "a" finished
    weights = tmp_path / "zoo" / "tiny" / "a-s0" / WEIGHTS
    assert zoo.find("a", 0, "x") is None  # another config digest
    _Eval.calls = 0
    trained = []
    from advdefense.training import trainer

    real = trainer.Trainer.fit

    def spy(self, resume=False):
        trained.append(self.cfg.name)
        return real(self, resume)

    monkeypatch.setattr(trainer.Trainer, "fit", spy)
    _run(tiny_plans(), tmp_path / "fresh", zoo)
    assert trained == ["b"] and _Eval.calls == 1
    weights.write_bytes(weights.read_bytes() + b"x")  # no longer the recorded weights
    _run(tiny_plans(), tmp_path / "fresh2", zoo)
    assert trained == ["b", "a"]


def test_read_only_zoo_is_not_written(tmp_path):
    _run(tiny_plans()[:1], tmp_path / "runs", Zoo(tmp_path / "zoo", "tiny", write=False))
    assert not (tmp_path / "zoo").exists()


def test_zoo_names_load_list_and_evaluate(tmp_path, monkeypatch, capsys):
    _run(tiny_plans(), tmp_path / "runs", Zoo(tmp_path / "zoo", "tiny"))
    monkeypatch.setenv("ADVDEFENSE_ZOO", str(tmp_path / "zoo"))
    monkeypatch.chdir(tmp_path)
    from advdefense.loading import open_model

    loaded = open_model("zoo:tiny/a-s0")  # the Python API
    assert loaded.kind == "checkpoint" and loaded.source["model"] == "zoo:tiny/a-s0"
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    assert open_model(checkpoint="zoo:tiny/b-s0").config.name == "b"
    assert resolve_name("zoo:tiny/a-s0") == tmp_path / "zoo" / "tiny" / "a-s0" / WEIGHTS
    assert main(["evaluate", "--checkpoint", "zoo:tiny/a-s0", "--attacks", "fgsm", "--n", "8",
                 "--no-checks", "--no-progress"]) == 0
    assert (tmp_path / "runs" / "zoo" / "tiny" / "a-s0" / "evaluate" / "report.json").exists()
    assert not (tmp_path / "zoo" / "tiny" / "a-s0" / "eval").exists()
    assert main(["evaluate", "--model", "zoo:tiny/b-s0", "--attacks", "fgsm", "--n", "8",
                 "--no-checks", "--no-progress"]) == 0
    assert (tmp_path / "runs" / "zoo" / "tiny" / "b-s0" / "evaluate" / "report.json").exists()
    capsys.readouterr()
    assert main(["zoo"]) == 0
    out = capsys.readouterr().out
    assert "zoo:tiny/a-s0" in out and "zoo:tiny/b-s0" in out and "clean %" in out
    assert main(["zoo", "list", "--json", "--preset", "tiny"]) == 0
    rows = json.loads(capsys.readouterr().out)["entries"]
    assert [r["entry"] for r in rows] == ["a-s0", "b-s0"] and rows[0]["n"] == 16
    assert 0 <= rows[0]["verdicts"][0]["worst"] <= rows[0]["clean"] <= 1
    assert main(["evaluate", "--checkpoint", "zoo:tiny/nope-s0", "--attacks", "fgsm"]) == 2
    err = capsys.readouterr().err
    assert "zoo:tiny/a-s0" in err and err.count("\n") == 1
    assert main(["zoo", "--preset", "other"]) == 0
    assert "no entries" in capsys.readouterr().out


class _Tie(torch.nn.Module):
    """Two logits that only float32 tells apart."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, 1.0 + 1e-4]))

    def forward(self, x):
        return x.flatten(1).sum(1, keepdim=True) * self.w


def test_weights_are_float16_only_where_no_prediction_changes():
    from tests.conftest import make_smallcnn

    state, check = compact_state(make_smallcnn(width=4).eval(), torch.rand(8, 1, 28, 28))
    assert check["dtype"] == "float16" and check["identical_predictions"]
    assert {v.dtype for v in state.values()} <= {torch.float16, torch.int64}
    state, check = compact_state(_Tie(), torch.ones(4, 3))
    assert check["dtype"] == "float32" and not check["identical_predictions"]
    assert state["w"].dtype == torch.float32


def test_reproduce_command_fills_the_zoo_and_a_fresh_clone_reuses_it(tmp_path, monkeypatch,
                                                                     capsys):
    monkeypatch.setattr(presets, "build_plans", lambda *a, **k: tiny_plans())
    args = ["reproduce", "--preset", "cifar10-jpeg-quick", "--zoo", str(tmp_path / "zoo"),
            "--no-progress", "--n", "16"]
    # a run with another --n only reads the zoo
    assert main(args + ["--output", str(tmp_path / "r0")]) == 0
    assert not list_entries(tmp_path / "zoo")
    monkeypatch.setitem(presets.PRESETS["cifar10-jpeg-quick"], "n", 16)
    assert main(args + ["--output", str(tmp_path / "r1")]) == 0
    assert [e.entry for e in list_entries(tmp_path / "zoo")] == ["a-s0", "b-s0"]
    from advdefense.training import trainer

    monkeypatch.setattr(trainer.Trainer, "fit", lambda *a, **k: pytest.fail("trained"))
    _Eval.calls = 0
    assert main(args + ["--output", str(tmp_path / "r2")]) == 0
    assert _Eval.calls == 0 and "CIFAR-10 (JPEG copy)" in capsys.readouterr().out
