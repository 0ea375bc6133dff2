"""Every method (and every momentum-aux composition) builds and trains; the Table VII switches."""

import pytest
import torch
from methods_util import tiny_batch, tiny_model

from locallearn.build import METHODS, method_names
from locallearn.engine.sequential import train_step

NEW = ["predsim", "auglocal", "slm"]


@pytest.mark.parametrize("name", [f"{b}+{m}" for b in NEW for m in ("man", "manpp")] + ["mlaan"])
def test_trains_and_composes(name):
    model, optimizers, _ = tiny_model(name, k=3)
    outs = train_step(model, tiny_batch(), optimizers)
    assert len(outs) == 3 and all(torch.isfinite(o["loss"]) for o in outs)


@pytest.mark.parametrize(
    "base, switches", [("predsim", {"ema": True, "lb": False, "scale": False}),
                       ("auglocal", {"ema": True, "lb": True, "scale": False}),
                       ("slm", {"ema": False, "lb": True, "scale": False})],
)  # fmt: skip
def test_table_vii_rows_with_new_bases(base, switches):
    opts = {f"method.momentum.{k}": v for k, v in switches.items()}
    model, optimizers, _ = tiny_model(f"{base}+manpp", k=2, **opts)
    assert all(torch.isfinite(o["loss"]) for o in train_step(model, tiny_batch(4), optimizers))


def test_base_behind_a_momentum_aux_sees_the_network_after_layer_n():
    model, _, _ = tiny_model("auglocal+manpp", k=4)  # resnet20, cut after layer 2: the aux stands in for 3
    assert model.auxes[0].base.layers[0] > model.cuts[0]


def test_method_names_list_only_valid_compositions():
    names = method_names()
    assert set(METHODS) <= set(names)
    assert "mlaan+manpp" not in names and "bp+man" not in names
    assert {"predsim+manpp", "auglocal+man", "slm+manpp", "dgl+manpp"} <= set(names)
