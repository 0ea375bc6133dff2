"""Your model on your folder, through the CLI: train, eval, resume, export, analyze gradcam.

A torchvision MobileNetV3-Small (``model.backbone=torchvision:mobilenet_v3_small``) cut at
``model.cut_at=[features.4]``, on a generated 3-class folder of 64 px and 96x80 PNGs trained at 64 px.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import torchvision
import yaml
from PIL import Image

from locallearn.analysis.runs import load_run
from locallearn.cli import main

CLASSES = ("cat", "dog", "fox")


def make_folder(root, per_class: int = 4, val: int = 2) -> None:
    """train/<class>/*.png and val/<class>/*.png: half 64x64, half 96 wide x 80 high, each class tinted."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", val)):
        for c, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                image = rng.integers(0, 80, (64, 64, 3) if i % 2 == 0 else (80, 96, 3), dtype=np.uint8)
                image[..., c] += 150
                Image.fromarray(image).save(d / f"{i}.png")


def test_any_model_on_a_folder_end_to_end(tmp_path, capsys) -> None:
    torch.set_num_threads(1)
    make_folder(tmp_path / "pets")
    runs = tmp_path / "runs"
    main(
        [
            "train",
            "model.backbone=torchvision:mobilenet_v3_small",
            "model.cut_at=[features.4]",
            "model.num_blocks=2",
            "method.name=dgl",
            "data.name=folder",
            f"data.root={tmp_path / 'pets'}",
            "data.image_size=64",
            "data.batch_size=6",
            "data.test_batch_size=6",
            "optim.epochs=1",
            "optim.lr=0.01",
            "engine.device=cpu",
            f"out_dir={runs}",
        ]
    )
    (run,) = list(runs.iterdir())
    assert run.name == "pets-torchvision-mobilenet_v3_small-K2-dgl"  # the folder's name, no colon
    summary = json.loads((run / "summary.json").read_text())
    assert summary["dataset"] == "pets" and summary["train_images"] == 12
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["backbone"] == "torchvision:mobilenet_v3_small"
    assert saved["model"]["cut_at"] == ["features.4"] and saved["data"]["image_size"] == 64
    capsys.readouterr()

    # eval in this process rebuilds the run from config.yaml; the metric is the run's own
    main(["eval", str(run), "--device", "cpu"])
    result = json.loads(capsys.readouterr().out)
    assert result["top1"] == pytest.approx(summary["final"])

    # resume to a second epoch: the same model rebuilt from its config, one more epoch trained
    main(["train", "--resume", str(run), "optim.epochs=2"])
    assert json.loads((run / "summary.json").read_text())["epochs"] == 2
    capsys.readouterr()

    # export: torchvision's own constructor loads the file with strict=True and outputs what locallearn does
    main(["export", str(run), str(tmp_path / "pets.pt")])
    assert "strict=True" in capsys.readouterr().out
    net = torchvision.models.mobilenet_v3_small(num_classes=3)
    net.load_state_dict(torch.load(tmp_path / "pets.pt"), strict=True)
    ours = load_run(run, torch.device("cpu")).model  # eval mode, the trained weights
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(net.eval()(x), ours(x))

    # Grad-CAM labels are the class folders' names
    main(["analyze", "gradcam", str(run), "--images", "3", "--device", "cpu"])
    with open(run / "analysis" / "gradcam.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["label_name"] for r in rows} == set(CLASSES) and (run / "analysis" / "gradcam.png").is_file()


def test_a_model_that_cannot_be_built_is_one_line(tmp_path, capsys) -> None:
    make_folder(tmp_path / "pets", per_class=1, val=1)
    base = [
        "train",
        "data.name=folder",
        f"data.root={tmp_path / 'pets'}",
        f"out_dir={tmp_path}",
        "engine.device=cpu",
    ]
    for backbone, words in (
        ("torchvision:resnet7", "torchvision has no model 'resnet7'"),
        ("no_such_package.nets:make", "cannot import"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main([*base, f"model.backbone={backbone}"])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1
    with pytest.raises(SystemExit):
        main(
            [
                *base,
                "model.backbone=torchvision:resnet18",
                "model.cut_at=[layer2.0.conv2]",
                "model.num_blocks=2",
            ]
        )
    assert "skip connection" in capsys.readouterr().err
