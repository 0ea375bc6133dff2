"""The ImageNet paper configs load, build (shapes only, on the meta device) and cut where the papers do."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from locallearn.build import build_model
from locallearn.config import load_config
from locallearn.types import InputInfo

CONFIGS = Path(__file__).parents[2] / "configs"
EXPECTED = {
    "imagenet_resnet101_infopro_k2.yaml": [5],
    "imagenet_resnet152_infopro_manpp_k4.yaml": [11, 26, 38],
    "imagenet_vgg13_dgl_manpp_k10.yaml": list(range(1, 10)),
    "imagenet_vit_tiny_dgl_manpp_k4.yaml": [4, 7, 10],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_imagenet_config_builds(name: str) -> None:
    cfg = load_config(CONFIGS / name)
    with torch.device("meta"):
        model, _, _ = build_model(cfg, InputInfo(3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), 1000)
    assert model.cuts == EXPECTED[name]
