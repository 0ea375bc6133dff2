"""``engine.mode=ddp``: every rank trains the whole model on its shard of each batch, gradients
all-reduced per block (``engine/ddp.py``); all ranks hold the same state, rank 0 writes it."""

from __future__ import annotations

from typing import Any

import torch

from locallearn.config import ConfigError
from locallearn.engine import ddp
from locallearn.run.distributed import DistributedRun


class DDPRun(DistributedRun):
    def min_train_batch(self) -> int:
        return 2 * self.ctx.world  # 2 images on every rank

    def setup(self) -> None:
        if self.cfg.data.batch_size < 2 * self.ctx.world:
            raise ConfigError(
                f"engine.mode=ddp: data.batch_size={self.cfg.data.batch_size} leaves fewer than 2 images "
                f"per rank on {self.ctx.world} ranks (batch norm needs 2); use >= {2 * self.ctx.world}"
            )
        self.share = ddp.Share()
        self.optimizers = [ddp.GradAllReduce(opt, self.ctx, self.share) for opt in self.optimizers]
        self.full_loader = self.train_loader
        self.train_loader = ddp.Shards(self.full_loader, self.ctx, self.share, self.model)

    def train_one_epoch(self) -> dict[str, Any]:
        measured = bool(self.memory)
        stats = super().train_one_epoch()
        stats["images"] = len(self.full_loader.data)
        if not measured and "peak_activation_bytes" in self.memory:  # the meter saw one shard
            shard = -(-min(self.cfg.data.batch_size, len(self.full_loader.data)) // self.ctx.world)
            self.memory["batch_size"] = shard
            self.memory["activation_bytes_per_image"] = self.memory["peak_activation_bytes"] / shard
        return stats

    def evaluate(self) -> dict[str, float]:
        shards = ddp.Shards(self.test_loader, self.ctx)
        return ddp.evaluate(
            self.model,
            shards,
            self.task,
            self.ctx,
            self.autocast,
            self.memory_format,
            blocks=self.cfg.log.block_metrics,
        )

    def save_checkpoint(self) -> None:
        if self.ctx.is_main:  # every rank holds the same state
            super().save_checkpoint()
        with self.ctx.collective("waiting for the checkpoint"):
            torch.distributed.barrier()
