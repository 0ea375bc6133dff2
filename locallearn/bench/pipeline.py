"""``locallearn bench pipeline``: throughput of the pipeline engine against one process, same compute.

One local-learning model (default ResNet-32, K=4, DGL, synthetic CIFAR-sized batches) is trained for
``--steps`` timed steps after ``--warmup`` steps, three ways: one process with 1 thread; one process
with P threads (the same total compute as P ranks); and P ranks of the pipeline engine
(``engine/pipeline.py``, gloo, 1 thread each, in-flight depth 2). Blocks are grouped by measured step
time (``--balance time``, default: throughput is set by the slowest rank) or, as training does by
default, by the memory meter's activation bytes (``--balance memory``), which on a ResNet puts the
activation-heavy first block alone on rank 0 and so leaves the ranks' compute unequal.
Throughput = images per second from the first to the last timed step (pipeline: the slowest rank).
The speed-up curve runs over P = 2..min(K, --max-ranks). On a machine with fewer free cores than P,
or shared with other jobs, the numbers measure contention as much as the engine: the header says so.
"""

from __future__ import annotations

import os
import socket
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.multiprocessing as mp

from locallearn.bench.common import build_cell, header, markdown_table, synthetic_batch, write_csv

COLUMNS = ["setting", "processes", "threads_each", "images_per_s", "speedup_vs_1x1", "vs_1proc_same_threads"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cell(backbone: str, k: int, method: str):
    torch.manual_seed(0)
    return build_cell(backbone, k, method)


def sequential(
    backbone: str, k: int, method: str, batch: int, steps: int, warmup: int, threads: int
) -> float:
    from locallearn.engine.sequential import train_step

    torch.set_num_threads(threads)
    cell = _cell(backbone, k, method)
    data = synthetic_batch(batch)
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        train_step(cell.model, data, cell.optimizers)
    return steps * batch / (time.perf_counter() - t0)


def _rank(rank: int, world: int, port: int, spec: tuple, out: mp.Queue) -> None:
    import torch.distributed as dist

    from locallearn.bench.memory import LiveMeter
    from locallearn.bench.pipeline_torch import resident_bytes
    from locallearn.engine import distributed, pipeline
    from locallearn.engine.step import local_step

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    backbone, k, method, batch, steps, warmup, sizes = spec
    ctx = distributed.init("pipeline", "cpu", 120.0)
    cell = _cell(backbone, k, method)
    model, data = cell.model, synthetic_batch(batch)
    stage = pipeline.stages(sizes)[rank]
    pipe = pipeline.Pipe(ctx, 2, data.mean, data.std)
    meter = LiveMeter(model)  # on the first step only: what this rank's blocks hold for backward at once
    dist.barrier()
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        with meter.track() if i == 0 else nullcontext():
            h, b = (data.x, data) if stage.first else pipe.recv()[1:]
            for blk in stage.blocks:
                h, _ = local_step(model.body(blk), model.auxes[blk], h, b, cell.optimizers[blk])
        if not stage.last:
            pipe.send(i, h, b, with_image=True)
    pipe.flush()
    elapsed = time.perf_counter() - t0
    blocks = [list(model.block_parameters(blk)) for blk in stage.blocks]
    params = [p for blk in stage.blocks for m in (model.body(blk), model.auxes[blk]) for p in m.parameters()]
    resident = resident_bytes(params, blocks, [cell.optimizers[blk] for blk in stage.blocks])
    out.put((rank, elapsed, sizes, {"act": meter.peak, "resident": resident}))
    distributed.shutdown()


def block_times(backbone: str, k: int, method: str, batch: int, reps: int = 5) -> list[float]:
    """Median time of each block's ``local_step`` (1 thread), measured in this process."""
    from locallearn.engine.step import local_step

    torch.set_num_threads(1)
    cell, data = _cell(backbone, k, method), synthetic_batch(batch)
    times = [[] for _ in range(k)]
    for _ in range(reps + 1):  # the first round warms up
        h = data.x
        for blk in range(k):
            t0 = time.perf_counter()
            h, _ = local_step(cell.model.body(blk), cell.model.auxes[blk], h, data, cell.optimizers[blk])
            times[blk].append(time.perf_counter() - t0)
    return [sorted(t[1:])[len(t[1:]) // 2] for t in times]


def block_sizes(backbone: str, k: int, method: str, batch: int, world: int, balance: str) -> list[int]:
    from locallearn.engine import pipeline

    if balance == "time":
        costs = block_times(backbone, k, method, batch)
    elif balance == "memory":
        cell = _cell(backbone, k, method)
        costs = [float(c) for c in pipeline.block_costs(cell.model, synthetic_batch(batch))]
    else:
        raise ValueError(f"--balance must be 'time' or 'memory', got {balance!r}")
    return pipeline.partition(costs, world)


def pipelined_runs(
    backbone: str, k: int, method: str, batch: int, steps: int, warmup: int, world: int, sizes: list[int]
) -> tuple[float, list[int], list[dict]]:
    """P ranks of the pipeline engine with blocks grouped as ``sizes``: images/s (the slowest rank),
    the sizes, and each rank's memory on its first step (``act``, ``resident`` bytes)."""
    from locallearn.bench.pipeline_torch import context

    ctx = context()
    queue, port = ctx.Queue(), _free_port()
    spec = (backbone, k, method, batch, steps, warmup, sizes)
    procs = [ctx.Process(target=_rank, args=(r, world, port, spec, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=600) for _ in procs)
    for p in procs:
        p.join()
    return steps * batch / max(e for _, e, _, _ in results), sizes, [m for *_, m in results]


def pipelined(
    backbone: str, k: int, method: str, batch: int, steps: int, warmup: int, world: int, balance: str = "time"
):
    sizes = block_sizes(backbone, k, method, batch, world, balance)
    ips, sizes, _ = pipelined_runs(backbone, k, method, batch, steps, warmup, world, sizes)
    return ips, sizes


def run(
    backbone: str,
    k: int,
    method: str,
    batch: int,
    steps: int,
    warmup: int,
    max_ranks: int,
    out: str,
    balance: str = "time",
) -> str:
    threads = torch.get_num_threads()
    rows = []
    base = sequential(backbone, k, method, batch, steps, warmup, 1)
    rows.append({"setting": "sequential", "processes": 1, "threads_each": 1, "images_per_s": base})
    sizes_seen = {}
    for p in range(2, min(k, max_ranks) + 1):
        same = sequential(backbone, k, method, batch, steps, warmup, p)
        rows.append({"setting": "sequential", "processes": 1, "threads_each": p, "images_per_s": same})
        ips, sizes = pipelined(backbone, k, method, batch, steps, warmup, p, balance)
        sizes_seen[p] = sizes
        rows.append({"setting": "pipeline", "processes": p, "threads_each": 1, "images_per_s": ips,
                     "vs_1proc_same_threads": ips / same})  # fmt: skip
    torch.set_num_threads(threads)
    for row in rows:
        row["speedup_vs_1x1"] = row["images_per_s"] / base
    out_dir = Path(out)
    write_csv(out_dir / "pipeline.csv", rows, COLUMNS)
    notes = [
        f"model: {backbone}, K={k}, method {method}, synthetic 32x32 batches, {steps} timed steps after {warmup}",
        f"blocks per rank ({balance} balance): {sizes_seen}",
        f"CPU cores visible: {os.cpu_count()}; other jobs may share them (see the load average at run time: "
        f"{os.getloadavg()[0]:.1f})",
    ]
    lines = header("Pipeline (PPLL) throughput vs one process", str(batch), notes=notes)
    lines += markdown_table(rows, COLUMNS)
    text = "\n".join(lines) + "\n"
    (out_dir / "pipeline.md").write_text(text)
    return text


def add_arguments(p) -> None:
    from locallearn.bench.pipeline_torch import DEFAULT_SCHEDULES, SCHEDULES

    p.add_argument("--backbone", default="resnet32")
    p.add_argument("--num-blocks", type=int, default=4)
    p.add_argument("--method", default="dgl", help="a window-1 method")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--max-ranks", type=int, default=4, help="largest P of the curve (P <= K)")
    p.add_argument("--balance", choices=["time", "memory"], default="time", help="how blocks are grouped")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument(
        "--baseline",
        choices=["none", "torch"],
        default="none",
        help="torch: compare with bp under torch.distributed.pipelining on --ranks ranks "
        "(writes pipeline_torch.csv/.md instead of the speed-up curve)",
    )
    p.add_argument("--ranks", type=int, default=2, help="--baseline torch: P ranks (P <= K)")
    p.add_argument("--micro-batches", type=int, default=4, help="--baseline torch: micro-batches per batch")
    p.add_argument(
        "--schedules",
        nargs="+",
        choices=sorted(SCHEDULES),
        default=DEFAULT_SCHEDULES,
        help="--baseline torch: torch.distributed.pipelining schedules to run",
    )
    p.add_argument("--repeats", type=int, default=1, help="--baseline torch: runs per setting (median)")


def main(args) -> str:
    if args.baseline == "torch":
        from locallearn.bench import pipeline_torch
        from locallearn.config import ConfigError

        if not 2 <= args.ranks <= args.num_blocks:  # a bad command line: one line, exit 2
            raise ConfigError(
                f"--ranks must be between 2 and --num-blocks ({args.num_blocks}), got {args.ranks}"
            )
        return pipeline_torch.run(
            args.backbone,
            args.num_blocks,
            args.method,
            args.batch,
            args.micro_batches,
            args.steps,
            args.warmup,
            args.ranks,
            args.out,
            args.balance,
            args.schedules,
            args.repeats,
        )
    return run(
        args.backbone,
        args.num_blocks,
        args.method,
        args.batch,
        args.steps,
        args.warmup,
        args.max_ranks,
        args.out,
        args.balance,
    )
