"""A training run: data, model, optimizers, the epoch loop, measurements, run directory, resume."""

from __future__ import annotations

import atexit
import csv
import dataclasses
import json
import logging
import math
import os
import platform
import random
import socket
import statistics
import subprocess
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from locallearn import __version__
from locallearn.build import build_model, check_config, resolved_method_options
from locallearn.config import Config, ConfigError, dump_yaml, from_dict, load_config, to_dict
from locallearn.data import load_datasets
from locallearn.data.imagefolder import make_loader
from locallearn.engine import checkpoint
from locallearn.engine.compile import compile_blocks
from locallearn.engine.errors import DivergedError, NonFiniteLossError
from locallearn.engine.optim import StepSchedule, build_optimizer, group_optimizers
from locallearn.engine.sequential import evaluate, train_epoch
from locallearn.metrics.memory import ActivationMeter

log = logging.getLogger(__name__)


def select_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"engine.device: unknown device {name!r} (auto, cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"engine.device={name!r} but CUDA is not available on this machine")
    return device


def autocast_factory(amp: str, device: torch.device):
    if amp == "none":
        return nullcontext
    if amp not in ("bf16", "fp16"):
        raise ConfigError(f"engine.amp must be none, bf16 or fp16, got {amp!r}")
    if device.type != "cuda":
        raise ConfigError(f"engine.amp={amp} needs a CUDA device (got {device.type})")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return partial(torch.autocast, device_type="cuda", dtype=dtype)


def check_group_steps(cfg: Config) -> None:
    """``engine.group_steps`` is a sequential-engine switch without fp16 loss scaling."""
    if not cfg.engine.group_steps:
        return
    if cfg.engine.mode != "sequential":
        raise ConfigError(f"engine.group_steps=true needs engine.mode=sequential (got {cfg.engine.mode})")
    if cfg.engine.amp == "fp16":
        raise ConfigError(
            "engine.group_steps=true does not support engine.amp=fp16 (one loss scale per block); use bf16"
        )


def git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict[str, str]:
    return {
        "locallearn": __version__,
        "git": git_revision(),
        "torch": str(torch.__version__),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_name(cfg: Config) -> str:
    if cfg.name:
        return cfg.name
    return f"{cfg.data.name}-{cfg.model.backbone}-K{cfg.model.num_blocks}-{cfg.method.name}"


def fresh_run_dir(cfg: Config) -> Path:
    base = Path(cfg.out_dir) / run_name(cfg)
    path, i = base, 1
    while path.exists():
        path = base.with_name(f"{base.name}-{i}")
        i += 1
    try:
        path.mkdir(parents=True)
    except OSError as e:
        raise ConfigError(
            f"out_dir={cfg.out_dir!r}: cannot create the run directory {str(path)!r} ({e.strerror or e})"
        ) from None
    return path


# What ``--resume RUN key=value`` (or ``-c``) may change: nothing that alters shapes, data or the method.
# More epochs extend the cosine schedule: it is recomputed over the new total (README, "Resume").
SAFE_ON_RESUME = (
    "optim.epochs",
    "checkpoint_every",
    "engine.device",
    "engine.threads",
    "engine.measure_memory",
    "engine.dist_timeout_s",
    "engine.compile",  # the same computation, compiled or not
    "engine.compile_backend",
    "engine.compile_mode",
    "engine.compile_region",
    "data.num_workers",
)


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_config(saved: Config, config_file: str | None, overrides: list[str], epochs_done: int) -> Config:
    """The saved config with the user's ``-c`` file and overrides on top, if they change only
    ``SAFE_ON_RESUME`` keys; anything else is refused with one line naming the key."""
    if not config_file and not overrides:
        return saved
    cfg = load_config(config_file, overrides, base=to_dict(saved))
    old, new = _flat(to_dict(saved)), _flat(to_dict(cfg))
    for key in sorted(old.keys() | new.keys()):
        if key not in SAFE_ON_RESUME and old.get(key) != new.get(key):
            raise ConfigError(
                f"--resume cannot change {key} ({old.get(key)!r} -> {new.get(key)!r}): it would not be the "
                f"same run; only {', '.join(SAFE_ON_RESUME)} may change (start a new run for the rest)"
            )
    if cfg.optim.epochs < epochs_done:
        raise ConfigError(
            f"optim.epochs={cfg.optim.epochs}: this run has already trained {epochs_done} epochs"
        )
    return cfg


class RunLock:
    """``RUN/.lock`` holding ``pid host``: one process per run directory. A lock whose process is
    gone (same host) is stale and taken over; the lock is released at the end of ``fit`` or exit."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / ".lock"
        self.token = f"{os.getpid()} {socket.gethostname()}"
        self.held = False

    def _holder_alive(self, text: str) -> bool:
        pid, _, host = text.strip().partition(" ")
        if not pid.isdigit():
            return False  # a half-written lock: its writer died between create and write
        if host != socket.gethostname():
            return True  # cannot tell: another machine's process
        if int(pid) == os.getpid():
            return False  # this process (an earlier Run object on the same directory)
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def acquire(self) -> RunLock:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                try:
                    holder = self.path.read_text()
                except FileNotFoundError:
                    continue
                if self._holder_alive(holder):
                    pid, _, host = holder.strip().partition(" ")
                    raise ConfigError(
                        f"run directory {str(self.path.parent)!r} is in use by process {pid} on {host} "
                        f"(lock file {str(self.path)!r}; delete it if that process is gone)"
                    ) from None
                self.path.unlink(missing_ok=True)  # stale
                continue
            except OSError as e:
                raise ConfigError(
                    f"cannot write into the run directory {str(self.path.parent)!r} ({e.strerror})"
                ) from None
            with os.fdopen(fd, "w") as f:
                f.write(self.token + "\n")
            self.held = True
            atexit.register(self.release)
            return self
        raise ConfigError(f"could not take the lock {str(self.path)!r}; another process keeps taking it")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            if self.path.read_text().strip() == self.token:
                self.path.unlink()
        except OSError:
            pass


class Run:
    """Everything one training run holds; ``fit`` trains to the end, checkpointing every epoch."""

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
        if cfg.engine.threads:
            torch.set_num_threads(cfg.engine.threads)
        seed_everything(cfg.seed)
        self.device = select_device(cfg.engine.device)
        self.autocast = autocast_factory(cfg.engine.amp, self.device)
        train_set, test_set = load_datasets(cfg.data.name, cfg.data.root, cfg.data.download)
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
            self.model, self.method, self.task = build_model(
                cfg, train_set.info, train_set.num_classes, load_weights=load_weights
            )
        except ValueError as e:  # a method option the method itself refuses (head kind, momentum, ...)
            raise ConfigError(str(e)) from None
        self.task.bind(test_set)
        cfg.method.options = resolved_method_options(self.method)
        self.memory_format = torch.channels_last if cfg.engine.channels_last else torch.contiguous_format
        self.model.to(self.device, memory_format=self.memory_format)
        self.optimizers = [
            build_optimizer(self.model.block_parameters(k), cfg.optim) for k in range(self.model.num_blocks)
        ]
        self.schedule = StepSchedule(self.optimizers, cfg.optim, len(self.train_loader))
        self.grouped = group_optimizers(self.optimizers, cfg.engine.group_steps)
        fp16 = cfg.engine.amp == "fp16"
        self.scalers = [torch.amp.GradScaler("cuda") for _ in self.optimizers] if fp16 else None
        self.epoch = 0  # completed epochs
        self.history: list[dict[str, Any]] = []
        self.memory: dict[str, Any] = {}
        self.step_times: list[float] = []
        self.saved_epoch: int | None = None  # the epoch of the checkpoint on disk, if any
        self.resumed_at: int | None = None
        self.skipped_steps = 0
        self.setup()
        if cfg.engine.compile:  # last: after .to(device) and the setup that may copy the model
            self.compile_model()
        # every check is done: only now create (or lock) the run directory
        self.lock: RunLock | None = None
        self.run_dir = self.open_run_dir(run_dir)

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
        run_dir = run_dir or fresh_run_dir(self.cfg)
        self.lock = RunLock(run_dir).acquire()
        for p in checkpoint.remove_stale_temp(run_dir):
            log.warning("removed %s, left by an interrupted save", p)
        return run_dir

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": to_dict(self.cfg),
            "model": self.model.state_dict(),
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "schedule": self.schedule.state_dict(),
            "scalers": [s.state_dict() for s in self.scalers] if self.scalers else None,
            "rng": checkpoint.rng_state(),
            "epoch": self.epoch,
            "history": self.history,
            "memory": self.memory,
            "step_times": self.step_times,
            "skipped_steps": self.skipped_steps,
            "environment": environment(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        checkpoint.load_model_state(self.model, state["model"])
        for opt, s in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(s)
        self.schedule.load_state_dict(state["schedule"])
        if self.scalers and state.get("scalers"):
            for scaler, s in zip(self.scalers, state["scalers"]):
                scaler.load_state_dict(s)
        checkpoint.set_rng_state(state["rng"])
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])
        self.memory = dict(state["memory"])
        self.step_times = list(state["step_times"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.saved_epoch = self.resumed_at = self.epoch

    @classmethod
    def resume(
        cls, path: str | Path, quiet: bool = False, config_file: str | None = None, overrides: list[str] = ()
    ) -> Run:
        path = Path(path)
        ckpt = path / "checkpoint.pt" if path.is_dir() else path
        state = checkpoint.load(ckpt)
        refuse_merged(state, ckpt)
        cfg = resume_config(config_from_checkpoint(state), config_file, list(overrides), int(state["epoch"]))
        run = cls(cfg, run_dir=ckpt.parent, quiet=quiet, load_weights=False)
        run.load_state_dict(state)
        return run

    # -- training ----------------------------------------------------------------------------
    def measure_memory(self) -> ActivationMeter | None:
        if not self.cfg.engine.measure_memory or self.memory:
            return None
        return ActivationMeter(self.model)

    def progress_bar(self, total: int) -> tqdm:
        return tqdm(
            total=total,
            desc=f"epoch {self.epoch + 1}/{self.cfg.optim.epochs}",
            leave=False,
            disable=None if not self.quiet else True,
            dynamic_ncols=True,
        )

    def record_epoch(self, stats: dict[str, Any], block_bytes: list[int] | None) -> None:
        """Keep what the first epoch measured (activation bytes per block, CUDA peaks) and the step
        times; shared by every engine mode."""
        if block_bytes:
            batch = min(self.cfg.data.batch_size, len(self.train_loader.data))
            self.memory = {
                "peak_activation_bytes": max(block_bytes),
                "batch_size": batch,
                "activation_bytes_per_image": max(block_bytes) / batch,
                "block_activation_bytes": list(block_bytes),
            }
        if self.device.type == "cuda":
            self.memory["cuda_max_allocated"] = torch.cuda.max_memory_allocated(self.device)
            self.memory["cuda_max_reserved"] = torch.cuda.max_memory_reserved(self.device)
        # the first steps include one-off costs (allocator, memory meter): keep the rest for the median
        times = stats["step_times"]
        self.step_times += times[1:] if len(times) > 1 else times

    def train_one_epoch(self) -> dict[str, Any]:
        self.train_loader.set_epoch(self.epoch)
        meter = self.measure_memory()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        with self.progress_bar(len(self.train_loader)) as bar:
            stats = train_epoch(
                self.model,
                self.train_loader,
                self.optimizers,
                self.schedule,
                self.device,
                self.scalers,
                self.autocast,
                meter,
                self.memory_format,
                bar,
                self.grouped,
            )
        stats["epoch_time"] = time.perf_counter() - t0
        self.record_epoch(stats, meter.block_bytes if meter is not None else None)
        return stats

    def fit(self, stop_after: int | None = None) -> dict[str, Any]:
        """Train to ``optim.epochs`` (or only up to epoch ``stop_after``), checkpointing as configured."""
        try:
            return self._fit(stop_after)
        finally:
            if self.lock is not None:
                self.lock.release()

    def _fit(self, stop_after: int | None) -> dict[str, Any]:
        epochs = self.cfg.optim.epochs
        if self.resumed_at is not None:
            log.info("resumed %s at epoch %d of %d", self.run_dir, self.resumed_at, epochs)
            if self.resumed_at >= epochs:
                log.info(
                    "this run already finished its %d epochs: nothing to train (resume with "
                    "optim.epochs=N to train further)",
                    epochs,
                )
        if self.train_loader.dropped:
            log.info(
                "each epoch drops the last training batch (%d image(s): batch norm needs at least %d); "
                "every test image is kept",
                self.train_loader.dropped,
                self.train_loader.min_batch,
            )
        if self.is_main:
            (self.run_dir / "config.yaml").write_text(dump_yaml(self.cfg))
        last = epochs if stop_after is None else min(stop_after, epochs)
        while self.epoch < last:
            try:
                stats = self.train_one_epoch()
            except NonFiniteLossError as e:
                raise NonFiniteLossError(e.block, e.step, e.value, self.epoch + 1) from None
            metrics = self.evaluate()
            if not all(math.isfinite(v) for v in metrics.values()):
                raise DivergedError(
                    f"training diverged: the test metrics after epoch {self.epoch + 1} are {metrics}; "
                    "lower optim.lr. The last good checkpoint is left as it was"
                )
            self.epoch += 1
            row = {
                "epoch": self.epoch,
                "lr": self.schedule.lr,
                "train_loss": stats["block_losses"][-1],
                "train_local_loss_mean": float(np.mean(stats["block_losses"])),
                **{f"test_{k}": v for k, v in metrics.items()},
                "epoch_time_s": stats["epoch_time"],
                "images_per_s": stats["images"] / stats["epoch_time"],
            }
            self.history.append(row)
            if self.is_main:
                self.write_metrics()
            main = self.task.main_metric
            log.info(
                "epoch %d/%d  test %s %.2f  loss %.4f  (%.1fs)",
                self.epoch,
                self.cfg.optim.epochs,
                main,
                metrics[main],
                metrics["loss"],
                stats["epoch_time"],
            )
            if self.epoch % self.cfg.checkpoint_every == 0 or self.epoch == self.cfg.optim.epochs:
                self.save_checkpoint()
        summary = self.summary()
        if self.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def evaluate(self) -> dict[str, float]:
        return evaluate(
            self.model, self.test_loader, self.task, self.device, self.autocast, self.memory_format
        )

    def save_checkpoint(self) -> None:
        checkpoint.save(self.run_dir / "checkpoint.pt", self.state_dict())
        self.saved_epoch = self.epoch

    def interrupted_message(self) -> str:
        """What Ctrl-C leaves behind, said truthfully."""
        if self.saved_epoch is None:
            return f"interrupted before the first checkpoint: nothing to resume in {self.run_dir}"
        return (
            f"interrupted; epoch {self.saved_epoch} is saved in {self.run_dir} "
            f"(continue with: locallearn train --resume {self.run_dir})"
        )

    def write_metrics(self) -> None:
        path = self.run_dir / "metrics.csv"
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(self.history[0]))
            writer.writeheader()
            for row in self.history:
                writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        os.replace(tmp, path)

    def summary(self) -> dict[str, Any]:
        main = f"test_{self.task.main_metric}"
        values = [row[main] for row in self.history]
        step = statistics.median(self.step_times) if self.step_times else float("nan")
        return {
            "run_dir": str(self.run_dir),
            "method": self.cfg.method.name,
            "backbone": self.cfg.model.backbone,
            "num_blocks": self.model.num_blocks,
            "cuts": self.model.cuts,
            "dataset": self.cfg.data.name,
            "train_images": len(self.train_loader.data),
            "epochs": self.epoch,
            "metric": self.task.main_metric,
            "final": values[-1] if values else None,
            "best": self.task.best(values),  # max, or min for a lower-is-better main metric
            "final_test_error": 100 - values[-1] if values and self.task.main_metric == "top1" else None,
            "memory": self.memory,
            "median_step_time_s": step,
            "images_per_s": self.cfg.data.batch_size / step if self.step_times else None,
            "time_per_epoch_s": float(np.mean([r["epoch_time_s"] for r in self.history]))
            if self.history
            else None,
            "params": self.model.parameter_counts(),
            "device": str(self.device),
            "skipped_steps": self.skipped_steps,
            "seed": self.cfg.seed,
            "environment": environment(),
        }


def refuse_merged(state: dict[str, Any], path: Path) -> None:
    if state.get("merged_from"):
        raise checkpoint.CheckpointError(
            f"{str(path)!r} is the merged copy of a {state['merged_from']} run, for eval and export; "
            "resume the run directory itself (its per-rank checkpoints)"
        )


def config_from_checkpoint(state: dict[str, Any]) -> Config:
    try:
        return from_dict(Config, migrate_config(state["config"]))
    except (KeyError, ConfigError) as e:
        raise checkpoint.CheckpointError(f"checkpoint holds no usable config ({e})") from None


def migrate_config(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config in today's keys: ``task.segmentation.pretrained`` became ``model.pretrained``."""
    segmentation = (saved.get("task") or {}).get("segmentation") or {}
    if "pretrained" not in segmentation:
        return saved
    saved = {**saved, "task": {**saved["task"], "segmentation": dict(segmentation)}}
    path = saved["task"]["segmentation"].pop("pretrained")
    saved["model"] = {**(saved.get("model") or {}), "pretrained": path}
    return saved


def comparison_config(cfg: Config, method: str) -> Config:
    """The same run with another method on the same data, schedule and seed (bp: K = 1)."""
    other = dataclasses.replace(
        cfg, method=dataclasses.replace(cfg.method, name=method, options={}), compare=[]
    )
    if method == "bp":
        other.model = dataclasses.replace(cfg.model, num_blocks=1, split="even", cuts=None)
    # named after what it trains (data, backbone, K, method), or after the user's name for the run
    other.name = f"{cfg.name}-{method}" if cfg.name else None
    return other


def evaluate_checkpoint(path: str | Path, device: str = "auto") -> dict[str, Any]:
    ckpt = Path(path) / "checkpoint.pt" if Path(path).is_dir() else Path(path)
    state = checkpoint.load(ckpt)
    cfg = config_from_checkpoint(state)
    cfg.engine.device = device
    cfg.engine.measure_memory = False
    _, test_set = load_datasets(cfg.data.name, cfg.data.root, cfg.data.download)
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


def make_run(cfg: Config, run_dir: Path | None = None, quiet: bool = False) -> Run:
    """The run for ``cfg.engine.mode``: sequential here, pipeline / ddp (under torchrun) in ``parallel``."""
    check_group_steps(cfg)  # before any process group starts
    if cfg.engine.mode == "sequential":
        return Run(cfg, run_dir, quiet)
    from locallearn.parallel import parallel_run

    return parallel_run(cfg, run_dir, quiet)


def resume_run(
    path: str | Path, quiet: bool = False, config_file: str | None = None, overrides: list[str] = ()
) -> Run:
    """Continue a run of any mode from its directory (or a checkpoint file); ``config_file`` and
    ``overrides`` may change only ``SAFE_ON_RESUME`` keys (more epochs, cadence, device, threads)."""
    from locallearn.parallel import resume_parallel

    return resume_parallel(path, quiet, config_file, overrides) or Run.resume(
        path, quiet, config_file, overrides
    )
