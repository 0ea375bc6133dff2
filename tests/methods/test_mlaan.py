"""MLAAN: leap chains, window-2 gradients (blocks k-1 and k only), every EMA copy moves."""

from pathlib import Path

import pytest
import torch
from methods_util import tiny_batch, tiny_model

from locallearn.build import build_method, build_model
from locallearn.config import ConfigError, load_config
from locallearn.engine.sequential import train_epoch, train_step
from locallearn.engine.step import Cascade, local_step
from locallearn.methods.mlaan import leap_chain
from locallearn.types import FeatureInfo, InputInfo

R32 = [FeatureInfo(16, 1, stage=0)] + [FeatureInfo(16, 1, stage=1)] * 5
R32 += [FeatureInfo(32, 2, stage=2)] * 5 + [FeatureInfo(64, 4, stage=3)] * 5  # layers 0..15
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def chain(cut_after: int, depth: int = 4) -> list[int]:
    after = R32[cut_after + 1 :]
    return [cut_after + 1 + j for j in leap_chain(R32[cut_after], after, depth)]


def test_our_rule_leaps_to_each_later_stage_then_the_last_layers():
    assert chain(1) == [6, 11, 14, 15]  # [2,0], [3,0], then the latest: [3,3], [3,4]
    for cut_after in range(6, 11):  # cuts in stage 2
        assert chain(cut_after) == [11, 13, 14, 15]
    assert chain(11) == [12, 13, 14, 15] and chain(13) == [14, 15] and chain(14) == [15]


# configAuxPlus_new.py (Wendy231015/MLAAN) in global layer indices. ResNet-32: [2,0]=6, [3,0]=11,
# [3,1]=12, [3,2]=13, [3,3]=14, [3,4]=15. ResNet-110: [2,0]=19, [3,0]=37, [3,2]=39, [3,3]=40, [3,4]=41,
# [3,8]=45, [3,14]=51, [3,15]=52, [3,16]=53, [3,17]=54. One entry per cut; block 0 (cut 0) has no chain.
A32, B32, C32 = [6, 11, 13, 15], [6, 11, 14, 15], [11, 13, 14, 15]
R32_15 = [A32, A32, B32, A32, B32] + [C32] * 5 + [[12, 13, 15], [13, 14, 15], [14, 15], [15]]
A110, C110, D110 = [19, 37, 39, 54], [37, 39, 40, 54], [37, 40, 41, 54]
OFFICIAL = {
    "mlaan_resnet32_k8_cifar10.yaml": [A32, A32, B32, C32, C32, [13, 14, 15], [14, 15]],
    "mlaan_resnet32_k15_cifar10.yaml": R32_15,
    "mlaan_resnet110_k32_cifar10.yaml": [A110] * 11
    + [C110] * 10
    + [D110]
    + [[45, 54]] * 4
    + [[51, 54]] * 2
    + [[52, 54], [53, 54], [54]],
    "mlaan_resnet110_k54_cifar10.yaml": [A110] * 18
    + [C110] * 17
    + [D110]
    + [[45, 54]] * 7
    + [[51, 54]] * 4
    + [[52, 54]] * 2
    + [[53, 54]] * 3
    + [[54]],
}


def built_chains(config: Path | None, overrides: list[str]) -> list[list[int]]:
    cfg = load_config(config, [*overrides, "data.name=digits"])
    torch.manual_seed(0)
    model, _, _ = build_model(cfg, InputInfo(3, 32, (0.5,) * 3, (0.25,) * 3), 10)
    return [[model.cuts[k] + j for j in a.chain_layers] for k, a in enumerate(list(model.auxes)[:-1])]


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_paper_cells_use_the_official_chains(name):
    chains = built_chains(CONFIGS / name, [])
    assert chains[0] == []  # block 0 learns through the cascade of cut 1
    assert chains[1:] == OFFICIAL[name][1:]


def test_resnet32_k16_infopro_split_takes_the_k15_chain_of_each_cut():
    chains = built_chains(None, ["method.name=mlaan", "model.backbone=resnet32", "model.num_blocks=16",
                                 "model.split=infopro"])  # fmt: skip
    assert chains[0] == [] and chains[1:] == R32_15


def test_the_switch_and_other_splits_fall_back_to_our_rule():
    k8 = ["method.name=mlaan", "model.backbone=resnet32", "model.num_blocks=8"]
    chains = built_chains(None, [*k8, "model.split=infopro", "method.mlaan.official_chains=false"])
    assert chains[5] == [12, 13, 14, 15]  # rule; the official list after [3,0] is [[3,2],[3,3],[3,4]]
    chains = built_chains(None, [*k8, "model.split=cuts", "model.cuts=[2,3,6,8,10,12,14]"])
    assert chains[1] == [6, 11, 14, 15]  # after [1,1]: not the paper's 2nd cut -> rule (official: A32)
    assert chains[2:] == OFFICIAL["mlaan_resnet32_k8_cifar10.yaml"][2:]  # the paper's cuts from there on


def test_vgg_chain_leaps_stage_by_stage_with_max_pools():
    cfg = load_config(None, ["method.name=mlaan", "model.backbone=vgg13", "model.num_blocks=3",
                             "model.split=cuts", "model.cuts=[1,2]", "data.name=digits"])  # fmt: skip
    model, _, _ = build_model(cfg, InputInfo(3, 32, (0.5,) * 3, (0.25,) * 3), 10)
    aux = model.auxes[1]  # cut before layer 2 (the first conv of stage 2): layers 2..9 follow
    # the first conv of stages 2, 3, 4 (stage 5's keeps the shape: 512 -> 512), then the last layer
    assert [2 + j for j in aux.chain_layers] == [2, 4, 6, 9]
    pools = ["Identity", "MaxPool2d", "MaxPool2d", "MaxPool2d"]
    assert [type(p).__name__ for p in aux.pools] == pools
    rest = sum(p.numel() for p in model.backbone.layers[2:].parameters())
    chain = sum(p.numel() for p in aux.aug.parameters())
    assert chain < 0.7 * rest  # before: a copy of all 8 remaining layers
    h = torch.randn(2, 64, 16, 16)
    assert aux.leap(h).shape == (2, 512, 1, 1)


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


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3])  # a middle cut, the next, and the last block (CascadeHead)
def test_one_forward_of_block_k_gives_the_two_graph_gradients(k, recompute):
    """Block k runs once, on the cascade, and both losses read it: every parameter's gradient is what the
    official formulation (block k again on its detached input for the independent loss) gives; with
    ``recompute`` (block k-1's activations recomputed in backward) too."""
    model, _, _ = tiny_model("mlaan", k=4, **{"method.mlaan.recompute": recompute})
    assert model.auxes[k].recompute is recompute
    batch = tiny_batch()
    with torch.no_grad():
        inputs = [batch.x]
        for j in range(k):
            inputs.append(model.body(j)(inputs[-1]))
    aux, wx, wy = model.auxes[k], 0.001, 0.999
    params = [*model.body(k - 1).parameters(), *model.body(k).parameters(), *aux.parameters()]

    def grads():
        out = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        for p in params:
            p.grad = None
        return out

    # reference: two graphs of block k, one loss
    h = model.body(k)(inputs[k])
    z = model.body(k)(model.body(k - 1)(inputs[k - 1]))
    if k < model.num_blocks - 1:
        x = aux.task.loss(aux.x_head(h), batch)
        y = aux.task.loss(aux.y_head(aux.leap(z)), batch)
    else:
        x, y = aux.inner(h, batch)["loss"], aux.inner(z, batch)["loss"]
    (wx * x + wy * y).backward()
    want = grads()
    _, out = local_step(model.body(k), aux, inputs[k], batch, None,
                        cascade=Cascade(model.body(k - 1), inputs[k - 1], None), defer_step=True)  # fmt: skip
    got = grads()
    assert out["x"].item() == pytest.approx(x.item(), rel=1e-5)
    assert out["y"].item() == pytest.approx(y.item(), rel=1e-5)
    assert sum(g.abs().sum() for g in got[: len(list(model.body(k - 1).parameters()))]) > 0
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_recompute_leaves_batch_norm_statistics_as_the_forward_set_them():
    stats = []
    for recompute in (False, True):
        model, optimizers, _ = tiny_model("mlaan", k=3, **{"method.mlaan.recompute": recompute})
        train_step(model, tiny_batch(), optimizers)
        stats.append([b.clone() for b in model.backbone.buffers()])
    assert all(torch.equal(a, b) for a, b in zip(*stats))


def test_recompute_defaults_on_for_outside_models_only():
    listed = tiny_model("mlaan", k=3)[0]
    assert not any(a.recompute for a in listed.auxes)
    cfg = load_config(
        None, ["method.name=mlaan", "model.backbone=torchvision:resnet18", "model.num_blocks=3"]
    )
    outside = build_model(cfg, InputInfo(3, 32, (0.5,) * 3, (0.5,) * 3), 10)[0]
    assert all(a.recompute for a in outside.auxes)


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


def test_block_zero_reports_the_cascaded_loss_that_trains_it():
    """Issue 28: the logs showed block 0's loss as 0.0 every step though cut 1's cascade trains it."""
    from locallearn.engine.optim import StepSchedule

    model, optimizers, _ = tiny_model("mlaan", k=3)
    torch.manual_seed(1)
    expected = train_step(model, tiny_batch(), optimizers)[1]["y"].item()
    model, optimizers, _ = tiny_model("mlaan", k=3)
    torch.manual_seed(1)
    optim = load_config(None, ["optim.schedule=constant", "optim.warmup_epochs=0", "optim.lr=0.05"]).optim
    schedule = StepSchedule(optimizers, optim, 1)
    stats = train_epoch(model, [tiny_batch()], optimizers, schedule, torch.device("cpu"))
    assert stats["block_losses"][0] == pytest.approx(expected) and expected > 0


def test_mlaan_does_not_take_a_momentum_aux():
    with pytest.raises(ConfigError, match="does not compose"):
        build_method("mlaan+manpp")
