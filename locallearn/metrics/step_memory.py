"""Whole-step memory: what a device holds during one training step, per block and in total.

The activation meter (``memory.ActivationMeter``) counts only the bytes saved for backward. A device also
holds every parameter and buffer (backbone, head, aux nets, MAN/MAN++'s EMA and learnable copies), the
gradients, the optimizer's state and the feature bank. This module is the library's one account of all
of it, as the engine schedules a step (docs/benchmarks.md, "How memory is measured"):

- resident for the whole step: every parameter and buffer, every optimizer's state (read from the
  optimizers actually built: SGD's momentum buffers, AdamW's two moments and step; predicted from the
  optimizer's class and options before its first step);
- live one block at a time (sequential engine): the block's gradients, what its forward saved for
  backward (the meter's count, which includes the bank entries alive by then) and backward's workspace
  (activation gradients and ops' scratch beyond saved tensors and gradients, ``block_workspace``: measured
  by the allocator on one forward and backward of each block), plus the batch's images held from block 0
  on. The block's optimizer step runs after its backward has freed the saved tensors: its gradients and
  the step's temporaries (a multi-tensor ``foreach`` step copies the gradients once) are the other
  candidate for the peak;
- ``engine.group_steps``: every block's gradients stay until the end of the batch; window-2 methods
  (MLAAN) keep block k-1's gradients until block k's backward; ``engine.mode=ddp`` (and the pipeline's
  replicas, ``engine.replicas > 1``): the flat all-reduce buffer of a block's gradients (one more copy of
  them) during its step; ``engine.mode=pipeline``: each rank holds its own blocks only, and the peak is
  the largest rank's.

``peak_total_bytes`` = resident + the largest block's live part. ``bp`` is one block, so it holds
everything at once. Saved bytes and workspace scale linearly in the batch; the rest does not depend on
it. ``step_memory`` is arithmetic over the model, its optimizers and the two measured per-block terms; it is
checked against what torch's CPU allocator really holds (``allocated_peak``) in
tests/metrics/test_step_memory.py, and against ``torch.cuda.max_memory_allocated`` by the GPU evidence kit.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from locallearn.metrics.memory import ActivationMeter, saved_storages

COMPONENTS = (
    "parameter_bytes",
    "gradient_bytes",
    "optimizer_state_bytes",
    "bank_bytes",
    "peak_activation_bytes",
    "peak_total_bytes",
)


def storage_bytes(tensors: Iterable[torch.Tensor], seen: set[int] | None = None) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and shared tensors counted once);
    ``seen`` (data pointers) is updated, so storages already counted elsewhere are left out."""
    seen = set() if seen is None else seen
    total = 0
    for t in tensors:
        if not torch.is_tensor(t):
            continue
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # nested / meta tensors own no plain storage
            continue
        ptr = storage.data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        total += storage.nbytes()
    return total


def _nbytes(p: torch.Tensor) -> int:
    return p.numel() * p.element_size()


def _params(optimizer: Any) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def _uses_foreach(optimizer: Any, group: dict) -> bool:
    """Whether torch runs this group's step as multi-tensor kernels (its default: on CUDA tensors)."""
    if group.get("fused"):
        return False
    foreach = group.get("foreach")
    if foreach is not None:
        return bool(foreach)
    return any(p.is_cuda for p in group["params"]) and not group.get("differentiable", False)


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of ``optimizer``'s per-parameter state: what it holds after a step (read from its state when
    it has stepped, predicted from its class and options for parameters it has not stepped yet).

    SGD: one momentum buffer per parameter when ``momentum != 0`` (nesterov or not); Adam / AdamW: the
    first and second moments, ``max_exp_avg_sq`` with ``amsgrad``, and a one-element ``step`` tensor.
    A ``GradAllReduce`` (ddp) or any wrapper that exposes ``param_groups`` and ``state`` counts alike."""
    total, seen = 0, set()
    state = optimizer.state
    for group in optimizer.param_groups:
        for p in group["params"]:
            held = state.get(p) if hasattr(state, "get") else None
            if held:
                total += storage_bytes(held.values(), seen)
                continue
            total += _predicted_state(optimizer, group, p)
    return total


def _predicted_state(optimizer: Any, group: dict, p: torch.Tensor) -> int:
    inner = getattr(optimizer, "optimizer", optimizer)  # ddp.GradAllReduce wraps the real one
    if isinstance(inner, torch.optim.SGD):
        return _nbytes(p) if group.get("momentum", 0) else 0
    if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
        step = 4  # a float32 scalar tensor (on the parameter's device when fused / capturable)
        return (3 if group.get("amsgrad") else 2) * _nbytes(p) + step
    return 0  # an optimizer class we do not know: counted once it has stepped


def optimizer_step_bytes(optimizer: Any) -> int:
    """Temporaries of one ``optimizer.step()``: a multi-tensor (``foreach``) step makes one gradient-sized
    list (weight decay's ``grad + wd * p``, Adam's ``sqrt(v)``); a single-tensor step one parameter-sized
    temporary at a time (two for SGD with weight decay and nesterov); a fused step none."""
    total = 0
    for group in optimizer.param_groups:
        params = group["params"]
        if not params or group.get("fused"):
            continue
        if _uses_foreach(optimizer, group):
            total += sum(_nbytes(p) for p in params)
        else:
            total = max(total, 2 * max(_nbytes(p) for p in params))
    return total


@dataclass
class BlockMemory:
    """One block's share of a step: its weights (body + aux, incl. buffers), their gradients and
    optimizer state, and what its forward saved for backward (the meter; bank entries alive included)."""

    index: int
    parameter_bytes: int
    gradient_bytes: int
    optimizer_state_bytes: int
    activation_bytes: int
    # what forward/backward allocate beyond saved tensors and gradients, and earlier blocks' tensors held
    workspace_bytes: int = 0
    step_bytes: int = 0  # the optimizer step's temporaries
    held_gradient_bytes: int = 0  # other blocks' gradients still alive while this block runs
    bucket_bytes: int = 0  # ddp: the flat all-reduce copy of this block's gradients

    @property
    def live_bytes(self) -> int:
        """The block's peak on top of the resident part: during backward (saved tensors + gradients +
        backward's workspace) or during its optimizer step (gradients + the all-reduce copy + the step's
        temporaries)."""
        grads = self.gradient_bytes + self.held_gradient_bytes
        backward = self.activation_bytes + self.workspace_bytes + grads
        return max(backward, grads + self.bucket_bytes + self.step_bytes)


@dataclass
class StepMemory:
    """The whole step. ``peak_total_bytes`` = ``resident_bytes`` + the largest block's ``live_bytes``
    (pipeline: the largest rank's). ``peak_activation_bytes`` is the meter's figure (the largest block's
    saved bytes, bank included); ``bank_bytes`` is the part of it the feature bank holds at the end of
    the step (shown, not added twice). ``parameter_bytes`` includes buffers (BN statistics)."""

    parameter_bytes: int
    gradient_bytes: int
    optimizer_state_bytes: int
    bank_bytes: int
    peak_activation_bytes: int
    peak_total_bytes: int
    peak_block: int
    mode: str = "sequential"
    blocks: list[BlockMemory] = field(default_factory=list)
    rank_peak_bytes: list[int] | None = None  # pipeline: each rank's peak
    rank_blocks: list[list[int]] | None = None  # pipeline: the blocks of each rank

    @property
    def resident_bytes(self) -> int:
        return self.parameter_bytes + self.optimizer_state_bytes

    def as_dict(self) -> dict[str, Any]:
        """The summary.json form: the components, and each block's figures as lists."""
        out: dict[str, Any] = {c: getattr(self, c) for c in COMPONENTS}
        out["peak_total_block"] = self.peak_block
        out["memory_mode"] = self.mode
        for key in ("parameter_bytes", "gradient_bytes", "optimizer_state_bytes", "live_bytes"):
            out[f"block_{key}"] = [getattr(b, key) for b in self.blocks]
        if self.rank_peak_bytes is not None:
            out["rank_peak_total_bytes"] = list(self.rank_peak_bytes)
        return out

    def with_saved(self, activation_bytes: Sequence[int], workspace_bytes: Sequence[int]) -> StepMemory:
        """The same step with each block's saved bytes and workspace replaced (another batch size)."""
        blocks = [
            BlockMemory(**{**asdict(b), "activation_bytes": int(a), "workspace_bytes": int(w)})
            for b, a, w in zip(self.blocks, activation_bytes, workspace_bytes)
        ]
        unowned = self.parameter_bytes - sum(b.parameter_bytes for b in self.blocks)
        return _combine(blocks, self.parameter_bytes, self.bank_bytes, self.mode, self.rank_blocks, unowned)

    def scaled(self, factor: float) -> StepMemory:
        """The same step with every saved-for-backward byte times ``factor`` (a batch ``factor`` times as
        large: saved bytes are linear in the batch, weights and optimizer state do not change)."""
        blocks = [
            BlockMemory(
                **{
                    **asdict(b),
                    "activation_bytes": round(b.activation_bytes * factor),
                    "workspace_bytes": round(b.workspace_bytes * factor),
                }
            )
            for b in self.blocks
        ]
        return _combine(
            blocks,
            self.parameter_bytes,
            round(self.bank_bytes * factor),
            self.mode,
            self.rank_blocks,
            self.parameter_bytes - sum(b.parameter_bytes for b in self.blocks),
        )


def block_weights(model: nn.Module) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """Each block's parameters and buffers (body + aux; a tensor shared by several blocks goes to the
    first), and those of the model that belong to no block."""
    seen: set[int] = set()
    per_block = []
    for k in range(model.num_blocks):
        tensors = []
        for module in (model.body(k), model.auxes[k]):
            for t in (*module.parameters(), *module.buffers()):
                if id(t) not in seen:
                    seen.add(id(t))
                    tensors.append(t)
        per_block.append(tensors)
    rest = [t for t in (*model.parameters(), *model.buffers()) if id(t) not in seen]
    return per_block, rest


def step_memory(
    model: nn.Module,
    optimizers: Sequence[Any],
    activation_bytes: Sequence[int],
    bank_bytes: int = 0,
    workspace: BlockPass | None = None,
    *,
    mode: str = "sequential",
    group_steps: bool = False,
    rank_blocks: Sequence[Sequence[int]] | None = None,
    all_reduce: bool | None = None,
) -> StepMemory:
    """The account of one step of ``model`` (a ``LocalModel``) with its per-block ``optimizers``.

    ``activation_bytes``: the meter's bytes per block (``ActivationMeter.block_bytes``) at the batch the
    step runs; ``workspace``: per block, what its forward and backward allocate beyond saved tensors and
    gradients, and what the engine holds from earlier blocks (``block_workspace``; 0 when not measured);
    ``mode``: ``sequential`` | ``pipeline`` | ``ddp``; ``group_steps``: ``engine.group_steps``;
    ``rank_blocks``: pipeline, the blocks of each rank (default: one rank holding every block);
    ``all_reduce``: each block's gradients are all-reduced through a flat copy (default: ``mode == "ddp"``;
    also the pipeline with ``engine.replicas > 1``)."""
    if all_reduce is None:
        all_reduce = mode == "ddp"
    if len(activation_bytes) != model.num_blocks or len(optimizers) != model.num_blocks:
        raise ValueError(
            f"{model.num_blocks} blocks but {len(activation_bytes)} activation counts and "
            f"{len(optimizers)} optimizers"
        )
    weights, rest = block_weights(model)
    seen: set[int] = set()
    blocks = []
    window = getattr(model, "window", 1)
    grads = [sum(_nbytes(p) for p in _params(opt) if p.requires_grad) for opt in optimizers]
    for k, opt in enumerate(optimizers):
        held = 0
        if group_steps:
            held = sum(grads[:k])  # stepped together at the end of the batch
        elif window == 2 and k > 0:
            held = grads[k - 1]  # block k-1 steps after block k's backward
        blocks.append(
            BlockMemory(
                index=k,
                parameter_bytes=storage_bytes(weights[k], seen),
                gradient_bytes=grads[k],
                optimizer_state_bytes=optimizer_state_bytes(opt),
                activation_bytes=int(activation_bytes[k]),
                workspace_bytes=workspace.workspace_bytes[k] + workspace.held_bytes[k] if workspace else 0,
                step_bytes=optimizer_step_bytes(opt),
                held_gradient_bytes=held,
                bucket_bytes=grads[k] if all_reduce else 0,
            )
        )
    total_params = sum(b.parameter_bytes for b in blocks) + storage_bytes(rest, seen)
    groups = [list(r) for r in rank_blocks] if mode == "pipeline" and rank_blocks else None
    return _combine(
        blocks, total_params, bank_bytes, mode, groups, total_params - sum(b.parameter_bytes for b in blocks)
    )


def _combine(
    blocks: list[BlockMemory],
    parameter_bytes: int,
    bank_bytes: int,
    mode: str,
    groups: list[list[int]] | None,
    unowned: int,
) -> StepMemory:
    groups = groups or [list(range(len(blocks)))]
    rank_peaks = []
    for g in groups:
        resident = sum(blocks[k].parameter_bytes + blocks[k].optimizer_state_bytes for k in g)
        rank_peaks.append(resident + max(blocks[k].live_bytes for k in g))
    rank_peaks[0] += unowned  # weights outside every block: on the first rank (the whole model elsewhere)
    rank = max(range(len(groups)), key=lambda r: rank_peaks[r])
    peak_block = max(groups[rank], key=lambda k: blocks[k].live_bytes)
    return StepMemory(
        parameter_bytes=parameter_bytes,
        gradient_bytes=sum(b.gradient_bytes for b in blocks),
        optimizer_state_bytes=sum(b.optimizer_state_bytes for b in blocks),
        bank_bytes=bank_bytes,
        peak_activation_bytes=max(b.activation_bytes for b in blocks),
        peak_total_bytes=rank_peaks[rank],
        peak_block=peak_block,
        mode=mode,
        blocks=blocks,
        rank_peak_bytes=rank_peaks if len(groups) > 1 else None,
        rank_blocks=groups if len(groups) > 1 else None,
    )


class StepMeter(ActivationMeter):
    """The activation meter's count (the same bytes, the same rules), and per block also the largest
    single saved storage (backward's gradient buffers are of that size) and the feature bank's bytes
    after the block."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.bank_bytes: list[int] = []
        self.largest_bytes: list[int] = []

    @contextmanager
    def track(self, bank=None) -> Iterator[None]:
        with saved_storages(self.exclude) as seen:
            yield
        self.largest_bytes.append(max(seen.values(), default=0))
        entries = [t for _, t in bank.items()] if bank is not None else []
        for t in entries:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        self.block_bytes.append(sum(seen.values()))
        self.bank_bytes.append(storage_bytes(entries))

    def reset(self) -> None:
        super().reset()
        self.bank_bytes, self.largest_bytes = [], []


def measure_step(
    model: nn.Module,
    optimizers: Sequence[Any],
    step: Callable[[Any], Any],
    **kwargs: Any,
) -> StepMemory:
    """Run ``step(meter)`` once (one training step that passes ``meter`` to the engine) and account for it."""
    meter = StepMeter(model)
    step(meter)
    return step_memory(model, optimizers, meter.block_bytes, max(meter.bank_bytes, default=0), **kwargs)


# -- what the allocator adds beyond saved tensors and gradients ------------------------------------------


@dataclass
class BlockPass:
    """What ``block_workspace`` measured per block, at the batch it ran."""

    workspace_bytes: list[int]
    held_bytes: list[int]  # tensors the engine keeps alive from earlier blocks (not saved by this one)


def block_workspace(
    model: nn.Module,
    batch: Any,
    autocast: Callable[[], Any] = nullcontext,
    device: torch.device | None = None,
) -> BlockPass:
    """Per block, what its forward and backward allocate beyond the tensors saved for backward and the
    parameters' gradients: backward's activation gradients (the gradient of an output and of its input
    are alive together, and a residual sum keeps the gradient of its output for the shortcut), ops'
    scratch, the loss's intermediates. Measured by the allocator (``allocator_rise``) while each block runs
    forward and backward once on ``batch`` (no optimizer step; BN statistics and the RNG are restored).
    Linear in the batch like the saved bytes. Window-2 methods (MLAAN): block k's step runs block k-1
    again, as the engine does (block k-1's gradients count as gradients, not workspace).

    Also the bytes the engine holds from earlier blocks while block k >= 1 runs: the batch's images."""
    inputs: list[int] = []
    window = getattr(model, "window", 1)
    if window not in (1, 2):
        return BlockPass([0] * model.num_blocks, [0] * model.num_blocks)
    from locallearn.engine.step import Cascade, local_step  # the engine's own step, no optimizer

    device = device or batch.x.device
    buffers = [b.detach().clone() for b in model.buffers()]
    params = [p for p in model.parameters() if p.requires_grad]
    kept = [p.grad for p in params]
    resident = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    out_bytes = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        bank_batch = type(batch)(batch.x, batch.targets, batch.mean, batch.std)  # a bank of its own
        h = h_prev = bank_batch.x
        for k in range(model.num_blocks):
            inputs.append(h.untyped_storage().nbytes())
            for p in params:
                p.grad = None
            held = (h, h_prev, *(t for _, t in bank_batch.bank.items()))
            before = resident | {t.untyped_storage().data_ptr() for t in held}
            saved: dict[int, int] = {}

            def pack(t: torch.Tensor, before=before, saved=saved) -> torch.Tensor:
                try:
                    storage = t.untyped_storage()
                except (RuntimeError, NotImplementedError):
                    return t
                ptr = storage.data_ptr()
                if ptr not in before:
                    saved[ptr] = storage.nbytes()
                return t

            result: dict[str, Any] = {}

            cascade = Cascade(model.body(k - 1), h_prev, None) if window == 2 and k > 0 else None

            def run(k=k, h=h, pack=pack, result=result, cascade=cascade) -> None:
                hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x)
                result["h"], _ = local_step(
                    model.body(k),
                    model.auxes[k],
                    h,
                    bank_batch,
                    None,
                    None,
                    autocast(),
                    hooks,
                    cascade=cascade,
                    defer_step=True,
                )

            rise = allocator_rise(run, device)
            saved_new = sum(saved.values())
            grads = storage_bytes(p.grad for p in params if p.grad is not None)
            h_prev, h = h, result["h"]
            out_bytes.append(max(0, rise - saved_new - grads))
    for p, g in zip(params, kept):
        p.grad = g
    with torch.no_grad():
        for b, value in zip(model.buffers(), buffers):
            b.copy_(value)
    held_bytes = [0] + [inputs[0]] * (len(inputs) - 1)
    return BlockPass(out_bytes, held_bytes)


# -- the check against a real allocator ----------------------------------------------------------------


def live_tensor_bytes() -> int:
    """Bytes of every distinct CPU tensor storage reachable by the garbage collector right now."""
    gc.collect()
    tensors = []
    with warnings.catch_warnings():  # touching deprecated module attributes (torch.distributed.reduce_op)
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                    tensors.append(obj)
            except ReferenceError:
                continue
    return storage_bytes(tensors)


@contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Send what C++ code writes to file descriptor 2 to /dev/null for a moment. Some torch builds' kineto
    prints a line to stderr at every profiler start and stop, whatever its log level; a run measures
    its workspace with the profiler, and those lines would land in the user's console. Python's own
    ``sys.stderr`` is flushed first, so nothing of ours is lost."""
    import os
    import sys

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (an embedding host): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def allocated_peak(fn: Callable[[], Any], device: torch.device | str = "cpu") -> int:
    """The most bytes torch's allocator holds while ``fn()`` runs.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the bytes alive before ``fn`` (every tensor storage
    the garbage collector reaches) plus ``allocator_rise``."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    before = live_tensor_bytes()
    return before + allocator_rise(fn, device)


def allocator_rise(fn: Callable[[], Any], device: torch.device | str = "cpu") -> int:
    """The most bytes the allocator holds while ``fn()`` runs above what it held when ``fn`` started.

    CUDA: ``max_memory_allocated`` minus ``memory_allocated`` at the start. CPU: the highest running total
    of the CPU allocator's own allocation records (the profiler's ``profile_memory`` events count from 0
    when profiling starts)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with native_stderr_silenced():  # kineto writes "USDT: ... profiler_start" lines straight to fd 2
        prof.__enter__()
    try:
        fn()
    finally:
        with native_stderr_silenced():
            prof.__exit__(None, None, None)
    records = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            records.append((event.start_time_ns, event.extra_fields.alloc_size, event.extra_fields.ptr))
    return session_peak(records)


def session_peak(records: Iterable[tuple[int, int, int]]) -> int:
    """The highest running total of allocation records ``(time, size, address)`` (a free: size <= 0).

    Our own running total, from this session's allocations and the frees of those allocations only. The
    reporter's total (``total_allocated``) depends on the process's history: it keeps the size of every
    block allocated while some profiler ran and freed while none did, and a later free of a new block at
    that address takes the stale size off (seen: one cell of ``benchmarks/aux_sizes.py --totals`` at
    1.08x bp after other cells in the same process, 0.92x alone). Blocks allocated before the session
    and freed during it do not lower the total (none are, in the engine's step as measured here)."""
    sizes: dict[int, int] = {}
    total = highest = 0
    for _, size, ptr in sorted(records, key=lambda r: r[0]):
        if size > 0:
            sizes[ptr] = size
            total += size
            highest = max(highest, total)
        elif ptr in sizes:
            total -= sizes.pop(ptr)
    return highest
