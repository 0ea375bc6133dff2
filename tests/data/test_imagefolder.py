"""The `imagenet` dataset: an ImageFolder tree streamed through DataLoader workers, end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from locallearn.cli import main
from locallearn.data import load_datasets
from locallearn.data.datasets import DataError
from locallearn.data.imagefolder import make_loader


def make_tree(root, per_class: int = 3, classes: tuple[str, ...] = ("cat", "dog")) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 2)):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(d / f"{i}.png")


def test_imagefolder_batches(tmp_path) -> None:
    make_tree(tmp_path)
    train, val = load_datasets("imagenet", str(tmp_path))
    assert (len(train), len(val), train.num_classes, train.info.size) == (6, 4, 2, 224)
    loader = make_loader(train.subset(4), 3, True, seed=1)
    loader.set_epoch(0)
    batches = list(loader)
    assert len(loader) == len(batches) == 2
    assert batches[0].x.shape == (3, 3, 224, 224) and batches[0].mean.shape == (3, 1, 1)
    assert 0 <= batches[0].image.min() and batches[0].image.max() <= 1 + 1e-5
    assert sorted(torch.cat([b.y for b in batches]).tolist()) == [0, 0, 1, 1]  # class-balanced subset
    again = list(make_loader(train.subset(4), 3, True, seed=1))
    assert torch.equal(batches[0].y, again[0].y)  # shuffling is seeded by (seed, epoch)


def test_missing_tree_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(DataError, match="ImageFolder layout"):
        load_datasets("imagenet", str(tmp_path))


def test_train_resnet18_on_a_tiny_imagefolder(tmp_path) -> None:
    make_tree(tmp_path / "data")
    out = tmp_path / "runs"
    main(
        [
            "train",
            "model.backbone=resnet18",
            "model.num_blocks=2",
            "method.name=dgl+manpp",
            "data.name=imagenet",
            f"data.root={tmp_path / 'data'}",
            "data.batch_size=3",
            "data.test_batch_size=4",
            "optim.epochs=1",
            "engine.device=cpu",
            f"out_dir={out}",
            "name=tiny",
        ]
    )
    summary = json.loads((out / "tiny" / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["train_images"] == 6 and summary["final"] is not None
