"""Issues 19.7 and 22.5: malformed annotations and bad data files stop ``locallearn train`` with one line
that names the file (and the object), exit 2, before any run directory exists. One row per kind of
damage, each through the real CLI on a fixture written in the real on-disk layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from locallearn.data.detection import write_fixture
from locallearn.data.errors import DataError, from_workers
from locallearn.data.segmentation import write_voc_seg
from tests import helpers


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


BOXES = [[{"box": (4, 4, 40, 40), "label": 11}], [{"box": (8, 8, 30, 50), "label": 14}]]


def detection(root: Path, fmt: str) -> Path:
    write_fixture(root, fmt, [photo(48, 64, 0), photo(64, 48, 1)], BOXES)
    return root


def coco_json(root: Path, change) -> None:
    for split in ("train", "val"):
        path = root / "annotations" / f"instances_{split}2017.json"
        doc = json.loads(path.read_text())
        change(doc)
        path.write_text(json.dumps(doc))


def voc_xml(root: Path, old: str, new: str) -> None:
    path = root / "VOCdevkit" / "VOC2007" / "Annotations" / "000001.xml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def set_category(doc: dict) -> None:
    doc["annotations"][0]["category_id"] = 99


def set_bbox(doc: dict) -> None:
    doc["annotations"][0]["bbox"] = ["4", "x", 36, 36]


def coco_unknown_category(root: Path) -> None:
    coco_json(detection(root, "coco"), set_category)


def coco_bad_bbox(root: Path) -> None:
    coco_json(detection(root, "coco"), set_bbox)


def coco_not_a_dict(root: Path) -> None:
    detection(root, "coco")
    (root / "annotations" / "instances_train2017.json").write_text("[1, 2]")


def coco_missing_image(root: Path) -> None:
    detection(root, "coco")
    (root / "train2017" / "000000000002.jpg").unlink()


def coco_text_as_jpg(root: Path) -> None:
    detection(root, "coco")
    (root / "train2017" / "000000000002.jpg").write_text("not a picture")


def voc_unknown_class(root: Path) -> None:
    voc_xml(detection(root, "voc"), "<name>dog</name>", "<name>dogg</name>")


def voc_no_bndbox(root: Path) -> None:
    detection(root, "voc")
    voc_xml(root, "<bndbox>", "<box>")
    voc_xml(root, "</bndbox>", "</box>")


def voc_text_coordinates(root: Path) -> None:
    voc_xml(detection(root, "voc"), "<xmin>5</xmin>", "<xmin>five</xmin>")


def voc_no_name(root: Path) -> None:
    voc_xml(detection(root, "voc"), "<name>dog</name>", "")


def voc_text_as_jpg(root: Path) -> None:
    detection(root, "voc")
    (root / "VOCdevkit" / "VOC2007" / "JPEGImages" / "000002.jpg").write_bytes(b"GIF89a broken")


def segmentation(root: Path, labels=None) -> Path:
    labels = labels or [np.zeros((32, 32), np.uint8), np.ones((32, 32), np.uint8)]
    return write_voc_seg(root, [photo(32, 32, 0), photo(32, 32, 1)], labels)


def seg_label_wrong_size(root: Path) -> None:
    segmentation(root, [np.zeros((32, 32), np.uint8), np.zeros((20, 24), np.uint8)])


def seg_label_out_of_range(root: Path) -> None:
    label = np.zeros((32, 32), np.uint8)
    label[3, 4] = 40
    segmentation(root, [np.zeros((32, 32), np.uint8), label])


def seg_label_rgb(root: Path) -> None:
    base = segmentation(root)
    Image.fromarray(photo(32, 32, 2)).save(base / "SegmentationClass" / "2007_000002.png")


def seg_text_as_jpg(root: Path) -> None:
    base = segmentation(root)
    (base / "JPEGImages" / "2007_000002.jpg").write_text("not a picture")


def sr_folder(root: Path, small: bool = False) -> None:
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
        Image.fromarray(photo(120, 112, 0)).save(root / split / "a.png")
        Image.fromarray(photo(120, 80 if small else 112, 1)).save(root / split / "b.png")


def sr_smaller_than_patch(root: Path) -> None:
    sr_folder(root, small=True)  # x2: a 60x40 LR image, the patch is 48


def sr_text_as_png(root: Path) -> None:
    sr_folder(root)
    (root / "train" / "b.png").write_text("not a picture")


SEG = ["task.name=segmentation", "data.name=voc_seg", "model.backbone=resnet18"]
SR = ["task.name=super_resolution", "data.name=sr_folder", "model.backbone=edsr_tiny"]
CASES = {  # damage -> (config, words the line must hold: the file, the object, what is wrong)
    "coco category_id not in categories": (
        coco_unknown_category,
        ["task.name=detection", "data.name=coco", "model.backbone=resnet18"],
        ["instances_train2017.json", "annotation 2000 (image 1)", "category_id 99", "not in 'categories'"],
    ),
    "coco bbox not numbers": (
        coco_bad_bbox,
        ["task.name=detection", "data.name=coco", "model.backbone=resnet18"],
        ["instances_train2017.json", "annotation 2000 (image 1)", "4 numbers", "'x'"],
    ),
    "coco file not a dict": (
        coco_not_a_dict,
        ["task.name=detection", "data.name=coco", "model.backbone=resnet18"],
        ["instances_train2017.json", "not a COCO instances file"],
    ),
    "coco image missing": (
        coco_missing_image,
        ["task.name=detection", "data.name=coco", "model.backbone=resnet18"],
        ["1 of 2 image files are missing", "train2017/000000000002.jpg"],
    ),
    "coco text file as .jpg": (
        coco_text_as_jpg,
        ["task.name=detection", "data.name=coco", "model.backbone=resnet18"],
        ["train2017/000000000002.jpg", "not a readable image"],
    ),
    "voc unknown class name": (
        voc_unknown_class,
        ["task.name=detection", "data.name=voc", "model.backbone=resnet18"],
        ["Annotations/000001.xml", "object 1 (dogg)", "unknown class name 'dogg'"],
    ),
    "voc object without bndbox": (
        voc_no_bndbox,
        ["task.name=detection", "data.name=voc", "model.backbone=resnet18"],
        ["Annotations/000001.xml", "object 1 (dog)", "no <bndbox>"],
    ),
    "voc bndbox not numbers": (
        voc_text_coordinates,
        ["task.name=detection", "data.name=voc", "model.backbone=resnet18"],
        ["Annotations/000001.xml", "object 1 (dog)", "needs numbers", "'five'"],
    ),
    "voc object without name": (
        voc_no_name,
        ["task.name=detection", "data.name=voc", "model.backbone=resnet18"],
        ["Annotations/000001.xml", "object 1 (no <name>)", "unknown class name ''"],
    ),
    "voc non-image .jpg": (
        voc_text_as_jpg,
        ["task.name=detection", "data.name=voc", "model.backbone=resnet18"],
        ["JPEGImages/000002.jpg", "not a readable image"],
    ),
    "segmentation label map of the wrong size": (
        seg_label_wrong_size,
        SEG,
        ["SegmentationClass/2007_000002.png", "is 24x20", "2007_000002.jpg", "is 32x32"],
    ),
    "segmentation class out of range": (
        seg_label_out_of_range,
        SEG,
        ["SegmentationClass/2007_000002.png", "holds label 40", "0..20 or 255"],
    ),
    "segmentation RGB label map": (
        seg_label_rgb,
        SEG,
        ["SegmentationClass/2007_000002.png", "is a RGB image"],
    ),
    "segmentation text file as .jpg": (
        seg_text_as_jpg,
        SEG,
        ["JPEGImages/2007_000002.jpg", "not a readable image"],
    ),
    "sr image smaller than a patch": (
        sr_smaller_than_patch,
        SR,
        ["train/b.png", "(80x120)", "40x60", "48px LR patch"],
    ),
    "sr text file as .png": (
        sr_text_as_png,
        SR,
        ["train/b.png", "cannot read image"],
    ),
}


@pytest.mark.parametrize("damage", list(CASES))
def test_bad_data_stops_in_one_line_before_the_run_directory(tmp_path, capsys, damage) -> None:
    write, config, words = CASES[damage]
    root, out = tmp_path / "data", tmp_path / "runs"
    root.mkdir()
    write(root)
    args = ["train", *config, f"data.root={root}", "method.name=bp", "model.num_blocks=1",
            "engine.device=cpu", f"out_dir={out}", "name=r"]  # fmt: skip
    code, _, err = helpers.run_cli(args, capsys, lines=True)
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith("locallearn: error: ")
    missing = [w for w in words if w not in err[0]]
    assert not missing, (missing, err[0])
    assert not out.exists()  # no run directory for a run that never started


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("damage", ["text", "truncated"])
def test_a_broken_image_in_a_folder_tree_stops_training_in_one_line(
    tmp_path, capsys, damage, workers
) -> None:
    """ImageFolder lists files by name; one that does not decode is found when a batch reads it."""
    root = tmp_path / "data"
    for split in ("train", "val"):
        for c, name in enumerate(("cat", "dog")):
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(photo(20, 24, 10 * c + i)).save(root / split / name / f"{i}.jpg")
    bad = root / "train" / "dog" / "1.jpg"
    bad.write_bytes(b"not a picture" if damage == "text" else bad.read_bytes()[: len(bad.read_bytes()) // 2])
    args = ["train", "data.name=folder", f"data.root={root}", "data.image_size=16", "model.backbone=resnet18",
            "model.num_blocks=1", "method.name=bp", "engine.device=cpu", "data.batch_size=4",
            f"data.num_workers={workers}", "engine.measure_memory=false", f"out_dir={tmp_path / 'runs'}",
            "name=r"]  # fmt: skip
    code, _, err = helpers.run_cli(args, capsys, lines=True)
    errors = [line for line in err if line.startswith("locallearn: error:")]
    assert code == 2 and len(errors) == 1 and not any("Traceback" in line for line in err), err
    assert "dog/1.jpg" in errors[0] and "cannot read image" in errors[0], errors


@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.slow)])  # a worker: ~7 s
def test_a_file_broken_past_its_header_stops_training_in_one_line(tmp_path, capsys, workers) -> None:
    """A truncated JPEG passes the header check and fails only when training decodes it; with worker
    processes too, the line is the worker's own message, not torch's re-raised traceback."""
    root = detection(tmp_path / "data", "voc")
    jpg = root / "VOCdevkit" / "VOC2007" / "JPEGImages" / "000002.jpg"
    jpg.write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) // 2])
    args = ["train", "task.name=detection", "data.name=voc", f"data.root={root}", "model.backbone=resnet18",
            "model.num_blocks=1", "method.name=bp", "engine.device=cpu", "data.image_size=32",
            "task.detection.fpn_channels=8", f"data.num_workers={workers}", "engine.measure_memory=false",
            f"out_dir={tmp_path / 'runs'}", "name=r"]  # fmt: skip
    code, _, err = helpers.run_cli(args, capsys, lines=True)
    errors = [line for line in err if line.startswith("locallearn: error:")]
    assert code == 2 and len(errors) == 1 and not any("Traceback" in line for line in err), err
    assert "JPEGImages/000002.jpg" in errors[0] and "truncated" in errors[0]


class Broken(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> int:
        if i == 1:
            raise DataError("cannot read image 'b.jpg': image file is truncated")
        return i


def test_a_worker_data_error_keeps_its_one_line_message() -> None:
    loader = torch.utils.data.DataLoader(Broken(), batch_size=1, num_workers=1)
    with pytest.raises(DataError) as caught:
        list(from_workers(iter(loader)))
    assert str(caught.value) == "cannot read image 'b.jpg': image file is truncated"
