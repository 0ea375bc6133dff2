"""Small builders shared by the tests: a config on tiny random data, a batch, a model."""

from __future__ import annotations

import torch

from locallearn.build import build_model
from locallearn.config import load_config
from locallearn.engine.optim import build_optimizer
from locallearn.types import Batch, InputInfo

# a CLI run in seconds: resnet20 K=2 on 64 digits, one epoch
TINY_CLI = [
    "data.name=digits",
    "data.train_subset=64",
    "data.test_subset=40",
    "data.batch_size=32",
    "model.backbone=resnet20",
    "model.num_blocks=2",
    "optim.epochs=1",
    "optim.lr=0.05",
    "engine.device=cpu",
]
INPUTS = InputInfo(channels=3, size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def make_config(method: str = "dgl", backbone: str = "resnet20", k: int = 4, split: str = "even", **extra):
    overrides = [
        f"method.name={method}",
        f"model.backbone={backbone}",
        f"model.num_blocks={k}",
        f"model.split={split}",
        "optim.lr=0.05",
        "optim.schedule=constant",
        "optim.warmup_epochs=0",
        "data.name=digits",
    ]
    overrides += [f"{key}={value}" for key, value in extra.items()]
    return load_config(None, overrides)


def make_model(
    method: str = "dgl", backbone: str = "resnet20", k: int = 4, inputs: InputInfo = INPUTS, **extra
):
    cfg = make_config(method, backbone, k, **extra)
    model, meth, task = build_model(cfg, inputs, 10)
    optimizers = [build_optimizer(model.block_parameters(i), cfg.optim) for i in range(model.num_blocks)]
    return model, optimizers, task, cfg


def make_batch(n: int = 8, inputs: InputInfo = INPUTS, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, inputs.channels, inputs.size, inputs.size, generator=g)
    y = torch.arange(n) % 10
    mean = torch.tensor(inputs.mean).view(-1, 1, 1)
    std = torch.tensor(inputs.std).view(-1, 1, 1)
    return Batch(x, y, mean, std)


def run_cli(args, capsys, lines: bool = False):
    """Run ``locallearn ARGS`` in-process: (exit code, stdout, stderr); ``lines=True`` gives stderr as
    its non-blank lines."""
    from locallearn.cli import main

    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    err = [line for line in out.err.splitlines() if line.strip()] if lines else out.err
    return code, out.out, err


def one_error_line(err: list[str], code: int, expected_code: int = 2) -> str:
    """The single ``locallearn: error:`` line of a CLI run (``run_cli(..., lines=True)``), after checking the
    exit code and that no traceback was printed."""
    errors = [line for line in err if line.startswith("locallearn: error:")]
    assert code == expected_code and len(errors) == 1 and not any("Traceback" in e for e in err), err
    return errors[0]
