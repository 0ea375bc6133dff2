"""What a run reports: one ``metrics.csv`` row and one log line per epoch, and ``summary.json``."""

from __future__ import annotations

import logging
import statistics
from typing import Any

import numpy as np
import torch

from locallearn import aux_budget
from locallearn.engine.block_scores import block_metric, block_values
from locallearn.engine.optim import StepSchedule, lr_at
from locallearn.metrics.step_memory import BlockPass, step_memory
from locallearn.rundir import environment

log = logging.getLogger("locallearn.run")


def epoch_lr(schedule: StepSchedule, first_step: int) -> float:
    """The learning rate an epoch trained at: the mean over its steps ``first_step`` .. now (the
    schedule moves every step; the value after the last step would say 0 for a cosine's last epoch)."""
    steps = range(first_step, schedule.step_count)
    if not steps:
        return schedule.lr
    return float(np.mean([lr_at(s / schedule.steps_per_epoch, schedule.cfg) for s in steps]))


def epoch_row(
    epoch: int, schedule: StepSchedule, first_step: int, stats: dict[str, Any], metrics: dict[str, float]
) -> dict[str, Any]:
    """One ``metrics.csv`` row: ``lr`` as ``epoch_lr`` says, ``train_loss`` the last block's (the task
    loss), ``train_loss_block{k}`` every block's mean local loss over the epoch."""
    losses = stats["block_losses"]
    return {
        "epoch": epoch,
        "lr": epoch_lr(schedule, first_step),
        "train_loss": losses[-1],
        "train_local_loss_mean": float(np.mean(losses)),
        **{f"train_loss_block{k}": loss for k, loss in enumerate(losses)},
        **{f"test_{k}": v for k, v in metrics.items()},
        "epoch_time_s": stats["epoch_time"],
        "images_per_s": stats["images"] / stats["epoch_time"],
    }


def log_epoch(epoch: int, epochs: int, main: str, metrics: dict[str, float], seconds: float) -> None:
    log.info(
        "epoch %d/%d  test %s %s  loss %.4f  (%.1fs)",
        epoch,
        epochs,
        main,
        "-" if metrics[main] is None else f"{metrics[main]:.2f}",  # None: undefined (no ground truth)
        metrics["loss"],
        seconds,
    )


def log_start(run_dir: Any, resumed_at: int | None, epochs: int, loader: Any) -> None:
    """What a run says before its first epoch: where it resumed, the training batch it drops."""
    if resumed_at is not None:
        log.info("resumed %s at epoch %d of %d", run_dir, resumed_at, epochs)
        if resumed_at >= epochs:
            log.info(
                "this run already finished its %d epochs: nothing to train (resume with "
                "optim.epochs=N to train further)",
                epochs,
            )
    if loader.dropped:
        log.info(
            "each epoch drops the last training batch (%d image(s): batch norm needs at least %d); "
            "every test image is kept",
            loader.dropped,
            loader.min_batch,
        )


def log_blocks(values: list[float | None] | None, metric: str) -> None:
    """One line: every block's own test metric (``-``: the block's aux predicts nothing)."""
    if values is None:
        return
    shown = "  ".join(f"{k}:{'-' if v is None else f'{v:.2f}'}" for k, v in enumerate(values))
    log.info("  per block test %s  %s", metric, shown)


def record_measurements(
    run: Any,
    stats: dict[str, Any],
    block_bytes: list[int] | None,
    meter: Any = None,
    workspace: BlockPass | None = None,
    rank_blocks: list[list[int]] | None = None,
) -> None:
    """Keep in ``run`` what the first epoch measured (activation bytes per block, the whole step's
    memory by ``metrics.step_memory``, CUDA peaks) and the epoch's step times."""
    if block_bytes:
        batch = min(run.cfg.data.batch_size, len(run.train_loader.data))
        run.memory = {
            "peak_activation_bytes": max(block_bytes),
            "batch_size": batch,
            "activation_bytes_per_image": max(block_bytes) / batch,
            "block_activation_bytes": list(block_bytes),
        }
        bank = max(getattr(meter, "bank_bytes", None) or [0])
        mode = run.cfg.engine.mode
        step = step_memory(
            run.model,
            [run.optimizers[k] for k in range(run.model.num_blocks)],
            block_bytes,
            bank,
            workspace,
            mode=mode if mode in ("pipeline", "ddp") else "sequential",
            group_steps=run.cfg.engine.group_steps,
            rank_blocks=rank_blocks,
            all_reduce=mode == "ddp" or run.cfg.engine.replicas > 1,  # engine/mesh.py: per stage
        )
        run.memory.update(step.as_dict())
        run.memory["workspace_measured"] = workspace is not None
    if run.device.type == "cuda":
        run.memory["cuda_max_allocated"] = torch.cuda.max_memory_allocated(run.device)
        run.memory["cuda_max_reserved"] = torch.cuda.max_memory_reserved(run.device)
    if block_bytes:  # after the CUDA peaks: the estimate's own forward must not count in them
        method = getattr(run, "method", None)
        info = getattr(run.train_loader.data, "info", None)
        # per-rank (pipeline) and all-reduce (ddp) peaks are not comparable with one bp step
        if run.cfg.engine.mode == "sequential" and method is not None and info is not None:
            try:
                # an outside model's backbone keeps its source model's head (backbones/external.py)
                outside = callable(getattr(run.model.backbone, "source_head", None))
                options = aux_budget.remedies(method, outside, getattr(run, "task", None))
                aux_budget.warn_if_over_bp(
                    run.model, step, info, run.memory["batch_size"], method.name, options
                )
            except Exception as e:  # a report must never end a training run
                log.debug("bp comparison skipped: %s: %s", type(e).__name__, e)
    # the first steps include one-off costs (allocator, memory meter): keep the rest for the median
    times = stats["step_times"]
    run.step_times += times[1:] if len(times) > 1 else times


def last_block_values(run: Any) -> list[float | None] | None:
    """The per-block scores of the last ``metrics.csv`` row (None: no evaluation scored blocks)."""
    if not run.history:
        return None
    row = {k.removeprefix("test_"): v for k, v in run.history[-1].items() if k.startswith("test_")}
    return block_values(row, run.task, run.model.num_blocks)


def run_summary(run: Any) -> dict[str, Any]:
    """``summary.json``: the final and best test metric, memory, speed, sizes, environment."""
    main = f"test_{run.task.main_metric}"
    values = [row.get(main) for row in run.history]  # absent: an epoch from before VOC mAP existed
    step = statistics.median(run.step_times) if run.step_times else float("nan")
    return {
        "run_dir": str(run.run_dir),
        "method": run.cfg.method.name,
        "backbone": run.cfg.model.backbone,
        "num_blocks": run.model.num_blocks,
        "cuts": run.model.cuts,
        # folder data is called by its folder's name
        "dataset": run.train_loader.data.name if run.cfg.data.name == "folder" else run.cfg.data.name,
        "train_images": len(run.train_loader.data),
        "epochs": run.epoch,
        "metric": run.task.main_metric,
        "final": values[-1] if values else None,
        # max, or min for a lower-is-better main metric; undefined (None) epochs left out
        "best": run.task.best([v for v in values if v is not None]),
        "final_test_error": 100 - values[-1] if values and run.task.main_metric == "top1" else None,
        # each block's own test metric at the last evaluation (None: its aux predicts nothing)
        "block_metric": block_metric(run.task),
        "block_final": last_block_values(run),
        "frozen_blocks": run.model.frozen_blocks,
        "memory": run.memory,
        "median_step_time_s": step,
        "images_per_s": run.cfg.data.batch_size / step if run.step_times else None,
        "time_per_epoch_s": float(np.mean([r["epoch_time_s"] for r in run.history])) if run.history else None,
        "params": run.model.parameter_counts(),
        "device": str(run.device),
        "skipped_steps": run.skipped_steps,
        "seed": run.cfg.seed,
        "environment": environment(),
    }
