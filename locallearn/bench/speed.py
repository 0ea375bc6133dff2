"""``locallearn bench speed``: median training-step time of every method relative to ``bp``.

All methods of a cell are built first and then stepped round-robin (one step each per round), so that
slow phases of a shared machine hit every method alike; the first ``warmup`` rounds are discarded. Next
to each time ratio stands the FLOP ratio to ``bp`` (``torch.utils.flop_counter.FlopCounterMode`` over one
whole training step, backward included; it counts matmuls and convolutions, not BN / element-wise ops),
and ``time_ratio / flop_ratio``: 1.0 means a method costs exactly its extra arithmetic (target <= 1.10).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from locallearn.bench.common import (
    DEFAULT_METHODS,
    Cell,
    build_cell,
    header,
    markdown_table,
    parse_cell,
    plt,
    synthetic_batch,
    write_csv,
)
from locallearn.engine.sequential import sync_device

log = logging.getLogger(__name__)

COLUMNS = [
    "device",
    "backbone",
    "K",
    "method",
    "segments",
    "batch",
    "median_step_ms",
    "iqr_step_ms",
    "images_per_s",
    "time_ratio",
    "gflop_per_step",
    "flop_ratio",
    "time_over_flop",
]
OVERHEAD_TARGET = 1.10


def count_flops(cell: Cell, batch) -> int:
    with FlopCounterMode(display=False) as counter:
        cell.step(batch)
    return counter.get_total_flops()


def time_cells(cells: list[Cell], batch, device: torch.device, steps: int, warmup: int) -> list[list[float]]:
    times: list[list[float]] = [[] for _ in cells]
    for r in range(warmup + steps):
        for i, cell in enumerate(cells):
            sync_device(device)
            t0 = time.perf_counter()
            cell.step(batch)
            sync_device(device)
            if r >= warmup:
                times[i].append(time.perf_counter() - t0)
    return times


def profile_cell(cell: Cell, batch, steps: int = 3, top: int = 12) -> list[str]:
    """The ops a step spends its time in (self time), as a Markdown table."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if batch.x.is_cuda else [])
    cell.step(batch)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            cell.step(batch)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    rows = [
        {
            "op": e.key,
            "calls": e.count // steps,
            "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
            "share": e.self_cpu_time_total / total,
        }
        for e in events[:top]
    ]
    return markdown_table(rows, ["op", "calls", "self_ms_per_step", "share"])


def run(
    cells: Sequence[str] = ("resnet32:16",),
    methods: Sequence[str] = DEFAULT_METHODS,
    batch_size: int = 64,
    steps: int = 10,
    warmup: int = 2,
    out_dir: str | Path = "benchmarks/results",
    device: str = "cpu",
    channels_last: bool = False,
    profile: bool = False,
    name: str = "speed",
) -> str:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    methods = list(dict.fromkeys(["bp", *methods]))
    rows: list[dict[str, Any]] = []
    profiles: list[str] = []
    for text in cells:
        backbone, k = parse_cell(text)
        torch.manual_seed(0)
        built = [build_cell(backbone, k, m, device=dev, memory_format=fmt) for m in methods]
        batch = synthetic_batch(batch_size, device=dev, memory_format=fmt)
        flops = [count_flops(c, batch) for c in built]
        log.info(
            "speed: %s K=%d, %d methods interleaved, %d+%d rounds", backbone, k, len(built), warmup, steps
        )
        times = time_cells(built, batch, dev, steps, warmup)
        medians = [statistics.median(t) for t in times]
        for cell, t, med, fl in zip(built, times, medians, flops):
            q = statistics.quantiles(t, n=4) if len(t) > 1 else [med, med, med]
            time_ratio, flop_ratio = med / medians[0], fl / flops[0]
            rows.append(
                {
                    "device": dev.type,
                    "backbone": backbone,
                    "K": k,
                    "method": cell.method,
                    "segments": cell.segments or None,
                    "batch": batch_size,
                    "median_step_ms": med * 1e3,
                    "iqr_step_ms": (q[2] - q[0]) * 1e3,
                    "images_per_s": batch_size / med,
                    "time_ratio": time_ratio,
                    "gflop_per_step": fl / 1e9,
                    "flop_ratio": flop_ratio,
                    "time_over_flop": time_ratio / flop_ratio,
                }
            )
            if profile and time_ratio / flop_ratio > OVERHEAD_TARGET:
                profiles += ["", f"### {backbone} K={k} {cell.method}: top ops by self CPU time", ""]
                profiles += profile_cell(cell, batch)
        if profile:
            profiles += ["", f"### {backbone} K={k} bp: top ops by self CPU time", ""]
            profiles += profile_cell(built[0], batch)
    write_csv(out_dir / f"{name}.csv", rows, COLUMNS)
    plot(rows, out_dir / f"{name}.png")
    notes = [
        f"interleaved: every method steps once per round; {warmup} warm-up rounds discarded, median of {steps}",
        "synthetic CIFAR-shaped 3x32x32 batches; split `even`; channels_last: " + str(channels_last),
        "FLOPs: torch.utils.flop_counter.FlopCounterMode over one training step (forward + backward; "
        "matmul/conv only); time_over_flop = time_ratio / flop_ratio (target <= 1.10)",
    ]
    if dev.type == "cpu":
        notes.append("CPU timings on a shared machine: only the ratios within one run mean anything")
    lines = header("Speed: training-step time relative to bp", str(batch_size), notes=notes)
    lines += markdown_table(rows, COLUMNS)
    lines += ["", "## Targets (printed, not asserted)", ""]
    for r in rows:
        if r["method"] != "bp":
            ok = "met" if r["time_over_flop"] <= OVERHEAD_TARGET else "NOT met"
            lines.append(
                f"- {r['backbone']} K={r['K']} {r['method']}: time {r['time_ratio']:.2f}x bp, FLOPs "
                f"{r['flop_ratio']:.2f}x bp, time/FLOP ratio {r['time_over_flop']:.2f} (target <= {OVERHEAD_TARGET}): {ok}"
            )
    if profiles:
        lines += ["", "## Profiles (torch.profiler)", *profiles]
    md = "\n".join(lines) + "\n"
    (out_dir / f"{name}.md").write_text(md)
    return md


def plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(6, 3.5))
    labels = [f"{r['backbone']} {r['method']}" for r in rows]
    y = range(len(rows))
    ax.barh([i - 0.2 for i in y], [r["time_ratio"] for r in rows], height=0.4, label="time / bp")
    ax.barh([i + 0.2 for i in y], [r["flop_ratio"] for r in rows], height=0.4, label="FLOPs / bp")
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("ratio to bp (same run)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot.close(fig)


def add_arguments(p) -> None:
    p.add_argument("--cells", nargs="+", default=["resnet32:16"], help="BACKBONE:K cells")
    p.add_argument(
        "--methods", nargs="+", default=DEFAULT_METHODS, help="methods; 'checkpoint' = bp + sqrt(K) segments"
    )
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="timed rounds (one step of every method each)")
    p.add_argument("--warmup", type=int, default=2, help="discarded rounds")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument(
        "--profile", action="store_true", help="torch.profiler tables for methods over the overhead target"
    )
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default="speed", help="file stem of the results")


def main(args) -> str:
    return run(
        args.cells,
        args.methods,
        args.batch,
        args.steps,
        args.warmup,
        args.out,
        args.device,
        args.channels_last,
        args.profile,
        args.name,
    )
