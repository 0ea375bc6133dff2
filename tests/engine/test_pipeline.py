"""engine.mode=pipeline: equals the sequential engine bitwise, momentum shipping, resume, dead ranks."""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import pytest
import torch
from dist_helpers import launch, start, tiny_config

from locallearn.build import build_model
from locallearn.data import load_datasets
from locallearn.engine import checkpoint
from locallearn.engine.distributed import DistributedError
from locallearn.engine.pipeline import check_method, partition
from locallearn.run import Run


def sequential_state(cfg) -> dict[str, torch.Tensor]:
    threads = torch.get_num_threads()
    try:
        run = Run(
            dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, mode="sequential")), quiet=True
        )
        run.fit()
    finally:
        torch.set_num_threads(threads)
    return run.model.state_dict()


def rank_states(run_dir, world):
    return [checkpoint.load(run_dir / f"checkpoint.rank{r}.pt") for r in range(world)]


def test_partition_balances_contiguous_groups():
    assert partition([1, 1, 1, 1], 2) == [2, 2]
    assert partition([4, 1, 1, 1, 1], 2) == [1, 4]
    assert partition([1, 2, 3, 4, 5], 3) == [3, 1, 1]
    assert sum(partition([3.0] * 16, 5)) == 16


def test_window_above_one_and_too_many_ranks_are_refused():
    with pytest.raises(DistributedError, match="window > 1"):
        check_method(2, 4, 2)
    with pytest.raises(DistributedError, match="P <= K"):
        check_method(1, 2, 3)


def test_pipeline_equals_sequential_bitwise(tmp_path):
    """InfoPro (window 1, no momentum; the input image travels with the activation), K=4 over 3 ranks,
    in-flight depth 1: every parameter and BN statistic equals the sequential engine's."""
    # measuring memory (the sequential reference measures backward's workspace too) changes no weight
    cfg = tiny_config(
        tmp_path / "pipe", mode="pipeline", pipeline_depth=1, pipeline_blocks=[2, 1, 1], measure_memory=True
    )
    launch(3, tmp_path, cfg)
    reference = sequential_state(dataclasses.replace(cfg, out_dir=str(tmp_path / "seq")))
    states = rank_states(tmp_path / "pipe" / "run", 3)
    covered = set()
    for state in states:
        for key, value in state["model"].items():
            assert torch.equal(value, reference[key]), key
            covered.add(key)
    assert covered == set(reference)  # every parameter and buffer lives on some rank
    assert any("running_mean" in k for k in covered)
    untimed = [
        [{k: v for k, v in row.items() if "time" not in k and "per_s" not in k} for row in s["history"]]
        for s in states
    ]
    assert untimed[0] == untimed[2]  # the metrics are broadcast: every rank has the same history
    # whole-step memory per rank, from its own blocks; the step's peak is the largest rank's
    memory = states[0]["memory"]
    assert memory["memory_mode"] == "pipeline" and len(memory["rank_peak_total_bytes"]) == 3
    assert memory["peak_total_bytes"] == max(memory["rank_peak_total_bytes"])


def test_manpp_tracks_next_layer_and_resumes_identically(tmp_path):
    """MAN++ on the rank boundary: the EMA copy on rank 0 follows rank 1's live first layer (shipped
    backward every step, one step stale); an interrupted and resumed job ends bitwise where an
    uninterrupted one does (queued weight versions included)."""
    cfg = tiny_config(tmp_path / "full", mode="pipeline", pipeline_depth=2, pipeline_blocks=[2, 2])
    cfg.method.name = "dgl+manpp"
    cfg.method.options = {"momentum": {"momentum": 0.8}}
    cfg.data.train_subset, cfg.data.batch_size = 256, 16  # 16 steps per epoch, 32 in all
    launch(2, tmp_path, cfg)
    full = rank_states(tmp_path / "full" / "run", 2)

    train, _ = load_datasets("digits")
    n = build_model(cfg, train.info, train.num_classes)[0].cuts[1]  # first layer of block 2, on rank 1
    live = {
        k: v for k, v in full[1]["model"].items() if k.startswith(f"backbone.layers.{n}.") and "conv" in k
    }
    ema = {k: v for k, v in full[0]["model"].items() if k.startswith("auxes.1.ema.") and "conv" in k}
    assert live and len(live) == len(ema)
    for (_, w), (_, e) in zip(sorted(live.items()), sorted(ema.items())):
        rel = ((w - e).norm() / w.norm()).item()
        # fresh init starts at ~1.4; 0.8^32 of it plus the drift of the last ~5 steps remains
        assert rel < 0.15, rel

    part = dataclasses.replace(cfg, out_dir=str(tmp_path / "part"))
    launch(2, tmp_path, part, stop_after=1)
    launch(2, tmp_path, resume=tmp_path / "part" / "run")
    resumed = rank_states(tmp_path / "part" / "run", 2)
    for a, b in zip(full, resumed):
        assert a["model"].keys() == b["model"].keys()
        for key in a["model"]:
            assert torch.equal(a["model"][key], b["model"][key]), key
        assert a["epoch"] == b["epoch"] == 2


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_dead_or_hung_rank_ends_the_job_naming_it(tmp_path, how):
    """Rank 1 is killed (connections close) or stopped (silent): rank 0 exits non-zero within the
    timeout with an error naming rank 1."""
    cfg = tiny_config(tmp_path / "pipe", mode="pipeline", pipeline_blocks=[2, 2], dist_timeout_s=4.0)
    cfg.optim.epochs = 500
    procs = start(2, tmp_path, cfg)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "pipe" / "run" / "checkpoint.rank1.pt").exists():
            assert time.monotonic() < deadline and procs[0].is_alive(), "the job did not start"
            time.sleep(0.05)
        t0 = time.monotonic()
        if how == "kill":
            procs[1].kill()
        else:
            os.kill(procs[1].pid, signal.SIGSTOP)
        procs[0].join(timeout=30)
        elapsed = time.monotonic() - t0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    assert procs[0].exitcode == 3
    assert elapsed < cfg.engine.dist_timeout_s + 5
    assert "rank 1" in (tmp_path / "error.rank0.txt").read_text()


def test_pipeline_scores_every_block_as_the_sequential_engine(tmp_path):
    """Each rank scores its own blocks' aux nets; every rank's history holds all of them, equal to the
    sequential run's (the pipeline equals it bitwise). DGL's aux nets all predict."""
    cfg = tiny_config(tmp_path / "pipe", mode="pipeline", pipeline_blocks=[2, 2])
    cfg = dataclasses.replace(
        cfg,
        method=dataclasses.replace(cfg.method, name="dgl"),
        optim=dataclasses.replace(cfg.optim, epochs=1),
    )
    launch(2, tmp_path, cfg)
    seq_cfg = dataclasses.replace(
        cfg, out_dir=str(tmp_path / "seq"), engine=dataclasses.replace(cfg.engine, mode="sequential")
    )
    threads = torch.get_num_threads()
    try:
        seq = Run(seq_cfg, quiet=True)
        seq.fit()
    finally:
        torch.set_num_threads(threads)
    keys = [f"test_block{k}_top1" for k in range(4)]
    want = [seq.history[-1][k] for k in keys]
    assert all(v is not None for v in want)
    for state in rank_states(tmp_path / "pipe" / "run", 2):
        assert [state["history"][-1][k] for k in keys] == want
