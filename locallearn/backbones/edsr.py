"""EDSR (Lim et al., "Enhanced Deep Residual Networks for Single Image Super-Resolution", CVPRW 2017,
arXiv:1707.02921) as a flat layer list; the upsampler and tail conv belong to the super-resolution task.

Layer 0 is EDSR's head: ``MeanShift`` (subtract the DIV2K RGB mean) then a 3x3 conv to ``n_feats``;
layers 1..n are the residual units (conv-ReLU-conv, scaled by ``res_scale``, plus identity); the last
layer is the body's closing 3x3 conv. EDSR's global skip (body output + head output) is done by the
task head, which reads layer 0's output from the feature bank as ``"L0"``. Everything runs at the LR
resolution (reduction 1). Matches ``sanghyun-son/EDSR-PyTorch`` ``src/model/edsr.py`` and
``common.py`` (3x3 convs with bias, no batch norm, PyTorch's default initialisation), except that
images are in [0, 1] instead of ``rgb_range = 255`` (the mean is subtracted in the same unit).
"""

from __future__ import annotations

import torch
from torch import nn

from locallearn.backbones.base import Backbone
from locallearn.types import FeatureInfo

DIV2K_MEAN = (0.4488, 0.4371, 0.4040)  # EDSR common.MeanShift's rgb_mean (std 1)


def conv3x3(in_chs: int, out_chs: int) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, 3, padding=1, bias=True)  # EDSR common.default_conv


class Head(nn.Module):
    """``sub_mean`` then the head conv."""

    def __init__(self, in_chans: int, n_feats: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(DIV2K_MEAN[:in_chans]).view(1, -1, 1, 1), persistent=False)
        self.conv = conv3x3(in_chans, n_feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x - self.mean)


class ResBlock(nn.Module):
    """EDSR's residual unit: ``x + res_scale * conv(relu(conv(x)))``."""

    def __init__(self, n_feats: int, res_scale: float = 1.0) -> None:
        super().__init__()
        self.body = nn.Sequential(conv3x3(n_feats, n_feats), nn.ReLU(inplace=True), conv3x3(n_feats, n_feats))
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x).mul(self.res_scale)


class EDSR(Backbone):
    def __init__(self, n_resblocks: int, n_feats: int, res_scale: float, in_chans: int = 3) -> None:
        layers: list[nn.Module] = [Head(in_chans, n_feats)]
        layers += [ResBlock(n_feats, res_scale) for _ in range(n_resblocks)]
        layers.append(conv3x3(n_feats, n_feats))
        info = [FeatureInfo(n_feats, 1, stage=0)] + [FeatureInfo(n_feats, 1, stage=1)] * (n_resblocks + 1)
        super().__init__(layers, info, in_chans)
        self.n_resblocks, self.n_feats, self.res_scale = n_resblocks, n_feats, res_scale

    def stage_block_to_layer(self, stage: int, block: int) -> int:
        """``[0, 0]`` = the head conv, ``[1, b]`` = residual unit b (b = n_resblocks: the closing conv)."""
        if stage == 0 and block == 0:
            return 0
        if stage == 1 and 0 <= block <= self.n_resblocks:
            return 1 + block
        raise ValueError(f"no [stage, block] = [{stage}, {block}] in EDSR with {self.n_resblocks} units")


def _edsr(n_resblocks: int, n_feats: int, res_scale: float, in_chans: int, droprate: float) -> EDSR:
    if droprate:
        raise ValueError("EDSR has no dropout (model.droprate must be 0)")
    return EDSR(n_resblocks, n_feats, res_scale, in_chans)


def edsr_tiny(in_chans: int = 3, droprate: float = 0.0) -> EDSR:
    """4 units x 16 features: CPU smoke runs and tests only."""
    return _edsr(4, 16, 1.0, in_chans, droprate)


def edsr_baseline(in_chans: int = 3, droprate: float = 0.0) -> EDSR:
    """EDSR-baseline: 16 units x 64 features, no residual scaling (EDSR-PyTorch's defaults, 1.37M params at x2)."""
    return _edsr(16, 64, 1.0, in_chans, droprate)


def edsr(in_chans: int = 3, droprate: float = 0.0) -> EDSR:
    """EDSR (paper size): 32 units x 256 features, residual scaling 0.1 (EDSR paper §3.1)."""
    return _edsr(32, 256, 0.1, in_chans, droprate)


FACTORIES = {"edsr_tiny": edsr_tiny, "edsr_baseline": edsr_baseline, "edsr": edsr}
