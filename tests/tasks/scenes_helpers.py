"""The training loop both ``digit_scenes`` proofs run (detection: test_scenes_detection_learns.py,
segmentation: test_scenes_learns.py): build the config's model on its data, score the test split at
init, train a number of steps (whole epochs or not) with the library's ``Trainer``, score again.
One thread, given back afterwards."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from locallearn.build import build_model
from locallearn.data.datasets import load_data
from locallearn.trainer import Trainer


@dataclass
class ScenesRun:
    at_init: dict  # the test split's metrics before training
    final: dict  # ... after ``steps`` steps
    losses: list[list[float]]  # per step, each block's training loss


def train_on_scenes(
    cfg,
    steps: int,
    seed: int = 0,
    never_step: int = 0,
    score: Callable[[Trainer, object], dict] | None = None,
) -> ScenesRun:
    """Train ``cfg`` (a loaded config) ``steps`` steps from ``seed``; the first ``never_step`` blocks'
    optimizers have ``step`` patched out (the frozen control that still tracks batch norm, unlike
    ``model.frozen_blocks``). ``score(trainer, test_loader)`` gives the metrics (default
    ``trainer.evaluate``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_set, test_set = load_data(cfg.data, cfg.task.name)
        torch.manual_seed(seed)
        model, _, task = build_model(cfg, train_set.info, train_set.num_classes)
        task.bind(test_set)
        loader = train_set.loader(cfg.data.batch_size, True, seed, cfg.data.augment)
        trainer = Trainer(model, cfg.optim, len(loader), task=task)
        test_loader = test_set.loader(cfg.data.test_batch_size, False)
        score = score or (lambda t, loader: t.evaluate(loader))
        at_init = score(trainer, test_loader)
        for opt in trainer.optimizers[:never_step]:
            opt.step = lambda *args, **kwargs: None  # the control: this block never learns
        losses: list[list[float]] = []
        epoch = 0
        while len(losses) < steps:
            loader.set_epoch(epoch)
            epoch += 1
            for batch in loader:
                losses.append([float(o["loss"].detach()) for o in trainer.step(batch)])
                if len(losses) == steps:
                    break
        return ScenesRun(at_init, score(trainer, test_loader), losses)
    finally:
        torch.set_num_threads(threads)
