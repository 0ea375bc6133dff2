"""Engine invariants: every method x backbone steps; gradients never cross blocks; bp equals plain PyTorch."""

import copy

import pytest
import torch
import torch.nn.functional as F

from locallearn.build import BACKBONES, build_backbone, method_names
from locallearn.engine.sequential import train_step
from tests.helpers import INPUTS, make_batch, make_model

CIFAR = [name for name in BACKBONES if BACKBONES[name].__module__.endswith("resnet_cifar")]


def contract_cells():
    """Every method on the smallest CIFAR ResNet; every CIFAR ResNet with the flagship combinations.
    (torchvision / ViT backbones: tests/backbones/test_method_grid.py.)"""
    cells = [("resnet20", m) for m in method_names()]
    cells += [(b, m) for b in CIFAR if b != "resnet20" for m in ("bp", "dgl+manpp", "infopro+manpp")]
    return cells


@pytest.mark.parametrize("backbone,method", contract_cells())
def test_every_method_takes_a_finite_step(backbone, method):
    k = 1 if method == "bp" else 3
    model, optimizers, _, _ = make_model(method, backbone, k)
    before = [p.detach().clone() for p in model.backbone.parameters()]
    outs = train_step(model, make_batch(), optimizers)
    assert len(outs) == k
    assert all(torch.isfinite(o["loss"]) for o in outs)
    moved = [not torch.equal(a, b) for a, b in zip(before, model.backbone.parameters())]
    assert any(moved)


@pytest.mark.parametrize("method", ["dgl", "infopro", "dgl+manpp", "infopro+man"])
def test_gradient_isolation(method):
    """When block k's optimizer steps, only block k's own parameters (and its aux's) carry a gradient."""
    model, optimizers, _, _ = make_model(method, "resnet20", 4)
    owned = [{id(p) for p in model.block_parameters(k)} for k in range(model.num_blocks)]
    everything = list(model.parameters())
    seen: list[set[int]] = []
    for opt in optimizers:
        original = opt.step

        def step(*args, _original=original, **kwargs):
            seen.append({id(p) for p in everything if p.grad is not None})
            return _original(*args, **kwargs)

        opt.step = step
    train_step(model, make_batch(), optimizers)
    assert len(seen) == model.num_blocks
    for k, with_grad in enumerate(seen):
        assert with_grad, f"block {k} got no gradient at all"
        assert with_grad <= owned[k], f"block {k}'s loss reached parameters of another block"


def test_blocks_partition_the_backbone():
    model, *_ = make_model("infopro+manpp", "resnet32", 16, split="infopro")
    layers = [i for r in model.ranges for i in r]
    assert layers == list(range(len(model.backbone)))
    ids = [id(p) for k in range(model.num_blocks) for p in model.block_parameters(k)]
    assert len(ids) == len(set(ids))  # no parameter belongs to two optimizers
    ema = {id(p) for aux in model.auxes[:-1] for p in aux.ema.parameters()}
    assert not ema & set(ids)  # the frozen EMA copy is in no optimizer


def test_bp_equals_plain_pytorch_bitwise():
    model, optimizers, task, cfg = make_model("bp", "resnet32", 1)
    plain_backbone = copy.deepcopy(model.backbone)
    plain_head = copy.deepcopy(model.head)
    params = list(plain_backbone.parameters()) + list(plain_head.parameters())
    plain_opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    for step in range(3):
        batch = make_batch(seed=step)
        train_step(model, batch, optimizers)
        loss = F.cross_entropy(plain_head(plain_backbone(batch.x)), batch.y)
        loss.backward()
        plain_opt.step()
        plain_opt.zero_grad()
    ours = list(model.backbone.parameters()) + list(model.head.parameters())
    for a, b in zip(ours, params):
        assert torch.equal(a, b)
    for a, b in zip(model.backbone.buffers(), plain_backbone.buffers()):
        assert torch.equal(a, b)


def test_eval_forward_is_backbone_plus_head():
    model, *_ = make_model("dgl+manpp", "resnet20", 4)
    model.eval()
    x = make_batch().x
    assert torch.equal(model(x), model.head(model.backbone(x)))


def test_backbone_forward_composes_layers_and_counts_params():
    backbone = build_backbone("resnet32", 3)
    head = torch.nn.Linear(64, 10)
    assert (
        sum(p.numel() for p in backbone.parameters()) + sum(p.numel() for p in head.parameters()) == 466_906
    )
    x = torch.randn(2, 3, 32, 32)
    backbone.eval()
    h = x
    for layer, info in zip(backbone.layers, backbone.feature_info):
        h = layer(h)
        assert h.shape[1] == info.num_chs and h.shape[-1] == 32 // info.reduction
    assert torch.equal(backbone(x), h)
    assert build_backbone("resnet110", 3).feature_info[-1].reduction == 4
    assert INPUTS.size == 8
