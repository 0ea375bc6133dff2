"""The activation meter: what it counts, and the headline saving of local learning."""

import torch
from torch import nn

from locallearn.build import build_model
from locallearn.engine.optim import build_optimizer
from locallearn.engine.sequential import train_step
from locallearn.metrics.memory import ActivationMeter
from locallearn.types import InputInfo
from tests.helpers import make_batch, make_config

CIFAR = InputInfo(3, 32, (0.5,) * 3, (0.25,) * 3)


def peak_bytes(method, k, split, batch_size=4):
    cfg = make_config(method, "resnet110", k, split=split)
    model, _, _ = build_model(cfg, CIFAR, 10)
    optimizers = [build_optimizer(model.block_parameters(i), cfg.optim) for i in range(model.num_blocks)]
    meter = ActivationMeter(model)
    train_step(model, make_batch(batch_size, CIFAR), optimizers, meter=meter)
    return meter


def test_meter_counts_saved_activations_not_parameters():
    lin = nn.Linear(100, 50)
    meter = ActivationMeter(lin)
    x = torch.randn(8, 100)
    with meter.track():
        y = torch.relu(lin(x))
    # linear saves its input (8x100 floats); relu saves its output (8x50); the weight is excluded
    assert meter.peak == (8 * 100 + 8 * 50) * 4
    y.sum().backward()


def test_meter_dedupes_storage():
    meter = ActivationMeter(nn.Identity())
    x = torch.randn(16, requires_grad=True)
    with meter.track():
        y = (x * x).sum()  # x is saved twice, counted once
    assert meter.peak == 16 * 4
    y.backward()


def test_infopro_manpp_k55_needs_at_most_a_fifth_of_bp():
    bp = peak_bytes("bp", 1, "even")
    local = peak_bytes("infopro+manpp", 55, "infopro")
    assert len(local.block_bytes) == 55 and len(bp.block_bytes) == 1
    assert local.peak <= bp.peak / 5, (local.peak, bp.peak)


def test_activation_bytes_are_affine_in_batch_size():
    """Per-sample tensors scale with the batch; BN's saved per-channel statistics do not (a small constant),
    so two batch sizes extrapolate exactly to any other."""
    a, b, c = (peak_bytes("dgl", 4, "infopro", batch_size=n).peak for n in (2, 4, 6))
    assert c - b == b - a > 0
    constant = a - (b - a)
    assert 0 < constant < 0.01 * a
