"""Shared vocabulary of the package. Imports nothing else from locallearn."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FeatureInfo:
    """What one layer of a backbone outputs.

    num_chs: channels (``NCHW``) or embedding width (``NLC``).
    reduction: input resolution divided by this layer's spatial resolution (1 = full resolution).
    fmt: ``"NCHW"`` for feature maps, ``"NLC"`` for token sequences.
    """

    num_chs: int
    reduction: int
    fmt: str = "NCHW"

    def __post_init__(self) -> None:
        if self.num_chs <= 0 or self.reduction <= 0:
            raise ValueError(f"FeatureInfo needs positive num_chs and reduction, got {self}")
        if self.fmt not in ("NCHW", "NLC"):
            raise ValueError(f"FeatureInfo.fmt must be 'NCHW' or 'NLC', got {self.fmt!r}")


@dataclass(frozen=True)
class InputInfo:
    """What the model eats: channels, square image side, and the normalisation the data applied."""

    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass
class Batch:
    """One training batch. ``x`` is normalised; ``image`` restores the un-normalised [0, 1] image."""

    x: torch.Tensor
    y: torch.Tensor
    mean: torch.Tensor | None = None  # (C, 1, 1)
    std: torch.Tensor | None = None

    @property
    def image(self) -> torch.Tensor:
        if self.mean is None or self.std is None:
            return self.x
        return self.x * self.std + self.mean

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return Batch(move(self.x), move(self.y), move(self.mean), move(self.std))

    def __len__(self) -> int:
        return self.x.shape[0]
