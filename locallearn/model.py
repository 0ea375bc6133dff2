"""LocalModel: a backbone cut into K blocks, one aux per block (the last one is the task head)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from locallearn.backbones.base import Backbone
from locallearn.split import blocks_from_cuts


class LocalModel(nn.Module):
    """Parameters live in ``backbone`` (layer by layer) and ``auxes`` (one per block). ``body(k)`` is a
    view of block k's layers; ``forward`` is the plain inference path (backbone + head)."""

    def __init__(
        self, backbone: Backbone, cuts: Sequence[int], auxes: Sequence[nn.Module], window: int = 1
    ) -> None:
        super().__init__()
        self.window = window  # how many blocks one local loss spans (the method's ``window``)
        ranges = blocks_from_cuts(cuts, len(backbone))
        if len(auxes) != len(ranges):
            raise ValueError(f"{len(ranges)} blocks but {len(auxes)} aux nets")
        self.backbone = backbone
        self.cuts = list(cuts)
        self.auxes = nn.ModuleList(auxes)
        # Views, not registered submodules: parameters stay owned by ``backbone`` (one state_dict key each).
        self._bodies = tuple(nn.Sequential(*(backbone.layers[i] for i in r)) for r in ranges)
        self.ranges = ranges

    @property
    def num_blocks(self) -> int:
        return len(self.auxes)

    @property
    def head(self) -> nn.Module:
        return self.auxes[-1].head

    def body(self, k: int) -> nn.Sequential:
        return self._bodies[k]

    def block_parameters(self, k: int) -> Iterator[nn.Parameter]:
        """Trainable parameters of block k and its aux (what block k's optimizer steps)."""
        for module in (self._bodies[k], self.auxes[k]):
            for p in module.parameters():
                if p.requires_grad:
                    yield p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    @torch.no_grad()
    def sync_momentum(self) -> None:
        """Let every aux that tracks the next block's first layer (MAN, MAN++) read its live weights."""
        for k in range(self.num_blocks - 1):
            sync = getattr(self.auxes[k], "sync", None)
            if sync is not None:
                sync(self.backbone.layers[self.cuts[k]])

    def parameter_counts(self) -> dict[str, int]:
        def count(module: nn.Module) -> int:
            return sum(p.numel() for p in module.parameters())

        head = count(self.head)
        return {
            "backbone": count(self.backbone) + head,
            "aux": sum(count(a) for a in self.auxes) - head,
            "aux_trainable": sum(p.numel() for a in self.auxes for p in a.parameters() if p.requires_grad)
            - head,
        }
