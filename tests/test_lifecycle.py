"""Issue 15 (and issue 11's CLI items): what `--resume` does with overrides and finished runs, one
process per run directory, leftover temp files, Ctrl-C, refused jobs leave nothing, rank-count errors."""

import os
import socket
import subprocess
import sys

import pytest

from locallearn import runner
from locallearn.cli import quickstart_base
from locallearn.config import load_config
from locallearn.engine import checkpoint, distributed
from locallearn.parallel import resume_parallel
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

    real = runner.Run.train_one_epoch
    monkeypatch.setattr(runner.Run, "train_one_epoch", interrupt)
    code, _, err = run_cli(["train", *TINY, "optim.epochs=2", f"out_dir={tmp_path}", "name=a"], capsys)
    assert code == 130 and "epoch 1 is saved" in error_line(err)
    monkeypatch.setattr(runner.Run, "train_one_epoch", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    code, _, err = run_cli(["train", *TINY, f"out_dir={tmp_path}", "name=b"], capsys)
    line = error_line(err)
    assert code == 130 and "before the first checkpoint" in line and "checkpoint.pt" not in line


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
        resume_parallel(tmp_path)


def test_offline_default_holds_for_any_overrides_without_data_name():
    base = quickstart_base(["engine.mode=pipeline"])
    cfg = load_config(None, ["engine.mode=pipeline"], base=base)
    assert cfg.data.name == "digits" and cfg.compare == []  # one job per method under torchrun
    cfg = load_config(None, ["method.name=dgl"], base=quickstart_base(["method.name=dgl"]))
    assert cfg.data.name == "digits" and cfg.method.options == {} and cfg.compare == ["bp"]
    assert quickstart_base(["data.name=cifar10"]) is None


def test_pid_check_of_the_lock_is_per_host(tmp_path):
    lock = runner.RunLock(tmp_path)
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
