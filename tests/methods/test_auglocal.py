"""AugLocal's sampled layers and pyramid depths against PRIOR_ART §4 / §12 worked examples."""

import pytest
import torch
from methods_util import tiny_batch, tiny_model

from locallearn.build import build_model
from locallearn.config import load_config
from locallearn.engine.sequential import train_step
from locallearn.methods.auglocal import pyramid_depth, sample_layers
from locallearn.types import InputInfo

# ResNet-32, official "K=16, d=2" -> 14 blocks, cut after layer l (PRIOR_ART §12)
R32_EXPECTED = {0: [8, 15], 1: [8, 15], 2: [8, 15], 3: [9, 15], 4: [10, 15], 5: [10, 15], 6: [10, 15],
                7: [11, 15], 8: [12, 15], 9: [12, 15], 10: [12, 15], 11: [13, 15], 12: [14, 15]}  # fmt: skip


@pytest.mark.parametrize("cut_after", sorted(R32_EXPECTED))
def test_resnet32_d2_sampled_layers(cut_after):
    assert sample_layers(cut_after, 16, 2) == R32_EXPECTED[cut_after]


def test_resnet32_d2_pyramid_is_a_no_op():
    assert [pyramid_depth(2, k, 14, 0.5) for k in range(13)] == [2] * 13


def test_resnet110_d3_pyramid_and_samples():
    depths = [pyramid_depth(3, k, 52, 0.5) for k in range(51)]
    assert depths == [3] * 25 + [2] * 26  # 3 for the first 25 cuts, then 2 (PRIOR_ART §4.3)
    assert sample_layers(0, 55, depths[0]) == [18, 36, 54]
    assert sample_layers(10, 55, depths[10]) == [25, 39, 54]
    assert sample_layers(30, 55, depths[30]) == [42, 54]


def test_depth_beyond_the_remaining_layers_takes_them_all():
    assert sample_layers(12, 16, 5) == [13, 14, 15]


def test_built_aux_matches_prior_art_param_counts():
    cfg = load_config(
        None,
        ["method.name=auglocal", "model.backbone=resnet32", "model.num_blocks=14", "model.split=cuts",
         f"model.cuts={list(range(1, 14))}", "data.name=digits"],
    )  # fmt: skip
    model, _, _ = build_model(cfg, InputInfo(3, 32, (0.5,) * 3, (0.25,) * 3), 10)
    auxes = list(model.auxes)[:-1]
    assert [a.layers for a in auxes] == [R32_EXPECTED[k] for k in range(13)]
    counts = [sum(p.numel() for p in a.parameters()) for a in auxes]
    assert counts[0] == 72_906  # 16->32 s2 (14,528) + 32->64 s2 (57,728) + Linear(64, 10)
    assert [round(c / 1e3, 1) for c in (counts[6], counts[7], counts[11])] == [76.9, 132.4, 148.6]
    assert round(sum(counts) / 1e6, 2) == 1.34  # PRIOR_ART §12: 1.34 M
    assert all(a.units[0].body[0].stride == (2, 2) for a in auxes[:6])  # the pending down-sampling


def test_trains_on_a_tiny_batch():
    model, optimizers, _ = tiny_model("auglocal")
    outs = train_step(model, tiny_batch(), optimizers)
    assert all(o["loss"].isfinite() for o in outs)


def built(backbone: str, k: int, size: int = 64, classes: int = 1000):
    cfg = load_config(None, ["method.name=auglocal", f"model.backbone={backbone}", f"model.num_blocks={k}",
                             "data.name=digits"])  # fmt: skip
    model, _, _ = build_model(cfg, InputInfo(3, size, (0.5,) * 3, (0.25,) * 3), classes)
    return model, list(model.auxes)[:-1]


def test_resnet50_units_are_bottlenecks_of_the_backbones_size():
    from torchvision.models.resnet import Bottleneck

    model, auxes = built("resnet50", 4)
    backbone = sum(p.numel() for p in model.backbone.parameters())  # 23.5 M
    for aux in auxes:
        assert all(isinstance(u, Bottleneck) for u in aux.units)
        # the official ImageNet aux: d Bottlenecks + Linear(2048, 1000); was 75-136 M with BasicBlocks
        assert 0.2 < sum(p.numel() for p in aux.parameters()) / backbone < 0.6
    h = torch.randn(2, 512, 8, 8)  # layer2's output at 64 px: the first aux's input
    assert auxes[0].units(h).shape == (2, 2048, 2, 2)


def test_vgg_units_are_conv_relu_with_a_max_pool_to_down_sample():
    _, auxes = built("vgg13", 4, size=32, classes=10)
    aux = auxes[0]  # cut before layer 3: samples layers 6 (512 ch, stride 16) and 9 (512, stride 32)
    assert aux.layers == [6, 9]
    kinds = [[type(m).__name__ for m in u] for u in aux.units]
    assert kinds == [["MaxPool2d", "Conv2d", "ReLU"], ["MaxPool2d", "Conv2d", "ReLU"]]
    assert aux.units(torch.randn(2, 128, 8, 8)).shape == (2, 512, 2, 2)
