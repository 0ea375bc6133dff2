"""The whole of gradient isolation. The only place that calls .detach(), .backward() and .step()."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from locallearn.types import Batch


def local_step(
    body: nn.Module,
    aux: nn.Module,
    h: torch.Tensor,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None = None,
    autocast: AbstractContextManager | None = None,
    track: AbstractContextManager | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Train one block on its detached input; return its detached output and the aux's outputs."""
    with track or nullcontext(), autocast or nullcontext():
        h = body(h.detach())  # no gradient ever leaves the block
        out = aux(h, batch)  # the last block's aux is the task head + task loss
    loss = out["loss"]
    if loss.requires_grad:  # a block whose loss weights are all 0 has nothing to learn this step
        (scaler.scale(loss) if scaler is not None else loss).backward()  # frees this block's graph
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return h.detach(), out
