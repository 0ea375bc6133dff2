"""Optimizers (one per block) and the InfoPro cosine schedule with linear warm-up."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


def build_optimizer(params: Iterable[nn.Parameter], cfg) -> torch.optim.Optimizer:
    params = list(params)
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.name!r}; choose 'sgd' or 'adamw'")


def lr_at(progress: float, cfg) -> float:
    """Learning rate at ``progress`` epochs into training (a float; 0 = first step).

    InfoPro's ``--cos_lr`` (PRIOR_ART §2.5) set once per epoch e = 1..E:
    ``lr = 0.5*lr0*(1 + cos(pi*e/E))``, blended for e <= 10 with a linear warm-up from 0.01. We
    evaluate the same curve continuously, at every step, with ``e = progress`` and a configurable
    warm-up length, so that short runs are not dominated by per-epoch plateaus (deviation: per step
    instead of per epoch; the last epoch no longer runs at exactly lr 0).
    """
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule != "cosine":
        raise ValueError(f"unknown schedule {cfg.schedule!r}; choose 'cosine' or 'constant'")
    cosine = 0.5 * cfg.lr * (1 + math.cos(math.pi * min(progress / cfg.epochs, 1.0)))
    if progress < cfg.warmup_epochs:
        t = progress / cfg.warmup_epochs
        return cosine * t + cfg.warmup_lr * (1 - t)
    return cosine


class StepSchedule:
    """Sets every block's optimizer to ``lr_at(progress)``; state = the step counter only."""

    def __init__(self, optimizers: list[torch.optim.Optimizer], cfg, steps_per_epoch: int) -> None:
        self.optimizers = optimizers
        self.cfg = cfg
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.step_count = 0
        self.apply()

    @property
    def lr(self) -> float:
        return lr_at(self.step_count / self.steps_per_epoch, self.cfg)

    def apply(self) -> None:
        lr = self.lr
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr

    def step(self) -> None:
        self.step_count += 1
        self.apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self.apply()
