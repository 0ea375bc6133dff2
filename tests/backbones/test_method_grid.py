"""Every method in the dicts builds and takes one training step on every new backbone family at
K = 2 and 4 (the smallest member of each family, 32x32 input), and the balanced split balances."""

from __future__ import annotations

import pytest
import torch

from locallearn.build import build_backbone, build_model, method_names
from locallearn.config import Config
from locallearn.engine.optim import build_optimizer
from locallearn.engine.sequential import train_step
from locallearn.split import even_cuts, layer_activation_bytes, resolve_cuts
from locallearn.types import Batch, InputInfo

INPUTS = InputInfo(3, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
# The methods whose aux nets this family provides for wide maps and tokens (the ImageNet InfoPro heads,
# the MAN++ ViT aux); "+man" differs from "+manpp" only by the scale, so each base runs with one of them.
GRID = ["bp", "dgl", "infopro", "dgl+manpp", "infopro+man"]
CASES = [(m, k) for m in GRID if m in method_names() for k in ((1,) if m == "bp" else (2, 4))]


@pytest.mark.parametrize("backbone", ["resnet18", "vgg11", "vit_tiny"])
@pytest.mark.parametrize(("method", "k"), CASES)
def test_method_takes_a_step(backbone: str, method: str, k: int) -> None:
    cfg = Config()
    cfg.model.backbone, cfg.model.num_blocks, cfg.method.name = backbone, k, method
    model, _, _ = build_model(cfg, INPUTS, 10)
    optimizers = [build_optimizer(model.block_parameters(b), cfg.optim) for b in range(k)]
    batch = Batch(
        torch.randn(4, 3, 32, 32),
        torch.arange(4) % 2,
        torch.full((3, 1, 1), 0.5),
        torch.full((3, 1, 1), 0.25),
    )
    before = [p.detach().clone() for p in model.backbone.parameters()]
    outs = train_step(model, batch, optimizers)
    assert len(outs) == k and all(torch.isfinite(o["loss"]) for o in outs)
    changed = [not torch.equal(a, p) for a, p in zip(before, model.backbone.parameters())]
    assert any(changed)


def test_balanced_split_equalises_activation_memory() -> None:
    backbone = build_backbone("resnet18", 3)
    costs = layer_activation_bytes(backbone, 3, 32)
    assert len(costs) == len(backbone) and all(c > 0 for c in costs)
    cuts = resolve_cuts(len(backbone), 3, "balanced", costs=lambda: costs)

    def peak(cs: list[int]) -> int:
        bounds = [0, *cs, len(costs)]
        return max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))

    assert peak(cuts) <= peak(even_cuts(len(backbone), 3))
    assert cuts[0] <= even_cuts(len(backbone), 3)[0]  # early, high-resolution layers get smaller blocks
    bn = backbone.layers[0][1]
    assert bn.num_batches_tracked.item() == 0  # the dummy batch left BN statistics alone


def test_balanced_split_through_the_config() -> None:
    cfg = Config()
    cfg.model.backbone, cfg.model.num_blocks, cfg.method.name, cfg.model.split = "vgg11", 3, "dgl", "balanced"
    model, _, _ = build_model(cfg, INPUTS, 10)
    assert len(model.cuts) == 2
