"""Optimizers (one per block), their grouped view (``engine.group_steps``) and the InfoPro cosine
schedule with linear warm-up."""

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
            foreach=cfg.foreach,
            fused=cfg.fused or None,
        )
    if cfg.name == "adamw":
        return torch.optim.AdamW(
            params,
            lr=cfg.lr,
            betas=tuple(cfg.betas),
            weight_decay=cfg.weight_decay,
            foreach=cfg.foreach,
            fused=cfg.fused or None,
        )
    raise ValueError(f"unknown optimizer {cfg.name!r}; choose 'sgd' or 'adamw'")


class _OwnersState(dict):
    """The grouped view's ``state``: every lookup is answered by the block optimizer that owns the
    parameter (the same dict object, so in-place updates land there); the view keeps nothing."""

    def __init__(self, owners: dict[torch.Tensor, torch.optim.Optimizer]) -> None:
        super().__init__()
        self.owners = owners

    def __missing__(self, param: torch.Tensor) -> dict:
        return self.owners[param].state[param]


class GroupedOptimizer:
    """One optimizer of the blocks' class over the union of their parameters, so that a batch ends in
    one multi-tensor update (``engine.group_steps``) instead of K small ones.

    The block optimizers stay the owners of everything: their per-parameter state (momentum buffers,
    Adam moments; read and written through ``_OwnersState``), their param groups (the LR schedule sets
    them; ``sync`` copies their hyper-parameters into the view's single group before each step) and
    their checkpoints. Per tensor the update is the same element-wise arithmetic as each block
    stepping alone (a multi-tensor or fused kernel only batches tensors), so with the same
    ``optim.foreach`` / ``optim.fused`` the results are bitwise equal (tests/engine/test_speed_switches.py,
    CPU). The cost: every block's gradients stay alive until the end of the batch (one
    parameter-sized set, instead of one block's).
    Stepping is ``engine/step.py``'s job (``step_grouped``).
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        if not optimizers:
            raise ValueError("group_steps needs at least one optimizer")
        cls = type(optimizers[0])
        if any(type(opt) is not cls for opt in optimizers):
            raise ValueError("group_steps needs every block's optimizer to be of one class")
        self.optimizers = list(optimizers)
        owners = {p: opt for opt in self.optimizers for g in opt.param_groups for p in g["params"]}
        params = list(owners)
        if len(params) != sum(len(g["params"]) for opt in self.optimizers for g in opt.param_groups):
            raise ValueError("group_steps needs each parameter in one block's optimizer only")
        first = self.optimizers[0]
        # the base constructor takes the defaults dict as it is (AdamW's own would not accept all its keys)
        self.view = cls.__new__(cls)
        torch.optim.Optimizer.__init__(self.view, [{"params": params}], dict(first.defaults))
        self.view.state = _OwnersState(owners)
        self.sync()

    def sync(self) -> None:
        """Copy the blocks' hyper-parameters (lr, ...) into the view; they must agree across blocks.
        Read afresh each time: ``load_state_dict`` replaces a block optimizer's groups."""
        groups = [g for opt in self.optimizers for g in opt.param_groups]
        ref = {key: value for key, value in groups[0].items() if key != "params"}
        for g in groups[1:]:
            for key, value in ref.items():
                if g[key] != value:
                    raise ValueError(
                        f"group_steps needs one value of {key!r} for every block ({g[key]} != {value})"
                    )
        self.view.param_groups[0].update(ref)

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)


def group_optimizers(optimizers: list[torch.optim.Optimizer], enabled: bool) -> GroupedOptimizer | None:
    """The grouped view when ``engine.group_steps`` is on, else None (each block steps on its own)."""
    return GroupedOptimizer(optimizers) if enabled else None


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
