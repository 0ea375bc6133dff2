"""SLM: replicas, the feature bank as the aux's input (detached, tapped), the prototype option."""

import pytest
import torch
from methods_util import tiny_batch, tiny_model

from locallearn.engine.sequential import train_step
from locallearn.methods.slm import SLMAux


def slm_auxes(model):
    return [m for aux in list(model.auxes)[:-1] for m in aux.modules() if isinstance(m, SLMAux)]


def test_replica_has_one_layer_per_remaining_stage():
    model, _, _ = tiny_model("slm", k=4)  # resnet20: 10 layers, stages 16/32/64 wide
    widths = [[m.conv2.out_channels for m in a.replica] for a in slm_auxes(model)]
    stages = [[model.backbone.feature_info[j].num_chs for j in range(c, 10)] for c in model.cuts]
    assert widths == [sorted(set(s), key=s.index) for s in stages]


def test_aux_reads_the_maps_of_earlier_stages_from_the_bank():
    model, optimizers, _ = tiny_model("slm", k=4, **{"model.cuts": "[2,5,8]"})
    auxes = slm_auxes(model)
    # resnet20: layers 0-3 at stride 1, 4-6 at stride 2, 7-9 at stride 4; C0 = layer 3's output, C1 = layer 6's
    assert [a.reads for a in auxes] == [(), ("C0",), ("C0", "C1")]
    assert model.taps == {3: ("C0",), 6: ("C1",)}
    seen = {}
    forward = auxes[2].forward

    def spy(h, batch):
        seen["bank"] = batch.bank.read("C0")
        return forward(h, batch)

    auxes[2].forward = spy
    batch = tiny_batch()
    train_step(model, batch, optimizers)
    c0 = seen["bank"]
    assert not c0.requires_grad and c0.grad_fn is None  # detached on write
    with torch.no_grad():
        want = batch.x
        for layer in list(model.backbone.layers)[:4]:
            want = layer(want)
    assert c0.shape == want.shape


def test_bank_projection_starts_at_zero_and_learns():
    model, optimizers, _ = tiny_model("slm", k=4, **{"model.cuts": "[2,5,8]"})
    conv = slm_auxes(model)[2].project[0]
    assert conv.weight.abs().sum() == 0
    train_step(model, tiny_batch(), optimizers)
    assert conv.weight.abs().sum() > 0


def test_no_gradient_reaches_the_writer_through_the_bank():
    model, _, _ = tiny_model("slm", k=4, **{"model.cuts": "[2,5,8]"})
    batch = tiny_batch()
    h = batch.x
    for k in range(3):
        h = model.body(k)(h.detach(), batch.bank)
    model.zero_grad(set_to_none=True)
    model.auxes[2](h, batch)["loss"].backward()
    writer = list(model.body(1).parameters()) + list(model.body(0).parameters())
    assert all(p.grad is None for p in writer)
    assert any(p.grad is not None for p in model.body(2).parameters())


def test_bank_off_reads_nothing():
    model, _, _ = tiny_model("slm", k=4, **{"model.cuts": "[2,5,8]", "method.slm.bank": "false"})
    assert model.taps == {} and all(a.reads == () for a in slm_auxes(model))


def test_prototype_option_holds_detached_class_means_and_reloads():
    model, optimizers, meth = tiny_model("slm", k=3, **{"method.slm.prototype_weight": "1.0"})
    batch = tiny_batch()
    outs = train_step(model, batch, optimizers)
    assert "prototype" not in outs[0]  # nothing banked during the first step
    protos, seen = meth.prototypes.read("final")
    assert not protos.requires_grad and seen[batch.y].all()
    outs = train_step(model, batch, optimizers)
    assert all("prototype" in o for o in outs[:-1])
    fresh, _, meth2 = tiny_model("slm", k=3, **{"method.slm.prototype_weight": "1.0"})
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(meth2.prototypes.read("final")[0], protos)


def test_negative_prototype_weight_is_refused():
    with pytest.raises(ValueError, match="prototype_weight"):
        tiny_model("slm", k=3, **{"method.slm.prototype_weight": "-1"})
