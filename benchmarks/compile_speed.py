"""engine.compile speed: the same method uncompiled vs compiled per block, stepped alternately.

For each method: two cells built from the same seed; the compiled one goes through
``compile_blocks``. Its first step (which compiles every distinct block graph) is timed apart as the
compile time; then ``--warmup`` rounds and ``--steps`` timed rounds, each round stepping both cells
once (the order alternates between rounds), on fresh synthetic batches. Reports the median step
times, the ratio, the number of distinct graphs Dynamo compiled and its graph breaks.

The inductor cache lives in a fresh temporary directory per process (a cold compile, except that a
second method in the same process may reuse kernels the first one generated): run one method per
invocation for clean compile times. Rows are merged by (device, method, backend, mode) into
``--csv`` and the markdown file is rewritten from it, so methods can be measured one run at a time:

    OMP_NUM_THREADS=1 python benchmarks/compile_speed.py --methods dgl
    OMP_NUM_THREADS=1 python benchmarks/compile_speed.py --methods infopro
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:  # before torch is imported: a cold compile
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cache-")

import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from locallearn.bench.common import (  # noqa: E402
    build_cell,
    header,
    markdown_table,
    read_csv,
    synthetic_batch,
    write_csv,
)
from locallearn.engine.compile import compile_blocks  # noqa: E402
from locallearn.engine.sequential import train_step  # noqa: E402

COLUMNS = [
    "device", "backbone", "K", "method", "backend", "mode", "batch", "threads",
    "eager_ms", "compiled_ms", "speedup", "compile_s", "graphs", "graph_breaks", "first_loss_diff",
]  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(cell, batch, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    cell.step(batch)
    sync(device)
    return time.perf_counter() - t0


def measure(method: str, args, device: torch.device) -> dict:
    torch._dynamo.reset()
    counters.clear()
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    cells = []
    for _ in range(2):
        torch.manual_seed(0)
        cells.append(build_cell(args.backbone, args.k, method, device=device, memory_format=fmt))
    eager, compiled = cells
    compile_blocks(compiled.model, args.backend, args.mode)

    def batch(i: int):
        return synthetic_batch(args.batch, seed=i, device=device, memory_format=fmt)

    # first step: the compile (both cells see the same batch and weights: compare their losses)
    outs_e = train_step(eager.model, batch(0), eager.optimizers)
    sync(device)
    t0 = time.perf_counter()
    outs_c = train_step(compiled.model, batch(0), compiled.optimizers)
    sync(device)
    compile_s = time.perf_counter() - t0
    loss_diff = max(
        abs(a["loss"].detach().item() - b["loss"].detach().item()) for a, b in zip(outs_e, outs_c)
    )
    times = {"eager": [], "compiled": []}
    for i in range(args.warmup + args.steps):
        b = batch(1 + i)
        order = [("eager", eager), ("compiled", compiled)]
        for name, cell in order if i % 2 == 0 else order[::-1]:
            t = timed(cell, b, device)
            if i >= args.warmup:
                times[name].append(t)
    eager_ms = 1e3 * statistics.median(times["eager"])
    compiled_ms = 1e3 * statistics.median(times["compiled"])
    row = {
        "device": device.type,
        "backbone": args.backbone,
        "K": args.k if method != "bp" else 1,
        "method": method,
        "backend": args.backend,
        "mode": args.mode,
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "eager_ms": eager_ms,
        "compiled_ms": compiled_ms,
        "speedup": eager_ms / compiled_ms,
        "compile_s": compile_s,
        "graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
        "first_loss_diff": loss_diff,
    }
    print(
        ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True
    )
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="*", default=["bp", "dgl", "infopro", "dgl+manpp"])  # none: re-render
    p.add_argument("--backbone", default="resnet32")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--backend", default="inductor")
    p.add_argument("--mode", default="default")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--csv", type=Path, default=Path("benchmarks/results/compile_speed.csv"))
    p.add_argument("--md", type=Path, default=Path("benchmarks/results/compile_speed.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    new = [measure(m, args, device) for m in args.methods]
    key = ("device", "method", "backend", "mode")
    rows = [r for r in (read_csv(args.csv) if args.csv.exists() else []) if tuple(r[c] for c in key) not in
            {tuple(str(n[c]) for c in key) for n in new}]  # fmt: skip
    rows += new
    write_csv(args.csv, rows, COLUMNS)
    rows = read_csv(args.csv)
    for r in rows:  # the markdown shows numbers as numbers
        for c in ("eager_ms", "compiled_ms", "speedup", "compile_s", "first_loss_diff"):
            r[c] = float(r[c])
    notes = [
        f"interleaved: both cells step once per round (order alternating); {args.warmup} warm-up rounds "
        f"after the compiling first step, median of {args.steps}",
        "compile_s: wall time of the compiled cell's first step (Dynamo + inductor for every distinct "
        "graph, cold inductor cache); graphs: distinct graphs Dynamo compiled",
        "first_loss_diff: largest |eager - compiled| block loss on the first (identical) step",
        "backend eager / aot_eager rows: no generated code, so compiled_ms - eager_ms is the runtime cost of "
        "Dynamo's guards (eager) plus AOTAutograd's wrappers (aot_eager) over the 31 regions of a K=16 step",
        "rows are merged from separate runs, one per row: `OMP_NUM_THREADS=1 python benchmarks/compile_speed.py "
        "--methods METHOD [--backend BACKEND]` (the command above is the last one); CPU timings on a shared machine: "
        "compare within a row",
    ]
    lines = header("engine.compile: per-block torch.compile vs eager", str(args.batch), notes=notes)
    lines += markdown_table(rows, COLUMNS)
    args.md.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.md}", file=sys.stderr)


if __name__ == "__main__":
    main()
