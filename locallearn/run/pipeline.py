"""``engine.mode=pipeline``: each rank trains its block group (``engine/pipeline.py``), sends the
detached activation forward, and checkpoints its own part (``checkpoint.rank{r}.pt``); at the end rank 0
merges every rank's weights into an ordinary ``checkpoint.pt`` for eval and export."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from locallearn.config import ConfigError, to_dict
from locallearn.engine import checkpoint, distributed, mesh, pipeline
from locallearn.engine.block_scores import block_key, block_metric
from locallearn.report import record_measurements
from locallearn.run.distributed import DistributedRun
from locallearn.rundir import environment
from locallearn.types import Batch

log = logging.getLogger(__name__)


class PipelineRun(DistributedRun):
    def min_train_batch(self) -> int:
        replicas = self.cfg.engine.replicas  # 2 images on every replica (batch norm)
        return 2 * replicas if replicas > 1 else super().min_train_batch()

    def setup(self) -> None:
        ctx, e = self.ctx, self.cfg.engine
        self.mesh = mesh.make(ctx, e.replicas)  # P stages x R replicas (engine/mesh.py)
        pipeline.check_method(self.method.window, self.model.num_blocks, self.mesh.stages)
        pipeline.check_model(self.model)
        if e.replicas > 1 and self.cfg.data.batch_size < self.min_train_batch():
            raise ConfigError(
                f"engine.replicas={e.replicas}: data.batch_size={self.cfg.data.batch_size} leaves fewer than 2 "
                f"images per replica (batch norm needs 2); use >= {self.min_train_batch()}"
            )
        sizes = self._assignment()
        self.rank_blocks = [list(st.blocks) for st in pipeline.stages(sizes)]
        self.stage = pipeline.stages(sizes)[self.mesh.stage]
        mean, std, stride = self.train_loader.mean, self.train_loader.std, e.replicas
        self.pipe = pipeline.Pipe(ctx, e.pipeline_depth, mean, std, stride, self.mesh.share)
        self.link = pipeline.MomentumLink(ctx, self.model, self.stage, e.sync_every, e.sync_lag, stride)
        self.optimizers = self.mesh.wrap(self.optimizers)
        if ctx.is_main:
            log.info(
                "pipeline over %d stages x %d replicas: blocks per stage %s", self.mesh.stages, stride, sizes
            )

    def _assignment(self) -> list[int]:
        k, world = self.model.num_blocks, self.mesh.stages
        sizes = self.cfg.engine.pipeline_blocks
        if sizes is not None:
            if len(sizes) != world or sum(sizes) != k or min(sizes) < 1:
                raise ConfigError(
                    f"engine.pipeline_blocks={sizes}: need {world} positive entries (one per stage) summing to K={k}"
                )
            return list(sizes)
        sizes = None
        if self.ctx.is_main:
            info = self.train_loader.data.info
            x = torch.zeros(2, info.channels, info.size, info.size, device=self.device)
            y = torch.zeros(2, dtype=torch.long, device=self.device)
            batch = Batch(x, y, self.train_loader.mean.to(self.device), self.train_loader.std.to(self.device))
            sizes = pipeline.partition([float(c) for c in pipeline.block_costs(self.model, batch)], world)
        return distributed.broadcast_object(self.ctx, sizes, 0, "agreeing on the block assignment")

    def _owned_keys(self) -> set[str]:
        layers = {i for k in self.stage.blocks for i in self.model.ranges[k]}
        if self.link.replica is not None:
            layers.add(self.model.cuts[self.stage.blocks.stop - 1])
        prefixes = tuple(f"backbone.layers.{i}." for i in layers) + tuple(
            f"auxes.{k}." for k in self.stage.blocks
        )
        return {
            key
            for key in self.model.state_dict()
            if key.startswith(prefixes) or not key.startswith(("backbone.layers.", "auxes."))
        }

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        out["engine"]["replicas"] = self.mesh.replicas
        return out

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The run's checkpoint with this rank's blocks only, and what the pipeline adds."""
        keys = self._owned_keys()
        state = super().state_dict()
        state["model"] = {k: v for k, v in state["model"].items() if k in keys}
        state["optimizers"] = {k: self.optimizers[k].state_dict() for k in self.stage.blocks}
        state["pipeline"] = {
            "rank": self.ctx.rank,
            "world_size": self.ctx.world,
            "replicas": self.mesh.replicas,
            "blocks": [self.stage.blocks.start, self.stage.blocks.stop],
            "momentum": self.link.state_dict(),
        }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        info = state.get("pipeline") or {}
        mine = [self.stage.blocks.start, self.stage.blocks.stop]
        replicas = info.get("replicas", 1)
        if (
            info.get("world_size") != self.ctx.world
            or list(info.get("blocks", [])) != mine
            or replicas != self.mesh.replicas
        ):
            raise checkpoint.CheckpointError(
                f"rank {self.ctx.rank}: the checkpoint was written by {info.get('world_size')} ranks ({replicas} "
                f"replicas) with blocks {info.get('blocks')} on this rank; this job has {self.ctx.world} ranks "
                f"({self.mesh.replicas} replicas) and blocks {mine}"
            )
        epochs = distributed.all_gather_object(self.ctx, int(state["epoch"]), "comparing checkpoint epochs")
        if len(set(epochs)) != 1:
            raise checkpoint.CheckpointError(f"the ranks' checkpoints are at different epochs {epochs}")
        missing = self._owned_keys() - set(state["model"])
        if missing:
            raise checkpoint.CheckpointError(
                f"rank {self.ctx.rank}: checkpoint lacks {sorted(missing)[:3]}..."
            )
        self.model.load_state_dict(state["model"], strict=False)
        for k, s in state["optimizers"].items():
            self.optimizers[int(k)].load_state_dict(s)
        self.schedule.load_state_dict(state["schedule"])
        self.link.load_state_dict(info["momentum"])
        checkpoint.set_rng_state(state["rng"])
        self.load_progress(state)

    def save_checkpoint(self) -> None:
        state = self.state_dict()
        checkpoint.save(self.run_dir / f"checkpoint.rank{self.ctx.rank}.pt", state)
        self.saved_epoch = self.epoch
        if self.epoch >= self.cfg.optim.epochs:
            self.save_merged(state["model"])

    def save_merged(self, mine: dict[str, torch.Tensor]) -> None:
        """Rank 0 writes every rank's weights as one ordinary ``checkpoint.pt`` (for eval / export).
        A layer held twice (rank r's replica of rank r+1's first layer) is taken from its owner."""
        parts = [None] * self.ctx.world if self.ctx.is_main else None
        with self.ctx.collective("gathering the weights for the merged checkpoint"):
            dist.gather_object({k: v.cpu() for k, v in mine.items()}, parts, dst=0)
        if not self.ctx.is_main:
            return
        merged: dict[str, torch.Tensor] = {}
        for part in reversed(parts):  # the owner of a layer is the later rank
            for key, value in part.items():
                merged.setdefault(key, value)
        order = list(self.model.state_dict())
        state = {
            "config": to_dict(self.cfg),
            "model": {k: merged[k] for k in order if k in merged},
            "epoch": self.epoch,
            "history": self.history,
            "memory": self.memory,
            "environment": environment(),
            "merged_from": "pipeline",
        }
        checkpoint.save(self.run_dir / "checkpoint.pt", state)

    # -- training ----------------------------------------------------------------------------
    def train_steps(self, meter, bar) -> dict[str, Any]:
        """This rank's blocks over the epoch; only the first rank reads the data."""
        return pipeline.train_epoch(
            self.model,
            self.stage,
            self.pipe,
            self.link,
            self.mesh.train_batches(self.train_loader) if self.stage.first else None,
            len(self.train_loader),
            meter=meter,
            progress=bar,
            after_step=self.mesh.after_step(self.model, self.stage),
            **self.trainer.epoch_parts(),
        )

    def gather_epoch(self, stats: dict[str, Any], meter) -> list[int] | None:
        """Every stage's block losses (the mean over its replicas, each saw a shard) and block bytes
        (its first replica's), in block order."""
        mine = (stats["block_losses"], meter.block_bytes if meter is not None else [])
        gathered = distributed.all_gather_object(self.ctx, mine, "gathering the epoch's losses")
        losses = self.mesh.replica_mean([losses for losses, _ in gathered])
        stats["block_losses"] = [loss for part in losses for loss in part]
        stats["images"] = len(self.train_loader.data)
        return [b for _, bb in self.mesh.per_stage(gathered) for b in bb] if meter is not None else None

    def record_epoch(self, stats: dict[str, Any], block_bytes: list[int] | None, meter=None) -> None:
        """Each rank's whole-step memory from its own blocks (the largest rank's is the peak)."""
        record_measurements(self, stats, block_bytes, None, None, self.rank_blocks)
        if block_bytes and self.mesh.replicas > 1:  # the meter saw one replica's shard
            shard = -(-self.memory["batch_size"] // self.mesh.replicas)
            self.memory["batch_size"] = shard
            self.memory["activation_bytes_per_image"] = self.memory["peak_activation_bytes"] / shard

    def evaluate(self) -> dict[str, float]:
        batches, steps = self.mesh.test_batches(self.test_loader)
        metrics = pipeline.evaluate(
            self.model,
            self.stage,
            self.pipe,
            batches if self.stage.first else None,
            steps,
            self.task,
            self.device,
            self.autocast,
            self.memory_format,
            blocks=self.cfg.log.block_metrics,
            gather=self.mesh.gather,
        )
        if not self.cfg.log.block_metrics:
            return distributed.broadcast_object(
                self.ctx, metrics, self.ctx.world - 1, "sharing the test metrics"
            )
        # every rank scored its own blocks: the last rank's metrics plus every rank's block scores
        parts = distributed.all_gather_object(self.ctx, metrics, "sharing the test metrics")
        name = block_metric(self.task)
        keys = [block_key(k, name) for k in range(self.model.num_blocks)]
        scored = {key: value for part in parts for key, value in part.items() if key in keys}
        merged = {key: value for key, value in parts[-1].items() if key not in keys}  # the head's
        merged.update({key: scored.get(key) for key in keys[:-1]})  # None: the aux predicts nothing
        merged[keys[-1]] = merged.get(name)  # the last block's score is the head's
        return merged
