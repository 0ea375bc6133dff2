"""InfoPro: Information Propagation (Wang, Ni, Song, Yang, Huang, ICLR 2021, arXiv 2101.10832).

Each block keeps the information of its input (a decoder reconstructs the image from the block's
output, BCE against the un-normalised image) while making it task-discriminative (an aux classifier
with supervised-contrastive or cross-entropy loss). Local loss of cut k:
``lambda1_k * L_recon + lambda2_k * L_aux``, with (lambda1, lambda2) interpolated linearly by *block
index* from (ixx_1, ixy_1) at the first cut to (ixx_2, ixy_2) at the last (ratio = k / (K-2)).

Heads (PRIOR_ART §2.2): decoder = bilinear upsample (align_corners) to the input size ->
conv3x3(C, 12w, bias) -> BN -> ReLU -> conv3x3(12w, image channels) -> sigmoid. Aux classifier
``XcYf``: X 3x3 convs to ``mid`` (32 for C <= 16, else 64; the first strided as the official code
strides it: by width, stride 2 for C = 16 and 32, 1 for C = 64; for widths the official heads do not
know, stride 2 while the map is larger than 8x8), BN, ReLU, GAP, then Y linear layers (hidden
``feature_dim``); the output is a 128-d projection for ``contrast`` (SupCon with temperature tau and
the official ``tau / base_tau`` factor, both 0.07; one view; anchors without a positive contribute 0)
or the task's local head for ``cross_entropy``.

``recon_at`` (ours, not the papers'): ``input`` reconstructs at the image size as the papers do;
``feature`` drops the decoder's upsampling and reconstructs the image area-downsampled to the cut's
map size, computed once per batch and size (``infopro_recon.py``): a cheaper decoder (issue 13) whose
loss is still the mean BCE over pixels, with an accuracy check in ``benchmarks/results/infopro_recon*.md``.
``auto`` (default) is ``input`` on the papers' listed backbones and ``feature`` on outside models, where
the decoder's full-size maps alone outweighed what local learning saves (issue 26:
``benchmarks/aux_sizes.py --totals``).

Deviations from the official code: lambda is interpolated by block index also where MAN/MAN++ use the
stage index (PRIOR_ART §6.4); the decoder's sigmoid + BCE is computed as BCE-with-logits (the same
function, stable under mixed precision); a loss term whose weight is 0 is not computed (the official
code computes it and multiplies by 0: same gradients, wasted memory).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from locallearn.methods.base import AuxContext, Method, level_name
from locallearn.methods.infopro_imagenet import ImageNetDecoder, imagenet_classifier, is_wide
from locallearn.methods.infopro_recon import ReconTargets
from locallearn.types import Batch

log = logging.getLogger(__name__)


@dataclass
class InfoProConfig:
    loss: str = (
        "contrast"  # InfoPro comand.sh: --local_loss_mode contrast ("cross_entropy" for MAN/MAN++ READMEs)
    )
    aux_net: str = "1c2f"  # InfoPro default; MAN/MAN++ argparse default is 2c2f (PRIOR_ART §2.2)
    widen: int = 1  # --aux_net_widen 1
    feature_dim: int = 128  # --aux_net_feature_dim 128
    temperature: float = 0.07  # SupConLoss(temperature=0.07)
    base_temperature: float = 0.07  # SupConLoss(base_temperature=0.07): the loss is scaled by T / base_T
    # CIFAR-10 ResNet-32 K=16 row of InfoPro comand.sh (PRIOR_ART §2.4)
    ixx_1: float = 5.0
    ixy_1: float = 0.05
    ixx_2: float = 0.2
    ixy_2: float = 0.5
    heads: str = "auto"  # cifar (§2.2) | imagenet (§2.7) | auto: imagenet above 64 channels / on tokens
    # ours: "input" = decode at the image size (the papers); "feature" = at the map's size, vs a downsampled
    # image; "auto" = "input" on the listed backbones, "feature" on outside models (module docstring)
    recon_at: str = "auto"
    # ours: the widest channels the decoder and classifier build (0 = auto: the papers' widths on the
    # listed backbones, a width that fits the backbone's size on outside models, build.py)
    width: int = 0

    def __post_init__(self) -> None:
        if self.width < 0:
            raise ValueError(f"infopro.width must be >= 0 (0 = auto), got {self.width}")


def lambdas(cfg: InfoProConfig, k: int, num_blocks: int) -> tuple[float, float]:
    """(lambda1, lambda2) of cut k = 0..K-2, interpolated by block index (InfoPro resnet.py forward)."""
    ratio = k / (num_blocks - 2) if num_blocks > 2 else 0.0
    return (
        cfg.ixx_1 * (1 - ratio) + cfg.ixx_2 * ratio,
        cfg.ixy_1 * (1 - ratio) + cfg.ixy_2 * ratio,
    )


def supcon_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al.) with one view per sample, contrast_mode 'all'.

    ``features`` are L2-normalised (B, D). An anchor with no positive in the batch contributes 0
    and still counts in the mean (InfoPro's ``mask_sum[mask_sum == 0] += 1``). The mean is scaled by
    ``temperature / base_temperature`` as in the official ``SupConLoss`` (1 at InfoPro's 0.07 / 0.07).
    """
    features = features.float()
    n = features.shape[0]
    logits = features @ features.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    not_self = ~torch.eye(n, dtype=torch.bool, device=features.device)
    positive = (labels[:, None] == labels[None, :]) & not_self
    exp_logits = torch.exp(logits) * not_self
    log_prob = logits - torch.log(exp_logits.sum(dim=1, keepdim=True))
    pos_count = positive.sum(dim=1).clamp(min=1)
    mean_log_prob_pos = (positive * log_prob).sum(dim=1) / pos_count
    return -(temperature / base_temperature) * mean_log_prob_pos.mean()


class Decoder(nn.Module):
    """Reconstructs the input image from a feature map; returns logits (sigmoid is in the loss)."""

    def __init__(
        self, in_chs: int, image_chs: int, image_size: int, widen: int = 1, upsample: bool = True
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.upsample = upsample  # False: decode at the map's own size (recon_at=feature)
        self.net = nn.Sequential(
            nn.Conv2d(in_chs, 12 * widen, 3, padding=1, bias=True),
            nn.BatchNorm2d(12 * widen),
            nn.ReLU(inplace=True),
            nn.Conv2d(12 * widen, image_chs, 3, padding=1),
        )

    def forward(self, h: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """``size``: the (H, W) of the image to reconstruct, the batch's own (any size, not only the
        build-time ``image_size``, which stays the default)."""
        size = tuple(size) if size is not None else (self.image_size, self.image_size)
        # at full resolution the resize is the identity: skip its copy
        if self.upsample and tuple(h.shape[-2:]) != size:
            h = F.interpolate(h, size=size, mode="bilinear", align_corners=True)
        return self.net(h)


def aux_classifier(ctx: AuxContext, cfg: InfoProConfig) -> nn.Module:
    match = re.fullmatch(r"(\d)c(\d)f", cfg.aux_net)
    if not match or int(match[2]) < 1:
        raise ValueError(f"aux_net must look like '1c2f' (convs, linears >= 1), got {cfg.aux_net!r}")
    n_conv, n_fc = int(match[1]), int(match[2])
    c, w = ctx.feature.num_chs, cfg.widen
    mid = (32 if c <= 16 else 64) * w
    cap = cfg.width or ctx.width
    mid = min(mid, cap) if cap else mid
    layers: list[nn.Module] = []
    first_stride = (2 if c < 64 else 1) if c in (16, 32, 64) else (2 if ctx.spatial() > 8 else 1)
    for i in range(n_conv):
        stride = first_stride if i == 0 else 1
        layers += [
            nn.Conv2d(c if i == 0 else mid, mid, 3, stride, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(),
        ]
    width = mid if n_conv else c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    for _ in range(n_fc - 1):
        layers += [nn.Linear(width, cfg.feature_dim * w), nn.ReLU(inplace=True)]
        width = cfg.feature_dim * w
    if cfg.loss == "contrast":
        layers.append(nn.Linear(width, cfg.feature_dim))
    else:
        layers.append(ctx.task.local_head(width))
    return nn.Sequential(*layers)


class DenseClassifier(nn.Module):
    """Dense tasks: the task's local head (``build_local_head``) on the block's one map."""

    def __init__(self, ctx: AuxContext) -> None:
        super().__init__()
        self.level = level_name(ctx.feature)
        self.head = ctx.task.build_local_head({self.level: ctx.feature})

    def forward(self, h: torch.Tensor):
        return self.head({self.level: h})


def recon_at(cfg: InfoProConfig, ctx: AuxContext) -> str:
    """``cfg.recon_at`` with ``auto`` resolved for this backbone (module docstring)."""
    if cfg.recon_at == "auto":
        return "feature" if ctx.outside else "input"
    return cfg.recon_at


def decoder(ctx: AuxContext, cfg: InfoProConfig, wide: bool) -> nn.Module:
    upsample = recon_at(cfg, ctx) == "input"
    if wide:
        width = cfg.width or ctx.width
        return ImageNetDecoder(ctx.feature.num_chs, ctx.inputs.channels, ctx.inputs.size, upsample, width)
    return Decoder(ctx.feature.num_chs, ctx.inputs.channels, ctx.inputs.size, cfg.widen, upsample)


class InfoProAux(nn.Module):
    def __init__(self, ctx: AuxContext, cfg: InfoProConfig, targets: ReconTargets | None = None) -> None:
        super().__init__()
        if cfg.loss not in ("contrast", "cross_entropy"):
            raise ValueError(f"infopro loss must be 'contrast' or 'cross_entropy', got {cfg.loss!r}")
        if cfg.recon_at not in ("auto", "input", "feature"):
            raise ValueError(f"infopro recon_at must be 'auto', 'input' or 'feature', got {cfg.recon_at!r}")
        # recon_at=feature: the image downsampled to the map's size, shared by the blocks of one method
        self.targets = (targets or ReconTargets()) if recon_at(cfg, ctx) == "feature" else None
        wide = is_wide(ctx, cfg.heads)
        if ctx.feature.fmt != "NCHW" and not wide:
            raise ValueError("infopro's CIFAR heads need NCHW feature maps; use heads='imagenet' or 'auto'")
        self.task = ctx.task
        self.cfg = cfg
        self.lambda1, self.lambda2 = lambdas(cfg, ctx.k, ctx.num_blocks)
        if self.lambda1 == 0 and self.lambda2 == 0:
            log.warning(
                "infopro: both loss weights are 0 at cut %d of %d, so block %d will not train",
                ctx.k,
                ctx.num_blocks - 1,
                ctx.k,
            )
        self.decoder = decoder(ctx, cfg, wide) if self.lambda1 else None
        if ctx.task.dense:  # per-pixel tasks: the same decoder; the task's local head and loss
            if cfg.loss == "contrast" and self.lambda2:
                raise ValueError(
                    f"infopro: loss 'contrast' (SupCon) needs one label per image; task {ctx.task.name} is "
                    "dense, set method.infopro.loss=cross_entropy (the task's own loss)"
                )
            self.classifier = DenseClassifier(ctx) if self.lambda2 else None
        elif wide:
            width = cfg.width or ctx.width
            self.classifier = (
                imagenet_classifier(ctx, cfg.loss, cfg.feature_dim, width) if self.lambda2 else None
            )
        else:
            self.classifier = aux_classifier(ctx, cfg) if self.lambda2 else None

    def forward(self, h: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        loss = h.new_zeros((), dtype=torch.float32)
        if self.decoder is not None:
            decoded = self.decoder(h, tuple(batch.x.shape[-2:]))  # the input as it is, at any size
            if self.targets is None:
                target = batch.image.clamp(0, 1)
            else:
                target = self.targets.get(batch, decoded.shape[-2:])
            out["recon"] = F.binary_cross_entropy_with_logits(decoded.float(), target.float())
            loss = loss + self.lambda1 * out["recon"]
        if self.classifier is not None:
            z = self.classifier(h)
            if self.cfg.loss == "contrast":
                z = F.normalize(z.float(), dim=1)
                out["aux"] = supcon_loss(z, batch.y, self.cfg.temperature, self.cfg.base_temperature)
            else:
                out["aux"] = self.task.loss(z, batch)
                out["output"] = z  # the classifier predicts the task (SupCon's projection does not)
            loss = loss + self.lambda2 * out["aux"]
        out["loss"] = loss
        return out


class InfoPro(Method):
    name = "infopro"
    paper = "Wang et al., Revisiting Locally Supervised Learning (InfoPro), ICLR 2021 (arXiv 2101.10832)"
    Config = InfoProConfig

    def __init__(self, cfg: InfoProConfig | None = None) -> None:
        super().__init__(cfg)
        self.targets = ReconTargets()  # one cache for all blocks: blocks at one size share a downsample

    def build_aux(self, k: int, ctx: AuxContext) -> nn.Module:
        return InfoProAux(ctx, self.cfg, self.targets)
