"""torchvision Vision Transformers (patch 16) as a flat layer list, tokens in ``NLC`` format.

Layer 0 embeds: patch projection, class token, position embedding, dropout (torchvision's
``_process_input`` and the first lines of ``Encoder.forward``). Each encoder block is one layer; the
encoder's final LayerNorm is attached to the last block, so the backbone output is torchvision's
``encoder(...)`` output and the task head (class token + Linear) is torchvision's ``heads``.
ViT-Tiny (192 wide, 3 heads) and ViT-Small (384, 6) use torchvision's ``VisionTransformer`` class
with the standard DeiT widths; ViT-Base is ``torchvision.models.vit_b_16``. ``weights=None``.

``[stage, block]``: stage 0 = the embedding, stage 1 block b = encoder block b.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision.models.vision_transformer import MLPBlock, VisionTransformer

from locallearn.backbones.torchvision_adapter import TorchvisionBackbone
from locallearn.types import FeatureInfo

WIDTHS = {"vit_tiny": (192, 3), "vit_small": (384, 6), "vit_base": (768, 12)}  # hidden, heads


class Embed(nn.Module):
    """Patchify + class token + position embedding (+ dropout): torchvision's exact operations."""

    def __init__(self, net: VisionTransformer) -> None:
        super().__init__()
        self.patch_size = net.patch_size
        self.hidden_dim = net.hidden_dim
        self.conv_proj = net.conv_proj
        self.class_token = net.class_token
        self.pos_embedding = net.encoder.pos_embedding
        self.dropout = net.encoder.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        p = self.patch_size
        x = self.conv_proj(x).reshape(n, self.hidden_dim, (h // p) * (w // p)).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        return self.dropout(x + self.pos_embedding)


class ViT(TorchvisionBackbone):
    def __init__(
        self,
        arch: str,
        in_chans: int = 3,
        droprate: float = 0.0,
        image_size: int = 224,
        patch_size: int = 16,
        num_layers: int = 12,
        **kw,
    ) -> None:
        hidden, heads = WIDTHS[arch]
        net = VisionTransformer(
            image_size, patch_size, num_layers, heads, hidden, 4 * hidden, dropout=droprate, **kw
        )
        if in_chans != 3:
            net.conv_proj = nn.Conv2d(in_chans, hidden, patch_size, patch_size)
        blocks = list(net.encoder.layers)
        layers: list[nn.Module] = [Embed(net), *blocks[:-1], nn.Sequential(blocks[-1], net.encoder.ln)]
        info = [FeatureInfo(hidden, patch_size, "NLC", stage=min(i, 1)) for i in range(len(layers))]
        super().__init__(net, layers, info, in_chans, head_linear="heads.head")
        self.arch = arch
        self.image_size = image_size

    def init_weights(self, module: nn.Module) -> None:
        """Default resets, then torchvision's MLP init (Xavier weights, N(0, 1e-6) biases)."""
        super().init_weights(module)
        for m in module.modules():
            if isinstance(m, nn.MultiheadAttention):  # has no public reset_parameters
                m._reset_parameters()
            if isinstance(m, MLPBlock):
                for lin in m.modules():
                    if isinstance(lin, nn.Linear):
                        nn.init.xavier_uniform_(lin.weight)
                        nn.init.normal_(lin.bias, std=1e-6)

    def stage_block_to_layer(self, stage: int, block: int) -> int:
        if stage == 0:
            return 0
        if stage != 1 or not 0 <= block < len(self) - 1:
            raise ValueError(
                f"no [stage, block] = [{stage}, {block}] in {self.arch} ({len(self) - 1} blocks)"
            )
        return 1 + block


def _factory(arch: str) -> Callable[..., ViT]:
    def make(image_size: int = 224, **kw) -> ViT:
        return ViT(arch, image_size=image_size, **kw)

    make.__name__ = arch
    return make


FACTORIES: dict[str, Callable[..., ViT]] = {arch: _factory(arch) for arch in WIDTHS}
