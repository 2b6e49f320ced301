"""CIFAR ResNets: ResNet-18 (He et al. 2016, 3x3 stem as in the RNA/CAS code) and ResNet-20,
``resnet_mini``, a CPU-sized ResNet for 28x28 digits with ResNet-18's last-stage layout, and
``resnet10_narrow``, its CPU-sized counterpart for 32x32 RGB images (``cifar10-jpeg``).

Both take a norm factory so another normalization (RNA, GN, ...) can replace BatchNorm.
ResNet-20 uses 1x1-conv projection shortcuts with a norm layer (option B) rather than the
parameter-free zero-padding shortcut of the PNI code, so every norm layer is a factory product.
"""

from __future__ import annotations

from torch import nn
from torch.nn import functional as F

from .layers import InputNormalization, NormFactory, batchnorm

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2471, 0.2435, 0.2616)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int, norm: NormFactory) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A CIFAR-style ResNet of :class:`BasicBlock` stages; ``forward`` returns logits."""

    def __init__(
        self,
        blocks_per_stage: list[int],
        widths: list[int],
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        norm: NormFactory = batchnorm,
        block: type[nn.Module] = BasicBlock,
    ) -> None:
        super().__init__()
        self.normalize = InputNormalization(mean, std)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = norm(widths[0])
        stages, cin = [], widths[0]
        for i, (n, w) in enumerate(zip(blocks_per_stage, widths, strict=True)):
            layers = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(block(cin, w, stride, norm))
                cin = w
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.linear = nn.Linear(cin, num_classes)

    def features(self, x):
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        for stage in self.stages:
            out = stage(out)
        return out

    def forward(self, x):
        out = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.linear(out)


def resnet18(**kw) -> ResNet:
    """ResNet-18 for 32x32 inputs: stages of 2 blocks, widths 64-128-256-512."""
    return ResNet([2, 2, 2, 2], [64, 128, 256, 512], **kw)


def resnet20(**kw) -> ResNet:
    """ResNet-20 for 32x32 inputs: 3 stages of 3 blocks, widths 16-32-64."""
    return ResNet([3, 3, 3], [16, 32, 64], **kw)


def resnet_mini(**kw) -> ResNet:
    """A small ResNet for 28x28 inputs (mnist5k): a 3x3 stem, stages of 1, 1 and 2 BasicBlocks,
    widths 16-32-64 (28x28, 14x14, 7x7), global average pooling and one linear layer.

    Its last stage has two blocks followed by GAP + linear, as ResNet-18's ``layer4``, so CAS
    sites after both blocks of the last stage (the CAS paper's ResNet-18 placement) put the
    first auxiliary head on features one block before the main head's (64 channels, 7x7).
    About 150k parameters; a training step costs about as much as ``smallcnn``'s on CPU.
    """
    return ResNet([1, 1, 2], [16, 32, 64], **kw)


def resnet10_narrow(*, width: int = 16, **kw) -> ResNet:
    """A narrow ResNet-10 for 32x32 RGB images, sized for CPU adversarial training.

    A 3x3 stem, stages of 1, 1 and 2 BasicBlocks with widths ``width``-``2*width``-``4*width``
    (default 16-32-64; at 32x32, 16x16 and 8x8), 1x1-conv projection shortcuts with a norm
    layer where the shape changes, global average pooling and one linear layer: 10 weighted
    layers on the main path; 152,026 parameters for 10 classes (width 16) and about 0.4 of
    ResNet-20's multiply-adds (17M per 32x32 image).

    * RNA: 11 norm layers (stem 1, blocks 2 + 3 + 3 + 2, shortcuts included), so RNA with two
      types (``bn``, ``in``) has ``2**11 = 2048`` paths (:func:`advdefense.defenses.rna.num_paths`).
    * CAS: the last stage has two blocks followed by GAP + linear, as ResNet-18's ``layer4``;
      the default placement puts CAS after both (``stages.2.0``, ``stages.2.1``: 4*width
      channels at 8x8), the CAS paper's ResNet-18 placement.
    * PNI/CNI: :func:`advdefense.defenses.noise.inject` wraps its 11 convolutions (the two
      shortcut projections included) and the linear layer, as the PNI code does for ResNet-20.
    """
    if int(width) < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    w = int(width)
    return ResNet([1, 1, 2], [w, 2 * w, 4 * w], **kw)
