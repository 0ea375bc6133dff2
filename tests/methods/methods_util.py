"""Tiny builders for the method tests: resnet20 at 8x8, a fixed batch of 8, SGD at a constant lr."""

from __future__ import annotations

import torch

from locallearn.build import build_model
from locallearn.config import load_config
from locallearn.engine.optim import build_optimizer
from locallearn.types import Batch, InputInfo

INPUTS = InputInfo(channels=3, size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def tiny_model(method: str, k: int = 4, backbone: str = "resnet20", seed: int = 0, **overrides):
    args = [
        f"method.name={method}", f"model.backbone={backbone}", f"model.num_blocks={k}",
        "optim.lr=0.05", "optim.schedule=constant", "optim.warmup_epochs=0", "data.name=digits",
    ]  # fmt: skip
    args += [f"{key}={value}" for key, value in overrides.items()]
    cfg = load_config(None, args)
    torch.manual_seed(seed)
    model, meth, task = build_model(cfg, INPUTS, 10)
    optimizers = [build_optimizer(model.block_parameters(i), cfg.optim) for i in range(model.num_blocks)]
    return model, optimizers, meth


def tiny_batch(n: int = 8, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, INPUTS.size, INPUTS.size, generator=g)
    y = torch.arange(n) % 10
    return Batch(x, y, torch.tensor(INPUTS.mean).view(-1, 1, 1), torch.tensor(INPUTS.std).view(-1, 1, 1))
