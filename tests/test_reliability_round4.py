"""Issue 28's bad inputs: a factory that raises, files that are not checkpoints, a NaN in eval's JSON,
``-c DIR``, SIGTERM during training, and ``export`` to places it cannot write or of a run still training."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from locallearn.config import load_config
from locallearn.engine import checkpoint
from locallearn.run import Run
from tests import helpers

TINY = [*helpers.TINY_CLI, "method.name=dgl", "engine.measure_memory=false"]
ROOT = Path(__file__).resolve().parent.parent


def run_cli(args, capsys):
    return helpers.run_cli(args, capsys, lines=True)


one_error_line = helpers.one_error_line


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    Run(load_config(None, [*TINY, f"out_dir={out}", "name=r"]), quiet=True).fit()
    return out / "r"


def test_a_factory_that_raises_is_one_line_naming_it(tmp_path, capsys, monkeypatch):
    (tmp_path / "my_nets.py").write_text(
        "def make(num_classes):\n    raise RuntimeError('no weights here')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    code, _, err = run_cli(
        ["train", *TINY, "model.backbone=my_nets:make", f"out_dir={tmp_path}/runs"], capsys
    )
    line = one_error_line(err, code)
    assert "model.backbone=my_nets:make" in line and "RuntimeError: no weights here" in line
    assert not (tmp_path / "runs").exists()


def test_files_that_are_not_checkpoints_are_called_so(tmp_path, capsys):
    np.save(tmp_path / "w.npy", np.zeros(3))
    (tmp_path / "notes.txt").write_text("hello\n")
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    for name in ("w.npy", "notes.txt", "random.pt"):
        code, _, err = run_cli(["eval", str(tmp_path / name)], capsys)
        line = one_error_line(err, code)
        assert "is not a checkpoint" in line and "Python objects" not in line, line


def test_eval_of_nan_weights_prints_valid_json(finished_run, tmp_path, capsys):
    state = checkpoint.load(finished_run / "checkpoint.pt")
    state["model"] = {
        k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state["model"].items()
    }
    checkpoint.save(tmp_path / "nan.pt", state)
    code, out, err = run_cli(["eval", str(tmp_path / "nan.pt")], capsys)
    assert code == 0, err
    result = json.loads(out, parse_constant=lambda c: pytest.fail(f"bare {c} in eval's JSON"))
    assert result["loss"] is None


def test_a_config_path_that_is_a_directory_says_so(tmp_path, capsys):
    code, _, err = run_cli(["train", "-c", str(tmp_path), f"out_dir={tmp_path}/runs"], capsys)
    assert "is a directory" in one_error_line(err, code)


def test_sigterm_during_an_epoch_is_handled_as_ctrl_c(tmp_path, capsys, monkeypatch):
    def terminate(self):
        if self.epoch == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self)

    real = Run.train_one_epoch
    monkeypatch.setattr(Run, "train_one_epoch", terminate)
    code, _, err = run_cli(["train", *TINY, "optim.epochs=3", f"out_dir={tmp_path}", "name=a"], capsys)
    line = one_error_line(err, code, 143)
    assert "terminated (SIGTERM); epoch 1 is saved" in line and "--resume" in line
    assert checkpoint.load(tmp_path / "a" / "checkpoint.pt")["epoch"] == 1
    assert not (tmp_path / "a" / ".lock").exists()  # the next process may resume it
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler lives only while training


@pytest.mark.slow  # three interpreters, ~30 s on a shared 2-core CPU
def test_sigterm_to_a_real_process_then_resume_equals_an_uninterrupted_run(tmp_path):
    """``kill PID`` in the middle of a run: the checkpoint on disk is whole and resuming continues exactly
    (a constant learning rate, so the resumed run's shorter ``optim.epochs`` changes no step)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = [*TINY, "optim.schedule=constant", "optim.warmup_epochs=0", "engine.threads=1"]
    cli = [sys.executable, "-m", "locallearn", "train"]
    proc = subprocess.Popen([*cli, *args, "optim.epochs=500", f"out_dir={tmp_path}", "name=a"], env=env,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    ckpt = tmp_path / "a" / "checkpoint.pt"
    while not ckpt.exists() and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)  # somewhere in a later epoch (or a save)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in err, err
    assert "terminated (SIGTERM); epoch" in err.strip().splitlines()[-1]
    epochs = checkpoint.load(ckpt)["epoch"] + 1
    resumed = subprocess.run([*cli, "--resume", str(tmp_path / "a"), f"optim.epochs={epochs}"], env=env)
    fresh = subprocess.run([*cli, *args, f"optim.epochs={epochs}", f"out_dir={tmp_path}", "name=b"], env=env)
    assert resumed.returncode == fresh.returncode == 0
    a, b = (checkpoint.load(tmp_path / n / "checkpoint.pt")["model"] for n in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory):
    """A finished run of a torchvision model (export needs a source model)."""
    sys.path.insert(0, str(ROOT / "examples"))
    from digits_folder import write_digits_folder

    out = tmp_path_factory.mktemp("exportable")
    root = write_digits_folder(out / "photos", train=3, val=1, size=16)
    model = [
        "model.backbone=torchvision:resnet18",
        "model.num_blocks=2",
        "data.name=folder",
        f"data.root={root}",
    ]
    model += ["data.image_size=32", "data.batch_size=6"]
    Run(load_config(None, [*TINY, *model, f"out_dir={out}", "name=r"]), quiet=True).fit()
    return out / "r"


def test_export_refuses_destinations_it_cannot_write_in_one_line(exported_run, tmp_path, capsys):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    try:
        cases = {
            str(tmp_path / "missing" / "m.pt"): "does not exist",
            str(tmp_path): "is a directory",
            str(tmp_path / "ro" / "m.pt"): "not writable" if os.geteuid() != 0 else None,
        }
        for out, words in cases.items():
            if words is None:
                continue  # root writes anywhere
            code, _, err = run_cli(["export", str(exported_run), out], capsys)
            assert words in one_error_line(err, code), out
        assert not (tmp_path / "missing").exists() and not list((tmp_path / "ro").iterdir())
    finally:
        (tmp_path / "ro").chmod(0o700)


def test_export_onto_a_full_disk_leaves_nothing_half_written(exported_run, tmp_path, capsys, monkeypatch):
    import errno

    def full(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    (tmp_path / "m.pt").write_bytes(b"an older export")
    monkeypatch.setattr(torch, "save", full)
    code, _, err = run_cli(["export", str(exported_run), str(tmp_path / "m.pt")], capsys)
    assert "No space left" in one_error_line(err, code, 1)
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"] and (
        tmp_path / "m.pt"
    ).read_bytes() == b"an older export"


def test_export_of_a_run_still_training_says_which_epoch_it_wrote(exported_run, tmp_path, capsys):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    lock = exported_run / ".lock"
    try:
        import socket

        lock.write_text(f"{other.pid} {socket.gethostname()}\n")
        code, out, err = run_cli(["export", str(exported_run), str(tmp_path / "m.pt")], capsys)
        assert code == 0 and (tmp_path / "m.pt").is_file()
        (line,) = [x for x in err if "still training" in x]
        assert f"process {other.pid}" in line and "epoch 1 of 1" in line
    finally:
        lock.unlink(missing_ok=True)
        other.kill()
        other.wait()


# -- small things a user hit
def test_help_opens_with_what_the_tool_does_and_resume_names_every_key_it_accepts(capsys):
    from locallearn.cli import build_parser
    from locallearn.resume import SAFE_ON_RESUME

    text = build_parser().format_help()
    assert "Supervised local learning" in text and "The only module that prints" not in text
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    train_help = " ".join(capsys.readouterr().out.split())
    assert all(key in train_help for key in SAFE_ON_RESUME), [
        k for k in SAFE_ON_RESUME if k not in train_help
    ]
    usage = (ROOT / "docs" / "usage.md").read_text()
    missing = [k for k in SAFE_ON_RESUME if f"`{k}`" not in usage]
    assert not missing, missing


def test_small_images_default_to_one_thread_and_the_log_says_so(tmp_path, capsys, monkeypatch):
    import locallearn.engine.threads as run_module

    monkeypatch.setattr(run_module, "_TORCH_THREADS", 2)
    before = torch.get_num_threads()
    try:
        code, _, err = run_cli(["train", *TINY, f"out_dir={tmp_path}", "name=a"], capsys)
        assert code == 0 and torch.get_num_threads() == 1
        (line,) = [x for x in err if x.startswith("CPU threads:")]
        assert (
            "CPU threads: 1 (8x8 images" in line
            and "CPU threads: 1" in (tmp_path / "a" / "train.log").read_text()
        )
        assert run_module.set_threads(None, 32, torch.device("cpu")).startswith(
            "CPU threads: 2 (torch's default"
        )
        assert run_module.set_threads(3, 8, torch.device("cpu")) == "CPU threads: 3 (engine.threads)"
    finally:
        torch.set_num_threads(before)


def test_the_docs_link_only_to_files_in_the_repository():
    import re

    for doc in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        text = doc.read_text()
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            assert (doc.parent / target).exists(), f"{doc.name} links {target}"
        for name in re.findall(
            r"\b[A-Z_]{4,}\.md\b", text
        ):  # DESIGN.md lives beside the repository, not in it
            assert (ROOT / name).exists() or (ROOT / "docs" / name).exists(), f"{doc.name} names {name}"
