"""export_state_dict: a trained LocalModel back into its source model, loaded with strict=True."""

from __future__ import annotations

import pytest
import torch
import torchvision

from locallearn.build import build_model, source_model
from locallearn.config import ConfigError, load_config
from locallearn.export import ExportError, export_state_dict
from locallearn.types import InputInfo

INPUTS = InputInfo(3, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def build(backbone: str, method: str = "dgl", blocks: int = 2, **extra: str):
    overrides = [f"model.backbone={backbone}", f"model.num_blocks={blocks}", f"method.name={method}"]
    cfg = load_config(overrides=overrides + [f"{k}={v}" for k, v in extra.items()])
    model, _, _ = build_model(cfg, INPUTS, num_classes=3)
    return cfg, model


def trained(backbone: str, method: str = "dgl", blocks: int = 2, **extra: str):
    """A LocalModel whose every tensor moved away from its initial value (as training would)."""
    cfg, model = build(backbone, method, blocks, **extra)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.add_(torch.rand_like(t) * 0.1)
    return cfg, model.eval()


def round_trip(cfg, model) -> None:
    state = export_state_dict(model)
    fresh = source_model(cfg, 3)
    fresh.load_state_dict(state, strict=True)  # every key, every shape
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model(x), rtol=1e-5, atol=1e-6)


def test_torchvision_model_round_trips() -> None:
    round_trip(*trained("torchvision:mobilenet_v3_small", "dgl+manpp"))


def test_listed_resnet_round_trips_with_the_task_head_as_fc() -> None:
    cfg, model = trained("resnet18", "infopro", 2)
    assert isinstance(source_model(cfg, 3), torchvision.models.ResNet)
    round_trip(cfg, model)


@pytest.mark.slow
def test_timm_model_round_trips() -> None:
    pytest.importorskip("timm")
    round_trip(*trained("timm:resnet18", "dgl", 3))


def test_models_without_a_source_are_refused() -> None:
    _, model = trained("resnet20")
    with pytest.raises(ExportError, match="ResNetCifar has no source model"):
        export_state_dict(model)
    _, model = trained("vgg11")
    with pytest.raises(ExportError, match="has no source model"):
        export_state_dict(model)


class Net(torch.nn.Module):
    """A hand-written model for ``model.backbone=test_export:make_net``."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.BatchNorm2d(8), torch.nn.ReLU()
        )
        self.stage = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, 2, 1), torch.nn.BatchNorm2d(16))
        self.fc = torch.nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.stage(self.stem(x))).mean((2, 3)))


def make_net(num_classes: int = 10) -> Net:
    return Net(num_classes)


def make_net_of_ten() -> Net:
    return Net()


def test_your_own_model_round_trips() -> None:
    cfg, model = trained("test_export:make_net")
    assert isinstance(source_model(cfg, 3), Net)
    round_trip(cfg, model)


def test_a_factory_with_other_classes_than_the_data_is_refused() -> None:
    with pytest.raises(ConfigError, match="outputs 10 classes but the data has 3"):
        trained("test_export:make_net_of_ten")


def test_pretrained_weights_of_the_source_model(tmp_path) -> None:
    """model.pretrained=FILE: the source model's own file; a classifier of another class count is left out."""
    net = Net(10)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    _, model = build("test_export:make_net", **{"model.pretrained": str(tmp_path / "w.pt")})
    assert torch.equal(model.backbone.layers[0].get_submodule("stem.0").weight, net.stem[0].weight)
    assert model.head.get_submodule("fc").out_features == 3  # the data's classes, freshly initialised
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ConfigError, match="does not fit test_export:make_net"):
        build("test_export:make_net", **{"model.pretrained": str(tmp_path / "bad.pt")})
