"""Model registry: shapes, input normalization inside, norm factory everywhere."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advdefense.data import dataset_info
from advdefense.errors import AdvDefenseError
from advdefense.models import InputNormalization, build_model, norm_factory


def _build(name, dataset="cifar10", **kw):
    info = dataset_info(dataset)
    return build_model(name, num_classes=info.num_classes, in_channels=info.in_channels,
                       image_size=info.image_size, mean=info.mean, std=info.std, **kw)


@pytest.mark.parametrize("name,dataset", [("smallcnn", "mnist5k"), ("smallcnn", "digits"),
                                          ("resnet20", "cifar10"), ("resnet18", "cifar100"),
                                          ("resnet_mini", "mnist5k")])
def test_logits_shape(name, dataset):
    model = _build(name, dataset).eval()
    info = dataset_info(dataset)
    x = torch.rand(3, info.in_channels, info.image_size, info.image_size)
    assert model(x).shape == (3, info.num_classes)


def test_wrn_builder_depth_and_width():
    model = _build("wrn", depth=10, width=2).eval()
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError):
        _build("wrn", depth=11, width=2)


@pytest.mark.parametrize("norm", ["in", "ln", "gn"])
def test_norm_factory_replaces_every_batchnorm(norm):
    model = _build("resnet20", norm=norm)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, nn.GroupNorm) for m in model.modules()) == 21


def test_input_normalization_is_first_layer():
    model = _build("resnet20")
    first = next(m for m in model.modules() if not list(m.children()))
    assert isinstance(first, InputNormalization)
    x = torch.full((1, 3, 2, 2), 0.5)
    out = first(x)
    info = dataset_info("cifar10")
    assert torch.allclose(out[0, :, 0, 0], (0.5 - torch.tensor(info.mean)) / torch.tensor(info.std))


def test_unknown_model_and_norm():
    with pytest.raises(AdvDefenseError, match="unknown model"):
        _build("vgg99")
    with pytest.raises(ValueError):
        norm_factory("xn")(8)


# --- resnet10_narrow: the CPU-sized RGB ResNet (cifar10-jpeg) ------------------------------

def test_resnet10_narrow_forward_backward_and_size():
    torch.manual_seed(0)
    model = _build("resnet10_narrow", "cifar10-jpeg").train()
    assert isinstance(model.normalize, InputNormalization)
    assert torch.allclose(model.normalize.mean.flatten(),
                          torch.tensor(dataset_info("cifar10-jpeg").mean))
    x = torch.rand(4, 3, 32, 32, requires_grad=True)
    logits = model(x)
    assert logits.shape == (4, 10)
    logits.sum().backward()
    assert x.grad.shape == x.shape and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 152_026
    half = _build("resnet10_narrow", "cifar10-jpeg", width=8)
    assert half.linear.in_features == 32 and half(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_resnet10_narrow_rna_path_space():
    from advdefense.defenses import rna

    model = _build("resnet10_narrow", "cifar10-jpeg")
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 11
    rna.convert(model, space=("bn", "in"))
    assert len(rna.rna_layers(model)) == 11
    assert rna.num_paths(model) == 2**11 == len(rna.enumerate_paths(model, limit=None))
    assert model.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_resnet10_narrow_cas_after_the_last_stage_blocks():
    from advdefense.defenses import cas

    info = dataset_info("cifar10-jpeg")
    model = cas.apply(_build("resnet10_narrow", "cifar10-jpeg"), {}, info)
    assert model.placements == ["stages.2.0", "stages.2.1"]  # both blocks of the last stage
    assert [m.channels for m in model.cas_modules()] == [64, 64]
    y = torch.tensor([1, 2, 3])
    logits, aux = model.train().forward_with_aux(torch.rand(3, 3, 32, 32), y)
    assert logits.shape == (3, 10) and [a.shape for a in aux] == [(3, 10), (3, 10)]


def test_resnet10_narrow_takes_pni_on_every_conv_and_the_linear_layer():
    from advdefense.defenses import noise

    model = _build("resnet10_narrow", "cifar10-jpeg")
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    noise.inject(model, kind="pni", where="weights")
    layers = noise.noisy_layers(model)
    assert convs == 11 and len(layers) == 12
    assert isinstance(layers["linear"].layer, nn.Linear)
    model.eval()
    x = torch.rand(2, 3, 32, 32)
    torch.manual_seed(0)
    a = model(x)
    b = model(x)
    assert a.shape == (2, 10) and not torch.equal(a, b)  # fresh noise on every forward
    a.sum().backward()
    assert all(m.alpha_w.grad is not None for m in layers.values())
