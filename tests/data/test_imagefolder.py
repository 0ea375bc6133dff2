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


def test_folder_honours_image_size_and_keeps_class_names(tmp_path) -> None:
    """data.name=folder: 40x48 PNGs come out at the asked size, named after the folder and its classes."""
    make_tree(tmp_path / "pets", classes=("cat", "dog", "fox"))
    train, val = load_datasets("folder", str(tmp_path / "pets"), image_size=32)
    assert (train.name, train.classes, train.info.size, train.num_classes) == (
        "pets",
        ["cat", "dog", "fox"],
        32,
        3,
    )
    for data, is_train in ((train, True), (val, False)):
        batch = next(iter(make_loader(data, 4, is_train)))
        assert batch.x.shape == (4, 3, 32, 32)
    assert load_datasets("folder", str(tmp_path / "pets"), image_size=57)[1].info.size == 57
    assert load_datasets("folder", str(tmp_path / "pets"))[0].info.size == 224  # the default


def test_folder_normalisation_is_imagenet_unless_given(tmp_path) -> None:
    make_tree(tmp_path)
    train, _ = load_datasets("folder", str(tmp_path), image_size=16)
    assert train.info.mean == (0.485, 0.456, 0.406)
    train, _ = load_datasets("folder", str(tmp_path), image_size=16, mean=[0.5] * 3, std=[0.25] * 3)
    batch = next(iter(make_loader(train, 2, False)))
    assert torch.allclose(batch.x * 0.25 + 0.5, batch.image, atol=1e-6)
    with pytest.raises(DataError, match="data.mean / data.std apply to imagenet and folder"):
        load_datasets("digits", mean=[0.5], std=[0.5])
    with pytest.raises(DataError, match="3 values"):
        load_datasets("folder", str(tmp_path), mean=[0.5], std=[0.5])


def test_folder_refuses_different_classes_in_train_and_val(tmp_path) -> None:
    make_tree(tmp_path)
    (tmp_path / "val" / "dog").rename(tmp_path / "val" / "wolf")
    with pytest.raises(DataError, match="different class folders"):
        load_datasets("folder", str(tmp_path))
