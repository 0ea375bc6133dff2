"""``locallearn plan --memory``: the chosen plan fits when measured, a budget nothing fits is one line and a
non-zero exit, ``--json`` has its keys, and the printed overrides train what was planned."""

import json

import pytest
import yaml

from locallearn.cli import main
from locallearn.plan import candidate_ks, parse_bytes

# the embedded digits (no files needed), a small ResNet
TINY = ["model.backbone=resnet20", "method.name=dgl+manpp", "data.batch_size=16"]


def run(argv, capsys):
    code = 0
    try:
        main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_fits_when_measured_and_trains_as_printed(capsys):
    code, out, _ = run(["plan", "--memory", "64MiB", "--json", *TINY], capsys)
    plan = json.loads(out)
    assert code == 0 and plan["fits"] is True
    for key in ("fits", "budget_bytes", "bp_peak_total_bytes", "measured_peak_total_bytes", "num_blocks", "cuts",
                "batch_size"):  # fmt: skip
        assert key in plan, key
    assert plan["budget_bytes"] == 64 * 2**20 and plan["batch_size"] == 16  # a batch the user sets is kept
    assert plan["num_blocks"] == 2 and len(plan["cuts"]) == 1  # the smallest K that fits
    assert plan["measured_peak_total_bytes"] <= plan["budget_bytes"]
    # the account and one real step agree (the allocator's count of the same step)
    assert plan["peak_total_bytes"] == pytest.approx(plan["measured_peak_total_bytes"], rel=0.1)
    # the overrides train what was planned
    code, out, _ = run(["train", "--print-config", *TINY, *plan["overrides"]], capsys)
    cfg = yaml.safe_load(out)
    assert code == 0 and cfg["model"]["num_blocks"] == 2 and cfg["model"]["cuts"] == plan["cuts"]
    assert cfg["data"]["batch_size"] == 16


def test_plan_turns_on_mlaan_recompute_when_k_alone_does_not_fit(capsys):
    """MLAAN's recompute option (block k-1 recomputed in the cascade's backward) is the planner's to choose,
    as MAN's ``momentum.recompute``; a method option given (``method.mlaan.ema``) does not break bp's
    build. 8.5 MiB: MLAAN K=2 at batch 64 on the digits holds ~9.6 MiB without recompute, ~7.4 with it."""
    args = ["model.backbone=resnet20", "method.name=mlaan", "data.batch_size=64", "model.num_blocks=2",
            "method.mlaan.ema=true"]  # fmt: skip
    code, out, _ = run(["plan", "--memory", "8.5MiB", "--json", *args], capsys)
    plan = json.loads(out)
    assert code == 0 and plan["fits"] and plan["recompute"] is True
    assert "method.mlaan.recompute=true" in plan["overrides"]
    assert plan["peak_total_bytes"] == pytest.approx(plan["measured_peak_total_bytes"], rel=0.1)
    code, out, _ = run(["plan", "--memory", "1GiB", "--json", "--no-dry-run", *args], capsys)
    assert code == 0 and "method.mlaan.recompute=false" in json.loads(out)["overrides"]  # as measured


def test_a_budget_nothing_fits_is_one_line_and_a_non_zero_exit(capsys):
    code, out, err = run(["plan", "--memory", "1MiB", *TINY, "model.num_blocks=2"], capsys)
    assert code != 0 and out == ""
    lines = [line for line in err.splitlines() if line.startswith("locallearn:")]
    assert len(lines) == 1 and "nothing fits 1.0 MiB" in lines[0] and "needs" in lines[0]


def test_budget_sizes_and_candidate_ks():
    assert parse_bytes("8GiB") == 8 * 2**30 and parse_bytes("512 MiB") == 512 * 2**20
    assert parse_bytes("1.5G") == int(1.5 * 2**30) and parse_bytes(1000) == 1000
    for bad in ("eight", "8 parsecs", "-1G", "0"):
        with pytest.raises(ValueError):
            parse_bytes(bad)
    ks = candidate_ks(55)
    assert ks[0] == 2 and ks[-1] == 55 and ks == sorted(set(ks))


def test_wrap_with_a_memory_budget_plans_k_and_cuts():
    import locallearn
    from locallearn.config import ConfigError

    trainer = locallearn.wrap(
        "resnet20", "dgl", num_classes=10, input_size=16, memory_budget="64MiB", batch_size=8
    )
    # a generous budget: the smallest K of a local method, its cuts from the planner (not the even split)
    assert trainer.num_blocks == 2 and trainer.config.model.split == "cuts"
    assert trainer.config.model.cuts == trainer.model.cuts and len(trainer.model.cuts) == 1
    with pytest.raises(ConfigError, match="nothing fits"):
        locallearn.wrap("resnet20", "dgl", num_classes=10, input_size=16, memory_budget="1MiB", batch_size=8,
                        num_blocks=2)  # fmt: skip
    with pytest.raises(ConfigError, match="batch_size"):
        locallearn.wrap("resnet20", "dgl", num_classes=10, memory_budget="1GiB")


def test_wrap_with_a_budget_leaves_your_model_weights_as_they_were():
    import torch
    from torch import nn

    import locallearn

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip
    before = {k: v.clone() for k, v in net.state_dict().items()}
    trainer = locallearn.wrap(net, "dgl", num_blocks=2, input_size=16, memory_budget="64MiB", batch_size=8)
    assert trainer.num_blocks == 2
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # planning trained candidates
