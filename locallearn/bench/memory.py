"""``locallearn bench memory``: peak activation bytes per training step, per (backbone, K, method).

How memory is measured (the README repeats this): every tensor autograd saves for backward is seen by
``torch.autograd.graph.saved_tensors_hooks``; each storage is counted once and parameters / buffers are
left out (``locallearn.metrics.memory.ActivationMeter``). A sequential local step frees each block's graph
before the next block runs, so the step's peak is its largest block; ``bp`` is one block. Saved bytes are
affine in the batch size (``a * batch + c``: BN statistics and scalars do not scale), so the benchmark
measures two small batches, fits ``a`` and ``c`` per block exactly, checks the fit against a third batch,
and reports the value at the target batch (1024, the papers').

Activation checkpointing (``torch.utils.checkpoint.checkpoint_sequential``, non-reentrant, about sqrt(K)
segments) installs its own saved-tensor hooks, which hide the saved tensors from ours, so its peak is
computed analytically from measured pieces: the bytes each layer of the ``bp`` model saves (attributed
to the layer whose op first saved the storage) and each layer's input size. During backward the
checkpointed segments' inputs stay alive while one segment at a time is recomputed; the last segment
(``checkpoint_sequential`` runs it normally) and the head are held from forward to the start of backward:
``peak = max(all held inputs + tail input + tail + head, max_i (inputs of segments 0..i + segment_i))``
(backward frees segment i's input once that segment is done). A live-lifetime run cross-checks it.
On CUDA the real checkpointed step also reports ``max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import gc
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from locallearn.bench.common import (
    CHECKPOINT,
    DEFAULT_METHODS,
    Cell,
    build_cell,
    checkpoint_segments,
    gib,
    header,
    markdown_table,
    mib,
    optimizer_state_bytes,
    param_bytes,
    parse_cell,
    plt,
    synthetic_batch,
    whole_step,
    write_csv,
)
from locallearn.engine.step import checkpointed_step
from locallearn.methods.man import MomentumAux

log = logging.getLogger(__name__)

COLUMNS = [
    "backbone",
    "K",
    "method",
    "segments",
    "peak_activation_bytes",
    "peak_activation_GiB",
    "ratio_to_bp",
    "peak_block",
    "how",
    "live_peak_bytes",
    "live_over_peak",
    "param_bytes",
    "trainable_param_bytes",
    "optimizer_state_bytes",
    "gradient_bytes",
    "workspace_bytes",
    "peak_total_bytes",
    "peak_total_GiB",
    "total_ratio_to_bp",
    "linearity_error_bytes",
    "cuda_batch",
    "cuda_max_allocated_GiB",
    "cuda_max_reserved_GiB",
]
BREAKDOWN_COLUMNS = [
    "backbone",
    "K",
    "method",
    "block",
    "layers",
    "body",
    "lb",
    "ema",
    "fuse",
    "aux",
    "total",
    "share_of_peak",
]
PARTS = ["body", "lb", "ema", "fuse", "aux"]
# (backbone, K) -> largest ratio to bp that meets the target: saved activations (issue 1), the whole
# step (issue 26: MAN++ Table III's whole-GPU ratio, 3.22 / 9.26 GB)
TARGETS = {("resnet110", 55): 0.20, ("resnet32", 16): 0.40}
TOTAL_TARGETS = {("resnet110", 55): 0.35}


class BreakdownMeter:
    """``ActivationMeter``'s count, split by the submodule whose op first saved each storage.

    Parts: ``body`` (the block's layers; with ``per_layer`` one part per layer), and in the aux ``lb`` /
    ``ema`` (the momentum copies of the next layer), ``fuse`` (``s*LB + (2-s)*EMA``), ``aux`` (the base
    method's aux or the task head). ``input`` is the image batch when a block saves it."""

    def __init__(self, model: nn.Module, per_layer: bool = False) -> None:
        self.model = model
        self.per_layer = per_layer
        self.exclude = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        self.blocks: list[dict[str, int]] = []
        self.layer_inputs: dict[int, int] = {}  # layer index -> bytes of its input
        self.image_ptr: int | None = None

    def parts(self, k: int) -> list[tuple[nn.Module, str]]:
        aux = self.model.auxes[k]
        body = self.model.body(k)
        if self.per_layer:
            first = self.model.ranges[k][0]
            out = [(layer, f"layer{first + i}") for i, layer in enumerate(body)]
        else:
            out = [(body, "body")]
        if isinstance(aux, MomentumAux):
            out += [(aux, "fuse"), (aux.base, "aux")]
            out += [(m, name) for m, name in ((aux.lb, "lb"), (aux.ema, "ema")) if m is not None]
        else:
            out.append((aux, "aux"))
        return out

    @contextmanager
    def track(self, bank=None) -> Iterator[None]:  # classification cells write no bank entries
        k = len(self.blocks)
        counts: dict[str, int] = {}
        seen: set[int] = set()
        stack = ["aux"]
        handles = []
        first = self.model.ranges[k][0]
        for module, name in self.parts(k):
            handles.append(module.register_forward_pre_hook(lambda m, a, n=name: stack.append(n) and None))
            handles.append(module.register_forward_hook(lambda m, a, o: stack.pop() and None))
        if self.per_layer:
            for i, layer in enumerate(self.model.body(k)):
                handles.append(layer.register_forward_pre_hook(self._input_hook(first + i)))

        def pack(t: torch.Tensor) -> torch.Tensor:
            try:
                storage = t.untyped_storage()
            except (RuntimeError, NotImplementedError):
                return t
            ptr = storage.data_ptr()
            if ptr in self.exclude or ptr in seen:
                return t
            seen.add(ptr)
            part = "input" if ptr == self.image_ptr else stack[-1]
            counts[part] = counts.get(part, 0) + storage.nbytes()
            return t

        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                yield
        finally:
            for h in handles:
                h.remove()
        self.blocks.append(counts)

    def _input_hook(self, index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            self.layer_inputs[index] = args[0].untyped_storage().nbytes()

        return hook

    @property
    def block_bytes(self) -> list[int]:
        return [sum(c.values()) for c in self.blocks]


class _Held:
    """A saved tensor as the graph holds it; the meter learns when the graph lets go of it."""

    __slots__ = ("meter", "ptr", "t")

    def __init__(self, meter: LiveMeter, ptr: int, t: torch.Tensor) -> None:
        self.meter, self.ptr, self.t = meter, ptr, t

    def __del__(self) -> None:
        self.meter.release(self.ptr)


class LiveMeter:
    """Peak of the saved-for-backward bytes alive at once over a whole training step, by running it.

    Unlike the per-block count this follows the real lifetimes (a storage counts from its first save
    until the last graph node holding it is freed), so it also sees re-entrant activation checkpointing
    (``use_reentrant=True``: segment inputs saved by the checkpoint function, recomputed segments saved
    during backward). Non-reentrant checkpointing hides its tensors behind its own hooks."""

    def __init__(self, model: nn.Module) -> None:
        self.exclude = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        self.live: dict[int, list[int]] = {}  # storage ptr -> [bytes, holders]
        self.now = 0
        self.peak = 0

    def release(self, ptr: int) -> None:
        entry = self.live[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[ptr]

    def pack(self, t: torch.Tensor):
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return t
        ptr = storage.data_ptr()
        if ptr in self.exclude:
            return t
        entry = self.live.get(ptr)
        if entry is None:
            entry = self.live[ptr] = [storage.nbytes(), 0]
            self.now += entry[0]
            self.peak = max(self.peak, self.now)
        entry[1] += 1
        return _Held(self, ptr, t)

    @staticmethod
    def unpack(held) -> torch.Tensor:
        return held.t if isinstance(held, _Held) else held

    @contextmanager
    def track(self, bank=None) -> Iterator[None]:
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            yield


def measure_live(cell: Cell, batch_size: int) -> int:
    """Whole-step peak of live saved bytes; checkpointing runs re-entrant here so that it can be seen."""
    batch = synthetic_batch(batch_size)
    meter = LiveMeter(cell.model)
    with meter.track():
        if cell.segments:
            checkpointed_step(
                cell.model.body(0), cell.model.auxes[0], batch, None, cell.segments, reentrant=True
            )
        else:
            cell.step(batch)
    return meter.peak


def measure(cell: Cell, batch_size: int, per_layer: bool = False) -> BreakdownMeter:
    """One training step of ``cell`` at ``batch_size`` under a ``BreakdownMeter``."""
    batch = synthetic_batch(batch_size)
    meter = BreakdownMeter(cell.model, per_layer)
    meter.image_ptr = batch.x.untyped_storage().data_ptr()
    cell.step(batch, meter)
    return meter


def affine(points: dict[int, float], at: int) -> float:
    """The exact line through two (batch, bytes) points, evaluated at ``at``."""
    (b1, y1), (b2, y2) = sorted(points.items())[:2]
    slope = (y2 - y1) / (b2 - b1)
    return y1 + slope * (at - b1)


def scaled(meters: dict[int, BreakdownMeter], at: int, check: int) -> tuple[list[dict[str, float]], float]:
    """Per block and part, bytes at batch ``at`` from the two smallest batches; error at batch ``check``."""
    fit_batches = sorted(meters)[:2]
    blocks, error = [], 0.0
    for k in range(len(meters[fit_batches[0]].blocks)):
        parts = set().union(*(m.blocks[k] for m in meters.values()))
        out = {}
        for p in parts:
            pts = {b: meters[b].blocks[k].get(p, 0) for b in fit_batches}
            out[p] = affine(pts, at)
            if check in meters:
                error = max(error, abs(affine(pts, check) - meters[check].blocks[k].get(p, 0)))
        blocks.append(out)
    return blocks, error


def checkpoint_peak(layers: dict[str, float], inputs: dict[int, float], head: float, segments: int) -> float:
    """Peak saved bytes of ``checkpoint_sequential`` from per-layer measurements (module docstring).

    ``layers``: bytes each layer saves, its input excluded (``input`` = the image); ``inputs``: bytes of
    each layer's input. Backward runs the segments in reverse and each frees its saved input when done,
    so while segment i is recomputed only the inputs of segments 0..i are still held."""
    n = len(inputs)
    size = n // segments
    starts = list(range(0, size * (segments - 1), size))
    own = [sum(layers.get(f"layer{i}", 0.0) for i in range(s, s + size)) for s in starts]
    phases = [sum(inputs[s] for s in starts[: i + 1]) + own[i] for i in range(len(starts))]
    tail_start = starts[-1] + size if starts else 0
    tail = sum(layers.get(f"layer{i}", 0.0) for i in range(tail_start, n)) + head
    tail += sum(inputs[s] for s in starts) + (inputs[tail_start] if starts else layers.get("input", 0.0))
    return max([tail, *phases])


def cuda_peak(
    backbone: str, k: int, method: str, batch_size: int, device: torch.device
) -> tuple[float, float]:
    cell = build_cell(backbone, k, method, device=device)
    batch = synthetic_batch(batch_size, device=device)
    cell.step(batch)  # warm-up: allocator, cuDNN algorithms, optimizer state
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):
        cell.step(batch)
    torch.cuda.synchronize(device)
    out = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    del cell, batch
    gc.collect()
    torch.cuda.empty_cache()
    return out


def run(
    cells: Sequence[str] = ("resnet32:16", "resnet110:55"),
    methods: Sequence[str] = DEFAULT_METHODS,
    batches: Sequence[int] = (2, 4, 8),
    target_batch: int = 1024,
    out_dir: str | Path = "benchmarks/results",
    cuda_batch: int | None = None,
    breakdown: Sequence[str] = ("dgl+manpp", "infopro+manpp"),
    name: str = "memory",
) -> str:
    """Write ``{name}.md``, ``{name}.csv``, ``{name}_breakdown.csv`` and ``{name}.png``; return the Markdown."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = list(dict.fromkeys(["bp", *methods]))  # bp first: every ratio is to bp
    use_cuda = torch.cuda.is_available() and cuda_batch is not None
    check = sorted(batches)[2] if len(batches) > 2 else -1
    rows: list[dict[str, Any]] = []
    breakdown_rows: list[dict[str, Any]] = []
    for text in cells:
        backbone, k = parse_cell(text)
        bp_peak = bp_total = None
        for method in methods:
            log.info("memory: %s K=%d %s", backbone, k, method)
            e2e = method in ("bp", CHECKPOINT)
            meters: dict[int, BreakdownMeter] = {}
            cell = None
            for b in batches:
                torch.manual_seed(0)
                cell = build_cell(backbone, k, "bp" if e2e else method)
                meters[b] = measure(cell, b, per_layer=e2e)
            blocks, error = scaled(meters, target_batch, check)
            live = {}
            for b in sorted(batches)[:2]:
                torch.manual_seed(0)
                live[b] = measure_live(build_cell(backbone, k, method), b)
            live_peak = round(affine(live, target_batch))
            totals = [sum(v for p, v in blk.items()) for blk in blocks]
            row: dict[str, Any] = {"backbone": backbone, "K": k, "method": method, "segments": None}
            ckpt_peak = None
            if method == CHECKPOINT:
                segments = checkpoint_segments(k)
                inputs = {
                    i: affine({b: m.layer_inputs[i] for b, m in meters.items()}, target_batch)
                    for i in meters[batches[0]].layer_inputs
                }
                layer_parts = {p: v for p, v in blocks[0].items() if p.startswith("layer") or p == "input"}
                head = blocks[0].get("aux", 0.0)
                peak = ckpt_peak = checkpoint_peak(layer_parts, inputs, head, segments)
                row.update(segments=segments, peak_block=None, how="analytic from per-layer saved bytes")
            else:
                peak = max(totals)
                row.update(peak_block=totals.index(peak), how="saved-tensor hooks")
                if method in breakdown and not e2e:
                    for i, (blk, total) in enumerate(zip(blocks, totals)):
                        r0, r1 = cell.model.ranges[i][0], cell.model.ranges[i][-1]
                        breakdown_rows.append(
                            {
                                "backbone": backbone,
                                "K": k,
                                "method": method,
                                "block": i,
                                "layers": f"{r0}-{r1}" if r1 > r0 else str(r0),
                                **{
                                    p: round(
                                        blk.get(p, 0.0) + (blk.get("input", 0.0) if p == "body" else 0.0)
                                    )
                                    for p in PARTS
                                },
                                "total": round(total),
                                "share_of_peak": total / peak,
                            }
                        )
            peak = round(peak)
            group = bool(cell.cfg is not None and cell.cfg.engine.group_steps)
            total = whole_step(
                cell.model, cell.optimizers, totals, batches, target_batch, autocast=cell.autocast,
                group_steps=group, checkpoint_bytes=ckpt_peak,
            )  # fmt: skip
            if method == "bp":
                bp_peak, bp_total = peak, total.peak_total_bytes
            pbytes, tbytes = param_bytes(cell.model)
            row.update(
                live_peak_bytes=live_peak,
                live_over_peak=live_peak / peak,
                peak_activation_bytes=peak,
                peak_activation_GiB=gib(peak),
                ratio_to_bp=peak / bp_peak if bp_peak else None,
                param_bytes=pbytes,
                trainable_param_bytes=tbytes,
                optimizer_state_bytes=optimizer_state_bytes(cell.optimizers),
                gradient_bytes=total.gradient_bytes,
                workspace_bytes=total.blocks[total.peak_block].workspace_bytes,
                peak_total_bytes=total.peak_total_bytes,
                peak_total_GiB=gib(total.peak_total_bytes),
                total_ratio_to_bp=total.peak_total_bytes / bp_total if bp_total else None,
                linearity_error_bytes=error if check > 0 else None,
            )
            if use_cuda:
                alloc, reserved = cuda_peak(backbone, k, method, cuda_batch, torch.device("cuda"))
                row.update(
                    cuda_batch=cuda_batch,
                    cuda_max_allocated_GiB=gib(alloc),
                    cuda_max_reserved_GiB=gib(reserved),
                )
            rows.append(row)
    columns = [c for c in COLUMNS if use_cuda or not c.startswith("cuda")]
    write_csv(out_dir / f"{name}.csv", rows, columns)
    if breakdown_rows:
        write_csv(out_dir / f"{name}_breakdown.csv", breakdown_rows, BREAKDOWN_COLUMNS)
    plot(rows, out_dir / f"{name}.png")
    md = report(rows, columns, breakdown_rows, batches, target_batch, check, use_cuda, cuda_batch, name)
    (out_dir / f"{name}.md").write_text(md)
    return md


def targets(rows: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    for (backbone, k), limit in TARGETS.items():
        for r in rows:
            if (r["backbone"], r["K"]) == (backbone, k) and r["method"].startswith("infopro+manpp"):
                ok = "met" if r["ratio_to_bp"] <= limit else "NOT met"
                lines.append(
                    f"- target {r['method']} {backbone} K={k} <= {limit:.2f}x bp: {r['ratio_to_bp']:.3f}x, {ok}"
                )
    for (backbone, k), limit in TOTAL_TARGETS.items():
        for r in rows:
            if (r["backbone"], r["K"]) == (backbone, k) and r["method"].startswith("infopro+manpp"):
                ratio = r["total_ratio_to_bp"]
                ok = "met" if ratio <= limit else "NOT met"
                lines.append(
                    f"- target {r['method']} {backbone} K={k} whole step <= {limit:.2f}x bp: {ratio:.3f}x, {ok}"
                )
    return lines


def report(rows, columns, breakdown_rows, batches, target_batch, check, use_cuda, cuda_batch, name) -> str:
    notes = [
        f"peak activation bytes = saved-for-backward bytes of the largest block, fitted exactly (affine in batch) "
        f"from batches {list(batches)[:2]} and reported at batch {target_batch}"
        + (f"; `linearity_error_bytes` = |fit - measured| at batch {check}" if check > 0 else ""),
        "input: synthetic CIFAR-shaped 3x32x32 images, 10 classes; split `even` (ResNet-32 K=16 and ResNet-110 "
        "K=55: one layer per block, the same cuts as the MAN++ tables)",
        "checkpoint = bp with `torch.utils.checkpoint.checkpoint_sequential` (non-reentrant) over round(sqrt(K)) "
        "segments, computed analytically from measured per-layer bytes (see README)",
        "live_peak_bytes: the same bytes by running a whole step and following each saved storage's lifetime "
        "(checkpointing re-entrant here, so its saves are visible); live_over_peak = live_peak_bytes / "
        "peak_activation_bytes",
        "param/optimizer bytes: all parameters (EMA copies included, not trainable), SGD momentum buffers",
        "peak_total = the whole step (`locallearn.metrics.step_memory`): weights and buffers + optimizer state "
        "+ the largest block's gradients, saved activations and backward workspace (measured by the CPU "
        "allocator at the two fit batches, extrapolated); total_ratio_to_bp compares totals. checkpoint: "
        "its analytic saved bytes, workspace not counted",
    ]
    if use_cuda:
        notes.append(f"CUDA columns: real steps at batch {cuda_batch}, max over 2 steps after 1 warm-up step")
    hidden = (
        "peak_activation_bytes",
        "live_peak_bytes",
        "peak_total_bytes",
        "gradient_bytes",
        "workspace_bytes",
    )
    show = [c for c in columns if c not in hidden]
    table = []
    for r in rows:
        table.append(
            {
                **r,
                "param_bytes": f"{mib(r['param_bytes']):.2f} MiB",
                "trainable_param_bytes": f"{mib(r['trainable_param_bytes']):.2f} MiB",
                "optimizer_state_bytes": f"{mib(r['optimizer_state_bytes']):.2f} MiB",
            }
        )
    lines = header(
        "Memory: peak activation bytes per training step", f"{target_batch} (extrapolated)", notes=notes
    )
    lines += markdown_table(table, show)
    lines += [
        "",
        "## Targets (printed, not asserted)",
        "",
        *(targets(rows) or ["- (no target cell in this run)"]),
    ]
    if breakdown_rows:
        lines += [
            "",
            f"## Where the bytes go, block by block (MiB at batch {target_batch})",
            "",
            "`body` = the block's own layers (and the image for block 0), `lb`/`ema` = the two full-resolution "
            "copies of the next layer inside the momentum aux, `fuse` = `s*LB + (2-s)*EMA`, `aux` = the base "
            "method's aux (or the task head).",
            "",
        ]
        first = (breakdown_rows[0]["backbone"], breakdown_rows[0]["K"])
        mib_rows = [
            {
                **r,
                **{p: f"{r[p] / 2**20:.1f}" for p in [*PARTS, "total"]},
                "share_of_peak": f"{r['share_of_peak']:.2f}",
            }
            for r in breakdown_rows
            if (r["backbone"], r["K"]) == first
        ]
        lines[-2] += f" {first[0]} K={first[1]} here; every cell in `{name}_breakdown.csv`."
        lines += markdown_table(mib_rows, BREAKDOWN_COLUMNS)
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    pyplot = plt()
    cells = list(dict.fromkeys((r["backbone"], r["K"]) for r in rows))
    fig, axes = pyplot.subplots(1, len(cells), figsize=(5 * len(cells), 3.5), squeeze=False)
    for ax, (backbone, k) in zip(axes[0], cells):
        sub = [r for r in rows if (r["backbone"], r["K"]) == (backbone, k)]
        ax.barh([r["method"] for r in sub], [r["peak_activation_GiB"] for r in sub], color="tab:blue")
        for i, r in enumerate(sub):
            ax.text(r["peak_activation_GiB"], i, f" {r['ratio_to_bp']:.2f}x", va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{backbone} K={k}")
        ax.set_xlabel("peak activation GiB (batch 1024)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot.close(fig)


def add_arguments(p) -> None:
    p.add_argument("--cells", nargs="+", default=["resnet32:16", "resnet110:55"], help="BACKBONE:K cells")
    p.add_argument(
        "--methods", nargs="+", default=DEFAULT_METHODS, help="methods; 'checkpoint' = bp + sqrt(K) segments"
    )
    p.add_argument(
        "--batches",
        nargs="+",
        type=int,
        default=[2, 4, 8],
        help="small batches: fit on the first two, check the third",
    )
    p.add_argument(
        "--target-batch", type=int, default=1024, help="batch the bytes are reported at (papers: 1024)"
    )
    p.add_argument(
        "--cuda-batch", type=int, default=None, help="also run real steps on CUDA at this batch (if CUDA)"
    )
    p.add_argument(
        "--breakdown",
        nargs="*",
        default=["dgl+manpp", "infopro+manpp"],
        help="methods to break down block by block",
    )
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default=None, help="file stem of the results (default memory / memory_<task>)")
    p.add_argument(
        "--task",
        default="classification",
        choices=["classification", "detection", "segmentation", "super_resolution"],
    )
    p.add_argument(
        "--backbone",
        default=None,
        help="dense tasks: detection resnet50 (torchvision ResNet), segmentation resnet50_d8, super_resolution edsr",
    )
    p.add_argument(
        "--size",
        type=int,
        default=None,
        help="dense tasks: image side; detection 600 (the official code), segmentation crop 768 (MAN++), "
        "super_resolution LR patch 48 (EDSR)",
    )
    p.add_argument(
        "--scale", type=int, default=2, choices=[2, 3, 4], help="super_resolution: upscaling factor"
    )
    p.add_argument(
        "--fit-sizes",
        nargs=2,
        type=int,
        default=None,
        help="segmentation / super_resolution: two small sides the bytes are fitted at (default 128 256 / 16 24)",
    )
    p.add_argument(
        "--full-check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="segmentation / super_resolution: also run one real step at the full size to check the fit",
    )
    p.add_argument(
        "--split", default="stages", choices=["stages", "units"], help="detection: K=4 or one unit per block"
    )
    p.add_argument("--head", default="retinanet", choices=["retinanet", "yolov1"], help="detection head")


def main(args) -> str:
    if args.task in ("segmentation", "super_resolution"):
        from locallearn.bench import memory_dense

        return memory_dense.run_pixels(
            args.task,
            args.backbone,
            args.methods if args.methods != DEFAULT_METHODS else None,
            args.size,
            args.scale,
            args.fit_sizes,
            args.batches if args.batches != [2, 4, 8] else None,
            args.target_batch if args.target_batch != 1024 else 16,
            args.full_check,
            args.out,
            args.name,
            args.cuda_batch,
        )
    if args.task == "detection":
        from locallearn.bench import memory_dense

        batches = tuple(args.batches) if args.batches != [2, 4, 8] else (1, 2, 3)
        target = args.target_batch if args.target_batch != 1024 else 16
        args.backbone, args.size = args.backbone or "resnet50", args.size or 600
        return memory_dense.run(
            args.backbone,
            args.methods if args.methods != DEFAULT_METHODS else memory_dense.DENSE_METHODS,
            args.size,
            batches,
            target,
            args.split == "stages",
            args.head,
            args.out,
            args.name or f"memory_detection_{args.backbone}_{args.split}",
            args.cuda_batch,
        )
    args.name = args.name or "memory"
    return run(
        args.cells,
        args.methods,
        args.batches,
        args.target_batch,
        args.out,
        args.cuda_batch,
        args.breakdown,
        args.name,
    )
