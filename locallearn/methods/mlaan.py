"""MLAAN: multilaminar leap augmented auxiliary network (Zhang et al., MLAAN: Scaling Supervised Local
Learning with Multilaminar Leap Augmented Auxiliary Network, arXiv 2406.16633; code Wendy231015/MLAAN).

MLM (PRIOR_ART §7.4): every block k >= 1 has two losses. The *independent* one reads block k's output
(GAP + local head, task loss). The *cascaded* one spans two blocks: block k-1 runs again on its
detached input, block k on that, and the result goes through the LAM chain of cut k and a GAP + local
head. Loss ``wx * L_independent + wy * L_cascaded`` with wx = 0.001, wy = 0.999; the gradient reaches
blocks k-1 and k only (the engine's window 2). Block 0 has no loss of its own, as in the official code:
it learns through the cascade of cut 1. The last block: ``wx * L(head(x)) + wy * L(head(y))``, x its
output, y the cascade through blocks K-2 and K-1.

LAM (PRIOR_ART §7.3): the chain of cut k is made of trainable copies of later backbone layers that
"leap" to the end: every layer after the cut that changes the feature shape (so the chain fits), the
last layer, and the latest remaining layers up to ``chain_depth`` layers. A frozen EMA copy of the
chain's first layer is summed with its trainable copy (``z = Aug_0(z) + EMA_0(z)``) and tracks the live
layer after every step: ``theta_EMA <- m * theta_EMA + (1 - m) * theta_live`` (parameters only). Copies
start equal to the live layers (made after the backbone's init, as in the official code).

Deviations from the official code: the last block's independent loss is kept (the official code
overwrites it with the cascaded one); **every** EMA copy is updated each step (the official CIFAR code
only updates the last one, so the others stay at their step-0 snapshot); only the EMA copy that is used
(the chain's first layer) is built, and only the heads that are used (the official code builds 825
unused heads for ResNet-32); the chains come from the rule above, which reproduces the official
ResNet-32 lists except where they pick [3,2] instead of [3,3] in stage 1 and drop [3,3] after the cut
at [3,0]; block k-1's optimizer steps after block k's backward (the official code steps all blocks
once per batch, after every backward).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from locallearn.methods.base import AuxContext, Method
from locallearn.types import Batch, FeatureInfo


@dataclass
class MLAANConfig:
    wx: float = 0.001  # resnetMLAAN.py constructor default (independent path)
    wy: float = 0.999  # ... (cascaded path)
    chain_depth: int = 4  # longest list in configAuxPlus_new.py
    momentum: float = (
        0.995  # EMA momentum: MLAAN run files use 0.999 / 0.998 / 0.995; ImageNet --momentum2 0.995
    )
    ema: bool = True  # LAM's EMA copy on the chain's first layer


def leap_chain(start: FeatureInfo, features: list[FeatureInfo], depth: int) -> list[int]:
    """Indices (into the layers after the cut) of the LAM chain: shape-changing layers, the last layer,
    then the latest others until ``depth`` layers."""
    inputs = [start, *features[:-1]]
    needed = {j for j, (a, b) in enumerate(zip(inputs, features)) if a != b} | {len(features) - 1}
    for j in reversed(range(len(features))):
        if len(needed) >= depth:
            break
        needed.add(j)
    chain = sorted(needed)
    current = start
    for j in chain:
        if inputs[j] != current:
            raise ValueError(f"LAM chain {chain} does not fit: layer {j} expects {inputs[j]}, gets {current}")
        current = features[j]
    return chain


class GAPHead(nn.Sequential):
    def __init__(self, ctx: AuxContext, chs: int) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Flatten(), ctx.task.local_head(chs))


class MLAANAux(nn.Module):
    """Independent head on block k's output; cascaded path through the LAM chain (k >= 1)."""

    def __init__(self, ctx: AuxContext, cfg: MLAANConfig) -> None:
        super().__init__()
        if ctx.feature.fmt != "NCHW":
            raise ValueError("mlaan's heads pool feature maps: it needs NCHW features")
        self.task, self.cfg = ctx.task, cfg
        self.chain_layers: list[int] = []
        self._live: list[nn.Module] = []  # unregistered reference to the live layer the EMA tracks
        self.x_head = self.aug = self.ema = self.y_head = None
        if ctx.k == 0:
            return  # block 0 learns through the cascade of cut 1 only
        self.x_head = GAPHead(ctx, ctx.feature.num_chs)
        self.chain_layers = leap_chain(ctx.feature, ctx.next_features, cfg.chain_depth)
        self.aug = nn.ModuleList(copy.deepcopy(ctx.next_layers[j]) for j in self.chain_layers)
        if cfg.ema:
            self._live = [ctx.next_layers[self.chain_layers[0]]]
            self.ema = copy.deepcopy(self._live[0]).requires_grad_(False)
        self.y_head = GAPHead(ctx, ctx.next_features[self.chain_layers[-1]].num_chs)

    def leap(self, z: torch.Tensor) -> torch.Tensor:
        first = self.aug[0](z)
        z = first + self.ema(z) if self.ema is not None else first
        for layer in self.aug[1:]:
            z = layer(z)
        return z

    def forward(self, h: torch.Tensor, batch: Batch, cascade: torch.Tensor | None = None) -> dict:
        if self.x_head is None:
            return {"loss": h.new_zeros((), dtype=torch.float32)}
        out = {"x": self.task.loss(self.x_head(h), batch)}
        loss = self.cfg.wx * out["x"]
        if cascade is not None:
            out["y"] = self.task.loss(self.y_head(self.leap(cascade)), batch)
            loss = loss + self.cfg.wy * out["y"]
        out["loss"] = loss
        return out

    @torch.no_grad()
    def sync(self, layer: nn.Module) -> None:
        """EMA step of the chain's first copy towards the live layer it was copied from (``layer``,
        the first layer of block k+1, is not necessarily that one)."""
        if self.ema is None or not self._live:
            return
        ema = list(self.ema.parameters())
        live = [p.detach() for p in self._live[0].parameters()]
        torch._foreach_lerp_(ema, live, 1.0 - self.cfg.momentum)


class CascadeHead(nn.Module):
    """The last block: the task loss on its own output and on the cascade, both through the task head."""

    def __init__(self, inner: nn.Module, cfg: MLAANConfig) -> None:
        super().__init__()
        self.inner, self.cfg = inner, cfg

    @property
    def head(self) -> nn.Module:
        return self.inner.head

    def forward(self, h: torch.Tensor, batch: Batch, cascade: torch.Tensor | None = None) -> dict:
        out = dict(self.inner(h, batch))
        if cascade is None:
            return out
        out["x"] = out["loss"]
        out["y"] = self.inner(cascade, batch)["loss"]
        out["loss"] = self.cfg.wx * out["x"] + self.cfg.wy * out["y"]
        return out


class MLAAN(Method):
    name = "mlaan"
    paper = "Zhang et al., MLAAN: Multilaminar Leap Augmented Auxiliary Network, arXiv 2406.16633"
    Config = MLAANConfig
    window = 2
    needs_next = True
    composes_with_momentum = False  # LAM already puts an EMA copy of a later layer in front of the aux

    def check(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError(
                f"mlaan needs num_blocks (K) >= 2 (its cascade spans two blocks), got {num_blocks}"
            )
        if not 0.0 <= self.cfg.momentum <= 1.0:
            raise ValueError(f"mlaan EMA momentum must lie in [0, 1], got {self.cfg.momentum}")
        if self.cfg.chain_depth < 1:
            raise ValueError(f"mlaan chain_depth must be >= 1, got {self.cfg.chain_depth}")

    def build_aux(self, k: int, ctx: AuxContext) -> nn.Module:
        return MLAANAux(ctx, self.cfg)

    def make_aux(self, k: int, ctx: AuxContext) -> nn.Module:
        return self.build_aux(k, ctx)  # chain copies start equal to the live layers; heads keep their init

    def make_head(self, head: nn.Module) -> nn.Module:
        return CascadeHead(head, self.cfg)
