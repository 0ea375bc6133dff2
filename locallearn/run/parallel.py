"""Runs for ``engine.mode=pipeline`` and ``engine.mode=ddp``: a ``Run`` per rank under ``torchrun``.

Every rank builds the whole model from the same seed (identical initial weights, nothing to
broadcast), loads the data set description, and then trains only its part: its block group
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

import os
from pathlib import Path

from locallearn.config import Config, ConfigError
from locallearn.engine import checkpoint
from locallearn.resume import config_from_checkpoint, refuse_merged, resume_config
from locallearn.run import Run
from locallearn.run.ddp import DDPRun
from locallearn.run.distributed import DistributedRun
from locallearn.run.pipeline import PipelineRun

RUNS: dict[str, type[DistributedRun]] = {"pipeline": PipelineRun, "ddp": DDPRun}


def parallel_run(
    cfg: Config, run_dir: Path | None = None, quiet: bool = False, load_weights: bool = True
) -> Run:
    """``load_weights=False``: a checkpoint is loaded next (resume); ``model.pretrained`` is not read."""
    if cfg.engine.mode not in RUNS:
        raise ConfigError(
            f"engine.mode: unknown mode {cfg.engine.mode!r}; choose sequential, {', '.join(RUNS)}"
        )
    return RUNS[cfg.engine.mode](cfg, run_dir, quiet, load_weights)


def resume_parallel(
    path: str | Path, quiet: bool = False, config_file: str | None = None, overrides: list[str] = ()
) -> Run | None:
    """Resume a pipeline / ddp run on this rank; ``None`` for a sequential checkpoint."""
    path = Path(path)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    ckpt = path
    if path.is_dir():
        ranks = sorted(path.glob("checkpoint.rank*.pt"))
        ckpt = path / f"checkpoint.rank{rank}.pt" if ranks else path / "checkpoint.pt"
        if ranks and len(ranks) != world:  # every rank sees the same files: all refuse alike
            raise checkpoint.CheckpointError(
                f"this run has {len(ranks)} ranks (checkpoint.rank0..{len(ranks) - 1}.pt) and this job "
                f"{world}: resume it with `torchrun --nproc-per-node {len(ranks)} -m locallearn train "
                f"--resume {path}`"
            )
    state = checkpoint.load(ckpt)
    refuse_merged(state, ckpt)
    cfg = config_from_checkpoint(state)
    if cfg.engine.mode == "sequential":
        return None
    cfg = resume_config(cfg, config_file, list(overrides), int(state["epoch"]))
    run = parallel_run(cfg, run_dir=ckpt.parent, quiet=quiet, load_weights=False)
    run.load_state_dict(state)
    return run
