"""Shared machinery of the torchvision adapters: state-dict key mapping and torchvision's init.

An adapter builds the plain torchvision model (``weights=None``) and re-groups *its own modules* into
a flat layer list, so every parameter and buffer of the backbone is an object of the torchvision
model. While both exist, tensor identity gives the exact key mapping between the two state dicts;
we record it once and use it to export to / import from plain torchvision.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from locallearn.backbones.base import Backbone
from locallearn.types import FeatureInfo

# the torchvision classifiers a task head replaces: ignored in a pretrained file whatever their size
# (VGG's adapter never builds its 120M-parameter ``classifier``, so it is not among ``tv_unused``)
CLASSIFIERS = ("fc.", "classifier.", "heads.")


def tensor_names(module: nn.Module) -> dict[int, str]:
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    return {id(t): name for name, t in named}


class TorchvisionBackbone(Backbone):
    """A backbone made of a torchvision model's modules; ``head_keys`` maps the task head's Linear."""

    def __init__(
        self,
        reference: nn.Module,
        layers: list[nn.Module],
        feature_info: list[FeatureInfo],
        in_chans: int,
        head_linear: str | None,
    ) -> None:
        super().__init__(layers, feature_info, in_chans)
        theirs = tensor_names(reference)
        ours = tensor_names(self)
        missing = [name for key, name in ours.items() if key not in theirs]
        if missing:
            raise RuntimeError(f"adapter bug: tensors not owned by the torchvision model: {missing}")
        self.tv_keys = {name: theirs[key] for key, name in ours.items()}  # ours -> torchvision
        # the torchvision model's tensors no layer owns: its classifier, which the task head replaces
        self.tv_unused = frozenset(theirs.values()) - frozenset(self.tv_keys.values())
        self.head_linear = head_linear  # torchvision name of the Linear the task head replaces

    def to_torchvision_state_dict(self, head: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """A state dict that the plain torchvision model loads (``strict=False`` without ``head``).

        ``head``: the task head of a trained LocalModel (``model.head``); its last ``nn.Linear``
        becomes the torchvision classifier (``fc`` / ``heads.head``) when the shapes allow it.
        """
        state = {self.tv_keys[k]: v for k, v in self.state_dict().items()}
        if head is not None and self.head_linear is not None:
            linear = [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
            state[f"{self.head_linear}.weight"] = linear.weight.detach().clone()
            if linear.bias is not None:
                state[f"{self.head_linear}.bias"] = linear.bias.detach().clone()
        return state

    def from_torchvision_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> list[str]:
        """Load a plain torchvision state dict; returns the keys it did not use (the classifier)."""
        to_ours = {tv: ours for ours, tv in self.tv_keys.items()}
        mine = {to_ours[k]: v for k, v in state.items() if k in to_ours}
        self.load_state_dict(mine, strict=strict)
        return sorted(k for k in state if k not in to_ours)

    def load_pretrained(self, state: dict[str, torch.Tensor], source: str = "the state dict") -> None:
        """Load pretrained weights of exactly this architecture (e.g. a torchvision ImageNet file):
        every backbone tensor must be there with its shape; the torchvision classifier (``fc``,
        ``classifier``, ``heads``) is ignored, whatever its size; any other key is an error (a ResNet-50
        file for a ResNet-18, another model's names). ``num_batches_tracked`` may be absent (files
        saved before PyTorch 1.0 lack it). Raises ``ValueError`` naming the missing, unexpected and
        reshaped keys."""
        to_ours = {tv: ours for ours, tv in self.tv_keys.items()}
        own = self.state_dict()
        unexpected = [
            k for k in state if k not in to_ours and k not in self.tv_unused and not k.startswith(CLASSIFIERS)
        ]
        missing = [k for k in to_ours if k not in state and not k.endswith("num_batches_tracked")]
        reshaped = [
            f"{k} {tuple(state[k].shape)} (expected {tuple(own[o].shape)})"
            for k, o in to_ours.items()
            if k in state and tuple(state[k].shape) != tuple(own[o].shape)
        ]
        if missing or unexpected or reshaped:
            parts = [
                f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                for what, keys in (("missing", missing), ("unexpected", unexpected), ("reshaped", reshaped))
                if keys
            ]
            arch = getattr(self, "arch", type(self).__name__)
            raise ValueError(f"{source} does not fit backbone {arch}: keys {'; '.join(parts)}")
        self.load_state_dict({to_ours[k]: v for k, v in state.items() if k in to_ours}, strict=False)


def read_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a state dict file (plain, or under ``state_dict`` / ``model``), read without
    unpickling code (``weights_only``); one-line errors for a missing, unreadable or foreign file
    (``FileNotFoundError`` / ``ValueError``, starting with ``what``)."""
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no file {str(path)!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, pickled code: all mean "not a weights file"
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        if "Weights only load failed" in reason:  # torch's advice to unpickle code does not apply here
            reason = "not a torch.save file of tensors; save a model's state_dict()"
        raise ValueError(f"{what}: cannot read {str(path)!r} as a PyTorch state dict ({reason})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(v, torch.Tensor) for v in state.values())
    ):
        raise ValueError(f"{what}: {str(path)!r} holds no state dict (a dict of tensors)")
    return state


def torchvision_cnn_init(module: nn.Module, linear_std: float | None = None) -> None:
    """torchvision's ResNet / VGG init: Kaiming-normal (fan_out) convs, BN 1 / 0, Linear default
    (ResNet) or N(0, ``linear_std``) with zero bias (VGG)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d | nn.GroupNorm | nn.LayerNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is None:
                m.reset_parameters()
            else:
                nn.init.normal_(m.weight, 0, linear_std)
                nn.init.zeros_(m.bias)


def reduction_of(size_in: int, size_out: int) -> int:
    return max(1, round(size_in / max(size_out, 1)))


def check_no_dropout(droprate: float, family: str) -> None:
    if droprate and not math.isclose(droprate, 0.0):
        raise ValueError(f"{family} has no dropout to set (model.droprate={droprate}); use 0")
