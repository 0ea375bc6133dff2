"""torchvision adapters: the layer list is torchvision's forward, FeatureInfo is true, state dicts
round-trip, and the papers' split tables land where the official code cuts."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torchvision.models.vision_transformer import VisionTransformer

from locallearn.backbones import torchvision_resnet, torchvision_vgg, vit
from locallearn.build import build_model
from locallearn.config import Config
from locallearn.split import resolve_cuts
from locallearn.types import InputInfo

# CPU time goes into weight init: the default run checks one member per family, the rest is slow
SMALL = [
    "resnet18",
    "vgg11_bn",
    pytest.param("resnet50", marks=pytest.mark.slow),
    pytest.param("resnext50_32x4d", marks=pytest.mark.slow),
    pytest.param("vgg13", marks=pytest.mark.slow),
]


def _backbone(name: str, **kw):
    factories = {**torchvision_resnet.FACTORIES, **torchvision_vgg.FACTORIES, **vit.FACTORIES}
    return factories[name](**kw)


def _check_features(backbone, x: torch.Tensor) -> torch.Tensor:
    h = x
    for layer, info in zip(backbone.layers, backbone.feature_info):
        h = layer(h)
        if info.fmt == "NCHW":
            assert h.shape[1] == info.num_chs and x.shape[-1] // h.shape[-1] == info.reduction
        else:
            assert h.shape[2] == info.num_chs
            assert h.shape[1] == 1 + (x.shape[-1] // info.reduction) ** 2
    return h


@pytest.mark.parametrize("name", SMALL)
def test_cnn_equals_torchvision_and_round_trips(name: str) -> None:
    backbone = _backbone(name).eval()
    ref = getattr(torchvision.models, name)(
        weights=None, **({"init_weights": False} if "vgg" in name else {})
    )
    ref.eval()
    # ours -> torchvision: the classifier is the task head's business (ResNet fc stays as it was)
    result = ref.load_state_dict(backbone.to_torchvision_state_dict(), strict=False)
    assert not result.unexpected_keys
    assert all(k.startswith(("fc.", "classifier.")) for k in result.missing_keys)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = _check_features(backbone, x)
        theirs = ref.features(x) if "vgg" in name else torch.nn.Sequential(*list(ref.children())[:-2])(x)
    assert torch.equal(ours, theirs)
    # torchvision -> ours
    fresh = _backbone(name)
    unused = fresh.from_torchvision_state_dict(ref.state_dict())
    assert all(k.startswith(("fc.", "classifier.")) for k in unused)
    for (k, a), b in zip(fresh.state_dict().items(), backbone.state_dict().values()):
        assert torch.equal(a, b), k


def test_trained_model_loads_into_plain_torchvision() -> None:
    cfg = Config()
    cfg.model.backbone, cfg.model.num_blocks, cfg.method.name = "resnet18", 2, "dgl"
    model, _, _ = build_model(cfg, InputInfo(3, 32, (0.5,) * 3, (0.25,) * 3), 10)
    model.eval()
    ref = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    ref.load_state_dict(model.backbone.to_torchvision_state_dict(head=model.head))  # strict
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


@pytest.mark.parametrize("arch", ["vit_tiny", "vit_small"])
def test_vit_equals_torchvision(arch: str) -> None:
    backbone = _backbone(arch, image_size=32, num_layers=3).eval()
    hidden, heads = vit.WIDTHS[arch]
    ref = VisionTransformer(32, 16, 3, heads, hidden, 4 * hidden, num_classes=7).eval()
    result = ref.load_state_dict(backbone.to_torchvision_state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["heads.head.bias", "heads.head.weight"]
    assert len(backbone) == 4 and backbone.feature_info[0].fmt == "NLC"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ref.heads(_check_features(backbone, x)[:, 0]), ref(x))
    fresh = _backbone(arch, image_size=32, num_layers=3)
    assert fresh.from_torchvision_state_dict(ref.state_dict()) == ["heads.head.bias", "heads.head.weight"]
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), backbone.state_dict().values()))


def test_vit_model_head_exports_to_heads_head() -> None:
    cfg = Config()
    cfg.model.backbone, cfg.model.num_blocks, cfg.method.name = "vit_tiny", 4, "dgl+manpp"
    cfg.model.split = "manpp"
    model, _, _ = build_model(cfg, InputInfo(3, 32, (0.5,) * 3, (0.25,) * 3), 10)
    assert model.cuts == [4, 7, 10]
    model.eval()
    ref = VisionTransformer(32, 16, 12, 3, 192, 768, num_classes=10).eval()
    ref.load_state_dict(model.backbone.to_torchvision_state_dict(head=model.head))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


LAYERS = {
    "resnet18": 9, "resnet34": 17, "resnet50": 17, "resnet101": 34, "resnet152": 51,
    "resnext50_32x4d": 17, "resnext101_32x8d": 34, "vgg11": 8, "vgg13": 10, "vgg16": 13, "vgg19": 16,
    "vgg16_bn": 13, "vit_tiny": 13, "vit_small": 13, "vit_base": 13,
}  # fmt: skip

# (table, arch, K) -> cut indices (first layer of each later block). Layer 0 is the stem / embedding;
# ResNet-101 units per stage 3-4-23-3, ResNet-152 3-8-36-3, ResNet-34 3-4-6-3.
PAPER_CUTS = {
    ("infopro", "resnet101", 2): [5],  # after layer2[0]
    ("infopro", "resnet152", 2): [10],  # after layer2[5]
    ("infopro", "resnext101_32x8d", 2): [7],  # after layer2[2]
    ("manpp", "resnet101", 2): [5],
    ("manpp", "resnet101", 4): [7, 17, 25],  # after layer2[2], layer3[8], layer3[16]
    ("manpp", "resnext101_32x8d", 4): [7, 17, 25],
    ("manpp", "resnet152", 2): [10],
    ("manpp", "resnet152", 4): [11, 26, 38],  # after layer2[6], layer3[13], layer3[25]
    ("manpp", "vgg13", 10): list(range(1, 10)),  # one conv per block
    ("manpp", "vit_tiny", 4): [4, 7, 10],  # 3 encoder blocks per group, embedding in group 0
    ("manpp", "vit_base", 6): [3, 5, 7, 9, 11],
    ("hpff", "resnet34", 4): [5, 9, 14],  # after layer2[0], layer3[0], layer3[5]
    ("hpff", "resnet152", 4): [13, 22, 30],  # after layer3[0], layer3[9], layer3[17]
}


def _meta(name: str):
    with torch.device("meta"):  # shapes only: big models build instantly
        return _backbone(name)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_counts(name: str) -> None:
    assert len(_meta(name)) == LAYERS[name]


@pytest.mark.parametrize(("table", "arch", "k"), sorted(PAPER_CUTS))
def test_paper_split_tables(table: str, arch: str, k: int) -> None:
    b = _meta(arch)
    assert resolve_cuts(len(b), k, table, None, arch, b.stage_block_to_layer) == PAPER_CUTS[(table, arch, k)]


def test_feature_info_of_a_bottleneck_net() -> None:
    b = _meta("resnet50")
    assert [f.num_chs for f in b.feature_info[:2]] == [64, 256]
    assert b.feature_info[-1].num_chs == 2048 and b.feature_info[-1].reduction == 32


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet101", "resnet152", "resnext101_32x8d", "vgg16_bn", "vgg19"])
def test_big_models_equal_torchvision(name: str) -> None:
    backbone = _backbone(name).eval()
    ref = getattr(torchvision.models, name)(weights=None).eval()
    ref.load_state_dict(backbone.to_torchvision_state_dict(), strict=False)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        theirs = ref.features(x) if "vgg" in name else torch.nn.Sequential(*list(ref.children())[:-2])(x)
        assert torch.equal(_check_features(backbone, x), theirs)
