"""Watching a run while it trains: progress within an epoch and, on request, TensorBoard event files.

On a terminal the progress is a tqdm bar. Off a terminal (CI, ``nohup``, a cluster job's log) a bar
is useless, so a log line is written every ``log.progress_every_s`` seconds instead:
``epoch 2/10  step 120/390  lr 0.0812  loss/block 2.301 2.114 1.902  850 img/s`` (losses are each
block's mean since the previous line; img/s over the same interval). ``log.tensorboard=true`` writes
``RUN/tensorboard/``: every block's loss and the lr per step, every ``metrics.csv`` column per epoch.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from locallearn.config import ConfigError

log = logging.getLogger("locallearn.run")


def tensorboard_writer_class() -> type:
    """``torch.utils.tensorboard.SummaryWriter``, imported only when asked for (it needs the
    tensorboard package); a missing package is one ``ConfigError`` line."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "log.tensorboard=true needs the tensorboard package: pip install tensorboard"
        ) from None
    return SummaryWriter


class TensorBoard:
    """Event files under ``run_dir/tensorboard``; a resumed run appends to the same directory."""

    def __init__(self, run_dir: Path) -> None:
        self.writer = tensorboard_writer_class()(log_dir=str(run_dir / "tensorboard"))

    def step(self, step: int, losses: list[float], lr: float) -> None:
        for k, loss in enumerate(losses):
            self.writer.add_scalar(f"train/loss_block{k}", loss, step)
        self.writer.add_scalar("train/lr", lr, step)

    def epoch(self, row: dict[str, Any]) -> None:
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"epoch/{key}", value, row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Progress:
    """One epoch's progress: a tqdm bar on a terminal, a log line every ``every_s`` seconds off one,
    nothing when ``quiet``. The training loops call ``step`` (sequential: with each block's loss) or
    ``update`` (pipeline: this rank's steps only)."""

    def __init__(
        self,
        epoch: int,
        epochs: int,
        total: int,
        quiet: bool = False,
        every_s: float = 30.0,
        terminal: bool | None = None,
        tensorboard: TensorBoard | None = None,
        first_step: int = 0,
    ) -> None:
        self.epoch, self.epochs, self.total = epoch, epochs, total
        self.every_s = every_s
        self.tensorboard, self.global_step = tensorboard, first_step
        terminal = sys.stderr.isatty() if terminal is None else terminal
        self.bar = None
        if terminal and not quiet:
            self.bar = tqdm(total=total, desc=f"epoch {epoch}/{epochs}", leave=False, dynamic_ncols=True)
        self.lines = not terminal and not quiet
        self.done = 0
        self.since = time.perf_counter()
        self.images = 0
        self.sums: list[float] = []
        self.count = 0

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

    def update(self, n: int = 1) -> None:
        """``n`` steps done, without losses (the pipeline's ranks see only their own blocks)."""
        self.step(None, 0, None, n)

    def step(self, losses: list[float] | None, images: int, lr: float | None, n: int = 1) -> None:
        self.done += n
        self.global_step += n
        self.images += images
        if losses is not None:
            self.sums = [a + b for a, b in zip(self.sums, losses)] if self.sums else list(losses)
            self.count += 1
            if self.tensorboard is not None:
                self.tensorboard.step(self.global_step, losses, lr if lr is not None else math.nan)
        if self.bar is not None:
            self.bar.update(n)
            if losses is not None:
                self.bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{lr:.3g}")
        now = time.perf_counter()
        if self.lines and now - self.since >= self.every_s:
            self.write_line(now, lr)

    def write_line(self, now: float, lr: float | None) -> None:
        parts = [f"epoch {self.epoch}/{self.epochs}", f"step {self.done}/{self.total}"]
        if lr is not None:
            parts.append(f"lr {lr:.4g}")
        if self.count:
            parts.append("loss/block " + " ".join(f"{s / self.count:.4g}" for s in self.sums))
        if self.images:
            parts.append(f"{self.images / max(now - self.since, 1e-9):.0f} img/s")
        log.info("  ".join(parts))
        self.since, self.images, self.sums, self.count = now, 0, [], 0
