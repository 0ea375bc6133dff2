"""Data-parallel driver: every rank holds every block and trains on its shard of each global batch.

Each block's gradients are all-reduced right after that block's own backward, inside its optimizer's
``step`` (``GradAllReduce``, the Horovod ``DistributedOptimizer`` pattern), so ``local_step`` and the
sequential driver run unchanged and a block's gradients are still freed before the next block runs.
There is no ``DistributedDataParallel`` wrapper, hence none of its per-block pitfalls
(``find_unused_parameters``, ``no_sync`` around only the backward: PRIOR_ART §6.4, §10).

A global batch of ``data.batch_size`` images is cut into contiguous shards, one per rank; the gradient
of rank r (a mean over its n_r images) is weighted by n_r / N before the sum, so the update equals
single-process training on the concatenated batch, up to float summation order, for any model without
batch statistics. Batch norm normalises each shard with its own statistics (as DDP without SyncBN; CPU
has no SyncBN), and the running statistics are averaged over ranks after every step, so all ranks hold
identical weights and buffers. Evaluation shards the test set; each rank feeds its shards to the task's
evaluator and the evaluators' states are gathered and merged (``Evaluator.state`` / ``merge``), so the
metrics equal single-process evaluation for every task, not only those that are means over images.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from locallearn.engine import distributed
from locallearn.engine.block_scores import BlockScores
from locallearn.engine.distributed import Context
from locallearn.types import Batch


class Share:
    """The current shard's weight n_r / N, set by ``Shards`` and read by ``GradAllReduce``."""

    weight: float = 1.0


class GradAllReduce:
    """An optimizer whose ``step`` first sums ``weight * grad`` over ranks (one flat all-reduce)."""

    def __init__(self, optimizer: torch.optim.Optimizer, ctx: Context, share: Share) -> None:
        self.optimizer, self.ctx, self.share = optimizer, ctx, share

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    @torch.no_grad()
    def step(self) -> None:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads]).mul_(self.share.weight)
            with self.ctx.collective("all-reducing gradients"):
                dist.all_reduce(flat, group=self.ctx.group)
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
        self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


@torch.no_grad()
def average_buffers(model: nn.Module, ctx: Context) -> None:
    """Mean of every floating-point buffer (BN running statistics) over ranks."""
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    if not buffers or ctx.world == 1:
        return
    flat = torch.cat([b.reshape(-1) for b in buffers])
    with ctx.collective("averaging batch-norm statistics"):
        dist.all_reduce(flat, group=ctx.group)
    flat.div_(ctx.world)
    offset = 0
    for b in buffers:
        b.copy_(flat[offset : offset + b.numel()].view_as(b))
        offset += b.numel()


def shard(batch: Batch, rank: int, world: int) -> tuple[Batch, int]:
    """Rank ``rank``'s contiguous part of ``batch`` and its size (sizes differ by at most one)."""
    n = len(batch)
    lo, hi = rank * n // world, (rank + 1) * n // world
    return Batch(batch.x[lo:hi], batch.y[lo:hi], batch.mean, batch.std), hi - lo


class Shards:
    """This rank's shards of ``loader``'s batches. In training (``model`` given) it sets the shard
    weight before each step and averages the BN statistics after it (when the next batch is asked for)."""

    def __init__(
        self,
        loader,
        ctx: Context,
        share: Share | None = None,
        model: nn.Module | None = None,
        train: bool | None = None,
    ) -> None:
        """``train`` (default: ``model`` given) without ``model``: a training loader whose caller
        averages the statistics itself (the pipeline mesh averages each stage's own, ``engine/mesh.py``)."""
        self.loader, self.ctx, self.share, self.model = loader, ctx, share, model
        self.train = model is not None if train is None else train
        if self.train:  # every rank's shard of the last training batch must hold 2 images
            loader.min_batch = max(getattr(loader, "min_batch", 1), 2 * ctx.world)

    @property
    def data(self):
        return self.loader.data

    @property
    def batch_size(self) -> int:
        return self.loader.batch_size

    @property
    def min_batch(self) -> int:
        return getattr(self.loader, "min_batch", 1)

    @property
    def dropped(self) -> int:
        return getattr(self.loader, "dropped", 0)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.loader:
            part, n = shard(batch, self.ctx.rank, self.ctx.world)
            if not self.train:  # evaluation keeps every image; a rank may get none of a batch
                if n:
                    yield part
                continue
            if n < 2:  # training: batch norm needs 2 images per rank; the loader drops such a last batch
                raise ValueError(f"a training batch of {len(batch)} images leaves rank {self.ctx.rank} {n}")
            if self.share is not None:
                self.share.weight = n / len(batch)
            yield part
            if self.model is not None:
                average_buffers(self.model, self.ctx)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Shards,
    task,
    ctx: Context,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    memory_format: torch.memory_format = torch.contiguous_format,
    blocks: bool = True,
) -> dict[str, float]:
    """Backbone + head on this rank's shards into the task's evaluator; every rank's evaluator state is
    gathered and merged, so each rank returns the metrics of the whole test set exactly as the
    sequential engine computes them (one confusion matrix, one COCOeval over every detection, ...).
    ``blocks``: each block's aux scored too (``engine/block_scores.py``), its evaluators merged alike."""
    model.eval()
    evaluator = task.evaluator()
    scores = BlockScores.of(model, task) if blocks else None
    for batch in batches:
        batch = batch.to(ctx.device, non_blocking=True)
        with autocast():
            x = batch.x.contiguous(memory_format=memory_format)
            output = model(x, batch.bank) if scores is None else scores.forward(x, batch)
        evaluator.update(output, batch)
    per_block = scores.evaluators if scores is not None else {}
    merge_evaluators(
        evaluator,
        per_block,
        task,
        lambda obj: distributed.all_gather_object(ctx, obj, "gathering the test metrics"),
    )
    metrics = evaluator.compute()
    if scores is None:
        return metrics
    return {**metrics, **scores.compute(metrics)}


def merge_evaluators(evaluator, per_block: dict[int, Any], task, gather: Callable[[Any], list]) -> None:
    """Replace ``evaluator`` and the block evaluators ``per_block`` (block -> evaluator, filled in
    place) by the merge of every rank's: ``gather(obj)`` returns each rank's ``obj`` in rank order."""
    mine = (evaluator.state(), {k: ev.state() for k, ev in per_block.items()})
    gathered = gather(mine)
    evaluator.merge([head for head, _ in gathered])
    # a rank whose shards held no image has no evaluator for a block: merge the ranks that have one
    for k in sorted({k for _, states in gathered for k in states}):
        ev = per_block.setdefault(k, task.evaluator())
        ev.merge([states[k] for _, states in gathered if k in states])
