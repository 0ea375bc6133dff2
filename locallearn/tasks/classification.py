"""Image classification: GAP + FC head, cross-entropy (optional label smoothing), top-1 / top-5."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from locallearn.tasks.base import Task
from locallearn.types import Batch, FeatureInfo


@dataclass
class ClassificationConfig:
    label_smoothing: float = 0.0  # InfoPro / MAN++ train with plain CE


class Pool(nn.Module):
    """Global average pool for ``NCHW`` maps; the class token for ``NLC`` sequences."""

    def __init__(self, fmt: str) -> None:
        super().__init__()
        self.fmt = fmt

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.fmt == "NLC":
            return h[:, 0]
        return F.adaptive_avg_pool2d(h, 1).flatten(1)


class Classification(Task):
    name = "classification"
    main_metric = "top1"
    higher_is_better = True
    Config = ClassificationConfig
    # an aux's Linear head takes the aux's (backbone family's) init, as the official codes' init loops do
    keeps_head_init = False

    def __init__(self, num_classes: int, cfg: ClassificationConfig | None = None) -> None:
        self.num_classes = num_classes
        self.cfg = cfg or ClassificationConfig()

    def build_head(self, feature: FeatureInfo, bank: dict[str, FeatureInfo] | None = None) -> nn.Module:
        return nn.Sequential(Pool(feature.fmt), nn.Linear(feature.num_chs, self.num_classes))

    def local_head(self, in_features: int) -> nn.Module:
        return nn.Linear(in_features, self.num_classes)

    def loss(self, output: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(output.float(), batch.y, label_smoothing=self.cfg.label_smoothing)

    def metrics(self, output: torch.Tensor, batch: Batch) -> dict[str, float]:
        top = output.topk(min(5, self.num_classes), dim=1).indices
        hit = top == batch.y[:, None]
        out = {"top1": hit[:, 0].sum().item()}
        if self.num_classes > 5:
            out["top5"] = hit.any(dim=1).sum().item()
        return out
