"""Folder data starts from defaults sized to the folder, not ImageNet's recipe (issue 28.9)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from locallearn.data.folder_defaults import small_data_values
from tests.helpers import run_cli

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from digits_folder import write_digits_folder  # noqa: E402

# the README's folder line
README = [
    "model.backbone=torchvision:mobilenet_v3_small",
    "data.name=folder",
    "data.root={root}",
    "data.image_size=96",
]


def readme_line(root) -> list[str]:
    return [a.replace("{root}", str(root)) for a in README]


def test_values_follow_the_number_of_images() -> None:
    small, large = small_data_values(100), small_data_values(50_000)
    assert small["data"]["batch_size"] == 16 and small["optim"]["epochs"] == 29
    assert small["optim"]["lr"] == pytest.approx(0.05) and small["method"]["name"] == "dgl"
    assert large["data"]["batch_size"] == 128 and large["optim"]["epochs"] == 10
    assert small_data_values(100, batch=32)["optim"]["lr"] == pytest.approx(0.1)  # a chosen batch: lr follows


def test_a_folder_run_starts_from_small_data_defaults_and_says_so(tmp_path, capsys) -> None:
    root = write_digits_folder(tmp_path / "photos", train=5, val=2, size=16)
    code, out, err = run_cli(["train", *readme_line(root), "--print-config"], capsys)
    cfg = yaml.safe_load(out)
    assert code == 0
    assert (cfg["data"]["batch_size"], cfg["optim"]["lr"], cfg["optim"]["epochs"]) == (8, 0.025, 67)
    assert (cfg["method"]["name"], cfg["model"]["num_blocks"], cfg["optim"]["warmup_epochs"]) == (
        "dgl",
        4,
        1.0,
    )


def test_values_the_user_gives_win_even_when_equal_to_the_dataclass_defaults(tmp_path, capsys) -> None:
    root = write_digits_folder(tmp_path / "photos", train=5, val=2, size=16)
    given = ["data.batch_size=1024", "optim.epochs=400", "method.name=infopro+manpp"]
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 0.8\n")
    code, out, _ = run_cli(
        ["train", "-c", str(tmp_path / "c.yaml"), *readme_line(root), *given, "--print-config"], capsys
    )
    cfg = yaml.safe_load(out)
    assert (cfg["data"]["batch_size"], cfg["optim"]["epochs"], cfg["optim"]["lr"]) == (1024, 400, 0.8)
    assert cfg["method"]["name"] == "infopro+manpp" and cfg["model"]["num_blocks"] == 4


def test_the_log_names_the_defaults_taken(tmp_path, capsys) -> None:
    root = write_digits_folder(tmp_path / "photos", train=3, val=1, size=16)
    args = ["train", *readme_line(root), "data.image_size=16", "optim.epochs=1", "data.batch_size=6"]
    code, _, err = run_cli(
        [*args, "engine.device=cpu", "engine.measure_memory=false", f"out_dir={tmp_path}/runs"], capsys
    )
    assert code == 0, err
    (line,) = [x for x in err.splitlines() if "small-data defaults" in x]
    assert "folder data with 12 training images" in line and "optim.lr=0.01875" in line
    assert (
        "data.batch_size" not in line and "optim.epochs" not in line
    )  # the user's own values are not listed
    (run,) = (tmp_path / "runs").iterdir()
    assert "small-data defaults" in (run / "train.log").read_text()


@pytest.mark.slow
def test_the_readme_folder_line_beats_chance_after_its_default_epochs(tmp_path, capsys) -> None:
    """docs/usage.md "Folder data: small-data defaults" quotes this run (4 classes: chance is 25 %)."""
    root = write_digits_folder(tmp_path / "photos")
    code, _, err = run_cli(["train", *readme_line(root), f"out_dir={tmp_path}/runs"], capsys)
    assert code == 0, err[-2000:]
    (run,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 29 and summary["final"] > 25.0
