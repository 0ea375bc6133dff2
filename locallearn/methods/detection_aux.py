"""The MAN++ COCO aux: RetinaNet's subnets at the block's own stride (``dgl.dense_head: manpp``).

The official MAN++ detection code (``Exp_on_COCO/networks/retinanet.py``, ``AuxiliaryDetectionHead``;
PRIOR_ART §6.3) trains block k of a K=4 RetinaNet-ResNet with a small head on ``s*LB(h) + (2-s)*EMA(h)``:
a 1x1 conv + ReLU projection to the FPN width (256), then RetinaNet's classification and box subnets with
``head_convs`` 3x3 conv + ReLU layers (2 here, RetinaNet's main head has 4), predicting **only at the
block's own stride** with that level's anchors: block 0 (LB/EMA = layer2[0], stride 8) -> P3, block 1 ->
P4, block 2 -> P5 plus P6/P7 made from it by stride-2 3x3 convs. No FPN, no other level, focal + L1 loss
as the main head (the task's ``loss`` on an output that names its ``levels``). What it saves against the
local-FPN aux (``dense_head: fpn``): the FPN and the four P3-P7 levels each block would otherwise run.

Parts are torchvision's: ``RetinaNetHead`` (its subnets cut to ``head_convs`` layers) and ``LastLevelP6P7``.
Initialisation is RetinaNet's (every conv N(0, 0.01) with zero bias, the class logits' bias at the prior
-log((1-0.01)/0.01)), and it is the aux's own: the module is marked with ``tasks.base.keep_init``, so the backbone init an
aux gets (``AuxContext.init_weights``) leaves it as built and the focal-loss prior survives.

Any block stride works: a map finer than P3 (plain ``dgl`` at block 0, stride 4) is average-pooled to
P3; one coarser than P5 counts as P5.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from locallearn.methods.base import AuxContext
from locallearn.tasks.base import keep_init
from locallearn.types import Batch

PRIOR = 0.01  # RetinaNet's focal-loss prior probability of the class logits at init
FIRST, LAST = 3, 5  # the pyramid levels a block can own: P3..P5 (P6/P7 come from P5)


def own_levels(reduction: int) -> tuple[int, ...]:
    """The pyramid levels an aux predicts at for a map of this stride: its own (P3, P4), or P5-P7."""
    level = min(max(round(math.log2(reduction)), FIRST), LAST)
    return (level, 6, 7) if level == LAST else (level,)


class OwnStrideDetectionAux(nn.Module):
    """1x1 projection -> (P6/P7 for the last level) -> RetinaNet subnets of ``convs`` layers at the
    map's own stride -> the task's focal / L1 loss with that level's anchors."""

    def __init__(self, ctx: AuxContext, convs: int = 2) -> None:
        super().__init__()
        task = ctx.task
        if getattr(task, "name", "") != "detection" or getattr(task.cfg, "head", "") != "retinanet":
            raise ValueError(
                "dgl.dense_head=manpp is the MAN++ COCO RetinaNet aux: it needs task.name=detection with "
                "task.detection.head=retinanet (use dense_head=fpn otherwise)"
            )
        if not 0 <= convs <= 4:
            raise ValueError(f"dgl.head_convs must lie in 0..4 (RetinaNet's subnets have 4), got {convs}")
        self.task = task
        self.levels = own_levels(ctx.feature.reduction)
        # > 1: the map is finer than its level's stride and is pooled down to it
        self.pool = max(1, 2 ** self.levels[0] // ctx.feature.reduction)
        width = task.cfg.fpn_channels
        self.project = nn.Sequential(nn.Conv2d(ctx.feature.num_chs, width, 1), nn.ReLU(inplace=True))
        self.extra = LastLevelP6P7(width, width) if len(self.levels) > 1 else None
        self.predict = RetinaNetHead(width, task.anchors_per_location, task.num_classes)
        for subnet in (self.predict.classification_head, self.predict.regression_head):
            subnet.conv = subnet.conv[:convs]
        self.init_task_weights()
        keep_init(self)  # the one mechanism by which task-derived parts keep their init (methods/base.py)

    @torch.no_grad()
    def init_task_weights(self) -> None:
        """RetinaNet's init over the whole aux (the official head's)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.predict.classification_head.cls_logits.bias, -math.log((1 - PRIOR) / PRIOR))

    def forward(self, h: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        if self.pool > 1:
            h = F.avg_pool2d(h, self.pool, ceil_mode=True)
        maps = [self.project(h)]
        if self.extra is not None:
            maps, _ = self.extra(maps, maps, ["p5"])
        out = self.predict(maps)
        out["sizes"] = [tuple(m.shape[-2:]) for m in maps]
        out["levels"] = self.levels
        return {"loss": self.task.loss(out, batch), "output": out}
