"""COCO box AP through pycocotools' ``COCOeval`` (also for VOC, whose ground truth the dataset
converts to COCO in memory).

Detections arrive per batch in the resized coordinates the model saw; ``update`` maps them back to
the original image with each target's ``orig_size`` / ``size`` (per axis, the inverse of the loader's
resize) and ``compute`` runs COCOeval over the images seen so far only, so a subset of a split is
scored against its own ground truth.

A size bucket without ground truth (no box of that area in the images scored: small images, small
subsets) has no AP: COCOeval reports -1, ``compute`` gives None (undefined, an empty cell in
metrics.csv), never NaN, which would read as a diverged run.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[0:6]


@contextlib.contextmanager
def quiet(what: str) -> Iterator[None]:
    """pycocotools prints progress; send it to the log at debug level instead of stdout."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        if buf.getvalue().strip():
            log.debug("%s:\n%s", what, buf.getvalue().rstrip())


def _numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


class CocoEvaluator:
    """Accumulates detections; ``compute()`` -> AP, AP50, AP75, APs, APm, APl in percent."""

    def __init__(self, coco_gt, label_to_category: Sequence[int]) -> None:
        self.coco_gt = coco_gt
        self.to_category = np.asarray(label_to_category, dtype=np.float64)
        self.image_ids: set[int] = set()
        self.rows: list[np.ndarray] = []  # (m, 7): image_id, x, y, w, h, score, category_id

    def reset(self) -> None:
        self.image_ids.clear()
        self.rows.clear()

    def update(self, targets: Sequence[dict], detections: Sequence[dict]) -> None:
        if len(targets) != len(detections):
            raise ValueError(f"{len(targets)} targets but {len(detections)} detection dicts")
        for t, d in zip(targets, detections):
            image_id = int(t["image_id"])
            self.image_ids.add(image_id)
            boxes = _numpy(d["boxes"]).astype(np.float64).reshape(-1, 4)
            if not len(boxes):
                continue
            if "orig_size" in t and "size" in t:
                (oh, ow), (h, w) = t["orig_size"], t["size"]
                ratio = np.array([ow / w, oh / h, ow / w, oh / h])
            else:
                ratio = 1.0 / float(t.get("scale", 1.0))
            boxes = boxes * ratio
            rows = np.empty((len(boxes), 7))
            rows[:, 0] = image_id
            rows[:, 1:3] = boxes[:, :2]
            rows[:, 3:5] = boxes[:, 2:] - boxes[:, :2]
            rows[:, 5] = _numpy(d["scores"]).reshape(-1)
            rows[:, 6] = self.to_category[_numpy(d["labels"]).reshape(-1).astype(np.int64)]
            self.rows.append(rows)

    def compute(self) -> dict[str, float | None]:
        """Percent; None where undefined (no ground truth in that size bucket, or none at all)."""
        from pycocotools.cocoeval import COCOeval

        if not self.rows:  # no detection: AP 0 where there is ground truth to find
            ranges = dict(zip(("all", "small", "medium", "large"), COCOeval(iouType="bbox").params.areaRng))
            has = {name: self._has_ground_truth(rng) for name, rng in ranges.items()}
            buckets = ("all", "all", "all", "small", "medium", "large")
            return {k: (0.0 if has[b] else None) for k, b in zip(KEYS, buckets)}

        with quiet("COCOeval"):
            dt = self.coco_gt.loadRes(np.concatenate(self.rows))
            ev = COCOeval(self.coco_gt, dt, "bbox")
            ev.params.imgIds = sorted(self.image_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        return {k: (None if s < 0 else float(s) * 100) for k, s in zip(KEYS, ev.stats)}

    def _has_ground_truth(self, area_range: Sequence[float]) -> bool:
        """COCOeval's test for a bucket: a non-crowd box of the scored images with area in range."""
        anns = self.coco_gt.loadAnns(self.coco_gt.getAnnIds(imgIds=sorted(self.image_ids)))
        return any(not a.get("iscrowd", 0) and area_range[0] <= a["area"] <= area_range[1] for a in anns)
