"""Entry points above every engine mode: start a run (``make_run``), continue one (``resume_run``),
evaluate a checkpoint, derive a comparison run. The CLI and Python users call these; the modes'
runs (``single.py``, ``ddp.py``, ``pipeline.py``) never import this module.

Under torchrun every rank builds the whole model from the same seed (identical initial weights, nothing
to broadcast), loads the data set description, and then trains only its part: its block group
(pipeline, ``engine/pipeline.py``) or its shard of each batch (ddp, ``engine/ddp.py``). Rank 0 creates
the run directory and writes ``config.yaml``, ``metrics.csv``, ``summary.json`` and the log; every
rank has the same history (metrics are broadcast), so any rank could.

Checkpoints: in pipeline mode each rank writes ``checkpoint.rank{r}.pt`` atomically (its blocks, aux
nets, optimizers, RNG, the momentum versions in flight); a resume checks that all ranks are at the same
epoch with the same block assignment. At the end of a pipeline run rank 0 gathers every rank's weights
into an ordinary ``checkpoint.pt`` (marked ``merged_from``), so ``locallearn eval`` and the export work
as for any run; it is not a resume point. In ddp mode all ranks hold identical state, so rank 0 writes
the usual ``checkpoint.pt`` and every rank resumes from it.

Every check runs before the run directory exists (``Run.setup``), and rank 0 creates and locks it and
tells the others (or tells them why it could not), so a refused job leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from locallearn.build import build_model
from locallearn.config import Config, ConfigError
from locallearn.data.datasets import load_data
from locallearn.data.imagefolder import make_loader
from locallearn.engine import checkpoint
from locallearn.engine.sequential import evaluate
from locallearn.lifecycle import check_resumable, eval_checkpoint_path
from locallearn.resume import config_from_checkpoint, refuse_merged, resume_config
from locallearn.run.ddp import DDPRun
from locallearn.run.distributed import DistributedRun
from locallearn.run.pipeline import PipelineRun
from locallearn.run.single import Run
from locallearn.trainer import check_group_steps, select_device

RUNS: dict[str, type[DistributedRun]] = {"pipeline": PipelineRun, "ddp": DDPRun}  # under torchrun


def make_run(cfg: Config, run_dir: Path | None = None, quiet: bool = False, load_weights: bool = True) -> Run:
    """The run for ``cfg.engine.mode``: sequential (``Run``), pipeline / ddp (under torchrun).
    ``load_weights=False``: a checkpoint is loaded next (resume); ``model.pretrained`` is not read."""
    check_group_steps(cfg)  # before any process group starts
    if cfg.engine.mode == "sequential":
        return Run(cfg, run_dir, quiet, load_weights)
    if cfg.engine.mode not in RUNS:
        raise ConfigError(
            f"engine.mode: unknown mode {cfg.engine.mode!r}; choose sequential, {', '.join(RUNS)}"
        )
    return RUNS[cfg.engine.mode](cfg, run_dir, quiet, load_weights)


def resume_checkpoint(path: Path) -> Path:
    """The file this process resumes from: ``path`` itself, or in a run directory ``checkpoint.pt``, or a
    pipeline run's ``checkpoint.rank{RANK}.pt`` (refused unless this job has as many ranks as the run)."""
    if not path.is_dir():
        return path
    ranks = sorted(path.glob("checkpoint.rank*.pt"))
    if not ranks:
        return path / "checkpoint.pt"
    world = int(os.environ.get("WORLD_SIZE", 1))
    if len(ranks) != world:  # every rank sees the same files: all refuse alike
        raise checkpoint.CheckpointError(
            f"this run has {len(ranks)} ranks (checkpoint.rank0..{len(ranks) - 1}.pt) and this job "
            f"{world}: resume it with `torchrun --nproc-per-node {len(ranks)} -m locallearn train "
            f"--resume {path}`"
        )
    return path / f"checkpoint.rank{int(os.environ.get('RANK', 0))}.pt"


def resume_run(
    path: str | Path, quiet: bool = False, config_file: str | None = None, overrides: list[str] = ()
) -> Run:
    """Continue a run of any mode from its directory (or a checkpoint file); ``config_file`` and
    ``overrides`` may change only ``SAFE_ON_RESUME`` keys (more epochs, cadence, device, threads)."""
    check_resumable(path)  # a run killed before its first checkpoint: say so and clean up
    ckpt = resume_checkpoint(Path(path))
    state = checkpoint.load(ckpt)
    refuse_merged(state, ckpt)
    cfg = resume_config(config_from_checkpoint(state), config_file, list(overrides), int(state["epoch"]))
    run = make_run(cfg, run_dir=ckpt.parent, quiet=quiet, load_weights=False)
    run.load_state_dict(state)
    return run


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
