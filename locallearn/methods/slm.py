"""SLM + feature bank: the memory-augmented MAN ("Advancing Supervised Local Learning Beyond
Classification with Long-term Feature Bank", anonymous conference submission in ICLR format; no arXiv
id and no public code found; ``../shared/papers/man-memory-augmented-feature-bank.txt`` §3.2, §4).

*Simple local module* (SLM, §4.1): the aux of a cut is a downsized replica of the rest of the
backbone, one layer per remaining stage (``n_{s,A} = 1``): a fresh copy of each stage's first layer
(the one that maps the previous stage's shape to this one; stages come from ``FeatureInfo.stage``),
re-initialised with the backbone's init, ending in the task's own head type and trained with the
task's own loss.

*Feature bank* (§3.2, Eq. 5: ``L_A = L(y, f_A(x; F_bank, W))``): the aux reads banked features *as
inputs*. The bank is the engine's per-batch ``FeatureBank``: the maps before each down-sampling
(``C2``, ``C3``, ...) written detached by the blocks that own those layers, so an aux only ever reads
what earlier blocks wrote and no gradient crosses blocks through it.

- Detection / dense tasks (§4.2, §4.3): the replica's stage outputs and the banked maps of the stages
  already passed form a multi-scale set (e.g. C3 from the bank, C4 and C5 from the replica); the
  task's local head builds a *local FPN* over it and, with ``share_head`` (default, the paper's "Head"
  column of Table 4), predicts with the main head's prediction layers. The shared layers belong to the
  last block: every aux's backward adds its gradient to them, and the last block's optimizer steps them
  once per batch (they are not registered in the aux, so no other optimizer touches them). Ours: the
  shared layers take the main loss's gradient plus the *mean* of the K-1 auxes' (``shared_head_grad=
  mean``, the default); the paper does not say, and the plain sum (``sum``) adds K-1 aux gradients to
  the main one, which took RetinaNet at K=4 to NaN at the lr end-to-end training uses. YOLOv1
  has no FPN: its local head adds the C3 / C4 maps (banked or the replica's) into its deepest map
  through zero-initialised 1x1 convs, and passes through a shared head leave that head's BN running
  statistics alone (tasks/yolo.py). Tasks may also hand the aux other entries (super-resolution: the LR
  input image, fused before upsampling).
- Classification: the banked maps of earlier stages are projected by a 1x1 conv (zero-initialised, so
  a fresh aux starts as the plain replica) to the replica's final width, average-pooled to its
  resolution and added to its output before the head: the aux sees the multi-scale features the
  backbone built, not only its own block's.

``bank: false`` is the paper's "Adapt" ablation without the bank. ``prototype_weight > 0`` adds our
earlier definition as an option: a per-class running mean of the final representation (kept as model
buffers by the last block) that each replica's pooled output is pulled towards by
``prototype_weight * (1 - cos)``; it runs in one process only (pipeline refuses it, as it refuses a
shared head living on another rank).

Deviations from the paper: the paper does not say how banked maps enter a classification aux; the
additive projection above is ours. The local FPN resamples levels the aux cannot provide (see
tasks/detection.py).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from locallearn.methods.auglocal import build_units
from locallearn.methods.base import AuxContext, Method, level_name, stage_starts
from locallearn.types import Batch, FeatureInfo


@dataclass
class SLMConfig:
    bank: bool = True  # read the feature bank (False = SLM alone, the paper's ablation)
    share_head: bool = True  # dense tasks: predict with the main head's layers (MAN Table 4, "Head")
    # the shared layers' gradient: the main loss's + the "mean" of the K-1 auxes' (ours), or + their "sum"
    # (RetinaNet at K=4 went NaN at the lr bp trains at; tasks/base.py HeadRef, docs/detection.md)
    shared_head_grad: str = "mean"
    prototype_weight: float = 0.0  # ours, optional: cosine pull to banked per-class representations
    bank_momentum: float = 0.9  # ours: running mean of those per-class representations
    # ours: the replica's widest channels. 0 = auto: on the listed backbones the replica copies each
    # remaining stage's first layer (the paper); on outside models, whose layers are whole stages, it
    # is fresh units of those stages' shapes (AugLocal's), none wider than a width sized to the
    # backbone (build.py): the paper's "downsized replica". A width > 0 builds such units everywhere.
    width: int = 0

    def __post_init__(self) -> None:
        if self.width < 0:
            raise ValueError(f"slm.width must be >= 0 (0 = auto), got {self.width}")
        if self.shared_head_grad not in ("mean", "sum"):
            raise ValueError(f"slm.shared_head_grad must be 'mean' or 'sum', got {self.shared_head_grad!r}")


def pooled(h: torch.Tensor) -> torch.Tensor:
    """The representation a classification head reads: GAP of a map, the class token of tokens."""
    return F.adaptive_avg_pool2d(h, 1).flatten(1) if h.dim() == 4 else h[:, 0]


class PrototypeBank(nn.Module):
    """Per-class running means of the final representation (the ``prototype_weight`` option)."""

    def __init__(self, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum

    @torch.no_grad()
    def write_class_means(self, name: str, features: torch.Tensor, labels: torch.Tensor, num: int) -> None:
        features = features.detach().float()
        if name not in self._buffers:
            self.register_buffer(name, features.new_zeros(num, features.shape[1]))
            self.register_buffer(f"{name}_seen", torch.zeros(num, dtype=torch.bool, device=features.device))
        bank, seen = self._buffers[name], self._buffers[f"{name}_seen"]
        sums = bank.new_zeros(bank.shape).index_add_(0, labels, features)
        counts = torch.bincount(labels, minlength=num).to(bank.dtype)
        present = counts > 0
        means = sums[present] / counts[present, None]
        m = torch.where(seen[present], self.momentum, 0.0)[:, None]  # first sighting: take the mean
        bank[present] = m * bank[present] + (1 - m) * means
        seen |= present

    def read(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        if name not in self._buffers:
            return None
        return self._buffers[name], self._buffers[f"{name}_seen"]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        for key in [k for k in state_dict if k.startswith(prefix)]:  # buffers are created on first write
            name = key[len(prefix) :]
            if name not in self._buffers and "." not in name:
                self.register_buffer(name, torch.empty_like(state_dict[key]))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)


def replica(ctx: AuxContext) -> tuple[list[nn.Module], list[int]]:
    """Fresh copies of the first layer of each remaining stage, and their indices after the cut."""
    starts = stage_starts(ctx.next_features)
    return [copy.deepcopy(ctx.next_layers[j]) for j in starts], starts


def downsized_replica(ctx: AuxContext, width: int) -> tuple[list[nn.Module], FeatureInfo]:
    """New units shaped like each remaining stage's first layer, at most ``width`` channels wide
    (AugLocal's units); and what the last one outputs."""
    starts = stage_starts(ctx.next_features)
    targets = [ctx.next_features[j] for j in starts]
    units, chs = build_units(ctx.feature, targets, like=[ctx.next_layers[j] for j in starts], width=width)
    last = targets[-1] if targets else ctx.feature
    return units, dataclasses.replace(last, num_chs=chs)


# On outside models the bank starts at stride 4 (C2), as an FPN's levels do: the stem's map at half the
# image size (C1) is the largest a backbone makes, and banking it for the aux nets to read held it for
# the whole step (ResNet-18 at 224 px: 98 MiB at batch 32, SLM's whole step 1.04x bp's).
OUTSIDE_MIN_REDUCTION = 4


def banked_levels(ctx: AuxContext) -> list[str]:
    """The stage-end maps written before this cut, shallower than the aux's own input (from C2 on
    outside models: ``OUTSIDE_MIN_REDUCTION``)."""
    least = OUTSIDE_MIN_REDUCTION if ctx.outside else 1
    return [
        name
        for name, f in ctx.bank.items()
        if name.startswith("C") and f.fmt == "NCHW" and least <= f.reduction < ctx.feature.reduction
    ]


class SLMAux(nn.Module):
    """Classification: replica(h) + projected bank maps -> the task head."""

    def __init__(self, ctx: AuxContext, cfg: SLMConfig, prototypes: PrototypeBank | None) -> None:
        super().__init__()
        self.task, self.cfg = ctx.task, cfg
        width = cfg.width or ctx.width
        if width:
            layers, last = downsized_replica(ctx, width)
        else:
            layers, _ = replica(ctx)
            last = ctx.next_features[-1] if ctx.next_features else ctx.feature
        self.replica = nn.Sequential(*layers)
        self.reads = tuple(banked_levels(ctx)) if cfg.bank and last.fmt == "NCHW" else ()
        self.project = nn.ModuleList(nn.Conv2d(ctx.bank[n].num_chs, last.num_chs, 1) for n in self.reads)
        self.head = ctx.task.build_head(last)
        self._prototypes = [prototypes] if prototypes is not None else []  # owned by the last block

    def reset_bank_projections(self) -> None:
        for conv in self.project:  # a fresh aux is the plain replica; the bank's weight is learnt
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, h: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        a = self.replica(h)
        for name, conv in zip(self.reads, self.project):
            # pooled before the 1x1 projection, not after: the same sum (each pooled value is a mean,
            # and an affine map commutes with a mean), without a full-size map of the replica's width
            # saved for backward (on ResNet-18 at 64 px, 64 MiB at batch 32 for the last cut's aux)
            a = a + conv(F.adaptive_avg_pool2d(batch.bank.read(name), a.shape[-2:]))
        output = self.head(a)
        out = {"task": self.task.loss(output, batch), "output": output}
        loss = out["task"]
        entry = self._prototypes[0].read("final") if self._prototypes else None
        if entry is not None:
            protos, seen = entry
            known = seen[batch.y]
            if known.any():
                cos = F.cosine_similarity(pooled(a)[known].float(), protos[batch.y[known]], dim=1)
                out["prototype"] = (1 - cos).mean()
                loss = loss + self.cfg.prototype_weight * out["prototype"]
        out["loss"] = loss
        return out


class DenseSLMAux(nn.Module):
    """Dense tasks: own map + replica stage outputs + banked maps (+ task entries) -> local head."""

    def __init__(self, ctx: AuxContext, cfg: SLMConfig) -> None:
        super().__init__()
        self.task = ctx.task
        layers, starts = replica(ctx)
        self.replica = nn.ModuleList(layers)
        self.own = level_name(ctx.feature)
        self.names = [level_name(ctx.next_features[j]) for j in starts]
        features = {self.own: ctx.feature}
        features.update({n: ctx.next_features[j] for n, j in zip(self.names, starts)})
        wanted = [n for n in (*ctx.task.levels, *ctx.task.local_reads) if n in ctx.bank and n not in features]
        self.reads = tuple(wanted) if cfg.bank else ()
        features.update({n: ctx.bank[n] for n in self.reads})
        shared = ctx.head_ref if cfg.share_head else None
        if shared is not None:
            shared.reduce = cfg.shared_head_grad
        self.head = ctx.task.build_local_head(features, shared)
        # the shared layers live on the last block's rank: a pipeline cannot split them from this aux
        self.single_process = "slm share_head=true" if cfg.share_head else ""

    def forward(self, h: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        maps = {self.own: h}
        for name, layer in zip(self.names, self.replica):
            h = layer(h)
            maps[name] = h  # a deeper map at the same stride replaces the shallower one
        maps.update({n: batch.bank.read(n) for n in self.reads})
        output = self.head(maps)
        return {"loss": self.task.loss(output, batch), "output": output}


class PrototypeWriter(nn.Module):
    """The last block with ``prototype_weight > 0``: task head and loss unchanged; in training, banks
    the per-class mean of the final representation."""

    single_process = "slm prototype_weight > 0"

    def __init__(self, inner: nn.Module, bank: PrototypeBank) -> None:
        super().__init__()
        self.inner, self.bank = inner, bank

    @property
    def head(self) -> nn.Module:
        return self.inner.head

    def forward(self, h: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        out = self.inner(h, batch)
        if self.training and batch.y.dim() == 1 and not batch.y.is_floating_point():
            num = out["output"].shape[1] if "output" in out else int(batch.y.max()) + 1
            self.bank.write_class_means("final", pooled(h), batch.y, num)
        return out


class SLM(Method):
    name = "slm"
    paper = "memory-augmented MAN: Advancing Supervised Local Learning Beyond Classification with Long-term Feature Bank (SLM + feature bank; no arXiv id)"
    Config = SLMConfig

    def replicates_later(self, ctx: AuxContext) -> bool:
        return ctx.task.dense or not (self.cfg.width or ctx.width)  # else a downsized replica

    def sized_by_width(self) -> bool:
        return self.cfg.width == 0 and not self.cfg.prototype_weight  # prototypes: the final width

    def __init__(self, cfg: SLMConfig | None = None) -> None:
        super().__init__(cfg)
        self.prototypes = PrototypeBank(self.cfg.bank_momentum) if self.cfg.prototype_weight > 0 else None

    def check(self, num_blocks: int) -> None:
        if not 0.0 <= self.cfg.bank_momentum < 1.0:
            raise ValueError(f"slm bank_momentum must lie in [0, 1), got {self.cfg.bank_momentum}")
        if self.cfg.prototype_weight < 0:
            raise ValueError(f"slm prototype_weight must be >= 0, got {self.cfg.prototype_weight}")

    def build_aux(self, k: int, ctx: AuxContext) -> nn.Module:
        if ctx.task.dense:
            return DenseSLMAux(ctx, self.cfg)
        if self.prototypes is not None and ctx.task.name != "classification":
            raise ValueError("slm prototype_weight > 0 needs class labels (task classification)")
        return SLMAux(ctx, self.cfg, self.prototypes)

    def make_aux(self, k: int, ctx: AuxContext) -> nn.Module:
        aux = super().make_aux(k, ctx)
        for module in aux.modules():
            if isinstance(module, SLMAux):
                module.reset_bank_projections()
        return aux

    def make_head(self, head: nn.Module) -> nn.Module:
        return PrototypeWriter(head, self.prototypes) if self.prototypes is not None else head
