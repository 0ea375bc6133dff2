"""The whole of gradient isolation. The only place that calls .detach(), .backward() and .step()."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

from locallearn.engine.optim import GroupedOptimizer
from locallearn.types import Batch


@dataclass
class Cascade:
    """What a window-2 step needs of block k-1: its body, its cached detached input, its optimizer
    (which steps only after block k's loss has reached it; None: the engine steps it later, grouped)."""

    body: nn.Module
    h: torch.Tensor
    optimizer: torch.optim.Optimizer | None


def local_step(
    body: nn.Module,
    aux: nn.Module,
    h: torch.Tensor,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None = None,
    autocast: AbstractContextManager | None = None,
    track: AbstractContextManager | None = None,
    cascade: Cascade | None = None,
    defer_step: bool = False,
    clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Train one block on its detached input; return its detached output and the aux's outputs.

    With ``cascade`` (window 2), block k-1 runs again on its detached input and block k once, on that
    output; the aux's own loss reaches block k only and its cascaded loss blocks k-1 and k, after which
    block k-1's optimizer steps (unless ``cascade.optimizer`` is None). ``defer_step`` keeps this
    block's gradients (for the next block's cascade, or for ``step_grouped``) instead of stepping now.
    ``clip`` (``optim.clip_grad_norm``): each stepped optimizer's gradients are first clipped to this
    global norm over its own parameters (the block and its aux), after fp16 unscaling.
    """
    if cascade is not None and scaler is not None:
        raise ValueError("window-2 methods do not support fp16 loss scaling (one scale per block); use bf16")
    # engine.compile_region=block: this block's forward as one compiled region (engine/compile.py)
    forward = getattr(body, "compiled_block_forward", None) or block_forward
    with track or nullcontext(), autocast or nullcontext():
        # no gradient ever leaves the block (or the two blocks of a cascade); bank entries written by
        # earlier blocks read detached (FeatureBank.seal)
        if cascade is None:
            h, out = forward(body, aux, h.detach(), batch)
        else:
            h, out = forward(body, aux, h.detach(), batch, cascade.body, cascade.h.detach())
    loss = out["loss"]
    # the prediction is for the test pass (block scores); dropped here, it is not held past this block
    out.pop("output", None)
    if cascade is not None:
        cascade_backward(out.pop("own_loss"), out.pop("cascade_loss"), (body, aux))
    elif loss.requires_grad:  # a block whose loss weights are all 0 has nothing to learn this step
        (scaler.scale(loss) if scaler is not None else loss).backward()  # frees this block's graph
    optimizers = [] if cascade is None or cascade.optimizer is None else [cascade.optimizer]
    optimizers += [] if defer_step else [optimizer]
    for opt in optimizers:
        if any(p.grad is not None for group in opt.param_groups for p in group["params"]):
            if scaler is not None:
                if clip is not None:
                    scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
                clip_block(opt, clip)
                scaler.step(opt)
                scaler.update()
            else:
                clip_block(opt, clip)
                opt.step()
        opt.zero_grad(set_to_none=True)
    return h.detach(), out


def cascade_backward(own: torch.Tensor, cascaded: torch.Tensor, modules: tuple[nn.Module, ...]) -> None:
    """Window 2: the aux's two losses read one graph (block k run on block k-1 run again). The ``own``
    loss's gradient reaches only ``modules`` (block k and its aux: ``inputs=`` stops it before block
    k-1); the ``cascaded`` loss's reaches both blocks. Two backward passes over the one graph give each
    parameter exactly the sum a second forward of block k would (the graph is kept for the second)."""
    own_params = [p for m in modules for p in m.parameters() if p.requires_grad]
    if own.requires_grad and own_params:
        torch.autograd.backward(own, inputs=own_params, retain_graph=cascaded.requires_grad)
    if cascaded.requires_grad:
        cascaded.backward()  # frees the graph


def clip_block(optimizer: torch.optim.Optimizer, max_norm: float | None) -> None:
    """Clip the gradients ``optimizer`` holds to a global L2 norm of ``max_norm`` (None: leave them):
    one norm per block, the block's layers and its aux together (torch's ``clip_grad_norm_``)."""
    if max_norm is None:
        return
    grads = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if grads:
        torch.nn.utils.clip_grad_norm_(grads, max_norm)


def block_forward(
    body: nn.Module,
    aux: nn.Module,
    h: torch.Tensor,
    batch: Batch,
    cascade_body: nn.Module | None = None,
    h_prev: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The forward half of ``local_step`` on an already detached input: the block's output (not
    detached) and the aux's outputs. With ``cascade_body`` (window 2) block k runs on block k-1 run
    again on its detached input ``h_prev`` (the same values as ``h``, with block k-1's graph), once:
    the aux (``cascade=True``) reads that one output for both its losses and returns them apart
    (``own_loss``, ``cascade_loss``) for ``cascade_backward``. Pure (no detach, no backward, no step),
    so ``engine.compile_region=block`` compiles it as one region per block."""
    if cascade_body is not None:
        h = rerun(cascade_body, h_prev) if getattr(aux, "recompute", False) else cascade_body(h_prev)
    h = body(h, batch.bank) if getattr(body, "writes_bank", False) else body(h)
    if cascade_body is None:
        return h, aux(h, batch)  # the last block's aux is the task head + task loss
    return h, aux(h, batch, cascade=True)


def rerun(body: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """``body`` on ``h`` keeping only ``h``: its activations are recomputed during backward
    (``torch.utils.checkpoint``, the RNG replayed), and the recomputation leaves its batch-norm
    statistics as this forward set them (MLAAN's ``recompute``: block k-1 in cut k's cascade)."""
    return checkpoint(body, h, use_reentrant=False, context_fn=lambda: (nullcontext(), buffers_kept(body)))


@contextmanager
def buffers_kept(module: nn.Module) -> Iterator[None]:
    kept = [b.clone() for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in zip(module.buffers(), kept):
                b.copy_(value)


def step_grouped(grouped: GroupedOptimizer, clip: float | None = None) -> None:
    """``engine.group_steps``: every block's kept gradients in one multi-tensor update, then freed.

    Exact (bitwise equal to stepping each block after its own backward): block k+1's input is block
    k's output, detached before block k would have stepped, and no block's forward reads another
    block's parameters (aux nets read later layers' live weights only in ``sync_momentum``, which the
    engine calls after this). Costs one parameter-sized set of gradients held until the end of the batch.
    """
    for opt in grouped.optimizers:  # one norm per block, as when each block steps on its own
        clip_block(opt, clip)
    grouped.sync()  # the blocks' current lr (the schedule sets the block optimizers' groups)
    grouped.view.step()
    grouped.zero_grad()


def checkpointed_step(
    body: nn.Module,
    aux: nn.Module,
    batch: Batch,
    optimizer: torch.optim.Optimizer | None,
    segments: int,
    reentrant: bool = False,
) -> dict[str, torch.Tensor]:
    """End-to-end step (one block) with activation checkpointing of ``body`` over ``segments`` segments
    (exact gradients): the benchmarks' ``checkpoint`` baseline. ``optimizer=None`` skips the step;
    ``reentrant`` runs the re-entrant variant (the live-memory meter sees its recomputation)."""
    layers = nn.Sequential(*body)
    # re-entrant checkpointing passes gradients only to inputs that need them
    x = batch.x.requires_grad_() if reentrant else batch.x
    h = checkpoint_sequential(layers, min(segments, len(layers)), x, use_reentrant=reentrant)
    out = aux(h, batch)
    out["loss"].backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return out
