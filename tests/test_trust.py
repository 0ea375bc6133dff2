"""A file someone hands you must not choose code to run (issue 28.1): a checkpoint's config may name
``model.backbone=package.module:factory``, and building that imports and calls it. ``eval``, ``export``,
``analyze`` and ``--resume`` refuse such a config unless the command names the spec itself."""

import tempfile

import pytest
import torch
from torch import nn

from locallearn.backbones.sources import runs_code, trust_modules, untrusted
from locallearn.cli import main
from locallearn.engine import checkpoint
from locallearn.resume import config_from_checkpoint
from locallearn.run.launch import evaluate_checkpoint
from tests.helpers import TINY_CLI

SPEC = "tests.test_trust:gray_net"


class GrayNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.body(self.stem(x))).flatten(1))


def gray_net(num_classes: int = 10) -> GrayNet:
    return GrayNet(num_classes)


def train_run(tmp_path, backbone: str = SPEC):
    args = [a for a in TINY_CLI if not a.startswith("model.backbone")]
    main(["train", *args, f"model.backbone={backbone}", f"out_dir={tmp_path}", "name=r"])
    return tmp_path / "r"


def test_which_specs_run_code() -> None:
    assert runs_code(SPEC) and runs_code("tempfile:mkdtemp")
    assert not any(runs_code(n) for n in ("torchvision:resnet18", "timm:resnet18d", "resnet32"))
    assert untrusted(SPEC)
    with trust_modules([SPEC]):
        assert not untrusted(SPEC) and untrusted("tempfile:mkdtemp")
    assert untrusted(SPEC)


def test_a_checkpoint_naming_a_module_builds_it_only_when_the_command_names_it(tmp_path, capsys) -> None:
    run = train_run(tmp_path)
    capsys.readouterr()
    for args in (
        ["eval", str(run)],
        ["export", str(run), str(tmp_path / "o.pt")],
        ["analyze", "probe", str(run)],
    ):
        with pytest.raises(SystemExit) as exit_:
            main(args)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1, err
        assert f"--trust-module {SPEC}" in err and "imports and runs" in err
    with pytest.raises(SystemExit):
        main(["train", "--resume", str(run), "optim.epochs=2"])
    assert "imports and runs" in capsys.readouterr().err
    assert not (tmp_path / "o.pt").exists()

    main(["eval", str(run), "--trust-module", SPEC])
    assert '"top1"' in capsys.readouterr().out
    main(["export", str(run), str(tmp_path / "o.pt"), "--trust-module", SPEC])
    net = gray_net()
    net.load_state_dict(torch.load(tmp_path / "o.pt", weights_only=True), strict=True)
    # naming the backbone again on the resume command line trusts it
    main(["train", "--resume", str(run), "--print-config", f"model.backbone={SPEC}"])
    assert SPEC in capsys.readouterr().out
    with trust_modules([SPEC]):  # the Python API's way
        assert "top1" in evaluate_checkpoint(run, device="cpu")


def test_the_issue_reproduction_creates_no_directory(tmp_path, capsys, monkeypatch) -> None:
    """A checkpoint of an ordinary run edited to name ``tempfile:mkdtemp``: ``eval`` used to call it."""
    args = [a for a in TINY_CLI if not a.startswith("model.backbone")]
    main(
        [
            "train",
            *args,
            "model.backbone=resnet20",
            "engine.measure_memory=false",
            f"out_dir={tmp_path}",
            "name=r",
        ]
    )
    path = tmp_path / "r" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    state["config"]["model"]["backbone"] = "tempfile:mkdtemp"
    torch.save(state, path)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["eval", str(tmp_path / "r")])
    assert "model.backbone=tempfile:mkdtemp" in capsys.readouterr().err
    assert list(scratch.iterdir()) == []
    with pytest.raises(checkpoint.CheckpointError, match="--trust-module tempfile:mkdtemp"):
        config_from_checkpoint(checkpoint.load(path))
