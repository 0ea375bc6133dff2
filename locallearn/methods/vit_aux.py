"""MAN++'s ViT aux (``MAN_PlusPlus/networks/vit_man.py``, PRIOR_ART §6.3), behind the fused layer n.

On token sequences the momentum aux has depth 2: ``y = s*LB[0](h) + (2-s)*EMA(h)`` with LB[0] / EMA
standing in for the first block of the next group (``MomentumAux``), then ``LB[1]``, a trainable copy
of the group's second block, then the head. With ``dgl`` as the base (cross-entropy only, as the ViT
code trains) the head is the official one, LayerNorm + Linear on the class token; any other base
method puts its own aux there (InfoPro's reads the patch tokens on their grid).

When layer n + 1 is the backbone's last layer (the last cut of K=6), its copy already ends in the
encoder's LayerNorm and the head adds no second one.

Deviations from the official code: the EMA update happens after the optimizer step of the block that
owns layer n (as for every momentum aux here), not inside the aux forward; the copies follow the
momentum ``init`` option (official: fresh).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from locallearn.methods.base import AuxContext, Method
from locallearn.types import Batch


class TokenHead(nn.Module):
    """LayerNorm, then the task's local head on the class token. ``norm=False`` when the tokens come
    out of a copy of the backbone's last layer, which already ends in the encoder's LayerNorm."""

    def __init__(self, ctx: AuxContext, norm: bool = True) -> None:
        super().__init__()
        self.task = ctx.task
        self.norm = nn.LayerNorm(ctx.feature.num_chs, eps=1e-6) if norm else nn.Identity()
        self.head = ctx.task.local_head(ctx.feature.num_chs)

    def forward(self, h: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        output = self.head(self.norm(h)[:, 0])
        return {"loss": self.task.loss(output, batch), "output": output}


class Tail(nn.Module):
    """A trainable copy of the layer after layer n, then the base aux on its output."""

    def __init__(self, layer: nn.Module, base: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.base = base

    def forward(self, h: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        return self.base(self.layer(h), batch)


def vit_base_aux(base: Method, k: int, ctx: AuxContext, init: str) -> nn.Module:
    """``ctx``: seen from after layer n (``AuxContext.after_next``); needs one more layer behind it."""
    layer = copy.deepcopy(ctx.next_layers[0])
    if init == "fresh":
        ctx.init_weights(layer)
    inner = ctx.after_next()
    if base.name == "dgl":
        head = TokenHead(inner, norm=bool(inner.next_layers))  # K=6's last aux copies the final LN
        ctx.init_weights(head)
    else:
        head = base.make_aux(k, inner)
    return Tail(layer, head)
