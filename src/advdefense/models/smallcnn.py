"""A small 4-conv CNN for 28x28 (MNIST) and 8x8 (digits) inputs."""

from __future__ import annotations

from torch import nn

from .layers import InputNormalization, NormFactory, batchnorm


class SmallCNN(nn.Module):
    """conv32-conv32-pool-conv64-conv64-pool-fc200-fc, each conv followed by norm and ReLU.

    For 8x8 inputs the second pooling is skipped. Works for any image size >= 8.
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        mean=(0.5,),
        std=(0.5,),
        norm: NormFactory = batchnorm,
        width: int = 32,
    ) -> None:
        super().__init__()
        w = width

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), norm(cout), nn.ReLU()]

        pools = 2 if image_size >= 16 else 1
        layers: list[nn.Module] = [InputNormalization(mean, std)]
        layers += block(in_channels, w) + block(w, w) + [nn.MaxPool2d(2)]
        layers += block(w, 2 * w) + block(2 * w, 2 * w)
        if pools == 2:
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        side = image_size // (2**pools)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * w * side * side, 200), nn.ReLU(),
            nn.Linear(200, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))
