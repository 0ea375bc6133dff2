"""``locallearn bench speed``: median training-step time of every method relative to ``bp``.

All methods of a cell are built first and then stepped round-robin (one step each per round), so that
slow phases of a shared machine hit every method alike; the first ``warmup`` rounds are discarded. Next
to each time ratio stands the FLOP ratio to ``bp`` (``torch.utils.flop_counter.FlopCounterMode`` over one
whole training step, backward included; it counts matmuls and convolutions, not BN / element-wise ops),
and ``time_ratio / flop_ratio``: 1.0 means a method costs exactly its extra arithmetic (target <= 1.10).

Speed switches get rows of their own as method specs (``dgl[optim.foreach=true,engine.group_steps=true]``);
``--ref`` names the row the ratios divide by (default ``bp``; ``bp[optim.foreach=true]`` gives the
end-to-end baseline the same optimizer kernels). ``--amp bf16`` autocasts every step (CPU too);
``--size`` / ImageNet-shaped inputs (224 px, 1000 classes) for torchvision backbones (``resnet101:4``);
``--flops-only`` skips timing (the ImageNet cell on CPU, where a timed ResNet-101 step takes too long).

Why a row misses the target is measured, not guessed: after the timed rounds (which stay unprofiled),
every method runs ``--breakdown-rounds`` more steps, interleaved, each under ``torch.profiler``, and the
round with the median wall time is split into four parts that add up to the step:
``counted`` (self time of the ops ``FlopCounterMode`` counts, taken from its registry, and of everything
they call: the convolutions and matmuls the FLOP ratio prices), ``optimizer`` (inside the
``Optimizer.step#...`` / ``Optimizer.zero_grad#...`` ranges torch.optim records), ``other`` (every other
op: BatchNorm, element-wise, copies, pooling, interpolation, autograd bookkeeping, the MAN++ EMA sync)
and ``host`` (on CPU the step's time outside any op: Python and module-call glue; on CUDA the time the
device sat idle). ``time_over_flop_counted_only`` = (counted time ratio) / flop_ratio: about 1 means the
arithmetic costs what its FLOPs say and the whole overhead is the uncounted work. ``--no-breakdown``
skips it. ``profiled_ms`` is not ``median_step_ms``: the profiler adds a per-op cost (most for methods
with many small ops) and its steps run at another moment of a shared machine; the parts are for
attribution, the unprofiled medians for the ratios.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from locallearn.bench.common import (
    CHECKPOINT,
    DEFAULT_METHODS,
    Cell,
    bench_inputs,
    build_cell,
    compile_cell,
    header,
    markdown_table,
    parse_cell,
    parse_spec,
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
    "size",
    "amp",
    "median_step_ms",
    "iqr_step_ms",
    "images_per_s",
    "time_ratio",
    "gflop_per_step",
    "flop_ratio",
    "time_over_flop",
]
BREAKDOWN_COLUMNS = [
    "profiled_ms",
    "counted_ms",
    "optimizer_ms",
    "other_ms",
    "host_ms",
    "time_over_flop_counted_only",
]
COLUMNS += BREAKDOWN_COLUMNS
PARTS = ("counted", "optimizer", "other", "host")
STEP_RANGE = "locallearn.bench.step"  # the record_function range around one profiled step
OPTIMIZER_RANGES = ("Optimizer.step#", "Optimizer.zero_grad#")  # recorded by torch.optim itself
OVERHEAD_TARGET = 1.10
IMAGENET_PAPER = "MAN++ (TPAMI) Table VIII: +22-29% epoch time over E2E on one GPU, ImageNet K=4"


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


def counted_op_names() -> frozenset[str]:
    """Profiler names (``aten::mm``) of the ops ``FlopCounterMode`` counts: the keys of its registry
    (``aten.mm`` / ``aten.mm.default``; overloads share the profiler name)."""
    from torch.utils.flop_counter import flop_registry

    names = set()
    for op in flop_registry:
        namespace, _, rest = str(op).partition(".")
        names.add(f"{namespace}::{rest.split('.')[0]}" if rest else namespace)
    return frozenset(names)


def split_step(events, counted: frozenset[str], device_time: bool) -> tuple[dict[str, float], Counter]:
    """Self time (us) of one profiled step per part, and the ``other`` ops' self time by name.

    Each op belongs to the part of its nearest classifying ancestor (itself included): under a counted
    op -> ``counted`` (its allocations and layout copies are part of its price), else under an optimizer
    range -> ``optimizer``, else ``other``; the ``STEP_RANGE`` wrapper's own self time is ``host``. With
    ``device_time`` (CUDA) the kernels' time counts, attributed to the CPU op that launched them."""
    from torch.autograd import DeviceType

    parts = dict.fromkeys(PARTS, 0.0)
    other: Counter = Counter()
    stack = [(e, None) for e in events if e.cpu_parent is None and e.device_type == DeviceType.CPU]
    while stack:
        event, inherited = stack.pop()
        name = event.name
        if name == STEP_RANGE:
            part = "host"
        elif inherited == "counted" or name in counted:
            part = "counted"
        elif inherited == "optimizer" or name.startswith(OPTIMIZER_RANGES):
            part = "optimizer"
        else:
            part = "other"
        took = event.self_device_time_total if device_time else event.self_cpu_time_total
        parts[part] += took
        if part == "other":
            other[name] += took
        keep = part if part in ("counted", "optimizer") else None
        stack.extend((child, keep) for child in event.cpu_children)
    return parts, other


def breakdown_cells(cells: list[Cell], batch, device: torch.device, rounds: int) -> list[dict[str, Any]]:
    """Per cell, the profiled step with the median wall time out of ``rounds`` (interleaved like the
    timed rounds), split into ``PARTS`` in ms per step, plus ``profiled_ms`` and the top ``other`` ops.
    On CPU ``host`` is the step range's own self time, so the four parts and the wall clock are two
    independent totals; on CUDA it is the wall time no kernel ran (device idle)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    counted = counted_op_names()
    results: list[list[dict[str, Any]]] = [[] for _ in cells]
    for _ in range(max(1, rounds)):
        for i, cell in enumerate(cells):
            sync_device(device)
            with profile(activities=activities) as prof:
                t0 = time.perf_counter()
                with record_function(STEP_RANGE):
                    cell.step(batch)
                sync_device(device)
                wall = (time.perf_counter() - t0) * 1e3
            parts, other = split_step(prof.events(), counted, cuda)
            result: dict[str, Any] = {f"{p}_ms": parts[p] / 1e3 for p in PARTS}
            if cuda:  # device time: what the kernels did not fill is the device waiting for the host
                busy = sum(result[f"{p}_ms"] for p in PARTS if p != "host")
                result["host_ms"] = max(0.0, wall - busy)
            result["profiled_ms"] = wall
            result["top_other"] = [(name, us / 1e3) for name, us in other.most_common(3)]
            results[i].append(result)
    return [sorted(r, key=lambda x: x["profiled_ms"])[(len(r) - 1) // 2] for r in results]


def explain(row: dict[str, Any], ref: dict[str, Any]) -> str:
    """Why a row's time/FLOP ratio is what it is, in measured ms per profiled step (one line)."""
    fr = row["flop_ratio"]
    top = ", ".join(f"{name.removeprefix('aten::')} {ms:.0f}" for name, ms in row["top_other"])
    excess = ", ".join(
        f"{p} {row[f'{p}_ms'] - fr * ref[f'{p}_ms']:+.0f}" for p in ("other", "optimizer", "host", "counted")
    )
    return (
        f"of {row['profiled_ms']:.0f} ms per profiled step ({ref['method']} {ref['profiled_ms']:.0f}), "
        f"{row['other_ms']:.0f} ms is uncounted ops (BN/element-wise/copies/pooling; top: {top}) vs "
        f"{ref['other_ms']:.0f}, {row['optimizer_ms']:.0f} ms optimizer vs {ref['optimizer_ms']:.0f}, "
        f"{row['host_ms']:.0f} ms host vs {ref['host_ms']:.0f}; counted ops alone run at "
        f"{row['time_over_flop_counted_only']:.2f}x their FLOP ratio; ms over FLOP-proportional time: {excess}"
    )


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
    amp: str = "none",
    size: int | None = None,
    flops_only: bool = False,
    split: str = "even",
    ref: str = "bp",
    breakdown: bool = True,
    breakdown_rounds: int = 3,
) -> str:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    methods = list(dict.fromkeys([ref, *methods]))  # the reference row first: ratios divide by it
    rows: list[dict[str, Any]] = []
    profiles: list[str] = []
    shapes: list[str] = []
    for text in cells:
        backbone, k = parse_cell(text)
        inputs, classes = bench_inputs(backbone, size)
        shapes.append(f"{backbone}: 3x{inputs.size}x{inputs.size}, {classes} classes")
        batch = synthetic_batch(batch_size, inputs, classes, device=dev, memory_format=fmt)

        def build(m: str, backbone=backbone, k=k, inputs=inputs, classes=classes) -> Cell:
            e2e = parse_spec(m)[0] in ("bp", CHECKPOINT)
            overrides = [] if e2e or split == "even" else [f"model.split={split}"]
            torch.manual_seed(0)
            return build_cell(backbone, k, m, inputs, classes, overrides, dev, fmt, amp)

        if flops_only:  # one model alive at a time (ResNet-101 at 224 px)
            flops = [count_flops(build(m), batch) for m in methods]
            times = [[math.nan] for _ in methods]
            built, parts = None, []
        else:
            built = [build(m) for m in methods]
            flops = [count_flops(c, batch) for c in built]  # before compiling: FLOPs of the eager graph
            if warmup < 1 and any(c.cfg is not None and c.cfg.engine.compile for c in built):
                raise ValueError("engine.compile cells need --warmup >= 1 (the first step compiles)")
            for c in built:
                compile_cell(c)  # engine.compile cells compile in their first (warm-up) step
            log.info(
                "speed: %s K=%d, %d methods interleaved, %d+%d rounds", backbone, k, len(built), warmup, steps
            )
            times = time_cells(built, batch, dev, steps, warmup)
            parts = breakdown_cells(built, batch, dev, breakdown_rounds) if breakdown else []
        medians = [statistics.median(t) for t in times]
        for i, (m, t, med, fl) in enumerate(zip(methods, times, medians, flops)):
            q = statistics.quantiles(t, n=4) if len(t) > 1 else [med, med, med]
            time_ratio, flop_ratio = med / medians[0], fl / flops[0]
            segments = built[i].segments if built else 0
            rows.append(
                {
                    "device": dev.type,
                    "backbone": backbone,
                    "K": k,
                    "method": m,
                    "segments": segments or None,
                    "batch": batch_size,
                    "size": inputs.size,
                    "amp": amp,
                    "median_step_ms": med * 1e3,
                    "iqr_step_ms": (q[2] - q[0]) * 1e3,
                    "images_per_s": batch_size / med,
                    "time_ratio": time_ratio,
                    "gflop_per_step": fl / 1e9,
                    "flop_ratio": flop_ratio,
                    "time_over_flop": time_ratio / flop_ratio,
                }
            )
            if parts:
                rows[-1].update(parts[i])
                counted_ratio = parts[i]["counted_ms"] / parts[0]["counted_ms"]
                rows[-1]["time_over_flop_counted_only"] = counted_ratio / flop_ratio
            if built and profile and i > 0 and time_ratio / flop_ratio > OVERHEAD_TARGET:
                profiles += ["", f"### {backbone} K={k} {m}: top ops by self CPU time", ""]
                profiles += profile_cell(built[i], batch)
        if built and profile:
            profiles += ["", f"### {backbone} K={k} {methods[0]}: top ops by self CPU time", ""]
            profiles += profile_cell(built[0], batch)
        del built
    if flops_only:
        for r in rows:  # no timing: blank, not NaN, in the CSV and the table
            for c in ("median_step_ms", "iqr_step_ms", "images_per_s", "time_ratio", "time_over_flop"):
                r[c] = None
    write_csv(out_dir / f"{name}.csv", rows, COLUMNS)
    plot(rows, out_dir / f"{name}.png")
    notes = [
        f"synthetic batches ({'; '.join(shapes)}); split `{split}`; channels_last: {channels_last}",
        f"ratios relative to `{methods[0]}` (first row of each cell)",
        "FLOPs: torch.utils.flop_counter.FlopCounterMode over one training step (forward + backward; "
        "matmul/conv only); time_over_flop = time_ratio / flop_ratio (target <= 1.10)",
    ]
    if flops_only:
        notes.insert(0, "--flops-only: no timing, FLOP ratios only")
    else:
        notes.insert(
            0,
            f"interleaved: every method steps once per round; {warmup} warm-up rounds discarded, median of {steps}",
        )
        if dev.type == "cpu":
            notes.append("CPU timings on a shared machine: only the ratios within one run mean anything")
        if breakdown:
            notes.append(
                f"breakdown: after the timed rounds, {breakdown_rounds} more interleaved steps per method under "
                "torch.profiler, the median one split into counted ops (FlopCounterMode's registry and their "
                "callees) / optimizer (Optimizer.step and zero_grad ranges) / other ops / host ("
                + ("device idle" if dev.type == "cuda" else "Python glue outside any op")
                + "); time_over_flop_counted_only = counted-time ratio / flop_ratio"
            )
    dtype = "float32" if amp == "none" else f"float32 weights, {amp} autocast"
    lines = header(f"Speed: training-step time relative to {methods[0]}", str(batch_size), dtype, notes)
    base_columns = [c for c in COLUMNS if c not in BREAKDOWN_COLUMNS]
    lines += markdown_table(rows, base_columns)
    with_parts = [r for r in rows if r.get("profiled_ms") is not None]
    if with_parts:
        unit = "device (kernel) time; host = device idle" if dev.type == "cuda" else "self CPU time"
        lines += ["", f"## Where a step's time goes (torch.profiler, {unit}, ms per step)", ""]
        table = [
            {
                **r,
                "top_other_ops": "; ".join(
                    f"{n.removeprefix('aten::')} {ms:.1f}" for n, ms in r["top_other"]
                ),
            }
            for r in with_parts
        ]
        lines += markdown_table(table, ["backbone", "K", "method", "median_step_ms", *BREAKDOWN_COLUMNS])
        lines += ["", "Largest uncounted ops (self ms per step):", ""]
        lines += [f"- {r['backbone']} K={r['K']} {r['method']}: {r['top_other_ops']}" for r in table]
    lines += ["", "## Targets (printed, not asserted)", ""]
    refs = {(r["backbone"], r["K"]): r for r in rows if r["method"] == methods[0]}
    for r in rows:
        if r["method"] == methods[0]:
            continue
        where = f"- {r['backbone']} K={r['K']} {r['method']}:"
        if flops_only:
            lines.append(
                f"{where} FLOPs {r['flop_ratio']:.2f}x {methods[0]}; time not measured (--flops-only), "
                f"so the time/FLOP target (<= {OVERHEAD_TARGET}) is not assessed"
            )
            continue
        met = r["time_over_flop"] <= OVERHEAD_TARGET
        line = (
            f"{where} time {r['time_ratio']:.2f}x {methods[0]}, FLOPs {r['flop_ratio']:.2f}x, time/FLOP ratio "
            f"{r['time_over_flop']:.2f} (target <= {OVERHEAD_TARGET}): {'met' if met else 'NOT met'}"
        )
        if r.get("profiled_ms") is not None:
            ref_row = refs[(r["backbone"], r["K"])]
            line += (
                f"; counted ops alone at {r['time_over_flop_counted_only']:.2f}x their FLOP ratio"
                if met
                else f": {explain(r, ref_row)}"
            )
        lines.append(line)
    if any(" 1000 classes" in shape for shape in shapes):  # an ImageNet-shaped cell
        lines += ["", f"Reference point: {IMAGENET_PAPER} (time, not FLOPs)."]
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
    if all(r["time_ratio"] is not None for r in rows):
        ax.barh([i - 0.2 for i in y], [r["time_ratio"] for r in rows], height=0.4, label="time / ref")
    ax.barh([i + 0.2 for i in y], [r["flop_ratio"] for r in rows], height=0.4, label="FLOPs / ref")
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("ratio to the reference row (same run)")
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
    p.add_argument("--amp", default="none", choices=["none", "bf16"], help="autocast every step (CPU too)")
    p.add_argument(
        "--size", type=int, default=None, help="input side in px (default: 32 CIFAR ResNets, 224 others)"
    )
    p.add_argument(
        "--split", default="even", help="model.split of the local methods (e.g. manpp: paper cuts)"
    )
    p.add_argument("--ref", default="bp", help="the row ratios divide by, e.g. 'bp[optim.foreach=true]'")
    p.add_argument("--flops-only", action="store_true", help="skip timing; FLOP ratios only")
    p.add_argument(
        "--no-breakdown",
        action="store_true",
        help="skip the profiled steps that split each step into counted ops / optimizer / other / host",
    )
    p.add_argument(
        "--breakdown-rounds",
        type=int,
        default=3,
        help="profiled steps per method; the median one is reported",
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
        args.amp,
        args.size,
        args.flops_only,
        args.split,
        args.ref,
        not args.no_breakdown,
        args.breakdown_rounds,
    )
