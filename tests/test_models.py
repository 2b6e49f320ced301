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
