"""Compatibility names: the run was split into ``trainer.py`` (the arithmetic), ``run.py`` (a
sequential run: directory, checkpoints, logs), ``rundir.py`` (lock, names, metrics file),
``resume.py`` (saved configs) and ``launch.py`` (make / resume / evaluate). Import from those."""

from locallearn.launch import comparison_config, evaluate_checkpoint, make_run, resume_run
from locallearn.resume import (
    SAFE_ON_RESUME,
    config_from_checkpoint,
    migrate_config,
    refuse_merged,
    resume_config,
)
from locallearn.run import Run, check_group_steps, seed_everything
from locallearn.rundir import RunLock, environment, fresh_run_dir, git_revision, run_name
from locallearn.trainer import Trainer, autocast_factory, select_device

__all__ = [
    "SAFE_ON_RESUME",
    "Run",
    "RunLock",
    "Trainer",
    "autocast_factory",
    "check_group_steps",
    "comparison_config",
    "config_from_checkpoint",
    "environment",
    "evaluate_checkpoint",
    "fresh_run_dir",
    "git_revision",
    "make_run",
    "migrate_config",
    "refuse_merged",
    "resume_config",
    "resume_run",
    "run_name",
    "seed_everything",
    "select_device",
]
