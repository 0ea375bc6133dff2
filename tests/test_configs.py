"""Every shipped config parses, validates and builds its model."""

from pathlib import Path

import pytest

from locallearn.build import build_model
from locallearn.config import load_config
from locallearn.types import InputInfo

CONFIGS = sorted(Path(__file__).parents[1].glob("configs/**/*.yaml"))


# Detection cells on ResNet-101/152 with one block per unit build 33-50 aux nets (seconds each on CPU)
HEAVY = ("resnet101", "resnet152")
PARAMS = [
    pytest.param(p, marks=pytest.mark.slow)
    if p.parent.name == "detection" and any(h in p.name for h in HEAVY)
    else p
    for p in CONFIGS
]


@pytest.mark.parametrize("path", PARAMS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_config_builds(path):
    cfg = load_config(path)
    size = 224 if cfg.data.name == "imagenet" else 32
    model, method, _ = build_model(cfg, InputInfo(3, size, (0.5,) * 3, (0.5,) * 3), 10)
    assert model.num_blocks == cfg.model.num_blocks
    assert cfg.data.name != "digits" or cfg.optim.epochs < 50


def test_manpp_cells_follow_the_paper_recipe():
    cells = [p for p in CONFIGS if p.parent.name == "manpp_cifar10"]
    assert len(cells) == 18
    for path in cells:
        cfg = load_config(path)
        assert (cfg.optim.epochs, cfg.data.batch_size, cfg.optim.lr) == (400, 1024, 0.8)
