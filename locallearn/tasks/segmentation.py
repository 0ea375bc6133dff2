"""Semantic segmentation: DeepLabV3 (torchvision's ASPP ``DeepLabHead``), per-pixel cross-entropy,
overall / mean-class accuracy and mean IoU from one confusion matrix (MAN++ TPAMI §IV-F, Tables V-VI).

Head: ``torchvision.models.segmentation.deeplabv3.DeepLabHead(C, num_classes)`` on the last block's
output (a dilated ResNet, ``resnet50_d8`` / ``resnet101_d8``: output stride 8, as torchvision's
``deeplabv3_resnet50``). Every head returns logits at its own map's resolution; the task upsamples them
(bilinear, ``align_corners=False``, exactly what ``DeepLabV3.forward`` does) to the label map's size,
which is the input's size, in ``loss`` and in the evaluator. One place for the upsampling serves the main
head and every aux's local head at any stride, and with ``bp`` K=1 the loss equals torchvision's
``deeplabv3_resnet50(aux_loss=False)`` training loss (tests/tasks/test_segmentation.py).

Aux nets end in ``build_local_head``: conv3x3-BN-ReLU (``aux_width``) + 1x1 conv to the classes on one
map (the only map given, else the finest), a light per-pixel classifier at the cut's resolution.

Metrics (``SegmentationEvaluator``): one confusion matrix over all test pixels whose label is not
``ignore_index``; overall pixel accuracy = trace / total, mean class accuracy = mean over classes of
TP / GT pixels, mean IoU = mean over classes of TP / (GT + predicted - TP), all in percent, plus the mean
loss per labelled pixel (the training loss's reduction). A class absent from both the ground truth and the predictions (0 / 0) is left out of the
means (for mean accuracy: a class with no ground-truth pixel is left out), as mmseg's ``nanmean``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.segmentation.deeplabv3 import DeepLabHead

from locallearn.tasks.base import Evaluator, HeadRef, Task
from locallearn.types import Batch, FeatureInfo


@dataclass
class SegmentationConfig:
    ignore_index: int = 255  # Cityscapes / VOC: 255 = void / border
    aux_width: int = 128  # channels of the local heads' conv3x3 (aux nets)
    # MAN++ Table V's "ImageNet-pretrained" rows: ``model.pretrained=resnet50-0676ba61.pth`` (any task)

    def __post_init__(self) -> None:
        if self.aux_width < 1:
            raise ValueError(f"task.segmentation.aux_width must be >= 1, got {self.aux_width}")


def upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Logits (B, C, h, w) resized to ``size`` as torchvision's DeepLabV3 does (identity if equal)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts, rows = ground truth, columns = prediction, over the
    pixels whose label is not ``ignore_index`` (labels outside 0..C-1 are an error)."""
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(
            f"label map holds {int(t.min())}..{int(t.max())}; expected 0..{num_classes - 1} or {ignore_index}"
        )
    return torch.bincount(t * num_classes + p, minlength=num_classes**2).view(num_classes, num_classes).cpu()


def scores(confusion: torch.Tensor) -> dict[str, float]:
    """Overall pixel accuracy, mean class accuracy and mean IoU (percent) of a confusion matrix.
    Classes with 0 / 0 (absent from ground truth and prediction) are excluded from the means."""
    cm = confusion.double()
    tp, gt, pred = cm.diag(), cm.sum(1), cm.sum(0)
    total = cm.sum()
    union = gt + pred - tp
    acc = tp[gt > 0] / gt[gt > 0]
    iou = tp[union > 0] / union[union > 0]
    return {
        "pixel_acc": 100.0 * (tp.sum() / total).item() if total > 0 else 0.0,
        "mean_acc": 100.0 * acc.mean().item() if len(acc) else 0.0,
        "miou": 100.0 * iou.mean().item() if len(iou) else 0.0,
    }


class SegmentationEvaluator(Evaluator):
    """One confusion matrix over every labelled test pixel and the summed per-pixel loss (sums per
    batch: exact over any batching); reports the mean loss per labelled pixel. ``merge`` adds the parts'
    matrices, so a distributed evaluation scores one matrix over the whole test set."""

    def __init__(self, task: Segmentation) -> None:
        super().__init__(task)
        self.confusion = torch.zeros(task.num_classes, task.num_classes, dtype=torch.int64)

    def update(self, output: Any, batch: Batch) -> None:
        logits = self.task.logits(output, batch)
        ce = F.cross_entropy(logits, batch.targets, ignore_index=self.task.cfg.ignore_index, reduction="sum")
        self.loss_sum += ce.item()
        self.confusion += self.task.confusion(logits, batch)
        self.n = int(self.confusion.sum())  # labelled pixels: the loss is their mean, as in training

    def state(self) -> dict[str, Any]:
        return {"loss_sum": self.loss_sum, "confusion": self.confusion.clone()}

    def merge(self, states: Sequence[dict[str, Any]]) -> None:
        """One confusion matrix: the sum of every part's (mIoU is not a mean of the parts' mIoUs)."""
        self.loss_sum = sum(s["loss_sum"] for s in states)
        self.confusion = torch.stack([s["confusion"] for s in states]).sum(0)
        self.n = int(self.confusion.sum())

    def compute(self) -> dict[str, float]:
        out = scores(self.confusion)
        out["loss"] = self.loss_sum / max(self.n, 1)
        return out


class LocalSegHead(nn.Module):
    """A light per-pixel classifier for aux nets: conv3x3-BN-ReLU + 1x1 conv on one named map."""

    def __init__(self, features: dict[str, FeatureInfo], num_classes: int, width: int) -> None:
        super().__init__()
        if not features:
            raise ValueError("segmentation's local head needs at least one feature map")
        if any(f.fmt != "NCHW" for f in features.values()):
            raise ValueError("segmentation's local head needs NCHW feature maps")
        self.source = min(features, key=lambda n: features[n].reduction)  # the finest (first if tied)
        c = features[self.source].num_chs
        self.net = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, num_classes, 1),
        )

    def forward(self, maps: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.net(maps[self.source])


class Segmentation(Task):
    name = "segmentation"
    main_metric = "miou"
    higher_is_better = True
    dense = True
    Config = SegmentationConfig

    def __init__(self, num_classes: int, cfg: SegmentationConfig | None = None) -> None:
        if num_classes < 2:
            raise ValueError(f"segmentation needs at least 2 classes, got {num_classes}")
        self.num_classes = num_classes
        self.cfg = cfg or SegmentationConfig()

    def build_head(self, feature: FeatureInfo, bank: dict[str, FeatureInfo] | None = None) -> nn.Module:
        if feature.fmt != "NCHW":
            raise ValueError("segmentation's DeepLabHead needs an NCHW feature map (a CNN backbone)")
        return DeepLabHead(feature.num_chs, self.num_classes)

    def build_local_head(self, features: dict[str, FeatureInfo], shared: HeadRef | None = None) -> nn.Module:
        # ``shared`` is not used: the light head is each aux's own (DeepLab's ASPP is not shared)
        return LocalSegHead(features, self.num_classes, self.cfg.aux_width)

    def logits(self, output: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The output upsampled to the label maps' (= the input's) size, as float32."""
        return upsample(output.float(), tuple(batch.targets.shape[-2:]))

    def loss(self, output: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(self.logits(output, batch), batch.targets, ignore_index=self.cfg.ignore_index)

    @torch.no_grad()
    def confusion(self, output: torch.Tensor, batch: Batch) -> torch.Tensor:
        pred = self.logits(output, batch).argmax(1)
        return confusion_matrix(pred, batch.targets, self.num_classes, self.cfg.ignore_index)

    def metrics(self, output: torch.Tensor, batch: Batch) -> dict[str, float]:
        """Per-image sums the generic engines average over images: each image's pixel accuracy (a
        fraction). The exact test metrics (mIoU, ...) come from ``evaluator()``."""
        pred = self.logits(output, batch).argmax(1)
        valid = batch.targets != self.cfg.ignore_index
        hit = ((pred == batch.targets) & valid).flatten(1).sum(1).double()
        per_image = hit / valid.flatten(1).sum(1).clamp(min=1)
        return {"pixel_acc": per_image.sum().item()}

    def evaluator(self) -> SegmentationEvaluator:
        return SegmentationEvaluator(self)


__all__ = [
    "LocalSegHead",
    "Segmentation",
    "SegmentationConfig",
    "SegmentationEvaluator",
    "confusion_matrix",
    "scores",
    "upsample",
]
