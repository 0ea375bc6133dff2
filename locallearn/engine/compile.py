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

Shapes are static (every tensor argument is marked static before each call): a new batch size (an
epoch's last, smaller batch) compiles once more rather than a slower dynamic-shape graph. Python float
attributes that differ between otherwise identical blocks (InfoPro's per-block loss weights) become
graph inputs after the first difference instead of one graph per block (Dynamo's automatic dynamic).
Dynamo's per-function recompile limit (8) is raised so that a deep model's distinct blocks all
compile instead of silently falling back to eager.

The memory meter still works (saved-tensor hooks see what the compiled graphs save), but it then
measures the compiled graphs: with inductor they keep other (often larger, pooled) buffers than eager
PyTorch, so compare activation memory between methods with compile off.

Apply it last, after ``model.to(device)`` and anything that deep-copies the model (the compiled
forward is bound to the original module: a deep copy would run the original).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from locallearn.model import LocalModel
from locallearn.types import Batch, FeatureBank

log = logging.getLogger(__name__)

BACKENDS = ("inductor", "aot_eager", "eager")  # aot_eager / eager: test the wiring without codegen
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


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


def compile_module(module: nn.Module, backend: str = "inductor", mode: str = "default") -> nn.Module:
    """Compile ``module``'s forward in place (its state-dict keys stay the same); returns it."""
    if backend not in BACKENDS:
        raise ValueError(f"engine.compile_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if mode not in MODES:
        raise ValueError(f"engine.compile_mode must be one of {', '.join(MODES)}, got {mode!r}")
    options = {"backend": backend, "dynamic": None}
    if backend == "inductor" and mode != "default":
        options["mode"] = mode
    module._compiled_call_impl = _static_call(torch.compile(module._call_impl, **options))
    return module


def is_compiled(module: nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def uncompile_module(module: nn.Module) -> None:
    module._compiled_call_impl = None


def compile_blocks(
    model: LocalModel,
    backend: str = "inductor",
    mode: str = "default",
    auxes: bool = True,
    skip: dict[int, str] | None = None,
) -> LocalModel:
    """Compile every block's body and (with ``auxes``) every aux of ``model`` in place.

    ``skip`` maps block indices to the reason their aux stays eager (logged). Compilation itself
    happens lazily, at each region's first call: a pipeline rank compiles only its own blocks.
    """
    skip = dict(skip or {})
    for k, aux in enumerate(model.auxes):
        if getattr(aux, "recompute", False) and k not in skip:
            # torch.utils.checkpoint inside a compiled region: Dynamo's checkpoint replays no BN
            # running-statistics update and the eager backend fails on the replayed counter
            skip[k] = "it recomputes activations with torch.utils.checkpoint (momentum.recompute)"
    for k in range(model.num_blocks):
        compile_module(model.body(k), backend, mode)
        if auxes and k not in skip:
            compile_module(model.auxes[k], backend, mode)
    for k, why in sorted(skip.items()):
        log.info("engine.compile: aux %d stays eager (%s)", k, why)
    # one graph per distinct block structure, batch size and grad mode, all under the same few code
    # objects (Body.forward, the aux class's forward): Dynamo's default limit of 8 would silently run
    # the rest eagerly
    limit = 8 * model.num_blocks
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, limit)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * limit)
    log.info(
        "engine.compile: %d bodies and %d aux nets compiled per block (backend %s, mode %s)",
        model.num_blocks,
        sum(is_compiled(a) for a in model.auxes),
        backend,
        mode,
    )
    return model
