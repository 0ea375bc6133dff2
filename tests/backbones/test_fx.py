"""from_model: any traceable model split by module names with torch.fx."""

from __future__ import annotations

import pytest
import torch
import torchvision

from locallearn.backbones.fx import from_model


def test_fx_resnet18_equals_torchvision() -> None:
    net = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    backbone = from_model(net, ["layer2", "layer3.1"], stop_at="avgpool", example_input=x[:1])
    assert len(backbone) == 3
    assert [(f.num_chs, f.reduction) for f in backbone.feature_info] == [(64, 4), (256, 16), (512, 32)]
    with torch.no_grad():
        assert torch.equal(backbone(x), torch.nn.Sequential(*list(net.children())[:-2])(x))
    assert sum(p.numel() for p in backbone.parameters()) == sum(
        p.numel() for n, p in net.named_parameters() if not n.startswith("fc.")
    )


def test_fx_refuses_a_cut_inside_a_residual_unit() -> None:
    net = torchvision.models.resnet18(weights=None)
    with pytest.raises(ValueError, match="skip connection") as err:
        from_model(net, ["layer2.0.conv2"], stop_at="avgpool", example_input=torch.zeros(1, 3, 32, 32))
    assert "layer1.1" in str(err.value)  # names the tensor that skips over the cut


def test_fx_needs_stop_at_for_a_classifier_output() -> None:
    net = torchvision.models.resnet18(weights=None)
    with pytest.raises(ValueError, match="stop_at"):
        from_model(net, ["layer3"], example_input=torch.zeros(1, 3, 32, 32))


def test_fx_timm_model() -> None:
    timm = pytest.importorskip("timm")
    net = timm.create_model("resnet18", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    backbone = from_model(net, ["layer3"], stop_at="global_pool", example_input=x)
    with torch.no_grad():
        assert torch.equal(backbone(x), net.forward_features(x))
