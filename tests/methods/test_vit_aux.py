"""MAN++'s ViT aux: one LayerNorm before the class-token head, also when the copied layer is the
backbone's last one (which carries the encoder's final LayerNorm)."""

import torch
from torch import nn

from locallearn.build import build_model
from locallearn.config import load_config
from locallearn.methods.vit_aux import TokenHead
from locallearn.types import InputInfo


def test_k6_last_aux_normalises_once():
    cfg = load_config(None, ["method.name=dgl+manpp", "model.backbone=vit_tiny", "model.num_blocks=6",
                             "model.split=manpp", "data.name=digits"])  # fmt: skip
    torch.manual_seed(0)
    model, _, _ = build_model(cfg, InputInfo(3, 32, (0.5,) * 3, (0.25,) * 3), 10)
    heads = [next(m for m in aux.modules() if isinstance(m, TokenHead)) for aux in list(model.auxes)[:-1]]
    assert [isinstance(h.norm, nn.LayerNorm) for h in heads] == [True] * 4 + [False]
    last = list(model.auxes)[-2]
    tails = [m for m in last.modules() if isinstance(m, nn.LayerNorm)]
    # LB and EMA copies of layer n (2 LayerNorms each) + the copied last layer (2 + the encoder's final)
    assert len(tails) == 2 + 2 + 3
