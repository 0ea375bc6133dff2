"""Pascal VOC detection mAP, the devkit's protocol (``VOCevaldet.m``; py-faster-rcnn's ``voc_eval.py``).

Per class, detections of every image are sorted by score (descending, ties in input order) and each is
matched to the ground-truth box of its class in its image with the largest IoU. IoU >= 0.5 (the
devkit's ``ov >= minoverlap``) on a ``difficult`` box: ignored, neither TP nor FP; on a box not yet
taken: TP; on a box already taken: FP (a duplicate); below 0.5: FP. Recall is over the non-difficult
boxes; a class with none has no AP and is left out of the mean (as COCOeval leaves out a category
without ground truth), and no class with one gives ``None`` (undefined), not 0.

AP from the precision/recall curve (``method``):
- ``"11point"`` (default): the mean of the maximum precision at recall >= 0, 0.1, ..., 1.0, the
  VOC2007 devkit's measure. Every test split here is VOC2007 test (``voc`` and ``voc0712``), which is
  scored this way by its own devkit, by detectron2's ``PascalVOCDetectionEvaluator`` (``use_07_metric``
  for 2007) and by mmdetection (``eval_mode='11points'`` for VOC2007): the numbers the papers' VOC
  tables compare against.
- ``"area"``: the area under the precision curve made monotone (VOC2010+ devkit), the exact integral;
  within a point or so of 11-point on the same detections, either side (11-point samples the curve).

Boxes are continuous xyxy pixels (the loader's ``x1 = xmin - 1, x2 = xmax`` of the 1-based inclusive
XML indices), so the devkit's "+1" widths are plain differences here: the IoU is the devkit's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

METHODS = ("11point", "area")
IOU = 0.5


@dataclass
class GroundTruth:
    """One image: ``boxes`` (n, 4) xyxy, ``labels`` (n,) 0..C-1, ``difficult`` (n,) bool."""

    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray


def average_precision(recall: np.ndarray, precision: np.ndarray, method: str = "11point") -> float:
    """AP (0..1) of one class from its cumulative recall / precision (by descending score)."""
    if method == "11point":
        # t = k/10 exactly: py-faster-rcnn's np.arange(0, 1.1, 0.1) makes 0.3, 0.6, 0.7 a hair larger,
        # which drops a point at a recall of exactly 3/10, 6/10 or 7/10 (e.g. 3 of 5 boxes found)
        points = [precision[recall >= k / 10].max(initial=0.0) for k in range(11)]
        return float(np.mean(points))
    if method != "area":
        raise ValueError(f"VOC AP method must be one of {METHODS}, got {method!r}")
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision made monotone (non-increasing)
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    iw = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    ih = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = iw * ih
    union = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(union - inter, np.finfo(np.float64).eps)


def class_tp_fp(
    detections: Sequence[tuple[object, float, np.ndarray]], gt: Mapping[object, GroundTruth], label: int
) -> tuple[np.ndarray, np.ndarray]:
    """TP / FP flags of one class's ``(image, score, box)`` detections in descending score order
    (an ignored detection, on a difficult box, is neither)."""
    order = np.argsort(-np.asarray([s for _, s, _ in detections], np.float64), kind="stable")
    taken = {}
    tp, fp = np.zeros(len(order)), np.zeros(len(order))
    for rank, i in enumerate(order):
        image, _, box = detections[i]
        g = gt.get(image)
        if g is None or not (g.labels == label).any():
            fp[rank] = 1
            continue
        mine = np.flatnonzero(g.labels == label)
        overlaps = _iou(np.asarray(box, np.float64), g.boxes[mine].astype(np.float64))
        j = int(np.argmax(overlaps))
        if overlaps[j] < IOU:
            fp[rank] = 1
        elif g.difficult[mine[j]]:
            continue  # matched a difficult box: ignored
        elif (image, j) in taken:
            fp[rank] = 1  # a duplicate of a box already found
        else:
            taken[(image, j)] = True
            tp[rank] = 1
    return tp, fp


def voc_map(
    detections: Sequence[tuple[object, int, float, np.ndarray]],
    gt: Mapping[object, GroundTruth],
    num_classes: int,
    method: str = "11point",
) -> tuple[float | None, list[float | None]]:
    """(mAP, per-class AP), in percent, of ``(image, label, score, box)`` detections against ``gt``
    (every image scored, with or without boxes). None: undefined (no non-difficult box of that class)."""
    if method not in METHODS:
        raise ValueError(f"VOC AP method must be one of {METHODS}, got {method!r}")
    by_class: list[list] = [[] for _ in range(num_classes)]
    for image, label, score, box in detections:
        by_class[int(label)].append((image, float(score), box))
    per_class: list[float | None] = []
    for c in range(num_classes):
        positives = sum(int(((g.labels == c) & ~g.difficult).sum()) for g in gt.values())
        if positives == 0:
            per_class.append(None)
            continue
        tp, fp = class_tp_fp(by_class[c], gt, c)
        keep = (tp + fp) > 0  # ignored detections leave the curve unchanged
        tp, fp = np.cumsum(tp[keep]), np.cumsum(fp[keep])
        recall = tp / positives
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        per_class.append(100.0 * average_precision(recall, precision, method))
    defined = [ap for ap in per_class if ap is not None]
    return (float(np.mean(defined)) if defined else None), per_class


def ground_truth(data, image_ids) -> dict[int, GroundTruth]:
    """The ground truth of the images ``image_ids`` of a ``DetectionDataset`` (original pixels):
    its training targets plus its ``ignored`` boxes as difficult ones."""
    index = {image_id: i for i, image_id in enumerate(data.image_ids)}
    out = {}
    for image_id in image_ids:
        i = index[image_id]
        boxes = np.concatenate([data.boxes[i], data.ignored[i]]).reshape(-1, 4)
        labels = np.concatenate([data.labels[i], data.ignored_labels[i]]).astype(np.int64)
        difficult = np.arange(len(labels)) >= len(data.labels[i])
        out[image_id] = GroundTruth(boxes, labels, difficult)
    return out


def voc_map_of_rows(
    rows: Sequence[np.ndarray], image_ids, data, method: str = "11point"
) -> tuple[float | None, list[float | None]]:
    """VOC mAP of ``CocoEvaluator`` rows ``(image_id, x, y, w, h, score, category_id)`` (original
    pixels) on the images ``image_ids`` of ``data`` (a VOC ``DetectionDataset``)."""
    to_label = {c: i for i, c in enumerate(data.label_to_category)}
    dets = [
        (int(r[0]), to_label[int(r[6])], float(r[5]), np.array([r[1], r[2], r[1] + r[3], r[2] + r[4]]))
        for block in rows
        for r in block
    ]
    return voc_map(dets, ground_truth(data, sorted(image_ids)), data.num_classes, method)
