"""Launch small pipeline / ddp jobs as local processes (gloo, one thread each) for the engine tests."""

from __future__ import annotations

import os
import socket
import sys
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

from locallearn.config import Config, from_dict, to_dict

# Ranks fork from a server that has imported torch and locallearn once (a spawn costs seconds per rank
# on a loaded machine) and has never run an OpenMP region (forking after one can hang).
CTX = mp.get_context("forkserver")
CTX.set_forkserver_preload(["torch", "locallearn.run.launch", "dist_helpers"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_config(out_dir: Path, **engine) -> Config:
    """resnet20 on 8x8 digits, K=4, 4 steps per epoch."""
    return from_dict(
        Config,
        {
            "out_dir": str(out_dir),
            "name": "run",
            "data": {"name": "digits", "train_subset": 128, "test_subset": 64, "batch_size": 32},
            "model": {"backbone": "resnet20", "num_blocks": 4},
            "method": {"name": "infopro"},
            "optim": {"lr": 0.05, "epochs": 2, "warmup_epochs": 0.5},
            "engine": {"device": "cpu", "threads": 1, "measure_memory": False, **engine},
        },
    )


def _worker(rank: int, world: int, port: int, cfg: dict | None, resume: str | None, stop_after, errors: str):
    _env(rank, world, port)
    from locallearn.engine.distributed import DistributedError
    from locallearn.run.launch import make_run, resume_run

    try:
        run = resume_run(resume, quiet=True) if resume else make_run(from_dict(Config, cfg), quiet=True)
        run.fit(stop_after)
        torch.save(run.model.state_dict(), Path(errors, f"state.rank{rank}.pt"))
    except DistributedError as e:
        Path(errors, f"error.rank{rank}.txt").write_text(str(e))
        sys.exit(3)
    except BaseException:
        Path(errors, f"error.rank{rank}.txt").write_text(traceback.format_exc())
        raise


def start(world: int, errors: Path, cfg: Config | None = None, resume: Path | None = None, stop_after=None):
    """Start ``world`` ranks; returns the processes (``join`` them)."""
    port = free_port()
    args = (to_dict(cfg) if cfg else None, str(resume) if resume else None, stop_after, str(errors))
    procs = [CTX.Process(target=_worker, args=(r, world, port, *args), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    return procs


def launch(world: int, errors: Path, cfg: Config | None = None, resume: Path | None = None, stop_after=None):
    """Run ``world`` ranks to the end; fail with the ranks' errors if any exits non-zero."""
    procs = start(world, errors, cfg, resume, stop_after)
    for p in procs:
        p.join(timeout=120)
    codes = [p.exitcode for p in procs]
    if codes != [0] * world:
        msgs = [f.read_text() for f in sorted(errors.glob("error.rank*.txt"))]
        raise AssertionError(f"exit codes {codes}\n" + "\n".join(msgs))


def _env(rank: int, world: int, port: int) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)


def run_function(world: int, fn, *args) -> None:
    """``fn(ctx, *args)`` on ``world`` ranks of a fresh gloo group; raises if any rank fails."""
    port = free_port()
    procs = [CTX.Process(target=_call, args=(r, world, port, fn, *args), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * world


def _call(rank: int, world: int, port: int, fn, *args) -> None:
    _env(rank, world, port)
    from locallearn.engine import distributed

    ctx = distributed.init("ddp", "cpu", 30.0)
    try:
        fn(ctx, *args)
    finally:
        distributed.shutdown()


class RandomBatches:
    """``count`` global batches of ``size`` random 1-channel 8x8 images with 10 classes (seed 1), a loader
    stand-in for the data-parallel and mesh tests (their shards are uneven when ``size`` does not divide)."""

    def __init__(self, count: int, size: int) -> None:
        self.count, self.batch_size, self.data = count, size, range(count * size)

    def __iter__(self):
        from locallearn.types import Batch

        gen = torch.Generator().manual_seed(1)
        for _ in range(self.count):
            x = torch.randn(self.batch_size, 1, 8, 8, generator=gen)
            yield Batch(x, torch.randint(0, 10, (self.batch_size,), generator=gen))

    def __len__(self) -> int:
        return self.count

    def set_epoch(self, epoch: int) -> None:
        pass
