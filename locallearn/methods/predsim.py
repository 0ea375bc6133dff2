"""PredSim: local prediction + similarity matching (Nøkland & Eidnes, Training Neural Networks with
Local Error Signals, ICML 2019, arXiv 1901.06656).

Each block is trained by two local losses on its output ``h`` (PRIOR_ART §5). *sim*: a 3x3 conv
(C -> C, no bias) maps ``h`` to a representation whose similarity matrix ``S`` over the batch must
match the similarity matrix of the one-hot labels (MSE). ``S(x)``: a feature map with more than 3
channels and more than one row is first reduced to its per-channel standard deviation over space
(B x C); each row is then centred and L2-normalised and ``S = xn xn^T`` clamped to [-1, 1]. *pred*:
``h`` (not conv'ed) is average-pooled until ``C * H' * W' <= dim_in_decoder`` (halving height, then
width, alternately) and classified by a linear layer whose weights start at zero (``pred_init: zero``;
AugLocal's re-implementation leaves it at the default init: ``pred_init: default``), cross-entropy.
``L = (1 - beta) * L_pred + beta * L_sim`` with beta = 0.99.

Deviations from the official code: the pooling is ``adaptive_avg_pool2d`` to the same output size the
official kernel-doubling loop reaches (its padding arithmetic differs at odd sizes); the pred head is
the task's ``local_head`` (a Linear for classification) and targets other than integer labels enter
the sim loss as they are (flattened) instead of one-hot; the optimizer is the engine's (the official
code gives each block its own Adam, our configs pick the optimizer per paper).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from locallearn.methods.base import AuxContext, Method
from locallearn.types import Batch


@dataclass
class PredSimConfig:
    beta: float = 0.99  # anokland/local-loss --beta 0.99 (AugLocal run.sh: ixx=0.99 sim, ixy=0.01 pred)
    dim_in_decoder: int = 2048  # local-loss CIFAR-10 vgg8b --dim-in-decoder 2048 (AugLocal: 512)
    std_reduce: bool = True  # local-loss default (--no-similarity-std off)
    # local-loss zero-initialises the pred layer; "default" keeps nn.Linear's init (AugLocal's re-implementation)
    pred_init: str = "zero"
    # ours: the most channels of the sim loss's 3x3 conv (C -> C in local-loss), and at most 4x that
    # many pooled features into the prediction layer (dim_in_decoder's cap: at 1000 classes a
    # 2048-feature prediction layer is 2 M parameters); 0 = auto: the paper's on the listed backbones,
    # a width that fits the backbone's size on outside models (build.py)
    width: int = 0

    def __post_init__(self) -> None:
        if self.width < 0:
            raise ValueError(f"predsim.width must be >= 0 (0 = auto), got {self.width}")


def similarity_matrix(x: torch.Tensor, std_reduce: bool = True) -> torch.Tensor:
    """PredSim's ``S(x)``: (B, ...) -> (B, B) cosine similarities of the centred rows, in [-1, 1]."""
    if x.dim() == 4 and std_reduce and x.shape[1] > 3 and x.shape[2] > 1:
        x = x.flatten(2).std(dim=2)
    x = x.flatten(1).float()
    xc = x - x.mean(dim=1, keepdim=True)
    xn = xc / (1e-8 + xc.pow(2).sum(dim=1, keepdim=True).sqrt())
    return (xn @ xn.T).clamp(-1, 1)


def pooled_size(chs: int, side: int, dim_in_decoder: int) -> tuple[int, int]:
    """Output size of local-loss's pooling loop: double the kernel in h, then w, while
    ``chs * h * w > dim_in_decoder`` and the kernel is smaller than the map."""
    ks_h = ks_w = 1
    h = w = side
    while chs * h * w > dim_in_decoder and ks_h < side:
        ks_h *= 2
        h = math.ceil(side / ks_h)
        if chs * h * w > dim_in_decoder:
            ks_w *= 2
            w = math.ceil(side / ks_w)
    return h, w


def label_targets(y: torch.Tensor, num_outputs: int) -> torch.Tensor:
    if y.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        return F.one_hot(y.long(), num_outputs).float()
    return y.flatten(1).float()


class PredSimAux(nn.Module):
    def __init__(self, ctx: AuxContext, cfg: PredSimConfig) -> None:
        super().__init__()
        if ctx.feature.fmt != "NCHW":
            raise ValueError("predsim's sim loss convolves feature maps: it needs NCHW features")
        if not 0.0 <= cfg.beta <= 1.0:
            raise ValueError(f"predsim beta must lie in [0, 1], got {cfg.beta}")
        self.task = ctx.task
        self.cfg = cfg
        c, side = ctx.feature.num_chs, ctx.spatial()
        cap = cfg.width or ctx.width
        self.pool_size = pooled_size(c, side, min(cfg.dim_in_decoder, 4 * cap) if cap else cfg.dim_in_decoder)
        self.sim_conv = nn.Conv2d(c, min(c, cap) if cap else c, 3, padding=1, bias=False)
        self.pred = ctx.task.local_head(c * self.pool_size[0] * self.pool_size[1])

    @torch.no_grad()
    def zero_pred_(self) -> None:
        """local-loss zero-initialises the prediction layer's weights (after any init loop)."""
        weight = getattr(self.pred, "weight", None)
        if weight is not None:
            weight.zero_()

    def forward(self, h: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        logits = self.pred(F.adaptive_avg_pool2d(h, self.pool_size).flatten(1))
        pred = self.task.loss(logits, batch)
        rh = similarity_matrix(self.sim_conv(h), self.cfg.std_reduce)
        ry = similarity_matrix(label_targets(batch.y, logits.shape[1]))
        sim = F.mse_loss(rh, ry)
        out = {"loss": (1 - self.cfg.beta) * pred + self.cfg.beta * sim, "pred": pred, "sim": sim}
        if self.cfg.beta < 1:  # beta = 1: the prediction layer gets no gradient, it predicts nothing
            out["output"] = logits
        return out


class PredSim(Method):
    name = "predsim"
    paper = (
        "Nøkland & Eidnes, Training Neural Networks with Local Error Signals, ICML 2019 (arXiv 1901.06656)"
    )
    Config = PredSimConfig

    def build_aux(self, k: int, ctx: AuxContext) -> nn.Module:
        return PredSimAux(ctx, self.cfg)

    def check(self, num_blocks: int) -> None:
        if self.cfg.pred_init not in ("zero", "default"):
            raise ValueError(f"predsim pred_init must be 'zero' or 'default', got {self.cfg.pred_init!r}")

    def make_aux(self, k: int, ctx: AuxContext) -> nn.Module:
        aux = super().make_aux(k, ctx)
        if self.cfg.pred_init == "zero":
            aux.zero_pred_()
        return aux
