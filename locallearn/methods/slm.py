"""SLM + feature bank: the memory-augmented MAN ("Advancing Supervised Local Learning Beyond
Classification with Long-term Feature Bank", anonymous conference submission in ICLR format; no arXiv
id and no public code found; ``../shared/papers/man-memory-augmented-feature-bank.txt`` §3.2, §4.1).

*Simple local module* (SLM, §4.1): the aux of a cut is a downsized replica of the rest of the
backbone, one layer per remaining stage (``n_{s,A} = 1``), ending in the task's own head type and
trained with the task's own loss. A "stage" is a run of consecutive layers after the cut with the same
output shape (``FeatureInfo``); its replica layer is a fresh copy of the stage's first layer (the one
that maps the previous stage's shape to this one), re-initialised with the backbone's init, so the
replica chains for any backbone family.

*Feature bank* (§3.2): a store of the task's key features, written without gradient and read by every
aux. What we bank, for classification: the **final-stage representation** the task head reads (the
globally pooled output of the backbone's last layer), as one running mean per class,
``P[c] <- m * P[c] + (1 - m) * mean(r_i : y_i = c)`` with m = ``bank_momentum``, written by the last
block after each training step (its real, live output, detached). How it enters the aux: the SLM
replica ends in its own final-stage representation ``a`` (same width, since the replica ends in the
last stage's shape); besides the task loss on ``head(a)``, the aux pulls ``a`` towards the banked
representation of the sample's class, ``bank_weight * (1 - cos(a_i, P[y_i]))`` over classes the bank
has seen. Why this choice: the paper names "fc features" as the key feature of classification and asks
the aux to use them "as the backbone does"; the current batch's final representation does not exist
yet when block k trains (blocks run in order), so we keep its long-term per-class summary, and the
backbone's own use of it is as the input of the classifier, which the cosine term makes the replica
imitate. It reaches earlier blocks the downstream view that the short-sighted local loss lacks. The
bank's tensors are buffers written under ``no_grad`` from detached tensors, so no gradient crosses
blocks through it; it is saved with the model. Other tasks bank other entries under other names
(detection: the multi-scale maps before each down-sampling, written by the blocks that own those
layers; super-resolution: the input image), through the same ``FeatureBank.write`` / ``read``.

Deviations from the paper: the paper does not define what is banked for classification nor how it
enters the aux; the definition above is ours.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from locallearn.methods.base import AuxContext, Method
from locallearn.types import Batch, FeatureInfo


@dataclass
class SLMConfig:
    bank: bool = True  # feature bank on (False = SLM alone, the paper's "Adapt" ablation without bank)
    bank_weight: float = 1.0  # ours: weight of the cosine pull to the banked class representation
    bank_momentum: float = 0.9  # ours: running mean of the banked per-class representation


def pooled(h: torch.Tensor) -> torch.Tensor:
    """The representation a classification head reads: GAP of a map, the class token of tokens."""
    return F.adaptive_avg_pool2d(h, 1).flatten(1) if h.dim() == 4 else h[:, 0]


class FeatureBank(nn.Module):
    """Key features of the task, stored detached. Classification: per-class running means ("final")."""

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


def stage_starts(features: list[FeatureInfo]) -> list[int]:
    """First index of each stage after the cut (the backbone's ``FeatureInfo.stage``)."""
    from locallearn.methods import base  # the shared rule (mlaan uses it too)

    return base.stage_starts(features)


class SLMAux(nn.Module):
    def __init__(self, ctx: AuxContext, cfg: SLMConfig, bank: FeatureBank | None) -> None:
        super().__init__()
        self.task, self.cfg = ctx.task, cfg
        starts = stage_starts(ctx.next_features)
        self.replica = nn.Sequential(*(copy.deepcopy(ctx.next_layers[j]) for j in starts))
        last = ctx.next_features[-1] if ctx.next_features else ctx.feature
        self.head = ctx.task.build_head(last)
        self._bank = [bank] if bank is not None else []  # shared with the last block; not registered here

    def forward(self, h: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        a = self.replica(h)
        out = {"task": self.task.loss(self.head(a), batch)}
        loss = out["task"]
        entry = self._bank[0].read("final") if self._bank else None
        if entry is not None and self.cfg.bank_weight > 0:
            protos, seen = entry
            known = seen[batch.y]
            if known.any():
                target = protos[batch.y[known]]
                cos = F.cosine_similarity(pooled(a)[known].float(), target, dim=1)
                out["bank"] = (1 - cos).mean()
                loss = loss + self.cfg.bank_weight * out["bank"]
        out["loss"] = loss
        return out


class BankWriter(nn.Module):
    """The last block: task head and loss unchanged; in training, banks the final representation."""

    def __init__(self, inner: nn.Module, bank: FeatureBank) -> None:
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

    def __init__(self, cfg: SLMConfig | None = None) -> None:
        super().__init__(cfg)
        self.bank = FeatureBank(self.cfg.bank_momentum) if self.cfg.bank else None

    def check(self, num_blocks: int) -> None:
        if not 0.0 <= self.cfg.bank_momentum < 1.0:
            raise ValueError(f"slm bank_momentum must lie in [0, 1), got {self.cfg.bank_momentum}")

    def build_aux(self, k: int, ctx: AuxContext) -> nn.Module:
        return SLMAux(ctx, self.cfg, self.bank)

    def make_head(self, head: nn.Module) -> nn.Module:
        return BankWriter(head, self.bank) if self.bank is not None else head
