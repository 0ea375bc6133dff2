"""Shared vocabulary of the package. Imports nothing else from locallearn."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class FeatureInfo:
    """What one layer of a backbone outputs.

    num_chs: channels (``NCHW``) or embedding width (``NLC``).
    reduction: input resolution divided by this layer's spatial resolution (1 = full resolution).
    fmt: ``"NCHW"`` for feature maps, ``"NLC"`` for token sequences.
    stage: the backbone's stage this layer belongs to, in the papers' ``[stage, block]`` notation
    (0 = the stem or embedding; a stage = the run of layers between two down-samplings as the model's
    authors group them). Set by the backbone, never inferred from shapes (a VGG layer that ends in a
    max-pool changes shape mid-stage). Not part of equality: two FeatureInfo are equal when the tensors
    they describe have the same shape.
    """

    num_chs: int
    reduction: int
    fmt: str = "NCHW"
    stage: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        if self.num_chs <= 0 or self.reduction <= 0:
            raise ValueError(f"FeatureInfo needs positive num_chs and reduction, got {self}")
        if self.fmt not in ("NCHW", "NLC"):
            raise ValueError(f"FeatureInfo.fmt must be 'NCHW' or 'NLC', got {self.fmt!r}")
        if self.stage < 0:
            raise ValueError(f"FeatureInfo.stage must be >= 0, got {self.stage}")


@dataclass(frozen=True)
class InputInfo:
    """What the model eats: channels, square image side, and the normalisation the data applied."""

    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def move(obj: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """``obj`` with every tensor inside (nested lists, tuples, dicts) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, dict):
        return {k: move(v, device, non_blocking) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(move(v, device, non_blocking) for v in obj)
    return obj


class FeatureBank:
    """Named features of one batch that later blocks' aux nets and the task head read as *inputs*
    (memory-augmented MAN, Eq. 5: ``f_A(x; F_bank, W)``).

    The engine makes a fresh bank for every batch and carries it on the ``Batch``; a block writes
    entries while its body runs (``LocalModel`` taps the layers that were asked for). Every entry is
    stored detached (``items``): a later block's loss can never reach the block that wrote it, which is
    what keeps gradient isolation with the bank in use. Until ``seal`` (called as the next block's body
    starts) ``read`` returns the live tensor instead, so a reader inside the writing block (``bp``'s
    head reading C3/C4 with K=1, the aux of the block that wrote the entry) backpropagates into it as
    end-to-end training would. Names: ``"input"`` is the network input, ``"C{s}"`` the last feature map
    at stride ``2**s`` (the map before each down-sampling, e.g. ``C3``, ``C4``).
    """

    def __init__(self, entries: dict[str, torch.Tensor] | None = None) -> None:
        self._entries: dict[str, torch.Tensor] = {}
        self._live: dict[str, torch.Tensor] = {}  # this block's writes, for this block's readers
        for name, t in (entries or {}).items():
            self.write(name, t)
        self.seal()

    def write(self, name: str, t: torch.Tensor) -> None:
        self._entries[name] = t.detach()
        self._live[name] = t

    def seal(self) -> None:
        """A block boundary: from now on every entry reads detached."""
        self._live.clear()

    def read(self, name: str) -> torch.Tensor:
        if name not in self._entries:
            have = ", ".join(self._entries) or "nothing"
            raise KeyError(f"feature bank has no entry {name!r} for this batch (it holds: {have})")
        return self._live.get(name, self._entries[name])

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> list[tuple[str, torch.Tensor]]:
        return list(self._entries.items())

    def nbytes(self) -> int:
        """Bytes the bank holds, each storage once."""
        storages = {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self._entries.values()
        }
        return sum(storages.values())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> FeatureBank:
        return FeatureBank(move(self._entries, device, non_blocking))


@dataclass
class Batch:
    """One batch. ``x`` is the normalised input; ``image`` restores the un-normalised [0, 1] image.

    ``targets`` is whatever the task trains on: a label tensor (classification, also readable as
    ``y``), per-image ``{"boxes", "labels", ...}`` dicts (detection, as torchvision's detection models
    take them), label maps (segmentation), high-resolution images (super-resolution). ``bank`` is the
    batch's feature bank (see ``FeatureBank``), empty until a block writes to it.
    """

    x: torch.Tensor
    targets: Any
    mean: torch.Tensor | None = None  # (C, 1, 1)
    std: torch.Tensor | None = None
    bank: FeatureBank = field(default_factory=FeatureBank)

    @property
    def y(self) -> Any:
        """The targets; for classification, the label tensor."""
        return self.targets

    @property
    def image(self) -> torch.Tensor:
        if self.mean is None or self.std is None:
            return self.x
        return self.x * self.std + self.mean

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            move(self.x, device, non_blocking),
            move(self.targets, device, non_blocking),
            move(self.mean, device, non_blocking),
            move(self.std, device, non_blocking),
            self.bank.to(device, non_blocking),
        )

    def __len__(self) -> int:
        return self.x.shape[0]
