"""Checkpoints: resume continues exactly; unreadable files give a clear error; writes are atomic."""

import json

import pytest
import torch

from locallearn.config import load_config
from locallearn.engine import checkpoint
from locallearn.run import Run
from locallearn.run.launch import resume_run

OVERRIDES = [
    "data.name=digits",
    "data.train_subset=96",
    "data.test_subset=64",
    "data.batch_size=32",
    "model.backbone=resnet20",
    "model.num_blocks=3",
    "method.name=dgl+manpp",
    "optim.lr=0.05",
    "optim.epochs=2",
    "optim.warmup_epochs=0.5",
    "engine.device=cpu",
    "model.droprate=0.1",
]


def make_run(tmp_path, name):
    cfg = load_config(None, [*OVERRIDES, f"out_dir={tmp_path}", f"name={name}"])
    return Run(cfg, quiet=True)


def test_resume_equals_uninterrupted(tmp_path):
    straight = make_run(tmp_path, "straight")
    straight.fit()
    interrupted = make_run(tmp_path, "interrupted")
    interrupted.fit(stop_after=1)
    del interrupted
    resumed = resume_run(tmp_path / "interrupted", quiet=True)
    assert resumed.epoch == 1
    summary = resumed.fit()
    assert summary["epochs"] == 2
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for opt_a, opt_b in zip(straight.optimizers, resumed.optimizers):
        for sa, sb in zip(opt_a.state.values(), opt_b.state.values()):
            assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    rows = (tmp_path / "interrupted" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("epoch,lr,train_loss")
    summary = json.loads((tmp_path / "interrupted" / "summary.json").read_text())
    assert summary["final"] == straight.history[-1]["test_top1"]


def test_truncated_checkpoint_gives_a_clear_error(tmp_path):
    run = make_run(tmp_path, "r")
    run.fit(stop_after=1)
    path = tmp_path / "r" / "checkpoint.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="truncated or corrupt"):
        checkpoint.load(path)
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "nope.pt")
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(checkpoint.CheckpointError, match="not a locallearn checkpoint"):
        checkpoint.load(tmp_path / "foreign.pt")


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    checkpoint.save(path, {"x": 1})

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        checkpoint.save(path, {"x": 2})
    monkeypatch.undo()
    assert checkpoint.load(path, require=())["x"] == 1  # the old checkpoint survives a failed write
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left behind
