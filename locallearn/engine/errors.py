"""Errors the training loops raise; the runner adds the epoch and the CLI prints one line."""

from __future__ import annotations

import torch


class DivergedError(RuntimeError):
    """Training produced NaN or infinite values; the message says where."""


class NonFiniteLossError(DivergedError):
    """A block's local loss became NaN or infinite: training diverged (too large a learning rate?)."""

    def __init__(self, block: int, step: int, value: float, epoch: int | None = None) -> None:
        self.block, self.step, self.value, self.epoch = block, step, value, epoch
        where = f"epoch {epoch}, " if epoch is not None else ""
        super().__init__(
            f"training diverged: block {block}'s loss is {value} at {where}step {step} (of the epoch, "
            "from 1); lower optim.lr or check the data. The last good checkpoint is left as it was"
        )


def check_finite(losses: torch.Tensor, step: int, first_block: int = 0) -> None:
    """``losses``: this step's per-block losses, already on the CPU (no extra device sync)."""
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        i = int(bad[0, 0])
        raise NonFiniteLossError(first_block + i, step + 1, float(losses[i]))
