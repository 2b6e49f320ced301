"""Evaluate anyone's model from the command line: a model in a ``.py`` file outside the
package and a RobustBench-layout checkpoint, with the ``standard`` and ``rand`` suites; the
RobustBench fields of the report; saved adversarial examples that re-verify (and transfer);
eps/norm/dataset defaults with their sources; ``--device``; one clear line (exit 2, nothing
written) for every kind of bad input."""

from __future__ import annotations

import json
import pickle
import re
import textwrap

import numpy as np
import pytest
import torch

from advdefense.cli import main
from advdefense.data import as_tensors, load_split

USER_MODELS = """
    import torch
    from torch import nn

    import advdefense as ad


    class Linear(nn.Module):
        def __init__(self, side=8, classes=10):
            super().__init__()
            self.fc = nn.Linear(side * side, classes)

        def forward(self, x):
            return self.fc(x.flatten(1))


    class Noise(ad.StochasticModule):
        def __init__(self, sigma):
            super().__init__()
            self.sigma = sigma

        def sample_state(self, x, groups):
            return torch.randn_like(x)

        def forward_with_state(self, x, state):
            return x + self.sigma * state


    def noisy(sigma=0.05):
        return nn.Sequential(Noise(sigma), Linear())


    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.fc = nn.Linear(4, 10)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


    class FlatOutput(Linear):
        def forward(self, x):
            return super().forward(x).flatten()
    """


@pytest.fixture(scope="module")
def centroids():
    """A nearest-class-mean linear classifier of the digits (about 90% clean, no training)."""
    x, y = as_tensors(load_split("digits", "train"))
    means = torch.stack([x[y == c].flatten(1).mean(0) for c in range(10)])
    return {"fc.weight": means, "fc.bias": -0.5 * (means ** 2).sum(1)}


@pytest.fixture()
def user(tmp_path, centroids):
    """``user_models.py`` in a folder of its own, and weights saved DataParallel-style."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    (folder / "user_models.py").write_text(textwrap.dedent(USER_MODELS))
    torch.save({"state_dict": {f"module.{k}": v for k, v in centroids.items()}, "epoch": 9},
               folder / "linear.pt")
    torch.save({f"1.{k}": v for k, v in centroids.items()}, folder / "noisy.pt")
    return folder


def _run(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _error(argv, capsys) -> str:
    rc, _, err = _run(argv, capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("advdefense: error:"), err
    return lines[0]


def test_py_file_model_standard_suite_saved_examples_reverify_and_transfer(user, tmp_path,
                                                                            capsys):
    out, adv = tmp_path / "eval", tmp_path / "adv" / "digits_adv.pt"
    rc, printed, _ = _run(["evaluate", "--model", f"{user}/user_models.py:Linear",
                           "--weights", str(user / "linear.pt"), "--dataset", "digits",
                           "--suite", "standard", "--n", "16", "--save-adv", str(adv),
                           "--output", str(out), "--no-checks", "--no-progress"], capsys)
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    rb = report["robustbench"]
    assert rb["dataset"] == "digits" and rb["threat_model"] == "Linf" and rb["eps"] == 0.3
    assert rb["n_examples"] == 16 and rb["clean_acc"] >= 75.0
    assert rb["autoattack_acc"] is not None and rb["autoattack_acc"] < rb["clean_acc"]
    assert rb["autoattack_acc_source"] == "advdefense standard suite (reimplementation)"
    assert set(rb["attacks"]) == {"apgd-ce", "apgd-t", "fab-t", "square"}
    assert report["eps_source"] == "dataset default" and report["norm_source"] == "dataset default"
    assert report["model"]["kind"] == "factory"
    # the saved file: plain tensors and strings, loadable with weights_only=True
    saved = torch.load(adv, weights_only=True)
    assert saved["x_adv"].shape == (16, 1, 8, 8) and saved["indices"].tolist() == list(range(16))
    assert saved["dataset"] == "digits" and saved["split"] == "test" and saved["norm"] == "linf"
    x, y = as_tensors(load_split("digits", "test", limit=16))
    assert torch.equal(saved["y"], y)
    assert float((saved["x_adv"] - x).abs().max()) <= 0.3 + 1e-6
    assert set(saved["source"]) <= {"clean", "apgd-ce", "apgd-t", "fab-t", "square"}
    assert "apgd-ce" in saved["source"]
    # re-verified on the same model: exactly the worst-case accuracy of the report
    worst = next(r for r in report["accuracies"] if r["label"] == "worst")["all"]
    rc, printed, _ = _run(["evaluate", "--model", f"{user}/user_models.py:Linear",
                           "--weights", str(user / "linear.pt"), "--adv-file", str(adv),
                           "--output", str(tmp_path / "check")], capsys)
    assert rc == 0
    check = json.loads((tmp_path / "check" / "adv_check.json").read_text())
    assert check["accuracy"]["correct"] == worst["correct"] and check["dataset"] == "digits"
    assert re.search(r"accuracy on the adversarial examples \d+\.\d% \[", printed)
    # a transfer evaluation: the same examples on another (stochastic) model
    rc, printed, _ = _run(["evaluate", "--model", f"{user}/user_models.py:noisy",
                           "--weights", str(user / "noisy.pt"), "--adv-file", str(adv),
                           "--repeats", "3"], capsys)
    assert rc == 0 and "all 3 stochastic predictions correct" in printed


@pytest.mark.parametrize("factory,weights", [("Linear", "linear.pt"), ("noisy", "noisy.pt")])
def test_attacks_and_protocols_save_worst_case_inputs(user, tmp_path, capsys, factory, weights):
    """``--attacks`` under two protocols (one attack object shared by both): the kept input
    of every example is the first one that broke it; deterministic re-check = worst case."""
    out, adv = tmp_path / "eval", tmp_path / "adv.pt"
    rc, _, _ = _run(["evaluate", "--model", f"{user}/user_models.py:{factory}", "--weights",
                     str(user / weights), "--dataset", "digits", "--attacks", "fgsm,pgd",
                     "--protocols", "fresh,paper", "--steps", "3", "--eps", "0.1",
                     "--eps-sweep", "0.05", "--repeats", "2", "--eot", "2", "--n", "12",
                     "--save-adv", str(adv), "--output", str(out), "--no-checks",
                     "--no-progress"], capsys)
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    saved = torch.load(adv, weights_only=True)
    x, _ = as_tensors(load_split("digits", "test", limit=12))
    assert float((saved["x_adv"] - x).abs().max()) <= 0.1 + 1e-6 and saved["eps"] == 0.1
    labels = {"fgsm/fresh", "pgd/fresh", "fgsm/paper", "pgd/paper"}
    assert set(saved["source"]) <= labels | {"clean"} and set(saved["source"]) & labels
    worst = report["per_example"]["worst"]["all"]
    clean = report["per_example"]["clean"]["all"]
    for i, src in enumerate(saved["source"]):  # broken examples name an attack; others clean
        assert (src == "clean") == (worst[i] or not clean[i])
        if src == "clean":
            assert torch.equal(saved["x_adv"][i], x[i])
    if factory == "Linear":
        assert report["robustbench"]["autoattack_acc"] is None
        rc, _, _ = _run(["evaluate", "--model", f"{user}/user_models.py:Linear", "--weights",
                         str(user / weights), "--adv-file", str(adv), "--output",
                         str(tmp_path / "check")], capsys)
        check = json.loads((tmp_path / "check" / "adv_check.json").read_text())
        assert check["per_example_correct"] == worst


def test_stochastic_py_model_rand_suite(user, tmp_path, capsys):
    out = tmp_path / "rand"
    rc, _, _ = _run(["evaluate", "--model", f"{user}/user_models.py:noisy", "--model-args",
                     '{"sigma": 0.05}', "--weights", str(user / "noisy.pt"), "--dataset",
                     "digits", "--suite", "rand", "--eot", "2", "--repeats", "2", "--n", "8",
                     "--output", str(out), "--no-checks", "--no-progress"], capsys)
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["stochastic"] and report["repeats"] == 2
    rb = report["robustbench"]
    assert rb["autoattack_acc"] is None and rb["autoattack_acc_source"] is None
    assert rb["number_forward_passes"] == 2 and rb["clean_acc"] is not None
    assert set(rb["attacks"]) == {"apgd-ce+eot", "apgd-dlr+eot", "square+eot", "apgd-ce@frozen"}


def _fake_cifar10(root, n=8):
    """The CIFAR-10 python test batch format, random pixels (no download here)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                     "labels": rng.integers(0, 10, n).tolist()}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)


def test_robustbench_checkpoint_standard_suite(tmp_path, capsys, monkeypatch):
    import torchvision.datasets.cifar as cifar

    from tests.test_loading import RBWideResNet

    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)
    _fake_cifar10(tmp_path / "data")
    torch.manual_seed(0)
    rb = RBWideResNet(depth=10, widen=1).eval()
    torch.save({"state_dict": {f"module.{k}": v for k, v in rb.state_dict().items()}},
               tmp_path / "Someone2024.pt")
    out = tmp_path / "rb_eval"
    rc, printed, _ = _run(["evaluate", "--model", "robustbench:wrn-10-1", "--weights",
                           str(tmp_path / "Someone2024.pt"), "--dataset", "cifar10",
                           "--data-root", str(tmp_path / "data"), "--suite", "standard",
                           "--eps", "0.5", "--n", "8", "--output", str(out), "--no-checks",
                           "--no-progress", "--device", "cpu"], capsys)
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    rb_fields = report["robustbench"]
    assert rb_fields["dataset"] == "cifar10" and rb_fields["n_examples"] == 8
    assert rb_fields["autoattack_acc"] is not None and report["eps_source"] == "command line"
    assert report["model"]["kind"] == "robustbench"
    # clean accuracy is that of their own forward pass on the same images
    x, y = as_tensors(load_split("cifar10", "test", root=tmp_path / "data"))
    with torch.no_grad():
        expected = 100 * float((rb(x).argmax(1) == y).float().mean())
    assert rb_fields["clean_acc"] == pytest.approx(expected)


def test_eps_norm_dataset_defaults_and_their_sources(tmp_path, capsys):
    from advdefense.commands.evaluate import resolve_budget
    from advdefense.config import build_from_config, config_from_dict, to_dict
    from advdefense.training.checkpoint import make_checkpoint, save_checkpoint

    assert resolve_budget(None, None, None, "cifar10") == (
        pytest.approx(8 / 255), "linf", {"eps_source": "dataset default",
                                         "norm_source": "dataset default"})
    assert resolve_budget(None, "l2", None, "svhn")[0] == 0.5
    assert resolve_budget(None, None, None, "mnist5k")[0] == 0.3
    assert resolve_budget(0.1, None, None, "cifar10")[:2] == (0.1, "linf")
    # a PGD-AT checkpoint trained at eps 0.1: evaluate takes its eps (the old default was 0.3)
    cfg = config_from_dict({"name": "at", "data": {"name": "digits"},
                            "train": {"recipe": "pgd_at", "attack": {"eps": 0.1}}})
    torch.manual_seed(0)
    model, _ = build_from_config(cfg)
    save_checkpoint(make_checkpoint(config=to_dict(cfg), model=model), tmp_path / "last.pt")
    rc, printed, _ = _run(["evaluate", "--checkpoint", str(tmp_path / "last.pt"), "--attacks",
                           "fgsm", "--n", "8", "--no-checks", "--no-progress",
                           "--device", "cpu"], capsys)
    assert rc == 0 and "eps 0.1 (checkpoint config)" in printed
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["eps"] == 0.1 and report["eps_source"] == "checkpoint config"
    assert report["dataset"] == "digits" and report["dataset_source"] == "checkpoint config"
    assert report["config"]["specs"][0]["eps"] == 0.1
    assert report["robustbench"]["autoattack_acc"] is None  # no standard suite ran


def test_device_option_on_every_command(capsys):
    if not torch.cuda.is_available():
        for cmd in (["evaluate", "--model", "x:y", "--dataset", "digits"],
                    ["certify", "--model", "x:y", "--sigma", "0.25"],
                    ["analyze", "channels", "--model", "x:y", "--layer", "a", "--class", "1",
                     "--eps", "0.1", "--output", "unused"],
                    ["analyze", "smoothing", "--model", "x:y"],
                    ["reproduce", "--only", "nothing"]):
            assert "CUDA is not available" in _error([*cmd, "--device", "cuda"], capsys)
    assert "unknown device" in _error(["reproduce", "--device", "tpu9"], capsys)
    assert "--device must be cpu" in _error(["analyze", "transfer", "--device", "meta",
                                             "--output", "unused"], capsys)


# ---------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing written


def _nothing_written(tmp_path, *names):
    for name in names:
        assert not (tmp_path / name).exists(), name


def test_factory_that_does_not_import_cli(tmp_path, capsys):
    (tmp_path / "broken.py").write_text("import no_such_package_xyz\n")
    line = _error(["evaluate", "--model", f"{tmp_path}/broken.py:build", "--dataset", "digits",
                   "--output", str(tmp_path / "out"), "--save-adv", str(tmp_path / "a.pt")],
                  capsys)
    assert "cannot import model file" in line and "no_such_package_xyz" in line
    line = _error(["evaluate", "--model", "no_such_module_xyz:build", "--dataset", "digits",
                   "--output", str(tmp_path / "out")], capsys)
    assert "cannot import module" in line
    _nothing_written(tmp_path, "out", "a.pt")


def test_weights_that_do_not_fit_cli(user, tmp_path, capsys):
    torch.save({"fc.weight": torch.zeros(10, 64), "head.bias": torch.zeros(10)},
               tmp_path / "bad.pt")
    line = _error(["evaluate", "--model", f"{user}/user_models.py:Linear", "--weights",
                   str(tmp_path / "bad.pt"), "--dataset", "digits", "--output",
                   str(tmp_path / "out")], capsys)
    assert "1 missing (fc.bias)" in line and "1 unexpected (head.bias)" in line
    line = _error(["certify", "--model", f"{user}/user_models.py:Linear", "--weights",
                   str(tmp_path / "bad.pt"), "--dataset", "digits", "--sigma", "0.25",
                   "--output", str(tmp_path / "out")], capsys)
    assert "do not fit the model" in line
    _nothing_written(tmp_path, "out")


def test_model_output_not_n_by_classes_cli(user, tmp_path, capsys):
    line = _error(["evaluate", "--model", f"{user}/user_models.py:FlatOutput", "--dataset",
                   "digits", "--output", str(tmp_path / "out"), "--save-adv",
                   str(tmp_path / "a.pt")], capsys)
    assert "must return logits (N, classes)" in line and "got shape (20,)" in line
    line = _error(["evaluate", "--model", f"{user}/user_models.py:Linear", "--dataset",
                   "mnist5k", "--output", str(tmp_path / "out")], capsys)
    assert "the model fails on mnist5k images of shape (2, 1, 28, 28)" in line
    assert "--dataset" in _error(["evaluate", "--model", f"{user}/user_models.py:Linear"],
                                 capsys)
    _nothing_written(tmp_path, "out", "a.pt")


def test_adversarial_file_for_other_data_cli(user, tmp_path, capsys):
    from advdefense.advfile import save_adversarial

    x, y = as_tensors(load_split("digits", "test", limit=6))
    common = dict(y=y, source=["clean"] * 6, indices=torch.arange(6), split="test", eps=0.1,
                  norm="linf")
    save_adversarial(tmp_path / "ok.pt", x_adv=x, dataset="digits", **common)
    model = ["--model", f"{user}/user_models.py:Linear", "--weights", str(user / "linear.pt")]
    out = ["--output", str(tmp_path / "out")]
    line = _error(["evaluate", *model, "--dataset", "mnist5k", "--adv-file",
                   str(tmp_path / "ok.pt"), *out], capsys)
    assert "made for digits" in line and "mnist5k" in line
    save_adversarial(tmp_path / "shape.pt", x_adv=x, dataset="mnist5k", **common)
    line = _error(["evaluate", *model, "--adv-file", str(tmp_path / "shape.pt"), *out], capsys)
    assert "shape (1, 8, 8)" in line and "(1, 28, 28)" in line
    save_adversarial(tmp_path / "far.pt", x_adv=(x + 0.5).clamp(0, 1), dataset="digits",
                     **common)
    line = _error(["evaluate", *model, "--adv-file", str(tmp_path / "far.pt"), *out], capsys)
    assert "beyond the file's eps 0.1" in line
    save_adversarial(tmp_path / "labels.pt", x_adv=x, dataset="digits",
                     **{**common, "y": (y + 1) % 10})
    line = _error(["evaluate", *model, "--adv-file", str(tmp_path / "labels.pt"), *out],
                  capsys)
    assert "labels in the file differ" in line
    torch.save({"x": x}, tmp_path / "foreign.pt")
    line = _error(["evaluate", *model, "--adv-file", str(tmp_path / "foreign.pt"), *out],
                  capsys)
    assert "not an advdefense adversarial-example file" in line
    _nothing_written(tmp_path, "out")


# ---------------------------------------------------------------------------------------------
# certify and analyze take the same model options


def test_certify_and_analyze_channels_with_a_user_model(user, tmp_path, capsys):
    rc, printed, err = _run(["certify", "--model", f"{user}/user_models.py:Linear",
                             "--weights", str(user / "linear.pt"), "--dataset", "digits",
                             "--sigma", "0.25", "--n0", "4", "--n", "32", "--limit", "4",
                             "--batch", "2", "--output", str(tmp_path / "cert")], capsys)
    assert rc == 0 and "Certified accuracy of" in printed
    cert = json.loads((tmp_path / "cert" / "certify.json").read_text())
    assert cert["model"]["kind"] == "factory" and len(cert["per_example"]) == 4
    assert "certify" in err  # the tqdm bar
    rc, printed, _ = _run(["analyze", "channels", "--model", f"{user}/user_models.py:Conv",
                           "--dataset", "digits", "--layer", "conv", "--class", "3", "--eps",
                           "0.1", "--steps", "2", "--max-examples", "4", "--output",
                           str(tmp_path / "channels")], capsys)
    assert rc == 0 and (tmp_path / "channels" / "channels.json").is_file()
    assert "user_models.py:Conv: layer conv, class 3, 4 examples, 4 channels" in printed
