"""MLAAN: multilaminar leap augmented auxiliary network (Zhang et al., MLAAN: Scaling Supervised Local
Learning with Multilaminar Leap Augmented Auxiliary Network, arXiv 2406.16633; code Wendy231015/MLAAN).

MLM (PRIOR_ART §7.4): every block k >= 1 has two losses. The *independent* one reads block k's output
(GAP + local head, task loss). The *cascaded* one spans two blocks: block k-1 runs again on its
detached input, block k on that, and the result goes through the LAM chain of cut k and a GAP + local
head. Loss ``wx * L_independent + wy * L_cascaded`` with wx = 0.001, wy = 0.999; the gradient reaches
blocks k-1 and k only (the engine's window 2). Block 0 has no loss of its own, as in the official code:
it learns through the cascade of cut 1, and the logs report that cascaded loss as block 0's
(``engine.sequential.reported_losses``). The last block: ``wx * L(head(x)) + wy * L(head(y))``, x its
output, y the cascade through blocks K-2 and K-1.

LAM (PRIOR_ART §7.3): the chain of cut k is made of trainable copies of later backbone layers that
"leap" to the end. For the paper's cells (CIFAR ResNet-32 K=8 / 15 / 16, ResNet-110 K=32 / 54, with
the paper's cuts) the chains are the official lists of ``configAuxPlus_new.py`` (``OFFICIAL_CHAINS``).
Elsewhere our rule: the first layer of every later stage (``FeatureInfo.stage``) that changes the
feature shape, the last layer, then the latest remaining layers until ``chain_depth`` layers; where the
next copy expects a coarser map than the chain produces (a VGG stage ends in a max-pool carried by its
last conv), a max-pool bridges the gap. A frozen EMA copy of the chain's first layer is summed with its
trainable copy (``z = Aug_0(z) + EMA_0(z)``) and tracks the live layer after every step:
``theta_EMA <- m * theta_EMA + (1 - m) * theta_live`` (parameters only). Copies start equal to the live
layers (made after the backbone's init, as in the official code).

Deviations from the official code: the last block's independent loss is kept (the official code
overwrites it with the cascaded one); **every** EMA copy is updated each step (the official CIFAR code
only updates the last one, so the others stay at their step-0 snapshot); only the EMA copy that is used
(the chain's first layer) is built, and only the heads that are used (the official code builds 825
unused heads for ResNet-32); outside the paper's cells the chains come from the rule above (the
official lists are hand-picked per cut: for a cut in ResNet-110's last stage they keep 2 layers,
e.g. ``[[3,8],[3,17]]`` after ``[3,1]``, where the rule keeps 4); ResNet-32 K=16 (InfoPro's split, the
stem alone in block 0) takes the K=15 list of the same cut, the official code having no K=16 list;
block k-1's optimizer steps after block k's backward (the official code steps all blocks once per
batch, after every backward).

Memory and compute (ours, exact): the official code runs block k twice per cut, once on the detached
input for the independent loss and once inside the cascade, and holds both graphs. Block k-1's
parameters have not stepped since its own forward, so the cascade's block k-1 output has the same
values as block k's input: block k runs once, on the cascade, and both losses read that output;
the independent loss's gradient is kept from block k-1 by a backward pass restricted to block k's
parameters (``engine.step.cascade_backward``). Same gradients (to float order), one forward of
block k fewer, and the step holds one graph of blocks k-1 and k instead of that plus another of
block k (ShuffleNet-v2 K=3 at 64 px: block 1's saved bytes 40.1 -> 24.7 MiB, 17.2 with
``recompute``). Each block runs twice per step in training mode, as in the official code
(batch-norm statistics update twice; ``recompute``'s third run leaves them as they were)."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from locallearn.methods.auglocal import build_units
from locallearn.methods.base import AuxContext, Method, stage_starts
from locallearn.types import Batch, FeatureInfo


@dataclass
class MLAANConfig:
    wx: float = 0.001  # resnetMLAAN.py constructor default (independent path)
    wy: float = 0.999  # ... (cascaded path)
    chain_depth: int = 4  # longest list in configAuxPlus_new.py (our rule, outside the paper's cells)
    momentum: float = (
        0.995  # EMA momentum: MLAAN run files use 0.999 / 0.998 / 0.995; ImageNet --momentum2 0.995
    )
    ema: bool = True  # LAM's EMA copy on the chain's first layer
    official_chains: bool = True  # configAuxPlus_new.py's lists for the paper's cells (OFFICIAL_CHAINS)
    # ours: "layer" = the chain copies whole layers (the paper); "unit" = each layer's first unit (an
    # outside model's layer is a whole stage); "op" = the chain's first copy (and EMA) is the first
    # unit's conv-norm-activation where what follows it is fresh units (else as "unit");
    # "auto" = "op" on outside models only
    copy: str = "auto"
    # ours: the heads' rank: GAP -> Linear(C, width) -> the task's local head where C > width (0 =
    # auto: the paper's GAP -> local head on the listed backbones, a width sized to the backbone on
    # outside models, build.py; a 1000-class head on 2048 channels is 2 M parameters, one per path).
    # Auto on an outside model also builds the chain past its first layer as fresh units at most
    # that wide (copies of ResNet-18's last stages outweighed the backbone)
    width: int = 0
    # ours: block k-1, run again in cut k's cascade, keeps only its input and recomputes its activations
    # during backward (torch.utils.checkpoint; exact gradients, batch-norm statistics left as the
    # forward set them; one more forward of block k-1 per step, as many as the official code runs).
    # None = auto: on for models outside the papers' tables, where holding two blocks' activations
    # put MLAAN's step above bp's (docs/benchmarks.md), off on the listed backbones
    recompute: bool | None = None

    def __post_init__(self) -> None:
        if self.copy not in ("auto", "layer", "unit", "op"):
            raise ValueError(f"mlaan.copy must be 'auto', 'layer', 'unit' or 'op', got {self.copy!r}")
        if self.width < 0:
            raise ValueError(f"mlaan.width must be >= 0 (0 = auto), got {self.width}")


def _runs(*runs: tuple[int, list[list[int]]]) -> list[list[list[int]]]:
    return [chain for count, chain in runs for _ in range(count)]


_A32 = [[2, 0], [3, 0], [3, 2], [3, 4]]
_B32 = [[2, 0], [3, 0], [3, 3], [3, 4]]
_C32 = [[3, 0], [3, 2], [3, 3], [3, 4]]
_A110 = [[2, 0], [3, 0], [3, 2], [3, 17]]
_C110 = [[3, 0], [3, 2], [3, 3], [3, 17]]
_D110 = [[3, 0], [3, 3], [3, 4], [3, 17]]
_EVERY_32 = [[s, b] for s in (1, 2, 3) for b in range(5)]
_EVERY_110 = [[s, b] for s in (1, 2, 3) for b in range(18)]
_R32_15 = _runs((2, _A32), (1, _B32), (1, _A32), (1, _B32), (5, _C32), (1, [[3, 1], [3, 2], [3, 4]]),
                (1, [[3, 2], [3, 3], [3, 4]]), (1, [[3, 3], [3, 4]]), (1, [[3, 4]]))  # fmt: skip
_R110_32_CUTS = [
    [1, 1], [1, 2], [1, 4], [1, 5], [1, 7], [1, 9], [1, 11], [1, 13], [1, 14], [1, 16], [1, 17],
    [2, 1], [2, 2], [2, 4], [2, 5], [2, 7], [2, 9], [2, 11], [2, 13], [2, 14], [2, 16], [2, 17],
    [3, 1], [3, 3], [3, 4], [3, 6], [3, 7], [3, 9], [3, 11], [3, 13], [3, 15],
]  # fmt: skip

# Wendy231015/MLAAN "CIFAR-SVHN-STL/networks/configAuxPlus_new.py" (PRIOR_ART §7.3), the LAM chain of
# each cut as [stage, block] lists, paired with the cut ([stage, block] it follows, config2.py) that the
# list belongs to. Keys: CIFAR ResNet depth, then our K (config2.py's K, the stem in block 0; K=16 is
# InfoPro's split, whose extra cut after the stem has no chain: block 0 learns through the cascade).
OFFICIAL_CHAINS: dict[int, dict[int, list[tuple[list[int], list[list[int]] | None]]]] = {
    32: {
        8: list(zip([[1, 0], [1, 2], [1, 4], [2, 1], [2, 3], [3, 0], [3, 2]],
                    _runs((2, _A32), (1, _B32), (2, _C32), (1, [[3, 2], [3, 3], [3, 4]]), (1, [[3, 3], [3, 4]])),
                    strict=True)),
        15: list(zip(_EVERY_32[:-1], _R32_15, strict=True)),
        16: [([0, 0], None), *zip(_EVERY_32[:-1], _R32_15, strict=True)],
    },
    110: {
        32: list(zip(_R110_32_CUTS, _runs((11, _A110), (10, _C110), (1, _D110), (4, [[3, 8], [3, 17]]),
                                          (2, [[3, 14], [3, 17]]), (1, [[3, 15], [3, 17]]),
                                          (1, [[3, 16], [3, 17]]), (1, [[3, 17]])), strict=True)),
        54: list(zip(_EVERY_110[:-1], _runs((18, _A110), (17, _C110), (1, _D110), (7, [[3, 8], [3, 17]]),
                                            (4, [[3, 14], [3, 17]]), (2, [[3, 15], [3, 17]]),
                                            (3, [[3, 16], [3, 17]]), (1, [[3, 17]])), strict=True)),
    },
}  # fmt: skip


def cifar_resnet_layout(num_layers: int) -> list[FeatureInfo] | None:
    """The layers of the InfoPro-lineage CIFAR ResNet with ``num_layers`` layers (stem + 3 stages of
    equal length, widths 16 / 16 / 32 / 64), or None when no such ResNet has that many layers."""
    units, rest = divmod(num_layers - 1, 3)
    if rest or units < 1:
        return None
    stages = [FeatureInfo(16, 1, stage=0)]
    for s, (width, reduction) in enumerate(((16, 1), (32, 2), (64, 4)), start=1):
        stages += [FeatureInfo(width, reduction, stage=s)] * units
    return stages


def official_chain(ctx: AuxContext) -> list[int] | None:
    """The official chain of this cut (indices into ``ctx.next_layers``) when the backbone is a CIFAR
    ResNet of a paper cell and the cut is that cell's k-th cut; otherwise None."""
    layout = cifar_resnet_layout(ctx.num_layers)
    depth = 6 * ((ctx.num_layers - 1) // 3) + 2
    table = OFFICIAL_CHAINS.get(depth, {}).get(ctx.num_blocks) if layout else None
    if table is None or len(table) != ctx.num_blocks - 1:
        return None
    cut = ctx.num_layers - len(ctx.next_layers)
    ours = [ctx.feature, *ctx.next_features]
    if [(f, f.stage) for f in ours] != [(f, f.stage) for f in layout[cut - 1 :]]:
        return None  # not the CIFAR ResNet's layers
    units = (ctx.num_layers - 1) // 3

    def index(stage: int, block: int) -> int:
        return 0 if stage == 0 else 1 + (stage - 1) * units + block

    after, chain = table[ctx.k]
    if index(*after) + 1 != cut or chain is None:
        return None
    return [index(s, b) - cut for s, b in chain]


def leap_chain(start: FeatureInfo, features: list[FeatureInfo], depth: int) -> list[int]:
    """Indices (into the layers after the cut) of our LAM chain: the first layer of every later stage
    that changes the shape, the last layer, then the latest others until ``depth`` layers."""
    inputs = [start, *features[:-1]]
    needed = {
        j for j in stage_starts(features) if features[j].stage > start.stage and features[j] != inputs[j]
    } | {len(features) - 1}
    for j in reversed(range(len(features))):
        if len(needed) >= depth:
            break
        needed.add(j)
    chain = sorted(needed)
    chain_pools(start, features, chain)
    return chain


def chain_pools(start: FeatureInfo, features: list[FeatureInfo], chain: list[int]) -> list[int]:
    """The max-pool factor in front of each chain layer (1: none); raises when the chain does not fit."""
    inputs = [start, *features[:-1]]
    current, pools = start, []
    for j in chain:
        want, factor = inputs[j], 1
        if want != current and want.fmt == current.fmt == "NCHW" and want.num_chs == current.num_chs:
            factor = want.reduction // current.reduction
            if factor * current.reduction != want.reduction or factor < 2:
                factor = 0
        if factor == 0 or (factor == 1 and want != current):
            raise ValueError(f"LAM chain {chain} does not fit: layer {j} expects {want}, gets {current}")
        pools.append(factor)
        current = features[j]
    return pools


class GAPHead(nn.Sequential):
    def __init__(self, ctx: AuxContext, chs: int, width: int | None = None) -> None:
        if width and chs > width:  # a rank-``width`` linear head
            super().__init__(
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(chs, width, bias=False),
                ctx.task.local_head(width),
            )
        else:
            super().__init__(nn.AdaptiveAvgPool2d(1), nn.Flatten(), ctx.task.local_head(chs))


class MLAANAux(nn.Module):
    """Independent head on block k's output; cascaded path through the LAM chain (k >= 1)."""

    recompute_option = "mlaan.recompute"  # named by engine.compile when ``recompute`` is on

    def __init__(self, ctx: AuxContext, cfg: MLAANConfig) -> None:
        super().__init__()
        if ctx.feature.fmt != "NCHW":
            raise ValueError("mlaan's heads pool feature maps: it needs NCHW features")
        self.task, self.cfg = ctx.task, cfg
        self.chain_layers: list[int] = []
        self._live: list[nn.Module] = []  # unregistered reference to the live layer the EMA tracks
        self.x_head = self.aug = self.pools = self.ema = self.y_head = None
        # read by engine.step.block_forward (block k-1 in this cut's cascade) and engine.compile
        self.recompute = bool(ctx.outside if cfg.recompute is None else cfg.recompute)
        if ctx.k == 0:
            return  # block 0 learns through the cascade of cut 1 only
        width = cfg.width or ctx.width
        self.x_head = GAPHead(ctx, ctx.feature.num_chs, width)
        chain = official_chain(ctx) if cfg.official_chains else None
        self.chain_layers = chain or leap_chain(ctx.feature, ctx.next_features, cfg.chain_depth)
        pools = chain_pools(ctx.feature, ctx.next_features, self.chain_layers)
        self.pools = nn.ModuleList(nn.MaxPool2d(f) if f > 1 else nn.Identity() for f in pools)
        n = len(self.chain_layers)
        # a unit or op (outside models) stands in for its layer where the next copy reads what it
        # outputs; fresh units past the first (outside models, width auto) read any shape
        fresh = bool(ctx.width and not cfg.width)
        sources = [
            ctx.copy_source(j, cfg.copy, chained=i < n - 1 and not fresh)
            for i, j in enumerate(self.chain_layers)
        ]
        self.aug = nn.ModuleList(copy.deepcopy(m) for m, _ in sources[:1])
        out = sources[0][1]
        for (module, feature), j in zip(sources[1:], self.chain_layers[1:]):
            if ctx.width and not cfg.width:
                # outside models: past the first (the EMA's twin, which must be a copy) the chain is
                # fresh units of the later layers' shapes, at most ``width`` wide (AugLocal's)
                (unit,), chs = build_units(out, [ctx.next_features[j]], like=[module], width=ctx.width)
                self.aug.append(unit)
                out = dataclasses.replace(feature, num_chs=chs)
            else:
                self.aug.append(copy.deepcopy(module))
                out = feature
        if cfg.ema:
            self._live = [sources[0][0]]  # a unit shares its layer's live weights
            self.ema = copy.deepcopy(self._live[0]).requires_grad_(False)
        self.y_head = GAPHead(ctx, out.num_chs, width)

    def leap(self, z: torch.Tensor) -> torch.Tensor:
        z = self.pools[0](z)
        first = self.aug[0](z)
        z = first + self.ema(z) if self.ema is not None else first
        for pool, layer in zip(self.pools[1:], self.aug[1:]):
            z = layer(pool(z))
        return z

    def forward(self, h: torch.Tensor, batch: Batch, cascade: bool = False) -> dict:
        """``cascade`` (the training step): ``h`` is block k's output on block k-1 run again, so the
        cascaded loss reads it too; the two terms come back apart for ``engine.step.cascade_backward``
        (the independent one's gradient must not reach block k-1)."""
        if self.x_head is None:
            zero = h.new_zeros((), dtype=torch.float32)
            return {"loss": zero, "own_loss": zero, "cascade_loss": zero} if cascade else {"loss": zero}
        output = self.x_head(h)
        out = {"x": self.task.loss(output, batch), "output": output}
        out["loss"] = self.cfg.wx * out["x"]
        if cascade:
            out["y"] = self.task.loss(self.y_head(self.leap(h)), batch)
            out["own_loss"], out["cascade_loss"] = out["loss"], self.cfg.wy * out["y"]
            out["loss"] = out["own_loss"] + out["cascade_loss"]
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

    recompute_option = "mlaan.recompute"

    def __init__(self, inner: nn.Module, cfg: MLAANConfig, recompute: bool = False) -> None:
        super().__init__()
        self.inner, self.cfg, self.recompute = inner, cfg, recompute

    @property
    def head(self) -> nn.Module:
        return self.inner.head

    def forward(self, h: torch.Tensor, batch: Batch, cascade: bool = False) -> dict:
        """``cascade``: ``h`` carries block K-2's graph; the independent and cascaded losses are one
        value (the head on one output), weighted wx (block K-1 and the head only) and wy (both blocks)."""
        out = dict(self.inner(h, batch))
        if not cascade:
            return out
        out["x"] = out["y"] = out["loss"]
        out["own_loss"], out["cascade_loss"] = self.cfg.wx * out["x"], self.cfg.wy * out["y"]
        out["loss"] = out["own_loss"] + out["cascade_loss"]
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
        self._outside = ctx.outside  # the last block's cascade (make_head) follows the auxes'
        return MLAANAux(ctx, self.cfg)

    def make_aux(self, k: int, ctx: AuxContext) -> nn.Module:
        return self.build_aux(k, ctx)  # chain copies start equal to the live layers; heads keep their init

    def make_head(self, head: nn.Module) -> nn.Module:
        outside = getattr(self, "_outside", False)
        return CascadeHead(head, self.cfg, outside if self.cfg.recompute is None else self.cfg.recompute)
