"""Runs for ``engine.mode=pipeline`` and ``engine.mode=ddp``: a ``Run`` per rank under ``torchrun``.

Every rank builds the whole model from the same seed (identical initial weights, nothing to
broadcast), loads the data set description, and then trains only its part: its block group
(pipeline, ``engine/pipeline.py``) or its shard of each batch (ddp, ``engine/ddp.py``). Rank 0 creates
the run directory and writes ``config.yaml``, ``metrics.csv``, ``summary.json`` and the log; every
rank has the same history (metrics are broadcast), so any rank could.

Checkpoints: in pipeline mode each rank writes ``checkpoint.rank{r}.pt`` atomically (its blocks, aux
nets, optimizers, RNG, the momentum versions in flight); a resume checks that all ranks are at the same
epoch with the same block assignment. At the end of a pipeline run rank 0 gathers every rank's weights
into an ordinary ``checkpoint.pt`` (marked ``merged_from``), so ``locallearn eval`` and the export work
as for any run; it is not a resume point. In ddp mode all ranks hold identical state, so rank 0 writes
the usual ``checkpoint.pt`` and every rank resumes from it.

Every check runs before the run directory exists (``Run.setup``), and rank 0 creates and locks it and
tells the others (or tells them why it could not), so a refused job leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from locallearn.config import Config, ConfigError, to_dict
from locallearn.engine import checkpoint, ddp, distributed, pipeline
from locallearn.engine.distributed import Context
from locallearn.runner import Run, config_from_checkpoint, environment, refuse_merged, resume_config
from locallearn.types import Batch

log = logging.getLogger(__name__)


def _local_config(cfg: Config, ctx: Context) -> Config:
    """The rank's own copy: its device (the saved config keeps the user's ``engine.device``)."""
    return dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, device=str(ctx.device)))


class _DistributedRun(Run):
    def __init__(
        self, cfg: Config, run_dir: Path | None = None, quiet: bool = False, load_weights: bool = True
    ) -> None:
        if cfg.engine.amp == "fp16":
            raise ConfigError(
                f"engine.mode={cfg.engine.mode} supports amp=none or bf16 (fp16 loss scaling skips "
                "steps rank by rank and would desynchronise the ranks)"
            )
        if cfg.compare:
            raise ConfigError(
                f"engine.mode={cfg.engine.mode}: run the compared methods {cfg.compare} as separate jobs"
            )
        self.ctx = distributed.init(cfg.engine.mode, cfg.engine.device, cfg.engine.dist_timeout_s)
        super().__init__(_local_config(cfg, self.ctx), run_dir, quiet or not self.ctx.is_main, load_weights)
        self.cfg = cfg
        self.device = self.ctx.device

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    def open_run_dir(self, run_dir: Path | None) -> Path:
        """Rank 0 creates (or locks) the directory; every rank gets its path or its error."""
        made = error = None
        if self.ctx.is_main:
            try:
                made = str(super().open_run_dir(run_dir))
            except ConfigError as e:
                error = str(e)
        made, error = distributed.broadcast_object(
            self.ctx, (made, error), 0, "agreeing on the run directory"
        )
        if error is not None:
            raise ConfigError(error)
        return Path(made)

    def fit(self, stop_after: int | None = None) -> dict[str, Any]:
        summary = super().fit(stop_after)
        distributed.shutdown()
        return summary

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        out["engine"] = {"mode": self.cfg.engine.mode, "world_size": self.ctx.world}
        return out


class PipelineRun(_DistributedRun):
    def setup(self) -> None:
        ctx, e = self.ctx, self.cfg.engine
        pipeline.check_method(self.method.window, self.model.num_blocks, ctx.world)
        pipeline.check_model(self.model)
        sizes = self._assignment()
        self.stage = pipeline.stages(sizes)[ctx.rank]
        self.pipe = pipeline.Pipe(ctx, e.pipeline_depth, self.train_loader.mean, self.train_loader.std)
        self.link = pipeline.MomentumLink(ctx, self.model, self.stage, e.sync_every, e.sync_lag)
        if ctx.is_main:
            log.info("pipeline over %d ranks: blocks per rank %s", ctx.world, sizes)

    def _assignment(self) -> list[int]:
        k, world = self.model.num_blocks, self.ctx.world
        sizes = self.cfg.engine.pipeline_blocks
        if sizes is not None:
            if len(sizes) != world or sum(sizes) != k or min(sizes) < 1:
                raise ConfigError(
                    f"engine.pipeline_blocks={sizes}: need {world} positive entries (one per rank) summing to K={k}"
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

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        keys = self._owned_keys()
        return {
            "config": to_dict(self.cfg),
            "model": {k: v for k, v in self.model.state_dict().items() if k in keys},
            "optimizers": {k: self.optimizers[k].state_dict() for k in self.stage.blocks},
            "schedule": self.schedule.state_dict(),
            "scalers": None,
            "rng": checkpoint.rng_state(),
            "epoch": self.epoch,
            "history": self.history,
            "memory": self.memory,
            "step_times": self.step_times,
            "skipped_steps": self.skipped_steps,
            "environment": environment(),
            "pipeline": {
                "rank": self.ctx.rank,
                "world_size": self.ctx.world,
                "blocks": [self.stage.blocks.start, self.stage.blocks.stop],
                "momentum": self.link.state_dict(),
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        info = state.get("pipeline") or {}
        mine = [self.stage.blocks.start, self.stage.blocks.stop]
        if info.get("world_size") != self.ctx.world or list(info.get("blocks", [])) != mine:
            raise checkpoint.CheckpointError(
                f"rank {self.ctx.rank}: the checkpoint was written by {info.get('world_size')} ranks with blocks "
                f"{info.get('blocks')} on this rank; this job has {self.ctx.world} ranks and blocks {mine}"
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
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])
        self.memory = dict(state["memory"])
        self.step_times = list(state["step_times"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.saved_epoch = self.resumed_at = self.epoch

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
    def train_one_epoch(self) -> dict[str, Any]:
        self.train_loader.set_epoch(self.epoch)
        meter = self.measure_memory()
        steps = len(self.train_loader)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        with self.progress_bar(steps) as bar:
            stats = pipeline.train_epoch(
                self.model,
                self.stage,
                self.pipe,
                self.link,
                self.train_loader if self.stage.first else None,
                steps,
                self.optimizers,
                self.schedule,
                self.device,
                self.scalers,
                self.autocast,
                meter,
                self.memory_format,
                bar,
            )
        mine = (stats["block_losses"], meter.block_bytes if meter is not None else [])
        gathered = distributed.all_gather_object(self.ctx, mine, "gathering the epoch's losses")
        stats["epoch_time"] = time.perf_counter() - t0  # until the last rank has finished
        stats["block_losses"] = [loss for losses, _ in gathered for loss in losses]
        stats["images"] = len(self.train_loader.data)
        self.record_epoch(stats, [b for _, bb in gathered for b in bb] if meter is not None else None)
        return stats

    def evaluate(self) -> dict[str, float]:
        metrics = pipeline.evaluate(
            self.model,
            self.stage,
            self.pipe,
            self.test_loader if self.stage.first else None,
            len(self.test_loader),
            self.task,
            self.device,
            self.autocast,
            self.memory_format,
        )
        return distributed.broadcast_object(self.ctx, metrics, self.ctx.world - 1, "sharing the test metrics")


class DDPRun(_DistributedRun):
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
        return ddp.evaluate(self.model, shards, self.task, self.ctx, self.autocast, self.memory_format)

    def save_checkpoint(self) -> None:
        if self.ctx.is_main:  # every rank holds the same state
            super().save_checkpoint()
        with self.ctx.collective("waiting for the checkpoint"):
            torch.distributed.barrier()


RUNS: dict[str, type[_DistributedRun]] = {"pipeline": PipelineRun, "ddp": DDPRun}


def parallel_run(
    cfg: Config, run_dir: Path | None = None, quiet: bool = False, load_weights: bool = True
) -> Run:
    """``load_weights=False``: a checkpoint is loaded next (resume); ``model.pretrained`` is not read."""
    if cfg.engine.mode not in RUNS:
        raise ConfigError(
            f"engine.mode: unknown mode {cfg.engine.mode!r}; choose sequential, {', '.join(RUNS)}"
        )
    return RUNS[cfg.engine.mode](cfg, run_dir, quiet, load_weights)


def resume_parallel(
    path: str | Path, quiet: bool = False, config_file: str | None = None, overrides: list[str] = ()
) -> Run | None:
    """Resume a pipeline / ddp run on this rank; ``None`` for a sequential checkpoint."""
    path = Path(path)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    ckpt = path
    if path.is_dir():
        ranks = sorted(path.glob("checkpoint.rank*.pt"))
        ckpt = path / f"checkpoint.rank{rank}.pt" if ranks else path / "checkpoint.pt"
        if ranks and len(ranks) != world:  # every rank sees the same files: all refuse alike
            raise checkpoint.CheckpointError(
                f"this run has {len(ranks)} ranks (checkpoint.rank0..{len(ranks) - 1}.pt) and this job "
                f"{world}: resume it with `torchrun --nproc-per-node {len(ranks)} -m locallearn train "
                f"--resume {path}`"
            )
    state = checkpoint.load(ckpt)
    refuse_merged(state, ckpt)
    cfg = config_from_checkpoint(state)
    if cfg.engine.mode == "sequential":
        return None
    cfg = resume_config(cfg, config_file, list(overrides), int(state["epoch"]))
    run = parallel_run(cfg, run_dir=ckpt.parent, quiet=quiet, load_weights=False)
    run.load_state_dict(state)
    return run
