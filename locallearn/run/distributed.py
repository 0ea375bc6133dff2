"""The part of a pipeline or ddp run every rank shares: the process group, the rank's device, rank 0
owning the run directory (``launch.py`` says how the modes divide the work)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from locallearn.config import Config, ConfigError
from locallearn.engine import distributed
from locallearn.engine.distributed import Context
from locallearn.run import Run


def _local_config(cfg: Config, ctx: Context) -> Config:
    """The rank's own copy: its device (the saved config keeps the user's ``engine.device``)."""
    return dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, device=str(ctx.device)))


class DistributedRun(Run):
    def __init__(
        self, cfg: Config, run_dir: Path | None = None, quiet: bool = False, load_weights: bool = True
    ) -> None:
        if cfg.engine.amp == "fp16":
            raise ConfigError(
                f"engine.mode={cfg.engine.mode} supports amp=none or bf16 (fp16 loss scaling skips "
                "steps rank by rank and would desynchronise the ranks)"
            )
        if cfg.compare:
            raise ConfigError(
                f"engine.mode={cfg.engine.mode}: run the compared methods {cfg.compare} as separate jobs"
            )
        self.ctx = distributed.init(cfg.engine.mode, cfg.engine.device, cfg.engine.dist_timeout_s)
        super().__init__(_local_config(cfg, self.ctx), run_dir, quiet or not self.ctx.is_main, load_weights)
        self.cfg = cfg
        self.device = self.ctx.device

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    def measure_workspace(self):
        """Not measured: a batch here is drawn by every rank together (whole-step memory without it)."""
        return None

    def open_run_dir(self, run_dir: Path | None) -> Path:
        """Rank 0 creates (or locks) the directory; every rank gets its path or its error."""
        made = error = None
        if self.ctx.is_main:
            try:
                made = str(super().open_run_dir(run_dir))
            except ConfigError as e:
                error = str(e)
        made, error = distributed.broadcast_object(
            self.ctx, (made, error), 0, "agreeing on the run directory"
        )
        if error is not None:
            raise ConfigError(error)
        return Path(made)

    def fit(self, stop_after: int | None = None) -> dict[str, Any]:
        summary = super().fit(stop_after)
        distributed.shutdown()
        return summary

    def resume_command(self) -> str:
        """Only torchrun restarts a pipeline or ddp run, with the same number of ranks."""
        return f"torchrun --nproc-per-node {self.ctx.world} -m locallearn train --resume {self.run_dir}"

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        out["engine"] = {"mode": self.cfg.engine.mode, "world_size": self.ctx.world}
        return out
