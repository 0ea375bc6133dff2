"""DGL's mlp-sr head against eugenium/DGL's auxillary_classifier2 (PRIOR_ART §3.1)."""

from torch import nn

from locallearn.build import build_model
from locallearn.config import load_config
from locallearn.types import InputInfo


def dgl_aux(*overrides: str) -> nn.Module:
    cfg = load_config(None, ["method.name=dgl", "model.backbone=resnet20", "model.num_blocks=2",
                             "data.name=digits", *overrides])  # fmt: skip
    model, _, _ = build_model(cfg, InputInfo(3, 16, (0.5,) * 3, (0.25,) * 3), 10)
    return model.auxes[0]


def test_without_an_mlp_a_batchnorm_comes_before_flatten():
    body = list(dgl_aux("method.dgl.n_mlp=0").body)
    flatten = next(i for i, m in enumerate(body) if isinstance(m, nn.Flatten))
    assert isinstance(body[flatten - 1], nn.BatchNorm2d) and body[flatten - 1].num_features == 32


def test_with_an_mlp_no_batchnorm_before_flatten():
    body = list(dgl_aux().body)
    flatten = next(i for i, m in enumerate(body) if isinstance(m, nn.Flatten))
    assert not isinstance(body[flatten - 1], nn.BatchNorm2d)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in body) == 3
