"""Watching a run (issue 20.8): progress lines off a terminal, TensorBoard event files, per-block
losses and the epoch's own lr in metrics.csv, ``train --print-config`` and ``train --help``."""

from __future__ import annotations

import csv
import logging
import re
import sys

import numpy as np
import pytest
import yaml

from locallearn.config import ConfigError, load_config
from locallearn.engine.optim import lr_at
from locallearn.run import Run
from locallearn.watch import Progress
from tests import helpers
from tests.helpers import run_cli

# 64 digits in batches of 16: 4 steps per epoch, two blocks
TINY = [*helpers.TINY_CLI, "data.batch_size=16", "method.name=dgl", "engine.threads=1"]


def tiny(tmp_path, *extra: str):
    return load_config(None, [*TINY, f"out_dir={tmp_path}", "name=r", *extra])


def test_progress_lines_off_a_terminal_name_epoch_step_block_losses_and_speed(tmp_path, caplog):
    cfg = tiny(tmp_path, "log.progress_every_s=0")  # a line at every step
    with caplog.at_level(logging.INFO, logger="locallearn.run"):
        Run(cfg).fit()  # pytest captures stderr: not a terminal
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch 1/1  step")]
    assert len(lines) == 4, lines
    pattern = r"epoch 1/1  step (\d)/4  lr [\d.e-]+  loss/block [\d.]+ [\d.]+  \d+ img/s"
    assert all(re.fullmatch(pattern, line) for line in lines), lines
    assert [re.match(pattern, line).group(1) for line in lines] == ["1", "2", "3", "4"]


def test_progress_lines_wait_for_their_interval_and_a_terminal_gets_a_bar(caplog):
    with caplog.at_level(logging.INFO, logger="locallearn.run"):
        with Progress(1, 1, 3, every_s=3600, terminal=False) as p:
            for _ in range(3):
                p.step([1.0, 2.0], 8, 0.1)
        assert p.bar is None and not caplog.records  # the interval never passed
        with Progress(1, 1, 3, every_s=0, terminal=True) as p:
            p.step([1.0, 2.0], 8, 0.1)
        assert p.bar is not None and not caplog.records  # a terminal has its bar, no log lines
        with Progress(1, 1, 3, every_s=0, terminal=False, quiet=True) as p:
            p.step([1.0, 2.0], 8, 0.1)
        assert p.bar is None and not caplog.records
        with Progress(1, 1, 3, every_s=0, terminal=False) as p:
            p.update(1)  # the pipeline: steps without losses
        assert caplog.records[-1].getMessage() == "epoch 1/1  step 1/3"


def test_metrics_csv_has_each_block_loss_and_the_lr_the_epoch_trained_at(tmp_path):
    # cosine over 2 epochs without warm-up: the lr after the last step is 0, the epoch trained above it
    cfg = tiny(tmp_path, "optim.epochs=2", "optim.warmup_epochs=0", "optim.lr=0.1")
    run = Run(cfg, quiet=True)
    run.fit()
    rows = list(csv.DictReader(open(run.run_dir / "metrics.csv")))
    steps = len(run.train_loader)
    for epoch, row in enumerate(rows):
        expected = np.mean([lr_at(s / steps, cfg.optim) for s in range(epoch * steps, (epoch + 1) * steps)])
        assert float(row["lr"]) == pytest.approx(expected, rel=1e-5)
        assert float(row["train_loss_block1"]) == pytest.approx(float(row["train_loss"]), rel=1e-5)
        mean = (float(row["train_loss_block0"]) + float(row["train_loss_block1"])) / 2
        assert float(row["train_local_loss_mean"]) == pytest.approx(mean, rel=1e-4)
    assert float(rows[-1]["lr"]) > 0.01  # not the end-of-run value 0


def test_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = Run(tiny(tmp_path, "log.tensorboard=true"), quiet=True)
    run.fit()
    events = EventAccumulator(str(run.run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss_block0", "train/loss_block1", "train/lr", "epoch/test_top1", "epoch/lr"} <= tags
    assert [e.step for e in events.Scalars("train/loss_block0")] == [1, 2, 3, 4]
    top1 = events.Scalars("epoch/test_top1")[0].value
    assert top1 == pytest.approx(run.history[0]["test_top1"], rel=1e-5)


def test_tensorboard_without_the_package_is_one_line_before_the_run_directory(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError
    with pytest.raises(ConfigError, match=r"^log.tensorboard=true needs the tensorboard package"):
        Run(tiny(tmp_path, "log.tensorboard=true"), quiet=True)
    assert not (tmp_path / "r").exists()


def test_print_config_prints_the_resolved_yaml_and_trains_nothing(tmp_path, capsys):
    code, out, _ = run_cli(
        ["train", "--print-config", *TINY, f"out_dir={tmp_path}", "model.num_blocks=3"], capsys
    )
    assert code == 0
    printed = yaml.safe_load(out)
    assert printed["model"]["num_blocks"] == 3 and printed["data"]["name"] == "digits"
    assert printed["log"] == {"progress_every_s": 30.0, "tensorboard": False, "block_metrics": True}
    assert load_config(None, [], base=printed) == load_config(
        None, [*TINY, f"out_dir={tmp_path}", "model.num_blocks=3"]
    )
    assert not any(tmp_path.iterdir())


def test_print_config_of_a_resume_shows_the_changed_key(tmp_path, capsys):
    Run(tiny(tmp_path), quiet=True).fit()
    code, out, _ = run_cli(
        ["train", "--resume", str(tmp_path / "r"), "--print-config", "optim.epochs=5"], capsys
    )
    assert code == 0 and yaml.safe_load(out)["optim"]["epochs"] == 5


def test_train_help_names_every_config_section(capsys):
    code, out, _ = run_cli(["train", "--help"], capsys)
    assert code == 0
    for section in ("model:", "method:", "task:", "data:", "optim:", "engine:", "log:"):
        assert re.search(rf"^  {section} ", out, re.M), section
    assert "num_blocks" in out and "progress_every_s" in out and "--print-config" in out
