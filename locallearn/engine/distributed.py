"""Process-group plumbing shared by the pipeline and DDP engines: launch, device, timeouts, errors.

Jobs are launched by ``torchrun`` (or anything that sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``). Every rank talks over ``torch.distributed``: gloo for CPU
tensors, NCCL for CUDA tensors. The process group gets ``engine.dist_timeout_s`` as its timeout, so
a peer that hangs makes the waiting rank's receive / collective fail after that long; a peer that dies
closes its connections and the waiting rank fails at once. Either way the failure becomes a
``DistributedError`` naming the peer, the CLI prints it and exits non-zero, and ``torchrun`` then
stops the remaining workers: no silent hang.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


class DistributedError(RuntimeError):
    """A rank died, hung or disagrees with the others; the message names it."""


@dataclass(frozen=True)
class Context:
    """A process group seen from one rank. The job's own (``init``) spans every rank; ``subgroup``
    makes one over some of them (a stage's replicas, ``engine/mesh.py``), where ``rank`` and ``world``
    count within the group and ``members`` are the group's ranks in the job (errors name those)."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    timeout_s: float
    group: Any = None  # a torch.distributed group; None = every rank
    members: tuple[int, ...] | None = None  # the group's ranks in the job, in group order

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ranks(self) -> tuple[int, ...]:
        return self.members if self.members is not None else tuple(range(self.world))

    def subgroup(self, group: Any, members: list[int]) -> Context:
        """This rank's view of ``group`` (made by ``dist.new_group`` over ``members``, job ranks)."""
        me = self.ranks[self.rank]
        return dataclasses.replace(
            self, rank=members.index(me), world=len(members), group=group, members=tuple(members)
        )

    def peer(self, rank: int, what: str):
        """Context manager: turn a failed send / receive with ``rank`` into a ``DistributedError``."""
        return _named(f"rank {rank}", what, self.timeout_s)

    def collective(self, what: str):
        """Context manager: the same for a collective over every rank."""
        me = self.ranks[self.rank]
        others = [r for r in self.ranks if r != me]
        if len(others) == 1:
            return _named(f"rank {others[0]}", what, self.timeout_s)
        return _named(lambda: _missing_ranks(self.rank, others), what, self.timeout_s)


HEARTBEAT_S = 0.5


def _heartbeat(rank: int, stop: threading.Event) -> None:
    """Counts up ``locallearn/beat/RANK`` in the rendezvous store while this process runs (a thread
    runs while the main thread waits inside gloo / NCCL), so survivors can tell who stopped."""
    try:
        store = dist.distributed_c10d._get_default_store()
        while not stop.wait(HEARTBEAT_S):
            store.add(f"locallearn/beat/{rank}", 1)
    except Exception:  # the store is gone (shutdown, or the rank hosting it died)
        return


def _missing_ranks(rank: int, others: list[int]) -> str:
    """After a failed collective: the ranks whose heartbeat stands still are the dead or hung ones."""
    try:
        store = dist.distributed_c10d._get_default_store()
        before = [store.add(f"locallearn/beat/{r}", 0) for r in others]
        time.sleep(4 * HEARTBEAT_S)
        after = [store.add(f"locallearn/beat/{r}", 0) for r in others]
    except Exception:  # the store went with the dead rank (it hosted it): say what we know
        return f"one of ranks {others}"
    dead = [r for r, b, a in zip(others, before, after) if a == b]
    if not dead:
        return f"one of ranks {others}"
    return f"rank {dead[0]}" if len(dead) == 1 else f"ranks {dead}"


def launched() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def pick_device(name: str, local_rank: int) -> torch.device:
    """``auto``/``cuda`` -> ``cuda:LOCAL_RANK`` when CUDA is there (``auto`` falls back to the CPU)."""
    if name in ("auto", "cuda"):
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if name == "cuda":
            raise DistributedError("engine.device=cuda but CUDA is not available on this machine")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank)
    return device


def init(mode: str, device_name: str, timeout_s: float) -> Context:
    """Join (or reuse) the default process group of a ``torchrun`` job."""
    if not launched():
        raise DistributedError(
            f"engine.mode={mode} runs one process per rank: launch it with "
            f"`torchrun --nproc-per-node P -m locallearn train ... engine.mode={mode}`"
        )
    if timeout_s <= 0:
        raise DistributedError(f"engine.dist_timeout_s must be > 0, got {timeout_s}")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = pick_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        if world > 2:  # with one peer there is nobody else to name
            _BEAT.clear()
            threading.Thread(target=_heartbeat, args=(rank, _BEAT), daemon=True).start()
    return Context(rank, world, local_rank, device, timeout_s)


_BEAT = threading.Event()  # set: the heartbeat thread stops


def shutdown() -> None:
    _BEAT.set()
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def _named(who, what: str, timeout_s: float) -> Iterator[None]:
    """``who``: the peer's name, or a function that finds it out after the failure."""
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as e:  # gloo / NCCL report timeouts and closed connections as RuntimeError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        who = who() if callable(who) else who
        raise DistributedError(
            f"lost {who} while {what}: it died, hung or was stopped (its connection closed, or no answer "
            f"within engine.dist_timeout_s={timeout_s:g}s). Underlying error: {first[:300]}"
        ) from None


def broadcast_object(ctx: Context, obj, src: int, what: str):
    """``obj`` from rank ``src`` (counted in ``ctx``'s group) on every rank of the group."""
    box = [obj if ctx.rank == src else None]
    with ctx.collective(what):
        dist.broadcast_object_list(box, src=ctx.ranks[src], group=ctx.group)
    return box[0]


def all_gather_object(ctx: Context, obj, what: str) -> list:
    out: list = [None] * ctx.world
    with ctx.collective(what):
        dist.all_gather_object(out, obj, group=ctx.group)
    return out
