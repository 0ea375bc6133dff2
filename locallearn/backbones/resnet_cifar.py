"""CIFAR ResNets of the InfoPro lineage (ResNet-20/32/56/110) as a flat layer list.

Layer 0 is the stem (3x3 conv, BN, ReLU, no max-pool); each residual unit (BasicBlock) is one layer;
widths 16-16-32-64, GAP + FC head (the head belongs to the task). Matches
``InfoPro-Pytorch/Experiments on CIFAR-SVHN-STL10/networks/resnet.py`` including its initialisation
(conv weights ~ N(0, sqrt(2 / (k*k*out_channels))), BN weight 1 and bias 0, Linear left at PyTorch's
default); parameter count 466,906 for ResNet-32 with 10 classes (PRIOR_ART §1).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from locallearn.backbones.base import Backbone
from locallearn.types import FeatureInfo

WIDTHS = (16, 16, 32, 64)  # stem, stage 1, 2, 3


class Stem(nn.Sequential):
    def __init__(self, in_chans: int, width: int) -> None:
        super().__init__(
            nn.Conv2d(in_chans, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-(dropout)-conv3x3-BN, plus shortcut (1x1 conv + BN when the shape changes), ReLU."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, droprate: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.relu = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(droprate) if droprate > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride, bias=False), nn.BatchNorm2d(out_chs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.drop(self.relu(self.bn1(self.conv1(x))))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


def infopro_init(module: nn.Module) -> None:
    """InfoPro's initialisation loop over ``module.modules()``."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            m.weight.data.normal_(0, math.sqrt(2.0 / n))
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            m.weight.data.fill_(1)
            m.bias.data.zero_()
        elif isinstance(m, nn.Linear):
            m.reset_parameters()


class ResNetCifar(Backbone):
    def __init__(self, depth: int, in_chans: int = 3, droprate: float = 0.0) -> None:
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 56, 110, ...), got {depth}")
        n = (depth - 2) // 6
        layers: list[nn.Module] = [Stem(in_chans, WIDTHS[0])]
        info = [FeatureInfo(WIDTHS[0], 1, stage=0)]
        in_chs, reduction = WIDTHS[0], 1
        for stage, width in enumerate(WIDTHS[1:]):
            for unit in range(n):
                stride = 2 if stage > 0 and unit == 0 else 1
                reduction *= stride
                layers.append(BasicBlock(in_chs, width, stride, droprate))
                info.append(FeatureInfo(width, reduction, stage=stage + 1))
                in_chs = width
        super().__init__(layers, info, in_chans)
        self.depth = depth
        self.units_per_stage = n
        infopro_init(self)

    def init_weights(self, module: nn.Module) -> None:
        infopro_init(module)

    def stage_block_to_layer(self, stage: int, block: int) -> int:
        """Global layer index of ``[stage, block]`` in the papers' notation (stage 0 = the stem)."""
        if stage == 0:
            return 0
        if not (1 <= stage <= 3 and 0 <= block < self.units_per_stage):
            raise ValueError(f"no [stage, block] = [{stage}, {block}] in ResNet-{self.depth}")
        return 1 + (stage - 1) * self.units_per_stage + block


def resnet20(**kw) -> ResNetCifar:
    return ResNetCifar(20, **kw)


def resnet32(**kw) -> ResNetCifar:
    return ResNetCifar(32, **kw)


def resnet56(**kw) -> ResNetCifar:
    return ResNetCifar(56, **kw)


def resnet110(**kw) -> ResNetCifar:
    return ResNetCifar(110, **kw)
