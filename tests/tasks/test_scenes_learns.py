"""Issue 27.7, the dense half: a fast proof in the default suite that the early blocks of a local method
learn, on images it never trained on. DGL K=4 trains a CIFAR ResNet-20 with a DeepLabV3 head to segment
``digit_scenes`` (32-px scenes of 1-2 digits) for ``STEPS`` steps and is scored on the test split, whose
digits come from source images no training scene used. It must reach mIoU ``THRESHOLD``, which neither
the untrained model nor the same run with the first three blocks' optimizers never stepping reaches: the
last block and DeepLab's head fit the training scenes on random early features (their training loss
falls as low) but do not carry to unseen digits.

Measured with ``pytest -s`` (one thread, seed 0; the lines they print, docs/segmentation.md "digit_scenes"):
- the default test: held-out mIoU 23.9 after 150 steps, 1.2 at init; 59 s of CPU time with pytest's start;
- the ``-m slow`` control, blocks 0-2 frozen at init: 9.7 (its last block's training loss falls about as far).
The data and the order of the batches are fixed, so on one machine the run repeats exactly; the bar leaves
about 6 points on either side for other CPUs' arithmetic.
"""

from __future__ import annotations

import math

import pytest
import torch

from locallearn.build import build_model
from locallearn.config import load_config
from locallearn.data.datasets import load_data
from locallearn.trainer import Trainer

STEPS, THRESHOLD = 150, 18.0
RECIPE = {
    "task.name": "segmentation", "task.segmentation.aux_width": 32,
    "model.backbone": "resnet20", "model.num_blocks": 4, "method.name": "dgl",
    "data.name": "digit_scenes", "data.scenes.size": 32, "data.scenes.min_digit": 12,
    "data.scenes.max_digit": 20, "data.scenes.objects": 2, "data.scenes.train_images": 480,
    "data.scenes.test_images": 128, "data.batch_size": 16, "data.test_batch_size": 64, "data.augment": "false",
    "optim.name": "adamw", "optim.lr": 0.003, "optim.weight_decay": 0, "optim.epochs": 5,
    "optim.warmup_epochs": 0,
}  # fmt: skip


def train(steps: int, frozen: int = 0, seed: int = 0) -> tuple[dict, dict, list[list[float]]]:
    """(test metrics at init, test metrics after ``steps`` steps, per-step block losses); the first
    ``frozen`` blocks' optimizers never step (their aux nets neither). One thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config(None, [f"{k}={v}" for k, v in RECIPE.items()])
        train_set, test_set = load_data(cfg.data, cfg.task.name)
        torch.manual_seed(seed)
        model, _, task = build_model(cfg, train_set.info, train_set.num_classes)
        task.bind(test_set)
        loader = train_set.loader(cfg.data.batch_size, True, seed, cfg.data.augment)
        trainer = Trainer(model, cfg.optim, len(loader), task=task)
        test_loader = test_set.loader(cfg.data.test_batch_size, False)
        at_init = trainer.evaluate(test_loader)
        for opt in trainer.optimizers[:frozen]:
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
        return at_init, trainer.evaluate(test_loader), losses
    finally:
        torch.set_num_threads(threads)


def test_dgl_segments_held_out_digits() -> None:
    at_init, got, losses = train(STEPS)
    print(f"digit_scenes dgl K=4 seed 0: test mIoU {got['miou']:.1f} after {STEPS} steps (at init "
          f"{at_init['miou']:.1f}); block losses {losses[0]} -> {losses[-1]}")  # fmt: skip
    assert all(math.isfinite(v) for step in losses for v in step)
    assert at_init["miou"] < THRESHOLD  # the bar is above what no training gives
    assert got["miou"] >= THRESHOLD, got
    # the early blocks learn their own task: every aux's training loss fell
    assert all(last < 0.5 * first for first, last in zip(losses[0], losses[-1])), (losses[0], losses[-1])


@pytest.mark.slow
def test_the_run_with_early_blocks_frozen_stays_below_the_bar() -> None:
    _, got, losses = train(STEPS, frozen=3)
    print(f"digit_scenes dgl K=4 seed 0, blocks 0-2 frozen: test mIoU {got['miou']:.1f} after {STEPS} steps; "
          f"block losses {losses[0]} -> {losses[-1]}")  # fmt: skip
    assert got["miou"] < THRESHOLD, got
