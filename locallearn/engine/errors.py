"""Errors the training loops raise; the runner adds the epoch and the CLI prints one line."""

from __future__ import annotations

import math

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
            "from 1); lower optim.lr or check the data. A checkpoint from an earlier epoch is left as it was; a run that stops before its first one leaves no run directory"
        )


def check_finite(losses: torch.Tensor, step: int, first_block: int = 0) -> None:
    """``losses``: this step's per-block losses, already on the CPU (no extra device sync)."""
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        i = int(bad[0, 0])
        raise NonFiniteLossError(first_block + i, step + 1, float(losses[i]))


def check_metrics(metrics: dict[str, float | None], main: str, epoch: int) -> None:
    """The test pass's part of the divergence rule (the training losses are checked every step by
    ``check_finite``): the test loss and the main metric must be finite. None means undefined (COCO
    AP of a size bucket without ground truth, VOC mAP without a non-difficult box), not diverged, and
    the other columns (COCO's size buckets, AP75, ...) are never looked at."""
    checked = {k: metrics.get(k) for k in ("loss", main)}
    bad = {k: v for k, v in checked.items() if v is not None and not math.isfinite(v)}
    if bad:
        raise DivergedError(
            f"training diverged: the test {' and '.join(f'{k} is {v}' for k, v in bad.items())} after "
            f"epoch {epoch}; lower optim.lr. A checkpoint from an earlier epoch is left as it was; a run that stops before its first one leaves no run directory"
        )
