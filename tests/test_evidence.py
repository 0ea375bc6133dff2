"""``locallearn bench evidence``: every part at toy size on the CPU (the GPU command cannot rot in CI), the
pre-registered reading, the epoch plan and the budget stop."""

from __future__ import annotations

import gzip
import math
import statistics
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from locallearn.bench.common import read_csv
from locallearn.bench.evidence import FILES
from locallearn.bench.evidence_accuracy import AccuracyPart, gap_closed, plan_epochs, verdict
from locallearn.bench.evidence_worker import DeviceData, calibrate, make_trainer, save_data, train
from locallearn.cli import main

pytest.importorskip("matplotlib")
DEBIAN = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _one_thread():
    """Toy models on a shared CPU: extra intra-op threads only add contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_idx(path: Path, array: np.ndarray) -> None:
    """The IDX format as Fashion-MNIST ships it: magic (0, 0, 0x08 = unsigned byte, ndim), big-endian sizes."""
    head = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(head + array.astype(np.uint8).tobytes())


def fixture_root(tmp_path: Path) -> Path:
    """A data root holding Fashion-MNIST files in the real format, 120 / 60 images whose classes are
    learnable (a bright bar whose row depends on the class)."""
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 120), ("t10k", 60)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, (n, 28, 28))
        for i, c in enumerate(labels):
            images[i, 2 * c : 2 * c + 8, 4:24] = 230
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return tmp_path


def fashion_root(tmp_path: Path) -> Path:
    """The Debian files when installed (the loader falls back to them), else the fixture."""
    return tmp_path if (DEBIAN / "train-images-idx3-ubyte.gz").exists() else fixture_root(tmp_path)


def numbers(rows: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in rows]


def test_evidence_tiny_runs_every_part(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pycocotools", None)  # classification and memory must not need it
    out = tmp_path / "out"
    # every part at toy size; budgets wide enough for a slow shared CI machine (the test checks completion)
    main(
        ["bench", "evidence", "--tiny", "--out", str(out), "--data-root", str(fashion_root(tmp_path))]
        + ["--budget", "1500", "--accuracy-s", "900", "--memory-s", "300", "--speed-s", "300"]
        + [
            "--methods",
            "bp",
            "dgl",
            "dgl+manpp",
            "--seeds",
            "0",
            "--backbone",
            "resnet20",
            "--num-blocks",
            "4",
        ]
        + ["--train-subset", "48", "--test-subset", "40", "--batch", "8", "--max-epochs", "2"]
        + [
            "--memory-methods",
            "bp",
            "checkpoint",
            "dgl+manpp",
            "--detection-methods",
            "bp",
            "--detection-size",
            "64",
        ]
        + ["--speed-cell", "resnet20:4", "--speed-methods", "bp", "dgl+manpp", "--speed-steps", "1"]
        + ["--speed-amps", "none"]  # bf16 rows: tests/test_bench.py; each compiled sub-run traces every block
    )
    printed = capsys.readouterr().out
    files = sorted(p.name for p in out.iterdir())
    assert set(files) == set(FILES) and len(files) <= 8
    assert all((out / f).stat().st_size < 16 * 2**20 for f in files)
    md = (out / "evidence.md").read_text()
    assert md in printed
    for text in (
        "- command:",
        "- machine:",
        "- torch ",
        "- date:",
        "## 1.",
        "## 2.",
        "## 3.",
        "Pre-registered",
    ):
        assert text in md
    assert "failed" not in md and "not started" not in md and "stopped at budget" not in md

    methods = read_csv(out / "accuracy.csv")
    assert [r["method"] for r in methods] == ["bp", "dgl", "dgl+manpp"]
    epochs = read_csv(out / "accuracy_epochs.csv")
    assert len(epochs) == 3 * 2  # methods x epochs
    assert all(0 <= e <= 100 for e in numbers(epochs, "test_error"))
    for r in methods:
        assert r["runs"] == "1" and r["status"] == "finished" and float(r["epochs_done"]) == 2.0
        finals = [
            float(e["test_error"]) for e in epochs if e["method"] == r["method"] and float(e["epoch"]) == 2
        ]
        assert math.isclose(float(r["test_error_mean"]), statistics.mean(finals), abs_tol=1e-9)
    err = {r["method"]: float(r["test_error_mean"]) for r in methods}
    expected = gap_closed(err, "dgl+manpp")
    assert (
        (methods[2]["gap_closed"] == "")
        if expected is None
        else math.isclose(float(methods[2]["gap_closed"]), expected)
    )
    assert math.isclose(float(methods[2]["paper_gap_closed"]), (14.08 - 8.75) / (14.08 - 6.37))

    memory = read_csv(out / "memory.csv")
    assert [(r["task"], r["method"]) for r in memory] == [
        ("classification", "bp"),
        ("classification", "checkpoint"),
        ("classification", "dgl+manpp"),
        ("detection", "bp"),
    ]
    assert all(float(r["meter_GiB"]) > 0 and r["status"] == "meter only (no CUDA)" for r in memory)
    # the whole-step account is there on every device; on CPU there is no CUDA figure to divide by
    assert all(
        float(r["accounted_GiB"]) > float(r["meter_GiB"]) and not r["accounted_over_cuda"] for r in memory
    )
    assert float(memory[0]["meter_ratio_to_bp"]) == 1.0 and float(memory[1]["meter_ratio_to_bp"]) < 1.0
    assert float(memory[3]["paper_GB"]) == 18.1  # MAN++ Table IV, RetinaNet-R50 E2E

    speed = read_csv(out / "speed.csv")
    assert [(r["mode"], r["amp"]) for r in speed[::2]] == [("eager", "none"), ("compile", "none")]
    assert all(float(r["median_step_ms"]) > 0 for r in speed)
    assert numbers(speed[::2], "time_ratio") == [1.0] * 2  # each sub-run's bp row is its reference
    assert "engine.compile=true" in speed[-1]["method"]
    for rows in (methods, epochs, memory, speed):
        assert all(
            r["device"] and r["torch"] == torch.__version__ and r["date"] and r["command"] for r in rows
        )


def test_evidence_memory_part_survives_a_failing_cell(tmp_path):
    main(
        ["bench", "evidence", "--tiny", "--parts", "memory", "--out", str(tmp_path)]
        + ["--memory-methods", "bp", "no_such_method", "--detection-methods"]
    )
    rows = {r["method"]: r for r in read_csv(tmp_path / "memory.csv")}
    assert rows["bp"]["status"] == "meter only (no CUDA)" and float(rows["bp"]["meter_GiB"]) > 0
    assert rows["no_such_method"]["status"].startswith("failed:")
    md = (tmp_path / "evidence.md").read_text()
    assert "| accuracy | - | - | skipped (--parts) |" in md


def test_verdict_follows_the_preregistered_rule():
    base = {"bp": [5.0, 5.2], "dgl": [9.0, 9.2], "infopro": [8.0, 8.2]}
    # gap 4 pp; MAN++ closes 3/4 of it for both bases, beyond the seed spread
    overall, lines = verdict({**base, "dgl+manpp": [6.0, 6.2], "infopro+manpp": [5.8, 6.0]}, True, 20)
    assert overall == "reproduced at this budget" and all(line.endswith("reproduces") for line in lines)
    overall, _ = verdict({**base, "dgl+manpp": [9.5, 9.1], "infopro+manpp": [7.9, 8.1]}, True, 20)
    assert overall == "refuted at this budget"
    overall, lines = verdict({**base, "dgl+manpp": [8.0, 8.2], "infopro+manpp": [6.0, 6.2]}, True, 20)
    assert overall == "mixed" and "weaker than claimed" in lines[0]
    assert (
        verdict({**base, "dgl+manpp": [6.0, 6.2], "infopro+manpp": [5.8, 6.0]}, False, 20)[0] == "no verdict"
    )
    assert verdict({**base, "dgl+manpp": [6.0, 6.2], "infopro+manpp": [5.8, 6.0]}, True, 4)[0] == "no verdict"
    small = {"bp": [5.0, 5.0], "dgl": [5.5, 5.5], "dgl+manpp": [5.1, 5.1], "infopro": [9.0, 9.0]}
    assert verdict({**small, "infopro+manpp": [6.0, 6.0]}, True, 20)[0] == "no verdict"  # dgl's gap < 1 pp


def test_accuracy_results_aggregate_seeds_and_say_which_runs_stopped():
    part = AccuracyPart.__new__(AccuracyPart)  # the aggregation alone, without processes
    part.s = {"methods": ["bp", "dgl", "dgl+manpp"], "batch_size": 128}
    part.images = {"train_images": 60000, "test_images": 10000}
    finals = {"bp": [5.0, 6.0], "dgl": [9.0, 10.0], "dgl+manpp": [7.0, 7.5]}
    part.runs = {
        f"{m}-seed{seed}": {
            "method": m, "seed": seed, "status": "finished", "step_s": 0.01,
            "history": [{"epoch": 1.0, "test_error": 50.0}, {"epoch": 2.0, "test_error": err}],
        }
        for m, errs in finals.items() for seed, err in enumerate(errs)
    }  # fmt: skip
    part.runs["dgl+manpp-seed1"].update(status="stopped at budget")
    part.runs["dgl+manpp-seed1"]["history"][-1]["epoch"] = 1.5
    result = part.results(2)
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["dgl"]["test_error_mean"] == 9.5 and rows["dgl"]["errors"] == "9.00 / 10.00"
    assert math.isclose(rows["dgl"]["test_error_std"], statistics.stdev([9.0, 10.0]))
    assert math.isclose(rows["dgl+manpp"]["gap_closed"], (9.5 - 7.25) / (9.5 - 5.5))
    assert rows["dgl+manpp"]["epochs_done"] == 1.5 and "stopped at budget" in rows["dgl+manpp"]["status"]
    assert result["verdict"] == "no verdict" and "NOT every run finished" in result["status"]
    assert len(result["history"]) == 12


def test_plan_epochs_fits_the_slowest_run():
    runs = [{"step_s": 0.01, "test_s": 1.0}, {"step_s": 0.02, "test_s": 1.0}]
    assert plan_epochs(runs, 100, 100.0, None, 1.0) == 33  # 3 s per epoch for the slower run
    assert plan_epochs(runs, 100, 100.0, 5, 1.0) == 5
    assert plan_epochs(runs, 100, 1.0, None, 1.0) == 1  # at least one epoch; the deadline stops it


def test_worker_trains_on_device_data_and_stops_at_the_deadline(tmp_path):
    path = str(tmp_path / "data.pt")
    images = save_data("fashion_mnist", str(fixture_root(tmp_path)), 16, 20, path)
    assert images == {"train_images": 16, "test_images": 20}
    data = DeviceData(path, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    batch = data.batch(torch.arange(8), gen)
    assert batch.x.shape == (8, 1, 32, 32) and batch.y.tolist() == data.y[:8].tolist()
    spec = {
        "backbone": "resnet20",
        "k": 2,
        "method": "dgl",
        "batch_size": 8,
        "lr": 0.05,
        "warmup_epochs": 0.0,
    }
    spec.update(overrides=[], seed=0)
    step_s, test_s = calibrate(make_trainer(spec, data, 1), data, 0.0, 0.0, 0)  # one step per phase at least
    assert step_s > 0 and test_s > 0
    reports: list[dict] = []
    result = train(make_trainer(spec, data, 2), data, 2, time.time(), 0, reports.append)
    assert result == {"status": "stopped at budget", "steps": 0, "epochs_done": 0.0}
    assert [r["epoch"] for r in reports] == [0.0] and 0 <= reports[0]["test_error"] <= 100
    reports.clear()
    result = train(make_trainer(spec, data, 1), data, 1, time.time() + 600, 0, reports.append)
    assert result["status"] == "finished" and result["steps"] == 2 and [r["epoch"] for r in reports] == [1.0]
    assert math.isfinite(reports[0]["train_loss"])


def test_memory_rows_compare_cuda_with_the_meter_and_the_paper():
    from locallearn.bench.evidence_memory import finish_rows

    gib = 2**30
    rows = finish_rows(
        [
            {"task": "classification", "backbone": "resnet110", "method": "bp", "alloc": 10 * gib,
             "reserved": 12 * gib, "static": 1 * gib, "meter": 8 * gib},
            {"task": "classification", "backbone": "resnet110", "method": "infopro+manpp", "alloc": 4 * gib,
             "reserved": 5 * gib, "static": 1 * gib, "meter": 1.5 * gib, "accounted": 3.8 * gib},
            {"task": "detection", "backbone": "resnet50", "method": "bp", "status": "not started (budget)"},
        ]
    )  # fmt: skip
    bp, manpp, det = rows
    assert bp["cuda_rest_GiB"] == 9 and math.isclose(bp["meter_over_cuda_rest"], 8 / 9)
    assert manpp["cuda_ratio_to_bp"] == 0.4 and manpp["meter_ratio_to_bp"] == 1.5 / 8
    assert manpp["paper_GB"] == 3.22 and math.isclose(manpp["paper_ratio_to_bp"], 3.22 / 9.26)
    assert math.isclose(manpp["accounted_over_cuda"], 3.8 / 4) and math.isclose(manpp["accounted_GiB"], 3.8)
    assert bp["accounted_over_cuda"] is None  # no account: left blank, never a made-up ratio
    assert "meter_GiB" not in det  # a cell never measured stays blank


def test_parts_record_how_far_they_got_at_the_budget(tmp_path):
    from locallearn.bench import evidence_memory, evidence_speed
    from locallearn.bench.evidence import TINY

    s = {**TINY, "memory_methods": ["bp"], "detection_methods": ["bp"]}
    result = evidence_memory.run(s, time.time(), torch.device("cpu"))  # the deadline has passed
    assert [r["status"] for r in result["rows"]] == ["not started (budget)"] * 2
    # the speed child writes NAME.start / NAME.done / NAME.failed; the parent reads how far it got
    s = {**TINY, "speed_modes": ["eager", "compile"], "speed_amps": ["none", "bf16"]}
    (tmp_path / "eager_none.start").write_text("0")
    (tmp_path / "eager_none.failed").write_text("RuntimeError: boom")
    (tmp_path / "eager_bf16.start").write_text(str(time.time()))
    rows, done = evidence_speed.collect(s, tmp_path, killed=True, exitcode=-9)
    assert done == 0
    assert [r["status"].split(" after")[0] for r in rows] == [
        "failed: RuntimeError: boom",
        "stopped at budget",
        "not started (budget)",
        "not started (budget)",
    ]
