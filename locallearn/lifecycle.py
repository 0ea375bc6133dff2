"""What a run leaves when it does not get far, and how a run that goes wrong without a NaN is told
apart (issue 22).

- A run that stops (an error, Ctrl-C) before its first checkpoint removes the directory it created:
  there is nothing in it to resume, and no directory should suggest otherwise.
- A directory a killed process left before its first checkpoint (``config.yaml``, ``train.log``, a
  0-byte ``.checkpoint.pt.*.tmp``, a ``.lock``) is cleaned up by ``--resume``, which says there is
  nothing to resume.
- ``eval`` on a pipeline run's directory or rank file says what those files are.
- A finite loss that grew by orders of magnitude is warned about once and marked in ``summary.json``.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

from locallearn.engine import checkpoint
from locallearn.rundir import RunLock

log = logging.getLogger(__name__)

# What a run writes into its directory besides checkpoints (the error.rankN.txt of a failed torchrun job
# included); ``--resume`` removes a never-started directory only if it holds nothing else.
RUN_FILES = ("config.yaml", "train.log", "metrics.csv", "summary.json", ".lock")
RANK_FILE = re.compile(r"checkpoint\.rank(\d+)\.pt")
# "orders of magnitude above its first value": a loss 1000x (three orders) the first epoch's training
# loss. A healthy run's losses fall; a fine-tune's test loss may be a few times its training loss.
DIVERGED_FACTOR = 1000.0


def _close_logs_in(run_dir: Path) -> None:
    """Close and drop the log handlers writing into ``run_dir`` (``train.log``) before it is removed."""
    root = logging.getLogger("locallearn")
    for handler in list(root.handlers):
        name = getattr(handler, "baseFilename", None)
        if name and Path(name).parent.resolve() == run_dir.resolve():
            root.removeHandler(handler)
            handler.close()


def remove_unstarted(run_dir: Path) -> None:
    """Delete a run directory this process created that holds no checkpoint (the run stopped before its
    first one): everything in it was written by this run moments ago."""
    if any(run_dir.glob("checkpoint*.pt")):
        return
    _close_logs_in(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    log.info("removed the run directory %s: the run stopped before its first checkpoint", run_dir)


def _is_leftover(p: Path) -> bool:
    return (
        p.name in RUN_FILES
        or p.name.startswith("error.rank")
        or any(p.match(pattern) for pattern in checkpoint.TEMP_PATTERNS)
    )


def check_resumable(path: str | Path) -> None:
    """Before ``--resume`` reads a checkpoint: a run directory with no checkpoint at all never finished an
    epoch. Clean up what its killed process left (under the run's lock: a live run in its first epoch is
    refused as in use, not touched) and say so; the directory goes too if nothing else is in it."""
    path = Path(path)
    run_dir = path if path.is_dir() else path.parent
    if path.is_file() or not run_dir.is_dir() or (path != run_dir and path.name != "checkpoint.pt"):
        return  # a checkpoint file, or nothing that looks like a run: the load says what is wrong
    if any(run_dir.glob("checkpoint*.pt")) or not any(run_dir.joinpath(n).exists() for n in RUN_FILES):
        return
    removed = []
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 cleans up; all ranks refuse alike
        lock = RunLock(run_dir).acquire()  # in use by a live process: refused with one line
        for p in sorted(run_dir.iterdir()):
            if p.is_file() and _is_leftover(p) and p.name != ".lock":
                p.unlink(missing_ok=True)
                removed.append(p.name)
        lock.release()
        removed.append(".lock")
        try:
            run_dir.rmdir()  # only if nothing else is in it
            removed = [f"the directory ({', '.join(removed)})"]
        except OSError:
            pass
    cleaned = f"; removed {', '.join(removed)}" if removed else ""
    raise checkpoint.CheckpointError(
        f"nothing to resume in {str(run_dir)!r}: the run never finished an epoch (no checkpoint was "
        f"written){cleaned}. Start it again without --resume"
    )


def eval_checkpoint_path(path: str | Path) -> Path:
    """The checkpoint ``eval`` reads for ``path``, or one line on what a pipeline run's files are."""
    path = Path(path)
    ckpt = path / "checkpoint.pt" if path.is_dir() else path
    ranks = sorted(ckpt.parent.glob("checkpoint.rank*.pt")) if ckpt.parent.is_dir() else []
    rank = RANK_FILE.fullmatch(ckpt.name)
    if rank or (not ckpt.exists() and ranks):
        what = (
            f"{str(ckpt)!r} is rank {rank.group(1)}'s resume point of a pipeline run: it holds only the "
            "blocks that rank trains"
            if rank
            else f"{str(ckpt.parent)!r} is a pipeline run that has not finished: it has only the ranks' "
            f"resume points (checkpoint.rank0..{len(ranks) - 1}.pt), each holding its own blocks"
        )
        raise checkpoint.CheckpointError(
            f"{what}. The merged checkpoint.pt that eval reads is written when the run ends: finish it with "
            f"`torchrun --nproc-per-node {max(len(ranks), 1)} -m locallearn train --resume {ckpt.parent}`"
        )
    if (
        ckpt.name == "checkpoint.pt"
        and not ckpt.exists()
        and any(ckpt.parent.joinpath(n).exists() for n in RUN_FILES)
    ):
        raise checkpoint.CheckpointError(
            f"{str(ckpt.parent)!r} has no checkpoint.pt: the run never finished an epoch (or was killed in its "
            "first save); there is nothing to evaluate"
        )
    return ckpt


def looks_diverged(history: list[dict[str, Any]]) -> str | None:
    """Why the run looks diverged, or None: a training or test loss more than ``DIVERGED_FACTOR`` times
    the first epoch's training loss (finite losses only; a NaN stops the run elsewhere)."""
    if not history:
        return None
    first = history[0].get("train_loss")
    if not isinstance(first, int | float) or not math.isfinite(first) or first <= 0:
        return None
    for row in history:
        for key in ("train_loss", "test_loss"):
            value = row.get(key)
            if isinstance(value, int | float) and value > DIVERGED_FACTOR * first:
                return (
                    f"{key.replace('_', ' ')} {value:.3g} at epoch {row['epoch']} is more than "
                    f"{DIVERGED_FACTOR:g}x the first epoch's training loss {first:.3g}"
                )
    return None


class RunLifecycle:
    """The part of ``Run`` (``run/single.py``) that handles a run stopping early or going wrong without a NaN;
    a mixin so that every engine mode gets it. Expects the run's ``run_dir``, ``lock``, ``saved_epoch``,
    ``resumed_at``, ``is_main``, ``history`` and ``warnings`` (``config.config_warnings``)."""

    created_dir = False  # this process made the run directory (``open_run_dir`` sets it)
    removed_dir = False
    looks_diverged: str | None = None  # why the losses look diverged, once they do

    def discard_unstarted(self) -> None:
        """On any error or Ctrl-C out of ``fit``: a run this process started that wrote no checkpoint
        has nothing to resume, so the directory it made goes (rank 0 owns it under torchrun)."""
        if not (self.created_dir and self.saved_epoch is None and self.is_main):
            return
        if getattr(self, "tensorboard", None) is not None:  # its event file lives in the directory
            self.tensorboard.close()
            self.tensorboard = None
        if self.lock is not None:
            self.lock.release()
        remove_unstarted(self.run_dir)
        self.removed_dir = True

    def warn_at_start(self) -> None:
        """Values that change the run without error (a clipped subset, a warm-up longer than the run):
        one warning line each, on screen and in ``train.log``, when a run starts (not again on resume)."""
        if self.resumed_at is None and self.is_main:
            for warning in self.warnings:
                log.warning(warning)

    def check_divergence(self) -> None:
        """After each epoch: a finite but absurd loss is warned about once (``looks_diverged``)."""
        why = looks_diverged(self.history)
        if why and not self.looks_diverged and self.is_main:
            log.warning("the run looks diverged: %s; lower optim.lr", why)
        self.looks_diverged = why

    def with_divergence(self, summary: dict[str, Any]) -> dict[str, Any]:
        why = looks_diverged(self.history)
        return {**summary, "looks_diverged": why is not None, "looks_diverged_why": why}

    def resume_command(self) -> str:
        return f"locallearn train --resume {self.run_dir}"

    def interrupted_message(self) -> str:
        """What Ctrl-C leaves behind, said truthfully."""
        if self.saved_epoch is None:
            if self.removed_dir:
                return f"interrupted before the first checkpoint: nothing was saved (removed {self.run_dir})"
            return f"interrupted before the first checkpoint: nothing to resume in {self.run_dir}"
        return (
            f"interrupted; epoch {self.saved_epoch} is saved in {self.run_dir} "
            f"(continue with: {self.resume_command()})"
        )
