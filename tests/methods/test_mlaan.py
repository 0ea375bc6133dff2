"""MLAAN: leap chains, window-2 gradients (blocks k-1 and k only), every EMA copy moves."""

import pytest
import torch
from methods_util import tiny_batch, tiny_model

from locallearn.build import build_method
from locallearn.config import ConfigError
from locallearn.engine.sequential import train_step
from locallearn.engine.step import Cascade, local_step
from locallearn.methods.mlaan import leap_chain
from locallearn.types import FeatureInfo

R32 = [FeatureInfo(16, 1)] * 6 + [FeatureInfo(32, 2)] * 5 + [FeatureInfo(64, 4)] * 5  # layers 0..15


def chain(cut_after: int, depth: int = 4) -> list[int]:
    after = R32[cut_after + 1 :]
    return [cut_after + 1 + j for j in leap_chain(R32[cut_after], after, depth)]


def test_leap_chains_follow_the_official_resnet32_lists():
    # configAuxPlus_new.py K=15 in global indices: [2,0]=6, [3,0]=11, [3,2]=13, [3,3]=14, [3,4]=15
    assert chain(1) == [6, 11, 14, 15]  # official [[2,0],[3,0],[3,2 or 3,3],[3,4]]
    for cut_after in range(6, 11):  # cuts in stage 2: 5 x [[3,0],[3,2],[3,3],[3,4]]
        assert chain(cut_after) == [11, 13, 14, 15]
    assert chain(12) == [13, 14, 15]  # [[3,2],[3,3],[3,4]]
    assert chain(13) == [14, 15] and chain(14) == [15]


def test_window_two_gradients_reach_blocks_k_minus_1_and_k_only():
    model, optimizers, _ = tiny_model("mlaan", k=4)
    batch, k = tiny_batch(), 2
    with torch.no_grad():
        inputs = [batch.x]
        for j in range(k):
            inputs.append(model.body(j)(inputs[-1]))
    seen = {}

    class Recorder:  # stands in for an optimizer: notes which parameters got a gradient
        def __init__(self, block):
            self.block = block
            self.param_groups = [{"params": list(model.block_parameters(block))}]

        def step(self):
            seen[self.block] = [
                p.grad is not None and p.grad.abs().sum() > 0 for p in self.param_groups[0]["params"]
            ]

        def zero_grad(self, set_to_none=True):
            for p in self.param_groups[0]["params"]:
                p.grad = None

    for p in model.parameters():
        p.grad = None
    local_step(model.body(k), model.auxes[k], inputs[k], batch, Recorder(k),
               cascade=Cascade(model.body(k - 1), inputs[k - 1], Recorder(k - 1)))  # fmt: skip
    assert set(seen) == {k - 1, k}
    body_grads = [any(p.grad is not None for p in model.body(k - 1).parameters())]
    assert all(seen[k]) and any(seen[k - 1]) and not any(body_grads)  # stepped, then zeroed
    for j in range(model.num_blocks):
        if j not in (k - 1, k):
            assert all(p.grad is None for p in model.body(j).parameters())
            assert all(p.grad is None for p in model.auxes[j].parameters())
    # block k-1's own parameters (not its aux) are what the cascade reached
    body_params = {id(p) for p in model.body(k - 1).parameters()}
    reached = [g for p, g in zip(model.block_parameters(k - 1), seen[k - 1]) if id(p) in body_params]
    assert reached and all(reached)


def test_every_ema_copy_moves_each_step():
    model, optimizers, _ = tiny_model("mlaan", k=4)
    auxes = [a for a in list(model.auxes)[:-1] if a.ema is not None]
    assert len(auxes) == model.num_blocks - 2  # cuts 1..K-2 (block 0 learns through cut 1's cascade)
    before = [[p.clone() for p in a.ema.parameters()] for a in auxes]
    train_step(model, tiny_batch(), optimizers)
    for a, old in zip(auxes, before):
        assert all(not p.requires_grad for p in a.ema.parameters())
        assert any(not torch.equal(p, q) for p, q in zip(a.ema.parameters(), old))


def test_last_block_keeps_both_losses_and_block_zero_has_none():
    model, optimizers, _ = tiny_model("mlaan", k=3)
    outs = train_step(model, tiny_batch(), optimizers)
    assert outs[0]["loss"].item() == 0.0 and not list(model.auxes[0].parameters())
    last = outs[-1]
    assert torch.allclose(last["loss"], 0.001 * last["x"] + 0.999 * last["y"])
    assert model.window == 2


def test_mlaan_does_not_take_a_momentum_aux():
    with pytest.raises(ConfigError, match="does not compose"):
        build_method("mlaan+manpp")
