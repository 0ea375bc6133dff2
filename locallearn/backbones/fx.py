"""``from_model(model, cut_at=[module names])``: the older entry point, kept for its callers.

It delegates to ``external.from_module``, which traces with leaf modules in both train and eval mode
(a plain ``torch.fx.symbolic_trace`` baked the trace-time ``self.training`` branch of timm's
``BatchNormAct2d`` into the graph: traced in train mode, ``model.eval()`` still used batch statistics).
``stop_at`` drops the nodes from that module on (e.g. ``"avgpool"``), so a task head replaces the
model's own; without it the whole forward is split into layers (its output must be a map or tokens).
"""

from __future__ import annotations

import torch
from torch import nn

from locallearn.backbones.external import ExternalBackbone, from_module

FxBackbone = ExternalBackbone  # the name this module's callers knew


def from_model(
    model: nn.Module,
    cut_at: list[str],
    stop_at: str | None = None,
    example_input: torch.Tensor | None = None,
    stages: list[int] | None = None,
) -> ExternalBackbone:
    """Split ``model`` into layers starting at each module in ``cut_at`` (in forward order), checked
    against the model in train and eval mode."""
    x = example_input if example_input is not None else torch.zeros(1, 3, 224, 224)
    return from_module(model, cut_at, x, head_at=stop_at, auto_head=False, stages=stages)
