"""engine.compile speed: the same method uncompiled vs compiled, per region mode, stepped in turn.

For each method: one uncompiled cell and one compiled cell per ``--regions`` entry (``module``: each
body and aux its own region; ``block``: body + aux as one region per block), all built from the same
seed. Each compiled cell's first step (which compiles every distinct graph) is timed apart as its
compile time; then ``--warmup`` rounds and ``--steps`` timed rounds, each round stepping every cell
once (the order rotates between rounds), on fresh synthetic batches. Reports per region the median
step times, the ratio to the uncompiled cell of the same run, the number of distinct graphs Dynamo
compiled for it and its graph breaks.

The inductor cache lives in a fresh temporary directory per process (a cold compile for the first
compiled cell; a later cell of the same process may reuse kernels an earlier one generated, so the
block regions compile first): run one method per invocation for clean compile times. Rows are merged
by (device, method, backend, mode, region) into ``--csv`` and the markdown file is rewritten from it:

    OMP_NUM_THREADS=1 python benchmarks/compile_speed.py --methods dgl
    OMP_NUM_THREADS=1 python benchmarks/compile_speed.py --methods infopro --regions module block
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
    "device", "backbone", "K", "method", "backend", "mode", "region", "batch", "threads",
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


def measure(method: str, args, device: torch.device) -> list[dict]:
    torch._dynamo.reset()
    counters.clear()
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    cells = {}
    for name in ["eager", *args.regions]:
        torch.manual_seed(0)
        cells[name] = build_cell(args.backbone, args.k, method, device=device, memory_format=fmt)
        if name != "eager":
            compile_blocks(cells[name].model, args.backend, args.mode, region=name)

    def batch(i: int):
        return synthetic_batch(args.batch, seed=i, device=device, memory_format=fmt)

    # first step: the compiles (every cell sees the same batch and weights: compare their losses)
    first = {"eager": train_step(cells["eager"].model, batch(0), cells["eager"].optimizers)}
    compile_s, graphs, breaks = {}, {}, {}
    for name in args.regions:
        before = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
        sync(device)
        t0 = time.perf_counter()
        first[name] = train_step(cells[name].model, batch(0), cells[name].optimizers)
        sync(device)
        compile_s[name] = time.perf_counter() - t0
        graphs[name] = counters["stats"]["unique_graphs"] - before[0]
        breaks[name] = sum(counters["graph_break"].values()) - before[1]
    times = {name: [] for name in cells}
    order = list(cells)
    for i in range(args.warmup + args.steps):
        b = batch(1 + i)
        shift = i % len(order)
        for name in order[shift:] + order[:shift]:
            t = timed(cells[name], b, device)
            if i >= args.warmup:
                times[name].append(t)
    eager_ms = 1e3 * statistics.median(times["eager"])
    rows = []
    for name in args.regions:
        compiled_ms = 1e3 * statistics.median(times[name])
        loss_diff = max(
            abs(a["loss"].detach().item() - b["loss"].detach().item())
            for a, b in zip(first["eager"], first[name])
        )
        row = {
            "device": device.type,
            "backbone": args.backbone,
            "K": args.k if method != "bp" else 1,
            "method": method,
            "backend": args.backend,
            "mode": args.mode,
            "region": name,
            "batch": args.batch,
            "threads": torch.get_num_threads(),
            "eager_ms": eager_ms,
            "compiled_ms": compiled_ms,
            "speedup": eager_ms / compiled_ms,
            "compile_s": compile_s[name],
            "graphs": graphs[name],
            "graph_breaks": breaks[name],
            "first_loss_diff": loss_diff,
        }
        print(
            ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
            flush=True,
        )
        rows.append(row)
    return rows


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
    p.add_argument("--regions", nargs="+", default=["block", "module"], choices=["module", "block"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--csv", type=Path, default=Path("benchmarks/results/compile_speed.csv"))
    p.add_argument("--md", type=Path, default=Path("benchmarks/results/compile_speed.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    new = [row for m in args.methods for row in measure(m, args, device)]
    key = ("device", "method", "backend", "mode", "region")
    old = read_csv(args.csv) if args.csv.exists() else []
    for r in old:
        r.setdefault("region", "module")  # rows from before engine.compile_region
        r["region"] = r["region"] or "module"
    rows = [r for r in old if tuple(r[c] for c in key) not in
            {tuple(str(n[c]) for c in key) for n in new}]  # fmt: skip
    rows += new
    write_csv(args.csv, rows, COLUMNS)
    rows = read_csv(args.csv)
    for r in rows:  # the markdown shows numbers as numbers
        for c in ("eager_ms", "compiled_ms", "speedup", "compile_s", "first_loss_diff"):
            r[c] = float(r[c])
    notes = [
        "region module: each block's body and each aux its own compiled region (31 regions for K=16); block: "
        "body + aux as one compiled region per block (16 regions; `engine.compile_region=block`)",
        f"interleaved: the uncompiled cell and one compiled cell per region step once per round (order "
        f"rotating); {args.warmup} warm-up rounds after the compiling first step, median of {args.steps}; "
        "eager_ms is the uncompiled cell of the same run",
        "compile_s: wall time of the compiled cell's first step (Dynamo + inductor for every distinct "
        "graph; block compiles first, on a cold inductor cache, module after it in the same process); "
        "graphs: distinct graphs Dynamo compiled for that cell",
        "first_loss_diff: largest |eager - compiled| block loss on the first (identical) step",
        "backend eager / aot_eager rows: no generated code, so compiled_ms - eager_ms is the runtime cost of "
        "Dynamo's guards (eager) plus AOTAutograd's wrappers (aot_eager) over the step's regions",
        "rows are merged from separate runs, one per method (the command above is the last one): `OMP_NUM_THREADS=1 "
        "python benchmarks/compile_speed.py --methods METHOD [--backend BACKEND] [--regions REGION ...]`; rows of "
        "one method and backend come from one run; CPU timings on a shared machine: compare within a run",
    ]
    lines = header(
        "engine.compile: per-block torch.compile (module or block regions) vs eager",
        str(args.batch),
        notes=notes,
    )
    lines += markdown_table(rows, COLUMNS)
    args.md.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.md}", file=sys.stderr)


if __name__ == "__main__":
    main()
