"""A training run: the data, a ``Trainer`` over the built model, and everything around the
arithmetic: the run directory (``config.yaml``, ``metrics.csv``, ``summary.json``, checkpoints, the
lock), resume, and the epoch loop's logs. One process (``engine.mode=sequential``) here; pipeline / ddp
subclass ``Run`` (``distributed.py``, ``pipeline.py``, ``ddp.py``); ``launch.py`` picks the mode."""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from locallearn.build import build_model, check_config, resolved_method_options
from locallearn.config import Config, ConfigError, config_warnings, dump_yaml, to_dict
from locallearn.data.datasets import load_data
from locallearn.data.imagefolder import make_loader
from locallearn.engine import checkpoint
from locallearn.engine.block_scores import block_metric, block_values
from locallearn.engine.compile import compile_blocks
from locallearn.engine.errors import NonFiniteLossError, check_metrics
from locallearn.engine.threads import set_threads
from locallearn.lifecycle import RunLifecycle
from locallearn.metrics.step_memory import BlockPass, StepMeter, block_workspace
from locallearn.report import (
    epoch_row,
    log_blocks,
    log_epoch,
    log_start,
    record_measurements,
    run_summary,
)
from locallearn.rundir import RunLock, environment, fresh_run_dir, write_metrics
from locallearn.trainer import Trainer, autocast_factory, check_group_steps, select_device
from locallearn.watch import Progress, TensorBoard, tensorboard_writer_class

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Run(RunLifecycle):
    """Everything one training run holds; ``fit`` trains to the end, checkpointing every epoch.
    The arithmetic (optimizers, schedule, AMP, the step) is ``self.trainer``'s."""

    is_main = True  # the process that writes the run directory's files (rank 0 under torchrun)

    def __init__(
        self, cfg: Config, run_dir: Path | None = None, quiet: bool = False, load_weights: bool = True
    ) -> None:
        """``load_weights=False``: a checkpoint is loaded next (``resume``), so the initial weights
        the config names (``model.pretrained``, ...) are not read."""
        self.cfg = cfg
        self.quiet = quiet
        check_config(cfg, load_weights)
        check_group_steps(cfg)
        seed_everything(cfg.seed)
        self.device = select_device(cfg.engine.device)
        autocast_factory(cfg.engine.amp, self.device)  # refused before any data is read
        train_set, test_set = load_data(cfg.data, cfg.task.name)  # folder: image_size; digit_scenes: task
        self.threads_line = set_threads(cfg.engine.threads, train_set.info.size, self.device)
        self.warnings = config_warnings(cfg, len(train_set), train_set.num_classes)
        train_set, test_set = train_set.subset(cfg.data.train_subset), test_set.subset(cfg.data.test_subset)
        if cfg.data.image_size and hasattr(train_set, "min_size"):  # detection: the resize target
            train_set.min_size = test_set.min_size = cfg.data.image_size
        workers = cfg.data.num_workers
        self.train_loader = make_loader(
            train_set, cfg.data.batch_size, True, cfg.seed, cfg.data.augment, num_workers=workers
        )
        self.test_loader = make_loader(test_set, cfg.data.test_batch_size, False, num_workers=workers)
        # the train loader drops a last batch of 1 image (batch norm, aux heads): said once in ``fit``
        self.train_loader.min_batch = max(self.train_loader.min_batch, self.min_train_batch())
        try:
            model, self.method, self.task = build_model(
                cfg, train_set.info, train_set.num_classes, load_weights=load_weights
            )
        except ValueError as e:  # a method option the method itself refuses (head kind, momentum, ...)
            raise ConfigError(str(e)) from None
        self.task.bind(test_set)
        cfg.method.options = resolved_method_options(self.method)
        self.trainer = Trainer(
            model, cfg.optim, len(self.train_loader), task=self.task, device=self.device, engine=cfg.engine
        )
        self.epoch = 0  # completed epochs
        self.history: list[dict[str, Any]] = []
        self.memory: dict[str, Any] = {}
        self.step_times: list[float] = []
        self.saved_epoch: int | None = None  # the epoch of the checkpoint on disk, if any
        self.resumed_at: int | None = None
        self.skipped_steps = 0
        self.tensorboard: TensorBoard | None = None  # opened by ``fit`` on the main process
        if cfg.log.tensorboard:
            tensorboard_writer_class()  # a missing package is refused before the run directory exists
        self.setup()
        if cfg.engine.compile:  # last: after .to(device) and the setup that may copy the model
            self.compile_model()
        # every check is done: only now create (or lock) the run directory
        self.lock: RunLock | None = None
        self.run_dir = self.open_run_dir(run_dir)

    # the trainer's parts, under the names the engine modes and tests use
    @property
    def model(self):
        return self.trainer.model

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return self.trainer.optimizers

    @optimizers.setter
    def optimizers(self, value: list[torch.optim.Optimizer]) -> None:  # ddp wraps them
        self.trainer.optimizers = value

    @property
    def schedule(self):
        return self.trainer.schedule

    @property
    def scalers(self):
        return self.trainer.scalers

    @property
    def autocast(self):
        return self.trainer.autocast

    @property
    def memory_format(self) -> torch.memory_format:
        return self.trainer.memory_format

    def min_train_batch(self) -> int:
        """The smallest training batch kept (batch norm needs 2 values per channel)."""
        return 2

    def setup(self) -> None:
        """What an engine mode adds to the run before the run directory exists (it may refuse)."""

    def compile_model(self) -> None:
        """``engine.compile``: torch.compile each block's body and aux in place (state-dict keys stay)."""
        e = self.cfg.engine
        # detection targets (boxes per image) change shape every batch and its losses are
        # data-dependent (nonzero): dense tasks compile the bodies only
        auxes = not self.task.dense
        if not auxes:
            log.info("engine.compile: task %s is dense, its aux nets and head stay eager", self.task.name)
        compile_blocks(self.model, e.compile_backend, e.compile_mode, auxes=auxes, region=e.compile_region)

    def open_run_dir(self, run_dir: Path | None) -> Path:
        """A fresh run directory, or ``run_dir``; locked, with temp files of a killed save removed."""
        self.created_dir = run_dir is None
        run_dir = run_dir or fresh_run_dir(self.cfg)
        self.lock = RunLock(run_dir).acquire()
        for p in checkpoint.remove_stale_temp(run_dir):
            log.warning("removed %s, left by an interrupted save", p)
        return run_dir

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": to_dict(self.cfg),
            **self.trainer.state_dict(),  # model, optimizers, schedule, scalers
            "rng": checkpoint.rng_state(),
            "epoch": self.epoch,
            "history": self.history,
            "memory": self.memory,
            "step_times": self.step_times,
            "skipped_steps": self.skipped_steps,
            "environment": environment(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trainer.load_state_dict(state)
        checkpoint.set_rng_state(state["rng"])
        self.load_progress(state)

    def load_progress(self, state: dict[str, Any]) -> None:
        """The run's own part of a checkpoint: epoch, history, measurements."""
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])
        self.memory = dict(state["memory"])
        self.step_times = list(state["step_times"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.saved_epoch = self.resumed_at = self.epoch

    # -- training ----------------------------------------------------------------------------
    def measure_memory(self) -> StepMeter | None:
        if not self.cfg.engine.measure_memory or self.memory:
            return None
        return StepMeter(self.model)

    def measure_workspace(self) -> BlockPass | None:
        """Backward's workspace per block (``step_memory.block_workspace``) on one training batch, with the
        RNG and the BN statistics restored. None where a mode cannot run every block here."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            batch = self.trainer.prepare(next(iter(self.train_loader)))
        return block_workspace(self.model, batch, self.autocast, self.device)

    def progress_bar(self, total: int) -> Progress:
        """The epoch's progress: a bar on a terminal, log lines off one (``watch.py``)."""
        return Progress(
            self.epoch + 1,
            self.cfg.optim.epochs,
            total,
            self.quiet,
            self.cfg.log.progress_every_s,
            tensorboard=self.tensorboard,
            first_step=self.schedule.step_count,
        )

    def record_epoch(
        self, stats: dict[str, Any], block_bytes: list[int] | None, meter: StepMeter | None = None
    ) -> None:
        """Keep what the epoch measured (``report.record_measurements``); shared by every engine mode."""
        workspace = None
        if block_bytes and meter is not None:
            try:
                workspace = self.measure_workspace()
            except Exception as e:  # a report must never end a training run (the profiler is torch-private)
                log.warning(
                    "backward's workspace not measured (%s: %s); memory reported without it",
                    type(e).__name__,
                    e,
                )
        record_measurements(self, stats, block_bytes, meter, workspace)

    def train_one_epoch(self) -> dict[str, Any]:
        self.train_loader.set_epoch(self.epoch)
        meter = self.measure_memory()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        with self.progress_bar(len(self.train_loader)) as bar:
            stats = self.train_steps(meter, bar)
        block_bytes = self.gather_epoch(stats, meter)
        stats["epoch_time"] = time.perf_counter() - t0  # until the last rank has finished
        self.record_epoch(stats, block_bytes, meter)
        return stats

    def train_steps(self, meter: StepMeter | None, bar: Progress) -> dict[str, Any]:
        """The epoch's steps (the trainer's; a pipeline rank trains its own blocks)."""
        return self.trainer.train_epoch(self.train_loader, meter, bar)

    def gather_epoch(self, stats: dict[str, Any], meter: StepMeter | None) -> list[int] | None:
        """The epoch's block bytes; a mode whose ranks each saw part of the model merges theirs here."""
        return meter.block_bytes if meter is not None else None

    def fit(self, stop_after: int | None = None) -> dict[str, Any]:
        """Train to ``optim.epochs`` (or only up to epoch ``stop_after``), checkpointing as configured."""
        try:
            return self._fit(stop_after)
        except BaseException:
            self.discard_unstarted()
            raise
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()
                self.tensorboard = None
            if self.lock is not None:
                self.lock.release()

    def _fit(self, stop_after: int | None) -> dict[str, Any]:
        epochs = self.cfg.optim.epochs
        log_start(self.run_dir, self.resumed_at, epochs, self.train_loader)
        self.warn_at_start()
        if self.device.type == "cpu" and self.is_main:
            log.info(self.threads_line)
        if self.is_main:
            (self.run_dir / "config.yaml").write_text(dump_yaml(self.cfg))
            if self.cfg.log.tensorboard:
                self.tensorboard = TensorBoard(self.run_dir)
        last = epochs if stop_after is None else min(stop_after, epochs)
        while self.epoch < last:
            try:
                first_step = self.schedule.step_count
                stats = self.train_one_epoch()
            except NonFiniteLossError as e:
                raise NonFiniteLossError(e.block, e.step, e.value, self.epoch + 1) from None
            metrics = self.evaluate()
            check_metrics(metrics, self.task.main_metric, self.epoch + 1)  # None = undefined, not NaN
            self.epoch += 1
            self.history.append(epoch_row(self.epoch, self.schedule, first_step, stats, metrics))
            if self.tensorboard is not None:
                self.tensorboard.epoch(self.history[-1])
            if self.is_main:
                self.write_metrics()
            log_epoch(self.epoch, self.cfg.optim.epochs, self.task.main_metric, metrics, stats["epoch_time"])
            log_blocks(block_values(metrics, self.task, self.model.num_blocks), block_metric(self.task))
            self.check_divergence()
            if self.epoch % self.cfg.checkpoint_every == 0 or self.epoch == self.cfg.optim.epochs:
                self.save_checkpoint()
        summary = self.summary()
        if self.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def evaluate(self) -> dict[str, float]:
        return self.trainer.evaluate(self.test_loader, blocks=self.cfg.log.block_metrics)

    def save_checkpoint(self) -> None:
        checkpoint.save(self.run_dir / "checkpoint.pt", self.state_dict())
        self.saved_epoch = self.epoch

    def write_metrics(self) -> None:
        write_metrics(self.run_dir / "metrics.csv", self.history)

    def summary(self) -> dict[str, Any]:
        return self.with_divergence(run_summary(self))
