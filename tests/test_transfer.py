"""Transferability matrix across normalization types and between RNA paths."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from advdefense.analysis.transfer import (
    FixedPath,
    plot_transfer,
    rna_path_models,
    train_norm_models,
    transfer_matrix,
)
from advdefense.attacks import PGD
from advdefense.cli import main
from advdefense.defenses import rna
from advdefense.errors import AdvDefenseError

from .conftest import make_smallcnn


@pytest.fixture(scope="module")
def norm_models(mnist_train):
    x, y = mnist_train
    return train_norm_models(["bn", "ln"], x[:2000], y[:2000], epochs=1, seed=0)


def test_white_box_success_exceeds_transfer_success(norm_models, mnist_test):
    x, y = mnist_test
    x, y = x[:200], y[:200]
    res = transfer_matrix(list(norm_models.values()), x, y,
                          attack=PGD(eps=0.15, steps=10, seed=0), labels=list(norm_models))
    assert res.labels == ["bn", "ln"]
    assert all(a > 0.8 for a in res.clean_accuracy), res.clean_accuracy
    assert res.diagonal_mean() > res.off_diagonal_mean(), res.success
    for i in range(2):
        assert res.success[i][i] > max(res.success[i][j] for j in range(2) if j != i)


def test_cells_use_examples_both_models_classify_correctly(norm_models, mnist_test):
    x, y = mnist_test
    x, y = x[:100], y[:100]
    bn = norm_models["bn"]
    twin = copy.deepcopy(bn)
    models = [bn, twin, norm_models["ln"]]
    res = transfer_matrix(models, x, y, attack=PGD(eps=0.15, steps=5, seed=0))
    with torch.no_grad():
        ok = [(m(x).argmax(1) == y) for m in models]
    for i in range(3):
        for j in range(3):
            assert res.counts[i][j] == int((ok[i] & ok[j]).sum())
    # an identical copy is fooled exactly as often as the attacked model itself
    assert res.success[0][1] == pytest.approx(res.success[0][0])
    assert res.success[1][0] == pytest.approx(res.success[1][1])
    md = res.to_markdown("t")
    assert "| source \\ target |" in md and md.count("\n|") >= 4


def test_rna_paths_are_fixed_and_labelled():
    model = rna.convert(make_smallcnn(seed=0), space="bn,in").eval()
    paths, labels = rna_path_models(model, random_paths=2, seed=0)
    assert labels[:2] == ["all-bn", "all-in"] and len(labels) == len(set(labels)) == 4
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        for p in paths:
            torch.testing.assert_close(p(x), p(x))
        assert not torch.allclose(paths[0](x), paths[1](x))
    fp = FixedPath(model, "in")
    with torch.no_grad(), rna.set_path(model, "in"):
        ref = model(x)
    torch.testing.assert_close(fp(x), ref)


def test_unknown_norm_is_rejected():
    with pytest.raises(AdvDefenseError, match="unknown normalization type"):
        train_norm_models(["bn", "batch"], torch.rand(4, 1, 28, 28), torch.zeros(4).long())


def test_plot_and_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "tr"
    code = main(["analyze", "transfer", "--norms", "bn,ln", "--epochs", "1",
                 "--train-limit", "300", "--examples", "40", "--steps", "3",
                 "--random-paths", "1", "--eps", "0.2", "--output", str(out)])
    assert code == 0
    data = json.loads((out / "transfer.json").read_text())
    assert set(data) == {"norms", "rna_paths"}
    assert data["norms"]["labels"] == ["bn", "ln"]
    assert len(data["rna_paths"]["labels"]) == 3
    for name in ("transfer_norms.png", "transfer_rna_paths.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Paths of one RNA model" in (out / "transfer.md").read_text()
    assert main(["analyze", "transfer", "--norms", "bn,xx", "--output", str(out)]) == 2
    assert "unknown normalization type" in capsys.readouterr().err


def test_plot_transfer_handles_nan(tmp_path):
    from advdefense.analysis.transfer import TransferResult

    res = TransferResult(["a", "b"], [[1.0, float("nan")], [0.2, 0.9]], [[3, 0], [3, 3]],
                         [1.0, 1.0], attack="pgd", eps=0.1, n_examples=3)
    path = plot_transfer(res, tmp_path / "h.png")
    assert path.stat().st_size > 1000
