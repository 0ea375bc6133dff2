"""DGL: Decoupled Greedy Learning (Belilovsky, Eickenberg, Oyallon, ICML 2020, arXiv 1901.08164).

Each block is trained by a small classifier on its output with cross-entropy; no gradient crosses
blocks. Two heads:

- ``mlp-sr`` (default, the official ``auxillary_classifier2`` of eugenium/DGL, PRIOR_ART §3.1):
  adaptive avg-pool to ceil(S/4) -> ``n_conv`` x [1x1 conv C->C, BN, ReLU] -> avg-pool to 2x2 ->
  (BN2d when ``n_mlp`` = 0, as the official head) -> flatten (4C) -> ``n_mlp`` x [Linear 4C->4C, BN1d,
  ReLU] -> task local head.
- ``manpp`` (the head the MAN++ / MLAAN code calls DGL, PRIOR_ART §3.3): avg-pool to 8x8 ->
  3 x [1x1 conv, BN, ReLU] to ``feature_dim`` -> GAP -> 3 x [Linear, BN1d, ReLU] at 4*feature_dim ->
  task local head. About 0.64 M parameters per head at feature_dim 128.

``width`` (ours; 0 = auto): the widest channels of either head, the paper's (none) on the listed
backbones and fitted to the backbone on outside models (``aux_budget.py``): mlp-sr's first 1x1 conv
then reduces C to ``width`` before the flatten, so its MLP is ``Linear(4w, 4w)``.

Dense tasks (``dense_head``): ``fpn`` (default) = ``n_conv`` x [1x1 conv, BN, ReLU] at the block's own
resolution, then the task's local head on that one map (detection: a local FPN whose other levels are
resampled from it and RetinaNet's 4-conv head over P3-P7; the memory-augmented MAN paper's "DGL with an
upsampling FPN", its Table 3 baseline); ``manpp`` = the official MAN++ COCO aux (``detection_aux.py``:
1x1 projection, RetinaNet subnets of ``head_convs`` layers at the block's own stride only; RetinaNet).

Deviations from the official code: the head ends in the task's ``local_head`` (a Linear for
classification), so the same head serves any task; ``NLC`` token features are pooled over tokens
first; the last block is trained by the task head alone (GAP + Linear, the backbone's own classifier),
where the official DGL puts its aux there too, with ``n_lin`` = 0 and 2 hidden MLP layers, and
evaluates through it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from locallearn.methods.base import AuxContext, Method, level_name
from locallearn.methods.detection_aux import OwnStrideDetectionAux
from locallearn.types import Batch

DENSE_WIDTH = 256  # dense tasks: the width of DGL's conv layers before the task's local head


@dataclass
class DGLConfig:
    head: str = "mlp-sr"  # eugenium/DGL --type_aux default; "manpp" = MAN++'s auxDGL head
    n_conv: int = 3  # mlp-sr: n_lin = 3
    n_mlp: int = 3  # mlp-sr: mlp_layers = 3
    feature_dim: int = 128  # manpp head: --aux_net_feature_dim 128
    # dense tasks: "fpn" (ours: 1x1 convs -> local FPN -> the task's full local head) | "manpp" (MAN++'s
    # COCO AuxiliaryDetectionHead, RetinaNet only: 1x1 projection -> subnets at the block's own stride)
    dense_head: str = "fpn"
    head_convs: int = 2  # dense_head=manpp: 3x3 conv layers per subnet (RetinaNet's main head: 4)
    # ours: the widest channels of the head (mlp-sr: its convs, and 4x that for the MLP after the 2x2
    # flatten; manpp: feature_dim). 0 = auto: the paper's widths on the listed backbones, a width
    # that fits the backbone's size on outside models (build.py); mlp-sr's MLP is quadratic in it.
    width: int = 0

    def __post_init__(self) -> None:
        if self.dense_head not in ("fpn", "manpp"):
            raise ValueError(f"dgl.dense_head must be 'fpn' or 'manpp', got {self.dense_head!r}")
        if not 0 <= self.head_convs <= 4:
            raise ValueError(
                f"dgl.head_convs must lie in 0..4 (RetinaNet's subnets have 4), got {self.head_convs}"
            )
        if self.width < 0:
            raise ValueError(f"dgl.width must be >= 0 (0 = auto), got {self.width}")


def conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def mlp(width: int, n: int) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for _ in range(n):
        layers += [nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
    return layers


class TokensToMap(nn.Module):
    """Lets a conv head read ``NLC`` tokens: drops the class token and lays patches on a square grid."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.dim() == 4:
            return h
        tokens = h[:, 1:] if math.isqrt(h.shape[1] - 1) ** 2 == h.shape[1] - 1 else h
        side = math.isqrt(tokens.shape[1])
        return tokens.transpose(1, 2).reshape(h.shape[0], h.shape[2], side, side)


class AdaptivePool(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(h, self.size)


class DGLAux(nn.Module):
    def __init__(self, ctx: AuxContext, cfg: DGLConfig) -> None:
        super().__init__()
        self.task = ctx.task
        c = ctx.feature.num_chs
        cap = cfg.width or ctx.width
        if cfg.head == "mlp-sr":
            layers: list[nn.Module] = [TokensToMap(), AdaptivePool(math.ceil(ctx.spatial() / 4))]
            w = min(c, cap) if cap else c  # the first 1x1 conv reduces to the cap before the flatten
            for i in range(cfg.n_conv):
                layers += conv_bn_relu(c if i == 0 else w, w)
            w = w if cfg.n_conv else c
            layers.append(AdaptivePool(2))
            if cfg.n_mlp == 0:  # auxillary_classifier2: BN2d before flatten only without an MLP
                layers.append(nn.BatchNorm2d(w))
            layers += [nn.Flatten(), *mlp(4 * w, cfg.n_mlp)]
            width = 4 * w
        elif cfg.head == "manpp":
            fd = min(cfg.feature_dim, cap) if cap else cfg.feature_dim
            layers = [TokensToMap(), AdaptivePool(8), *conv_bn_relu(c, fd), *conv_bn_relu(fd, fd)]
            layers += [*conv_bn_relu(fd, fd), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
            layers += [nn.Linear(fd, 4 * fd), nn.BatchNorm1d(4 * fd), nn.ReLU(inplace=True), *mlp(4 * fd, 2)]
            width = 4 * fd
        else:
            raise ValueError(f"unknown DGL head {cfg.head!r}; choose 'mlp-sr' or 'manpp'")
        self.body = nn.Sequential(*layers)
        self.head = ctx.task.local_head(width)

    def forward(self, h: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        output = self.head(self.body(h))
        return {"loss": self.task.loss(output, batch), "output": output}


class DenseDGLAux(nn.Module):
    """DGL for dense tasks: ``n_conv`` x [1x1 conv, BN, ReLU] at the block's own resolution, then the
    task's local head on that one map (detection: an FPN whose other levels are resampled from it, the
    memory-augmented MAN paper's "DGL with an upsampling FPN", its Table 3 baseline)."""

    def __init__(self, ctx: AuxContext, cfg: DGLConfig) -> None:
        super().__init__()
        self.task, c = ctx.task, ctx.feature.num_chs
        # at most DENSE_WIDTH wide: 1x1 convs at a ResNet-50's 1024/2048 channels would make every aux
        # larger than the FPN and head it feeds (ours; the paper gives no width)
        widths = [c] + [min(c, DENSE_WIDTH)] * cfg.n_conv
        self.body = nn.Sequential(*(m for a, b in zip(widths, widths[1:]) for m in conv_bn_relu(a, b)))
        feature = dataclasses.replace(ctx.feature, num_chs=widths[-1])
        self.level = level_name(ctx.feature)
        self.head = ctx.task.build_local_head({self.level: feature})

    def forward(self, h: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        output = self.head({self.level: self.body(h)})
        return {"loss": self.task.loss(output, batch), "output": output}


class DGL(Method):
    name = "dgl"
    paper = "Belilovsky et al., Decoupled Greedy Learning of CNNs, ICML 2020 (arXiv 1901.08164)"
    Config = DGLConfig

    def build_aux(self, k: int, ctx: AuxContext) -> nn.Module:
        if not ctx.task.dense:
            return DGLAux(ctx, self.cfg)
        if self.cfg.dense_head == "manpp":
            return OwnStrideDetectionAux(ctx, self.cfg.head_convs)
        return DenseDGLAux(ctx, self.cfg)
