"""``locallearn bench pipeline --baseline torch``: local learning's pipeline against backprop's.

On the same P ranks (gloo, 1 thread each), the same cuts (the K blocks of ``build_model``'s split, grouped
per rank as ``--balance`` groups them for the local pipeline), the same batch and micro-batch count:

- end-to-end backprop under ``torch.distributed.pipelining``: each stage is a ``PipelineStage`` over
  our blocks' layers (the last one ends with the task head; the loss is the task's loss on its output),
  one SGD step per batch after the schedule has accumulated the micro-batches' gradients (scaled by
  1/M, torch's default). GPipe and 1F1B run one stage per rank; the interleaved schedules one stage per
  block, block b on rank b mod P, which needs K a multiple of P and K >= 2P;
- the local-learning pipeline (``engine/pipeline.py`` through ``bench/pipeline.py``'s rank loop): whole
  batches, in-flight depth 2, no drain between steps (its steps fill the pipe, so it has no
  micro-batches);
- one process running ``bp`` and one running the local method sequentially (1 thread each).

Memory of the largest stage (the rank with the largest sum), two figures: ``act`` = the peak of the bytes
autograd holds for backward at once over one whole training step (``bench.memory.LiveMeter``: each saved
storage from its save to its release; parameters left out; the P2P receive/send buffers not counted),
and ``resident`` = parameters + the gradients alive at once (a bp stage: all of its own; a local rank:
one block's, freed after each block's step) + optimizer state. ``total`` is their sum. The meter runs on
the first warm-up step only, so it does not slow the timed steps.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from statistics import median

import torch
import torch.multiprocessing as mp
from torch import nn

from locallearn.bench.common import (
    build_cell,
    header,
    markdown_table,
    mib,
    optimizer_state_bytes,
    synthetic_batch,
    write_csv,
)
from locallearn.config import ConfigError
from locallearn.model import LocalModel
from locallearn.types import Batch

log = logging.getLogger(__name__)

# CLI name -> (torch.distributed.pipelining class, several stages per rank)
SCHEDULES: dict[str, tuple[str, bool]] = {
    "gpipe": ("ScheduleGPipe", False),
    "1f1b": ("Schedule1F1B", False),
    "interleaved1f1b": ("ScheduleInterleaved1F1B", True),
    "interleavedzb": ("ScheduleInterleavedZeroBubble", True),
}
DEFAULT_SCHEDULES = ["gpipe", "1f1b", "interleaved1f1b", "interleavedzb"]
COLUMNS = [
    "setting", "schedule", "processes", "threads_each", "micro_batches", "stages", "images_per_s",
    "images_per_s_min", "images_per_s_max", "vs_best_torch", "act_mib", "resident_mib", "total_mib", "total_vs_best_torch",
]  # fmt: skip


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


def _torch_rank(rank: int, world: int, port: int, spec: dict, out: mp.Queue) -> None:
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


def context():
    """Ranks fork from a server that has imported torch and this bench once (a fresh interpreter per
    rank costs seconds on a loaded machine) and has never run an OpenMP region (forking after one can
    hang)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "locallearn.bench.pipeline_torch", "locallearn.bench.pipeline"])
    return ctx


def spawn(target, world: int, spec: dict) -> list[dict]:
    """Run ``target(rank, world, port, spec, queue)`` on ``world`` fresh processes; one result each."""
    from locallearn.bench.pipeline import _free_port

    ctx = context()
    queue, port = ctx.Queue(), _free_port()
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


def _memory(row: dict, ranks: Sequence[dict]) -> dict:
    """The largest stage: the rank whose activation + resident bytes are largest."""
    big = max(ranks, key=lambda r: r["act"] + r["resident"])
    row.update(act=big["act"], resident=big["resident"])
    return row


def run(
    backbone: str,
    k: int,
    method: str,
    batch: int,
    micro: int,
    steps: int,
    warmup: int,
    world: int,
    out: str,
    balance: str = "time",
    schedules: Sequence[str] = DEFAULT_SCHEDULES,
    repeats: int = 1,
) -> str:
    from locallearn.bench.pipeline import block_sizes, pipelined_runs

    if batch % micro:
        raise ConfigError(f"--batch {batch} must be a multiple of --micro-batches {micro}")
    unknown = [s for s in schedules if s not in SCHEDULES]
    if unknown:
        raise ConfigError(f"unknown schedule(s) {unknown}; choose from {sorted(SCHEDULES)}")
    if warmup < 1:
        raise ConfigError("--warmup must be >= 1: the memory meter runs on the first warm-up step")
    threads, load = torch.get_num_threads(), os.getloadavg()[0]
    sizes = block_sizes(backbone, k, method, batch, world, balance)
    notes = [
        f"model: {backbone}, K={k}, local method {method}, synthetic 32x32 batches, batch {batch} = "
        f"{micro} micro-batches of {batch // micro} for the torch schedules; {steps} timed steps after "
        f"{warmup}; median of {repeats} run(s) per setting, run round-robin in one invocation",
        f"P={world} ranks x 1 thread (gloo); blocks per rank ({balance} balance of the local method): {sizes}",
    ]
    # name -> (row, runner): each runner returns images/s and the per-rank memory
    settings: dict[str, tuple[dict, object]] = {}
    settings["bp 1 process"] = (
        {"setting": "bp, 1 process", "schedule": "-", "processes": 1, "micro_batches": 1, "stages": 1},
        lambda: single(backbone, k, "bp", batch, steps, warmup),
    )
    settings["local 1 process"] = (
        {
            "setting": f"{method}, 1 process",
            "schedule": "sequential",
            "processes": 1,
            "micro_batches": 1,
            "stages": k,
        },  # fmt: skip
        lambda: single(backbone, k, method, batch, steps, warmup),
    )
    for name in schedules:
        interleaved = SCHEDULES[name][1]
        try:
            n_stages = len(stage_blocks(sizes, k, world, interleaved))
        except ValueError as e:
            notes.append(f"{name} not run: {e}")
            continue
        spec = dict(backbone=backbone, k=k, method=method, batch=batch, micro=micro, steps=steps,
                    warmup=warmup, sizes=sizes, schedule=name)  # fmt: skip

        def torch_run(spec=spec):
            ranks = spawn(_torch_rank, world, spec)
            ips = steps * batch / max(r["elapsed"] for r in ranks)
            return _memory({"images_per_s": ips}, ranks)

        settings[name] = (
            {
                "setting": f"bp, torch {SCHEDULES[name][0]}",
                "schedule": name,
                "processes": world,
                "micro_batches": micro,
                "stages": n_stages,
            },  # fmt: skip
            torch_run,
        )

    def local_run():
        ips, _, ranks = pipelined_runs(backbone, k, method, batch, steps, warmup, world, sizes)
        return _memory({"images_per_s": ips}, ranks)

    settings["local pipeline"] = (
        {
            "setting": f"{method}, local pipeline",
            "schedule": "depth 2, no drain",
            "processes": world,
            "micro_batches": 1,
            "stages": world,
        },  # fmt: skip
        local_run,
    )
    measured: dict[str, list[dict]] = {name: [] for name in settings}
    for rep in range(repeats):
        for name, (_, runner) in settings.items():
            log.info("pipeline bench: %s (run %d of %d)", name, rep + 1, repeats)
            measured[name].append(runner())
    torch.set_num_threads(threads)
    rows = []
    for name, (row, _) in settings.items():
        runs = measured[name]
        ips = [r["images_per_s"] for r in runs]
        row = dict(row, threads_each=1, images_per_s=median(ips), images_per_s_min=min(ips))
        row["images_per_s_max"] = max(ips)
        row.update(act_mib=mib(runs[0]["act"]), resident_mib=mib(runs[0]["resident"]))
        row["total_mib"] = row["act_mib"] + row["resident_mib"]
        rows.append(row)
    torch_rows = [r for r in rows if r["schedule"] in SCHEDULES]
    if torch_rows:
        best_ips = max(r["images_per_s"] for r in torch_rows)
        best_mem = min(r["total_mib"] for r in torch_rows)
        for row in rows:
            row["vs_best_torch"] = row["images_per_s"] / best_ips
            row["total_vs_best_torch"] = row["total_mib"] / best_mem
    out_dir = Path(out)
    write_csv(out_dir / "pipeline_torch.csv", rows, COLUMNS)
    notes += [
        "act_mib: peak bytes saved for backward alive at once over one whole step on the largest stage "
        "(LiveMeter; parameters and P2P buffers not counted); resident_mib: parameters + gradients alive "
        "at once + optimizer state (SGD momentum) of that stage; total_mib = act + resident; the largest "
        "stage is the rank with the largest total",
        "vs_best_torch: images/s over the fastest torch schedule's; total_vs_best_torch: total memory over "
        "the smallest torch schedule's (below 1 is better)",
        f"CPU cores visible: {os.cpu_count()}; the machine is shared with other jobs, so the images/s are "
        f"noisy: images_per_s_min/max are the extremes over the repeats (load average at the start "
        f"{load:.1f}, at the end {os.getloadavg()[0]:.1f})",
    ]
    lines = header(
        "Local-learning pipeline vs backprop under torch.distributed.pipelining", str(batch), notes=notes
    )
    lines += markdown_table(rows, COLUMNS)
    text = "\n".join(lines) + "\n"
    (out_dir / "pipeline_torch.md").write_text(text)
    return text
