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


def test_symlink_loops_and_links_out_of_a_class_are_skipped_with_a_warning(tmp_path, caplog) -> None:
    """Issue 28.10: torchvision follows links blindly (a loop counted every image many times, some under
    the wrong class). Each image counts once, under the class folder it is in."""
    make_tree(tmp_path, per_class=3)
    cat = tmp_path / "train" / "cat"
    (cat / "loop").symlink_to(tmp_path / "train")  # cat/loop/dog/0.png would be a dog filed as a cat
    (cat / "self").symlink_to(cat)
    (cat / "dog0.png").symlink_to(tmp_path / "train" / "dog" / "0.png")
    (cat / "again.png").symlink_to(cat / "1.png")
    (tmp_path / "train" / "all").symlink_to(tmp_path / "train")  # a class folder that is the split itself
    with caplog.at_level("WARNING", logger="locallearn"):
        train, _ = load_datasets("folder", str(tmp_path))
    assert train.classes == ["cat", "dog"]
    assert len(train) == 6 and sorted(train.targets) == [0, 0, 0, 1, 1, 1]
    paths = [p for p, _ in train.folder.samples]
    assert all(("/cat/" in p) == (t == 0) for p, t in train.folder.samples) and len(set(paths)) == 6
    (line,) = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert "skipped 5 link(s)" in line


def test_a_folder_with_one_class_is_refused(tmp_path) -> None:
    """Issue 28.13: one class trains to 100 % without learning anything."""
    make_tree(tmp_path, classes=("cat",))
    with pytest.raises(DataError, match="a classifier needs at least two classes"):
        load_datasets("folder", str(tmp_path))


def test_a_tree_without_links_reads_exactly_as_torchvision_reads_it(tmp_path) -> None:
    from torchvision.datasets import ImageFolder

    make_tree(tmp_path, per_class=2)
    for sub in ("a", "a b", "a/x"):  # nested folders whose walk order differs from their sorted order
        (tmp_path / "train" / "cat" / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "train" / "cat" / sub / "n.png")
    train, _ = load_datasets("folder", str(tmp_path))
    assert train.folder.samples == ImageFolder(str(tmp_path / "train")).samples
