"""torchvision VGG-11/13/16/19 (with or without BN) as a flat layer list.

Each conv -> (BN ->) ReLU is one layer; a max-pool is attached to the end of the layer before it, so
a layer's output is what the next conv eats. The adaptive avg-pool and the three-layer classifier are
not part of the backbone: the task head (GAP + Linear) replaces them, so a torchvision VGG loads the
exported ``features.*`` with ``strict=False`` (its classifier stays as initialised).

``[stage, block]``: stage s (1..5) = the convs between the (s-1)-th and s-th max-pool, block b = the
b-th conv of that stage. DGL / MAN++ VGG-13 K=10 is one conv per block (PRIOR_ART: MAN++ ImageNet).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torchvision.models import vgg

from locallearn.backbones.torchvision_adapter import (
    TorchvisionBackbone,
    check_no_dropout,
    torchvision_cnn_init,
)
from locallearn.types import FeatureInfo

CFG = {"11": "A", "13": "B", "16": "D", "19": "E"}  # torchvision.models.vgg.cfgs keys


class TorchvisionVGG(TorchvisionBackbone):
    def __init__(self, arch: str, in_chans: int = 3, droprate: float = 0.0, **kw) -> None:
        check_no_dropout(droprate, arch)
        if kw:
            raise TypeError(f"{arch}: unexpected options {sorted(kw)}")
        # torchvision's own feature builder: the same modules as ``models.vggXX().features`` without
        # allocating the 120M-parameter classifier that the task head replaces anyway.
        depth, bn = arch[3:5], arch.endswith("_bn")
        net = nn.Module()
        net.features = vgg.make_layers(vgg.cfgs[CFG[depth]], batch_norm=bn)
        if in_chans != 3:
            net.features[0] = nn.Conv2d(in_chans, net.features[0].out_channels, 3, padding=1)
        torchvision_cnn_init(net)
        groups: list[list[nn.Module]] = []
        info: list[FeatureInfo] = []
        self.stage_depths = [0]
        reduction = 1
        for module in net.features:
            if isinstance(module, nn.Conv2d):
                groups.append([module])
                info.append(FeatureInfo(module.out_channels, reduction, stage=len(self.stage_depths)))
                self.stage_depths[-1] += 1
            elif isinstance(module, nn.MaxPool2d):
                groups[-1].append(module)
                reduction *= 2
                info[-1] = FeatureInfo(info[-1].num_chs, reduction, stage=info[-1].stage)
                self.stage_depths.append(0)
            else:
                groups[-1].append(module)
        if self.stage_depths[-1] == 0:
            self.stage_depths.pop()
        super().__init__(net, [nn.Sequential(*g) for g in groups], info, in_chans, head_linear=None)
        self.arch = arch

    def init_weights(self, module: nn.Module) -> None:
        torchvision_cnn_init(module, linear_std=0.01)

    def stage_block_to_layer(self, stage: int, block: int) -> int:
        if not (1 <= stage <= len(self.stage_depths) and 0 <= block < self.stage_depths[stage - 1]):
            raise ValueError(
                f"no [stage, block] = [{stage}, {block}] in {self.arch} (convs per stage {self.stage_depths})"
            )
        return sum(self.stage_depths[: stage - 1]) + block


def _factory(arch: str) -> Callable[..., TorchvisionVGG]:
    def make(**kw) -> TorchvisionVGG:
        return TorchvisionVGG(arch, **kw)

    make.__name__ = arch
    return make


ARCHS = tuple(f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn"))
FACTORIES: dict[str, Callable[..., TorchvisionVGG]] = {arch: _factory(arch) for arch in ARCHS}
