"""MAN / MAN++: EMA math, what the copies start as, the scale, and which layer the EMA tracks."""

import pytest
import torch

from locallearn.build import build_method
from locallearn.config import ConfigError
from locallearn.engine.sequential import train_step
from locallearn.methods.man import MomentumAux
from tests.helpers import make_batch, make_model


def momentum_auxes(model):
    return [aux for aux in model.auxes[:-1] if isinstance(aux, MomentumAux)]


def test_ema_update_is_lerp_of_parameters_only():
    model, *_ = make_model("dgl+manpp", "resnet20", 4)
    aux, live = model.auxes[0], model.backbone.layers[model.cuts[0]]
    with torch.no_grad():
        for p in live.parameters():
            p.add_(torch.randn_like(p))
    old_params = [p.clone() for p in aux.ema.parameters()]
    old_buffers = [b.clone() for b in aux.ema.buffers()]
    aux.sync(live)
    m = aux.momentum
    for new, old, src in zip(aux.ema.parameters(), old_params, live.parameters()):
        torch.testing.assert_close(new, m * old + (1 - m) * src, rtol=0, atol=1e-6)
    for new, old in zip(aux.ema.buffers(), old_buffers):
        assert torch.equal(new, old)  # BN running stats are the EMA copy's own


def test_ema_source_is_the_first_layer_of_the_next_block_after_its_step():
    model, optimizers, *_ = make_model("infopro+manpp", "resnet20", 4)
    olds = [[p.clone() for p in aux.ema.parameters()] for aux in model.auxes[:-1]]
    train_step(model, make_batch(), optimizers)  # steps every block, then syncs
    for k, aux in enumerate(model.auxes[:-1]):
        live = model.backbone.layers[model.cuts[k]]
        assert live is model.body(k + 1)[0]
        m = aux.momentum
        for new, old, src in zip(aux.ema.parameters(), olds[k], live.parameters()):
            torch.testing.assert_close(new, m * old + (1 - m) * src, rtol=0, atol=1e-6)


def test_scale_starts_at_one_and_learns_with_fresh_init():
    model, optimizers, *_ = make_model("dgl+manpp", "resnet20", 4)
    auxes = momentum_auxes(model)
    assert all(aux.scale.item() == 1.0 for aux in auxes)
    grads = []
    for aux in auxes:
        aux.scale.register_hook(lambda g: grads.append(g.item()))
    train_step(model, make_batch(), optimizers)
    assert len(grads) == len(auxes) and all(g != 0 for g in grads)
    assert all(aux.scale.item() != 1.0 for aux in auxes)


def test_fresh_init_differs_from_live_layer_and_between_copies():
    model, *_ = make_model("dgl+manpp", "resnet20", 4)
    for k, aux in enumerate(momentum_auxes(model)):
        live = model.backbone.layers[model.cuts[k]]
        w_live, w_lb, w_ema = live.conv1.weight, aux.lb.conv1.weight, aux.ema.conv1.weight
        assert (
            not torch.equal(w_live, w_lb) and not torch.equal(w_live, w_ema) and not torch.equal(w_lb, w_ema)
        )
        assert all(not p.requires_grad for p in aux.ema.parameters())
        assert all(p.requires_grad for p in aux.lb.parameters())


def test_copy_init_starts_as_exact_copies_so_scale_gets_no_gradient():
    model, optimizers, *_ = make_model("dgl+manpp", "resnet20", 4, **{"method.momentum.init": "copy"})
    for k, aux in enumerate(momentum_auxes(model)):
        live = model.backbone.layers[model.cuts[k]]
        for a, b, c in zip(live.parameters(), aux.lb.parameters(), aux.ema.parameters()):
            assert torch.equal(a, b) and torch.equal(a, c)
    grads = []
    for aux in momentum_auxes(model):
        aux.scale.register_hook(lambda g: grads.append(g.item()))
    train_step(model, make_batch(), optimizers)
    assert grads and all(g == 0.0 for g in grads)


def test_fusion_formula():
    model, *_ = make_model("dgl+manpp", "resnet20", 4)
    aux = model.auxes[0]
    h = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        aux.scale.fill_(0.3)
        aux.eval()
        expected = 0.3 * aux.lb(h) + 1.7 * aux.ema(h)
        assert torch.allclose(aux.fuse(h), expected)


@pytest.mark.parametrize(
    "options,parts",
    [
        ({"lb": False, "scale": False}, ("ema",)),  # Table VII: +EMA
        ({"scale": False}, ("ema", "lb")),  # +EMA+LB (= MAN)
        ({}, ("ema", "lb", "scale")),  # +EMA+LB+scale (= MAN++)
    ],
)
def test_ablation_switches(options, parts):
    method = build_method("dgl+manpp", {"momentum": options})
    model, optimizers, *_ = make_model(
        "dgl+manpp", "resnet20", 3, **{f"method.momentum.{k}": v for k, v in options.items()}
    )
    aux = model.auxes[0]
    present = tuple(name for name in ("ema", "lb", "scale") if getattr(aux, name) is not None)
    assert present == parts
    assert method.cfg.momentum == 0.995
    assert all(torch.isfinite(o["loss"]) for o in train_step(model, make_batch(), optimizers))


def test_man_has_no_scale_and_invalid_switches_are_refused():
    model, *_ = make_model("infopro+man", "resnet20", 3)
    assert model.auxes[0].scale is None and model.auxes[0].lb is not None
    with pytest.raises(ValueError, match="needs both"):
        make_model("dgl+manpp", "resnet20", 3, **{"method.momentum.lb": False})
    with pytest.raises(ConfigError, match="unknown config key"):
        build_method("dgl+manpp", {"momentum": {"momentom": 0.9}})
    with pytest.raises(ConfigError, match="does not apply"):
        build_method("dgl", {"momentum": {"momentum": 0.9}})
    with pytest.raises(ConfigError):
        make_model("dgl+manpp", "resnet20", 1)


def test_base_aux_is_sized_for_the_next_layer_output():
    # resnet20: cut before the first stride-2 unit (layer 4) -> the aux sees 32 channels, not 16
    model, *_ = make_model("dgl+manpp", "resnet20", 2, split="cuts", **{"model.cuts": "[4]"})
    aux = model.auxes[0]
    assert aux.base.body[2].in_channels == 32
    out = aux(torch.randn(2, 16, 8, 8), make_batch(2))
    assert torch.isfinite(out["loss"])


def test_recompute_gives_the_same_gradients_and_saves_the_copies_activations():
    from locallearn.metrics.memory import ActivationMeter

    grads, peaks = [], []
    for recompute in (False, True):
        torch.manual_seed(0)
        model, optimizers, *_ = make_model(
            "infopro+manpp", "resnet20", 4, **{"method.momentum.recompute": recompute}
        )
        aux, h = model.auxes[0], torch.randn(4, 16, 8, 8, requires_grad=True)
        meter = ActivationMeter(model)
        with meter.track():
            loss = aux(h, make_batch(4))["loss"]
        loss.backward()
        grads.append([h.grad, *(p.grad for p in aux.parameters() if p.requires_grad)])
        peaks.append(meter.peak)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert peaks[1] < peaks[0]
