"""export_state_dict: a trained LocalModel back into its source model, loaded with strict=True."""

from __future__ import annotations

import pytest
import torch
import torchvision

from locallearn.build import build_model, source_model
from locallearn.config import load_config
from locallearn.export import ExportError, export_state_dict
from locallearn.types import InputInfo

INPUTS = InputInfo(3, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def trained(backbone: str, method: str = "dgl", blocks: int = 2, **extra: str):
    """A LocalModel whose every tensor moved away from its initial value (as training would)."""
    overrides = [f"model.backbone={backbone}", f"model.num_blocks={blocks}", f"method.name={method}"]
    cfg = load_config(overrides=overrides + [f"{k}={v}" for k, v in extra.items()])
    model, _, _ = build_model(cfg, INPUTS, num_classes=3)
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
