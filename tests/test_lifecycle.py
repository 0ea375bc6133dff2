"""Issue 15 (and issue 11's CLI items): what `--resume` does with overrides and finished runs, one
process per run directory, leftover temp files, Ctrl-C, refused jobs leave nothing, rank-count errors."""

import json
import os
import socket
import subprocess
import sys

import pytest

from locallearn.cli import quickstart_base
from locallearn.config import load_config
from locallearn.engine import checkpoint, distributed
from locallearn.run import Run
from locallearn.run.launch import resume_run
from locallearn.rundir import RunLock
from tests import helpers

TINY = [*helpers.TINY_CLI, "method.name=dgl", "engine.measure_memory=false"]


def run_cli(args, capsys):
    return helpers.run_cli(args, capsys, lines=True)


def error_line(err):
    (line,) = [line for line in err if line.startswith("locallearn: error:")]
    return line


@pytest.fixture
def finished(tmp_path, capsys):
    code, _, err = run_cli(["train", *TINY, f"out_dir={tmp_path}", "name=r"], capsys)
    assert code == 0, err
    return tmp_path / "r"


def test_resume_with_more_epochs_trains_on_and_says_so(finished, capsys):
    code, _, err = run_cli(
        ["train", "--resume", str(finished), "optim.epochs=2", "checkpoint_every=2"], capsys
    )
    assert code == 0, err
    assert any("resumed" in line and "at epoch 1 of 2" in line for line in err)
    assert "at epoch 1 of 2" in (finished / "train.log").read_text()
    assert len((finished / "metrics.csv").read_text().splitlines()) == 3
    assert checkpoint.load(finished / "checkpoint.pt")["epoch"] == 2
    assert "epochs: 2" in (finished / "config.yaml").read_text()


def test_resume_of_a_finished_run_says_so(finished, capsys):
    code, _, err = run_cli(["train", "--resume", str(finished)], capsys)
    assert code == 0 and any("already finished its 1 epochs" in line for line in err)


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.num_blocks=3", "--resume cannot change model.num_blocks (2 -> 3)"),
        ("method.name=infopro", "--resume cannot change method.name"),
        ("optim.lr=0.1", "--resume cannot change optim.lr"),
        ("optim.epochs=0", "optim.epochs must be >= 1"),
    ],
)
def test_resume_refuses_unsafe_overrides_naming_the_key(finished, capsys, override, message):
    code, _, err = run_cli(["train", "--resume", str(finished), override], capsys)
    assert code == 2 and message in error_line(err)


def test_resume_with_a_config_file(finished, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("data: {name: digits, batch_size: 16}\n")
    code, _, err = run_cli(["train", "--resume", str(finished), "-c", str(path)], capsys)
    assert code == 2 and "data.batch_size (32 -> 16)" in error_line(err)


def test_a_live_lock_refuses_a_second_process_and_a_stale_one_is_taken(finished, capsys):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    lock = finished / ".lock"
    try:
        lock.write_text(f"{other.pid} {socket.gethostname()}\n")
        code, _, err = run_cli(["train", "--resume", str(finished)], capsys)
        assert code == 2 and f"in use by process {other.pid}" in error_line(err)
    finally:
        other.kill()
        other.wait()
    code, _, err = run_cli(["train", "--resume", str(finished)], capsys)  # its process is gone: stale
    assert code == 0, err
    assert not lock.exists()  # released at the end


def test_stale_temp_files_are_removed_and_permissions_match(finished, capsys):
    leftover = finished / ".checkpoint.pt.k1ll3d.tmp"
    leftover.write_bytes(b"partial")
    (finished / "metrics.csv.tmp").write_text("partial")
    code, _, _ = run_cli(["train", "--resume", str(finished)], capsys)
    assert code == 0
    assert not leftover.exists() and not (finished / "metrics.csv.tmp").exists()
    modes = {name: (finished / name).stat().st_mode & 0o777 for name in ("checkpoint.pt", "metrics.csv")}
    assert modes["checkpoint.pt"] == modes["metrics.csv"], modes


def test_ctrl_c_says_truthfully_whether_a_checkpoint_exists(tmp_path, capsys, monkeypatch):
    def interrupt(self):
        if self.epoch == 1:
            raise KeyboardInterrupt
        return real(self)

    real = Run.train_one_epoch
    monkeypatch.setattr(Run, "train_one_epoch", interrupt)
    code, _, err = run_cli(["train", *TINY, "optim.epochs=2", f"out_dir={tmp_path}", "name=a"], capsys)
    assert code == 130 and "epoch 1 is saved" in error_line(err)
    monkeypatch.setattr(Run, "train_one_epoch", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    code, _, err = run_cli(["train", *TINY, f"out_dir={tmp_path}", "name=b"], capsys)
    line = error_line(err)
    assert code == 130 and "before the first checkpoint" in line and "checkpoint.pt" not in line
    assert not (tmp_path / "b").exists() and "removed" in line  # nothing to resume: no directory (issue 22)


@pytest.fixture
def one_rank(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(
        RANK=0, WORLD_SIZE=1, LOCAL_RANK=0, MASTER_ADDR="127.0.0.1", MASTER_PORT=port
    ).items():
        monkeypatch.setenv(key, str(value))
    yield
    distributed.shutdown()


def test_a_refused_pipeline_job_leaves_no_run_directory(tmp_path, capsys, one_rank):
    # no -c and no data.name: the offline digits data (issue 11), so the pipeline check is what fails
    args = ["train", "model.backbone=resnet20", "model.num_blocks=2", "engine.mode=pipeline"]
    code, _, err = run_cli(
        [*args, "engine.pipeline_blocks=[1,1]", "engine.device=cpu", f"out_dir={tmp_path}"], capsys
    )
    assert code == 2 and "engine.pipeline_blocks=[1, 1]" in error_line(err)
    assert list(tmp_path.iterdir()) == []


def test_resuming_with_another_number_of_ranks_names_the_run_s(tmp_path, monkeypatch):
    for r in range(2):
        (tmp_path / f"checkpoint.rank{r}.pt").write_bytes(b"x")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(checkpoint.CheckpointError, match="this run has 2 ranks .* --nproc-per-node 2"):
        resume_run(tmp_path)


def test_offline_default_holds_for_any_overrides_without_data_name():
    base = quickstart_base(["engine.mode=pipeline"])
    cfg = load_config(None, ["engine.mode=pipeline"], base=base)
    assert cfg.data.name == "digits" and cfg.compare == []  # one job per method under torchrun
    cfg = load_config(None, ["method.name=dgl"], base=quickstart_base(["method.name=dgl"]))
    assert cfg.data.name == "digits" and cfg.method.options == {} and cfg.compare == ["bp"]
    assert quickstart_base(["data.name=cifar10"]) is None


def test_pid_check_of_the_lock_is_per_host(tmp_path):
    lock = RunLock(tmp_path)
    assert lock._holder_alive(f"{os.getppid()} {socket.gethostname()}")
    assert lock._holder_alive("1 some-other-host")  # cannot tell: assume alive
    assert not lock._holder_alive("garbage")


@pytest.mark.slow  # three ranks, ~20 s on a shared 2-core CPU
def test_ddp_survivors_name_the_dead_rank(tmp_path):
    import time

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "engine"))
    from dist_helpers import start, tiny_config

    cfg = tiny_config(tmp_path / "ddp", mode="ddp", dist_timeout_s=4.0)
    cfg.optim.epochs = 500
    procs = start(3, tmp_path, cfg)
    try:
        deadline = time.monotonic() + 90
        while not (tmp_path / "ddp" / "run" / "checkpoint.pt").exists():
            assert time.monotonic() < deadline and procs[0].is_alive(), "the job did not start"
            time.sleep(0.05)
        procs[2].kill()
        procs[0].join(timeout=30)
        procs[1].join(timeout=30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    for r in (0, 1):
        message = (tmp_path / f"error.rank{r}.txt").read_text()
        assert "lost rank 2 " in message, message


# -- issue 22: no directory for a run that never trained an epoch; what a kill leaves; absurd losses ---
def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_directory(tmp_path, capsys, monkeypatch):
    from locallearn.data import DataError

    def bad_image(self):
        raise DataError(f"cannot read image {str(tmp_path / 'x.jpg')!r}")

    monkeypatch.setattr(Run, "train_one_epoch", bad_image)
    code, _, err = run_cli(["train", *TINY, f"out_dir={tmp_path / 'out'}", "name=r"], capsys)
    assert code == 2 and "x.jpg" in error_line(err)
    assert list((tmp_path / "out").iterdir()) == []  # not even config.yaml and train.log
    assert any("removed the run directory" in line for line in err)
    # an epoch saved, then a failure: the run is resumable, its directory stays
    monkeypatch.undo()
    calls = []
    original = Run.train_one_epoch

    def fail_second(self):
        calls.append(1)
        if len(calls) == 2:
            raise DataError("image 2 cannot be read")
        return original(self)

    monkeypatch.setattr(Run, "train_one_epoch", fail_second)
    args = ["train", *TINY, "optim.epochs=2", f"out_dir={tmp_path / 'out'}", "name=s"]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and checkpoint.load(tmp_path / "out" / "s" / "checkpoint.pt")["epoch"] == 1


def killed_in_first_save(run_dir, lock_pid=999_999_999):
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("seed: 0\n")
    (run_dir / "train.log").write_text("")
    (run_dir / ".checkpoint.pt.k1ll3d.tmp").write_bytes(b"")
    (run_dir / ".lock").write_text(f"{lock_pid} {socket.gethostname()}\n")


def test_resume_of_a_run_killed_in_its_first_save_says_so_and_cleans_up(tmp_path, capsys):
    run_dir = tmp_path / "r"
    killed_in_first_save(run_dir)
    code, _, err = run_cli(["train", "--resume", str(run_dir)], capsys)
    line = error_line(err)
    assert code == 2 and "nothing to resume" in line and "never finished an epoch" in line
    assert not run_dir.exists()
    # a file the run did not write stays, and so does the directory; the leftovers go
    killed_in_first_save(run_dir)
    (run_dir / "notes.txt").write_text("mine")
    code, _, err = run_cli(["train", "--resume", str(run_dir / "checkpoint.pt")], capsys)
    assert code == 2 and "never finished an epoch" in error_line(err)
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"]
    # a live process in its first epoch holds the lock: refused as in use, nothing touched
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / "live"
        killed_in_first_save(live, other.pid)
        code, _, err = run_cli(["train", "--resume", str(live)], capsys)
        assert code == 2 and f"in use by process {other.pid}" in error_line(err)
        assert len(list(live.iterdir())) == 4
    finally:
        other.kill()
        other.wait()


def test_eval_of_an_unfinished_pipeline_run_says_what_its_files_are(tmp_path, capsys):
    for r in range(2):
        (tmp_path / f"checkpoint.rank{r}.pt").write_bytes(b"x")
    code, _, err = run_cli(["eval", str(tmp_path)], capsys)
    line = error_line(err)
    assert code == 2 and "merged checkpoint.pt" in line and "written when the run ends" in line
    assert f"torchrun --nproc-per-node 2 -m locallearn train --resume {tmp_path}" in line
    code, _, err = run_cli(["eval", str(tmp_path / "checkpoint.rank1.pt")], capsys)
    assert code == 2 and "rank 1's resume point of a pipeline run" in error_line(err)
    killed_in_first_save(tmp_path / "k")
    code, _, err = run_cli(["eval", str(tmp_path / "k")], capsys)
    assert code == 2 and "the run never finished an epoch" in error_line(err)


def test_ctrl_c_under_torchrun_gives_the_torchrun_command():
    from pathlib import Path
    from types import SimpleNamespace

    from locallearn.run.distributed import DistributedRun

    run = SimpleNamespace(
        ctx=SimpleNamespace(world=3), run_dir=Path("runs/r"), saved_epoch=2, removed_dir=False
    )
    run.resume_command = lambda: DistributedRun.resume_command(run)
    message = Run.interrupted_message(run)
    assert "epoch 2 is saved" in message
    assert "(continue with: torchrun --nproc-per-node 3 -m locallearn train --resume runs/r)" in message


def test_a_finite_but_absurd_loss_is_warned_once_and_marked(tmp_path, capsys):
    from locallearn.lifecycle import looks_diverged

    rows = [
        {"epoch": 1, "train_loss": 2.3, "test_loss": 2.2},
        {"epoch": 2, "train_loss": 2.0, "test_loss": 1e26},
    ]
    assert "test loss 1e+26 at epoch 2 is more than 1000x" in looks_diverged(rows)
    assert looks_diverged(rows[:1]) is None and looks_diverged([]) is None
    args = [
        "train",
        *TINY,
        "optim.lr=10",
        "optim.warmup_epochs=0",  # one epoch: finite (1e29 test loss); a second would reach inf
        f"out_dir={tmp_path}",
        "name=r",
    ]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    warned = [line for line in err if "looks diverged" in line]
    assert len(warned) == 1 and "1000x the first epoch's training loss" in warned[0], err
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["looks_diverged"] is True and "1000x" in summary["looks_diverged_why"]
    assert "looks diverged" in (tmp_path / "r" / "train.log").read_text()


def test_values_that_change_the_run_are_warned_on_screen_and_in_the_log(finished, capsys):
    # TINY trains 1 epoch with the default 10 warm-up epochs
    assert "optim.warmup_epochs=10 is more than optim.epochs=1" in (finished / "train.log").read_text()
    summary = json.loads((finished / "summary.json").read_text())
    assert summary["looks_diverged"] is False and summary["looks_diverged_why"] is None
    code, _, err = run_cli(
        ["train", *TINY, "data.train_subset=5", f"out_dir={finished.parent}", "name=w"], capsys
    )
    assert code == 0, err
    assert any("data.train_subset=5 is fewer than the 10 classes" in line for line in err)
    assert any("data.batch_size=32 is more than the 5 training images" in line for line in err)
