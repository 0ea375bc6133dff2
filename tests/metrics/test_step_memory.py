"""Whole-step memory (locallearn/metrics/step_memory.py): the account against what torch's CPU allocator
really holds during one training step, the optimizer state it predicts, and the engine schedules."""

import pytest
import torch
from torch import nn

from locallearn.bench.common import build_cell, synthetic_batch
from locallearn.metrics.step_memory import (
    StepMeter,
    allocator_rise,
    block_workspace,
    optimizer_state_bytes,
    step_memory,
    storage_bytes,
)


def account(cell, batch_size):
    meter = StepMeter(cell.model)
    cell.step(synthetic_batch(batch_size, seed=1), meter)
    work = block_workspace(cell.model, synthetic_batch(batch_size, seed=2))
    return step_memory(cell.model, cell.optimizers, meter.block_bytes, max(meter.bank_bytes), work)


@pytest.mark.parametrize(
    "method,k,extra",
    [("bp", 1, ()), ("dgl+manpp", 4, ()), ("infopro", 4, ()), ("mlaan", 4, ()),
     ("mlaan", 4, ("method.mlaan.recompute=true",))],
)  # fmt: skip
def test_account_is_within_5_percent_of_the_cpu_allocator(method, k, extra):
    torch.manual_seed(0)
    cell = build_cell("resnet20", k, method, overrides=extra)
    cell.step(synthetic_batch(8))  # the optimizers' state exists from here on, as in training
    step = account(cell, 8)
    batch = synthetic_batch(8, seed=3)
    # what this step's tensors hold before it (not every tensor of the process: other tests' leftovers)
    state = [v for opt in cell.optimizers for st in opt.state.values() for v in st.values()]
    held = storage_bytes([*cell.model.parameters(), *cell.model.buffers(), *state, batch.x, batch.y])
    measured = held + allocator_rise(lambda: cell.step(batch))
    assert step.peak_total_bytes == pytest.approx(measured, rel=0.05)
    # every term matters at this size: leaving the optimizer state or the gradients out misses by > 5 %
    assert step.optimizer_state_bytes > 0.05 * measured
    live = step.blocks[step.peak_block]
    assert live.gradient_bytes + live.workspace_bytes > 0.05 * measured


def _sgd(params, **kw):
    return torch.optim.SGD(params, lr=0.1, **kw)


@pytest.mark.parametrize(
    "make",
    [
        lambda p: _sgd(p, momentum=0.9),
        lambda p: _sgd(p, momentum=0.9, nesterov=True, weight_decay=1e-4),
        lambda p: _sgd(p, momentum=0.9, foreach=True),
        lambda p: _sgd(p, momentum=0.9, fused=True),
        lambda p: _sgd(p, momentum=0.0),
        lambda p: torch.optim.AdamW(p, lr=1e-3),
        lambda p: torch.optim.AdamW(p, lr=1e-3, foreach=True),
        lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True),
        lambda p: torch.optim.AdamW(p, lr=1e-3, amsgrad=True),
    ],
)
def test_optimizer_state_predicted_before_the_first_step_is_what_torch_allocates(make):
    model = nn.Sequential(nn.Linear(7, 13), nn.ReLU(), nn.Linear(13, 3))
    opt = make(model.parameters())
    predicted = optimizer_state_bytes(opt)
    model(torch.randn(4, 7)).sum().backward()
    opt.step()
    counted = optimizer_state_bytes(opt)
    assert predicted == counted
    params = sum(p.numel() * 4 for p in model.parameters())
    moments = {torch.optim.SGD: 1 if opt.defaults.get("momentum") else 0, torch.optim.AdamW: 2}[type(opt)]
    moments += 1 if opt.defaults.get("amsgrad") else 0
    # AdamW: + one 4-byte step tensor per parameter tensor
    steps = 4 * 4 if isinstance(opt, torch.optim.AdamW) else 0
    assert counted == moments * params + steps


def _model_and_opts(method="dgl", k=4):
    torch.manual_seed(0)
    cell = build_cell("resnet20", k, method)
    return cell.model, cell.optimizers


def test_schedules_sequential_grouped_ddp_pipeline():
    model, opts = _model_and_opts()
    acts = [1000, 5000, 3000, 2000]
    seq = step_memory(model, opts, acts)
    grads = [b.gradient_bytes for b in seq.blocks]
    resident = seq.parameter_bytes + seq.optimizer_state_bytes
    assert seq.peak_total_bytes == resident + max(
        max(a + g, g + b.step_bytes) for a, g, b in zip(acts, grads, seq.blocks)
    )
    assert seq.peak_activation_bytes == 5000
    # engine.group_steps: the gradients of every earlier block are still held
    grouped = step_memory(model, opts, acts, group_steps=True)
    assert grouped.blocks[3].held_gradient_bytes == sum(grads[:3])
    assert grouped.peak_total_bytes >= seq.peak_total_bytes
    # ddp: each block's flat all-reduce copy of its gradients during its step
    ddp = step_memory(model, opts, [0, 0, 0, 0], mode="ddp")
    assert ddp.peak_total_bytes >= resident + 2 * max(grads)
    # pipeline: a rank holds its own blocks; the peak is the largest rank's
    pipe = step_memory(model, opts, acts, mode="pipeline", rank_blocks=[[0, 1], [2, 3]])
    assert len(pipe.rank_peak_bytes) == 2 and pipe.peak_total_bytes == max(pipe.rank_peak_bytes)
    assert pipe.peak_total_bytes < seq.peak_total_bytes
    # pipeline x replicas (engine.replicas > 1): each rank also holds its block's flat all-reduce copy
    mesh = step_memory(model, opts, acts, mode="pipeline", rank_blocks=[[0, 1], [2, 3]], all_reduce=True)
    assert [b.bucket_bytes for b in mesh.blocks] == grads and not any(b.bucket_bytes for b in pipe.blocks)
    assert mesh.peak_total_bytes >= pipe.peak_total_bytes
    # saved bytes are linear in the batch; weights and optimizer state are not
    double = seq.scaled(2.0)
    assert double.parameter_bytes == seq.parameter_bytes
    assert double.peak_activation_bytes == 2 * seq.peak_activation_bytes


def test_bp_holds_every_gradient_at_once():
    model, opts = _model_and_opts("bp", 1)
    step = step_memory(model, opts, [10_000])
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    assert step.gradient_bytes == trainable
    assert step.peak_total_bytes >= step.parameter_bytes + step.optimizer_state_bytes + trainable + 10_000


def test_momentum_copies_are_counted_ema_without_gradient():
    model, opts = _model_and_opts("dgl+manpp", 4)
    step = step_memory(model, opts, [0] * 4)
    all_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    assert step.parameter_bytes == all_bytes  # backbone, aux nets, LB and EMA copies, BN statistics
    frozen = sum(p.numel() * 4 for p in model.parameters() if not p.requires_grad)
    assert frozen > 0 and step.gradient_bytes == all_bytes - frozen - sum(
        b.numel() * b.element_size() for b in model.buffers()
    )


def test_measuring_the_workspace_leaves_training_untouched():
    model, opts = _model_and_opts("dgl+manpp", 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    work = block_workspace(model, synthetic_batch(4))
    assert len(work.workspace_bytes) == 4 and work.held_bytes[0] == 0 and work.held_bytes[1] > 0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics
    assert all(p.grad is None for p in model.parameters()) and torch.equal(torch.get_rng_state(), rng)
    assert all(not opt.state for opt in opts)  # no optimizer step


def test_a_run_reports_the_whole_step_even_when_the_workspace_cannot_be_measured(
    tmp_path, monkeypatch, caplog
):
    from locallearn.config import load_config
    from locallearn.run import Run

    def broken(self):
        raise RuntimeError("no profiler here")

    monkeypatch.setattr(Run, "measure_workspace", broken)
    cfg = load_config(None, ["data.name=digits", "data.train_subset=64", "data.test_subset=32", "data.batch_size=32",
                             "model.backbone=resnet20", "model.num_blocks=2", "method.name=dgl", "optim.epochs=1",
                             "engine.device=cpu", "engine.threads=1", f"out_dir={tmp_path}", "name=r"])  # fmt: skip
    memory = Run(cfg, quiet=True).fit()["memory"]
    assert memory["workspace_measured"] is False and "no profiler here" in caplog.text
    assert memory["peak_total_bytes"] > memory["peak_activation_bytes"] + memory["parameter_bytes"]


def test_measuring_the_workspace_prints_nothing_on_the_console(capfd):
    """Some torch builds' kineto writes "USDT: ... profiler_start" to fd 2 at every profiler start and stop:
    34 such lines landed in the quick start's console before they were silenced."""
    allocator_rise(lambda: torch.randn(64, 64) @ torch.randn(64, 64))
    out, err = capfd.readouterr()
    assert "profiler_st" not in err and "USDT" not in err, err


def test_session_peak_ignores_frees_it_did_not_see_allocated():
    """The allocator check's running total: a free of a block allocated before the session (the
    reporter may give it a stale size from an earlier session) does not lower the total; frees of
    blocks allocated in the session do, by the size they were allocated with."""
    from locallearn.metrics.step_memory import session_peak

    records = [(0, 100, 1), (1, -400, 9), (2, 50, 2), (3, -100, 1), (4, 80, 3), (5, 0, 8)]
    assert session_peak(records) == 150
    assert session_peak(reversed(records)) == 150  # ordered by time, not by arrival
    assert session_peak([]) == 0
