"""Super-resolution data: DIV2K's official layout, folders of HR images (Set5 / Set14 style, LR made
by bicubic down-scaling), and scikit-image's bundled CC0 photos as a tiny offline set.

Images are RGB uint8, decoded once and kept in memory (DIV2K train at x2: about 7 GB, as EDSR's
``ext=bin``). Training draws one random ``patch`` x ``patch`` LR crop per image and the matching HR crop,
then EDSR's augmentation (``common.augment``: horizontal flip, vertical flip, transpose, each with
probability 1/2); evaluation yields whole images, one per batch. Batches are ``Batch(x=LR, targets=HR)``
in [0, 1], with mean 0 and std 1 (EDSR's mean shift is part of the model).

Dataset names carry the scale: ``div2k`` (x2), ``div2k_x3``, ``div2k_x4``; likewise ``sr_folder`` and
``skimage_photos``. LR images made here use PIL's bicubic (a = -0.5, antialiased like MATLAB's
``imresize``) on the HR image cropped to a multiple of the scale.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from locallearn.data.errors import DataError
from locallearn.data.loader import EpochLoader, first_images
from locallearn.types import Batch, InputInfo

IMAGE_EXTS = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff")
DIV2K_HELP = (
    "get DIV2K_{train,valid}_HR.zip and DIV2K_{train,valid}_LR_bicubic_X{2,3,4}.zip from "
    "https://data.vision.ee.ethz.ch/cvl/DIV2K/ and unzip them under data.root"
)
DIV2K_REPEAT = 20  # EDSR: an "epoch" is 1000 batches of 16 patches = 20 passes over the 800 images
PHOTOS = {"train": ("astronaut", "coffee", "chelsea"), "test": ("rocket",)}  # skimage.data, CC0


def read_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except OSError as e:
        raise DataError(f"cannot read image {str(path)!r}: {e}") from None


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header (no decoding)."""
    try:
        with Image.open(path) as im:
            return im.size
    except OSError as e:  # PIL.UnidentifiedImageError included: not an image, whatever its suffix
        raise DataError(f"cannot read image {str(path)!r}: {e}") from None


def bicubic_lr(hr: np.ndarray, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """(LR, HR cropped to a multiple of ``scale``): PIL bicubic down-scaling."""
    h, w = hr.shape[0] // scale * scale, hr.shape[1] // scale * scale
    hr = np.ascontiguousarray(hr[:h, :w])
    return np.array(Image.fromarray(hr).resize((w // scale, h // scale), Image.BICUBIC)), hr


@dataclass
class SRDataset:
    """One split: HR files and their LR files (``None``: LR made by bicubic down-scaling)."""

    name: str
    hr_files: list[Path]
    lr_files: list[Path] | None
    scale: int
    train: bool
    patch: int = 48  # LR patch side (MAN A.4, EDSR)
    repeat: int = 1  # passes over the images per training epoch
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    num_classes: int = 3  # image channels: what the task is built with
    _cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.hr_files:
            raise DataError(f"{self.name}: no HR image")
        if self.lr_files is not None and len(self.lr_files) != len(self.hr_files):
            raise DataError(f"{self.name}: {len(self.hr_files)} HR but {len(self.lr_files)} LR images")

    @property
    def images(self) -> int:
        return len(self.hr_files)

    def __len__(self) -> int:
        return self.images * (self.repeat if self.train else 1)

    @property
    def info(self) -> InputInfo:
        return InputInfo(3, self.patch, self.mean, self.std)

    def subset(self, n: int | None) -> SRDataset:
        """The first ``n`` images (deterministic), or all of them (mean, std and patch kept)."""
        return first_images(self, n, ("hr_files", "lr_files"))

    def loader(self, batch_size: int, train: bool, seed: int = 0, augment: bool = True, num_workers: int = 0):
        """This split's loader (``make_loader`` asks the dataset), once every file is checked
        (``check_files``); images are decoded in-process."""
        self.check_files(train)
        return SRLoader(self, batch_size, train, seed, augment)

    def check_files(self, train: bool) -> None:
        """Before a run starts (no run directory yet), from the headers only: every HR / LR file is an
        image, and for training every LR image holds a ``patch`` x ``patch`` crop."""
        for i, hr in enumerate(self.hr_files):
            w, h = image_size(hr)
            if self.lr_files is not None:
                lw, lh = image_size(self.lr_files[i])
                small = f"its LR image {str(self.lr_files[i])!r} is {lw}x{lh}"
                if w < lw * self.scale or h < lh * self.scale:
                    raise DataError(
                        f"{self.name}: {str(self.lr_files[i])!r} ({lw}x{lh}) times {self.scale} exceeds "
                        f"its HR image {str(hr)!r} ({w}x{h})"
                    )
            else:
                lw, lh = w // self.scale, h // self.scale
                small = f"its x{self.scale} LR image would be {lw}x{lh}"
            if train and min(lw, lh) < self.patch:
                raise DataError(
                    f"{self.name}: {str(hr)!r} ({w}x{h}) is too small to train on: {small}, smaller than "
                    f"a {self.patch}px LR patch (HR images need {self.patch * self.scale}x{self.patch * self.scale})"
                )

    def pair(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(LR, HR) uint8 (3, h, w) / (3, h*s, w*s) of image ``i``, decoded once."""
        if i not in self._cache:
            hr = read_image(self.hr_files[i])
            if self.lr_files is None:
                lr, hr = bicubic_lr(hr, self.scale)
            else:
                lr = read_image(self.lr_files[i])
                h, w = lr.shape[0] * self.scale, lr.shape[1] * self.scale
                if hr.shape[0] < h or hr.shape[1] < w:
                    raise DataError(
                        f"{self.name}: {str(self.lr_files[i])!r} ({lr.shape[1]}x{lr.shape[0]}) times "
                        f"{self.scale} exceeds its HR image {str(self.hr_files[i])!r} ({hr.shape[1]}x{hr.shape[0]})"
                    )
                hr = hr[:h, :w]
            to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)  # noqa: E731
            self._cache[i] = (to_t(lr), to_t(hr))
        return self._cache[i]


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS) if folder.is_dir() else []


def read_div2k(root: str | Path, scale: int, split: str, train: bool) -> SRDataset:
    """``DIV2K_{split}_HR/0001.png`` with ``DIV2K_{split}_LR_bicubic/X{s}/0001x{s}.png``."""
    root = Path(root)
    hr_dir, lr_dir = root / f"DIV2K_{split}_HR", root / f"DIV2K_{split}_LR_bicubic" / f"X{scale}"
    hr = _images(hr_dir)
    if not hr or not lr_dir.is_dir():
        raise DataError(
            f"DIV2K x{scale} {split} not found: expected {str(hr_dir)!r} and {str(lr_dir)!r}; {DIV2K_HELP}"
        )
    lr = [lr_dir / f"{p.stem}x{scale}{p.suffix}" for p in hr]
    absent = [str(p) for p in lr if not p.exists()]
    if absent:
        raise DataError(f"DIV2K: {len(absent)} LR images missing, e.g. {absent[0]!r}")
    return SRDataset(f"div2k_x{scale}", hr, lr, scale, train, repeat=DIV2K_REPEAT if train else 1)


def div2k(root: str, download: bool, scale: int) -> tuple[SRDataset, SRDataset]:
    """DIV2K train (0001-0800) / valid (0801-0900), the official bicubic LR (MAN Table 5)."""
    return read_div2k(root, scale, "train", True), read_div2k(root, scale, "valid", False)


def sr_folder(root: str, download: bool, scale: int, name: str = "sr_folder") -> tuple[SRDataset, SRDataset]:
    """HR images only, LR by bicubic: ``root/train/*`` and ``root/test/*``, or, without those
    sub-folders, every image in ``root`` for both (a benchmark set such as Set5 to evaluate on)."""
    base = Path(root)
    train, test = _images(base / "train"), _images(base / "test")
    if not (train and test):
        train = test = _images(base)
    if not train:
        raise DataError(
            f"{name}: no image ({', '.join(IMAGE_EXTS)}) in {str(base.resolve())!r} or its train/, test/"
        )
    return (
        SRDataset(f"{name}_x{scale}", train, None, scale, True, repeat=16),
        SRDataset(f"{name}_x{scale}", test, None, scale, False),
    )


def write_skimage_photos(root: str | Path) -> Path:
    """scikit-image's CC0 photos as an HR folder: ``train/`` astronaut, coffee, chelsea; ``test/`` rocket."""
    try:
        from skimage import data as skdata
    except ImportError:
        raise DataError("skimage_photos needs scikit-image: pip install scikit-image") from None
    base = Path(root) / "skimage_photos"
    for split, names in PHOTOS.items():
        (base / split).mkdir(parents=True, exist_ok=True)
        for n in names:
            if not (base / split / f"{n}.png").exists():
                Image.fromarray(getattr(skdata, n)()).save(base / split / f"{n}.png")
    return base


def skimage_photos(root: str, download: bool, scale: int) -> tuple[SRDataset, SRDataset]:
    return sr_folder(str(write_skimage_photos(root)), download, scale, "skimage_photos")


def _at(reader, scale: int):
    return lambda root, download: reader(root, download, scale)


SR_DATASETS = {
    f"{name}{'' if s == 2 else f'_x{s}'}": _at(reader, s)
    for name, reader in (("div2k", div2k), ("sr_folder", sr_folder), ("skimage_photos", skimage_photos))
    for s in (2, 3, 4)
}


def augment(lr: torch.Tensor, hr: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """EDSR ``common.augment``: h-flip, v-flip, transpose (rot90 with the flips), each p = 1/2."""
    hflip, vflip, rot = (torch.rand(3, generator=gen) < 0.5).tolist()
    for flip, dim in ((hflip, -1), (vflip, -2)):
        if flip:
            lr, hr = lr.flip(dim), hr.flip(dim)
    if rot:
        lr, hr = lr.transpose(-1, -2), hr.transpose(-1, -2)
    return lr, hr


class SRLoader(EpochLoader):
    """Training: batches of random LR / HR patch pairs; evaluation: whole images, one per batch."""

    def __init__(
        self, data: SRDataset, batch_size: int, train: bool, seed: int = 0, augment: bool = True
    ) -> None:
        super().__init__(data, batch_size if train else 1, train, seed)
        self.augment = augment and train

    def __iter__(self) -> Iterator[Batch]:
        gen = self.generator()
        n, s, p = len(self.data), self.data.scale, self.data.patch
        order = torch.randperm(n, generator=gen) if self.train else torch.arange(n)
        for start in self.spans():
            lrs, hrs = [], []
            for j in order[start : start + self.batch_size].tolist():
                lr, hr = self.data.pair(j % self.data.images)
                if self.train:
                    if min(lr.shape[1:]) < p:
                        hr_file = self.data.hr_files[j % self.data.images]
                        raise DataError(
                            f"{self.data.name}: {str(hr_file)!r}: its LR image is smaller than a {p}px patch"
                        )
                    y = int(torch.randint(0, lr.shape[1] - p + 1, (1,), generator=gen))
                    x = int(torch.randint(0, lr.shape[2] - p + 1, (1,), generator=gen))
                    lr, hr = lr[:, y : y + p, x : x + p], hr[:, y * s : (y + p) * s, x * s : (x + p) * s]
                    if self.augment:
                        lr, hr = augment(lr, hr, gen)
                lrs.append(lr)
                hrs.append(hr)
            x, y = torch.stack(lrs).float().div_(255), torch.stack(hrs).float().div_(255)
            yield Batch(x, y, self.mean, self.std)
