"""Pipeline x data parallel (``engine.mode=pipeline engine.replicas=R``): P pipeline stages, each
replicated R times, world size P x R under ``torchrun``.

Placement: rank ``p * R + r`` holds stage p's blocks as replica r (stage-major). Replica r of stage p
receives activations from rank ``(p - 1) * R + r`` and sends them to rank ``(p + 1) * R + r``: R
independent chains, each exactly today's pipeline (``engine/pipeline.py``'s ``Pipe`` and
``MomentumLink`` with stride R). The R ranks of one stage form its *replica group* (a
``torch.distributed`` group with the job's ``engine.dist_timeout_s``), and every collective of the
replicas runs inside it. With ``torchrun --nproc-per-node R`` a stage fills one node: its gradient
all-reduces stay on the node and only the activations (and MAN's layer copies, one layer backward
per step) cross the network between nodes (docs/multi_device.md).

One step takes one global batch of ``data.batch_size`` images, as with R = 1:

- every replica of stage 0 reads the same global batch (same loader, same seed) and keeps its
  contiguous shard r (``ddp.shard``: sizes differ by at most one); the shard's weight n_r / N travels
  with the activation, so every stage weights the same shard alike;
- each block's gradients are summed over the replica group, weighted n_r / N, inside its optimizer's
  ``step`` right after that block's own backward (``ddp.GradAllReduce`` on the group), so every
  replica applies the gradient of the whole global batch and the replicas stay identical;
- batch norm normalises each shard with its own statistics (as the ddp engine, without SyncBN), and
  after every step each rank averages its own stage's running statistics over the replica group;
- MAN / MAN++: replica r of stage p + 1 ships layer n backward to replica r of stage p; all replicas
  of a stage hold the same weights, so each chain's copy is the stage's.

Semantics: for a model without batch statistics every parameter equals the pipeline with R = 1 on
the concatenated batch, up to the float summation order of the all-reduce (the weighted shard
gradients are added instead of one gradient over all images); the MAN++ copies, their staleness and
the checkpoints are those of R = 1. With batch norm the shards' statistics differ from the whole
batch's, exactly as in the ddp engine. ``optim.clip_grad_norm`` is refused (it would clip each shard).

Evaluation: the test batches are cut into R contiguous runs and replica r's chain evaluates run r;
the last stage's replicas merge their evaluators (``ddp.merge_evaluators``), so the metrics are those
of one process over the whole test set (counts exactly; float sums up to their order).
"""

from __future__ import annotations

import datetime
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist
from torch import nn

from locallearn.engine import ddp, distributed
from locallearn.engine.distributed import Context, DistributedError
from locallearn.engine.pipeline import Stage
from locallearn.model import LocalModel


@dataclass
class Mesh:
    """This rank's place in the P x R mesh and its stage's replica group (``group``: rank = r)."""

    ctx: Context  # the job's
    replicas: int
    group: Context | None  # None when R = 1: nothing to share
    share: ddp.Share = field(default_factory=ddp.Share)

    @property
    def stages(self) -> int:
        return self.ctx.world // self.replicas

    @property
    def stage(self) -> int:
        return self.ctx.rank // self.replicas

    @property
    def replica(self) -> int:
        return self.ctx.rank % self.replicas

    def wrap(self, optimizers: list) -> list:
        """Each block's optimizer all-reduces its gradients over the replica group before stepping."""
        if self.group is None:
            return optimizers
        return [ddp.GradAllReduce(opt, self.group, self.share) for opt in optimizers]

    def train_batches(self, loader) -> Iterable:
        """Stage 0's training input: this replica's shard of every global batch (weight set)."""
        if self.group is None:
            return loader
        return ddp.Shards(loader, self.group, self.share, train=True)

    def test_batches(self, loader) -> tuple[Iterable, int]:
        """This replica's contiguous run of the test batches, and how many there are."""
        n = len(loader)
        lo, hi = self.replica * n // self.replicas, (self.replica + 1) * n // self.replicas
        return (loader if self.group is None else itertools.islice(loader, lo, hi)), hi - lo

    def after_step(self, model: LocalModel, stage: Stage) -> Callable[[], None] | None:
        """The mean of this stage's BN running statistics over its replicas, after every step."""
        if self.group is None:
            return None
        owned = nn.ModuleList([model.body(k) for k in stage.blocks] + [model.auxes[k] for k in stage.blocks])
        return lambda: ddp.average_buffers(owned, self.group)

    @property
    def gather(self) -> Callable[[Any], list] | None:
        """Every replica's object, in replica order (evaluation merges their evaluators)."""
        if self.group is None:
            return None
        return lambda obj: distributed.all_gather_object(
            self.group, obj, "merging the replicas' test metrics"
        )

    def per_stage(self, values: list) -> list:
        """From one value per rank (rank order): replica 0's value of every stage."""
        return values[:: self.replicas]

    def replica_mean(self, values: list[list[float]]) -> list[list[float]]:
        """From one list per rank (rank order): each stage's element-wise mean over its replicas."""
        return [
            [sum(col) / self.replicas for col in zip(*values[p * self.replicas : (p + 1) * self.replicas])]
            for p in range(self.stages)
        ]


def make(ctx: Context, replicas: int) -> Mesh:
    """Split the job into ``world / replicas`` stages; every rank builds every replica group (the
    ``new_group`` calls are collective and must come in the same order on every rank)."""
    if replicas < 1 or ctx.world % replicas:
        raise DistributedError(
            f"engine.replicas={replicas}: the job's {ctx.world} ranks must be P stages x {replicas} replicas "
            f"(world size a multiple of engine.replicas)"
        )
    if replicas == 1:
        return Mesh(ctx, 1, None)
    timeout = datetime.timedelta(seconds=ctx.timeout_s)
    mine = None
    for p in range(ctx.world // replicas):
        members = list(range(p * replicas, (p + 1) * replicas))
        with ctx.collective("creating the replica groups"):
            group = dist.new_group(members, timeout=timeout)
        if ctx.rank in members:
            mine = ctx.subgroup(group, members)
    return Mesh(ctx, replicas, mine)
