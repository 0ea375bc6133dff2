"""Pipeline driver (PPLL, arXiv 2411.12780): one process per contiguous group of blocks.

Rank r owns blocks ``[lo, hi)`` with their aux nets and optimizers. For every batch it receives
(activation, input image, labels, batch index) from rank r-1 (rank 0 reads the data), runs
``local_step`` on its blocks and sends the detached activation on to rank r+1 with ``isend``, without
waiting: at most ``engine.pipeline_depth`` batches may be sent and not yet received (gloo completes
a send when the receiver has taken it), which bounds both memory and how far rank r runs ahead. No
gradient crosses a rank boundary, so all ranks compute at the same time. The last rank computes the
task loss; evaluation is the plain forward through the same pipe and the last rank's metric is
broadcast once. The input image travels with the activation because aux nets may read it (InfoPro's
decoder reconstructs it).

Momentum aux (MAN / MAN++) at the boundary needs the live first layer ``n`` of block ``hi``, which
lives on rank r+1. Rank r keeps its own (otherwise unused) copy of layer ``n`` as a *replica*; after
its step ``s`` with ``(s+1) % sync_every == 0`` rank r+1 sends layer n's parameters backward
(``isend``), and after its own step ``t`` rank r loads into the replica the newest version made at a
step ``<= t - sync_lag`` and runs the usual EMA update from the replica. The staleness is thus
deterministic: the EMA after step t moves towards layer n as it was after step
``t - sync_lag - ((t - sync_lag + 1) mod sync_every)`` (sequential engine: after step t), i.e.
``sync_lag`` to ``sync_lag + sync_every - 1`` steps old; before the first version arrives, the replica
holds layer n's initial weights (every rank builds the same model from the same seed). At the end of
every epoch rank r receives the versions still in flight and keeps them queued (they are part of its
checkpoint), so a resumed run applies exactly what an uninterrupted one would. Methods whose loss
spans several blocks (``window > 1``) are refused.
"""

from __future__ import annotations

import copy
import pickle
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from locallearn.engine.block_scores import block_key, block_metric
from locallearn.engine.ddp import Share, merge_evaluators
from locallearn.engine.distributed import Context, DistributedError
from locallearn.engine.errors import check_finite
from locallearn.engine.step import local_step
from locallearn.metrics.memory import ActivationMeter
from locallearn.model import LocalModel
from locallearn.types import Batch, FeatureBank, move

ACT_TAG, PARAM_TAG = 1, 2
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8]


def check_method(window: int, num_blocks: int, world: int) -> None:
    if window > 1:
        raise DistributedError(
            f"engine.mode=pipeline does not support methods whose local loss spans {window} blocks "
            "(window > 1, e.g. MLAAN's cascade) yet: the cascade would send gradients between ranks. "
            "Use engine.mode=sequential or ddp for this method."
        )
    if world > num_blocks:
        raise DistributedError(
            f"engine.mode=pipeline: {world} ranks but only {num_blocks} blocks (need P <= K)"
        )


def check_model(model: nn.Module) -> None:
    """Refuse aux nets that need state living with another block (they say so in ``single_process``):
    a shared head or a per-class prototype bank lives with the last block, on the last rank."""
    for module in model.modules():
        what = getattr(module, "single_process", "")
        if what:
            raise DistributedError(
                f"engine.mode=pipeline cannot run {what}: it needs state that lives with the last block on "
                "another rank. Use engine.mode=sequential or ddp, or turn the option off."
            )


def partition(costs: list[float], parts: int) -> list[int]:
    """Blocks per part: contiguous groups minimising the largest group cost (ties: earlier parts smaller)."""
    n = len(costs)
    if not 1 <= parts <= n:
        raise ValueError(f"cannot split {n} blocks into {parts} contiguous groups")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[p][i]: the smallest possible maximum when the first i blocks form p groups
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for p in range(1, parts + 1):
        for i in range(p, n - (parts - p) + 1):
            for j in range(p - 1, i):
                value = max(best[p - 1][j], prefix[i] - prefix[j])
                if value < best[p][i]:
                    best[p][i], cut[p][i] = value, j
    sizes, i = [], n
    for p in range(parts, 0, -1):
        sizes.append(i - cut[p][i])
        i = cut[p][i]
    return sizes[::-1]


def block_costs(model: LocalModel, batch: Batch) -> list[int]:
    """Bytes each block (body + aux) saves for backward on ``batch``: a compute proxy for balancing.

    Runs on a copy of the model under a forked RNG, so the model, its BN statistics and the random
    streams of the run are untouched."""
    twin = copy.deepcopy(model).train()
    meter = ActivationMeter(twin)
    with torch.random.fork_rng(devices=[]):
        h, batch = batch.x, Batch(batch.x, batch.targets, batch.mean, batch.std)  # a bank of its own
        for k in range(twin.num_blocks):
            with meter.track(batch.bank):
                h = twin.body(k)(h.detach(), batch.bank)
                twin.auxes[k](h, batch)
    return meter.block_bytes


@dataclass(frozen=True)
class Stage:
    rank: int
    world: int
    blocks: range

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.world - 1


def stages(sizes: list[int]) -> list[Stage]:
    out, lo = [], 0
    for r, size in enumerate(sizes):
        out.append(Stage(r, len(sizes), range(lo, lo + size)))
        lo += size
    return out


def _spec(t: torch.Tensor) -> tuple[torch.dtype, tuple[int, ...]]:
    if t.dtype not in DTYPES:
        raise DistributedError(
            f"cannot send a {t.dtype} tensor of shape {tuple(t.shape)} through the pipeline"
        )
    return t.dtype, tuple(t.shape)


class Pipe:
    """Activations forward: ``send`` to rank+1 (asynchronous, bounded), ``recv`` from rank-1.

    One message is the activation, the input image (training only), the targets and every feature
    bank entry written so far: the next rank's aux nets and head read the bank exactly as in the
    sequential engine. A small pickled description (batch index, shapes, bank names, and targets that
    are not one tensor, e.g. detection's per-image dicts) goes first, then the tensors themselves."""

    def __init__(
        self,
        ctx: Context,
        depth: int,
        mean: torch.Tensor,
        std: torch.Tensor,
        stride: int = 1,
        share: Share | None = None,
    ) -> None:
        """``stride``: the next stage's rank is this rank + ``stride`` (``engine/mesh.py``: one per
        replica). ``share``: the shard weight travels with the batch and is set on arrival."""
        if depth < 1:
            raise DistributedError(f"engine.pipeline_depth must be >= 1, got {depth}")
        self.ctx, self.depth, self.stride, self.share = ctx, depth, stride, share
        self.mean, self.std = mean.to(ctx.device), std.to(ctx.device)
        self.inflight: deque[tuple[list, list[torch.Tensor]]] = deque()

    def send(self, index: int, h: torch.Tensor, batch: Batch, with_image: bool) -> None:
        tensors = [h] + ([batch.x] if with_image else [])
        targets_tensor = isinstance(batch.targets, torch.Tensor)
        if targets_tensor:
            tensors.append(batch.targets)
        names = [name for name, _ in batch.bank.items()]
        tensors += [t for _, t in batch.bank.items()]
        meta = {
            "index": index,
            "image": with_image,
            "specs": [_spec(t) for t in tensors],
            "targets": None if targets_tensor else move(batch.targets, "cpu"),
            "targets_tensor": targets_tensor,
            "bank": names,
            "weight": self.share.weight if self.share is not None else None,
        }
        payload = torch.frombuffer(bytearray(pickle.dumps(meta)), dtype=torch.uint8).to(self.ctx.device)
        header = torch.tensor([payload.numel()], dtype=torch.int64, device=self.ctx.device)
        tensors = [header, payload] + [t.contiguous() for t in tensors]
        peer = self.ctx.rank + self.stride
        with self.ctx.peer(peer, f"sending batch {index} forward"):
            works = [dist.isend(t, peer, tag=ACT_TAG) for t in tensors]
        self.inflight.append((works, tensors))  # the tensors stay alive until the send completes
        while len(self.inflight) > self.depth:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        works, _ = self.inflight.popleft()
        with self.ctx.peer(self.ctx.rank + self.stride, "waiting for it to take an activation"):
            for w in works:
                w.wait()

    def flush(self) -> None:
        while self.inflight:
            self._wait_oldest()

    def recv(self) -> tuple[int, torch.Tensor, Batch]:
        peer, device = self.ctx.rank - self.stride, self.ctx.device
        header = torch.empty(1, dtype=torch.int64, device=device)
        with self.ctx.peer(peer, "waiting for the next activation"):
            dist.recv(header, peer, tag=ACT_TAG)
            payload = torch.empty(int(header.item()), dtype=torch.uint8, device=device)
            dist.recv(payload, peer, tag=ACT_TAG)
            meta = pickle.loads(payload.cpu().numpy().tobytes())
            tensors = [torch.empty(shape, dtype=dtype, device=device) for dtype, shape in meta["specs"]]
            works = [dist.irecv(t, peer, tag=ACT_TAG) for t in tensors]
            for w in works:
                w.wait()
        h = tensors.pop(0)
        x = tensors.pop(0) if meta["image"] else h
        targets = tensors.pop(0) if meta["targets_tensor"] else move(meta["targets"], device)
        bank = FeatureBank(dict(zip(meta["bank"], tensors)))
        if self.share is not None:
            self.share.weight = meta["weight"]
        return meta["index"], h, Batch(x, targets, self.mean, self.std, bank)


def _flat(layer: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in layer.parameters()])


class MomentumLink:
    """Ships layer n = first layer of block ``hi`` backward, from rank r+1 to rank r (module docstring).

    ``sender``: this rank's first layer feeds rank r-1's momentum aux. ``replica``: this rank's copy of
    the next rank's first layer, read by its last block's momentum aux."""

    def __init__(
        self, ctx: Context, model: LocalModel, stage: Stage, every: int, lag: int, stride: int = 1
    ) -> None:
        """``stride``: as ``Pipe``'s (the neighbouring stages' ranks are this rank -/+ ``stride``)."""
        if every < 1 or lag < 0:
            raise DistributedError(f"engine.sync_every must be >= 1 and sync_lag >= 0, got {every}, {lag}")
        self.ctx, self.every, self.lag = ctx, every, lag
        self.prev, self.next = ctx.rank - stride, ctx.rank + stride
        lo, hi = stage.blocks.start, stage.blocks.stop
        self.sender = (
            model.backbone.layers[model.cuts[lo - 1]]
            if not stage.first and hasattr(model.auxes[lo - 1], "sync")
            else None
        )
        self.replica = (
            model.backbone.layers[model.cuts[hi - 1]]
            if not stage.last and hasattr(model.auxes[hi - 1], "sync")
            else None
        )
        self.pending_sends: deque[tuple[object, torch.Tensor]] = deque()
        self.queue: deque[tuple[int, torch.Tensor]] = deque()  # received, not yet applied (step, params)
        self.next_version = every - 1  # the step after which the next version to receive was made

    def after_step(self, step: int) -> None:
        """Called after this rank's optimizer steps of global step ``step`` (0-based)."""
        if self.sender is not None and (step + 1) % self.every == 0:
            flat = _flat(self.sender).clone()
            with self.ctx.peer(self.prev, "sending the first layer's weights backward"):
                self.pending_sends.append((dist.isend(flat, self.prev, tag=PARAM_TAG), flat))
            while self.pending_sends and self.pending_sends[0][0].is_completed():
                self.pending_sends.popleft()
        if self.replica is not None:
            self.receive_upto(step - self.lag)
            newest = None
            while self.queue and self.queue[0][0] <= step - self.lag:
                newest = self.queue.popleft()[1]
            if newest is not None:
                torch.nn.utils.vector_to_parameters(newest, list(self.replica.parameters()))

    def receive_upto(self, step: int) -> None:
        """Receive every version made at a step <= ``step`` that has not been received yet."""
        if self.replica is None:
            return
        while self.next_version <= step:
            buf = torch.empty_like(_flat(self.replica))
            with self.ctx.peer(
                self.next, f"waiting for its first layer's weights (step {self.next_version})"
            ):
                dist.recv(buf, self.next, tag=PARAM_TAG)
            self.queue.append((self.next_version, buf))
            self.next_version += self.every

    def finish_epoch(self, last_step: int) -> None:
        """Take every version in flight, so that no send outlives the epoch (and checkpoints are whole)."""
        self.receive_upto(last_step)
        with self.ctx.peer(self.prev, "waiting for it to take the first layer's weights"):
            while self.pending_sends:
                self.pending_sends.popleft()[0].wait()

    def state_dict(self) -> dict:
        return {"queue": [(s, t.cpu()) for s, t in self.queue], "next_version": self.next_version}

    def load_state_dict(self, state: dict) -> None:
        self.queue = deque((int(s), t.to(self.ctx.device)) for s, t in state["queue"])
        self.next_version = int(state["next_version"])


def _sync_local(model: LocalModel, stage: Stage) -> None:
    """EMA updates of this rank's momentum aux nets (the last one reads the replica)."""
    with torch.no_grad():
        for k in stage.blocks:
            sync = getattr(model.auxes[k], "sync", None)
            if sync is not None and k < model.num_blocks - 1:
                sync(model.backbone.layers[model.cuts[k]])


def _inputs(
    stage: Stage, pipe: Pipe, batches: Iterable[Batch] | None, steps: int, device: torch.device, fmt
) -> Iterator[tuple[torch.Tensor, Batch]]:
    if stage.first:
        n = 0
        for batch in batches:
            batch = batch.to(device, non_blocking=True)
            batch.x = batch.x.contiguous(memory_format=fmt)
            yield batch.x, batch
            n += 1
        if n != steps:
            raise DistributedError(f"rank 0 read {n} batches but the pipeline expected {steps}")
        return
    for i in range(steps):
        index, h, batch = pipe.recv()
        if index != i:
            raise DistributedError(f"rank {stage.rank} expected batch {i} but received batch {index}")
        yield h, batch


def train_epoch(
    model: LocalModel,
    stage: Stage,
    pipe: Pipe,
    link: MomentumLink,
    batches: Iterable[Batch] | None,
    steps: int,
    optimizers: list[torch.optim.Optimizer],
    schedule,
    device: torch.device,
    scalers: list | None = None,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    meter: ActivationMeter | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
    progress=None,
    clip: float | None = None,
    after_step: Callable[[], None] | None = None,
) -> dict:
    """This rank's share of one epoch. Returns its blocks' mean losses and step times.
    ``after_step``: called after every step (the mesh averages its stage's BN statistics there)."""
    model.train()
    losses = torch.zeros(len(stage.blocks), dtype=torch.float64)
    step_times, n, images = [], 0, 0
    for i, (h, batch) in enumerate(_inputs(stage, pipe, batches, steps, device, memory_format)):
        t0 = time.perf_counter()
        outs = []
        for k in stage.blocks:
            track = meter.track(batch.bank) if meter is not None and i == 0 else nullcontext()
            scaler = scalers[k] if scalers else None
            h, out = local_step(
                model.body(k), model.auxes[k], h, batch, optimizers[k], scaler, autocast(), track, clip=clip
            )
            outs.append(out)
        if not stage.last:
            pipe.send(i, h, batch, with_image=True)
        link.after_step(schedule.step_count)
        _sync_local(model, stage)
        schedule.step()
        if after_step is not None:
            after_step()
        step_times.append(time.perf_counter() - t0)
        step_losses = torch.stack([o["loss"].detach().float().cpu() for o in outs]).double()
        check_finite(step_losses, i, stage.blocks.start)
        losses += step_losses
        n += 1
        images += len(batch)
        if progress is not None:
            progress.update(1)
    pipe.flush()
    link.finish_epoch(schedule.step_count - 1)
    return {"block_losses": (losses / max(n, 1)).tolist(), "step_times": step_times, "images": images}


@torch.no_grad()
def evaluate(
    model: LocalModel,
    stage: Stage,
    pipe: Pipe,
    batches: Iterable[Batch] | None,
    steps: int,
    task,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    memory_format: torch.memory_format = torch.contiguous_format,
    blocks: bool = False,
    gather: Callable[[Any], list] | None = None,
) -> dict[str, float] | None:
    """The plain forward through the pipe; the last rank returns the metrics (others ``None``).
    ``blocks``: each rank also scores its own blocks' aux nets (``engine/block_scores.py``) and every
    rank returns their ``block{k}_{metric}`` (the last rank with the head's metrics); the image then
    travels with the activation, as in training (an aux may read it: InfoPro's decoder).
    ``gather``: this stage's replicas each saw part of the test set (``engine/mesh.py``); their
    evaluators are merged through it as the ddp engine merges its ranks'."""
    model.eval()
    evaluator = task.evaluator()
    scores: dict[int, Any] = {}
    for i, (h, batch) in enumerate(_inputs(stage, pipe, batches, steps, device, memory_format)):
        with autocast():
            for k in stage.blocks:
                h = model.body(k)(h, batch.bank)
                if blocks and k < model.num_blocks - 1:
                    out = model.auxes[k](h, batch)
                    if "output" in out:
                        scores.setdefault(k, task.evaluator()).update(out["output"], batch)
            if stage.last:
                output = model.head(h, batch.bank) if model.head_reads else model.head(h)
        if not stage.last:
            pipe.send(i, h, batch, with_image=blocks)
            continue
        evaluator.update(output, batch)
    pipe.flush()
    if gather is not None:
        merge_evaluators(evaluator, scores, task, gather)
    name = block_metric(task)
    mine = {block_key(k, name): ev.compute().get(name) for k, ev in sorted(scores.items())}
    if not stage.last:
        return mine if blocks else None
    return {**evaluator.compute(), **mine}
