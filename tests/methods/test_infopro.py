"""InfoPro against the official code where the review found it differs: the aux classifier's first
stride (by width, as the official AuxClassifier) and SupCon's temperature / base_temperature factor."""

import pytest
import torch
import torch.nn.functional as F

from locallearn.build import build_model
from locallearn.config import load_config
from locallearn.methods.infopro import supcon_loss
from locallearn.types import InputInfo


def reference_supcon(features, labels, temperature, base_temperature):
    """Khosla et al.'s SupConLoss as InfoPro's losses.py computes it (one view, contrast_mode 'all',
    anchors without a positive contribute 0), written out loop by loop."""
    n = features.shape[0]
    sim = features @ features.T / temperature
    losses = []
    for i in range(n):
        others = [a for a in range(n) if a != i]
        log_denominator = torch.logsumexp(sim[i, others], dim=0)
        positives = [p for p in others if labels[p] == labels[i]]
        mean_log_prob = sum(sim[i, p] - log_denominator for p in positives) / max(len(positives), 1)
        losses.append(-(temperature / base_temperature) * torch.as_tensor(mean_log_prob))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("temperature", [0.07, 0.2, 0.5])
def test_supcon_keeps_the_official_temperature_factor(temperature):
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(9, 16, generator=g), dim=1)
    y = torch.tensor([0, 1, 0, 2, 1, 0, 3, 2, 1])
    want = reference_supcon(z, y, temperature, 0.07)
    torch.testing.assert_close(supcon_loss(z, y, temperature), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(supcon_loss(z, y, temperature, temperature), want * 0.07 / temperature)


def first_strides(size: int) -> dict[int, int]:
    cfg = load_config(None, ["method.name=infopro", "model.backbone=resnet20", "model.num_blocks=4",
                             "data.name=digits"])  # fmt: skip
    model, _, _ = build_model(cfg, InputInfo(3, size, (0.5,) * 3, (0.25,) * 3), 10)
    out = {}
    for aux in list(model.auxes)[:-1]:
        conv = next(m for m in aux.classifier.modules() if isinstance(m, torch.nn.Conv2d))
        out[conv.in_channels] = conv.stride[0]
    return out


def test_aux_classifier_strides_by_width_as_the_official_code():
    assert first_strides(32) == {16: 2, 32: 2, 64: 1}  # CIFAR: both rules agree
    assert first_strides(96) == {16: 2, 32: 2, 64: 1}  # STL-10: the 64-channel map is 24x24, stride 1


def test_imagenet_decoder_convs_have_a_bias_as_the_official_decoder():
    cfg = load_config(None, ["method.name=infopro", "model.backbone=resnet18", "model.num_blocks=2",
                             "method.infopro.heads=imagenet", "data.name=digits"])  # fmt: skip
    model, _, _ = build_model(cfg, InputInfo(3, 32, (0.5,) * 3, (0.25,) * 3), 10)
    aux = model.auxes[0]
    convs = [m for m in aux.decoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4 and all(c.bias is not None for c in convs)
    assert all(c.bias is None for c in aux.classifier.modules() if isinstance(c, torch.nn.Conv2d))
