"""torchvision ResNet / ResNeXt (ImageNet stem) as a flat layer list.

Layer 0 is the stem (conv7x7 s2, BN, ReLU, max-pool 3x3 s2); each residual unit (BasicBlock or
Bottleneck) of ``layer1..layer4`` is one layer. The global average pool and ``fc`` belong to the task
head (GAP + Linear, the same function). The modules are torchvision's own (``weights=None``), so the
composed layers equal ``torchvision.models.resnetXX`` up to ``avgpool`` exactly, and the state dict
round-trips through ``to_torchvision_state_dict`` / ``from_torchvision_state_dict``.

``[stage, block]`` (the papers' split notation, PRIOR_ART §2.7 / §6.3): stage 0 = the stem, stage s =
``layer{s}``, block b = its b-th unit (0-based).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torchvision import models

from locallearn.backbones.torchvision_adapter import (
    TorchvisionBackbone,
    check_no_dropout,
    torchvision_cnn_init,
)
from locallearn.types import FeatureInfo


class TorchvisionResNet(TorchvisionBackbone):
    def __init__(self, arch: str, in_chans: int = 3, droprate: float = 0.0, **kw) -> None:
        check_no_dropout(droprate, arch)
        net: models.ResNet = getattr(models, arch)(weights=None, **kw)
        if in_chans != 3:
            net.conv1 = nn.Conv2d(in_chans, net.conv1.out_channels, 7, 2, 3, bias=False)
            torchvision_cnn_init(net.conv1)
        layers: list[nn.Module] = [nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)]
        info = [FeatureInfo(net.conv1.out_channels, 4, stage=0)]
        self.stage_depths = []
        stages = (net.layer1, net.layer2, net.layer3, net.layer4)
        # replace_stride_with_dilation=[False, True, True] (DeepLabV3's output stride 8): layer3/4 keep stride 8
        dilated = (False, *kw.get("replace_stride_with_dilation", (False, False, False)))
        reductions = [4]
        for d in dilated[1:]:
            reductions.append(reductions[-1] * (1 if d else 2))
        for s, (stage, reduction) in enumerate(zip(stages, reductions), start=1):
            self.stage_depths.append(len(stage))
            for unit in stage:
                width = unit.conv3.out_channels if hasattr(unit, "conv3") else unit.conv2.out_channels
                layers.append(unit)
                info.append(FeatureInfo(width, reduction, stage=s))
        super().__init__(net, layers, info, in_chans, head_linear="fc")
        self.arch = arch

    def init_weights(self, module: nn.Module) -> None:
        torchvision_cnn_init(module)

    def stage_block_to_layer(self, stage: int, block: int) -> int:
        if stage == 0:
            return 0
        if not (1 <= stage <= 4 and 0 <= block < self.stage_depths[stage - 1]):
            raise ValueError(
                f"no [stage, block] = [{stage}, {block}] in {self.arch} (depths {self.stage_depths})"
            )
        return 1 + sum(self.stage_depths[: stage - 1]) + block


def _factory(arch: str) -> Callable[..., TorchvisionResNet]:
    def make(**kw) -> TorchvisionResNet:
        return TorchvisionResNet(arch, **kw)

    make.__name__ = arch
    return make


ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d")
FACTORIES: dict[str, Callable[..., TorchvisionResNet]] = {arch: _factory(arch) for arch in ARCHS}


def _dilated(arch: str) -> Callable[..., TorchvisionResNet]:
    """``{arch}_d8``: DeepLabV3's backbone (torchvision ``deeplabv3_resnet*``): layer3 and layer4 dilated
    instead of strided, output stride 8; the same parameters, so torchvision state dicts round-trip."""

    def make(**kw) -> TorchvisionResNet:
        return TorchvisionResNet(arch, replace_stride_with_dilation=[False, True, True], **kw)

    make.__name__ = f"{arch}_d8"
    return make


FACTORIES.update({f"{arch}_d8": _dilated(arch) for arch in ("resnet50", "resnet101")})
