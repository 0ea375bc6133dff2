"""Object detection: RetinaNet built from torchvision's parts, or YOLOv1, on a backbone's last stages.

RetinaNet (Lin et al. 2017; MAN++ Table IV, memory-augmented MAN Tables 2-4): the head is
torchvision's ``FeaturePyramidNetwork`` over C3-C5 with P6/P7 from P5 (``LastLevelP6P7``, as
``retinanet_resnet50_fpn``) and torchvision's ``RetinaNetHead`` (classification + box subnets); anchors,
matching, the focal and L1 losses, box decoding, score threshold, top-k and NMS are torchvision's own
``RetinaNet.compute_loss`` / ``postprocess_detections``, called on a helper that holds no part of the
model. C5 is the last block's live output; C3 and C4 come from the feature bank (written detached by
the blocks that own those layers), so the head's loss trains only the last block and the head.

Aux nets of detection end in ``build_local_head``: a *local FPN* over whatever named maps the aux
hands it (DGL: its own map only; SLM: replica maps plus bank maps). A level the aux cannot provide is
resampled from the nearest map it has (average pooling down, nearest-neighbour up: the "upsampling
FPN" the memory-augmented MAN paper gives DGL). With ``shared`` the aux uses the main head's
prediction layers (the paper's shared head, Table 4) through a ``HeadRef``; see tasks/base.py for how
their gradients are stepped.

YOLOv1 (``head: yolov1``): ``tasks/yolo.py`` on the last map (C5), the paper's loss weights.

Targets are per-image dicts ``{"boxes" (n, 4) xyxy in input pixels, "labels" (n,) 0..C-1, "image_id",
"orig_size", "size", "scale"}`` (data/detection.py); test metrics are COCO AP / AP50 / AP75 / APs / APm /
APl from pycocotools' COCOeval (metrics/coco_eval.py) against the test split bound with ``bind``;
on VOC data the main metric is VOC mAP (IoU 0.5, ``difficult`` ignored: metrics/voc_map.py).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

from locallearn.metrics.voc_map import METHODS as VOC_AP_METHODS
from locallearn.tasks.base import Evaluator, HeadRef, Task
from locallearn.tasks.yolo import YoloLocalHead, YoloV1Head, yolo_v1_decode, yolo_v1_loss
from locallearn.types import Batch, FeatureBank, FeatureInfo

HEADS = ("retinanet", "yolov1")


@dataclass
class DetectionConfig:
    head: str = "retinanet"  # retinanet | yolov1
    fpn_channels: int = 256  # torchvision retinanet_resnet50_fpn
    score_thresh: float = 0.05  # torchvision RetinaNet defaults
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    topk_candidates: int = 1000
    # base anchor size on P3..P7 (x 2^0, 2^(1/3), 2^(2/3), ratios 0.5/1/2): torchvision's 32..512, i.e.
    # 4x each level's stride, for images of ~600-800 px; smaller images may want smaller anchors
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    yolo_grid: int = 7  # YOLOv1: S = 7, B = 2, lambda_coord 5, lambda_noobj 0.5 (Redmon et al. 2016)
    yolo_boxes: int = 2
    yolo_l_coord: float = 5.0
    yolo_l_noobj: float = 0.5
    # VOC data's main metric, VOC mAP at IoU 0.5: "11point" (VOC2007 devkit, the protocol of the VOC2007
    # test split every VOC set here is scored on) or "area" (VOC2010+); metrics/voc_map.py says why
    voc_ap: str = "11point"

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"task.detection.head must be one of {HEADS}, got {self.head!r}")
        for key in ("fpn_channels", "detections_per_img", "topk_candidates", "yolo_grid", "yolo_boxes"):
            if getattr(self, key) < 1:
                raise ValueError(f"task.detection.{key} must be >= 1, got {getattr(self, key)}")
        if len(self.anchor_sizes) != 5 or min(self.anchor_sizes) < 1:
            raise ValueError(
                f"task.detection.anchor_sizes must be 5 sizes >= 1 (P3..P7), got {self.anchor_sizes}"
            )
        if self.voc_ap not in VOC_AP_METHODS:
            raise ValueError(f"task.detection.voc_ap must be one of {VOC_AP_METHODS}, got {self.voc_ap!r}")
        for key in ("score_thresh", "nms_thresh"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"task.detection.{key} must lie in [0, 1], got {getattr(self, key)}")


def stride_of(name: str) -> int:
    """``"C3"`` -> 8; any other name (``"input"``) counts as stride 1."""
    return 2 ** int(name[1:]) if name.startswith("C") and name[1:].isdigit() else 1


def resample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="nearest")


def default_anchors(base: Sequence[int] = (32, 64, 128, 256, 512)) -> AnchorGenerator:
    """torchvision's RetinaNet anchors: 3 scales x 3 ratios per level, ``base`` px on P3..P7."""
    sizes = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in base)
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))


class _Channels(nn.Module):
    """Stands in for RetinaNet's backbone in the loss/post-processing helper (never run)."""

    def __init__(self, out_channels: int) -> None:
        super().__init__()
        self.out_channels = out_channels


class Pyramid(nn.Module):
    """FPN over named maps (sorted by stride), P6/P7 from P5, then RetinaNet's prediction layers."""

    def __init__(
        self, in_chs: list[int], channels: int, predict: nn.Module | None, shared: HeadRef | None
    ) -> None:
        super().__init__()
        self.fpn = FeaturePyramidNetwork(in_chs, channels, extra_blocks=LastLevelP6P7(channels, channels))
        self.predict = predict  # None: the main head's, through ``shared``
        self._shared = shared

    def run(self, maps: list[torch.Tensor]) -> dict[str, Any]:
        feats = list(self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps))).values())
        predict = self.predict if self.predict is not None else self._shared()
        out = predict(feats)
        out["sizes"] = [tuple(f.shape[-2:]) for f in feats]
        return out


class RetinaNetMainHead(Pyramid):
    """The last block's head: FPN over C3, C4 (from the bank) and C5 (the live output)."""

    reads = ("C3", "C4")

    def __init__(self, in_chs: list[int], num_classes: int, cfg: DetectionConfig) -> None:
        predict = RetinaNetHead(
            cfg.fpn_channels, default_anchors().num_anchors_per_location()[0], num_classes
        )
        super().__init__(in_chs, cfg.fpn_channels, predict, None)

    def forward(self, h: torch.Tensor, bank: FeatureBank) -> dict[str, Any]:
        return self.run([bank.read("C3"), bank.read("C4"), h])


class RetinaNetLocalHead(Pyramid):
    """An aux's detection head: a local FPN over the maps it is given, resampling missing levels."""

    def __init__(
        self,
        features: dict[str, FeatureInfo],
        levels: tuple[str, ...],
        num_classes: int,
        cfg: DetectionConfig,
        shared: HeadRef | None,
    ) -> None:
        given = sorted(features, key=lambda n: features[n].reduction)
        # for each level, the given map nearest in stride (log scale) that stands in for it
        self.sources = [
            min(given, key=lambda n, lv=lv: abs(math.log2(features[n].reduction / stride_of(lv))))
            for lv in levels
        ]
        self.ratios = [features[src].reduction / stride_of(lv) for src, lv in zip(self.sources, levels)]
        predict = None
        if shared is None:
            predict = RetinaNetHead(
                cfg.fpn_channels, default_anchors().num_anchors_per_location()[0], num_classes
            )
        else:
            shared.lend("predict")  # the main head's RetinaNet subnets; the local FPN is the aux's own
        super().__init__([features[s].num_chs for s in self.sources], cfg.fpn_channels, predict, shared)

    def forward(self, maps: dict[str, torch.Tensor]) -> dict[str, Any]:
        inputs = []
        for src, ratio in zip(self.sources, self.ratios):
            m = maps[src]
            size = (math.ceil(m.shape[-2] * ratio), math.ceil(m.shape[-1] * ratio))
            inputs.append(resample(m, size))
        return self.run(inputs)


class DetectionEvaluator(Evaluator):
    """Mean loss over images, and COCO AP of the post-processed detections (when a split is bound)."""

    def __init__(self, task: Detection) -> None:
        super().__init__(task)
        self.coco = None
        if task.eval_data is not None:
            from locallearn.metrics.coco_eval import CocoEvaluator

            self.coco = CocoEvaluator(task.eval_data.coco_gt(), task.eval_data.label_to_category)

    def update(self, output: Any, batch: Batch) -> None:
        self.loss_sum += self.task.loss(output, batch).item() * len(batch)
        self.n += len(batch)
        if self.coco is not None:
            self.coco.update(batch.targets, self.task.detect(output, batch))

    def compute(self) -> dict[str, float | None]:
        out = self.coco.compute() if self.coco is not None else {}
        data = self.task.eval_data
        if self.coco is not None and getattr(data, "protocol", "coco") == "voc":  # VOC mAP first
            from locallearn.metrics.voc_map import voc_map_of_rows

            voc, _ = voc_map_of_rows(self.coco.rows, self.coco.image_ids, data, self.task.cfg.voc_ap)
            out = {"voc_mAP": voc, **out}
        out["loss"] = self.loss_sum / max(self.n, 1)
        return out

    def state(self) -> dict[str, Any]:
        state = super().state()
        if self.coco is not None:  # the detections themselves: COCOeval runs once over all of them
            state["image_ids"], state["rows"] = set(self.coco.image_ids), list(self.coco.rows)
        return state

    def merge(self, states: Sequence[dict[str, Any]]) -> None:
        super().merge(states)
        if self.coco is not None:
            self.coco.reset()
            for s in states:
                self.coco.image_ids.update(s["image_ids"])
                self.coco.rows.extend(s["rows"])


class Detection(Task):
    name = "detection"
    main_metric = "AP"
    block_metric = "AP50"  # per block: the aux's detections at IoU 0.5 (the dense proofs' metric)
    higher_is_better = True
    dense = True
    Config = DetectionConfig

    def __init__(self, num_classes: int, cfg: DetectionConfig | None = None) -> None:
        self.num_classes = num_classes
        self.cfg = cfg or DetectionConfig()
        self.eval_data = None
        if self.cfg.head == "retinanet":
            self.levels, self.reads = ("C3", "C4", "C5"), RetinaNetMainHead.reads
            # torchvision's RetinaNet for its loss and post-processing only: its modules are not ours
            self._retina = RetinaNet(
                _Channels(self.cfg.fpn_channels),
                num_classes,
                anchor_generator=default_anchors(self.cfg.anchor_sizes),
                score_thresh=self.cfg.score_thresh,
                nms_thresh=self.cfg.nms_thresh,
                detections_per_img=self.cfg.detections_per_img,
                topk_candidates=self.cfg.topk_candidates,
            )
            self.anchors_per_location = self._retina.anchor_generator.num_anchors_per_location()[0]
            self._level_anchors: dict[tuple[int, ...], AnchorGenerator] = {}
        else:  # the aux nets also read the banked stage maps, as RetinaNet's do (tasks/yolo.py)
            self.levels, self.reads, self.local_reads = ("C5",), (), ("C3", "C4")
        self.main_chs = 0

    def setup(self, final: FeatureInfo, bank: dict[str, FeatureInfo]) -> None:
        self.main_chs = final.num_chs

    def bind(self, test_data) -> None:
        """The test split whose COCO ground truth the evaluator scores against; VOC data (its
        ``protocol``) makes VOC mAP the main metric, COCO AP staying as extra columns."""
        self.eval_data = test_data if hasattr(test_data, "coco_gt") else None
        voc = getattr(self.eval_data, "protocol", "coco") == "voc"
        self.main_metric = "voc_mAP" if voc else type(self).main_metric

    # -- heads ---------------------------------------------------------------------------------
    def build_head(self, feature: FeatureInfo, bank: dict[str, FeatureInfo] | None = None) -> nn.Module:
        if self.cfg.head == "yolov1":
            return YoloV1Head(feature.num_chs, self.num_classes, self.cfg.yolo_grid, self.cfg.yolo_boxes)
        bank = bank or {}
        return RetinaNetMainHead(
            [bank["C3"].num_chs, bank["C4"].num_chs, feature.num_chs], self.num_classes, self.cfg
        )

    def build_local_head(self, features: dict[str, FeatureInfo], shared: HeadRef | None = None) -> nn.Module:
        if self.cfg.head == "yolov1":
            grid, boxes = self.cfg.yolo_grid, self.cfg.yolo_boxes
            fuse = self.local_reads  # C3 / C4, from the bank or the aux's own replica
            return YoloLocalHead(features, self.main_chs, self.num_classes, grid, boxes, fuse, shared)
        return RetinaNetLocalHead(features, self.levels, self.num_classes, self.cfg, shared)

    def shrink_options(self) -> list[str]:
        # RetinaNet's local heads are FPNs of ``fpn_channels`` (ResNet-18 K=4 DGL: 24.5 M -> 2.0 M
        # aux parameters at 64; the main head narrows too); YOLOv1's do not read it
        narrower = self.cfg.head == "retinanet" and self.cfg.fpn_channels > 64
        return ["task.detection.fpn_channels=64"] if narrower else []

    # -- loss and detections ---------------------------------------------------------------------
    def anchors(self, output: dict[str, Any], batch: Batch) -> list[torch.Tensor]:
        x = batch.x
        images = ImageList(x, [tuple(t["size"]) for t in batch.targets])
        grids = [
            torch.empty((0, 0, *s), dtype=output["cls_logits"].dtype, device=x.device)
            for s in output["sizes"]
        ]
        return self.anchor_generator(output.get("levels"))(images, grids)

    def anchor_generator(self, levels: Sequence[int] | None = None) -> AnchorGenerator:
        """The anchors of P3..P7, or of the pyramid ``levels`` an output names (an aux predicting
        at its own stride only: ``methods/detection_aux.py``)."""
        if levels is None:
            return self._retina.anchor_generator
        key = tuple(levels)
        if key not in self._level_anchors:
            self._level_anchors[key] = default_anchors([self.cfg.anchor_sizes[lv - 3] for lv in key])
        return self._level_anchors[key]

    def loss(self, output: Any, batch: Batch) -> torch.Tensor:
        if self.cfg.head == "yolov1":
            return yolo_v1_loss(
                output.float(),
                batch.targets,
                tuple(batch.x.shape[-2:]),
                self.num_classes,
                self.cfg.yolo_grid,
                self.cfg.yolo_boxes,
                self.cfg.yolo_l_coord,
                self.cfg.yolo_l_noobj,
            )["loss"]
        outputs = {k: output[k].float() for k in ("cls_logits", "bbox_regression")}
        losses = self._retina.compute_loss(batch.targets, outputs, self.anchors(output, batch))
        return losses["classification"] + losses["bbox_regression"]

    @torch.no_grad()
    def detect(self, output: Any, batch: Batch) -> list[dict[str, torch.Tensor]]:
        """Post-processed detections per image, in the batch's (resized) pixel coordinates."""
        sizes = [tuple(t["size"]) for t in batch.targets]
        if self.cfg.head == "yolov1":
            return yolo_v1_decode(
                output.float(),
                tuple(batch.x.shape[-2:]),
                sizes,
                self.cfg.score_thresh,
                self.cfg.nms_thresh,
                self.cfg.detections_per_img,
                num_classes=self.num_classes,
                boxes=self.cfg.yolo_boxes,
            )
        anchors = self.anchors(output, batch)
        hw = [h * w for h, w in output["sizes"]]
        per_loc = output["cls_logits"].shape[1] // sum(hw)
        counts = [n * per_loc for n in hw]
        split = {k: list(output[k].float().split(counts, dim=1)) for k in ("cls_logits", "bbox_regression")}
        split_anchors = [list(a.split(counts)) for a in anchors]
        return self._retina.postprocess_detections(split, split_anchors, sizes)

    def metrics(self, output: Any, batch: Batch) -> dict[str, float]:
        return {}

    def evaluator(self) -> Evaluator:
        return DetectionEvaluator(self)
