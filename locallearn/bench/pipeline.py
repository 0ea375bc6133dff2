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

``--baseline torch`` asks instead whether local learning's pipeline beats backprop's: on the same P
ranks (``--ranks``, gloo, 1 thread each), the same cuts (the K blocks of our split, grouped per rank as
``--balance`` groups them) and the same batch, it runs end-to-end ``bp`` under
``torch.distributed.pipelining`` (``--schedules``: GPipe, 1F1B, interleaved 1F1B and zero-bubble, with
``--micro-batches`` M; ``pipeline_torch.py``), the local pipeline (whole batches, depth 2, no drain
between steps: its steps fill the pipe, so it has no micro-batches), and one process running ``bp`` and
the local method sequentially. Each setting runs ``--repeats`` times round-robin (median images/s, and
the extremes); memory is the largest stage's, activation and resident bytes (``pipeline_torch.py``
says what each counts). Writes ``pipeline_torch.csv`` / ``.md``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from statistics import median

import torch
import torch.multiprocessing as mp

from locallearn.bench.common import build_cell, header, markdown_table, mib, synthetic_batch, write_csv
from locallearn.bench.pipeline_torch import (
    DEFAULT_SCHEDULES,
    SCHEDULES,
    context,
    free_port,
    resident_bytes,
    single,
    spawn,
    stage_blocks,
    torch_rank,
)
from locallearn.config import ConfigError

log = logging.getLogger(__name__)

COLUMNS = ["setting", "processes", "threads_each", "images_per_s", "speedup_vs_1x1", "vs_1proc_same_threads"]
TORCH_COLUMNS = [
    "setting", "schedule", "processes", "threads_each", "micro_batches", "stages", "images_per_s",
    "images_per_s_min", "images_per_s_max", "vs_best_torch", "act_mib", "resident_mib", "total_mib", "total_vs_best_torch",
]  # fmt: skip


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
    ctx = context()
    queue, port = ctx.Queue(), free_port()
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


def _memory(row: dict, ranks: Sequence[dict]) -> dict:
    """The largest stage: the rank whose activation + resident bytes are largest."""
    big = max(ranks, key=lambda r: r["act"] + r["resident"])
    row.update(act=big["act"], resident=big["resident"])
    return row


def run_torch_baseline(
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
    if batch % micro:
        raise ConfigError(f"--batch {batch} must be a multiple of --micro-batches {micro}")
    unknown = [s for s in schedules if s not in SCHEDULES]
    if unknown:
        raise ConfigError(f"unknown schedule(s) {unknown}; choose from {sorted(SCHEDULES)}")
    if warmup < 1:
        raise ConfigError("--warmup must be >= 1: the memory meter runs on the first warm-up step")
    if repeats < 1 or steps < 1:
        raise ConfigError(f"--repeats and --steps must be >= 1, got {repeats} and {steps}")
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
            ranks = spawn(torch_rank, world, spec)
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
    write_csv(out_dir / "pipeline_torch.csv", rows, TORCH_COLUMNS)
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
    lines += markdown_table(rows, TORCH_COLUMNS)
    text = "\n".join(lines) + "\n"
    (out_dir / "pipeline_torch.md").write_text(text)
    return text


def add_arguments(p) -> None:
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
        if not 2 <= args.ranks <= args.num_blocks:  # a bad command line: one line, exit 2
            raise ConfigError(
                f"--ranks must be between 2 and --num-blocks ({args.num_blocks}), got {args.ranks}"
            )
        return run_torch_baseline(
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
