"""Every backbone says which stage each layer belongs to (``FeatureInfo.stage``), in the papers'
``[stage, block]`` notation, and the stage-based aux nets (slm, mlaan) stay small on VGG."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from locallearn.backbones import resnet_cifar, torchvision_resnet, torchvision_vgg, vit
from locallearn.backbones.fx import from_model
from locallearn.build import build_model
from locallearn.config import load_config
from locallearn.methods.base import stage_starts
from locallearn.types import InputInfo

FACTORIES = {
    "resnet20": resnet_cifar.resnet20,
    "resnet18": torchvision_resnet.FACTORIES["resnet18"],
    "vgg11": torchvision_vgg.FACTORIES["vgg11"],
    "vgg13_bn": torchvision_vgg.FACTORIES["vgg13_bn"],
    "vit_tiny": lambda: vit.FACTORIES["vit_tiny"](image_size=32, num_layers=4),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_stage_of_each_layer_matches_stage_block_to_layer(name):
    torch.manual_seed(0)
    backbone = FACTORIES[name]()
    stages = [f.stage for f in backbone.feature_info]
    assert stages == sorted(stages) and stages[-1] > stages[0]
    for layer, stage in enumerate(stages):
        block = layer - min(i for i, s in enumerate(stages) if s == stage)
        assert backbone.stage_block_to_layer(stage, block) == layer


def test_vgg_stages_are_the_convs_between_pools():
    backbone = torchvision_vgg.FACTORIES["vgg13"]()
    assert [f.stage for f in backbone.feature_info] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert stage_starts(backbone.feature_info[3:]) == [0, 1, 3, 5]  # layer 3 ends stage 2 (and pools)


def test_fx_stages_grow_with_the_resolution_unless_given():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, 2, 1), nn.Conv2d(8, 16, 3, 1, 1))
    cut_at = ["1", "2"]
    x = torch.zeros(1, 3, 16, 16)
    assert [f.stage for f in from_model(model, cut_at, example_input=x).feature_info] == [0, 1, 1]
    given = from_model(model, cut_at, example_input=x, stages=[1, 1, 2]).feature_info
    assert [f.stage for f in given] == [1, 1, 2]
    with pytest.raises(ValueError, match="non-decreasing"):
        from_model(model, cut_at, example_input=x, stages=[1, 0, 2])


def test_slm_aux_nets_on_vgg13_are_one_layer_per_stage():
    cfg = load_config(
        None, ["method.name=slm", "model.backbone=vgg13", "model.num_blocks=4", "data.name=digits"]
    )
    torch.manual_seed(0)
    model, _, _ = build_model(cfg, InputInfo(3, 32, (0.5,) * 3, (0.25,) * 3), 10)
    backbone = sum(p.numel() for p in model.backbone.parameters())  # 9.4 M
    sizes = [sum(p.numel() for p in a.parameters()) / backbone for a in list(model.auxes)[:-1]]
    # cuts before layers 3, 6, 8: stages 2 (rest) + 3, 4, 5 -> 4 layers; 4, 5 -> 2; 5 -> 1 (was 6 / 3 / 2)
    assert all(s < 0.45 for s in sizes), sizes
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
