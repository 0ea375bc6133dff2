"""MAN and MAN++: momentum auxiliary networks, in front of any base method's aux.

MAN: Su et al., Momentum Auxiliary Network for Supervised Local Learning, ECCV 2024 (arXiv 2407.05623).
MAN++: Su et al., MAN++: Scaling Momentum Auxiliary Network for Supervised Local Learning in Vision
Tasks, TPAMI 2026 (arXiv 2507.16279).

A local block only sees its own aux, so its features drift from what the next block wants. MAN gives
the aux of cut k a view of the next block: ``EMA`` is a frozen copy of layer ``n`` (the first layer of
block k+1) that tracks the live layer by an exponential moving average of its parameters
(``theta_EMA <- m * theta_EMA + (1 - m) * theta_n`` after each step, parameters only), and ``LB`` is a
trainable copy of the same layer that can learn what the EMA lacks. The aux input is
``y = s * LB(h) + (2 - s) * EMA(h)`` (MAN++, ``s`` a learnable scalar initialised to 1) or
``y = LB(h) + EMA(h)`` (MAN); the base method's aux is built for layer n's output. Gradients reach
``h`` through both branches; the EMA's parameters are frozen, its activations are not.

Switches ``ema``, ``lb``, ``scale`` give the rows of MAN++ Table VII (base / +EMA / +EMA+LB /
+EMA+LB+scale). ``init: fresh`` (default) follows the official code, where the copies are made before
the init loop and so start independently re-initialised; the EMA then converges to layer n over
~1/(1-m) steps. ``init: copy`` starts both as exact copies of layer n; note that then
``y = 2 * layer(h)`` for any ``s`` until the copies diverge, so ``s`` receives no gradient at first.

Deviations from the official code: the EMA is updated after the optimizer step of the block that owns
layer n (fresh weights) instead of before the single end-of-batch step (one step stale); the update
is one fused ``torch._foreach_lerp_`` over all parameters; the EMA copy takes no weight gradients
(``requires_grad=False``) and is excluded from the optimizer; EMA momentum defaults to 0.995 (the
README value) instead of the CIFAR argparse default 1.0, which freezes the EMA (PRIOR_ART §6.4).
On a model from outside the papers' tables, whose layers are whole stages, LB and EMA copy the first
op of layer n: its first unit's leading conv-norm-activation (``copy: auto``; the EMA then follows it
by parameter name; ``aux_budget.py``). A copy of the whole first unit (``copy: unit``) kept ResNet-18's
whole step above ``bp``'s at 64 and 224 px: on small images every copied weight costs weight, gradient
and momentum, and the copies of ``layer4.0`` alone hold a third of the backbone.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from locallearn.methods.base import AuxContext, Method
from locallearn.methods.man_grouped import GroupedPair, Unsupported
from locallearn.methods.vit_aux import vit_base_aux
from locallearn.types import Batch

log = logging.getLogger(__name__)
_LOGGED: set[tuple[str, bool]] = set()


@dataclass
class MomentumConfig:
    momentum: float = 0.995  # MAN / MAN++ READMEs --momentum 0.995 (argparse default 1.0 freezes the EMA)
    init: str = "fresh"  # "fresh" = official (independent re-init); "copy" = exact copies of layer n
    ema: bool = True  # Table VII switches
    lb: bool = True
    scale: bool = True  # MAN++; MAN has no scale
    # ours, not the papers': recompute the LB / EMA copies during backward instead of keeping their
    # activations (exact gradients; one more forward of the next layer per block). Their BN running
    # statistics see each batch twice, which changes nothing: the aux is not used at evaluation.
    recompute: bool = False
    # ours: run LB and EMA as one grouped call (``man_grouped``); bitwise equal values and gradients,
    # for layers made of Conv2d / BatchNorm2d / ReLU / pooling / additions, the two calls otherwise.
    # Off by default: on CPU the stacked tensors are slower (see benchmarks/results/manpp_grouped*.md).
    grouped: bool = False
    # ours: what LB and EMA copy. "layer" = the next layer (the papers: one residual unit of their
    # backbones); "unit" = its first unit (an outside model's layer is a whole stage: two copies of
    # ResNet-50's layer4 alone outweigh the backbone); "op" = that unit's first conv-norm-activation;
    # "auto" = "op" on outside models only (module docstring).
    copy: str = "auto"

    def __post_init__(self) -> None:
        if self.copy not in ("auto", "layer", "unit", "op"):
            raise ValueError(f"momentum.copy must be 'auto', 'layer', 'unit' or 'op', got {self.copy!r}")


class MomentumAux(nn.Module):
    """``y = s*LB(h) + (2-s)*EMA(h)`` (or the enabled subset) fed to the base method's aux."""

    def __init__(self, layer: nn.Module, base_aux: nn.Module, cfg: MomentumConfig, init_weights=None) -> None:
        super().__init__()
        if not (cfg.ema or cfg.lb):
            raise ValueError("momentum aux needs at least one of ema / lb")
        if cfg.scale and not (cfg.ema and cfg.lb):
            raise ValueError("the MAN++ scale weighs LB against EMA: it needs both ema and lb")
        if cfg.init not in ("fresh", "copy"):
            raise ValueError(f"momentum init must be 'fresh' or 'copy', got {cfg.init!r}")
        if not 0.0 <= cfg.momentum <= 1.0:
            raise ValueError(f"EMA momentum must lie in [0, 1], got {cfg.momentum}")
        self.momentum = cfg.momentum
        self.recompute = cfg.recompute
        self.lb = self._copy(layer, cfg.init, init_weights) if cfg.lb else None
        self.ema = self._copy(layer, cfg.init, init_weights) if cfg.ema else None
        if self.ema is not None:
            self.ema.requires_grad_(False)
        self.scale = nn.Parameter(torch.tensor(1.0)) if cfg.scale else None
        self.base = base_aux
        self.pair = self._grouped(layer) if cfg.grouped and cfg.lb and cfg.ema else None

    def _grouped(self, layer: nn.Module) -> GroupedPair | None:
        """The grouped call if the layer supports it (plain data, no state_dict keys); logs the path
        once per layer type."""
        try:
            pair, why = GroupedPair(self.lb, self.ema), ""
        except Unsupported as err:
            pair, why = None, f": {err}"
        key = (type(layer).__name__, pair is not None)
        if key not in _LOGGED:
            _LOGGED.add(key)
            path = "one grouped call" if pair is not None else "two separate calls"
            log.info("momentum aux: LB and EMA copies of %s run as %s%s", key[0], path, why)
        return pair

    @staticmethod
    def _copy(layer: nn.Module, init: str, init_weights) -> nn.Module:
        twin = copy.deepcopy(layer)
        if init == "fresh" and init_weights is not None:
            init_weights(twin)
        return twin

    def branch(self, copy_, h: torch.Tensor):
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(copy_, h, use_reentrant=False)
        return copy_(h)

    def fuse(self, h: torch.Tensor) -> torch.Tensor:
        if self.lb is None:
            return self.branch(self.ema, h)
        if self.ema is None:
            return self.branch(self.lb, h)
        if self.pair is not None:
            lb, ema = self.branch(self.pair, h)
        else:
            lb, ema = self.branch(self.lb, h), self.branch(self.ema, h)
        if self.scale is None:
            return lb + ema
        return self.scale * lb + (2 - self.scale) * ema

    def forward(self, h: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        out = dict(self.base(self.fuse(h), batch))
        if self.scale is not None:
            out["s"] = self.scale.detach()
        return out

    @torch.no_grad()
    def sync(self, layer: nn.Module) -> None:
        """EMA step towards the live ``layer`` (parameters only; BN buffers stay the EMA's own)."""
        if self.ema is None:
            return
        ema_params = list(self.ema.parameters())
        live = [p.detach() for p in layer.parameters()]
        if len(ema_params) != len(live):  # a copy of the layer's first unit: the same names
            named = dict(layer.named_parameters())
            try:
                live = [named[n].detach() for n, _ in self.ema.named_parameters()]
            except KeyError:
                raise RuntimeError("EMA copy and live layer have different parameter lists") from None
        torch._foreach_lerp_(ema_params, live, 1.0 - self.momentum)


class Momentum(Method):
    """Wraps a base method: ``dgl+manpp``, ``infopro+man``, ..."""

    Config = MomentumConfig
    needs_next = True

    def __init__(self, base: Method, cfg: MomentumConfig, name: str) -> None:
        super().__init__(cfg)
        self.base = base
        self.name = f"{base.name}+{name}"
        self.window = base.window

    def check(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError(
                f"{self.name} needs num_blocks (K) >= 2: momentum aux copies the next block's layer"
            )
        self.base.check(num_blocks)

    def build_aux(self, k: int, ctx: AuxContext) -> nn.Module:
        # The fused copies stand in for layer n, so the base aux sees the network from after layer n
        # (AugLocal samples and SLM replicates the layers behind it, not layer n again).
        # A copy of the layer's first op or unit (outside models) feeds the base aux its output; a
        # base aux that runs copies of later layers on it (SLM) then needs the layer's own output.
        chained = self.base.replicates_later(ctx) and len(ctx.next_layers) > 1
        source, out = ctx.copy_source(0, self.cfg.copy, chained=chained)
        inner = ctx.after_next().with_feature(out)
        if inner.feature.fmt == "NLC" and inner.next_layers:  # MAN++ ViT aux: LB spans two blocks
            base_aux = vit_base_aux(self.base, k, inner, self.cfg.init)
        else:
            base_aux = self.base.make_aux(k, inner)
        return MomentumAux(source, base_aux, self.cfg, ctx.init_weights)

    def sized_by_width(self) -> bool:
        return self.base.sized_by_width()

    def shrink_options(self) -> list[str]:
        return self.base.shrink_options()

    def make_head(self, head: nn.Module) -> nn.Module:
        return self.base.make_head(head)

    def make_aux(self, k: int, ctx: AuxContext) -> nn.Module:
        return self.build_aux(k, ctx)  # the base aux is initialised; the copies are set up by ``init``


MAN_DEFAULTS = {"man": {"scale": False}, "manpp": {"scale": True}}
