"""Dataset readers. Each returns (train, test) ``ArrayDataset``s from the real on-disk format.

Nothing is downloaded unless ``download=True``; a missing dataset raises ``DataError`` saying where
the files are expected and how to get them. Augmentations follow PRIOR_ART §2.5: CIFAR reflect-pad 4
+ crop + flip; SVHN zero-pad 2 + crop, no flip; STL-10 zero-pad 4 + crop + flip.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from locallearn.data import imagefolder, restricted_pickle
from locallearn.data.errors import DataError
from locallearn.data.loader import ArrayDataset, Augment

CIFAR_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)  # InfoPro train.py
CIFAR_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
HALF = (0.5, 0.5, 0.5)  # SVHN / STL-10 in InfoPro
CIFAR_AUG = Augment(pad=4, pad_mode="reflect", flip=True)
FASHION_DIRS = ("fashion-mnist", "FashionMNIST/raw", "/usr/share/datasets/fashion-mnist")


OFFLINE_HINT = "For an offline run, use the embedded digits: data.name=digits (or no -c at all)."


def _missing(name: str, root: str, where: Path) -> DataError:
    return DataError(
        f"{name} not found: expected {str(where.resolve())!r} (the official / torchvision layout under "
        f"data.root={root!r}). Put the files there, point data.root at them, or run with data.download=true "
        f"on a machine with internet access. {OFFLINE_HINT}"
    )


def _download(name: str, root: str, make: Callable[[], object]) -> None:
    """Fetch a dataset with torchvision's downloader (only when the user asked for it)."""
    try:
        make()
    except (RuntimeError, OSError) as e:
        raise DataError(f"could not download {name} into {root!r}: {e}") from None


def _unpickle(path: Path) -> dict:
    """A CIFAR batch, read with a restricted unpickler: numpy arrays and plain values, no code."""
    try:
        with open(path, "rb") as f:
            return restricted_pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise DataError(f"cannot read {str(path)!r}: {e}") from None


def cifar(root: str, download: bool, classes: int) -> tuple[ArrayDataset, ArrayDataset]:
    """The python-pickle CIFAR format: ``cifar-10-batches-py/data_batch_1..5, test_batch`` or
    ``cifar-100-python/train, test``; each a dict with ``data`` (N x 3072 uint8) and labels."""
    name = f"cifar{classes}"
    folder = Path(root) / ("cifar-10-batches-py" if classes == 10 else "cifar-100-python")
    parts = (
        ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]) if classes == 10 else (["train"], ["test"])
    )
    key = "labels" if classes == 10 else "fine_labels"
    if not all((folder / f).exists() for part in parts for f in part):
        if not download:
            raise _missing(name, root, folder)
        from torchvision import datasets

        cls = datasets.CIFAR10 if classes == 10 else datasets.CIFAR100
        _download(name, root, lambda: cls(root, train=True, download=True))

    def part(f: str) -> tuple[np.ndarray, list]:
        d, where = _unpickle(folder / f), repr(str(folder / f))
        if not isinstance(d, dict) or "data" not in d or key not in d:
            raise DataError(f"{name}: {where} is not a CIFAR batch (needs the keys 'data' and {key!r})")
        data, labels = d["data"], d[key]
        if (
            not isinstance(data, np.ndarray)
            or data.dtype != np.uint8
            or data.ndim != 2
            or data.shape[1] != 3072
        ):
            shape = getattr(data, "shape", type(data).__name__)
            raise DataError(f"{name}: {where}: 'data' must be uint8 N x 3072 (3x32x32), got {shape}")
        if len(labels) != len(data):
            raise DataError(f"{name}: {where} holds {len(data)} images but {len(labels)} labels")
        return data, list(labels)

    def read(files: list[str]) -> ArrayDataset:
        parts = [part(f) for f in files]
        data = np.concatenate([d for d, _ in parts]).reshape(-1, 3, 32, 32)
        try:
            labels = torch.tensor([int(y) for _, ys in parts for y in ys], dtype=torch.int64)
        except (TypeError, ValueError):
            raise DataError(f"{name}: {str(folder)!r}: {key!r} must be integers") from None
        return _dataset(
            torch.from_numpy(data), labels, classes, CIFAR_MEAN, CIFAR_STD, CIFAR_AUG, name, folder
        )

    return read(parts[0]), read(parts[1])


def svhn(root: str, download: bool) -> tuple[ArrayDataset, ArrayDataset]:
    """``train_32x32.mat`` / ``test_32x32.mat`` (X: 32x32x3xN, y: N x 1 with 10 meaning digit 0); the
    train split only, no ``extra`` (InfoPro)."""
    files = {split: Path(root) / f"{split}_32x32.mat" for split in ("train", "test")}
    if not all(p.exists() for p in files.values()):
        if not download:
            raise _missing("svhn", root, files["train"])
        from torchvision import datasets

        for split in files:
            _download("svhn", root, lambda split=split: datasets.SVHN(root, split=split, download=True))
    from scipy.io import loadmat

    def read(path: Path) -> ArrayDataset:
        try:
            mat = loadmat(path)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {str(path)!r}: {e}") from None
        images = torch.from_numpy(np.ascontiguousarray(mat["X"].transpose(3, 2, 0, 1)))
        labels = torch.from_numpy(mat["y"].astype(np.int64).reshape(-1) % 10)
        return _dataset(images, labels, 10, HALF, HALF, Augment(pad=2, flip=False), "svhn", path)

    return read(files["train"]), read(files["test"])


def stl10(root: str, download: bool) -> tuple[ArrayDataset, ArrayDataset]:
    """``stl10_binary/{train,test}_{X,y}.bin``: column-major uint8 3x96x96 images, labels 1..10."""
    folder = Path(root) / "stl10_binary"
    names = [f"{s}_{t}.bin" for s in ("train", "test") for t in ("X", "y")]
    if not all((folder / n).exists() for n in names):
        if not download:
            raise _missing("stl10", root, folder)
        from torchvision import datasets

        _download("stl10", root, lambda: datasets.STL10(root, split="train", download=True))

    def read(split: str) -> ArrayDataset:
        x = np.fromfile(folder / f"{split}_X.bin", dtype=np.uint8)
        y = np.fromfile(folder / f"{split}_y.bin", dtype=np.uint8).astype(np.int64) - 1
        if x.size != len(y) * 3 * 96 * 96:
            raise DataError(f"{str(folder)!r}: {split}_X.bin holds {x.size} bytes for {len(y)} labels")
        images = np.ascontiguousarray(x.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2))
        if len(y) and not 0 <= y.min() <= y.max() < 10:
            raise DataError(
                f"stl10: {str(folder / f'{split}_y.bin')!r}: labels must lie in 1..10, found {y.min() + 1}..{y.max() + 1}"
            )
        aug = Augment(pad=4, flip=True)
        return _dataset(torch.from_numpy(images), torch.from_numpy(y), 10, HALF, HALF, aug, "stl10", folder)

    return read("train"), read("test")


def _dataset(images, labels, classes, mean, std, aug, name: str, where: Path) -> ArrayDataset:
    """An ``ArrayDataset``, its checks (shape, dtype, label range) reported as a ``DataError``."""
    try:
        return ArrayDataset(images, labels, classes, mean, std, aug, name)
    except ValueError as e:
        raise DataError(f"{str(where)!r}: {e}") from None


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (MNIST / Fashion-MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
        data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        return data.reshape(shape)
    except (OSError, ValueError, struct.error, EOFError) as e:
        raise DataError(f"cannot read IDX file {str(path)!r}: {e}") from None


def fashion_mnist(root: str, download: bool) -> tuple[ArrayDataset, ArrayDataset]:
    """Fashion-MNIST padded to 32x32 (CIFAR-shaped models run unchanged), 1 channel."""
    candidates = [Path(root) / d for d in FASHION_DIRS[:2]] + [Path(FASHION_DIRS[2])]
    found = next(
        (
            d
            for d in candidates
            if (d / "train-images-idx3-ubyte.gz").exists() or (d / "train-images-idx3-ubyte").exists()
        ),
        None,
    )
    if found is None and download:
        from torchvision import datasets

        _download("fashion_mnist", root, lambda: datasets.FashionMNIST(root, download=True))
        found = Path(root) / "FashionMNIST/raw"
    if found is None:
        raise DataError(
            "Fashion-MNIST not found; looked in "
            + ", ".join(repr(str(c)) for c in candidates)
            + ". Install it with `apt-get install dataset-fashion-mnist` (Debian) or run with data.download=true."
        )

    def part(prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        def path(kind: str) -> Path:
            p = found / f"{prefix}-{kind}-ubyte"
            return p if p.exists() else p.with_name(p.name + ".gz")

        images = torch.from_numpy(read_idx(path("images-idx3")).copy())
        labels = torch.from_numpy(read_idx(path("labels-idx1")).astype(np.int64))
        return torch.nn.functional.pad(images[:, None], (2, 2, 2, 2)), labels

    mean, std = (0.2860,), (0.3530,)  # Fashion-MNIST training-set statistics
    aug = Augment(pad=2, flip=True)
    return tuple(ArrayDataset(*part(p), 10, mean, std, aug, "fashion_mnist") for p in ("train", "t10k"))


def digits(root: str, download: bool) -> tuple[ArrayDataset, ArrayDataset]:
    """scikit-learn's 1,797 8x8 digits (shipped with the package): a fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy((d.images * (255 / 16)).round().astype(np.uint8))[:, None]
    labels = torch.from_numpy(d.target.astype(np.int64))
    gen = torch.Generator().manual_seed(0)
    test_mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(10):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        test_mask[idx[: len(idx) // 5]] = True
    mean, std = (0.3054,), (0.3761,)  # digits statistics (pixel / 16)
    aug = Augment(pad=1, flip=False)
    return tuple(
        ArrayDataset(images[m], labels[m], 10, mean, std, aug, "digits") for m in (~test_mask, test_mask)
    )


DATASETS: dict[str, Callable[[str, bool], tuple[ArrayDataset, ArrayDataset]]] = {
    "digits": digits,
    "fashion_mnist": fashion_mnist,
    "cifar10": lambda root, dl: cifar(root, dl, 10),
    "cifar100": lambda root, dl: cifar(root, dl, 100),
    "svhn": svhn,
    "stl10": stl10,
    "imagenet": imagefolder.imagenet,  # ImageFolder tree, streamed (not in memory), 224 px preset
    "folder": imagefolder.folder,  # any ImageFolder tree at data.image_size, named after its folder
}


def _detection(name: str) -> Callable:
    def load(root: str, download: bool):
        from locallearn.data.detection import DETECTION_DATASETS  # imported on first use

        return DETECTION_DATASETS[name](root, download)

    return load


# What each dataset's targets are (one kind, or several: digit_scenes): a task that needs others is
# refused before anything is built (build.check_config names what would fit). Datasets added below say
# theirs as they are registered.
TARGETS: dict[str, tuple[str, ...]] = dict.fromkeys(DATASETS, ("class labels",))

DETECTION = ("coco", "voc", "voc0712", "voc_sample")
DATASETS.update({n: _detection(n) for n in DETECTION})  # DetectionDataset splits
TARGETS.update(dict.fromkeys(DETECTION, ("boxes",)))


def _segmentation(name: str) -> Callable:
    def load(root: str, download: bool):
        from locallearn.data.segmentation import SEGMENTATION_DATASETS  # imported on first use

        return SEGMENTATION_DATASETS[name](root, download)

    return load


# SegmentationDataset splits
DATASETS.update({n: _segmentation(n) for n in ("cityscapes", "voc_seg", "voc_seg_sample")})
TARGETS.update(dict.fromkeys(("cityscapes", "voc_seg", "voc_seg_sample"), ("label maps",)))


def _digit_scenes(root: str, download: bool, scenes=None, task: str | None = None) -> tuple:
    from locallearn.data.scenes import digit_scenes  # imported on first use

    return digit_scenes(scenes, task)


# generated in memory (no root, no download); its own options (data.scenes) and the task pick the view
DATASETS["digit_scenes"] = _digit_scenes
TARGETS["digit_scenes"] = ("boxes", "label maps")


def _super_resolution(name: str) -> Callable:
    def load(root: str, download: bool):
        from locallearn.data.super_resolution import SR_DATASETS  # imported on first use

        return SR_DATASETS[name](root, download)

    return load


# SRDataset splits: div2k, sr_folder, skimage_photos (x2), each also _x3 / _x4
SR_NAMES = [f"{n}{x}" for n in ("div2k", "sr_folder", "skimage_photos") for x in ("", "_x3", "_x4")]
DATASETS.update({n: _super_resolution(n) for n in SR_NAMES})
TARGETS.update(dict.fromkeys(SR_NAMES, ("HR images",)))


# readers that take data.image_size / data.mean / data.std (the others have their own sizes and statistics)
SIZED = ("imagenet", "folder")
# readers that take their own options section (data.scenes) and the task, whose targets they shape
TASKED = ("digit_scenes",)


def load_datasets(
    name: str,
    root: str = "data",
    download: bool = False,
    image_size: int | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    task: str | None = None,
    scenes=None,
) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, test) of dataset ``name``; ``image_size``, ``mean`` and ``std`` reach the folder
    readers (``SIZED``); other datasets refuse ``mean`` / ``std``, and ``image_size`` unless they are
    detection data (whose ``min_size`` the run sets from it; digit_scenes' size is ``data.scenes.size``). ``task`` and ``scenes`` (a ``ScenesConfig``; None: its defaults) reach ``TASKED`` readers:
    digit_scenes as detection data (the default) or as segmentation data."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    if name not in SIZED and (mean is not None or std is not None):
        raise DataError(f"data.mean / data.std apply to {' and '.join(SIZED)} data, not {name}")
    try:
        if name in SIZED:
            return DATASETS[name](root, download, image_size, mean, std)
        if name in TASKED:
            splits = DATASETS[name](root, download, scenes, task)
        else:
            splits = DATASETS[name](root, download)
    except ValueError as e:  # ArrayDataset's own checks on a reader without a _dataset() wrapper
        raise DataError(f"{name}: {e}") from None
    if image_size is not None and not hasattr(splits[0], "min_size"):  # detection data's resize target
        raise DataError(
            f"data.image_size applies to {', '.join(SIZED)} and detection data, not {name}{_as(task)}"
        )
    return splits


def _as(task: str | None) -> str:
    return f" as {task} data" if task else ""


def load_data(data, task: str | None = None) -> tuple:
    """``load_datasets`` for a config's ``data`` section (``DataConfig``): name, root, download,
    image_size, mean, std and scenes; ``task``: the run's (``task.name``), for data that holds several
    kinds of targets (digit_scenes)."""
    return load_datasets(
        data.name, data.root, data.download, data.image_size, data.mean, data.std, task, data.scenes
    )
