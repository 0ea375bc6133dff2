"""SLM replicas and the feature bank (detached, per-class final representation)."""

import torch
from methods_util import tiny_batch, tiny_model

from locallearn.engine.sequential import train_step


def test_replica_has_one_layer_per_remaining_stage():
    model, _, _ = tiny_model("slm", k=4)  # resnet20: 7 layers, cuts after layers 2, 4, 5 (even split)
    widths = [[m.conv2.out_channels for m in a.replica] for a in list(model.auxes)[:-1]]
    stages = [[model.backbone.feature_info[j].num_chs for j in range(c, 10)] for c in model.cuts]
    assert widths == [sorted(set(s), key=s.index) for s in stages]


def test_bank_holds_detached_tensors_and_feeds_every_aux():
    model, optimizers, meth = tiny_model("slm", k=4)
    batch = tiny_batch()
    outs = train_step(model, batch, optimizers)
    assert "bank" not in outs[0]  # the bank is empty during the first step
    protos, seen = meth.bank.read("final")
    assert not protos.requires_grad and protos.grad_fn is None
    assert seen[batch.y].all() and not seen[torch.arange(10) >= 8].any()
    reps = torch.nn.functional.adaptive_avg_pool2d(model.backbone(batch.x), 1).flatten(1)
    assert protos.shape == (10, reps.shape[1])
    outs = train_step(model, batch, optimizers)
    assert all("bank" in o for o in outs[:-1])
    assert all(not t.requires_grad for t in meth.bank.buffers())
    assert sum(1 for _ in model.buffers() if _ is protos) == 1  # saved once, with the last block


def test_bank_state_survives_a_reload():
    model, optimizers, _ = tiny_model("slm", k=3)
    train_step(model, tiny_batch(), optimizers)
    fresh, _, meth = tiny_model("slm", k=3)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(meth.bank.read("final")[0], model.auxes[-1].bank.read("final")[0])
