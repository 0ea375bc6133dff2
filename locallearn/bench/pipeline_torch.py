"""The ranks of ``locallearn bench pipeline --baseline torch`` (the comparison itself is in ``pipeline.py``).

End-to-end backprop under ``torch.distributed.pipelining``, built from our own block split: each stage is
a ``PipelineStage`` over consecutive blocks' layers (the last one ends with the task head; the loss is the
task's loss on its output), one SGD step per batch after the schedule has accumulated the micro-batches'
gradients (scaled by 1/M, torch's default). GPipe and 1F1B run one stage per rank (the local pipeline's
groups of blocks); the interleaved schedules one stage per block, block b on rank b mod P, which needs
K a multiple of P and K >= 2P. Also here: one process running ``bp`` or the local method sequentially,
and the memory figures every row shares.

Memory, two figures per rank: ``act`` = the peak of the bytes autograd holds for backward at once over one
whole training step (``bench.memory.LiveMeter``: each saved storage from its save to its release;
parameters left out; the P2P receive/send buffers not counted), and ``resident`` = parameters + the
gradients alive at once (a bp stage: all of its own; a local rank: one block's, freed after each block's
step) + optimizer state. The meter runs on the first warm-up step only, so it does not slow the timed steps.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from collections.abc import Sequence
from contextlib import nullcontext

import torch
import torch.multiprocessing as mp
from torch import nn

from locallearn.bench.common import build_cell, optimizer_state_bytes, synthetic_batch
from locallearn.model import LocalModel
from locallearn.types import Batch

# CLI name -> (torch.distributed.pipelining class, several stages per rank)
SCHEDULES: dict[str, tuple[str, bool]] = {
    "gpipe": ("ScheduleGPipe", False),
    "1f1b": ("Schedule1F1B", False),
    "interleaved1f1b": ("ScheduleInterleaved1F1B", True),
    "interleavedzb": ("ScheduleInterleavedZeroBubble", True),
}
DEFAULT_SCHEDULES = ["gpipe", "1f1b", "interleaved1f1b", "interleavedzb"]


class StageModule(nn.Module):
    """Consecutive layers of a ``LocalModel``'s backbone; the last stage ends with the task head."""

    def __init__(self, layers: Sequence[nn.Module], head: nn.Module | None = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.head = head

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h)
        return h if self.head is None else self.head(h)


def stage_blocks(sizes: Sequence[int], num_blocks: int, world: int, interleaved: bool) -> list[list[int]]:
    """Blocks of each pipeline stage: the local pipeline's groups (one stage per rank), or for an
    interleaved schedule one block per stage (stage s runs on rank s mod P)."""
    if not interleaved:
        starts = [sum(sizes[:r]) for r in range(len(sizes))]
        return [list(range(s, s + n)) for s, n in zip(starts, sizes)]
    if num_blocks % world or num_blocks < 2 * world:
        raise ValueError(
            f"an interleaved schedule puts one block per stage and K/P >= 2 stages on each rank: "
            f"K={num_blocks} blocks on P={world} ranks does not fit (use K = a multiple of P, K >= 2P)"
        )
    return [[b] for b in range(num_blocks)]


def stage_module(model: LocalModel, blocks: Sequence[int], last: bool) -> StageModule:
    if model.taps:
        raise ValueError("the torch pipelining baseline runs models without a feature bank (classification)")
    layers = [model.backbone.layers[i] for b in blocks for i in model.ranges[b]]
    return StageModule(layers, model.head if last else None)


def task_loss(model: LocalModel):
    """The task's loss on the last stage's output, as ``torch.distributed.pipelining`` calls it."""
    task = model.auxes[-1].task
    return lambda output, target: task.loss(output, Batch(output, target))


def resident_bytes(
    params: Sequence[nn.Parameter], grad_groups: Sequence[Sequence[nn.Parameter]], opts
) -> int:
    """Parameters + the largest group of gradients alive at once + optimizer state."""

    def size(ps: Sequence[nn.Parameter]) -> int:
        return sum(p.numel() * p.element_size() for p in ps)

    grads = max((size([p for p in g if p.requires_grad]) for g in grad_groups), default=0)
    return size(params) + grads + optimizer_state_bytes(opts)


def _init(rank: int, world: int, port: int):
    from locallearn.engine import distributed

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    return distributed.init("pipeline", "cpu", 120.0)


def torch_rank(rank: int, world: int, port: int, spec: dict, out: mp.Queue) -> None:
    """One rank of backprop under a ``torch.distributed.pipelining`` schedule. ``spec['grads']``: one
    step without the optimizer, returning the loss and this rank's gradients (the correctness test)."""
    try:
        out.put((rank, _torch_rank_body(rank, world, port, spec)))
    except BaseException:
        out.put((rank, {"error": traceback.format_exc()}))
        raise


def _torch_rank_body(rank: int, world: int, port: int, spec: dict) -> dict:
    import torch.distributed as dist
    import torch.distributed.pipelining as pp

    from locallearn.bench.memory import LiveMeter
    from locallearn.engine import distributed
    from locallearn.engine.optim import build_optimizer

    _init(rank, world, port)
    torch.manual_seed(0)  # every rank builds the same model and keeps its own stages
    cell = build_cell(spec["backbone"], spec["k"], spec["method"])
    model, data = cell.model, synthetic_batch(spec["batch"])
    cls_name, interleaved = SCHEDULES[spec["schedule"]]
    groups = stage_blocks(spec["sizes"], model.num_blocks, world, interleaved)
    mine = [s for s in range(len(groups)) if s % world == rank]
    mods = [stage_module(model, groups[s], s == len(groups) - 1) for s in mine]
    stages = [pp.PipelineStage(m, s, len(groups), torch.device("cpu")) for m, s in zip(mods, mine)]
    cls = getattr(pp, cls_name)
    micro = spec["micro"]
    schedule = cls(stages if interleaved else stages[0], n_microbatches=micro, loss_fn=task_loss(model))
    params = [p for m in mods for p in m.parameters()]
    opt = build_optimizer(params, cell.cfg.optim)
    for group in opt.param_groups:  # as build_cell: a small fixed lr
        group["lr"] = 0.01
    first, last = 0 in mine, len(groups) - 1 in mine
    meter = LiveMeter(model)

    def step(i: int) -> list:
        losses: list = []
        args = (data.x,) if first else ()
        with meter.track() if i == 0 else nullcontext():
            schedule.step(*args, target=data.y if last else None, losses=losses if last else None)
        return losses

    if spec.get("grads"):
        losses = step(0)
        names = {id(p): f"backbone.{n}" for n, p in model.backbone.named_parameters()}
        names.update({id(p): f"head.{n}" for n, p in model.head.named_parameters()})
        # numpy: a tensor in a queue is shared memory that dies with this process
        grads = {names[id(p)]: p.grad.numpy().copy() for p in params if p.grad is not None}
        distributed.shutdown()
        return {"losses": [float(v.detach()) for v in losses], "grads": grads}
    dist.barrier()
    for i in range(spec["warmup"] + spec["steps"]):
        if i == spec["warmup"]:
            dist.barrier()
            t0 = time.perf_counter()
        step(i)
        opt.step()
        opt.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - t0
    resident = resident_bytes(params, [params], [opt])
    distributed.shutdown()
    return {"elapsed": elapsed, "act": meter.peak, "resident": resident, "stages": len(mine)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def context():
    """Ranks fork from a server that has imported torch and this bench once (a fresh interpreter per
    rank costs seconds on a loaded machine) and has never run an OpenMP region (forking after one can
    hang)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "locallearn.bench.pipeline_torch", "locallearn.bench.pipeline"])
    return ctx


def spawn(target, world: int, spec: dict) -> list[dict]:
    """Run ``target(rank, world, port, spec, queue)`` on ``world`` fresh processes; one result each."""
    ctx = context()
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, spec, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, dict] = {}
    try:
        for _ in procs:
            rank, result = queue.get(timeout=600)
            if "error" in result:
                raise RuntimeError(f"rank {rank} failed:\n{result['error']}")
            results[rank] = result
    except BaseException:
        for p in procs:  # the others wait on the failed rank: stop them now
            p.terminate()
        raise
    finally:
        for p in procs:
            p.join()
    return [results[r] for r in range(world)]


def single(backbone: str, k: int, method: str, batch: int, steps: int, warmup: int) -> dict:
    """One process, 1 thread: ``bp`` (K = 1) or the local method through the sequential engine."""
    from locallearn.bench.memory import LiveMeter

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cell = build_cell(backbone, k, method)
    model, data = cell.model, synthetic_batch(batch)
    meter = LiveMeter(model)
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        with meter.track() if i == 0 else nullcontext():
            cell.step(data)
    ips = steps * batch / (time.perf_counter() - t0)
    blocks = [list(model.block_parameters(b)) for b in range(model.num_blocks)]
    resident = resident_bytes(list(model.parameters()), blocks, cell.optimizers)
    return {"images_per_s": ips, "act": meter.peak, "resident": resident}
