"""The trainer: a ``LocalModel`` with one optimizer per block, the LR schedule and AMP.

``step(batch)`` is one training step of every block (each block's ``local_step``, then the momentum
aux's EMA sync, then the schedule), ``evaluate(loader)`` the test pass, ``state_dict()`` everything a
resume needs of the arithmetic. The trainer writes no file and prints nothing: the run
(``locallearn/run/``) owns directories, checkpoints and logs, and a Python user may drive a trainer
from their own loop instead (``locallearn.wrap`` returns one, docs/api.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import Any

import torch

from locallearn.config import Config, ConfigError, EngineConfig, OptimConfig
from locallearn.engine import checkpoint
from locallearn.engine.optim import StepSchedule, build_optimizer, group_optimizers
from locallearn.engine.sequential import evaluate, train_epoch, train_step
from locallearn.model import LocalModel
from locallearn.types import Batch


def select_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"engine.device: unknown device {name!r} (auto, cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"engine.device={name!r} but CUDA is not available on this machine")
    return device


def autocast_factory(amp: str, device: torch.device) -> Callable[[], AbstractContextManager]:
    if amp == "none":
        return nullcontext
    if amp not in ("bf16", "fp16"):
        raise ConfigError(f"engine.amp must be none, bf16 or fp16, got {amp!r}")
    if device.type != "cuda":
        raise ConfigError(f"engine.amp={amp} needs a CUDA device (got {device.type})")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return partial(torch.autocast, device_type="cuda", dtype=dtype)


def check_group_steps(cfg: Config) -> None:
    """``engine.group_steps`` is a sequential-engine switch without fp16 loss scaling."""
    if not cfg.engine.group_steps:
        return
    if cfg.engine.mode != "sequential":
        raise ConfigError(f"engine.group_steps=true needs engine.mode=sequential (got {cfg.engine.mode})")
    if cfg.engine.amp == "fp16":
        raise ConfigError(
            "engine.group_steps=true does not support engine.amp=fp16 (one loss scale per block); use bf16"
        )


class Trainer:
    """One optimizer per block (block + its aux), the step-wise LR schedule, AMP.

    ``task`` (the one ``build_model`` returned) is needed by ``evaluate`` only. ``steps_per_epoch``
    sets the schedule's time axis (``optim.epochs`` epochs of that many steps)."""

    def __init__(
        self,
        model: LocalModel,
        optim: OptimConfig,
        steps_per_epoch: int,
        *,
        task: Any = None,
        device: torch.device | str = "cpu",
        engine: EngineConfig | None = None,
    ) -> None:
        engine = engine or EngineConfig(device=str(device))
        self.model, self.task, self.optim = model, task, optim
        self.device = torch.device(device)
        self.autocast = autocast_factory(engine.amp, self.device)
        self.memory_format = torch.channels_last if engine.channels_last else torch.contiguous_format
        self.model.to(self.device, memory_format=self.memory_format)
        self.optimizers = [build_optimizer(model.block_parameters(k), optim) for k in range(model.num_blocks)]
        self.schedule = StepSchedule(self.optimizers, optim, steps_per_epoch)
        self.grouped = group_optimizers(self.optimizers, engine.group_steps)
        fp16 = engine.amp == "fp16"
        self.scalers = [torch.amp.GradScaler("cuda") for _ in self.optimizers] if fp16 else None

    @property
    def lr(self) -> float:
        """The learning rate the next step trains at."""
        return self.schedule.lr

    def prepare(self, batch: Batch) -> Batch:
        batch = batch.to(self.device, non_blocking=True)
        batch.x = batch.x.contiguous(memory_format=self.memory_format)
        return batch

    def step(self, batch: Batch, meter: Any = None) -> list[dict[str, torch.Tensor]]:
        """One batch: every block's forward/backward/optimizer step, the momentum sync, the schedule.
        Returns each block's aux outputs (``out['loss']`` per block). Puts the model in train mode."""
        self.model.train()
        outs = train_step(
            self.model,
            self.prepare(batch),
            self.optimizers,
            self.scalers,
            self.autocast,
            meter,
            self.grouped,
            self.optim.clip_grad_norm,
        )
        self.schedule.step()
        return outs

    def epoch_parts(self) -> dict[str, Any]:
        """What every engine mode's epoch takes from the trainer, by the engine functions' names
        (``engine.sequential.train_epoch``, ``engine.pipeline.train_epoch``)."""
        return {
            "optimizers": self.optimizers,
            "schedule": self.schedule,
            "device": self.device,
            "scalers": self.scalers,
            "autocast": self.autocast,
            "memory_format": self.memory_format,
            "clip": self.optim.clip_grad_norm,
        }

    def train_epoch(
        self, batches: Iterable[Batch], meter: Any = None, progress: Any = None
    ) -> dict[str, Any]:
        """One pass over ``batches`` (``engine/sequential.py``): mean loss per block, step times, images."""
        return train_epoch(
            self.model, batches, meter=meter, progress=progress, grouped=self.grouped, **self.epoch_parts()
        )

    def evaluate(self, batches: Iterable[Batch], task: Any = None, blocks: bool = True) -> dict[str, float]:
        """Backbone + head over ``batches`` in eval mode; the task's metrics (and loss), and with
        ``blocks`` each block's aux scored by the task's metric, as ``block{k}_{metric}``."""
        task = task or self.task
        if task is None:
            raise ValueError("Trainer.evaluate needs the task (pass task= to the trainer or here)")
        return evaluate(self.model, batches, task, self.device, self.autocast, self.memory_format, blocks)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "schedule": self.schedule.state_dict(),
            "scalers": [s.state_dict() for s in self.scalers] if self.scalers else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        checkpoint.load_model_state(self.model, state["model"])
        for opt, s in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(s)
        self.schedule.load_state_dict(state["schedule"])
        if self.scalers and state.get("scalers"):
            for scaler, s in zip(self.scalers, state["scalers"]):
                scaler.load_state_dict(s)
