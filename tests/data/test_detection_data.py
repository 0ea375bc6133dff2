"""COCO and VOC detection data read back from real on-disk fixtures; the loader's resize / pad / flip
geometry against torchvision's GeneralizedRCNNTransform."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from locallearn.data import DataError, load_datasets
from locallearn.data.detection import DetectionLoader, read_coco, read_voc, write_fixture

NAMES = ("cat", "dog", "person")


def canvas(h: int, w: int, boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    """Black image with a white rectangle per box (continuous xyxy)."""
    im = np.zeros((h, w, 3), np.uint8)
    for x1, y1, x2, y2 in boxes:
        im[y1:y2, x1:x2] = 255
    return im


def coco_fixture(root) -> None:
    images = [canvas(40, 60, [(5, 6, 25, 30)]), canvas(50, 30, []), canvas(30, 30, [])]
    anns = [
        [
            {"box": (5, 6, 25, 30), "label": 1},
            {"box": (30, 2, 58, 38), "label": 2, "ignore": True},  # crowd
            {"box": (10, 10, 10.5, 20), "label": 0},  # 0.5 px wide: dropped
        ],
        [{"box": (2, 3, 20, 40), "label": 0}],
        [],  # no annotation at all
    ]
    write_fixture(root, "coco", images, anns, NAMES, category_ids=(12, 3, 7))


def test_coco_json_read_back(tmp_path) -> None:
    coco_fixture(tmp_path)
    doc = json.loads((tmp_path / "annotations/instances_val2017.json").read_text())
    assert [c["id"] for c in doc["categories"]] == [7, 3, 12]  # unsorted on disk
    train, val = load_datasets("coco", str(tmp_path))
    assert (len(train), len(val), val.num_classes) == (3, 3, 3)
    assert val.label_to_category == [3, 7, 12]  # contiguous labels in sorted id order
    assert val.class_names == ("dog", "person", "cat")
    assert val.image_ids == [1, 2, 3] and val.sizes == [(40, 60), (50, 30), (30, 30)]
    np.testing.assert_array_equal(val.boxes[0], [[5, 6, 25, 30]])  # crowd and sub-pixel box are no targets
    assert val.labels[0].tolist() == [0] and val.labels[1].tolist() == [2]
    assert len(val.boxes[2]) == 0
    gt = val.coco_gt()
    assert sorted(a["iscrowd"] for a in gt.imgToAnns[1]) == [0, 0, 1]
    assert val.info.size == 600 and val.info.channels == 3
    assert len(val.subset(2)) == 2 and val.subset(2).image_ids == [1, 2]
    # Training skips the image without a target box (torchvision's reference); evaluation keeps it.
    assert len(DetectionLoader(train, 1, True)) == 2 and len(DetectionLoader(val, 1, False)) == 3
    ids = sorted(t["image_id"] for b in DetectionLoader(train, 1, True, min_size=32) for t in b.targets)
    assert ids == [1, 2]


def test_voc_xml_read_back(tmp_path) -> None:
    images = [canvas(40, 60, []), canvas(30, 50, [])]
    anns = [
        [{"box": (0, 0, 60, 40), "label": 14}, {"box": (4, 5, 20, 25), "label": 11, "ignore": True}],
        [{"box": (10, 3, 22, 29), "label": 0}],
    ]
    write_fixture(tmp_path, "voc", images, anns)
    xml = (tmp_path / "VOCdevkit/VOC2007/Annotations/000001.xml").read_text()
    assert "<xmin>1</xmin>" in xml and "<xmax>60</xmax>" in xml and "<name>person</name>" in xml
    train, test = load_datasets("voc", str(tmp_path))
    assert (len(train), len(test), test.num_classes, test.class_names[14]) == (2, 2, 20, "person")
    np.testing.assert_array_equal(test.boxes[0], [[0, 0, 60, 40]])  # 1-based inclusive -> xmin-1, xmax
    assert test.labels[0].tolist() == [14] and test.labels[1].tolist() == [0]
    np.testing.assert_array_equal(test.ignored[0], [[4, 5, 20, 25]])  # difficult: not a target
    gt = test.coco_gt()
    assert sorted((a["category_id"], a["iscrowd"]) for a in gt.imgToAnns[1]) == [(12, 1), (15, 0)]
    assert gt.imgs[2]["height"] == 30 and gt.imgs[2]["width"] == 50
    assert read_voc(tmp_path, "2007", "trainval").image_ids == [1, 2]


def test_missing_files_are_a_clear_error(tmp_path) -> None:
    with pytest.raises(DataError, match=r"instances_train2017\.json.*cocodataset\.org"):
        load_datasets("coco", str(tmp_path))
    with pytest.raises(DataError, match=r"VOC2007.*trainval\.txt.*download=true"):
        load_datasets("voc", str(tmp_path))
    write_fixture(tmp_path, "voc", [canvas(20, 20, [])], [[]])
    with pytest.raises(DataError, match=r"VOC2012"):
        load_datasets("voc0712", str(tmp_path))
    (tmp_path / "VOCdevkit/VOC2007/JPEGImages/000001.jpg").unlink()
    with pytest.raises(DataError, match=r"000001\.jpg"):
        read_voc(tmp_path)


def test_resize_and_pad_equal_torchvision(tmp_path) -> None:
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, (40, 90, 3), dtype=np.uint8),
        rng.integers(0, 256, (70, 50, 3), dtype=np.uint8),
    ]
    anns = [[{"box": (3, 4, 50, 30), "label": 0}], [{"box": (1, 2, 45, 66), "label": 1}]]
    write_fixture(tmp_path, "coco", images, anns, NAMES)
    data = read_coco(tmp_path, "val")
    batch = next(iter(DetectionLoader(data, 2, False, min_size=64, max_size=100, size_divisible=32)))
    ref = GeneralizedRCNNTransform(64, 100, data.mean, data.std, size_divisible=32).eval()
    tv_in = [
        torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) / 255 for f in data.files
    ]
    tv_targets = [
        {"boxes": torch.from_numpy(b), "labels": torch.from_numpy(lab)}
        for b, lab in zip(data.boxes, data.labels)
    ]
    tv_list, tv_t = ref(tv_in, tv_targets)
    assert batch.x.shape == tv_list.tensors.shape == (2, 3, 96, 128)  # 44x100 and 89x64, padded
    torch.testing.assert_close(batch.x, tv_list.tensors, atol=1e-5, rtol=0)
    for t, size, tv in zip(batch.targets, tv_list.image_sizes, tv_t):
        assert t["size"] == tuple(size)
        torch.testing.assert_close(t["boxes"], tv["boxes"])
    assert batch.targets[0]["orig_size"] == (40, 90) and batch.targets[0]["scale"] == pytest.approx(100 / 90)


def white_fraction(batch, k: int, box: torch.Tensor, mean, std) -> tuple[float, float]:
    """Mean brightness inside ``box`` and in a 3-px ring around it, in the un-normalised image."""
    img = (batch.x[k] * std + mean).mean(0)
    x1, y1, x2, y2 = box.round().int().tolist()
    inside = img[y1 + 1 : y2 - 1, x1 + 1 : x2 - 1].mean().item()
    ring = torch.cat(
        [img[max(y1 - 3, 0) : y1 - 1, x1:x2].flatten(), img[y2 + 1 : y2 + 3, x1:x2].flatten(),
         img[y1:y2, max(x1 - 3, 0) : x1 - 1].flatten(), img[y1:y2, x2 + 1 : x2 + 3].flatten()]
    )  # fmt: skip
    return inside, ring.mean().item()


def test_boxes_stay_on_their_pixels_through_resize_pad_and_flip(tmp_path) -> None:
    boxes = [(6, 8, 30, 20), (40, 5, 52, 35)]
    images = [canvas(40, 60, boxes[:1]), canvas(45, 70, boxes[1:])]
    anns = [[{"box": boxes[0], "label": 0}], [{"box": boxes[1], "label": 2}]]
    write_fixture(tmp_path, "coco", images, anns, NAMES)
    data = read_coco(tmp_path, "train")
    loader = DetectionLoader(data, 2, True, seed=3, min_size=80, max_size=200)
    seen_flip = set()
    for epoch in range(4):
        loader.set_epoch(epoch)
        (batch,) = list(loader)
        assert batch.x.shape[-2] % 32 == 0 and batch.x.shape[-1] % 32 == 0
        for k, t in enumerate(batch.targets):
            h, w = t["size"]
            assert (batch.x[k, :, h:] == 0).all() and (batch.x[k, :, :, w:] == 0).all()  # padded with 0
            inside, ring = white_fraction(batch, k, t["boxes"][0], loader.mean, loader.std)
            assert inside > 0.95 and ring < 0.05, (epoch, k, inside, ring)
            i = t["image_id"] - 1
            unflipped = torch.tensor(boxes[i], dtype=torch.float32) * t["scale"]
            seen_flip.add(not torch.allclose(t["boxes"][0], unflipped, atol=1e-3))
    assert seen_flip == {False, True}  # both flipped and unflipped images occurred


def test_seeded_batches_are_reproducible(tmp_path) -> None:
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (24, 32, 3), dtype=np.uint8) for _ in range(5)]
    anns = [[{"box": (2, 2, 20, 20), "label": 0}] for _ in images]
    write_fixture(tmp_path, "coco", images, anns, NAMES)
    data = read_coco(tmp_path, "train")

    def run(seed: int, epoch: int, workers: int = 0):
        loader = DetectionLoader(data, 2, True, seed=seed, min_size=32, max_size=64, num_workers=workers)
        loader.set_epoch(epoch)
        return [(b.x, [(t["image_id"], t["boxes"]) for t in b.targets]) for b in loader]

    def same(a, b) -> bool:
        return all(
            torch.equal(xa, xb) and all(i == j and torch.equal(p, q) for (i, p), (j, q) in zip(ta, tb))
            for (xa, ta), (xb, tb) in zip(a, b)
        )

    first = run(0, 0)
    assert len(first) == 3
    assert same(first, run(0, 0)) and same(first, run(0, 0, workers=1))
    assert not same(first, run(0, 1)) and not same(first, run(1, 0))


def test_voc0712_joins_both_years(tmp_path) -> None:
    write_fixture(tmp_path, "voc", [canvas(20, 30, [])], [[{"box": (1, 2, 10, 12), "label": 3}]])
    shutil.copytree(tmp_path / "VOCdevkit/VOC2007", tmp_path / "VOCdevkit/VOC2012")
    train, test = load_datasets("voc0712", str(tmp_path))
    assert (len(train), len(test), train.name) == (2, 1, "voc0712")
    assert train.image_ids == [1, 2]  # the same stem in both years: ids fall back to positions
    assert len(train.coco_gt().getImgIds()) == 2


def test_coco_annotations_that_no_image_carries_are_counted_in_one_warning(tmp_path, caplog) -> None:
    """Issue 28.14: an annotation of an image not in 'images', or a box of negative width, was dropped
    without a word."""
    coco_fixture(tmp_path)
    path = tmp_path / "annotations/instances_val2017.json"
    doc = json.loads(path.read_text())
    extra = dict(doc["annotations"][0], id=99001, image_id=4242)
    flipped = dict(doc["annotations"][0], id=99002, bbox=[20, 20, -10, 5])
    doc["annotations"] += [extra, flipped]
    path.write_text(json.dumps(doc))
    with caplog.at_level("WARNING", logger="locallearn"):
        _, val = load_datasets("coco", str(tmp_path))
    (line,) = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert "2 of " in line and "1 whose image_id is not among its 3 images, 1 with a negative width" in line
    assert val.labels[0].tolist() == [0]  # the flipped box gives no target
