"""``engine.compile``: ``torch.compile`` per block (regional compilation), not per step.

Each block's body and each aux's forward is compiled on its own, in place (``_compiled_call_impl``,
what ``nn.Module.compile`` sets), so:
- gradient isolation stays where it is: ``engine/step.py`` detaches the block input, calls backward and
  steps the optimizer outside every compiled region, exactly as without compilation;
- the state-dict keys do not change (no ``_orig_mod.`` wrapper), so checkpoints, resume and
  ``locallearn eval`` work across compiled and uncompiled runs;
- compiled code is shared by blocks of the same structure: Dynamo caches a graph per code object
  (``Body.forward``, ``DGLAux.forward``, ...) guarded on the module's structure and shapes, not on its
  identity, so ResNet-32 K=16 (dgl) compiles 6 body graphs (stem, 16, 16->32, 32, 32->64, 64 channels),
  3 aux graphs and the head: 10 graphs for 31 modules.

``engine.compile_region=block``: one region per block instead. ``engine/step.py``'s ``block_forward``
(the body, then the aux on its output; for a window-2 cascade also block k-1 again and block k on that)
is compiled once and ``local_step`` calls it on the detached input (and returns its output detached),
so the detach, the backward and the step stay outside as before. K regions per step instead of 2K-1
(fewer guard checks and AOTAutograd wrappers), and inductor fuses across the body/aux boundary; a graph
is shared by the blocks whose (body, aux) pair has one structure (ResNet-32 K=16 dgl: 7 graphs). On
CPU it is the faster mode (``benchmarks/results/compile_speed.md``). Bodies that write the feature bank
work inside it (the writes are replayed after the graph). A model with an aux that stays eager
(``momentum.recompute``, a dense task) gets the module regions instead, with the reason logged. The
inference path (``LocalModel.forward``: backbone + head) is not compiled in this mode.

Shapes are static (every tensor argument is marked static before each call): a new batch size (an
epoch's last, smaller batch) compiles once more rather than a slower dynamic-shape graph. Python float
attributes that differ between otherwise identical blocks (InfoPro's per-block loss weights) become
graph inputs after the first difference instead of one graph per block (Dynamo's automatic dynamic).
Dynamo's per-function recompile limit (8) is raised so that a deep model's distinct blocks all
compile instead of silently falling back to eager.

The memory meter still works (saved-tensor hooks see what the compiled graphs save), but it then
measures the compiled graphs: with inductor they keep other (often larger, pooled) buffers than eager
PyTorch, so compare activation memory between methods with compile off.

Apply it last, after ``model.to(device)`` and anything that deep-copies the model (a module region's
compiled forward is bound to the original module: a deep copy would run the original).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from locallearn.engine.step import block_forward
from locallearn.model import LocalModel
from locallearn.types import Batch, FeatureBank

log = logging.getLogger(__name__)

BACKENDS = ("inductor", "aot_eager", "eager")  # aot_eager / eager: test the wiring without codegen
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
REGIONS = ("module", "block")  # engine.compile_region


def _mark_static(obj: Any) -> None:
    """Mark every tensor an aux or body receives as static-shaped (see the module docstring)."""
    if isinstance(obj, torch.Tensor):
        torch._dynamo.mark_static(obj)
    elif isinstance(obj, Batch):
        for f in dataclasses.fields(obj):
            _mark_static(getattr(obj, f.name))
    elif isinstance(obj, FeatureBank):
        for _, t in obj.items():
            _mark_static(t)
    elif isinstance(obj, list | tuple):
        for o in obj:
            _mark_static(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            _mark_static(o)


def _static_call(compiled: Callable) -> Callable:
    def call(*args: Any, **kwargs: Any) -> Any:
        _mark_static(args)
        _mark_static(kwargs)
        return compiled(*args, **kwargs)

    return call


def compile_function(fn: Callable, backend: str = "inductor", mode: str = "default") -> Callable:
    """``torch.compile(fn)`` with static shapes (every tensor argument marked static at each call)."""
    if backend not in BACKENDS:
        raise ValueError(f"engine.compile_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if mode not in MODES:
        raise ValueError(f"engine.compile_mode must be one of {', '.join(MODES)}, got {mode!r}")
    options = {"backend": backend, "dynamic": None}
    if backend == "inductor" and mode != "default":
        options["mode"] = mode
    return _static_call(torch.compile(fn, **options))


def compile_module(module: nn.Module, backend: str = "inductor", mode: str = "default") -> nn.Module:
    """Compile ``module``'s forward in place (its state-dict keys stay the same); returns it."""
    module._compiled_call_impl = compile_function(module._call_impl, backend, mode)
    return module


def is_compiled(module: nn.Module) -> bool:
    """Compiled as a module region, or (a body) as the head of a block region."""
    return (
        getattr(module, "_compiled_call_impl", None) is not None
        or getattr(module, "compiled_block_forward", None) is not None
    )


def uncompile_module(module: nn.Module) -> None:
    module._compiled_call_impl = None
    if "compiled_block_forward" in module.__dict__:
        del module.compiled_block_forward


def block_region_refusal(model: LocalModel, auxes: bool, skip: dict[int, str]) -> str | None:
    """Why ``model`` cannot run one compiled region per block (None: it can)."""
    if not auxes:
        return "its aux nets stay eager"
    if skip:
        k, why = min(skip.items())
        return f"aux {k} stays eager ({why})"
    if getattr(model, "window", 1) not in (1, 2):
        return f"window {model.window}"
    return None


def compile_blocks(
    model: LocalModel,
    backend: str = "inductor",
    mode: str = "default",
    auxes: bool = True,
    skip: dict[int, str] | None = None,
    region: str = "block",
) -> LocalModel:
    """Compile ``model``'s blocks in place: one region per block (``region="block"``, see the module
    docstring), or every block's body and (with ``auxes``) every aux apart (``"module"``).

    ``skip`` maps block indices to the reason their aux stays eager (logged); such a model gets module
    regions. Compilation itself happens lazily, at each region's first call: a pipeline rank compiles
    only its own blocks.
    """
    if region not in REGIONS:
        raise ValueError(f"engine.compile_region must be one of {', '.join(REGIONS)}, got {region!r}")
    skip = dict(skip or {})
    for k, aux in enumerate(model.auxes):
        if getattr(aux, "recompute", False) and k not in skip:
            # torch.utils.checkpoint inside a compiled region: Dynamo's checkpoint replays no BN
            # running-statistics update and the eager backend fails on the replayed counter
            why = getattr(aux, "recompute_option", "momentum.recompute")
            skip[k] = f"it recomputes activations with torch.utils.checkpoint ({why})"
    if region == "block":
        why = block_region_refusal(model, auxes, skip)
        if why is None:
            return _compile_block_regions(model, backend, mode)
        log.info("engine.compile: module regions instead of block regions (%s)", why)
    for k in range(model.num_blocks):
        compile_module(model.body(k), backend, mode)
        if auxes and k not in skip:
            compile_module(model.auxes[k], backend, mode)
    for k, why in sorted(skip.items()):
        log.info("engine.compile: aux %d stays eager (%s)", k, why)
    _raise_recompile_limits(model)
    log.info(
        "engine.compile: %d bodies and %d aux nets compiled per block (backend %s, mode %s)",
        model.num_blocks,
        sum(is_compiled(a) for a in model.auxes),
        backend,
        mode,
    )
    return model


def _raise_recompile_limits(model: LocalModel) -> None:
    # one graph per distinct block structure, batch size and grad mode, all under the same few code
    # objects (Body.forward, the aux class's forward, block_forward): Dynamo's default limit of 8 would
    # silently run the rest eagerly
    limit = 8 * model.num_blocks
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, limit)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * limit)


def _compile_block_regions(model: LocalModel, backend: str, mode: str) -> LocalModel:
    """One compiled ``block_forward`` (body + aux, and block k-1 again for a window-2 cascade) per
    block; ``local_step`` finds it on the body. One ``torch.compile`` for all blocks: the graphs are
    cached on ``block_forward``'s code and guarded on the modules' structure, not their identity."""
    forward = compile_function(block_forward, backend, mode)
    for k in range(model.num_blocks):
        body = model.body(k)
        uncompile_module(body)
        uncompile_module(model.auxes[k])
        body.compiled_block_forward = forward
    _raise_recompile_limits(model)
    log.info(
        "engine.compile: %d blocks compiled as one region each (body + aux; backend %s, mode %s)",
        model.num_blocks,
        backend,
        mode,
    )
    return model
