"""CAS (Bai et al., ICLR 2021): the module, attachment, placements, loss composition, attacks."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from advdefense.attacks import PGD, HeadsObjective
from advdefense.data import dataset_info
from advdefense.defenses import apply_defenses
from advdefense.defenses.cas import CASModel, CASModule, apply, attach_cas, default_placement
from advdefense.errors import AdvDefenseError, ConfigError
from advdefense.models import build_model
from advdefense.models.heads import forward_with_aux

from .conftest import make_smallcnn


def make_disagreeing_cas(classes=7, channels=3):
    """A CAS module whose head predicts class 0 for positive features while labels differ."""
    cas = CASModule(channels, classes)
    with torch.no_grad():
        cas.fc.bias.zero_()
        w = torch.arange(classes * channels, dtype=torch.float32).view(classes, channels) / 10 - 1
        w[0] = 5.0  # class 0 dominates the head's prediction for positive features
        cas.fc.weight.copy_(w)
    return cas


def test_mask_uses_label_in_training_and_prediction_in_eval():
    cas = make_disagreeing_cas()
    f = torch.rand(4, 3, 2, 2) + 0.1
    y = torch.tensor([3, 6, 1, 2])
    w = cas.fc.weight.detach()
    cas.train()
    out, aux = cas(f, y)
    assert aux.shape == (4, 7)
    assert torch.equal(aux.argmax(1), torch.zeros(4, dtype=torch.long))  # prediction != label
    torch.testing.assert_close(out, f * w[y][:, :, None, None])
    assert cas.training
    cas.eval()
    out_eval, _ = cas(f, y)  # labels are ignored at evaluation
    torch.testing.assert_close(out_eval, f * w[0][None, :, None, None])
    assert not cas.training
    cas.train()
    out_nolabel, _ = cas(f)  # training without labels: predicted class
    torch.testing.assert_close(out_nolabel, f * w[0][None, :, None, None])


def test_nonnegative_mask_is_relu_of_the_row():
    cas = make_disagreeing_cas()
    cas.mask_kind = "nonnegative"
    f = torch.rand(2, 3, 2, 2)
    y = torch.tensor([1, 4])
    out, _ = cas.train()(f, y)
    torch.testing.assert_close(out, f * F.relu(cas.fc.weight.detach()[y])[:, :, None, None])
    assert bool((cas.fc.weight.detach()[y] < 0).any())  # the relu did something


def test_cas_on_vectors_and_bad_shapes():
    cas = CASModule(5, 3).eval()
    v = torch.randn(4, 5)
    out, aux = cas(v)
    torch.testing.assert_close(out, v * cas.fc.weight[cas.fc(v).argmax(1)])
    with pytest.raises(AdvDefenseError):
        cas(torch.randn(4, 6, 2, 2))
    with pytest.raises(AdvDefenseError):
        CASModule(5, 3, mask="sigmoid")


class Tiny(nn.Module):
    def __init__(self, classes=7):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(4, 3, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(3, classes)

    def forward(self, x):
        return self.head(self.body(x).mean(dim=(2, 3)))


def tiny_cas(classes=7, seed=0, places=("body.3",)):
    torch.manual_seed(seed)
    return attach_cas(Tiny(classes), list(places), num_classes=classes, input_shape=(1, 5, 5))


def test_attached_model_routes_labels_and_returns_main_logits():
    model = tiny_cas()
    site = model.model.body[3]
    cas = site.cas
    with torch.no_grad():
        cas.fc.weight.copy_(make_disagreeing_cas(7, 3).fc.weight)
        cas.fc.bias.zero_()
    x = torch.rand(4, 1, 5, 5)
    y = torch.tensor([3, 6, 1, 2])
    with torch.no_grad():
        f = site.module(model.model.body[2](model.model.body[1](model.model.body[0](x))))
    head = model.model.head
    w = cas.fc.weight.detach()
    for mode in (True, False):
        model.train(mode)
        logits, aux = model.forward_with_aux(x, y)
        assert logits.shape == (4, 7) and len(aux) == 1 and aux[0].shape == (4, 7)
        cls = y if mode else aux[0].argmax(1)
        expected = head((f * w[cls][:, :, None, None]).mean(dim=(2, 3)))
        torch.testing.assert_close(logits, expected)
        plain = model(x)
        assert torch.is_tensor(plain) and plain.shape == (4, 7)
        assert model.training == mode and all(m.training == mode for m in model.modules())
    # after the call the labels are gone: a plain train-mode forward uses the prediction
    model.train()
    _, aux = model.forward_with_aux(x, y)
    pred = aux[0].argmax(1)
    assert not torch.equal(pred, y)
    expected_pred = head((f * w[pred][:, :, None, None]).mean(dim=(2, 3)))
    torch.testing.assert_close(model(x), expected_pred)
    torch.testing.assert_close(forward_with_aux(model, x)[0], expected_pred)
    torch.testing.assert_close(forward_with_aux(model, x, y)[0], logits_with(model, x, y))


def logits_with(model, x, y):
    return model.forward_with_aux(x, y)[0]


def test_label_frames_are_per_thread_and_popped_on_error():
    model = tiny_cas().train()
    x = torch.rand(3, 1, 5, 5)
    with pytest.raises(AdvDefenseError):
        model.forward_with_aux(x, torch.tensor([1, 2]))  # wrong label shape
    from advdefense.defenses import cas as cas_mod

    assert cas_mod._frames() == []
    seen = {}

    def other():
        seen["frames"] = list(cas_mod._frames())

    with cas_mod._frame(frozenset({1}), torch.tensor([0])):
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert seen["frames"] == []


def test_aux_head_has_the_dataset_number_of_classes():
    model = tiny_cas(classes=7, places=("body.1", "body.3"))
    logits, aux = model.train().forward_with_aux(torch.rand(2, 1, 5, 5), torch.tensor([6, 5]))
    assert [a.shape for a in aux] == [(2, 7), (2, 7)]
    assert [m.channels for m in model.cas_modules()] == [4, 3]
    assert all(m.fc.out_features == 7 for m in model.cas_modules())


def test_main_loss_gradient_reaches_the_aux_head_weights():
    model = tiny_cas().train()
    x, y = torch.rand(4, 1, 5, 5), torch.tensor([0, 1, 2, 3])
    logits, _aux = model.forward_with_aux(x, y)
    F.cross_entropy(logits, y).backward()  # main loss only: the mask is not detached
    g = model.cas_modules()[0].fc.weight.grad
    assert g is not None and g[y].abs().sum() > 0
    assert g[4:].abs().sum() == 0  # rows of classes that masked nothing get no main-loss gradient


def test_paper_placements_and_channel_counts():
    info = dataset_info("cifar10")
    kw = dict(num_classes=10, in_channels=3, image_size=32, mean=info.mean, std=info.std)
    r18 = build_model("resnet18", **kw)
    assert default_placement(r18) == ["stages.3.0", "stages.3.1"]
    wrn = build_model("wrn", depth=16, width=1, **kw)  # 2 blocks per stage
    assert default_placement(wrn) == ["stages.2.1.conv1:in", "linear:in"]
    from advdefense.models.wrn import WideResNet

    assert default_placement(WideResNet.__new__(WideResNet).__class__(depth=34, width=1)) == [
        "stages.2.4.conv1:in", "linear:in"]
    cnn = make_smallcnn()
    assert default_placement(cnn) == ["features.13", "classifier.2"]
    with pytest.raises(ConfigError):
        default_placement(Tiny())


def test_wrn_final_site_equals_masking_after_the_final_relu():
    info = dataset_info("cifar10")
    torch.manual_seed(0)
    base = build_model("wrn", depth=10, width=1, num_classes=10, in_channels=3, image_size=32,
                       mean=info.mean, std=info.std)
    model = apply(base, {}, info).eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        f = model.model.features(x)  # after the final BN/ReLU (the inner CAS site included)
        cas = model.model.linear.cas
        pooled = f.mean(dim=(2, 3))
        mask = cas.fc.weight[cas.fc(pooled).argmax(1)]
        expected = model.model.linear.module(F.adaptive_avg_pool2d(f * mask[:, :, None, None], 1)
                                             .flatten(1))
        torch.testing.assert_close(model(x), expected)


def test_apply_validates_options():
    info = dataset_info("mnist5k")
    with pytest.raises(ConfigError, match="aux_weight"):
        apply(make_smallcnn(), {"beta": 2.0}, info)
    with pytest.raises(ConfigError, match="mask"):
        apply(make_smallcnn(), {"mask": "sigmoid"}, info)
    with pytest.raises(AdvDefenseError, match="no submodule"):
        apply(make_smallcnn(), {"placement": ["features.99"]}, info)
    with pytest.raises(ConfigError):
        apply(make_smallcnn(), {"placement": 3}, info)
    model = apply_defenses(make_smallcnn(), {"cas": {"placement": ["features.13"],
                                                     "mask": "nonnegative"}}, info)
    assert isinstance(model, CASModel) and model.placements == ["features.13"]
    assert model.cas_modules()[0].mask_kind == "nonnegative"
    with pytest.raises(AdvDefenseError, match="already"):
        attach_cas(model, ["model.features.10"], num_classes=10, input_shape=(1, 28, 28))


def test_state_dict_roundtrip_rebuilds_the_same_model():
    info = dataset_info("mnist5k")
    torch.manual_seed(1)
    a = apply(make_smallcnn(seed=1), {}, info)
    torch.manual_seed(2)
    b = apply(make_smallcnn(seed=2), {}, info)
    b.load_state_dict(a.state_dict())
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(a.eval()(x), b.eval()(x))


def test_heads_objective_sees_the_aux_heads_in_eval():
    model = tiny_cas().eval()
    x, y = torch.rand(3, 1, 5, 5), torch.tensor([0, 1, 2])
    loss_main, _ = HeadsObjective("ce", aux_weight=0.0)(model, x, y)
    loss_adapt, _ = HeadsObjective("ce", aux_weight=2.0)(model, x, y)
    logits, aux = model.forward_with_aux(x)
    torch.testing.assert_close(loss_main, F.cross_entropy(logits, y, reduction="none"))
    torch.testing.assert_close(
        loss_adapt, loss_main + 2.0 * F.cross_entropy(aux[0], y, reduction="none"))
    x_adv = PGD(eps=0.1, steps=2, loss=HeadsObjective(aux_weight=2.0), seed=0)(model, x, y)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6


# --- loss composition with the Trainer's recipes ---------------------------------------------

def hand_forward(model, x, y):
    """Train-mode forward of the two-site tiny CAS model, written out by hand."""
    b = model.model.body
    s1, s2 = b[1], b[3]
    f1 = s1.module(b[0](x))
    aux1 = F.linear(f1.mean(dim=(2, 3)), s1.cas.fc.weight, s1.cas.fc.bias)
    f2 = s2.module(b[2](f1 * s1.cas.fc.weight[y][:, :, None, None]))
    aux2 = F.linear(f2.mean(dim=(2, 3)), s2.cas.fc.weight, s2.cas.fc.bias)
    m2 = f2 * s2.cas.fc.weight[y][:, :, None, None]
    return model.model.head(m2.mean(dim=(2, 3))), [aux1, aux2]


def kl(ln, la):  # KL(p(ln) || p(la)) per row
    p = F.softmax(ln, 1)
    return (p * (F.log_softmax(ln, 1) - F.log_softmax(la, 1))).sum(1)


def trades_term(ln, la, y, beta):
    return F.cross_entropy(ln, y) + beta * kl(ln, la).mean()


def mart_term(ln, la, y, beta):
    p_adv = F.softmax(la, 1)
    others = p_adv.scatter(1, y[:, None], float("-inf"))
    wrong = others.argmax(1)
    bce = F.cross_entropy(la, y) - torch.log(
        1.0001 - p_adv.gather(1, wrong[:, None]).squeeze(1) + 1e-12).mean()
    p_nat = F.softmax(ln, 1)
    kl_rows = (p_nat * (torch.log(p_nat) - torch.log(p_adv + 1e-12))).sum(1)
    w = 1.0000001 - p_nat.gather(1, y[:, None]).squeeze(1)  # each head's own p_y(x)
    return bce + beta * (kl_rows * w).mean()


ATTACK = None


def attack_cfg():
    from advdefense.config import AttackConfig

    return AttackConfig(eps=0.1, steps=2, step_size=0.05)


def fixed_inputs(seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(6, 1, 5, 5, generator=g)
    x_adv = (x + 0.1 * (2 * torch.rand(x.shape, generator=g) - 1)).clamp(0, 1)
    y = torch.tensor([0, 1, 2, 3, 4, 6])
    return x, x_adv, y


def with_fixed_adversary(recipe, x_adv):
    if hasattr(recipe, "attack"):
        recipe.attack = lambda model, x, y: x_adv
    recipe._ascend = lambda model, x, y, objective: x_adv
    return recipe


@pytest.mark.parametrize("beta", [2.0, 0.0])
@pytest.mark.parametrize("name", ["pgd_at", "trades", "mart", "standard"])
def test_recipes_compose_the_cas_loss_as_the_reference(name, beta):
    from advdefense.training.recipes import build_recipe

    model = tiny_cas(places=("body.1", "body.3")).train()
    x, x_adv, y = fixed_inputs()
    args = {"aux_weight": beta}
    if name in ("trades", "mart"):
        args["beta"] = 6.0
    recipe = with_fixed_adversary(build_recipe(name, attack_cfg(), **args), x_adv)
    loss, _logs = recipe.loss(model, x, y)
    nat, nat_aux = hand_forward(model, x, y)
    adv, adv_aux = hand_forward(model, x_adv, y)
    if name == "standard":
        main, heads = F.cross_entropy(nat, y), [F.cross_entropy(a, y) for a in nat_aux]
    elif name == "pgd_at":  # CE main + beta * mean_s CE aux_s, on x'
        main, heads = F.cross_entropy(adv, y), [F.cross_entropy(a, y) for a in adv_aux]
    elif name == "trades":  # every head: CE(nat) + 6 KL(nat || adv)
        main = trades_term(nat, adv, y, 6.0)
        heads = [trades_term(a, b, y, 6.0) for a, b in zip(nat_aux, adv_aux, strict=True)]
    else:  # every head: its own MART terms
        main = mart_term(nat, adv, y, 6.0)
        heads = [mart_term(a, b, y, 6.0) for a, b in zip(nat_aux, adv_aux, strict=True)]
    expected = main + beta * (heads[0] + heads[1]) / 2
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # beta = 0 is the plain recipe: the aux heads' biases (which only feed the aux logits in
    # training) get no gradient; with beta > 0 they do
    biases = [m.fc.bias for m in model.cas_modules()]
    grads = torch.autograd.grad(loss, biases, allow_unused=True)
    total = sum(0.0 if g is None else float(g.abs().sum()) for g in grads)
    assert (total > 0) == (beta > 0)


def test_training_attacks_maximise_main_plus_beta_aux():
    from advdefense.training.recipes import KLObjective, build_recipe

    at = build_recipe("pgd_at", attack_cfg(), aux_weight=2.0)
    assert isinstance(at.attack.objective, HeadsObjective) and at.attack.objective.aux_weight == 2
    seen = {}
    mart = build_recipe("mart", attack_cfg(), aux_weight=2.0)
    trades = build_recipe("trades", attack_cfg(), aux_weight=2.0)
    for recipe in (mart, trades):
        recipe._ascend = lambda model, x, y, objective, r=recipe: seen.__setitem__(
            r.name, objective) or x
    model = tiny_cas(places=("body.1", "body.3")).train()
    x, _, y = fixed_inputs()
    mart.loss(model, x, y)
    trades.loss(model, x, y)
    assert isinstance(seen["mart"], HeadsObjective) and seen["mart"].aux_weight == 2.0
    assert isinstance(seen["trades"], KLObjective) and len(seen["trades"].p_nat_aux) == 2


def test_cas_model_asks_the_trainer_for_beta_2_unless_the_config_says_otherwise():
    from advdefense.training.recipes import recipe_defaults

    model = tiny_cas()
    assert recipe_defaults(model) == {"aux_weight": 2.0}
    assert {**recipe_defaults(model), **{"aux_weight": 0.0}}["aux_weight"] == 0.0


# --- end to end: Trainer, checkpoint, gradient checks -----------------------------------------

@pytest.fixture(scope="module")
def trained_cas(tmp_path_factory):
    from advdefense.config import config_from_dict
    from advdefense.training.trainer import Trainer

    out = tmp_path_factory.mktemp("cas_run")
    cfg = config_from_dict({
        "name": "cas_tiny", "seed": 0, "output_dir": str(out),
        "data": {"name": "mnist5k", "limit": 1500, "monitor_size": 50, "batch_size": 50},
        "model": {"name": "smallcnn"}, "defense": {"cas": {"placement": "default"}},
        "train": {"recipe": "standard", "epochs": 2,
                  "optimizer": {"name": "adam", "lr": 0.002, "weight_decay": 0.0},
                  "monitor_attack": {"steps": 0}}})
    trainer = Trainer(cfg, device="cpu", progress=False)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer


def test_trainer_uses_beta_2_and_the_checkpoint_rebuilds_the_cas_model(trained_cas, mnist_test):
    from advdefense.training.checkpoint import load_model_from_checkpoint

    assert trained_cas.recipe.aux_weight == 2.0  # from CASModel.recipe_defaults
    model, cfg = load_model_from_checkpoint(trained_cas.checkpoint_path)
    assert isinstance(model, CASModel) and cfg.defense == {"cas": {"placement": "default"}}
    x, y = mnist_test
    trained = trained_cas.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x[:50]), trained(x[:50]))
        _, aux = model.forward_with_aux(x[:200])
    assert [a.shape for a in aux] == [(200, 10), (200, 10)]
    for a in aux:  # the heads learned (chance is 0.1)
        assert float((a.argmax(1) == y[:200]).float().mean()) > 0.6


def test_predicted_class_mask_does_not_mask_gradients(trained_cas, mnist_test):
    from advdefense.evaluation.checks import (
        CHECK_NAMES,
        CheckSettings,
        UnboundedSettings,
        run_checks,
    )

    model = trained_cas.model.eval()
    x, y = mnist_test
    x, y = x[:32], y[:32]
    names = ("nonfinite_gradients", "zero_gradients", "unbounded_attack")
    settings = CheckSettings(skip=tuple(n for n in CHECK_NAMES if n not in names),
                             unbounded=UnboundedSettings(steps=30))
    checks = run_checks(model, (x, y), None, settings)
    assert [c.name for c in checks] == list(names)
    for check in checks:
        assert check.passed, check.detail
    # the adaptive objective has non-zero input gradients too
    from advdefense.attacks import eot_loss_grad

    res = eot_loss_grad(model, x, y, HeadsObjective("ce", aux_weight=2.0))
    assert bool((res.grad.flatten(1).norm(dim=1) > 0).all())
