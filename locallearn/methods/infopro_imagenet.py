"""InfoPro's ImageNet aux nets (PRIOR_ART §2.7), for wide feature maps (more than 64 channels).

The CIFAR heads upsample the C-channel map to the full image before their first conv; at C = 512
and 224 px that is hundreds of MB per image, so the ImageNet code narrows first and upsamples in
steps. Decoder (convs with bias, as the official one): 1x1 conv C->128, BN, ReLU, up to S/4; 3x3 128->32, BN, ReLU, up to S/2; 3x3 32->12,
BN, ReLU, up to S; 3x3 12->image channels (logits; the sigmoid is in the BCE). Classifier: 1x1 conv
C->m, 3x3 s2 m->2m, 3x3 s2 2m->4m, 1x1 4m->2048 (each + BN + ReLU), GAP, then the task's local head
(or a ``feature_dim`` projection for SupCon). m = 128 for C = 512 as in the official code.

Deviations: upsampling is bilinear with ``align_corners=True`` (as the CIFAR decoder) to S/4, S/2, S
for the batch's own input size S = (H, W) instead of the fixed 56 / 112 / 224; for C other than 512 the classifier widths
scale with C (m = C / 4, at least 32), our guess for MAN++'s 1024-channel head. ``NLC`` tokens are
laid out on their patch grid first (class token dropped).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from locallearn.methods.base import AuxContext
from locallearn.methods.dgl import TokensToMap


def cbr(cin: int, cout: int, k: int, stride: int = 1, bias: bool = False) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, bias=bias), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class Resize(nn.Module):
    """Bilinear resize to ``1 / divisor`` of the image size given at call time (the build-time
    ``image_size`` when none is given)."""

    def __init__(self, image_size: int, divisor: int) -> None:
        super().__init__()
        self.image_size, self.divisor = image_size, divisor

    def forward(self, h: torch.Tensor, image: tuple[int, int] | None = None) -> torch.Tensor:
        height, width = image if image is not None else (self.image_size, self.image_size)
        size = (max(1, height // self.divisor), max(1, width // self.divisor))
        return F.interpolate(h, size=size, mode="bilinear", align_corners=True)


class ImageNetDecoder(nn.Sequential):
    """``upsample=False`` (InfoPro ``recon_at: feature``): the same layers at the map's own size.
    ``forward(h, size)`` reconstructs an image of ``size`` (H, W), the batch's own."""

    def __init__(
        self, in_chs: int, image_chs: int, image_size: int, upsample: bool = True, width: int | None = None
    ) -> None:
        def resize(divisor: int) -> nn.Module:
            return Resize(image_size, divisor) if upsample else nn.Identity()

        first = min(128, width) if width else 128  # ``width``: infopro.width's cap (outside models)
        super().__init__(
            TokensToMap(),
            *cbr(in_chs, first, 1, bias=True),  # the official decoder's convs keep nn.Conv2d's bias
            resize(4),
            *cbr(first, 32, 3, bias=True),
            resize(2),
            *cbr(32, 12, 3, bias=True),
            resize(1),
            nn.Conv2d(12, image_chs, 3, padding=1),
        )

    def forward(self, h: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        for layer in self:
            h = layer(h, size) if isinstance(layer, Resize) else layer(h)
        return h


def imagenet_classifier(ctx: AuxContext, loss: str, feature_dim: int, width: int | None = None) -> nn.Module:
    """``width``: no layer wider than it (infopro.width's cap on outside models; None = official)."""
    c = ctx.feature.num_chs
    m = max(32, c // 4)
    w1, w2, w3, w4 = (min(v, width) for v in (m, 2 * m, 4 * m, 2048)) if width else (m, 2 * m, 4 * m, 2048)
    layers = [TokensToMap(), *cbr(c, w1, 1), *cbr(w1, w2, 3, 2), *cbr(w2, w3, 3, 2)]
    layers += [*cbr(w3, w4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    layers.append(nn.Linear(w4, feature_dim) if loss == "contrast" else ctx.task.local_head(w4))
    return nn.Sequential(*layers)


def is_wide(ctx: AuxContext, heads: str) -> bool:
    """Which heads InfoPro uses here: ``auto`` picks the ImageNet ones above 64 channels (the CIFAR
    heads were designed for 16 / 32 / 64) and for token sequences."""
    if heads not in ("auto", "cifar", "imagenet"):
        raise ValueError(f"infopro heads must be 'auto', 'cifar' or 'imagenet', got {heads!r}")
    if heads == "auto":
        return ctx.feature.num_chs > 64 or ctx.feature.fmt == "NLC"
    return heads == "imagenet"
