"""Grad-CAM on a model whose class depends on what is in one quadrant highlights that quadrant."""

from pathlib import Path

import pytest
import torch
from torch import nn

from locallearn.analysis.gradcam import chosen_layers, grad_cam, tokens_to_map
from locallearn.analysis.runs import LoadedRun, pooled_features
from locallearn.types import InputInfo
from tests.helpers import make_model


class QuadrantModel(nn.Module):
    """Class 1 = a bright square somewhere; class 0 = dark background. Layer 0 detects brightness
    (channel 0) and darkness (channel 1); the head pools and weighs them with opposite signs."""

    def __init__(self):
        super().__init__()
        conv = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[0, 0, 1, 1], conv.weight[1, 0, 1, 1] = 1.0, -1.0
        self.layers = nn.ModuleList([nn.Sequential(conv, nn.ReLU()), nn.Identity()])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2))
        with torch.no_grad():
            self.head[2].weight.copy_(torch.tensor([[-10.0, 1.0], [10.0, -1.0]]))
            self.head[2].bias.zero_()


def image_with_square(row: int, col: int, size: int = 16) -> torch.Tensor:
    x = -torch.ones(1, 1, size, size)
    x[:, :, row : row + 5, col : col + 5] = 1.0
    return x


def quadrant_mass(cam: torch.Tensor) -> torch.Tensor:
    h, w = cam.shape[-2] // 2, cam.shape[-1] // 2
    q = torch.stack([cam[:h, :w].sum(), cam[:h, w:].sum(), cam[h:, :w].sum(), cam[h:, w:].sum()])
    return q / q.sum()


@pytest.mark.parametrize(("row", "col", "quadrant"), [(1, 2, 0), (2, 10, 1), (11, 9, 3)])
def test_gradcam_highlights_the_quadrant_holding_the_evidence(row, col, quadrant):
    model = QuadrantModel().eval()
    x = image_with_square(row, col)
    for layer in (0, 1):  # at the detector and one layer later
        cam, logits = grad_cam(model.layers, model.head, x, torch.tensor([1]), layer)
        assert cam.shape == (1, 16, 16) and cam.max() == pytest.approx(1.0)
        assert logits.argmax(1).item() == 1
        mass = quadrant_mass(cam[0])
        assert mass.argmax().item() == quadrant and mass[quadrant] > 0.9


def test_gradcam_of_the_other_class_highlights_the_background():
    model = QuadrantModel().eval()
    cam, _ = grad_cam(model.layers, model.head, image_with_square(1, 1), torch.tensor([0]), 0)
    assert cam[0, 2:5, 2:5].max() < 0.05  # the square is evidence against class 0
    assert cam[0, 12:, 12:].min() > 0.9


def test_tokens_to_map_drops_the_class_token_and_keeps_patch_order():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)  # class token + 2x2 patches
    grid = tokens_to_map(tokens)
    assert grid.shape == (2, 3, 2, 2)
    assert torch.equal(grid[:, :, 0, 1], tokens[:, 2])  # patch 1 = row 0, column 1
    with pytest.raises(ValueError, match="square"):
        tokens_to_map(torch.zeros(1, 4, 3))


def test_gradcam_on_a_token_backbone_uses_the_patch_grid():
    """ViT: the head reads the class token, so the last layer's patch tokens get no gradient; one layer
    earlier the last attention links them to the class token and the map is not empty."""
    inputs = InputInfo(3, 32, (0.5,) * 3, (0.25,) * 3)
    model, _, _, cfg = make_model("dgl", "vit_tiny", k=2, inputs=inputs)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    n = len(model.backbone.layers)
    assert [f.shape for f in pooled_features(model, x)] == [(2, 192)] * n  # the class token
    (layer,) = chosen_layers(LoadedRun(Path("."), cfg, model, 0), None, False)
    assert layer == n - 2
    target = torch.tensor([1, 2])
    cam, _ = grad_cam(model.backbone.layers, model.head, x, target, layer, "NLC")
    assert cam.shape == (2, 32, 32) and torch.allclose(cam.amax((1, 2)), torch.ones(2))
    last, _ = grad_cam(model.backbone.layers, model.head, x, target, n - 1, "NLC")
    assert last.abs().max() == 0
