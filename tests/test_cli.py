"""The command line: a tiny end-to-end train, eval and list; every bad input is one line and exit != 0."""

import json
import subprocess
import sys

import pytest

from tests import helpers
from tests.helpers import run_cli

TINY = helpers.TINY_CLI


def test_train_runs_end_to_end_and_compares_with_bp(tmp_path, capsys):
    code, out, _ = run_cli(
        ["train", *TINY, "method.name=dgl+manpp", "compare=[bp]", f"out_dir={tmp_path}"], capsys
    )
    assert code == 0
    assert "dgl+manpp" in out and "bp" in out and "peak act. mem" in out and "peak train mem" in out
    run_dir = tmp_path / "digits-resnet20-K2-dgl+manpp"
    for name in ("metrics.csv", "summary.json", "config.yaml", "checkpoint.pt", "train.log"):
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    # the comparison run is named after what it trained
    bp = json.loads((tmp_path / "digits-resnet20-K1-bp" / "summary.json").read_text())
    assert summary["num_blocks"] == 2 and bp["num_blocks"] == 1
    # the printed memory ratio is the whole step's (weights, gradients, optimizer state, activations)
    memory = summary["memory"]
    ratio = memory["peak_total_bytes"] / bp["memory"]["peak_total_bytes"]
    assert f"{ratio:.2f}x" in out
    for key in ("parameter_bytes", "gradient_bytes", "optimizer_state_bytes", "bank_bytes"):
        assert memory[key] >= 0, key
    assert memory["peak_total_bytes"] > memory["parameter_bytes"] + memory["optimizer_state_bytes"]
    assert memory["optimizer_state_bytes"] > 0 and memory["workspace_measured"]
    assert summary["params"]["aux"] > 0 and summary["median_step_time_s"] > 0
    config = (run_dir / "config.yaml").read_text()
    assert "momentum: 0.995" in config and "feature_dim" in config  # resolved method defaults

    code, out, _ = run_cli(["eval", str(run_dir)], capsys)
    assert code == 0 and json.loads(out)["top1"] == pytest.approx(summary["final"])


def test_resume_from_cli(tmp_path, capsys):
    code, _, _ = run_cli(["train", *TINY, "method.name=dgl", f"out_dir={tmp_path}", "name=r"], capsys)
    assert code == 0
    code, out, _ = run_cli(["train", "--resume", str(tmp_path / "r")], capsys)
    assert code == 0 and "dgl" in out  # already finished: resumes, trains nothing more, reports


def test_yaml_config_and_override_precedence(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "method:\n  name: infopro\n  infopro: {loss: cross_entropy, ixx_1: 2}\noptim: {epochs: 3}\n"
    )
    code, out, _ = run_cli(
        ["train", "-c", str(cfg), *TINY, "method.infopro.ixy_1=0.7", f"out_dir={tmp_path}"], capsys
    )
    assert code == 0
    written = (tmp_path / "digits-resnet20-K2-infopro" / "config.yaml").read_text()
    assert "ixx_1: 2.0" in written and "ixy_1: 0.7" in written and "epochs: 1" in written


def test_list(capsys):
    code, out, _ = run_cli(["list"], capsys)
    assert code == 0
    for word in ("resnet110", "infopro+manpp", "digits", "infopro_balanced", "55 layers"):
        assert word in out


def test_list_builds_no_weights(capsys, monkeypatch):
    """`list` counts layers on the meta device: no backbone's weights are allocated or initialised (it took
    ~60 s when it built all 27 backbones for real)."""
    import torch

    real = torch.nn.init.kaiming_normal_
    calls = []
    monkeypatch.setattr(
        torch.nn.init, "kaiming_normal_", lambda t, *a, **k: calls.append(t.device) or real(t, *a, **k)
    )
    code, _, _ = run_cli(["list"], capsys)
    assert code == 0 and calls and all(d.type == "meta" for d in calls)


@pytest.mark.parametrize(
    "args,message",
    [
        (["optim.lrr=0.1"], "unknown config key 'optim.lrr'"),
        (["method.name=dlg"], "unknown method 'dlg'"),
        (["model.backbone=resnet33"], "unknown backbone"),
        (["model.num_blocks=99"], "impossible"),
        (["model.num_blocks=5", "model.split=infopro", "model.backbone=resnet32"], "valid K"),
        (["optim.epochs=many"], "optim.epochs: expected int"),
        (["data.name=cifar10", "data.root=/nonexistent"], "cifar10 not found"),
        (["method.infopro.ixx_1=1", "method.name=dgl"], "does not apply"),
        (["engine.device=cuda:7"], "CUDA is not available"),
        (["novalue"], "must look like key=value"),
        (["engine.amp=bf16", "engine.device=cpu"], "needs a CUDA device"),
        (["data.batch_size=0"], "data.batch_size must be >= 1"),
        # issue 14: validated when the config is read (or the method built), not a traceback
        (["method.name=dgl", "method.dgl.head=bogus"], "unknown DGL head 'bogus'"),
        (["optim.name=adam"], "optim.name: unknown value 'adam'"),
        (["optim.schedule=step"], "optim.schedule: unknown value 'step'"),
        (["method.name=dgl+manpp", "method.momentum.init=bogus"], "momentum init must be"),
        (["method.name=dgl+manpp", "method.momentum.momentum=2"], "EMA momentum must lie in [0, 1]"),
        (["optim.momentum=-5"], "optim.momentum must be >= 0"),
        (["engine.threads=-1"], "engine.threads must be >= 1"),
        (["engine.threads=0"], "engine.threads must be >= 1"),
        (["task.label_smoothing=5"], "task.label_smoothing must lie in [0, 1]"),
        (["checkpoint_every=0"], "checkpoint_every must be >= 1"),
        (["optim.warmup_lr=-1"], "optim.warmup_lr must be >= 0"),
        (["data.num_workers=-1"], "data.num_workers must be >= 0"),
        (["engine.mode=pipe"], "engine.mode: unknown value 'pipe'"),
        (["out_dir=/dev/null/runs"], "cannot create the run directory"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(tmp_path, capsys, args, message):
    code, _, err = run_cli(["train", *TINY, f"out_dir={tmp_path}", *args], capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("locallearn: error:") and message in lines[0], err


def test_bad_yaml_and_bad_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: [1,\n")
    code, _, err = run_cli(["train", "-c", str(bad)], capsys)
    assert code == 2 and "not valid YAML" in err and len(err.strip().splitlines()) == 1
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"PK\x03\x04 truncated")
    code, _, err = run_cli(["eval", str(junk)], capsys)
    assert code == 2 and "truncated or corrupt" in err and len(err.strip().splitlines()) == 1


def test_console_entry_point_reports_errors_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "locallearn", "train", "method.name=nope", f"out_dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "unknown method 'nope'" in proc.stderr


@pytest.mark.parametrize(
    "metric, final, label, shown",
    [
        ("top1", 91.25, "test acc", "91.25%"),
        ("miou", 48.5, "test miou", "48.50%"),
        ("AP", 31.0, "test AP", "31.00%"),
        ("psnr", 33.125, "test psnr", "33.12dB"),
    ],
)
def test_summary_table_names_the_task_main_metric(capsys, metric, final, label, shown):
    from locallearn.cli import print_table

    summary = {
        "method": "infopro+manpp",
        "num_blocks": 2,
        "metric": metric,
        "final": final,
        "best": final,
        "memory": {"peak_activation_bytes": 2**20, "batch_size": 8},
        "median_step_time_s": 0.01,
        "params": {"backbone": 1e6, "aux": 1e5},
        "dataset": "d",
        "train_images": 8,
        "epochs": 1,
        "device": "cpu",
        "run_dir": "r",
    }
    print_table([summary])
    header, _, row = capsys.readouterr().out.splitlines()[:3]
    assert header.split()[2:4] == label.split() and "test acc" not in header.replace(label, "")
    assert row.split()[2:4] == [shown, shown]
    assert header.index(label) + len(label) == row.index(shown) + len(shown)  # right-aligned under it
