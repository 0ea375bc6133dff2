"""AugLocal: augmented local learning with uniformly sampled layers (Ma et al., Scaling Supervised
Local Learning with Augmented Auxiliary Networks, ICLR 2024, arXiv 2402.17318).

The aux of the cut after global layer ``l`` (of ``n`` layers) is a small network built from *new,
randomly initialised* residual units shaped like ``d`` layers sampled uniformly from those after the
cut, always ending at the last layer (PRIOR_ART §4.2): indices
``round(l + (n - l - 1) / d * i)`` for i = 1..d (Python's round-half-to-even), or all of ``l+1..n-1``
when ``d >= n - 1 - l``. A unit takes the current width to the sampled layer's width and halves the
resolution when the sampled layer sits at a coarser resolution than the current one. Then GAP,
BatchNorm1d when ``d <= 1``, and the task's local head; task loss. Pyramidal depth (PRIOR_ART §4.3):
``d_k = max(1, round(d * (1 - k*c/(K-2)) + k*c/(K-2)))`` for cut k = 0..K-2, i.e. d shrinking
linearly to ``d - (d - 1) * c`` at the last cut.

K keeps our meaning (number of blocks). The official ``train.py`` silently runs
``K' = K - d`` blocks with a cut after each of the first K'-1 layers; to reproduce its "K=16, d=2"
(ResNet-32) set ``num_blocks: 14`` with ``cuts: [1, ..., 13]``, and its "K=55, d=3" (ResNet-110)
``num_blocks: 52`` with ``cuts: [1, ..., 51]`` (configs/auglocal_*.yaml). The pyramid is indexed by
our cut index, which equals the official global-layer index for those splits.

Units are of the backbone's own kind, fresh and randomly initialised: a unit imitating a torchvision
Bottleneck is a torchvision Bottleneck (ResNet-50/101/152, ResNeXt keeps its groups and width per
group), BasicBlock a BasicBlock, a VGG conv layer conv-(BN-)ReLU with a 2x2 max-pool in front when it
down-samples (the official ImageNet ``AuxClassifier`` / ``AuxClassifier_VGG``); any other layer (the
CIFAR ResNets, ``torch.fx`` pieces) gets the CIFAR BasicBlock shape of the CIFAR code.

Deviations from the official code: K is not changed behind the user's back (see above); the units are
built from the backbone's ``FeatureInfo`` (width and resolution) rather than from a per-architecture
width table, so they follow any CNN backbone; the head is the task's local head (GAP + Linear; the
official VGG head is an adaptive 1-d pool to 512 and three Linear layers with BN); a VGG unit has BN
only when the backbone's convs have it (the official VGG aux always has BN).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet

from locallearn.methods.base import AuxContext, Method
from locallearn.types import Batch, FeatureInfo


@dataclass
class AugLocalConfig:
    depth: int = 2  # AugLocal README, ResNet-32 CIFAR-10: --aux_net_depth 2 (ResNet-110: 3)
    pyramid: bool = True  # run.sh: --pyramid
    pyramid_coeff: float = 0.5  # run.sh: --pyramid_coeff 0.5
    widen: int = 1  # --aux_net_widen 1
    # ours: the most channels of a unit (0 = auto: the sampled layers' widths on the listed backbones,
    # a width that fits the backbone's size on outside models, build.py)
    width: int = 0

    def __post_init__(self) -> None:
        if self.width < 0:
            raise ValueError(f"auglocal.width must be >= 0 (0 = auto), got {self.width}")


def sample_layers(cut_after: int, num_layers: int, depth: int) -> list[int]:
    """Global indices of the layers an aux of depth ``depth`` imitates (auxiliary_nets.py unifSamp)."""
    remaining = num_layers - 1 - cut_after
    if depth >= remaining:
        return list(range(cut_after + 1, num_layers))
    step = remaining / depth
    return [round(cut_after + step * i) for i in range(1, depth + 1)]


def pyramid_depth(depth: int, k: int, num_blocks: int, coeff: float) -> int:
    """Depth of cut ``k`` (0..K-2) under the pyramid: linear from d down to d - (d-1)*coeff."""
    t = k * coeff / (num_blocks - 2) if num_blocks > 2 else 0.0
    return max(1, round(depth * (1 - t) + t))


class ResidualUnit(nn.Module):
    """A CIFAR-ResNet BasicBlock shape: conv3x3-BN-ReLU-conv3x3-BN + shortcut (1x1 conv + BN when the
    shape changes), ReLU."""

    def __init__(self, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_chs),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_chs, out_chs, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_chs),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride, bias=False), nn.BatchNorm2d(out_chs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def _projection(in_chs: int, out_chs: int, stride: int) -> nn.Module | None:
    if stride == 1 and in_chs == out_chs:
        return None
    return nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride, bias=False), nn.BatchNorm2d(out_chs))


def new_unit(like: nn.Module, in_chs: int, out_chs: int, stride: int) -> nn.Module:
    """A fresh unit of the same kind as the backbone layer ``like``, taking ``in_chs`` to ``out_chs``
    (official ImageNet AugLocal: torchvision's BasicBlock / Bottleneck for ResNets, conv-BN-ReLU with a
    max-pool in front when down-sampling for VGG). Other layers get the CIFAR BasicBlock shape."""
    if isinstance(like, tv_resnet.Bottleneck):
        planes = out_chs // tv_resnet.Bottleneck.expansion
        groups = like.conv2.groups  # ResNeXt: keep the cardinality and the width per group
        base_width = like.conv1.out_channels * 64 // (groups * (like.conv3.out_channels // 4))
        down = _projection(in_chs, out_chs, stride)
        return tv_resnet.Bottleneck(in_chs, planes, stride, down, groups=groups, base_width=base_width)
    if isinstance(like, tv_resnet.BasicBlock):
        return tv_resnet.BasicBlock(in_chs, out_chs, stride, _projection(in_chs, out_chs, stride))
    if isinstance(like, nn.Sequential) and len(like) and isinstance(like[0], nn.Conv2d):
        conv = like[0]
        layers: list[nn.Module] = [nn.MaxPool2d(2, 2)] if stride > 1 else []
        layers.append(
            nn.Conv2d(in_chs, out_chs, conv.kernel_size, 1, conv.padding, bias=conv.bias is not None)
        )
        if any(isinstance(m, nn.BatchNorm2d) for m in like):
            layers.append(nn.BatchNorm2d(out_chs))
        layers.append(nn.ReLU(inplace=True))
        return nn.Sequential(*layers)
    return ResidualUnit(in_chs, out_chs, stride)


def build_units(
    start: FeatureInfo,
    targets: list[FeatureInfo],
    widen: int = 1,
    like: list[nn.Module] | None = None,
    width: int | None = None,
) -> tuple[list[nn.Module], int]:
    """New units taking ``start`` through the shapes of ``targets`` (each of the kind of the matching
    layer in ``like``; default: the CIFAR BasicBlock shape), none wider than ``width`` (if given);
    returns them and the final width."""
    units: list[nn.Module] = []
    chs, reduction = start.num_chs, start.reduction
    for i, target in enumerate(targets):
        stride = 1
        if target.reduction > reduction:  # a down-sampling is pending (official: num_pool >= 1)
            stride, reduction = 2, reduction * 2
        kind = like[i] if like is not None else None
        out = min(target.num_chs * widen, width) if width else target.num_chs * widen
        units.append(new_unit(kind, chs, out, stride))
        chs = out
    return units, chs


class AugLocalAux(nn.Module):
    def __init__(self, ctx: AuxContext, cfg: AugLocalConfig) -> None:
        super().__init__()
        if ctx.feature.fmt != "NCHW":
            raise ValueError("auglocal builds residual conv units: it needs NCHW features")
        num_layers = ctx.num_layers
        if num_layers < len(ctx.next_features) + 1:
            raise ValueError("auglocal needs AuxContext.num_layers (the whole backbone's layer count)")
        cut_after = num_layers - len(ctx.next_features) - 1
        self.depth = cfg.depth
        if cfg.pyramid:
            self.depth = pyramid_depth(cfg.depth, ctx.k, ctx.num_blocks, cfg.pyramid_coeff)
        self.layers = sample_layers(cut_after, num_layers, self.depth) if ctx.next_features else []
        targets = [ctx.next_features[j - cut_after - 1] for j in self.layers]
        like = [ctx.next_layers[j - cut_after - 1] for j in self.layers]
        units, width = build_units(ctx.feature, targets, cfg.widen, like, cfg.width or ctx.width)
        pool: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        if self.depth <= 1:
            pool.append(nn.BatchNorm1d(width))
        self.units = nn.Sequential(*units)
        self.pool = nn.Sequential(*pool)
        self.head = ctx.task.local_head(width)
        self.task = ctx.task

    def forward(self, h: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        output = self.head(self.pool(self.units(h)))
        return {"loss": self.task.loss(output, batch), "output": output}


class AugLocal(Method):
    name = "auglocal"
    paper = "Ma et al., AugLocal: Scaling Supervised Local Learning with Augmented Auxiliary Networks, ICLR 2024 (arXiv 2402.17318)"
    Config = AugLocalConfig

    def check(self, num_blocks: int) -> None:
        if self.cfg.depth < 1:
            raise ValueError(f"auglocal depth must be >= 1, got {self.cfg.depth}")
        if not 0.0 <= self.cfg.pyramid_coeff <= 1.0:
            raise ValueError(f"auglocal pyramid_coeff must lie in [0, 1], got {self.cfg.pyramid_coeff}")

    def build_aux(self, k: int, ctx: AuxContext) -> nn.Module:
        return AugLocalAux(ctx, self.cfg)
