"""Issue 27.1: ``data.name=digit_scenes``, scikit-learn's digits pasted onto generated backgrounds: the same
scenes from the same seed, test objects drawn from source digits no training scene uses, boxes that are
the tight boxes of the masks, targets in the formats the detection and segmentation tasks train on
(through the CLI), and bad options refused with one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from locallearn.config import ConfigError, ScenesConfig, load_config
from locallearn.data import load_datasets
from locallearn.data.errors import DataError
from locallearn.data.scenes import generate
from tests import helpers

SMALL = ScenesConfig(size=32, train_images=24, test_images=12, min_digit=10, max_digit=16)


def test_the_same_seed_gives_the_same_scenes_and_another_seed_others() -> None:
    a, b = generate(SMALL), generate(SMALL)
    for x, y in zip(a, b):
        assert np.array_equal(x.images, y.images) and np.array_equal(x.label_maps, y.label_maps)
        assert all(np.array_equal(p, q) for p, q in zip(x.boxes, y.boxes))
        assert all(np.array_equal(p, q) for p, q in zip(x.labels, y.labels))
    other = generate(ScenesConfig(**{**SMALL.__dict__, "seed": 1}))
    assert not np.array_equal(a[0].images, other[0].images)
    # each split has its own stream: more test scenes leave the training scenes as they were
    more = generate(ScenesConfig(**{**SMALL.__dict__, "test_images": 30}))
    assert np.array_equal(a[0].images, more[0].images) and np.array_equal(a[1].images, more[1].images[:12])


def test_train_and_test_scenes_share_no_source_digit() -> None:
    from sklearn.datasets import load_digits

    train, test = generate(
        ScenesConfig(size=32, train_images=400, test_images=200, min_digit=10, max_digit=16)
    )
    seen, unseen = set(np.concatenate(train.sources).tolist()), set(np.concatenate(test.sources).tolist())
    assert seen and unseen and not seen & unseen
    targets = load_digits().target
    assert set(targets[list(unseen)].tolist()) == set(range(10))  # every class is tested
    for scenes in (train, test):
        assert all(np.array_equal(targets[s], lab) for s, lab in zip(scenes.sources, scenes.labels))


def test_boxes_are_the_tight_boxes_of_the_masks() -> None:
    train, test = generate(ScenesConfig(size=48, train_images=40, test_images=10, objects=4))
    n_objects = 0
    for scenes in (train, test):
        assert scenes.images.shape[1:] == (48, 48, 3) and scenes.images.dtype == np.uint8
        for label_map, boxes, labels in zip(scenes.label_maps, scenes.boxes, scenes.labels):
            assert 1 <= len(boxes) <= 4 and boxes.dtype == np.float32
            covered = np.zeros(label_map.shape, bool)
            for (x1, y1, x2, y2), label in zip(boxes.astype(int), labels):
                inside = label_map[y1:y2, x1:x2] == label + 1
                rows, cols = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
                # the digit's pixels touch all four sides of its box
                assert (rows[0], rows[-1], cols[0], cols[-1]) == (0, y2 - y1 - 1, 0, x2 - x1 - 1)
                covered[y1:y2, x1:x2] |= inside
                n_objects += 1
            assert np.array_equal(covered, label_map > 0)  # no digit pixel outside its own box
    assert n_objects > 50


def test_the_two_views_hold_the_tasks_targets() -> None:
    det_train, det_test = load_datasets("digit_scenes", task="detection", scenes=SMALL)
    seg_train, seg_test = load_datasets("digit_scenes", task="segmentation", scenes=SMALL)
    assert det_train.num_classes == 10 and seg_train.num_classes == 11  # segmentation: + background
    assert len(det_train) == len(seg_train) == 24 and len(det_test) == len(seg_test) == 12
    assert load_datasets("digit_scenes")[0].num_classes == 10  # detection by default
    batch = next(iter(det_train.subset(4).loader(4, train=True)))
    assert batch.x.shape == (4, 3, 32, 32)
    t = batch.targets[0]
    assert t["boxes"].shape[1] == 4 and t["labels"].max() < 10 and t["size"] == (32, 32)
    assert len(det_train.subset(4).sources) == 4
    seg = next(iter(seg_test.loader(12, train=False)))
    assert seg.x.shape == (12, 3, 32, 32) and seg.targets.shape == (12, 32, 32)
    assert 0 <= int(seg.targets.min()) and int(seg.targets.max()) <= 10
    gt = det_test.coco_gt()  # the test split scores with COCOeval against its own boxes
    assert len(gt.getImgIds()) == 12 and len(gt.getAnnIds()) == sum(len(b) for b in det_test.boxes)


TINY = [
    "data.name=digit_scenes", "data.scenes.size=32", "data.scenes.min_digit=10", "data.scenes.max_digit=16",
    "data.scenes.train_images=4", "data.scenes.test_images=2", "data.batch_size=2", "data.test_batch_size=2",
    "model.backbone=resnet18", "optim.epochs=1", "optim.lr=0.001", "optim.warmup_epochs=0",
    "engine.measure_memory=false",
]  # fmt: skip
CASES = {
    "retinanet": [
        "task.name=detection",
        "task.detection.fpn_channels=16",
        "method.name=dgl",
        "model.num_blocks=2",
    ],
    "yolov1": ["task.name=detection", "task.detection.head=yolov1", "method.name=bp", "model.num_blocks=1"],
    "deeplabv3": ["task.name=segmentation", "method.name=dgl", "model.num_blocks=2"],
}


@pytest.mark.parametrize("case", CASES)
def test_two_steps_through_the_cli(tmp_path, capsys, case) -> None:
    code, _, err = helpers.run_cli(["train", *TINY, *CASES[case], f"out_dir={tmp_path}", "name=run"], capsys)
    assert code == 0, err[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dataset"] == "digit_scenes" and summary["train_images"] == 4
    assert summary["final"] is not None  # scored on the test split
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 2  # header + the one epoch of two steps


BAD = {
    "data.scenes.max_digit=200": "need min_digit <= max_digit <= size",
    "data.scenes.min_digit=4": "data.scenes.min_digit must be >= 8",
    "data.scenes.size=8": "data.scenes.size must be >= 16",
    "data.scenes.test_fraction=1": "data.scenes.test_fraction must lie in (0, 1)",
    "data.scenes.train_images=0": "data.scenes.train_images must be >= 1",
    "data.scenes.objects=two": "data.scenes.objects: expected int",
    "data.scenes.colour=red": "unknown config key 'data.scenes.colour'",
    "task.name=classification": "task.name=classification does not fit data.name=digit_scenes",
    "task.name=super_resolution": "digit_scenes holds boxes and label maps",
}


@pytest.mark.parametrize("override", BAD)
def test_bad_options_stop_with_one_line(tmp_path, capsys, override) -> None:
    args = [
        "train",
        "task.name=detection",
        "data.name=digit_scenes",
        override,
        f"out_dir={tmp_path / 'runs'}",
    ]
    code, _, err = helpers.run_cli(args, capsys, lines=True)
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert BAD[override] in err[0], err[0]
    assert not (tmp_path / "runs").exists()


def test_bad_options_are_config_errors_in_python() -> None:
    with pytest.raises(ConfigError, match="max_digit"):
        load_config(None, ["data.scenes.max_digit=10", "data.scenes.min_digit=12"])


def test_image_size_is_refused_where_no_reader_takes_it(tmp_path, capsys) -> None:
    # segmentation scenes are data.scenes.size px; data.image_size used to be ignored there without a word
    with pytest.raises(DataError, match="not digit_scenes as segmentation data"):
        load_datasets("digit_scenes", image_size=64, task="segmentation", scenes=SMALL)
    detection, _ = load_datasets("digit_scenes", image_size=64, task="detection", scenes=SMALL)
    assert detection.min_size  # the run's resize target
    args = ["train", *TINY, *CASES["deeplabv3"], "data.image_size=64", f"out_dir={tmp_path / 'runs'}"]
    code, _, err = helpers.run_cli(args, capsys, lines=True)
    assert code != 0 and len(err) == 1 and "data.image_size applies to" in err[0], err
