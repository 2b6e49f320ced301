"""Config loading, validation, overrides, every shipped YAML, and the train CLI on bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from advdefense.cli import main as cli_main
from advdefense.config import (
    ExperimentConfig,
    build_from_config,
    config_from_dict,
    load_config,
    save_config,
    to_dict,
)
from advdefense.data import dataset_info
from advdefense.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
ALL_CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_and_name_from_file(tmp_path):
    cfg = load_config(write(tmp_path, "seed: 3\n", "my_run.yaml"))
    assert cfg.name == "my_run"
    assert cfg.output_dir == str(Path("runs") / "my_run")
    assert cfg.seed == 3
    assert cfg.data.name == "mnist5k" and cfg.data.batch_size == 100
    assert cfg.data.monitor_size == 500 and cfg.data.limit is None
    assert cfg.model.name == "smallcnn" and cfg.model.norm == "bn"
    assert cfg.train.recipe == "standard" and cfg.train.amp is None
    assert cfg.defense == {} and cfg.eval.eps is None and cfg.eval.protocols == ["fresh"]


def test_overrides_are_parsed_as_yaml(tmp_path):
    path = write(tmp_path, "name: x\ntrain: {recipe: trades, epochs: 5}\n")
    cfg = load_config(path, ["train.epochs=2", "data.limit=50", "train.recipe_args.beta=2",
                             "train.optimizer.nesterov=true", "train.schedule.name=step",
                             "train.schedule.milestones=[1, 2]", "defense.rna={}",
                             "train.attack.step_size=null", "output_dir=/tmp/elsewhere"])
    assert cfg.train.epochs == 2 and isinstance(cfg.train.epochs, int)
    assert cfg.data.limit == 50
    assert cfg.train.recipe_args == {"beta": 2}
    assert cfg.train.optimizer.nesterov is True
    assert cfg.train.schedule.milestones == [1, 2]
    assert cfg.defense == {"rna": {}}
    assert cfg.train.attack.step_size is None
    assert cfg.output_dir == "/tmp/elsewhere"
    # ints are accepted where floats are expected and become floats
    cfg = load_config(path, ["train.optimizer.lr=1"])
    assert cfg.train.optimizer.lr == 1.0 and isinstance(cfg.train.optimizer.lr, float)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["trian.epochs=3"], "valid keys: name, seed, output_dir, data, model, defense, train"),
        (["train.optimizer.momentun=0.5"], "momentum"),
        (["data.batchsize=10"], "batch_size"),
        (["train.epochs=abc"], "train.epochs must be an integer"),
        (["train.epochs=0"], "train.epochs must be >= 1"),
        (["train.recipe=adversarial"], "choose one of: standard, pgd_at, trades, mart"),
        (["train.amp=fp8"], "train.amp"),
        (["data.name=imagenet"], "data.name"),
        (["train.optimizer=3"], "train.optimizer must be a mapping"),
        (["train.channels_last=yes please"], "train.channels_last"),
        (["train.schedule.milestones=[5, 2]"], "increasing"),
        (["noequals"], "key.path=value"),
        (["train.epochs=[1"], "not valid YAML"),
    ],
)
def test_bad_values_raise_one_line_config_error(tmp_path, overrides, fragment):
    path = write(tmp_path, "name: x\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    msg = str(info.value)
    assert fragment in msg
    assert "\n" not in msg


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = write(tmp_path, "train: {epochs: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_config(bad)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n", "list.yaml"))


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(CONFIG_DIR / "pgd_at_mnist5k.yaml", ["train.epochs=3"])
    out = save_config(cfg, tmp_path / "sub" / "config.yaml")
    again = load_config(out)
    assert to_dict(again) == to_dict(cfg)
    assert config_from_dict(to_dict(cfg)) == cfg
    assert yaml.safe_load(out.read_text())["train"]["epochs"] == 3


def test_config_from_dict_rejects_non_mapping():
    with pytest.raises(ConfigError):
        config_from_dict(["a"])  # type: ignore[arg-type]
    assert isinstance(config_from_dict(None), ExperimentConfig)


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=[p.stem for p in ALL_CONFIGS])
def test_every_shipped_config_validates_and_builds(path):
    """Every YAML in configs/ validates, its recipe builds, and its model runs one forward."""
    from advdefense.training.recipes import build_recipe, recipe_defaults

    cfg = load_config(path)
    assert cfg.name == path.stem
    torch.manual_seed(0)
    model, info = build_from_config(cfg)
    assert info == dataset_info(cfg.data.name)
    args = {**recipe_defaults(model), **cfg.train.recipe_args}
    build_recipe(cfg.train.recipe, cfg.train.attack, **args)
    model.eval()
    x = torch.rand(2, info.in_channels, info.image_size, info.image_size)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, info.num_classes)
    assert torch.isfinite(out).all()


def test_model_kwargs_errors_are_config_errors(tmp_path):
    cfg = load_config(write(tmp_path, "model: {kwargs: {nonsense: 1}}\n"))
    with pytest.raises(ConfigError, match="model.kwargs"):
        build_from_config(cfg)


def test_train_cli_bad_config_exits_2_with_one_line(tmp_path, capsys):
    path = write(tmp_path, "name: x\ntrain: {epochz: 3}\n")
    code = cli_main(["train", "--config", str(path), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "epochz" in err and "epochs" in err
    assert not (tmp_path / "out").exists()
    code = cli_main(["train", "--config", str(tmp_path / "missing.yaml")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "not found" in err
    code = cli_main(["train", "--config", str(path), "--set", "train.recipe_args.bogus=1",
                     "--set", "train.epochz=null"])
    assert code == 2
