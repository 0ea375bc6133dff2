"""Sequential driver: per batch, ``local_step`` over blocks 0..K-1, then the momentum syncs."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext

import torch

from locallearn.engine.block_scores import BlockScores
from locallearn.engine.errors import check_finite
from locallearn.engine.optim import GroupedOptimizer
from locallearn.engine.step import Cascade, local_step, step_grouped
from locallearn.model import LocalModel
from locallearn.types import Batch


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(
    model: LocalModel,
    batch: Batch,
    optimizers: list[torch.optim.Optimizer],
    scalers: list | None = None,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    meter=None,
    grouped: GroupedOptimizer | None = None,
    clip: float | None = None,
) -> list[dict[str, torch.Tensor]]:
    """One batch through every block; returns each block's aux outputs.

    Window 2 (MLAAN): block k's loss also spans block k-1 (run again on its cached detached input),
    so block k's optimizer steps after block k+1's backward; the last block steps both.
    ``grouped`` (``engine.group_steps``): no block steps on its own; all step at the end in one
    multi-tensor update, before the momentum syncs (``step_grouped`` says why that is exact)."""
    h, outs, last = batch.x, [], model.num_blocks - 1
    window = getattr(model, "window", 1)
    if window not in (1, 2):
        raise ValueError(f"the sequential engine supports window 1 or 2, got {window}")
    if grouped is not None and scalers:
        raise ValueError(
            "engine.group_steps does not support fp16 loss scaling (one scale per block); use bf16"
        )
    h_prev = None  # detached input of block k-1
    for k in range(model.num_blocks):
        track = meter.track(batch.bank) if meter is not None else nullcontext()
        scaler = scalers[k] if scalers else None
        cascade_opt = optimizers[k - 1] if grouped is None else None
        cascade = Cascade(model.body(k - 1), h_prev, cascade_opt) if window == 2 and k > 0 else None
        h_prev = h
        h, out = local_step(
            model.body(k),
            model.auxes[k],
            h,
            batch,
            optimizers[k],
            scaler,
            autocast(),
            track,
            cascade=cascade,
            defer_step=grouped is not None or (window == 2 and k < last),
            clip=clip,
        )
        outs.append(out)
    if grouped is not None:
        step_grouped(grouped, clip)
    model.sync_momentum()
    return outs


def reported_losses(outs: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Each block's loss as the logs show it (float64, CPU). A block with no loss of its own that the
    next block's cascade trains (MLAAN's block 0: its aux returns a constant 0) reports that cascaded
    loss (the next aux's ``y``), which is what its gradient comes from, instead of 0.0."""
    values = [o["loss"].detach() for o in outs]
    for k in range(len(outs) - 1):
        # no loss term of its own (a frozen block's loss has no gradient either, but it is its own)
        if not outs[k]["loss"].requires_grad and set(outs[k]) == {"loss"} and "y" in outs[k + 1]:
            values[k] = outs[k + 1]["y"].detach()
    return torch.stack([v.float().cpu() for v in values]).double()


def train_epoch(
    model: LocalModel,
    batches: Iterable[Batch],
    optimizers: list[torch.optim.Optimizer],
    schedule,
    device: torch.device,
    scalers: list | None = None,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    meter=None,
    memory_format: torch.memory_format = torch.contiguous_format,
    progress=None,
    grouped: GroupedOptimizer | None = None,
    clip: float | None = None,
) -> dict[str, float | list[float]]:
    """Train for one pass over ``batches``. ``meter`` (if given) is active on the first step only."""
    model.train()
    losses = torch.zeros(model.num_blocks, dtype=torch.float64)
    n_batches, step_times, seen = 0, [], 0
    for batch in batches:
        batch = batch.to(device, non_blocking=True)
        batch.x = batch.x.contiguous(memory_format=memory_format)
        sync_device(device)
        t0 = time.perf_counter()
        lr = schedule.lr  # the rate this step trains at
        outs = train_step(
            model, batch, optimizers, scalers, autocast, meter if n_batches == 0 else None, grouped, clip
        )
        schedule.step()
        sync_device(device)
        step_times.append(time.perf_counter() - t0)
        step_losses = reported_losses(outs)
        check_finite(step_losses, n_batches)
        losses += step_losses
        n_batches += 1
        seen += len(batch)
        if progress is not None:  # the run's watch.Progress: a bar, or log lines off a terminal
            progress.step(step_losses.tolist(), len(batch), lr)
    return {
        "block_losses": (losses / max(n_batches, 1)).tolist(),
        "step_times": step_times,
        "images": seen,
    }


@torch.no_grad()
def evaluate(
    model: LocalModel,
    batches: Iterable[Batch],
    task,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    memory_format: torch.memory_format = torch.contiguous_format,
    blocks: bool = True,
) -> dict[str, float]:
    """Backbone + head; the task's evaluator turns the outputs into metrics (classification: means
    over images, percent for accuracies, plus the loss). ``blocks``: every block's aux is scored too,
    as ``block{k}_{metric}`` (``engine/block_scores.py``)."""
    model.eval()
    evaluator = task.evaluator()
    scores = BlockScores.of(model, task) if blocks else None
    for batch in batches:
        batch = batch.to(device, non_blocking=True)
        with autocast():
            x = batch.x.contiguous(memory_format=memory_format)
            output = model(x, batch.bank) if scores is None else scores.forward(x, batch)
        evaluator.update(output, batch)
    metrics = evaluator.compute()
    return metrics if scores is None else {**metrics, **scores.compute(metrics)}
