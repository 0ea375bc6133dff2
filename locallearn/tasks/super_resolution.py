"""Single-image super-resolution: EDSR's upsampler and tail as the head, L1 loss, PSNR / SSIM.

The backbone (``backbones/edsr.py``) runs at LR resolution; the main head reads EDSR's head-conv
output from the feature bank (``"L0"``) for the global skip, then upsamples (pixel shuffle, EDSR
``common.Upsampler``), projects to RGB and adds the mean back. Images are RGB in [0, 1]: ``batch.x`` is
the LR image (the data's mean / std are 0 / 1, EDSR's ``MeanShift`` lives in the model) and
``batch.targets`` the HR image ``(B, 3, sH, sW)`` in [0, 1].

Local heads (memory-augmented MAN §4.3, Fig. 4): the aux of a block ends in ``build_local_head``: its
map plus EDSR's global skip (``"L0"``, when the aux is given it), a conv, plus a conv of every bank entry in ``local_reads`` it is given (the LR image,
``"input"``: "fuse the feature map with the initial low-resolution image before upsampling"), then
its own upsampler and tail. ``shared`` is ignored: the paper's SR local module owns its upsampler.

Evaluation (the benchmark protocol of EDSR / NTIRE): the output is clamped and quantised to 8 bits,
PSNR and SSIM are computed on the Y channel of ITU-R BT.601 (``16 + 65.481 R + 128.553 G + 24.966 B``)
with a ``scale``-pixel border cropped. SSIM is ``pytorch_msssim.ssim`` (MIT, torch only): the
Gaussian-window SSIM of Wang et al. 2004 (11x11, sigma 1.5, K = 0.01 / 0.03, valid windows), equal
to ``skimage.metrics.structural_similarity(gaussian_weights=True, use_sample_covariance=False)``.
EDSR-PyTorch scores its DIV2K validation in RGB with a ``scale + 6`` border; ``psnr_rgb`` is that
number (``shave = scale + 6``).

Under ``bp`` (K=1) the head reads ``L0`` inside the block that wrote it, so the read is live and the
global skip trains the head conv directly, as in EDSR.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from locallearn.tasks.base import Evaluator, HeadRef, Task
from locallearn.types import Batch, FeatureBank, FeatureInfo

log = logging.getLogger(__name__)

DIV2K_MEAN = (0.4488, 0.4371, 0.4040)  # EDSR common.MeanShift (also in backbones/edsr.py)
Y_COEFFS = (65.481, 128.553, 24.966)  # BT.601 luma for RGB in [0, 1] -> Y in [16, 235]


@dataclass
class SuperResolutionConfig:
    scale: int = 2  # MAN Table 5: x2, x3, x4
    # a checkpoint of a x2 run (``checkpoint.pt``): its backbone, and every head weight whose name and
    # shape match, initialise this model (EDSR trains x3 / x4 from the x2 model; MAN A.4)
    pretrained: str = ""

    def __post_init__(self) -> None:
        if self.scale not in (2, 3, 4):
            raise ValueError(f"task.super_resolution.scale must be 2, 3 or 4, got {self.scale}")


def conv3x3(in_chs: int, out_chs: int) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, 3, padding=1, bias=True)


class Upsampler(nn.Sequential):
    """EDSR ``common.Upsampler`` (no BN, no activation): x2 / x4 = one / two (conv to 4n, shuffle 2),
    x3 = conv to 9n, shuffle 3."""

    def __init__(self, scale: int, n_feats: int) -> None:
        steps = [(2, 4)] * int(math.log2(scale)) if scale in (2, 4) else [(3, 9)]
        layers: list[nn.Module] = []
        for r, mult in steps:
            layers += [conv3x3(n_feats, mult * n_feats), nn.PixelShuffle(r)]
        super().__init__(*layers)


class Reconstruct(nn.Module):
    """Upsampler, tail conv to RGB, ``add_mean``."""

    def __init__(self, scale: int, n_feats: int, channels: int = 3) -> None:
        super().__init__()
        self.upsample = Upsampler(scale, n_feats)
        self.tail = conv3x3(n_feats, channels)
        self.register_buffer("mean", torch.tensor(DIV2K_MEAN[:channels]).view(1, -1, 1, 1), persistent=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.tail(self.upsample(h)) + self.mean


class SRHead(nn.Module):
    """EDSR after the body: global skip with the head conv's output (from the bank), then reconstruct."""

    reads = ("L0",)

    def __init__(self, scale: int, n_feats: int) -> None:
        super().__init__()
        self.reconstruct = Reconstruct(scale, n_feats)

    def forward(self, h: torch.Tensor, bank: FeatureBank) -> torch.Tensor:
        return self.reconstruct(h + bank.read("L0"))


class SRLocalHead(nn.Module):
    """The aux's reconstruction: its map (plus EDSR's global skip ``"L0"`` when given), a conv, plus a
    conv of each fused bank entry (the LR image ``"input"``, minus the mean), then the upsampler and
    tail. ``forward(maps)`` takes ``{map name: map, ["L0": head-conv map], ["input": LR image]}``;
    with the map alone (DGL) it is the plain local reconstruction the paper calls catastrophic."""

    def __init__(self, features: dict[str, FeatureInfo], fuse: tuple[str, ...], scale: int) -> None:
        super().__init__()
        own = [name for name in features if name not in (*fuse, "L0")] or ["L0"]
        if len(own) != 1:
            raise ValueError(
                f"an SR local head takes one feature map besides L0 and {fuse}, got {list(features)}"
            )
        self.own = own[0]
        n_feats = features[self.own].num_chs
        self.skip = "L0" in features and self.own != "L0" and features["L0"].num_chs == n_feats
        self.conv = conv3x3(n_feats, n_feats)
        self.fused = tuple(name for name in fuse if name in features)
        self.fuse = nn.ModuleList(conv3x3(features[name].num_chs, n_feats) for name in self.fused)
        self.register_buffer("mean", torch.tensor(DIV2K_MEAN).view(1, -1, 1, 1), persistent=False)
        self.reconstruct = Reconstruct(scale, n_feats)

    def forward(self, maps: dict[str, torch.Tensor]) -> torch.Tensor:
        h = maps[self.own] + maps["L0"] if self.skip else maps[self.own]
        z = self.conv(h)
        for name, conv in zip(self.fused, self.fuse):
            image = maps[name]
            z = z + conv(image - self.mean if name == "input" else image)
        return self.reconstruct(z)


def to_y(img: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> (B, 1, H, W) BT.601 luma in [16, 235]."""
    coeffs = img.new_tensor(Y_COEFFS).view(1, 3, 1, 1)
    return 16.0 + (img * coeffs).sum(1, keepdim=True)


def quantize(img: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 1] and round to 8 bits, as the saved image would be (EDSR ``utility.quantize``)."""
    return img.clamp(0, 1).mul(255).round().div(255)


def _shave(x: torch.Tensor, shave: int) -> torch.Tensor:
    return x[..., shave:-shave, shave:-shave] if shave > 0 else x


def psnr(sr: torch.Tensor, hr: torch.Tensor, shave: int = 0, y_channel: bool = True) -> torch.Tensor:
    """Per-image PSNR in dB (inf for identical images) of [0, 1] images, on Y or on RGB (peak 255)."""
    a, b = (to_y(sr), to_y(hr)) if y_channel else (sr * 255, hr * 255)
    mse = (_shave(a.double(), shave) - _shave(b.double(), shave)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(255.0**2 / mse)


def ssim(sr: torch.Tensor, hr: torch.Tensor, shave: int = 0) -> torch.Tensor:
    """Per-image SSIM on the Y channel (Gaussian window, data range 255)."""
    from pytorch_msssim import ssim as _ssim

    a, b = _shave(to_y(sr).double(), shave), _shave(to_y(hr).double(), shave)
    return _ssim(a, b, data_range=255.0, size_average=False)


class SREvaluator(Evaluator):
    """Means over images of PSNR (Y), SSIM (Y), RGB PSNR (EDSR's DIV2K protocol) and the L1 loss."""

    def update(self, output: torch.Tensor, batch: Batch) -> None:
        self.loss_sum += self.task.loss(output, batch).item() * len(batch)
        for key, value in self.task.metrics(output, batch).items():
            self.totals[key] = self.totals.get(key, 0.0) + value
        self.n += len(batch)

    def compute(self) -> dict[str, float]:
        out = {key: value / max(self.n, 1) for key, value in self.totals.items()}
        out["loss"] = self.loss_sum / max(self.n, 1)
        return out


class SuperResolution(Task):
    name = "super_resolution"
    main_metric = "psnr"
    higher_is_better = True
    dense = True
    levels = ("C0", "L0")
    reads = ("L0",)
    local_reads = ("input",)
    Config = SuperResolutionConfig

    def __init__(self, num_classes: int = 3, cfg: SuperResolutionConfig | None = None) -> None:
        self.channels = num_classes  # the data's "classes" are the image channels (RGB)
        self.cfg = cfg or SuperResolutionConfig()
        self.scale = self.cfg.scale

    def build_head(self, feature: FeatureInfo, bank: dict[str, FeatureInfo] | None = None) -> nn.Module:
        skip = (bank or {}).get("L0")
        if skip is not None and skip.num_chs != feature.num_chs:
            raise ValueError(
                f"EDSR's global skip needs L0 ({skip.num_chs}) as wide as the body ({feature.num_chs})"
            )
        return SRHead(self.scale, feature.num_chs)

    def build_local_head(self, features: dict[str, FeatureInfo], shared: HeadRef | None = None) -> nn.Module:
        return SRLocalHead(features, self.local_reads, self.scale)

    def loss(self, output: torch.Tensor, batch: Batch) -> torch.Tensor:
        if output.shape != batch.targets.shape:
            raise ValueError(
                f"SR output {tuple(output.shape)} vs HR {tuple(batch.targets.shape)}: do the data's scale "
                f"(div2k / div2k_x3 / div2k_x4) and task.super_resolution.scale={self.scale} agree?"
            )
        return F.l1_loss(output, batch.targets)  # EDSR: L1 (loss 1*L1)

    @torch.no_grad()
    def metrics(self, output: torch.Tensor, batch: Batch) -> dict[str, float]:
        """Sums over the batch (the evaluator divides by the image count)."""
        sr, hr = quantize(output.float()), batch.targets.float()
        return {
            "psnr": psnr(sr, hr, self.scale).sum().item(),
            "ssim": ssim(sr, hr, self.scale).sum().item(),
            "psnr_rgb": psnr(sr, hr, self.scale + 6, y_channel=False).sum().item(),
        }

    def evaluator(self) -> Evaluator:
        return SREvaluator(self)

    def init_model(self, model: nn.Module) -> None:
        """Load ``cfg.pretrained`` (a x2 run's checkpoint) into ``model``: every backbone weight (all
        must be there), and each other weight whose name and shape match (EDSR's x2 -> x3 / x4)."""
        if not self.cfg.pretrained:
            return
        path = Path(self.cfg.pretrained)
        if not path.is_file():
            raise FileNotFoundError(f"task.super_resolution.pretrained: no file {str(path)!r}")
        try:  # weights_only: a file from elsewhere cannot run code when it is read
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            reason = "it holds objects besides tensors" if "Weights only" in str(e) else type(e).__name__
            raise ValueError(
                f"task.super_resolution.pretrained: cannot read {str(path)!r} as a checkpoint or state dict "
                f"of tensors ({reason})"
            ) from None
        state = state.get("model", state) if isinstance(state, dict) else None
        if not isinstance(state, dict):
            raise ValueError(f"task.super_resolution.pretrained: {str(path)!r} holds no state dict")
        state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        own = model.state_dict()
        missing = [
            k for k in own if k.startswith("backbone.") and (k not in state or state[k].shape != own[k].shape)
        ]
        if missing:
            raise ValueError(f"{str(path)!r} does not fit this backbone: {missing[:5]} missing or reshaped")
        load = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
        model.load_state_dict(load, strict=False)
        log.info("initialised %d of %d tensors from %s", len(load), len(own), path)
