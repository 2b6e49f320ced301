"""Model registry. Every model takes NCHW floats in [0, 1] and returns logits (contract 1).

``build_model(name, dataset_info, norm=..., **kwargs)`` builds by name; ``register_model`` adds
an entry. Defenses wrap or convert these models (``advdefense.defenses``).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..errors import unknown_name
from .layers import InputNormalization, NormFactory, batchnorm, norm_factory
from .resnet import ResNet, resnet10_narrow, resnet18, resnet20, resnet_mini
from .smallcnn import SmallCNN
from .wrn import WideResNet, wrn, wrn34_10

MODELS: dict[str, Callable[..., nn.Module]] = {
    "smallcnn": SmallCNN,
    "resnet18": resnet18,
    "resnet20": resnet20,
    "resnet_mini": resnet_mini,
    "resnet10_narrow": resnet10_narrow,
    "wrn34_10": wrn34_10,
    "wrn": wrn,
}


def register_model(name: str, builder: Callable[..., nn.Module]) -> None:
    MODELS[name] = builder


def build_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    mean,
    std,
    norm: str | NormFactory = "bn",
    **kwargs,
) -> nn.Module:
    """Build a registered model for a dataset's shape and statistics.

    ``norm`` is a factory or a name understood by :func:`norm_factory` (``bn``, ``in``, ``ln``,
    ``gn``).
    """
    if name not in MODELS:
        raise unknown_name("model", name, MODELS)
    factory = norm_factory(norm) if isinstance(norm, str) else norm
    kw = dict(num_classes=num_classes, in_channels=in_channels, mean=mean, std=std, norm=factory)
    if name == "smallcnn":
        kw["image_size"] = image_size
    return MODELS[name](**kw, **kwargs)


__all__ = [
    "MODELS",
    "build_model",
    "register_model",
    "InputNormalization",
    "NormFactory",
    "batchnorm",
    "norm_factory",
    "ResNet",
    "resnet10_narrow",
    "resnet18",
    "resnet20",
    "resnet_mini",
    "SmallCNN",
    "WideResNet",
    "wrn",
    "wrn34_10",
]
