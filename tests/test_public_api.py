"""``import advdefense as ad``: the public names, a lazy root import, and the README's
"evaluate your model" block run exactly as written."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

import advdefense as ad

README = Path(__file__).resolve().parents[1] / "README.md"


def test_public_names():
    from advdefense.defenses import cas, noise, rna, smoothing
    from advdefense.evaluation import harness, suite

    assert ad.evaluate is harness.evaluate and ad.run_suite is suite.run_suite
    assert ad.rna.convert is rna.convert and ad.rna_convert is rna.convert
    assert ad.cas_attach is cas.attach_cas and ad.noise_inject is noise.inject
    assert ad.SmoothedClassifier is smoothing.SmoothedClassifier
    assert ad.certify is smoothing.certify
    assert issubclass(ad.StochasticModule, torch.nn.Module)
    for name in ("build_attack", "load_model", "load_split", "AttackSpec", "summary", "freeze",
                 "seeded", "EvalResult"):
        assert callable(getattr(ad, name)), name
    assert set(ad.__all__) <= set(dir(ad))


def test_root_import_and_cli_help_are_lazy():
    code = ("import sys, advdefense, advdefense.cli; advdefense.cli.build_parser(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={"PYTHONPATH": str(Path(ad.__file__).parents[1])})
    assert out.stdout.strip() == "False"


def _readme_block() -> str:
    text = README.read_text()
    section = text.split("## Evaluate your model", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_evaluate_your_model_block_runs(tmp_path, monkeypatch, capsys):
    """The block as written: a factory in ``my_models.py`` and weights ``net.pt`` (here a
    nearest-class-mean classifier of mnist5k digits, no training) in the working folder."""
    block = _readme_block()
    assert len(block.strip().splitlines()) == 5
    (tmp_path / "my_models.py").write_text(textwrap.dedent("""
        from torch import nn

        def Net():
            return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
        """))
    from advdefense.data import as_tensors

    x, y = as_tensors(ad.load_split("mnist5k", "train", limit=1000))
    means = torch.stack([x[y == c].flatten(1).mean(0) for c in range(10)])
    torch.save({"1.weight": means, "1.bias": -0.5 * (means ** 2).sum(1)}, tmp_path / "net.pt")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    result = namespace["result"]
    summary = result.summary()
    assert summary["n"] == 100 and summary["suite"] == "standard" and summary["eps"] == 0.3
    assert summary["clean"]["accuracy"] > 0.6
    assert summary["robust"]["accuracy"] <= summary["clean"]["accuracy"]
    low, high = summary["robust"]["ci95"]
    assert low <= summary["robust"]["accuracy"] <= high
    assert set(summary["per_attack"]) == {"apgd-ce", "apgd-t", "fab-t", "square"}
    assert "'robust'" in capsys.readouterr().out
