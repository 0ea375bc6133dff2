"""Dataset readers. Each returns (train, test) ``ArrayDataset``s from the real on-disk format.

Nothing is downloaded unless ``download=True``; a missing dataset raises ``DataError`` saying where
the files are expected and how to get them. Augmentations follow PRIOR_ART §2.5: CIFAR reflect-pad 4
+ crop + flip; SVHN zero-pad 2 + crop, no flip; STL-10 zero-pad 4 + crop + flip.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from locallearn.data.loader import ArrayDataset, Augment


class DataError(RuntimeError):
    """A dataset is missing or unreadable."""


CIFAR_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)  # InfoPro train.py
CIFAR_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
HALF = (0.5, 0.5, 0.5)  # SVHN / STL-10 in InfoPro
CIFAR_AUG = Augment(pad=4, pad_mode="reflect", flip=True)
FASHION_DIRS = ("fashion-mnist", "FashionMNIST/raw", "/usr/share/datasets/fashion-mnist")


def _torchvision(name: str, root: str, download: bool, make: Callable[[], tuple]) -> tuple:
    try:
        return make()
    except (RuntimeError, FileNotFoundError, OSError) as e:
        if download:
            raise DataError(f"could not download {name} into {root!r}: {e}") from None
        raise DataError(
            f"{name} not found under {str(Path(root).resolve())!r} (torchvision layout). Put the files there, "
            f"point data.root at them, or run with data.download=true on a machine with internet access."
        ) from None


def _from_nhwc(data: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(data.transpose(0, 3, 1, 2)))


def cifar(root: str, download: bool, classes: int) -> tuple[ArrayDataset, ArrayDataset]:
    from torchvision import datasets

    cls = datasets.CIFAR10 if classes == 10 else datasets.CIFAR100
    name = f"cifar{classes}"

    def make():
        return cls(root, train=True, download=download), cls(root, train=False, download=download)

    train, test = _torchvision(name, root, download, make)
    return tuple(
        ArrayDataset(
            _from_nhwc(d.data), torch.tensor(d.targets), classes, CIFAR_MEAN, CIFAR_STD, CIFAR_AUG, name
        )
        for d in (train, test)
    )


def svhn(root: str, download: bool) -> tuple[ArrayDataset, ArrayDataset]:
    from torchvision import datasets

    def make():  # the train split only, no 'extra' (InfoPro)
        return (
            datasets.SVHN(root, split="train", download=download),
            datasets.SVHN(root, split="test", download=download),
        )

    train, test = _torchvision("svhn", root, download, make)
    aug = Augment(pad=2, flip=False)
    return tuple(
        ArrayDataset(
            torch.from_numpy(d.data), torch.from_numpy(d.labels.astype(np.int64)), 10, HALF, HALF, aug, "svhn"
        )
        for d in (train, test)
    )


def stl10(root: str, download: bool) -> tuple[ArrayDataset, ArrayDataset]:
    from torchvision import datasets

    def make():
        return (
            datasets.STL10(root, split="train", download=download),
            datasets.STL10(root, split="test", download=download),
        )

    train, test = _torchvision("stl10", root, download, make)
    aug = Augment(pad=4, flip=True)
    return tuple(
        ArrayDataset(
            torch.from_numpy(d.data),
            torch.from_numpy(d.labels.astype(np.int64)),
            10,
            HALF,
            HALF,
            aug,
            "stl10",
        )
        for d in (train, test)
    )


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

        _torchvision("fashion_mnist", root, True, lambda: datasets.FashionMNIST(root, download=True))
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
}


def load_datasets(name: str, root: str = "data", download: bool = False) -> tuple[ArrayDataset, ArrayDataset]:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    return DATASETS[name](root, download)
