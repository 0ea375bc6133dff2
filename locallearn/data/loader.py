"""In-memory datasets and a batch loader with the papers' augmentations done on whole batches.

All supported image datasets fit in memory as uint8 (CIFAR-10: 150 MB), so the loader keeps them as
one tensor and crops / flips / normalises a whole batch at once (the airbench approach) instead of
one PIL image at a time. Shuffling and augmentation draw from the loader's own generator, seeded by
(seed, epoch): an epoch is the same whether or not the run was interrupted before it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from locallearn.types import Batch, InputInfo


def first_images(dataset, n: int | None, per_image: tuple[str, ...]):
    """The first ``n`` images (deterministic) of a dataclass dataset held as parallel per-image lists
    named ``per_image`` (a list may be None), or ``dataset`` itself when ``n`` is None or covers it."""
    if n is None or n >= len(getattr(dataset, per_image[0])):
        return dataset
    if n < 1:
        raise ValueError(f"subset size must be >= 1, got {n}")
    lists = {k: getattr(dataset, k) for k in per_image}
    return replace(dataset, **{k: v if v is None else v[:n] for k, v in lists.items()})


@dataclass(frozen=True)
class Augment:
    pad: int = 0  # random crop back to the original size after padding by this much
    pad_mode: str = "constant"  # "reflect" for CIFAR (InfoPro), zeros for SVHN / STL-10
    flip: bool = False


@dataclass
class ArrayDataset:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: Augment = Augment()
    name: str = ""

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.images.dtype != torch.uint8:
            raise ValueError(
                f"{self.name}: images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if len(self.images) != len(self.labels):
            raise ValueError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels")
        if len(self.labels) and not 0 <= int(self.labels.min()) <= int(self.labels.max()) < self.num_classes:
            raise ValueError(
                f"{self.name}: labels must lie in 0..{self.num_classes - 1}, found "
                f"{int(self.labels.min())}..{int(self.labels.max())}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def info(self) -> InputInfo:
        return InputInfo(self.images.shape[1], self.images.shape[2], self.mean, self.std)

    def subset(self, n: int | None) -> ArrayDataset:
        """The first ``n`` images in a class-balanced order (deterministic), or all of them."""
        if n is None or n >= len(self):
            return self
        if n < 1:
            raise ValueError(f"subset size must be >= 1, got {n}")
        # Interleave classes: the i-th image of each class before the (i+1)-th of any class.
        order = torch.argsort(self.labels, stable=True)
        rank = torch.empty_like(order)
        counts = torch.bincount(self.labels, minlength=self.num_classes)
        starts = torch.cumsum(counts, 0) - counts
        rank[order] = torch.arange(len(order)) - starts[self.labels[order]]
        keep = torch.argsort(rank * self.num_classes + self.labels, stable=True)[:n].sort().values
        return ArrayDataset(
            self.images[keep],
            self.labels[keep],
            self.num_classes,
            self.mean,
            self.std,
            self.augment,
            self.name,
        )


def random_crop(x: torch.Tensor, pad: int, mode: str, gen: torch.Generator) -> torch.Tensor:
    """Pad by ``pad`` and crop back at a random offset per image (one gather for the whole batch)."""
    n, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), mode=mode)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    return xp[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


class EpochLoader:
    """What every loader shares: batch count, per-epoch seeding, the normalisation the batches carry."""

    def __init__(self, data, batch_size: int, train: bool, seed: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.data = data
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.mean = torch.tensor(data.mean).view(-1, 1, 1)
        self.std = torch.tensor(data.std).view(-1, 1, 1)

    # A training batch smaller than this is dropped (only the last one can be): batch norm cannot
    # normalise one image per channel, and a one-image step poisons or crashes some aux nets.
    min_batch: int = 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def dropped(self) -> int:
        """Images of the last, too small training batch that each epoch leaves out."""
        rest = len(self.data) % self.batch_size
        return rest if self.train and 0 < rest < self.min_batch else 0

    def spans(self) -> range:
        """Start index of every batch of an epoch."""
        return range(0, len(self.data) - self.dropped, self.batch_size)

    def __len__(self) -> int:
        return len(self.spans())

    def generator(self) -> torch.Generator:
        """Shuffling and augmentation randomness of this epoch, a function of (seed, epoch) only."""
        return torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)


class Loader(EpochLoader):
    """Iterates ``Batch``es over an ``ArrayDataset``; call ``set_epoch`` before each epoch."""

    def __init__(
        self, data: ArrayDataset, batch_size: int, train: bool, seed: int = 0, augment: bool = True
    ) -> None:
        super().__init__(data, batch_size, train, seed)
        self.augment = augment and train

    def __iter__(self) -> Iterator[Batch]:
        gen = self.generator()
        n = len(self.data)
        order = torch.randperm(n, generator=gen) if self.train else torch.arange(n)
        aug = self.data.augment
        for start in self.spans():
            idx = order[start : start + self.batch_size]
            x = self.data.images[idx].float().div_(255)
            if self.augment and aug.pad:
                x = random_crop(x, aug.pad, aug.pad_mode, gen)
            if self.augment and aug.flip:
                flip = torch.rand(len(idx), generator=gen) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(3), x)
            x = (x - self.mean) / self.std
            yield Batch(x, self.data.labels[idx], self.mean, self.std)
