"""One training run of the evidence kit's accuracy part, in its own process, with the data on the device.

The whole data set is held on the device as uint8; each step indexes a batch, crops, flips and normalises it
there, so no host data loading happens in the step (the ten runs share one GPU; a host loader per process would
compete for the CPU and the copy engine). The parent talks to the worker through two queues: the worker says
``ready`` once its model is built, times a few steps when told ``calibrate`` (all runs at once, so the time includes
the others' contention), then trains for the number of epochs the parent sends, stopping cleanly at the deadline.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from locallearn.bench.common import method_config
from locallearn.build import build_model
from locallearn.engine.optim import StepSchedule, build_optimizer, group_optimizers
from locallearn.engine.sequential import sync_device, train_step
from locallearn.types import Batch, InputInfo

log = logging.getLogger(__name__)


def save_data(dataset: str, root: str, train_subset: int | None, test_subset: int | None, path: str) -> dict:
    """Read the data set once (in the parent) and save the tensors every run loads, so that ten runs do not
    each decompress it; plain tensors and numbers, loadable with ``weights_only=True``."""
    from locallearn.data import DATASETS

    train, test = DATASETS[dataset](root, False)
    train, test = train.subset(train_subset), test.subset(test_subset)
    aug = train.augment
    blob = {"train_x": train.images, "train_y": train.labels, "test_x": test.images, "test_y": test.labels,
            "mean": list(train.mean), "std": list(train.std), "pad": aug.pad, "pad_mode": aug.pad_mode,
            "flip": aug.flip}  # fmt: skip
    torch.save(blob, path)
    return {"train_images": len(train), "test_images": len(test)}


class DeviceData:
    """The saved data set (``save_data``) on ``device``: batches are cut, augmented and normalised there, from
    a generator on the same device."""

    def __init__(self, path: str, device: torch.device) -> None:
        blob = torch.load(path, weights_only=True)
        self.device = device
        self.x, self.y = blob["train_x"].to(device), blob["train_y"].to(device)
        self.test_x, self.test_y = blob["test_x"].to(device), blob["test_y"].to(device)
        self.mean = torch.tensor(blob["mean"], device=device).view(-1, 1, 1)
        self.std = torch.tensor(blob["std"], device=device).view(-1, 1, 1)
        self.pad, self.pad_mode, self.flip = blob["pad"], blob["pad_mode"], blob["flip"]
        self.info = InputInfo(self.x.shape[1], self.x.shape[2], tuple(blob["mean"]), tuple(blob["std"]))

    def __len__(self) -> int:
        return len(self.y)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float().div_(255) - self.mean) / self.std

    def batch(self, idx: torch.Tensor, gen: torch.Generator) -> Batch:
        """The loader's augmentation (pad + random crop, flip; ``data/loader.py``) on the device."""
        x = self.x[idx].float().div_(255)
        n, c, h, w = x.shape
        if self.pad:
            p = self.pad
            xp = F.pad(x, (p, p, p, p), mode=self.pad_mode)
            dy = torch.randint(0, 2 * p + 1, (n,), generator=gen, device=self.device)
            dx = torch.randint(0, 2 * p + 1, (n,), generator=gen, device=self.device)
            rows = (dy[:, None] + torch.arange(h, device=self.device))[:, None, :, None]
            cols = (dx[:, None] + torch.arange(w, device=self.device))[:, None, None, :]
            batch_i = torch.arange(n, device=self.device)[:, None, None, None]
            chan_i = torch.arange(c, device=self.device)[None, :, None, None]
            x = xp[batch_i, chan_i, rows, cols]
        if self.flip:
            flip = torch.rand(n, generator=gen, device=self.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return Batch((x - self.mean) / self.std, self.y[idx], self.mean, self.std)

    @torch.no_grad()
    def test_error(self, model, chunk: int = 1000) -> float:
        """Percent of test images misclassified by backbone + head (eval mode)."""
        model.eval()
        wrong = torch.zeros((), dtype=torch.int64, device=self.device)
        for start in range(0, len(self.test_y), chunk):
            logits = model(self.normalise(self.test_x[start : start + chunk]))
            wrong += (logits.argmax(1) != self.test_y[start : start + chunk]).sum()
        model.train()
        return 100.0 * wrong.item() / len(self.test_y)


@dataclass
class Trainer:
    model: Any
    optimizers: list
    grouped: Any
    schedule: StepSchedule
    batch_size: int
    steps_per_epoch: int

    def step(self, batch: Batch) -> torch.Tensor:
        outs = train_step(self.model, batch, self.optimizers, grouped=self.grouped)
        self.schedule.step()
        return outs[-1]["loss"].detach()


def make_trainer(spec: dict[str, Any], data: DeviceData, epochs: int) -> Trainer:
    """The run's model, one optimizer per block and the cosine schedule over ``epochs``; seeded, so that
    the calibration model and the trained one start from the same weights."""
    steps = len(data) // spec["batch_size"]  # the last partial batch is dropped: one shape, one cuDNN plan
    warmup = min(spec["warmup_epochs"], epochs / 4)
    overrides = [*spec["overrides"], f"optim.lr={spec['lr']}", f"optim.epochs={epochs}"]
    overrides += [f"optim.warmup_epochs={warmup}", f"seed={spec['seed']}"]
    cfg = method_config(spec["backbone"], spec["k"], spec["method"], overrides)
    torch.manual_seed(spec["seed"])
    model, _, _ = build_model(cfg, data.info, 10)
    model.to(data.device).train()
    opts = [build_optimizer(model.block_parameters(k), cfg.optim) for k in range(model.num_blocks)]
    grouped = group_optimizers(opts, cfg.engine.group_steps)
    return Trainer(model, opts, grouped, StepSchedule(opts, cfg.optim, steps), spec["batch_size"], steps)


def calibrate(
    trainer: Trainer, data: DeviceData, warmup_s: float, measure_s: float, seed: int
) -> tuple[float, float]:
    """Seconds per training step and per test pass. Steps run for a fixed time (not a fixed count), so that
    every run is timed while all the others are stepping too: the slowest run's time is then the one it will
    see in training. At least one step in each phase."""
    gen = torch.Generator(device=data.device).manual_seed(10_000 + seed)

    def steps_for(seconds: float) -> int:
        t0, n = time.perf_counter(), 0
        while n == 0 or time.perf_counter() - t0 < seconds:
            idx = torch.randint(0, len(data), (trainer.batch_size,), generator=gen, device=data.device)
            trainer.step(data.batch(idx, gen))
            n += 1
        sync_device(data.device)
        return n

    steps_for(warmup_s)
    t0 = time.perf_counter()
    n = steps_for(measure_s)
    step_s = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    data.test_error(trainer.model)
    return step_s, time.perf_counter() - t0


def train(
    trainer: Trainer, data: DeviceData, epochs: int, deadline: float, seed: int, report
) -> dict[str, Any]:
    """``epochs`` epochs, a test pass after each; at ``deadline`` (``time.time()``) the run stops after the
    current step and still tests, so the record says how far it got. ``report(dict)`` gets every epoch."""
    gen = torch.Generator(device=data.device).manual_seed(seed)
    t_start = time.perf_counter()
    steps_done, status = 0, "finished"
    for epoch in range(epochs):
        perm = torch.randperm(len(data), generator=gen, device=data.device)
        loss_sum = torch.zeros((), device=data.device)
        done = 0
        for i in range(trainer.steps_per_epoch):
            if time.time() >= deadline:
                status = "stopped at budget"
                break
            idx = perm[i * trainer.batch_size : (i + 1) * trainer.batch_size]
            loss_sum += trainer.step(data.batch(idx, gen))
            done += 1
        steps_done += done
        loss = loss_sum.item() / done if done else math.nan
        if done and not math.isfinite(loss):
            status = "diverged"
        error = data.test_error(trainer.model)
        report(
            {
                "epoch": round(epoch + done / trainer.steps_per_epoch, 4),
                "test_error": error,
                "train_loss": loss,
                "lr": trainer.schedule.lr,
                "elapsed_s": time.perf_counter() - t_start,
            }
        )
        if status != "finished":
            break
    return {"status": status, "steps": steps_done, "epochs_done": steps_done / trainer.steps_per_epoch}


def exit_with_parent() -> None:
    """End this process when the process that started it is gone (killed before it could end its children),
    so that no orphan keeps the device or the CPU busy."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(2.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def worker(spec: dict[str, Any], inbox, outbox) -> None:
    """Process entry point (``multiprocessing`` spawn): messages to the parent are dicts with ``run`` and
    ``kind`` (ready | calibrated | epoch | done | error)."""
    run = spec["run"]

    def say(kind: str, **fields) -> None:
        outbox.put({"run": run, "kind": kind, **fields})

    exit_with_parent()
    try:
        if spec.get("log_file"):
            handler = logging.FileHandler(spec["log_file"])
            handler.setFormatter(logging.Formatter(f"%(asctime)s [{run}] %(name)s: %(message)s"))
            logging.getLogger("locallearn").addHandler(handler)
            logging.getLogger("locallearn").setLevel(logging.INFO)
        torch.set_num_threads(spec["threads"])
        device = torch.device(spec["device"])
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        data = DeviceData(spec["data_file"], device)
        trainer = make_trainer(spec, data, 1)
        say("ready", steps_per_epoch=trainer.steps_per_epoch)
        if inbox.get(timeout=spec["wait_s"]) != "calibrate":
            return
        step_s, test_s = calibrate(trainer, data, spec["calib_warmup_s"], spec["calib_s"], spec["seed"])
        say("calibrated", step_s=step_s, test_s=test_s)
        plan = inbox.get(timeout=spec["wait_s"])
        if not isinstance(plan, dict):
            return
        del trainer
        trainer = make_trainer(spec, data, plan["epochs"])
        result = train(
            trainer, data, plan["epochs"], plan["deadline"], spec["seed"], lambda r: say("epoch", **r)
        )
        say("done", **result)
    except queue.Empty:
        log.warning("%s: the parent sent nothing in time; exiting", run)
    except Exception as e:  # the parent records it; the other runs go on
        log.error("%s failed:\n%s", run, traceback.format_exc())
        say("error", error=f"{type(e).__name__}: {e}")
