"""A timm ViT with its own options through the CLI (issue 28.4 / 28.5): ``model.kwargs`` reach
``timm.create_model``, are stored in config.yaml, and ``eval``, ``--resume`` and ``export`` rebuild the
same model from it."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from locallearn.analysis.runs import load_run
from locallearn.cli import main
from locallearn.config import load_config
from tests.helpers import TINY_CLI

timm = pytest.importorskip("timm")

# digits are 8 x 8 grey images: a 1-channel ViT of 2 x 2 patches, two blocks, stochastic depth
KWARGS = {"img_size": 8, "patch_size": 2, "in_chans": 1, "depth": 2, "embed_dim": 32, "num_heads": 2,
          "drop_path_rate": 0.1}  # fmt: skip


def test_override_forms_of_a_mapping() -> None:
    braces = load_config(None, ["model.kwargs={img_size: 64, drop_path_rate: 0.1}"])
    dotted = load_config(None, ["model.kwargs.img_size=64", "model.kwargs.drop_path_rate=0.1"])
    assert braces.model.kwargs == dotted.model.kwargs == {"img_size": 64, "drop_path_rate": 0.1}


def test_a_timm_vit_with_kwargs_trains_evaluates_resumes_and_exports(tmp_path, capsys) -> None:
    torch.set_num_threads(1)
    runs = tmp_path / "runs"
    args = [
        *TINY_CLI,
        "model.backbone=timm:vit_tiny_patch16_224",
        "model.kwargs={" + ", ".join(f"{k}: {v}" for k, v in KWARGS.items()) + "}",
        "model.num_blocks=2",
        "method.name=dgl+manpp",
        "optim.warmup_epochs=0",
        "engine.device=cpu",
        "engine.measure_memory=false",
        f"out_dir={runs}",
    ]
    main(["train", *args])
    (run,) = list(runs.iterdir())
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["kwargs"] == KWARGS
    summary = json.loads((run / "summary.json").read_text())
    capsys.readouterr()

    main(["eval", str(run), "--device", "cpu"])
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(summary["final"])
    main(["train", "--resume", str(run), "optim.epochs=2"])
    assert json.loads((run / "summary.json").read_text())["epochs"] == 2
    capsys.readouterr()

    main(["export", str(run), str(tmp_path / "vit.pt")])
    out = capsys.readouterr().out
    assert "img_size=8" in out and "in_chans=1" in out  # the printed line rebuilds the same model
    net = timm.create_model("vit_tiny_patch16_224", num_classes=10, **KWARGS)
    net.load_state_dict(torch.load(tmp_path / "vit.pt"), strict=True)
    ours = load_run(run, torch.device("cpu")).model
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), ours(x))
