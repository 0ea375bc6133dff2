"""``model.frozen_blocks=N``: the first N blocks and their aux nets never change (parameters, batch-norm
statistics, momentum copies), no gradient reaches them, the other blocks train, and bad values are
refused in one line."""

from __future__ import annotations

import pytest
import torch

from locallearn.config import ConfigError, load_config
from locallearn.engine.sequential import train_step
from tests.helpers import TINY_CLI, run_cli
from tests.methods.methods_util import tiny_batch, tiny_model

K = 4


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


@pytest.mark.parametrize("method", ["dgl", "dgl+manpp", "mlaan", "infopro+manpp"])
def test_frozen_blocks_never_change_and_the_others_train(method):
    n = 2
    model, opts, _ = tiny_model(method, k=K, **{"model.frozen_blocks": n})
    parts = {k: (model.body(k), model.auxes[k]) for k in range(K)}
    before = {k: [snapshot(m) for m in ms] for k, ms in parts.items()}
    model.train()
    for step in range(3):
        train_step(model, tiny_batch(8, seed=step), opts)
        for k in range(n):
            for m in parts[k]:
                assert all(p.grad is None for p in m.parameters())
    for k in range(K):
        moved = set().union(*(changed(b, m) for b, m in zip(before[k], parts[k])))
        if k < n:  # weights, BN running statistics, EMA copies: all as they were
            assert not moved, (k, sorted(moved)[:5])
        else:
            assert moved, k
    assert all(not m.training for k in range(n) for m in parts[k])
    assert all(m.training for k in range(n, K) for m in parts[k])


def test_frozen_blocks_stay_in_eval_mode_through_train_and_eval():
    model, _, _ = tiny_model("dgl", k=K, **{"model.frozen_blocks": 1})
    model.eval()
    model.train()
    assert not model.body(0).training and not model.auxes[0].training
    assert all(not layer.training for layer in model.body(0))
    assert model.body(1).training and model.auxes[1].training


def test_frozen_blocks_zero_is_the_plain_model():
    a, opts_a, _ = tiny_model("dgl", k=K)
    b, opts_b, _ = tiny_model("dgl", k=K, **{"model.frozen_blocks": 0})
    for model, opts in ((a, opts_a), (b, opts_b)):
        train_step(model.train(), tiny_batch(8), opts)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["model.num_blocks=4", "model.frozen_blocks=4"], "model.frozen_blocks must lie in 0..3"),
        (["model.num_blocks=4", "model.frozen_blocks=-1"], "model.frozen_blocks must lie in 0..3"),
        (["model.frozen_blocks=1", "engine.mode=pipeline"], "needs engine.mode=sequential"),
        (["model.frozen_blocks=1", "engine.mode=ddp"], "needs engine.mode=sequential"),
    ],
)
def test_bad_frozen_blocks_are_refused(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, overrides)


def test_cli_refuses_frozen_blocks_out_of_range_in_one_line(capsys, tmp_path):
    code, _, err = run_cli(["train", *TINY_CLI, "model.frozen_blocks=2", f"out_dir={tmp_path}"], capsys, True)
    assert code != 0 and len(err) == 1 and "model.frozen_blocks must lie in 0..1" in err[0], err


def test_frozen_blocks_with_grouped_steps():
    """``engine.group_steps``: the frozen blocks' optimizers are part of the grouped view, never stepped."""
    from locallearn.engine.optim import group_optimizers

    model, opts, _ = tiny_model("dgl", k=K, **{"model.frozen_blocks": 1})
    before = [snapshot(model.body(0)), snapshot(model.auxes[0]), snapshot(model.body(1))]
    train_step(model.train(), tiny_batch(8), opts, grouped=group_optimizers(opts, True))
    assert not changed(before[0], model.body(0)) and not changed(before[1], model.auxes[0])
    assert changed(before[2], model.body(1))


def test_the_bp_comparison_of_a_frozen_run_has_nothing_to_freeze():
    from locallearn.run.launch import comparison_config

    cfg = load_config(None, ["model.num_blocks=4", "model.frozen_blocks=2", "compare=[bp,dgl]"])
    assert comparison_config(cfg, "bp").model.frozen_blocks == 0  # K=1: the head's block only
    assert comparison_config(cfg, "dgl").model.frozen_blocks == 2  # the same K: the same control


def test_a_frozen_mlaan_block_reports_its_own_loss():
    """MLAAN's block 0 (no loss of its own) reports cut 1's cascaded loss; a frozen block 1, whose
    loss has no gradient, still reports its own."""
    from locallearn.engine.sequential import reported_losses

    model, opts, _ = tiny_model("mlaan", k=K, **{"model.frozen_blocks": 2})
    outs = train_step(model.train(), tiny_batch(8), opts)
    got = reported_losses(outs)
    assert got[0] == outs[1]["y"].double() and got[1] == outs[1]["loss"].double()
