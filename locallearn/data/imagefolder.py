"""Folder data: a torchvision ``ImageFolder`` tree (``root/train/<class>/*``, ``root/val/<class>/*``)
streamed from disk by a ``torch.utils.data.DataLoader`` with worker processes.

``data.name=folder`` reads any such tree at ``data.image_size`` (default 224) and is called by the
folder's name (``root``'s last part) in logs and titles; ``data.name=imagenet`` is the same reader
named ``imagenet``. Class names are the sub-folder names (sorted), kept as ``classes``.

Images of any size and shape become ``size`` x ``size`` with the standard ImageNet transforms the
papers use (PRIOR_ART §2.7): train RandomResizedCrop (a random 8-100% of the area at aspect 3/4-4/3,
resized to ``size``) + horizontal flip; test (and train with ``data.augment=false``) resize the
shorter side to ``size * 256/224``, then crop the centre ``size`` x ``size`` (a 96x80 photo at 64 px:
88x73, centre 64x64). Normalised with ImageNet's mean / std unless ``data.mean`` / ``data.std`` are
given. ``StreamingLoader`` keeps the in-memory ``Loader``'s interface (``set_epoch``, ``len``,
``.data``, batches of ``Batch`` carrying mean / std) so the runner treats both alike; shuffling is
seeded by (seed, epoch).
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from locallearn.data.errors import DataError, from_workers
from locallearn.data.loader import EpochLoader, Loader
from locallearn.types import Batch, InputInfo

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SIZE = 224

log = logging.getLogger(__name__)


class ImageFolderData:
    """One split of an ImageFolder tree. Decoding and transforms happen in the loader's workers."""

    def __init__(
        self,
        folder,
        train: bool,
        size: int = 224,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        name: str = "imagenet",
        indices: list[int] | None = None,
    ) -> None:
        self.folder = folder
        self.train = train
        self.size = size
        self.mean, self.std = mean, std
        self.name = name
        self.indices = indices
        self.num_classes = len(folder.classes)

    def __len__(self) -> int:
        return len(self.folder) if self.indices is None else len(self.indices)

    @property
    def classes(self) -> list[str]:
        """Class names (the sub-folder names, sorted): label i is ``classes[i]``."""
        return list(self.folder.classes)

    @property
    def info(self) -> InputInfo:
        return InputInfo(3, self.size, self.mean, self.std)

    @property
    def targets(self) -> list[int]:
        targets = self.folder.targets
        return targets if self.indices is None else [targets[i] for i in self.indices]

    def subset(self, n: int | None) -> ImageFolderData:
        """The first ``n`` images in a class-balanced, deterministic order, or all of them."""
        if n is None or n >= len(self):
            return self
        if n < 1:
            raise ValueError(f"subset size must be >= 1, got {n}")
        base = list(range(len(self.folder))) if self.indices is None else self.indices
        seen: dict[int, int] = {}
        ranked = []
        for i in base:
            c = self.folder.targets[i]
            ranked.append((seen.get(c, 0), c, i))
            seen[c] = seen.get(c, 0) + 1
        keep = sorted(i for _, _, i in sorted(ranked)[:n])
        return ImageFolderData(self.folder, self.train, self.size, self.mean, self.std, self.name, keep)

    def dataset(self):
        return self.folder if self.indices is None else Subset(self.folder, self.indices)


def read_rgb(path: str):
    """ImageFolder's image reader, with a file that does not decode (not an image, truncated) as a
    ``DataError`` naming it: it is found only when a batch reads it, often in a worker process."""
    from PIL import Image

    try:
        with open(path, "rb") as f, Image.open(f) as img:
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:  # PIL: UnidentifiedImageError is an OSError
        raise DataError(f"cannot read image {path!r}: {e}") from None


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def safe_image_folder(path: str, transform, loader):
    """torchvision's ``ImageFolder`` over ``path``, except that symbolic links are not followed blindly
    (``os.walk(followlinks=True)`` runs round a loop and files a link's target under the class the link
    sits in): every image must resolve to a file inside its own class folder, each file counts once, and
    what breaks that (a loop, a link out of its class folder, a class folder that is a link to the split
    folder or above it) is skipped and named in one warning line."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import has_file_allowed_extension

    class SafeImageFolder(ImageFolder):
        skipped: list[str]

        def find_classes(self, directory):
            self.skipped = []
            top = os.path.realpath(directory)
            classes = []
            for entry in sorted(os.scandir(directory), key=lambda e: e.name):
                if not entry.is_dir():
                    continue
                real = os.path.realpath(entry.path)
                if _inside(top, real):  # train/cat -> .. : walking it would find every class again
                    self.skipped.append(entry.path)
                    continue
                classes.append(entry.name)
            if not classes:
                raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
            return classes, {name: i for i, name in enumerate(classes)}

        def make_dataset(
            self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False
        ):
            seen_files: set[str] = set()
            samples = []
            for name, index in sorted(class_to_idx.items()):
                class_dir = os.path.join(directory, name)
                home = os.path.realpath(class_dir)
                visited = {home}
                walk = []
                for root, dirs, files in os.walk(class_dir, followlinks=True):
                    keep = []
                    for d in sorted(dirs):
                        real = os.path.realpath(os.path.join(root, d))
                        if real in visited or not _inside(real, home):  # a loop, or out of the class
                            self.skipped.append(os.path.join(root, d))
                        else:
                            visited.add(real)
                            keep.append(d)
                    dirs[:] = keep
                    walk.append((root, files))
                for root, files in sorted(walk):  # torchvision's order: a tree without links reads as before
                    for f in sorted(files):
                        path = os.path.join(root, f)
                        if not has_file_allowed_extension(path, extensions):
                            continue
                        real = os.path.realpath(path)
                        if not _inside(real, home) or real in seen_files:
                            self.skipped.append(path)
                            continue
                        seen_files.add(real)
                        samples.append((path, index))
            found = {t for _, t in samples}
            empty = sorted(name for name, i in class_to_idx.items() if i not in found)
            if empty and not allow_empty:
                raise FileNotFoundError(f"Found no valid file for the classes {', '.join(empty)}.")
            return samples

    data = SafeImageFolder(path, transform, loader=loader)
    if data.skipped:
        shown = ", ".join(repr(os.path.relpath(p, path)) for p in data.skipped[:3])
        log.warning(
            "%s: skipped %d link(s) that loop, leave their class folder or repeat an image already counted "
            "(%s%s); each image counts once, under the class folder it is in",
            path,
            len(data.skipped),
            shown,
            ", ..." if len(data.skipped) > 3 else "",
        )
    return data


def transform(train: bool, size: int):
    from torchvision import transforms as T

    if train:
        return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor()])
    return T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size), T.ToTensor()])


def folder(
    root: str,
    download: bool = False,
    size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    name: str | None = None,
) -> tuple[ImageFolderData, ImageFolderData]:
    """(train, val) of the ImageFolder tree under ``root``, ``size`` px square (default 224),
    called ``name`` (default: the folder's own name). ``DataError`` names what is missing."""
    where = Path(root).expanduser()
    name = name or where.resolve().name or "folder"
    size = size or DEFAULT_SIZE
    mean, std = tuple(mean or IMAGENET_MEAN), tuple(std or IMAGENET_STD)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise DataError(f"{name}: data.mean / data.std need 3 values (RGB) and std > 0, got {mean} / {std}")
    if download:
        raise DataError(f"{name}: folder data cannot be downloaded; put the ImageFolder tree under data.root")
    parts = []
    for split, train in (("train", True), ("val", False)):
        path = where / split
        if not path.is_dir():
            raise DataError(
                f"{name}: {str(path.resolve())!r} not found; data.root must hold train/<class>/* and "
                "val/<class>/* image files (torchvision ImageFolder layout)"
            )
        try:
            data = safe_image_folder(str(path), transform(train, size), read_rgb)
        except (FileNotFoundError, OSError) as e:
            raise DataError(f"{name}: cannot read {str(path)!r}: {e}") from None
        parts.append(ImageFolderData(data, train, size, mean, std, name))
    train_set, val_set = parts
    if len(train_set.classes) < 2:
        raise DataError(
            f"{name}: {str(where / 'train')!r} holds {len(train_set.classes)} class folder(s) "
            f"({', '.join(train_set.classes)}); a classifier needs at least two classes"
        )
    if train_set.classes != val_set.classes:
        raise DataError(
            f"{name}: train/ and val/ hold different class folders ({train_set.classes} vs {val_set.classes})"
        )
    log.info(
        "%s: %d classes (%s), %d train / %d val images at %d px",
        name,
        len(train_set.classes),
        ", ".join(train_set.classes[:10]) + (", ..." if len(train_set.classes) > 10 else ""),
        len(train_set),
        len(val_set),
        size,
    )
    return train_set, val_set


def imagenet(
    root: str, download: bool = False, size: int | None = None, mean=None, std=None
) -> tuple[ImageFolderData, ImageFolderData]:
    """ImageNet's preset: the folder reader named ``imagenet``, 224 px unless ``size`` says otherwise."""
    if download:
        raise DataError(
            "ImageNet cannot be downloaded automatically; put the ImageFolder tree under data.root"
        )
    return folder(root, False, size or DEFAULT_SIZE, mean, std, name="imagenet")


class StreamingLoader(EpochLoader):
    """Iterates ``Batch``es over an ``ImageFolderData`` with ``num_workers`` processes."""

    def __init__(
        self, data: ImageFolderData, batch_size: int, train: bool, seed: int = 0, num_workers: int = 0
    ) -> None:
        super().__init__(data, batch_size, train, seed)
        self.num_workers = num_workers

    def __iter__(self) -> Iterator[Batch]:
        gen = self.generator()
        loader = DataLoader(
            self.data.dataset(),
            batch_size=self.batch_size,
            shuffle=self.train,
            num_workers=self.num_workers,
            generator=gen,
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
        )
        for x, y in from_workers(iter(loader)):
            if len(y) < self.min_batch and self.train:  # the last one only (EpochLoader.dropped)
                break
            yield Batch((x - self.mean) / self.std, y, self.mean, self.std)


def make_loader(
    data, batch_size: int, train: bool, seed: int = 0, augment: bool = True, num_workers: int = 0
):
    """The right loader for ``data``: its own (dense-task datasets have a ``loader`` method),
    streaming for ImageFolder trees, in-memory otherwise."""
    if hasattr(data, "loader"):
        return data.loader(batch_size, train, seed, augment, num_workers)
    if isinstance(data, ImageFolderData):
        if not augment and train:
            folder = copy.copy(data.folder)  # same files, test-time transform
            folder.transform = transform(False, data.size)
            data = ImageFolderData(folder, True, data.size, data.mean, data.std, data.name, data.indices)
        return StreamingLoader(data, batch_size, train, seed, num_workers)
    return Loader(data, batch_size, train, seed, augment)
