"""Activation memory: bytes of tensors saved for backward, per block and per training step.

``torch.autograd.graph.saved_tensors_hooks`` sees every tensor autograd keeps for the backward pass.
We count each storage once (views and tensors saved by several ops share it) and leave out parameters
and buffers. Each block's graph is freed by its own ``backward()`` before the next block runs, so the
peak of a sequential local step is the largest block's count; end-to-end (``bp``) is one block. The
count is device-independent and linear in the batch size, so it extrapolates exactly from a small
CPU batch. On CUDA the runner also reports ``max_memory_allocated`` / ``max_memory_reserved``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def saved_storages(exclude: set[int]) -> Iterator[dict[int, int]]:
    """Within the block, every storage autograd saves for backward, once each: ``{data_ptr: nbytes}``,
    leaving out the storages in ``exclude`` (parameters and buffers)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. nested, meta)
            return t
        ptr = storage.data_ptr()
        if ptr not in exclude:
            seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


class ActivationMeter:
    def __init__(self, model: nn.Module) -> None:
        self.exclude = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        self.block_bytes: list[int] = []

    @contextmanager
    def track(self, bank=None) -> Iterator[None]:
        """Count what one block's forward (body + aux) saves for its backward, plus what the batch's
        feature ``bank`` holds once the block has run (its entries stay alive for later blocks)."""
        with saved_storages(self.exclude) as seen:
            yield
        for _, t in bank.items() if bank is not None else ():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        self.block_bytes.append(sum(seen.values()))

    def reset(self) -> None:
        self.block_bytes = []

    @property
    def peak(self) -> int:
        return max(self.block_bytes, default=0)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"
