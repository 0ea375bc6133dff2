"""Aux nets sized to the model they train (issue 26 §2): outside models keep aux <= backbone, the
papers' configs keep their aux nets exactly, and a build whose aux nets outweigh the backbone says so."""

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

import locallearn
from locallearn.backbones import external
from locallearn.build import build_model, method_names
from locallearn.config import load_config
from locallearn.types import InputInfo

ROOT = Path(__file__).parents[1]


def inputs(size: int) -> InputInfo:
    return InputInfo(3, size, (0.5,) * 3, (0.5,) * 3)


def build(backbone: str, method: str, k: int, size: int, classes: int, *extra: str, bb=None):
    cfg = load_config(
        None, [f"model.backbone={backbone}", f"method.name={method}", f"model.num_blocks={k}", *extra]
    )
    model, _, _ = build_model(cfg, inputs(size), classes, backbone=bb)
    return model


def test_shufflenet_dgl_manpp_aux_within_backbone():
    """The issue's 157x row: ShuffleNet-v2 x0.5, 72 px, 4 classes, K=3, dgl+manpp (54.25 M aux before)."""
    counts = build("torchvision:shufflenet_v2_x0_5", "dgl+manpp", 3, 72, 4).parameter_counts()
    assert counts["aux"] <= counts["backbone"]


@pytest.fixture(scope="module")
def shufflenet():
    """One split of the model for the sweep (each build copies from it; splitting is the slow part)."""
    return external.from_spec("torchvision:shufflenet_v2_x0_5", 4, 3, 64)


@pytest.mark.parametrize("method", [m for m in method_names() if m != "bp"])
def test_every_method_fits_an_outside_model(method, shufflenet):
    counts = build("torchvision:shufflenet_v2_x0_5", method, 3, 64, 4, bb=shufflenet).parameter_counts()
    assert 0 < counts["aux"] <= counts["backbone"], method


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class FatTail(nn.Module):
    """A user's own model whose last stage ends wide (as ShuffleNet's conv5)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = Block(3, 16, 2)
        self.stage1 = nn.Sequential(Block(16, 32, 2), Block(32, 32))
        self.stage2 = nn.Sequential(Block(32, 64, 2), Block(64, 64))
        self.stage3 = nn.Sequential(Block(64, 128, 2), Block(128, 128), nn.Conv2d(128, 512, 1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, 5)

    def forward(self, x):
        return self.fc(self.pool(self.stage3(self.stage2(self.stage1(self.stem(x))))).flatten(1))


def test_wrapped_module_keeps_aux_within_backbone():
    ll = locallearn.wrap(FatTail(), method="dgl+manpp", num_blocks=3, input_size=32)
    counts = ll.model.parameter_counts()
    assert counts["aux"] <= counts["backbone"]


def test_momentum_copies_the_first_op_and_tracks_it_by_name():
    """On an outside model LB and EMA copy the next stage's first op (a depthwise conv and its BN on
    ShuffleNet); the EMA follows the live op's weights (matched by name inside the whole live layer)."""
    model = build("torchvision:shufflenet_v2_x0_5", "dgl+manpp", 3, 64, 4, "method.momentum.momentum=0.0")
    aux, layer = model.auxes[1], model.backbone.layers[model.cuts[1]]
    ema = dict(aux.ema.named_parameters())
    live = dict(layer.named_parameters())
    assert 0 < len(ema) < len(live) and set(ema) <= set(live)
    assert sorted(ema) == [
        "stage4.0.branch1.0.weight",
        "stage4.0.branch1.1.bias",
        "stage4.0.branch1.1.weight",
    ]
    model.sync_momentum()  # momentum 0: the EMA becomes the live unit
    assert all(torch.equal(p, live[n]) for n, p in ema.items())


def test_first_unit_of_a_resnet_stage():
    from locallearn.backbones.graph_split import first_unit

    bb = external.from_spec("torchvision:resnet18", 10, 3, 32)
    unit = first_unit(bb.layers[3])  # layer3: its first BasicBlock
    names = {n.split(".")[-3] for n, _ in unit.named_parameters() if n.count(".") >= 3}
    assert names == {"layer3"} or all(".0." in n for n, _ in unit.named_parameters())
    x = torch.randn(2, 128, 4, 4)
    bb.eval()
    assert unit(x).shape == bb.layers[3](x).shape


@pytest.mark.parametrize(
    "spec,layer,first",
    [
        ("torchvision:resnet18", 4, "layer4.0.conv1.weight"),  # a BasicBlock the tracer kept whole
        ("torchvision:mobilenet_v3_small", 2, "features.2.block.0.0.weight"),  # a conv-BN-act Sequential
        ("timm:resnet18d", 3, "layer3.0.conv1.weight"),
    ],
)
def test_first_op_of_a_stage_is_its_first_conv_norm_act(spec, layer, first):
    """``first_op`` opens the containers the tracer kept whole down to the first conv, keeps its norm
    and activation, shares the live weights under their names, and equals the live layer's own first
    conv-BN-ReLU (eval mode)."""
    from locallearn.backbones.graph_split import first_op

    bb = external.from_spec(spec, 10, 3, 32)
    live = dict(bb.layers[layer].named_parameters())
    op = first_op(bb.layers[layer])
    names = [n for n, _ in op.named_parameters()]
    assert names[0] == first and len(names) == 3  # conv weight, BN weight and bias
    assert all(live[n] is p for n, p in op.named_parameters())
    conv = bb.layers[layer].get_submodule(first.removesuffix(".weight"))
    x = torch.randn(2, conv.in_channels, 8, 8)
    bb.eval()
    y = op(x)
    assert y.shape[1] == conv.out_channels and y.min() >= 0 or spec.endswith("small")


def test_a_given_width_wins_on_an_outside_model():
    model = build("torchvision:shufflenet_v2_x0_5", "dgl", 3, 64, 4, "method.dgl.width=8")
    linears = [m for m in model.auxes[0].modules() if isinstance(m, nn.Linear)]
    assert linears[0].in_features == 4 * 8


# today's aux parameter counts of the papers' configs (CIFAR-10 input): they must not move
PAPER_AUX = {
    "configs/manpp_cifar10/resnet32_k16_dgl_manpp.yaml": 10_499_749,
    "configs/manpp_cifar10/resnet32_k16_infopro_manpp.yaml": 1_838_634,
    "configs/manpp_cifar10/resnet32_k8_dgl.yaml": 5_097_552,
    "configs/mlaan_resnet32_k8_cifar10.yaml": 1_668_408,
    "configs/slm_resnet32_k16_cifar10.yaml": 1_143_702,
    "configs/auglocal_resnet32_k16_d2_cifar10.yaml": 1_341_058,
    "configs/predsim_resnet32_k16_cifar10.yaml": 284_310,
}


@pytest.mark.parametrize("path", sorted(PAPER_AUX))
def test_paper_configs_keep_their_aux_nets(path):
    model, _, _ = build_model(load_config(ROOT / path), inputs(32), 10)
    assert model.parameter_counts()["aux"] == PAPER_AUX[path]


def test_one_warning_line_when_aux_outweighs_backbone(caplog):
    """The MAN++ paper's own ResNet-32 K=16 DGL cell holds 22x the backbone in aux nets: kept, and said."""
    with caplog.at_level(logging.WARNING, logger="locallearn"):
        build_model(load_config(ROOT / "configs/manpp_cifar10/resnet32_k16_dgl_manpp.yaml"), inputs(32), 10)
    lines = [r for r in caplog.records if "aux nets hold" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    message = lines[0].getMessage()
    assert "\n" not in message and "method.dgl.width" in message and "22.5x" in message


def test_no_warning_for_an_outside_default_build(caplog):
    with caplog.at_level(logging.WARNING, logger="locallearn"):
        build("torchvision:shufflenet_v2_x0_5", "infopro+manpp", 3, 64, 4)
    assert not [r for r in caplog.records if "aux nets hold" in r.getMessage()]


@pytest.mark.parametrize("method", ["mlaan", "slm+manpp"])
def test_sized_aux_nets_train_on_an_outside_model(method):
    """The rebuilt parts (a chain of fresh units past MLAAN's EMA twin, SLM's downsized replica behind
    a unit copy) run forward and backward."""
    from torchvision.models import shufflenet_v2_x0_5

    ll = locallearn.wrap(shufflenet_v2_x0_5(num_classes=4), method=method, num_blocks=3, input_size=32)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    losses = [ll.step(x, y) for _ in range(2)][-1]
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())


@pytest.mark.parametrize(
    "option",
    ["method.momentum.copy=stage", "method.mlaan.copy=all", "method.dgl.width=-1", "method.slm.width=-2"],
)
def test_bad_size_options_are_one_line_config_errors(option):
    from locallearn.build import check_config
    from locallearn.config import ConfigError

    method = {"momentum": "dgl+manpp", "mlaan": "mlaan", "dgl": "dgl", "slm": "slm"}[option.split(".")[1]]
    with pytest.raises(ConfigError, match=option.split("=")[0].removeprefix("method.")):
        check_config(load_config(None, [f"method.name={method}", option]))


@pytest.mark.parametrize(
    "copy,op_out,dense,expect",
    [
        ("auto", (64, 8), False, "op"),  # no larger than the unit's output: the op
        ("auto", (512, 8), False, "unit"),  # an expanding op (inverted residual): the unit
        ("op", (512, 8), False, "op"),
        ("unit", (64, 8), False, "unit"),
        ("layer", (64, 8), False, "layer"),
        ("auto", (64, 8), True, "unit"),  # a dense task: no op at another stride than its layer
    ],
)
def test_copy_source_picks_op_unit_or_layer(copy, op_out, dense, expect):
    """``AuxContext.copy_source`` on an outside model (a ``unit_of`` given): the rule of ``copy=auto``."""
    from types import SimpleNamespace

    from locallearn.methods.base import AuxContext
    from locallearn.types import FeatureInfo

    pieces = {"op": nn.Identity(), "unit": nn.Identity(), "layer": nn.Identity()}
    outs = {"op": FeatureInfo(*op_out, "NCHW"), "unit": FeatureInfo(256, 16, "NCHW")}
    ctx = AuxContext(
        k=0,
        num_blocks=2,
        feature=FeatureInfo(32, 8, "NCHW"),
        inputs=inputs(64),
        task=SimpleNamespace(dense=dense),
        next_layers=[pieces["layer"]],
        next_features=[FeatureInfo(256, 16, "NCHW")],
        init_weights=lambda m: None,
        unit_of=lambda layer, feature, part: (pieces[part], outs[part]),
    )
    assert ctx.copy_source(0, copy)[0] is pieces[expect]


def test_slm_banks_no_stem_map_on_an_outside_model(shufflenet):
    """SLM on an outside model reads banked maps from C2 (stride 4) on, as an FPN does: the stem's map
    (C1, half the image size) banked for its aux nets was held the whole step (ResNet-18 at 224 px:
    1.04x bp's total). The listed backbones keep the bank as it was (``PAPER_AUX`` above)."""
    from locallearn.methods.slm import SLMAux

    model = build("torchvision:shufflenet_v2_x0_5", "slm", 3, 64, 4, bb=shufflenet)
    reads = {name for aux in model.auxes for m in aux.modules() if isinstance(m, SLMAux) for name in m.reads}
    assert reads and "C1" not in reads


DENSE_BUILDS = {  # task options, backbone, input size, classes
    "detection": (["task.name=detection", "data.name=digit_scenes"], "resnet18", 64, 10),
    "super_resolution": (["task.name=super_resolution", "data.name=skimage_photos"], "edsr_tiny", 24, 3),
}


@pytest.mark.parametrize("task", sorted(DENSE_BUILDS))
@pytest.mark.parametrize("method", ["dgl", "slm"])
def test_the_warning_on_a_dense_task_names_options_that_shrink_the_aux_nets(caplog, task, method):
    """On dense tasks a method's ``width`` leaves the aux nets as they are (they end in the task's local
    head), so the warning must not name it; every option it names must shrink them."""
    options, backbone, size, classes = DENSE_BUILDS[task]
    args = [f"method.name={method}", f"model.backbone={backbone}", "model.num_blocks=4", *options]

    def aux_params(*extra):
        model, _, _ = build_model(load_config(None, [*args, *extra]), inputs(size), classes)
        return model.parameter_counts()["aux"]

    with caplog.at_level(logging.WARNING, logger="locallearn"):
        before = aux_params()
    (line,) = [r.getMessage() for r in caplog.records if "aux nets hold" in r.getMessage()]
    named = line.split("; ")[-1].removesuffix(" makes them smaller").split(" or ")
    assert f"method.{method}.width" not in line and "a smaller model.num_blocks" in named
    for option in named[:-1]:
        assert aux_params(option) < before, option
