"""Shared pieces of the benchmarks: model cells, synthetic batches, training steps, table writers."""

from __future__ import annotations

import csv
import datetime
import math
import os
import platform
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from locallearn.build import BACKBONES, build_model
from locallearn.config import Config, load_config
from locallearn.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD
from locallearn.engine.compile import compile_blocks
from locallearn.engine.optim import GroupedOptimizer, build_optimizer, group_optimizers
from locallearn.engine.sequential import train_step
from locallearn.engine.step import checkpointed_step
from locallearn.metrics.step_memory import BlockPass, StepMemory, block_workspace, step_memory
from locallearn.model import LocalModel
from locallearn.rundir import git_revision
from locallearn.types import Batch, InputInfo

CHECKPOINT = "checkpoint"  # pseudo-method: bp with torch.utils.checkpoint over ~sqrt(K) segments
RECOMPUTE = "[momentum.recompute=true]"  # MAN++ copies recomputed in backward (MomentumConfig.recompute)
DEFAULT_METHODS = [
    "bp", CHECKPOINT, "dgl", "dgl+manpp", f"dgl+manpp{RECOMPUTE}", "infopro", "infopro+manpp",
    f"infopro+manpp{RECOMPUTE}",
]  # fmt: skip
CIFAR = InputInfo(channels=3, size=32, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))


def bench_inputs(backbone: str, size: int | None = None) -> tuple[InputInfo, int]:
    """Synthetic input shape and class count of a cell: CIFAR (32 px, 10 classes) for the CIFAR
    ResNets, ImageNet (224 px, 1000 classes) for every other backbone; ``size`` overrides the side."""
    cifar = backbone in BACKBONES and BACKBONES[backbone].__module__.endswith("resnet_cifar")
    if cifar:
        return InputInfo(3, size or CIFAR.size, CIFAR.mean, CIFAR.std), 10
    return InputInfo(3, size or 224, IMAGENET_MEAN, IMAGENET_STD), 1000


def bench_autocast(amp: str, device: torch.device) -> Callable[[], AbstractContextManager]:
    """``none`` or ``bf16`` autocast on the cell's device (CPU included, unlike ``engine.amp``: a
    benchmark has no fp16 loss scaler and needs no CUDA to measure bf16 on CPU)."""
    if amp == "none":
        return nullcontext
    if amp != "bf16":
        raise ValueError(f"bench amp must be none or bf16, got {amp!r}")
    return partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)


def checkpoint_segments(num_blocks: int) -> int:
    """About sqrt(K) segments, the usual choice (Chen et al. 2016): ResNet-32 K=16 -> 4, K=55 -> 7."""
    return max(1, round(math.sqrt(num_blocks)))


def parse_cell(text: str) -> tuple[str, int]:
    """``resnet32:16`` -> (``resnet32``, 16)."""
    name, _, k = text.partition(":")
    if not name or not k.isdigit():
        raise ValueError(f"cell {text!r} must look like BACKBONE:K (e.g. resnet32:16)")
    return name, int(k)


def parse_spec(spec: str) -> tuple[str, list[str]]:
    """``"dgl+manpp[momentum.init=copy,momentum.momentum=0.95]"`` -> the method name and its option
    overrides (``method.momentum.init=copy``, ...; ``engine.``/``optim.``/... options are kept as they are): variants of one method side by side in one grid."""
    match = re.fullmatch(r"([\w+]+)(?:\[(.*)\])?", spec)
    if not match:
        raise ValueError(f"bad method spec {spec!r}; use NAME or NAME[section.field=value,...]")
    options = [o.strip() for o in (match[2] or "").split(",") if o.strip()]
    # method options by default; other sections (``engine.compile=true``, ``optim.foreach=true``) as given
    sections = ("engine.", "optim.", "model.", "data.", "task.")
    return match[1], [o if o.startswith(sections) else f"method.{o}" for o in options]


def method_config(
    backbone: str, num_blocks: int, method: str, overrides: Sequence[str] = (), base: dict | None = None
) -> Config:
    """The config of one cell; ``bp`` and ``checkpoint`` are end-to-end (K = 1). ``method`` may be a
    variant spec (``infopro+manpp[momentum.recompute=true]``)."""
    method, options = parse_spec(method)
    e2e = method in ("bp", CHECKPOINT)
    return load_config(
        None,
        [
            f"model.backbone={backbone}",
            f"model.num_blocks={1 if e2e else num_blocks}",
            "model.split=even",
            f"method.name={'bp' if e2e else method}",
            *options,
            *overrides,
        ],
        base=base,
    )


@dataclass
class Cell:
    """One method on one backbone, with its optimizers and a way to run a training step that honours
    the cell's config (``engine.group_steps``) and autocast."""

    method: str
    model: LocalModel
    optimizers: list[torch.optim.Optimizer]
    segments: int = 0  # > 0: activation checkpointing over this many segments
    extra: dict[str, Any] = field(default_factory=dict)
    cfg: Config | None = None
    autocast: Callable[[], AbstractContextManager] = nullcontext
    grouped: GroupedOptimizer | None = None  # built from ``cfg.engine.group_steps`` when not given

    def __post_init__(self) -> None:
        if self.grouped is None and self.cfg is not None and not self.segments:
            self.grouped = group_optimizers(self.optimizers, self.cfg.engine.group_steps)

    def step(self, batch: Batch, meter=None) -> None:
        if self.segments:
            with self.autocast():
                checkpointed_step(
                    self.model.body(0), self.model.auxes[0], batch, self.optimizers[0], self.segments
                )
        else:
            train_step(
                self.model, batch, self.optimizers, autocast=self.autocast, meter=meter, grouped=self.grouped
            )


def build_cell(
    backbone: str,
    num_blocks: int,
    method: str,
    inputs: InputInfo = CIFAR,
    num_classes: int = 10,
    overrides: Sequence[str] = (),
    device: torch.device | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
    amp: str = "none",
) -> Cell:
    """``amp`` (none | bf16) is the default autocast; a spec's own ``engine.amp=bf16`` wins."""
    cfg = method_config(backbone, num_blocks, method, overrides)
    if cfg.engine.mode != "sequential" or cfg.engine.amp == "fp16":
        raise ValueError(f"{method}: bench cells run the sequential engine without fp16 loss scaling")
    device = device or torch.device("cpu")
    model, _, _ = build_model(cfg, inputs, num_classes)
    model.to(device, memory_format=memory_format)
    model.train()
    opts = [build_optimizer(model.block_parameters(k), cfg.optim) for k in range(model.num_blocks)]
    for opt in opts:  # a small fixed lr: benchmarks must not diverge on random data
        for group in opt.param_groups:
            group["lr"] = 0.01
    segments = checkpoint_segments(num_blocks) if parse_spec(method)[0] == CHECKPOINT else 0
    autocast = bench_autocast(cfg.engine.amp if cfg.engine.amp != "none" else amp, device)
    return Cell(method, model, opts, segments, cfg=cfg, autocast=autocast)


def compile_cell(cell: Cell) -> None:
    """Apply ``engine.compile`` (per-block torch.compile) to a built cell. Call it after counting FLOPs
    and before timing: the compile itself lands in the first (warm-up) step."""
    if cell.cfg is not None and cell.cfg.engine.compile and not cell.segments:
        e = cell.cfg.engine
        compile_blocks(cell.model, e.compile_backend, e.compile_mode, region=e.compile_region)


def synthetic_batch(
    batch_size: int,
    inputs: InputInfo = CIFAR,
    num_classes: int = 10,
    seed: int = 0,
    device: torch.device | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, inputs.channels, inputs.size, inputs.size, generator=gen)
    y = torch.randint(0, num_classes, (batch_size,), generator=gen)
    mean = torch.tensor(inputs.mean).view(-1, 1, 1)
    std = torch.tensor(inputs.std).view(-1, 1, 1)
    batch = Batch(x, y, mean, std).to(device or torch.device("cpu"))
    batch.x = batch.x.contiguous(memory_format=memory_format)
    return batch


def _affine(points: dict[int, float], at: int) -> float:
    if at in points:  # measured there
        return points[at]
    (b1, y1), (b2, y2) = sorted(points.items())[:2]
    return y1 + (y2 - y1) / (b2 - b1) * (at - b1)


def whole_step(
    model: torch.nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    block_bytes: Sequence[float],
    batches: Sequence[int],
    at: int,
    make_batch: Callable[[int], Any] = synthetic_batch,
    autocast: Callable[[], Any] = nullcontext,
    group_steps: bool = False,
    checkpoint_bytes: float | None = None,
) -> StepMemory:
    """The whole step (``metrics.step_memory``) at batch ``at``: the model's weights, gradients and optimizer
    state (its optimizers have stepped), the meter's fitted per-block bytes, and backward's workspace measured
    by the allocator at the two smallest ``batches`` (``make_batch(n)``) and extrapolated the same way (affine
    in the batch), or at ``at`` alone when ``batches`` holds it (the workspace is not affine at small batches). ``checkpoint_bytes``: activation checkpointing's analytic peak replaces the block's saved
    bytes (its recomputation's workspace is not measured: it counts as 0)."""
    if checkpoint_bytes is not None:
        return step_memory(model, optimizers, [round(checkpoint_bytes)])
    passes = {}
    for b in [at] if at in batches else sorted(batches)[:2]:  # ``at`` among them: measured there alone
        torch.manual_seed(0)
        passes[b] = block_workspace(model, make_batch(b), autocast)
    n = len(block_bytes)
    work = BlockPass(
        [max(0, round(_affine({b: p.workspace_bytes[k] for b, p in passes.items()}, at))) for k in range(n)],
        [round(_affine({b: p.held_bytes[k] for b, p in passes.items()}, at)) for k in range(n)],
    )
    return step_memory(model, optimizers, [round(v) for v in block_bytes], 0, work, group_steps=group_steps)


def param_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameter bytes, trainable parameter bytes)."""
    params = list(model.parameters())
    total = sum(p.numel() * p.element_size() for p in params)
    return total, sum(p.numel() * p.element_size() for p in params if p.requires_grad)


def optimizer_state_bytes(optimizers: Sequence[torch.optim.Optimizer]) -> int:
    return sum(
        v.numel() * v.element_size()
        for opt in optimizers
        for state in opt.state.values()
        for v in state.values()
        if torch.is_tensor(v) and v.dim() > 0
    )


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}"
    if torch.cuda.is_available():
        text += f"; CUDA: {torch.cuda.get_device_name(0)}"
    return text


def header(title: str, batch: str, dtype: str = "float32", notes: Sequence[str] = ()) -> list[str]:
    """The lines every results file starts with: how to rerun it and where it ran."""
    argv = " ".join(shlex.quote(a) for a in sys.argv[1:])
    prog = "locallearn" if Path(sys.argv[0]).name == "locallearn" else f"python {sys.argv[0]}"
    lines = [
        f"# {title}",
        "",
        f"- command: `{prog} {argv}`" if argv else "- command: (called from Python)",
        f"- machine: {machine()}",
        f"- torch {torch.__version__}, python {platform.python_version()}, locallearn git {git_revision()}",
        f"- batch size: {batch}; dtype: {dtype}",
        f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}",
    ]
    lines += [f"- {n}" for n in notes]
    return lines + [""]


def fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.{digits}g}" if abs(value) < 1e5 else f"{value:.4g}"
    return "-" if value is None else str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c)) for c in columns) + " |")
    return lines


def write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: ("" if row.get(c) is None else row.get(c)) for c in columns})


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def gib(n: float | None) -> float | None:
    return None if n is None else n / 2**30


def mib(n: float | None) -> float | None:
    return None if n is None else n / 2**20


def plt():
    """matplotlib with a file-only backend (``pip install locallearn[plot]``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


Status = Callable[[str], None]
