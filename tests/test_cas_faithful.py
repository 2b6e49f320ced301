"""CAS in the paper's setting: resnet_mini's default sites (the last stage's two blocks),
``aux_weight: 0`` = the plain recipe on the plain network, and the per-site statistics."""

from __future__ import annotations

import pytest
import torch

from advdefense.analysis.channels import cas_site_markdown, cas_site_stats
from advdefense.attacks import PGD, HeadsObjective
from advdefense.config import build_from_config, config_from_dict
from advdefense.data import dataset_info
from advdefense.defenses.cas import CASModel, CASModule, attach_cas, default_placement, disabled_by
from advdefense.errors import ConfigError
from advdefense.models import build_model
from advdefense.models.heads import forward_with_aux
from advdefense.training.trainer import Trainer


def _resnet_mini(seed=0):
    info = dataset_info("mnist5k")
    torch.manual_seed(seed)
    return build_model("resnet_mini", num_classes=10, in_channels=1, image_size=28,
                       mean=info.mean, std=info.std)


def test_resnet_mini_default_sites_are_the_last_stage_blocks():
    model = _resnet_mini()
    assert default_placement(model) == ["stages.2.0", "stages.2.1"]
    cas = attach_cas(model, default_placement(model), num_classes=10, input_shape=(1, 28, 28))
    assert [m.channels for m in cas.cas_modules()] == [64, 64]
    logits, aux = cas.forward_with_aux(torch.rand(3, 1, 28, 28))
    assert logits.shape == (3, 10) and [a.shape for a in aux] == [(3, 10), (3, 10)]


def _cfg(tmp_path, name, defense, recipe_args):
    return config_from_dict({
        "name": name, "seed": 1, "output_dir": str(tmp_path / name),
        "data": {"limit": 40, "batch_size": 20, "monitor_size": 0},
        "model": {"name": "smallcnn", "kwargs": {"width": 4}}, "defense": defense,
        "train": {"recipe": "standard", "epochs": 1, "recipe_args": recipe_args,
                  "optimizer": {"name": "adam", "lr": 1e-2, "weight_decay": 0.0}}})


def test_aux_weight_zero_trains_and_deploys_the_plain_network(tmp_path):
    """``aux_weight: 0`` with ``defense.cas`` is the plain recipe: no CAS site in training or at
    test time, the same weights as the run without ``defense.cas`` (the CAS sites used to stay,
    masking features with the true-class row in training and the predicted one at test)."""
    cas_def = {"cas": {"placement": "default"}}
    runs = {}
    for name, defense in (("cas0", cas_def), ("plain", {})):
        trainer = Trainer(_cfg(tmp_path, name, defense, {"aux_weight": 0.0}), device="cpu",
                          progress=False)
        trainer.fit()
        runs[name] = trainer.model
    assert not any(isinstance(m, CASModule) for m in runs["cas0"].modules())
    a, b = runs["cas0"].state_dict(), runs["plain"].state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    from advdefense.training.checkpoint import load_model_from_checkpoint

    model, _ = load_model_from_checkpoint(tmp_path / "cas0" / "last.pt")
    assert not isinstance(model, CASModel)
    # a positive weight, or none at all (the model asks for beta = 2), keeps CAS
    assert isinstance(build_from_config(_cfg(tmp_path, "x", cas_def, {"aux_weight": 2.0}))[0],
                      CASModel)
    assert isinstance(build_from_config(_cfg(tmp_path, "x", cas_def, {}))[0], CASModel)
    assert disabled_by({"aux_weight": 0}) and not disabled_by({}) and not disabled_by(None)
    with pytest.raises(ConfigError, match="unknown defense.cas option"):
        build_from_config(_cfg(tmp_path, "x", {"cas": {"beta": 2}}, {"aux_weight": 0.0}))


def test_site_stats_on_an_untrained_network():
    model = attach_cas(_resnet_mini(), ["stages.2.0", "stages.2.1"], num_classes=10,
                       input_shape=(1, 28, 28)).eval()
    torch.manual_seed(0)
    x, y = torch.rand(12, 1, 28, 28), torch.randint(0, 10, (12,))
    attack = PGD(eps=0.1, steps=2, step_size=0.05, seed=0,
                 loss=HeadsObjective("ce", aux_weight=2.0))
    stats = cas_site_stats(model, x, y, attack=attack, batch_size=5)
    assert [s["site"] for s in stats["sites"]] == ["stages.2.0", "stages.2.1"]
    with torch.no_grad():
        logits, aux = forward_with_aux(model, x)
    main = logits.argmax(1)
    first = stats["sites"][0]["clean"]
    assert first["accuracy"] == pytest.approx(float((aux[0].argmax(1) == y).float().mean()))
    assert first["agrees_with_main"] == pytest.approx(
        float((aux[0].argmax(1) == main).float().mean()))
    assert stats["main_accuracy"]["clean"] == pytest.approx(float((main == y).float().mean()))
    for s in stats["sites"]:
        for kind in ("clean", "adversarial"):
            assert 0.0 <= s[kind]["accuracy"] <= 1.0 and 0.0 <= s[kind]["agrees_with_main"] <= 1
    table = cas_site_markdown(stats)
    assert "stages.2.0" in table and "adversarial" in table
    assert not model.training  # modes restored
    # a model without heads has no sites
    plain = cas_site_stats(_resnet_mini().eval(), x, y)
    assert plain["sites"] == [] and "adversarial" not in plain["main_accuracy"]
