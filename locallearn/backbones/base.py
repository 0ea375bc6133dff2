"""The backbone contract: a flat list of layers plus one FeatureInfo per layer."""

from __future__ import annotations

import torch
from torch import nn

from locallearn.types import FeatureInfo


class Backbone(nn.Module):
    """A network expressed as ``layers`` (an ``nn.ModuleList``) composed in order.

    ``feature_info[i]`` describes the output of ``layers[i]``. Forward is the plain composition,
    which must equal the reference model's feature extractor. Split points (cuts) index this list.
    """

    def __init__(self, layers: list[nn.Module], feature_info: list[FeatureInfo], in_chans: int) -> None:
        super().__init__()
        if len(layers) != len(feature_info):
            raise ValueError(f"{len(layers)} layers but {len(feature_info)} FeatureInfo entries")
        self.layers = nn.ModuleList(layers)
        self.feature_info = list(feature_info)
        self.in_chans = in_chans

    def __len__(self) -> int:
        return len(self.layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def init_weights(self, module: nn.Module) -> None:
        """Initialise ``module`` the way this family initialises itself.

        Used for fresh copies of a layer (momentum aux ``init: fresh``) and for aux nets, so that
        they start from the same distribution as the backbone. Default: each submodule's own
        ``reset_parameters``.
        """
        for m in module.modules():
            if m is not module and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
