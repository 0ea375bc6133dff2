"""from_module: any nn.Module split at module names equals its source model in train and eval mode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from locallearn.backbones import external, graph_split
from locallearn.backbones.external import SplitError, from_module

timm = pytest.importorskip("timm")


class TinyNet(nn.Module):
    """A hand-written model: a residual add and a ReLU in its own forward, dropout in the head."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16))
        self.block2 = nn.Conv2d(16, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.block1(x)
        x = F.relu(self.block2(self.down(x)))
        return self.fc(self.drop(self.pool(x).flatten(1)))


def tiny_net(num_classes: int = 3) -> TinyNet:
    """A factory for ``model.backbone=test_external:tiny_net``."""
    return TinyNet(num_classes)


def assert_same_as_source(model: nn.Module, backbone, x: torch.Tensor) -> None:
    """Outputs (same seed), BN running statistics and gradients in train mode; outputs in eval mode."""
    head = backbone.source_head()
    split = nn.Sequential(backbone, head) if head is not None else backbone
    state = {k: v.clone() for k, v in model.state_dict().items()}
    results = []
    for net in (model, split):
        model.load_state_dict(state)
        net.train()
        torch.manual_seed(0)
        y = net(x)
        grads = torch.autograd.grad(y.square().sum(), list(model.parameters()), allow_unused=True)
        stats = [b.clone() for b in model.buffers()]
        net.eval()
        with torch.no_grad():
            results.append((y.detach(), grads, stats, net(x)))
    model.load_state_dict(state)
    (y0, g0, s0, e0), (y1, g1, s1, e1) = results
    torch.testing.assert_close(y1, y0)
    torch.testing.assert_close(e1, e0)
    for a, b in zip(s1, s0):
        torch.testing.assert_close(a, b)
    for a, b in zip(g1, g0):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


# timm's own test_* models: its EfficientNet (BatchNormAct2d) and ResNet classes at ~100-400k parameters
MODELS = {
    "timm_test_efficientnet": lambda: timm.create_model("test_efficientnet", num_classes=3),
    "timm_test_resnet": lambda: timm.create_model("test_resnet", num_classes=3),
    "tiny_net": lambda: TinyNet(3),
}
SLOW_MODELS = {  # MobileNetV3-Small also runs (checked at build) in the default suite's CLI and export tests
    "tv_mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(num_classes=3),
    "timm_efficientnet_b0": lambda: timm.create_model("efficientnet_b0", num_classes=3),
    "tv_resnet18": lambda: torchvision.models.resnet18(num_classes=3),
    "tv_efficientnet_b0": lambda: torchvision.models.efficientnet_b0(num_classes=3),
    "timm_resnet18": lambda: timm.create_model("resnet18", num_classes=3),
    "timm_resnet26": lambda: timm.create_model("resnet26", num_classes=3),
    "timm_efficientnet_b0_dropout": lambda: timm.create_model(
        "efficientnet_b0", num_classes=3, drop_rate=0.3
    ),
}


@pytest.mark.parametrize(
    "name",
    [*MODELS, *(pytest.param(n, marks=pytest.mark.slow) for n in SLOW_MODELS)],
)
def test_split_equals_the_model_in_train_and_eval_mode(name: str) -> None:
    torch.manual_seed(0)
    model = {**MODELS, **SLOW_MODELS}[name]()
    x = torch.randn(2, 3, 32, 32)
    backbone = from_module(model, example_input=x, name=name)
    assert len(backbone) >= 2 and backbone.num_outputs == 3
    assert_same_as_source(model, backbone, x)
    # every parameter of the model belongs to exactly one place: a layer or the head
    pieces = [*backbone.layers, backbone.source_head()]
    owned = [id(p) for piece in pieces if piece is not None for p in piece.parameters()]
    assert sorted(owned) == sorted(id(p) for p in model.parameters())
    ours = {id(p) for p in backbone.parameters()} | {id(p) for p in backbone.source_head().parameters()}
    assert ours == {id(p) for p in model.parameters()}


def test_default_layers_are_the_stages() -> None:
    """timm's own feature_info names where each stage ends; the default layers end there too."""
    model = timm.create_model("test_resnet", num_classes=3)
    backbone = from_module(model, example_input=torch.randn(2, 3, 32, 32), check=False)
    assert [(f.num_chs, f.reduction, f.stage) for f in backbone.feature_info] == [
        (i["num_chs"], i["reduction"], s) for s, i in enumerate(model.feature_info)
    ]
    tv = from_module(
        torchvision.models.mobilenet_v3_small(), example_input=torch.randn(2, 3, 32, 32), check=False
    )
    assert [f.reduction for f in tv.feature_info] == [2, 4, 8, 16, 32]


def test_cut_at_module_names_and_the_dropout_head_in_both_modes() -> None:
    model = timm.create_model("test_efficientnet", num_classes=3, drop_rate=0.5)
    backbone = from_module(model, ["blocks.3"], example_input=torch.randn(2, 3, 32, 32))
    assert [f.num_chs for f in backbone.feature_info] == [32, 256]
    # timm's forward_head calls F.dropout(training=self.training): the head holds both traces
    assert isinstance(backbone.source_head(), external.ModePair)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    backbone.eval()
    backbone.source_head().eval()  # a LocalModel's eval() reaches both (they are its modules)
    with torch.no_grad():
        assert torch.equal(backbone.source_head()(backbone(x)), model(x))


def test_the_check_catches_a_split_traced_in_one_mode(monkeypatch) -> None:
    """A plain fx trace (every module traced through, train mode only) bakes timm's BatchNormAct2d
    training branch in: eval then normalises with batch statistics. The build check refuses it."""
    monkeypatch.setattr(graph_split.Tracer, "is_leaf_module", torch.fx.Tracer.is_leaf_module)
    monkeypatch.setattr(graph_split, "pair", lambda a, b: a)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1),
        timm.layers.BatchNormAct2d(8),
        nn.Conv2d(8, 8, 3, 2, 1),
        timm.layers.BatchNormAct2d(8),
    )
    with torch.no_grad():
        model[1].running_var.fill_(4.0)  # running statistics that differ from a batch's
        model[3].running_var.fill_(4.0)
    with pytest.raises(SplitError, match="eval-mode output differs"):
        from_module(model, ["2"], example_input=torch.randn(2, 3, 16, 16), name="bnact")
    monkeypatch.undo()
    from_module(model, ["2"], example_input=torch.randn(2, 3, 16, 16), name="bnact")  # leaves: correct


def test_refusals_are_one_line_naming_the_model() -> None:
    net = torchvision.models.resnet18(num_classes=3)
    with pytest.raises(SplitError, match="skip connection") as err:
        from_module(
            net, ["layer2.0.conv2"], example_input=torch.zeros(2, 3, 32, 32), name="torchvision:resnet18"
        )
    assert "torchvision:resnet18" in str(err.value) and "layer1.1" in str(err.value)
    with pytest.raises(SplitError, match="no module 'layer9'"):
        from_module(net, ["layer9"], example_input=torch.zeros(2, 3, 32, 32))

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else x  # data-dependent: fx cannot trace it

    with pytest.raises(SplitError, match="Branchy: torch.fx cannot trace") as err:
        from_module(Branchy())
    assert "\n" not in str(err.value)


def test_a_model_of_another_input_size_is_one_line() -> None:
    vit = timm.create_model("test_vit3", num_classes=3)  # 160 px only
    with pytest.raises(SplitError, match=r"test_vit3: fails on a \(3, 64, 64\) input \(Input height") as err:
        from_module(vit, example_input=torch.randn(2, 3, 64, 64), name="test_vit3")
    assert "\n" not in str(err.value)


def test_specs() -> None:
    assert external.is_spec("timm:resnet18") and not external.is_spec("resnet18")
    assert isinstance(external.source_model("test_external:tiny_net", 5).fc, nn.Linear)
    assert external.source_model("test_external:tiny_net", 5).fc.out_features == 5
    with pytest.raises(SplitError, match="torchvision has no model 'resnet7'"):
        external.check_spec("torchvision:resnet7")
    with pytest.raises(SplitError, match="timm has no model"):
        external.check_spec("timm:no_such_net")
    with pytest.raises(SplitError, match="cannot import"):
        external.check_spec("no_such_package.models:net")


def test_head_at_moves_a_classifier_that_starts_before_the_pool() -> None:
    """SqueezeNet's classifier is dropout, a 1x1 conv, ReLU, then the pool: found at the pool by default
    (the conv stays in the last layer); ``model.head_at=classifier`` makes all of it the head."""
    from locallearn.build import build_model, check_config
    from locallearn.config import ConfigError, load_config
    from locallearn.types import InputInfo

    inputs = InputInfo(3, 64, (0.5,) * 3, (0.25,) * 3)
    heads = {}
    for head_at in (None, "classifier"):
        args = ["model.backbone=torchvision:squeezenet1_1", "model.num_blocks=2", "method.name=dgl"]
        cfg = load_config(None, args + ([f"model.head_at={head_at}"] if head_at else []))
        model, _, _ = build_model(cfg, inputs, 5)
        heads[head_at] = sum(p.numel() for p in model.head.parameters())
        x = torch.randn(2, 3, 64, 64)
        model.eval()
        assert model(x).shape == (2, 5)
    assert heads == {None: 0, "classifier": 512 * 5 + 5}
    with pytest.raises(ConfigError, match="model.head_at applies to torchvision:NAME"):
        check_config(load_config(None, ["model.backbone=resnet18", "model.head_at=fc"]))
    with pytest.raises(ConfigError, match="no module 'classifer'"):
        args = ["model.backbone=torchvision:squeezenet1_1", "model.head_at=classifer", "model.num_blocks=2"]
        build_model(load_config(None, args), inputs, 5)


class Tied(nn.Module):
    """One gain used on both sides of a cut: no block can own it alone."""

    def __init__(self) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.ones(1))
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x) * self.g) * self.g


class NeedsMask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * mask


class TakesDefaults(NeedsMask):
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
        y = self.conv(x)
        return (y if mask is None else y * mask) * scale  # Python control flow on the fixed defaults


def test_a_parameter_used_on_both_sides_of_a_cut_is_refused() -> None:
    with pytest.raises(SplitError, match="parameter 'g' is used by layer 0 and by layer 1") as err:
        from_module(Tied(), ["b"], example_input=torch.randn(2, 3, 16, 16), name="Tied", auto_head=False)
    assert "\n" not in str(err.value)


def test_forward_arguments_with_defaults_are_fixed_and_others_refused() -> None:
    """issue 28.4: a forward's other arguments at their defaults (timm's ViT takes attn_mask=None,
    is_causal=False); one without a default cannot be given by a backbone."""
    x = torch.randn(2, 3, 16, 16)
    net = TakesDefaults()
    backbone = from_module(net, example_input=x, name="TakesDefaults", auto_head=False)
    torch.testing.assert_close(backbone(x), net(x))
    with pytest.raises(SplitError, match="its forward also needs mask \\(no default\\)"):
        from_module(NeedsMask(), example_input=x, name="NeedsMask")


def test_a_vit_is_cut_at_each_transformer_block() -> None:
    vit = timm.create_model("test_vit", img_size=32, patch_size=8, dynamic_img_size=False, num_classes=3)
    x = torch.randn(2, 3, 32, 32)
    backbone = from_module(vit, example_input=x, name="test_vit")
    assert len(backbone) == 1 + len(vit.blocks) and {f.fmt for f in backbone.feature_info} == {"NLC"}
    assert any(p is vit.cls_token for p in backbone.layers[0].parameters())
    assert_same_as_source(vit, backbone, x)
    # torchvision's: its blocks sit inside a custom Encoder module, opened to cut between them
    from torchvision.models.vision_transformer import VisionTransformer

    tv = VisionTransformer(32, 8, num_layers=3, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=3)
    backbone = from_module(tv, example_input=x, name="vit")
    assert len(backbone) == 4 and any(p is tv.class_token for p in backbone.layers[0].parameters())
    assert_same_as_source(tv, backbone, x)
