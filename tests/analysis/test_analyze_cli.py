"""``locallearn analyze``: every sub-command on two tiny digits runs writes its PNG and CSV; bad inputs
are one line on stderr and exit 2."""

import csv

import pytest
import torch

from locallearn.cli import main
from tests import helpers
from tests.helpers import run_cli

TINY = [*helpers.TINY_CLI, "engine.measure_memory=false"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A dgl run and its bp comparison (K = 1), one epoch on 64 digits."""
    root = tmp_path_factory.mktemp("runs")
    main(["train", *TINY, "method.name=dgl", "compare=[bp]", f"out_dir={root}", "name=dgl"])
    (bp,) = [d for d in root.iterdir() if d.name != "dgl"]  # the comparison run's name is the runner's
    return root / "dgl", bp


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cka_writes_plot_and_csv(runs, tmp_path, capsys):
    dgl, bp = runs
    code, out, err = run_cli(
        ["analyze", "cka", str(dgl), "--reference", str(bp), "--out", str(tmp_path)], capsys
    )
    assert code == 0, err
    rows = read(tmp_path / "cka.csv")
    assert (tmp_path / "cka.png").stat().st_size > 1000
    assert [int(r["layer"]) for r in rows] == list(range(10))  # resnet20: stem + 9 units
    assert all(0 <= float(r["cka"]) <= 1 + 1e-9 for r in rows)
    assert "dgl K=2" in out and "mean" in out
    # the reference found by itself among the runs (method bp), and the debiased variant
    code, _, err = run_cli(
        ["analyze", "cka", str(dgl), str(bp), "--debiased", "--out", str(tmp_path)], capsys
    )
    assert code == 0, err
    assert len(read(tmp_path / "cka.csv")) == 10


def test_probe_writes_plot_and_csv(runs, tmp_path, capsys):
    code, _, err = run_cli(["analyze", "probe", *map(str, runs), "--out", str(tmp_path)], capsys)
    assert code == 0, err
    rows = read(tmp_path / "probe.csv")
    assert (tmp_path / "probe.png").is_file() and len(rows) == 20
    assert {r["run"] for r in rows} == {"dgl K=2", "bp K=1"}
    assert all(0 <= float(r["test_acc"]) <= 100 for r in rows)


def test_gradcam_writes_grid_and_csv(runs, tmp_path, capsys):
    args = [
        "analyze",
        "gradcam",
        *map(str, runs),
        "--images",
        "3",
        "--layers",
        "4",
        "-1",
        "--out",
        str(tmp_path),
    ]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    rows = read(tmp_path / "gradcam.csv")
    assert (tmp_path / "gradcam.png").is_file() and len(rows) == 2 * 2 * 3  # runs x layers x images
    assert {int(r["layer"]) for r in rows} == {4, 9}
    assert all(r["label"] == r["target"] for r in rows)


def test_gradcam_per_block(runs, tmp_path, capsys):
    args = ["analyze", "gradcam", *map(str, runs), "--images", "2", "--blocks", "--out", str(tmp_path)]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    layers = [(r["run"], int(r["layer"])) for r in read(tmp_path / "gradcam.csv")]
    assert layers == [("dgl K=2", 4)] * 2 + [("dgl K=2", 9)] * 2 + [("bp K=1", 9)] * 2  # cut at layer 5


def test_curves_writes_plot_and_csv(runs, tmp_path, capsys):
    code, out, err = run_cli(["analyze", "curves", *map(str, runs), "--out", str(tmp_path)], capsys)
    assert code == 0, err
    rows = read(tmp_path / "curves.csv")
    assert (tmp_path / "curves.png").is_file()
    assert [(r["run"], r["epoch"]) for r in rows] == [("dgl K=2", "1"), ("bp K=1", "1")]
    assert "dgl K=2" in out
    # the per-block panel's numbers: each block's own test top-1 at the last epoch, as metrics.csv has it
    blocks = read(tmp_path / "blocks.csv")
    assert [(r["run"], r["block"], r["metric"]) for r in blocks] == [
        ("dgl K=2", "0", "top1"),
        ("dgl K=2", "1", "top1"),
        ("bp K=1", "0", "top1"),
    ]
    (last,) = read(runs[0] / "metrics.csv")
    assert float(blocks[1]["value"]) == pytest.approx(float(last["test_top1"]), abs=1e-4)
    assert float(blocks[0]["value"]) == pytest.approx(float(last["test_block0_top1"]), abs=1e-4)
    assert "per block test top1" in out


def test_default_output_is_beside_the_first_run(runs, capsys):
    code, _, err = run_cli(["analyze", "curves", str(runs[0])], capsys)
    assert code == 0, err
    assert (runs[0] / "analysis" / "curves.png").is_file()


def one_line_error(code, err):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("locallearn: error:"), err
    return lines[0]


@pytest.mark.parametrize("analysis", ["cka", "probe", "gradcam", "curves"])
def test_missing_run_dir_is_one_line(analysis, runs, tmp_path, capsys):
    code, _, err = run_cli(["analyze", analysis, str(runs[0]), str(tmp_path / "nope")], capsys)
    assert "does not exist" in one_line_error(code, err)


def test_directory_without_a_checkpoint_is_one_line(tmp_path, capsys):
    code, _, err = run_cli(["analyze", "probe", str(tmp_path)], capsys)
    assert "no checkpoint.pt" in one_line_error(code, err)


def test_runs_on_different_data_are_refused(runs, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    state = torch.load(runs[1] / "checkpoint.pt", weights_only=True)
    state["config"]["data"]["name"] = "cifar10"
    torch.save(state, other / "checkpoint.pt")
    for analysis in ("cka", "probe", "gradcam"):
        code, _, err = run_cli(["analyze", analysis, str(runs[0]), str(other)], capsys)
        assert "different data" in one_line_error(code, err)


def test_cka_without_a_reference_and_bad_layer_are_one_line(runs, capsys):
    code, _, err = run_cli(["analyze", "cka", str(runs[0])], capsys)
    assert "--reference" in one_line_error(code, err)
    code, _, err = run_cli(["analyze", "gradcam", str(runs[0]), "--layers", "10"], capsys)
    assert "10 layers" in one_line_error(code, err)
