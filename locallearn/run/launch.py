"""Entry points above every engine mode: start a run (``make_run``), continue one (``resume_run``),
evaluate a checkpoint, derive a comparison run. The CLI and Python users call these; the modes
(``single.py`` sequential, ``parallel.py`` pipeline / ddp) never import this module."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from locallearn.build import build_model
from locallearn.config import Config
from locallearn.data.datasets import load_data
from locallearn.data.imagefolder import make_loader
from locallearn.engine import checkpoint
from locallearn.engine.sequential import evaluate
from locallearn.lifecycle import check_resumable, eval_checkpoint_path
from locallearn.resume import config_from_checkpoint, resume_config
from locallearn.run.parallel import parallel_run, resume_parallel
from locallearn.run.single import Run
from locallearn.trainer import check_group_steps, select_device


def make_run(cfg: Config, run_dir: Path | None = None, quiet: bool = False) -> Run:
    """The run for ``cfg.engine.mode``: sequential (``Run``), pipeline / ddp (under torchrun)."""
    check_group_steps(cfg)  # before any process group starts
    if cfg.engine.mode == "sequential":
        return Run(cfg, run_dir, quiet)
    return parallel_run(cfg, run_dir, quiet)


def resume_run(
    path: str | Path, quiet: bool = False, config_file: str | None = None, overrides: list[str] = ()
) -> Run:
    """Continue a run of any mode from its directory (or a checkpoint file); ``config_file`` and
    ``overrides`` may change only ``SAFE_ON_RESUME`` keys (more epochs, cadence, device, threads)."""
    check_resumable(path)  # a run killed before its first checkpoint: say so and clean up
    return resume_parallel(path, quiet, config_file, overrides) or Run.resume(
        path, quiet, config_file, overrides
    )


def resumed_config(path: str | Path, config_file: str | None = None, overrides: list[str] = ()) -> Config:
    """The config ``train --resume PATH`` would continue with (``--print-config``); reads no data."""
    path = Path(path)
    ckpt = path
    if path.is_dir():
        ckpt = path / "checkpoint.pt"
        if not ckpt.exists() and (path / "checkpoint.rank0.pt").exists():
            ckpt = path / "checkpoint.rank0.pt"  # a pipeline run: every rank's file holds the config
    state = checkpoint.load(ckpt)
    return resume_config(config_from_checkpoint(state), config_file, list(overrides), int(state["epoch"]))


def comparison_config(cfg: Config, method: str) -> Config:
    """The same run with another method on the same data, schedule and seed (bp: K = 1)."""
    other = dataclasses.replace(
        cfg, method=dataclasses.replace(cfg.method, name=method, options={}), compare=[]
    )
    if method == "bp":
        # one block, the head's: nothing to freeze (model.frozen_blocks applies to the local run)
        other.model = dataclasses.replace(cfg.model, num_blocks=1, split="even", cuts=None, frozen_blocks=0)
    # named after what it trains (data, backbone, K, method), or after the user's name for the run
    other.name = f"{cfg.name}-{method}" if cfg.name else None
    return other


def evaluate_checkpoint(path: str | Path, device: str = "auto") -> dict[str, Any]:
    ckpt = eval_checkpoint_path(path)  # a pipeline run's rank files are not what eval reads: say so
    state = checkpoint.load(ckpt)
    cfg = config_from_checkpoint(state)
    cfg.engine.device = device
    cfg.engine.measure_memory = False
    _, test_set = load_data(cfg.data, cfg.task.name)
    test_set = test_set.subset(cfg.data.test_subset)
    if cfg.data.image_size and hasattr(test_set, "min_size"):
        test_set.min_size = cfg.data.image_size
    model, _, task = build_model(cfg, test_set.info, test_set.num_classes, load_weights=False)
    task.bind(test_set)
    checkpoint.load_model_state(model, state["model"])
    dev = select_device(device)
    model.to(dev)
    loader = make_loader(test_set, cfg.data.test_batch_size, False, num_workers=cfg.data.num_workers)
    metrics = evaluate(model, loader, task, dev)
    return {"checkpoint": str(ckpt), "epoch": state["epoch"], "method": cfg.method.name, **metrics}
