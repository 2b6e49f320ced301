"""Wide ResNets (Zagoruyko & Komodakis 2016), pre-activation blocks as in the TRADES/CAS code."""

from __future__ import annotations

from torch import nn
from torch.nn import functional as F

from .layers import InputNormalization, NormFactory, batchnorm
from .resnet import CIFAR_MEAN, CIFAR_STD


class WideBlock(nn.Module):
    """Pre-activation block: norm-ReLU-conv-norm-ReLU-conv plus (projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, norm: NormFactory) -> None:
        super().__init__()
        self.bn1 = norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        o = F.relu(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(o)
        out = self.conv1(o)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + residual


class WideResNet(nn.Module):
    """WRN-depth-width; depth = 6n + 4. The final norm + ReLU precede pooling."""

    def __init__(
        self,
        *,
        depth: int = 34,
        width: int = 10,
        num_classes: int = 10,
        in_channels: int = 3,
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        norm: NormFactory = batchnorm,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.normalize = InputNormalization(mean, std)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        stages, cin = [], widths[0]
        for i, w in enumerate(widths[1:]):
            blocks = []
            for j in range(n):
                blocks.append(WideBlock(cin, w, (1 if i == 0 else 2) if j == 0 else 1, norm))
                cin = w
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.bn = norm(cin)
        self.linear = nn.Linear(cin, num_classes)

    def features(self, x):
        out = self.conv1(self.normalize(x))
        for stage in self.stages:
            out = stage(out)
        return F.relu(self.bn(out))

    def forward(self, x):
        return self.linear(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def wrn(depth: int = 34, width: int = 10, **kw) -> WideResNet:
    return WideResNet(depth=depth, width=width, **kw)


def wrn34_10(**kw) -> WideResNet:
    return WideResNet(depth=34, width=10, **kw)
