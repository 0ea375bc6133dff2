"""Each bench command runs at a tiny size and writes well-formed tables (never a timing threshold)."""

from __future__ import annotations

import math

import pytest
import torch

from locallearn.bench.common import read_csv
from locallearn.bench.memory import BREAKDOWN_COLUMNS, PARTS, checkpoint_peak
from locallearn.bench.memory import COLUMNS as MEMORY_COLUMNS
from locallearn.bench.speed import COLUMNS as SPEED_COLUMNS
from locallearn.cli import main

pytest.importorskip("matplotlib")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared CPU: extra intra-op threads only add contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-9)


def check_header(md: str, batch: str) -> None:
    head = md.split("|", 1)[0]
    for key in ("- command:", "- machine:", "- torch ", f"- batch size: {batch}", "dtype: float32"):
        assert key in head


def test_memory_bench(tmp_path, capsys):
    main(
        ["bench", "memory", "--cells", "resnet20:4", "--methods", "checkpoint", "dgl", "dgl+manpp"]
        + ["--batches", "2", "3", "4", "--breakdown", "dgl+manpp", "--out", str(tmp_path)]
    )
    assert "Memory" in capsys.readouterr().out
    rows = read_csv(tmp_path / "memory.csv")
    assert [r["method"] for r in rows] == ["bp", "checkpoint", "dgl", "dgl+manpp"]
    assert set(MEMORY_COLUMNS) - set(rows[0]) <= {
        "cuda_batch",
        "cuda_max_allocated_GiB",
        "cuda_max_reserved_GiB",
    }
    bp = float(rows[0]["peak_activation_bytes"])
    for r in rows:
        peak = float(r["peak_activation_bytes"])
        assert peak > 0
        assert close(float(r["ratio_to_bp"]), peak / bp)
        assert close(float(r["peak_activation_GiB"]), peak / 2**30)
        assert float(r["linearity_error_bytes"]) == 0.0  # saved bytes are exactly affine in the batch
        # running the whole step (checkpointing re-entrant) agrees with the per-block / analytic count
        assert close(float(r["live_peak_bytes"]), peak) and close(float(r["live_over_peak"]), 1.0)
    assert rows[1]["segments"] == "2" and float(rows[1]["ratio_to_bp"]) < 1
    # the whole step: weights, optimizer state, the largest block's gradients, activations and workspace
    bp_total = float(rows[0]["peak_total_bytes"])
    for r in rows:
        total = float(r["peak_total_bytes"])
        assert total > float(r["peak_activation_bytes"]) + float(r["param_bytes"]) + float(
            r["optimizer_state_bytes"]
        )
        assert close(float(r["total_ratio_to_bp"]), total / bp_total)
    assert float(rows[2]["ratio_to_bp"]) < float(rows[3]["ratio_to_bp"])  # MAN++ holds two more layer copies
    blocks = read_csv(tmp_path / "memory_breakdown.csv")
    assert list(blocks[0]) == BREAKDOWN_COLUMNS and len(blocks) == 4
    for b in blocks:
        assert abs(sum(float(b[p]) for p in PARTS) - float(b["total"])) <= len(PARTS)  # rounding only
    assert max(float(b["share_of_peak"]) for b in blocks) == 1.0
    assert float(blocks[0]["lb"]) > 0 and float(blocks[0]["ema"]) == float(blocks[0]["lb"])
    md = (tmp_path / "memory.md").read_text()
    check_header(md, "1024")
    assert "Where the bytes go" in md and (tmp_path / "memory.png").stat().st_size > 0


def test_checkpoint_peak_with_one_segment_is_bp():
    layers = {"input": 5.0, "layer0": 10.0, "layer1": 20.0, "layer2": 30.0}
    inputs = {0: 5.0, 1: 4.0, 2: 3.0}
    assert checkpoint_peak(layers, inputs, 7.0, 1) == 5 + 10 + 20 + 30 + 7
    # 3 segments of one layer: the tail runs with both checkpointed inputs held; segment i with inputs 0..i
    assert checkpoint_peak(layers, inputs, 7.0, 3) == max(5 + 4 + 3 + 30 + 7, 5 + 10, 5 + 4 + 20)


def test_speed_bench(tmp_path):
    main(
        ["bench", "speed", "--cells", "resnet20:2", "--methods", "bp", "dgl", "--batch", "2"]
        + ["--steps", "2", "--warmup", "0", "--out", str(tmp_path)]
    )
    rows = read_csv(tmp_path / "speed.csv")
    assert list(rows[0]) == SPEED_COLUMNS and [r["method"] for r in rows] == ["bp", "dgl"]
    bp = rows[0]
    for r in rows:
        med = float(r["median_step_ms"])
        assert close(float(r["time_ratio"]), med / float(bp["median_step_ms"]))
        assert close(float(r["images_per_s"]), 2 / (med / 1e3))
        assert close(float(r["flop_ratio"]), float(r["gflop_per_step"]) / float(bp["gflop_per_step"]))
        assert close(float(r["time_over_flop"]), float(r["time_ratio"]) / float(r["flop_ratio"]))
    check_header((tmp_path / "speed.md").read_text(), "2")


def test_accuracy_bench(tmp_path):
    main(
        ["bench", "accuracy", "--dataset", "digits", "--backbone", "resnet20", "-k", "2"]
        + [
            "--methods",
            "dgl",
            "dgl+manpp[momentum.init=copy]",  # a variant: options of the momentum aux
            "--seeds",
            "0",
            "1",
            "--train-subset",
            "40",
            "--test-subset",
            "30",
        ]
        + [
            "--epochs",
            "2",
            "--batch",
            "20",
            "--threads",
            "1",
            "--out",
            str(tmp_path),
            "--runs-dir",
            str(tmp_path / "runs"),
        ]
    )
    rows = {r["method"]: r for r in read_csv(tmp_path / "accuracy.csv")}
    manpp = "dgl+manpp[momentum.init=copy]"
    assert list(rows) == ["bp", "dgl", manpp]
    config = (tmp_path / "runs" / "dgl+manpp_momentum.init=copy_-seed0" / "config.yaml").read_text()
    assert "init: copy" in config
    for r in rows.values():
        errors = [float(e) for e in r["errors"].split(" / ")]
        assert r["seeds"] == "2" and close(float(r["test_error_mean"]), sum(errors) / 2)
    err = {m: float(r["test_error_mean"]) for m, r in rows.items()}
    if err["dgl"] != err["bp"]:
        gap = (err["dgl"] - err[manpp]) / (err["dgl"] - err["bp"])
        assert close(float(rows[manpp]["gap_closed"]), gap)
    curves = read_csv(tmp_path / "accuracy_curves.csv")
    assert len(curves) == 3 * 2 * 2  # methods x seeds x epochs
    md = (tmp_path / "accuracy.md").read_text()
    check_header(md, "20")
    assert "Table I ordering" in md
    for png in ("accuracy_curves.png", "accuracy_vs_memory.png"):
        assert (tmp_path / png).stat().st_size > 0


def test_pipeline_bench_groups_blocks_by_time_or_memory():
    from locallearn.bench.pipeline import block_sizes

    for balance in ("time", "memory"):
        sizes = block_sizes("resnet20", 3, "dgl", 4, 2, balance)
        assert len(sizes) == 2 and sum(sizes) == 3 and min(sizes) >= 1
    with pytest.raises(ValueError, match="balance"):
        block_sizes("resnet20", 3, "dgl", 4, 2, "flops")


def test_method_spec_keeps_non_method_sections():
    from locallearn.bench.common import method_config, parse_spec

    name, options = parse_spec("dgl+manpp[momentum.init=copy,engine.group_steps=true,optim.foreach=true]")
    assert name == "dgl+manpp"
    assert options == ["method.momentum.init=copy", "engine.group_steps=true", "optim.foreach=true"]
    cfg = method_config("resnet8", 2, "dgl[optim.foreach=true,engine.compile=true]")
    assert cfg.optim.foreach is True and cfg.engine.compile is True and cfg.method.name == "dgl"


def test_speed_bench_switch_rows_reference_and_bf16(tmp_path):
    """Switch rows come from specs, ``--ref`` is the row ratios divide by, ``--amp bf16`` autocasts (CPU)."""
    ref = "bp[optim.foreach=true]"
    grouped = "dgl[optim.foreach=true,engine.group_steps=true]"
    main(
        ["bench", "speed", "--cells", "resnet20:2", "--methods", "bp", grouped, "--batch", "2"]
        + ["--amp", "bf16", "--ref", ref, "--steps", "2", "--warmup", "0"]
        + ["--out", str(tmp_path), "--name", "sw"]
    )
    rows = read_csv(tmp_path / "sw.csv")
    assert list(rows[0]) == SPEED_COLUMNS and [r["method"] for r in rows] == [ref, "bp", grouped]
    assert {r["amp"] for r in rows} == {"bf16"} and {r["size"] for r in rows} == {"32"}
    for r in rows:
        assert close(float(r["time_ratio"]), float(r["median_step_ms"]) / float(rows[0]["median_step_ms"]))
    md = (tmp_path / "sw.md").read_text()
    assert "bf16 autocast" in md.split("|", 1)[0] and f"ratios relative to `{ref}`" in md
    assert f"{grouped}: time" in md


def test_speed_bench_flops_only_on_an_imagenet_backbone(tmp_path):
    """A torchvision backbone gets ImageNet-shaped input (1000 classes) at ``--size``; no timing."""
    main(
        ["bench", "speed", "--cells", "resnet18:2", "--size", "32", "--methods", "dgl", "--batch", "2"]
        + ["--flops-only", "--out", str(tmp_path), "--name", "fl"]
    )
    rows = read_csv(tmp_path / "fl.csv")
    assert [r["method"] for r in rows] == ["bp", "dgl"] and {r["size"] for r in rows} == {"32"}
    for r in rows:
        assert r["median_step_ms"] == r["time_ratio"] == r["time_over_flop"] == ""
        assert close(float(r["flop_ratio"]), float(r["gflop_per_step"]) / float(rows[0]["gflop_per_step"]))
    md = (tmp_path / "fl.md").read_text()
    assert "3x32x32, 1000 classes" in md and "time not measured (--flops-only)" in md
    assert "Table VIII" in md


def test_speed_cell_honours_group_steps_and_steps_like_the_default():
    from locallearn.bench.common import build_cell, synthetic_batch

    cells = [build_cell("resnet20", 2, m) for m in ("dgl", "dgl[engine.group_steps=true]")]
    assert cells[0].grouped is None and cells[1].grouped is not None
    assert cells[1].cfg.engine.group_steps is True
    cells[1].model.load_state_dict(cells[0].model.state_dict())
    batch = synthetic_batch(2)
    for cell in cells:
        cell.step(batch)
        cell.step(batch)
    for a, b in zip(cells[0].model.parameters(), cells[1].model.parameters()):
        assert torch.equal(a, b)


def test_speed_bench_compiles_cells_after_counting_flops(tmp_path):
    spec = "dgl[engine.compile=true,engine.compile_backend=eager]"
    args = [
        "bench",
        "speed",
        "--cells",
        "resnet20:2",
        "--methods",
        "dgl",
        spec,
        "--batch",
        "2",
        "--steps",
        "1",
    ]
    with pytest.raises(ValueError, match="warmup"):  # the first step compiles: it must not be timed
        main([*args, "--warmup", "0", "--out", str(tmp_path)])
    main([*args, "--warmup", "1", "--out", str(tmp_path)])
    rows = read_csv(tmp_path / "speed.csv")
    plain, compiled = rows[1], rows[2]
    assert compiled["method"] == spec and compiled["gflop_per_step"] == plain["gflop_per_step"]


def test_speed_breakdown_columns_add_up_to_the_profiled_step(tmp_path):
    """The four parts of a profiled step add up to its wall clock, bp has an optimizer part, a method with
    an aux has uncounted ops. Tolerance: on CPU the parts are the profiler's self times inside the step's
    record_function range (they sum to the range's length), ``profiled_ms`` is time.perf_counter around
    that range; the two clocks differ by the range's enter/exit and the profiler's own bookkeeping at
    the edges (tens of us, measured < 1% here), far below what a part dropped or counted twice would
    move (the smallest part, the optimizer, is several % of a step)."""
    from locallearn.bench.speed import BREAKDOWN_COLUMNS, PARTS

    main(
        ["bench", "speed", "--cells", "resnet20:2", "--methods", "bp", "dgl", "--batch", "2"]
        + ["--steps", "1", "--warmup", "0", "--breakdown-rounds", "1", "--out", str(tmp_path), "--name", "bd"]
    )
    rows = read_csv(tmp_path / "bd.csv")
    assert set(BREAKDOWN_COLUMNS) <= set(rows[0])
    for r in rows:
        parts = [float(r[f"{p}_ms"]) for p in PARTS]
        assert min(parts) >= 0 and float(r["counted_ms"]) > 0
        assert math.isclose(sum(parts), float(r["profiled_ms"]), rel_tol=0.03, abs_tol=0.5)
    bp, dgl = rows
    assert float(bp["optimizer_ms"]) > 0 and float(dgl["other_ms"]) > 0
    assert close(float(bp["time_over_flop_counted_only"]), 1.0)
    counted_ratio = float(dgl["counted_ms"]) / float(bp["counted_ms"])
    assert close(float(dgl["time_over_flop_counted_only"]), counted_ratio / float(dgl["flop_ratio"]))
    md = (tmp_path / "bd.md").read_text()
    assert "## Where a step's time goes" in md and "counted ops alone" in md


def test_speed_breakdown_classifies_ops_like_the_flop_counter():
    """Convolutions and matmuls (and what they call, e.g. mkldnn kernels) are counted, BN is other, the
    SGD update is optimizer, Python between ops is host."""
    from torch import nn
    from torch.profiler import ProfilerActivity, profile, record_function

    from locallearn.bench.speed import STEP_RANGE, counted_op_names, split_step

    counted = counted_op_names()
    assert {"aten::convolution", "aten::convolution_backward", "aten::mm", "aten::addmm"} <= counted
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(2, 3, 8, 8)
    with profile(activities=[ProfilerActivity.CPU]) as prof, record_function(STEP_RANGE):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    parts, other = split_step(prof.events(), counted, device_time=False)
    assert all(parts[p] > 0 for p in ("counted", "optimizer", "other", "host"))
    assert "aten::native_batch_norm" in other
    assert not any("convolution" in name or name in ("aten::mm", "aten::addmm") for name in other)
    assert not any(name.startswith("Optimizer.") for name in other)


def test_speed_no_breakdown_leaves_the_columns_blank(tmp_path):
    main(
        ["bench", "speed", "--cells", "resnet20:2", "--methods", "dgl", "--batch", "2", "--steps", "1"]
        + ["--warmup", "0", "--no-breakdown", "--out", str(tmp_path), "--name", "nb"]
    )
    rows = read_csv(tmp_path / "nb.csv")
    assert list(rows[0]) == SPEED_COLUMNS
    assert {r["counted_ms"] for r in rows} == {r["time_over_flop_counted_only"] for r in rows} == {""}
    assert "## Where a step's time goes" not in (tmp_path / "nb.md").read_text()
