"""LocalModel: a backbone cut into K blocks, one aux per block (the last one is the task head)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from locallearn.backbones.base import Backbone
from locallearn.split import blocks_from_cuts
from locallearn.types import FeatureBank

INPUT = -1  # the layer index of the bank entry "input" (written before layer 0)


class Body(nn.Module):
    """Block k's layers, run in order; the outputs of the layers in ``taps`` go to the feature bank.

    A view: the layers are owned by the backbone (this module is never registered)."""

    writes_bank = True  # the engine passes the batch's bank to ``forward``

    def __init__(self, layers: list[nn.Module], indices: range, taps: dict[int, tuple[str, ...]]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.taps = [taps.get(i, ()) for i in indices]
        self.input_taps = taps.get(INPUT, ()) if indices.start == 0 else ()

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> nn.Module:
        return self.layers[i]

    def forward(self, h: torch.Tensor, bank: FeatureBank | None = None) -> torch.Tensor:
        if bank is not None:
            bank.seal()  # entries of earlier blocks read detached in this one
        for name in self.input_taps if bank is not None else ():
            bank.write(name, h)
        for layer, names in zip(self.layers, self.taps):
            h = layer(h)
            for name in names if bank is not None else ():
                bank.write(name, h)
        return h


class LocalModel(nn.Module):
    """Parameters live in ``backbone`` (layer by layer) and ``auxes`` (one per block). ``body(k)`` is a
    view of block k's layers; ``forward`` is the plain inference path (backbone + head)."""

    def __init__(
        self,
        backbone: Backbone,
        cuts: Sequence[int],
        auxes: Sequence[nn.Module],
        window: int = 1,
        taps: dict[int, tuple[str, ...]] | None = None,
    ) -> None:
        super().__init__()
        self.window = window  # how many blocks one local loss spans (the method's ``window``)
        ranges = blocks_from_cuts(cuts, len(backbone))
        if len(auxes) != len(ranges):
            raise ValueError(f"{len(ranges)} blocks but {len(auxes)} aux nets")
        self.backbone = backbone
        self.cuts = list(cuts)
        self.auxes = nn.ModuleList(auxes)
        # layer index -> bank entry names: the layers whose output later aux nets or the head read
        self.taps = dict(taps or {})
        # Views, not registered submodules: parameters stay owned by ``backbone`` (one state_dict key each).
        self._bodies = tuple(Body([backbone.layers[i] for i in r], r, self.taps) for r in ranges)
        self.ranges = ranges
        self.frozen_blocks = 0  # ``freeze``

    @property
    def num_blocks(self) -> int:
        return len(self.auxes)

    @property
    def head(self) -> nn.Module:
        return self.auxes[-1].head

    def body(self, k: int) -> Body:
        return self._bodies[k]

    def block_parameters(self, k: int) -> Iterator[nn.Parameter]:
        """Trainable parameters of block k and its aux (what block k's optimizer steps). A frozen
        block's are all of its parameters: its optimizer holds them, and none ever gets a gradient."""
        for module in (self._bodies[k], self.auxes[k]):
            for p in module.parameters():
                if p.requires_grad or k < self.frozen_blocks:
                    yield p

    def freeze(self, n: int) -> None:
        """Keep blocks 0..n-1 and their aux nets as they are (``model.frozen_blocks``): no parameter
        of theirs requires a gradient (so no backward runs through them and their optimizers never
        step), the momentum aux of such a block is not synced, and they stay in eval mode (batch-norm
        running statistics and dropout as at inference), as torchvision's frozen backbone layers do.
        Call it once, before the optimizers are built; the last block (the task head) always trains."""
        if not 0 <= n < self.num_blocks:
            raise ValueError(f"model.frozen_blocks must lie in 0..{self.num_blocks - 1}, got {n}")
        if self.frozen_blocks:
            raise RuntimeError("LocalModel.freeze is called once")
        for k in range(n):
            for module in (self._bodies[k], self.auxes[k]):
                module.requires_grad_(False)
        self.frozen_blocks = n
        self.train(self.training)

    def train(self, mode: bool = True) -> LocalModel:
        super().train(mode)
        for k in range(self.frozen_blocks):  # frozen blocks run as at inference, in training too
            self._bodies[k].train(False)
            self.auxes[k].train(False)
        return self

    @property
    def head_reads(self) -> tuple[str, ...]:
        """Bank entries the task head reads besides the last layer's output."""
        return tuple(getattr(self.head, "reads", ()))

    def forward(self, x: torch.Tensor, bank: FeatureBank | None = None) -> torch.Tensor:
        """Inference: the backbone, then the head (fed the bank entries it reads)."""
        if not self.taps:
            return self.head(self.backbone(x))
        bank = FeatureBank() if bank is None else bank
        for body in self._bodies:
            x = body(x, bank)
        return self.head(x, bank) if self.head_reads else self.head(x)

    @torch.no_grad()
    def sync_momentum(self) -> None:
        """Let every aux that tracks the next block's first layer (MAN, MAN++) read its live weights."""
        for k in range(self.frozen_blocks, self.num_blocks - 1):  # a frozen aux's EMA copy stays too
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
