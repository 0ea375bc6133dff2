"""engine.mode=pipeline engine.replicas=R (engine/mesh.py): 2 stages x 2 replicas on 4 gloo processes.

The engine-level test pins the semantics on a model without batch statistics (equal to the pipeline
with R=1 on the concatenated batch, up to the all-reduce's summation order); the run-level ones train
resnet20 through the CLI's run: resume exact, evaluation equal to one process, a dead rank named."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from dist_helpers import RandomBatches, launch, run_function, start, tiny_config
from torch import nn

from locallearn.backbones.base import Backbone
from locallearn.config import ConfigError
from locallearn.engine import checkpoint, mesh, pipeline
from locallearn.engine.distributed import Context, DistributedError
from locallearn.methods.man import MomentumAux, MomentumConfig
from locallearn.model import LocalModel
from locallearn.run.launch import evaluate_checkpoint
from locallearn.types import FeatureInfo

SIZES = [2, 2]  # blocks per stage


class Aux(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.head = nn.Linear(channels, 10)

    def forward(self, h, batch):
        return {"loss": F.cross_entropy(self.head(h.mean((2, 3))), batch.y)}


def bn_free_model(momentum: bool) -> LocalModel:
    """K=4 blocks of conv + tanh, no batch statistics; ``momentum``: MAN++ aux nets on blocks 0-2 (the
    one of block 1 reads layer 2, which lives on the other stage)."""
    torch.manual_seed(0)
    layers = [nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU())]
    layers += [nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.Tanh()) for _ in range(3)]
    info = [FeatureInfo(6, 1)] * 4
    cfg = MomentumConfig(momentum=0.8)
    auxes = [MomentumAux(layers[k + 1], Aux(6), cfg) if momentum else Aux(6) for k in range(3)] + [Aux(6)]
    return LocalModel(Backbone(layers, info, 1), [1, 2, 3], auxes)


def Batches():  # noqa: N802 (stands where the class stood)
    """Six global batches of 9 random 8x8 images (shards of 4 and 5 on 2 replicas)."""
    return RandomBatches(6, 9)


class Schedule:
    lr, step_count = 0.1, 0

    def step(self):
        self.step_count += 1


def _train(ctx, out: str, replicas: int) -> None:
    """Both models in turn, each one epoch through the mesh (R=1: today's pipeline)."""
    grid = mesh.make(ctx, replicas)
    stage = pipeline.stages(SIZES)[grid.stage]
    for momentum in (False, True):
        model = bn_free_model(momentum)
        opts = [torch.optim.SGD(model.block_parameters(k), lr=0.1, momentum=0.9) for k in range(4)]
        pipe = pipeline.Pipe(ctx, 2, torch.zeros(1), torch.ones(1), replicas, grid.share)
        link = pipeline.MomentumLink(ctx, model, stage, 1, 1, replicas)
        batches = grid.train_batches(Batches()) if stage.first else None
        after = grid.after_step(model, stage)
        pipeline.train_epoch(
            model, stage, pipe, link, batches, 6, grid.wrap(opts), Schedule(), ctx.device, after_step=after
        )
        torch.save(model.state_dict(), Path(out, f"{momentum}.R{replicas}.rank{ctx.rank}.pt"))


def stage_keys(model: LocalModel, blocks: range) -> list[str]:
    layers = tuple(f"backbone.layers.{i}." for k in blocks for i in model.ranges[k])
    return [k for k in model.state_dict() if k.startswith(layers + tuple(f"auxes.{b}." for b in blocks))]


def test_mesh_equals_the_pipeline_on_the_concatenated_batch(tmp_path):
    """2 x 2 against 2 x 1, for a window-1 method and for MAN++ (the EMA copy on stage 0 follows
    stage 1's live layer, shipped backward replica to replica): every parameter of every stage equals
    the single pipeline's on the whole batch up to float summation order, and replicas are identical."""
    run_function(4, _train, str(tmp_path), 2)
    run_function(2, _train, str(tmp_path), 1)
    for momentum in (False, True):
        init = bn_free_model(momentum).state_dict()
        for p, st in enumerate(pipeline.stages(SIZES)):
            keys = stage_keys(bn_free_model(momentum), st.blocks)
            want = torch.load(tmp_path / f"{momentum}.R1.rank{p}.pt")
            a, b = (torch.load(tmp_path / f"{momentum}.R2.rank{2 * p + r}.pt") for r in range(2))
            for key in keys:
                assert not torch.equal(want[key], init[key]), key  # it trained
                torch.testing.assert_close(a[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
                assert torch.equal(a[key], b[key]), key
            if momentum and p == 0:  # block 1's EMA moved towards stage 1's layer 2
                assert not torch.equal(a["auxes.1.ema.0.weight"], init["auxes.1.ema.0.weight"])


def test_replicas_need_the_pipeline_mode_and_a_divisible_world():
    with pytest.raises(ConfigError, match="needs engine.mode=pipeline"):
        tiny_config(Path("x"), mode="ddp", replicas=2)
    with pytest.raises(ConfigError, match="clip_grad_norm"):
        cfg = tiny_config(Path("x"), mode="pipeline", replicas=2)
        dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, clip_grad_norm=1.0))
    ctx = Context(0, 3, 0, torch.device("cpu"), 5.0)
    with pytest.raises(DistributedError, match="multiple of engine.replicas"):
        mesh.make(ctx, 2)


def rank_states(run_dir: Path, world: int) -> list[dict]:
    return [checkpoint.load(run_dir / f"checkpoint.rank{r}.pt") for r in range(world)]


@pytest.mark.slow
def test_mesh_run_resumes_exactly_and_evaluates_as_one_process(tmp_path):
    """resnet20 + DGL+MAN++ through the CLI's run on 2 x 2 (batch norm: shard statistics, averaged
    over each stage's replicas): the replicas hold identical weights and buffers, an interrupted and
    resumed job ends bitwise where an uninterrupted one does, and the merged checkpoint evaluated by
    one process gives the metrics the mesh reported."""
    cfg = tiny_config(tmp_path / "full", mode="pipeline", replicas=2, pipeline_blocks=[2, 2])
    cfg.method.name = "dgl+manpp"
    cfg.method.options = {"momentum": {"momentum": 0.8}}
    launch(4, tmp_path, cfg)
    full = rank_states(tmp_path / "full" / "run", 4)
    summary = json.loads((tmp_path / "full" / "run" / "summary.json").read_text())
    assert summary["engine"] == {"mode": "pipeline", "world_size": 4, "replicas": 2}
    for p in range(2):
        a, b = full[2 * p]["model"], full[2 * p + 1]["model"]
        assert a.keys() == b.keys() and any("running_mean" in k for k in a)
        assert all(torch.equal(a[k], b[k]) for k in a)

    part = dataclasses.replace(cfg, out_dir=str(tmp_path / "part"))
    launch(4, tmp_path, part, stop_after=1)
    launch(4, tmp_path, resume=tmp_path / "part" / "run")
    for a, b in zip(full, rank_states(tmp_path / "part" / "run", 4)):
        assert a["epoch"] == b["epoch"] == 2
        assert a["model"].keys() == b["model"].keys()
        for key in a["model"]:
            assert torch.equal(a["model"][key], b["model"][key]), key

    one = evaluate_checkpoint(tmp_path / "full" / "run", device="cpu")
    reported = full[0]["history"][-1]
    assert one["top1"] == reported["test_top1"] and one["top5"] == reported["test_top5"]
    assert one["loss"] == pytest.approx(reported["test_loss"], rel=1e-6)
    for k in range(4):
        assert one[f"block{k}_top1"] == reported[f"test_block{k}_top1"], k


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill", "stop"])
def test_dead_or_hung_replica_ends_the_job_naming_it(tmp_path, how):
    """Rank 1 (stage 0, replica 1) is killed or stopped: its replica partner (rank 0, waiting in the
    gradient all-reduce) ends with an error naming rank 1, and every other rank ends too."""
    cfg = tiny_config(tmp_path / "m", mode="pipeline", replicas=2, pipeline_blocks=[2, 2], dist_timeout_s=4.0)
    cfg.optim.epochs = 500
    procs = start(4, tmp_path, cfg)
    try:
        deadline = time.monotonic() + 90
        while not (tmp_path / "m" / "run" / "checkpoint.rank1.pt").exists():
            assert time.monotonic() < deadline and procs[0].is_alive(), "the job did not start"
            time.sleep(0.05)
        if how == "kill":
            procs[1].kill()
        else:
            os.kill(procs[1].pid, signal.SIGSTOP)
        for p in (procs[0], procs[2], procs[3]):
            p.join(timeout=60)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    assert [procs[r].exitcode for r in (0, 2, 3)] == [3, 3, 3]
    # rank 0 waits for rank 1 in the all-reduce; the others may first lose a rank that already ended
    assert "rank 1" in (tmp_path / "error.rank0.txt").read_text()
