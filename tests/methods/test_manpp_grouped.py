"""``method.momentum.grouped``: LB and EMA as one grouped call, bitwise equal to the two separate calls."""

import copy
import logging

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock as TorchvisionBasic
from torchvision.models.resnet import Bottleneck

from locallearn.backbones.edsr import ResBlock
from locallearn.backbones.resnet_cifar import BasicBlock, Stem, infopro_init
from locallearn.engine.sequential import train_step
from locallearn.methods.man import MomentumAux, MomentumConfig
from locallearn.methods.man_grouped import GroupedPair, Unsupported
from tests.helpers import make_batch, make_model


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the two paths compared in the same reduction order as the CI runs
    yield
    torch.set_num_threads(threads)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "method,k,extra",
    [
        ("dgl+manpp", 4, {}),
        ("infopro+manpp", 2, {"split": "cuts", "model.cuts": "[4]"}),  # layer 4 is a stride-2 unit
        ("infopro+man", 3, {"method.momentum.recompute": True}),
    ],
)
def test_grouped_training_equals_separate_bitwise(method, k, extra):
    runs = []
    for grouped in (False, True):
        torch.manual_seed(0)
        model, optimizers, *_ = make_model(
            method, "resnet20", k, **extra, **{"method.momentum.grouped": grouped}
        )
        auxes = [aux for aux in model.auxes[:-1] if isinstance(aux, MomentumAux)]
        assert all((aux.pair is not None) == grouped for aux in auxes)
        losses = [[o["loss"] for o in train_step(model, make_batch(8, seed=s), optimizers)] for s in range(3)]
        runs.append((losses, snapshot(model)))
    (losses0, state0), (losses1, state1) = runs
    assert list(state0) == list(state1)  # checkpoints keep their keys
    for a, b in zip(sum(losses0, []), sum(losses1, [])):
        assert torch.equal(a, b)
    for key in state0:
        assert torch.equal(state0[key], state1[key]), key  # weights, EMA, BN running stats, scale


def _twins(make):
    torch.manual_seed(0)
    lb = make()
    ema = copy.deepcopy(lb)
    infopro_init(ema)  # any other weights
    ema.requires_grad_(False)
    return lb, ema


LAYERS = {
    "cifar_basic": (lambda: BasicBlock(16, 16), (4, 16, 8, 8)),
    "cifar_basic_stride2": (lambda: BasicBlock(16, 32, 2), (4, 16, 8, 8)),
    "cifar_stem": (lambda: Stem(3, 16), (4, 3, 8, 8)),
    "torchvision_basic": (lambda: TorchvisionBasic(32, 32), (2, 32, 8, 8)),
    "torchvision_bottleneck": (lambda: Bottleneck(64, 16), (2, 64, 8, 8)),
    "torchvision_bottleneck_stride2": (
        lambda: Bottleneck(32, 16, 2, nn.Sequential(nn.Conv2d(32, 64, 1, 2, bias=False), nn.BatchNorm2d(64))),
        (2, 32, 8, 8),
    ),
    "vgg_group": (  # a torchvision VGG-BN layer: the previous group's max-pool, then conv-BN-ReLU
        lambda: nn.Sequential(
            nn.MaxPool2d(2, 2), nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(True)
        ),
        (2, 8, 8, 8),
    ),
    "edsr_block": (lambda: ResBlock(8, 0.1), (2, 8, 8, 8)),
}


@pytest.mark.parametrize("name", LAYERS)
def test_pair_equals_two_calls_in_values_gradients_and_buffers(name):
    make, shape = LAYERS[name]
    lb, ema = _twins(make)
    lb2, ema2 = copy.deepcopy(lb), copy.deepcopy(ema)
    pair = GroupedPair(lb2, ema2)
    h0 = torch.randn(*shape)
    results = []
    for grouped in (False, True):
        h = h0.clone().requires_grad_()
        s = torch.tensor(1.3, requires_grad=True)
        x = h * 1.0  # h's gradient is accumulated by autograd, as behind a real block
        y_lb, y_ema = pair(x) if grouped else (lb(x), ema(x))
        y = s * y_lb + (2 - s) * y_ema
        loss = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).square().mean()
        loss.backward()
        a, b = (lb2, ema2) if grouped else (lb, ema)
        assert all(p.grad is None for p in b.parameters())  # the EMA copy is never trained
        results.append(
            [y, loss, h.grad, s.grad, *(p.grad for p in a.parameters()), *a.buffers(), *b.buffers()]
        )
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_channels_last_stays_bitwise_equal():
    lb, ema = _twins(lambda: BasicBlock(16, 32, 2).to(memory_format=torch.channels_last))
    pair = GroupedPair(copy.deepcopy(lb), copy.deepcopy(ema))
    h0 = torch.randn(4, 16, 8, 8).to(memory_format=torch.channels_last)
    grads, outs = [], []
    for run in (lambda x: (lb(x), ema(x)), pair):
        h = h0.clone().requires_grad_()
        y_lb, y_ema = run(h)
        (0.7 * y_lb + 1.3 * y_ema).square().sum().backward()
        outs.append(torch.cat([y_lb, y_ema], 1))
        grads.append(h.grad)
    assert torch.equal(*outs) and torch.equal(*grads)


class Unsupportable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return x + self.fc(self.norm(x))


def test_unsupported_layers_fall_back_to_two_calls_and_say_so(caplog):
    with pytest.raises(Unsupported, match="LayerNorm"):
        GroupedPair(Unsupportable(), Unsupportable())
    with pytest.raises(Unsupported, match="Dropout"):
        GroupedPair(BasicBlock(8, 8, droprate=0.1), BasicBlock(8, 8, droprate=0.1))  # RNG draws would differ
    cfg = MomentumConfig(grouped=True)
    with caplog.at_level(logging.INFO, logger="locallearn.methods.man"):
        aux = MomentumAux(Unsupportable(), nn.Identity(), cfg)
    assert aux.pair is None
    assert "Unsupportable run as two separate calls" in caplog.text
    h = torch.randn(2, 3, 8)
    torch.testing.assert_close(aux.fuse(h), aux.scale * aux.lb(h) + (2 - aux.scale) * aux.ema(h))


def test_grouped_aux_keeps_gradient_isolation_and_state_dict_keys():
    model, *_ = make_model("dgl+manpp", "resnet20", 3, **{"method.momentum.grouped": True})
    plain, *_ = make_model("dgl+manpp", "resnet20", 3)
    assert list(model.state_dict()) == list(plain.state_dict())
    aux, live = model.auxes[0], model.backbone.layers[model.cuts[0]]
    aux(torch.randn(4, 16, 8, 8, requires_grad=True), make_batch(4))["loss"].backward()
    assert all(p.grad is None for p in live.parameters())  # the next block is not touched
    assert all(p.grad is None for p in aux.ema.parameters())
    assert all(p.grad is not None for p in aux.lb.parameters()) and aux.scale.grad is not None


def test_deep_copy_runs_its_own_copies():
    aux = MomentumAux(BasicBlock(8, 8), nn.Identity(), MomentumConfig(grouped=True, init="copy"))
    twin = copy.deepcopy(aux)
    modules = {id(m) for m in twin.modules()}
    assert all(id(step.a) in modules for step in twin.pair.steps if step.a is not None)
    with torch.no_grad():
        twin.lb.conv1.weight.zero_()
    h = torch.randn(2, 8, 4, 4)
    assert torch.equal(twin.fuse(h), twin.scale * twin.lb(h) + (2 - twin.scale) * twin.ema(h))
    assert not torch.equal(twin.fuse(h), aux.fuse(h))
