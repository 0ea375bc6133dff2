"""Super-resolution data: DIV2K and HR-folder fixtures in the real layout read back, patch / HR
alignment under augmentation, whole-image evaluation batches, registry names, CLI train + eval."""

import numpy as np
import pytest
import torch
from PIL import Image

from locallearn.data import load_datasets
from locallearn.data.datasets import DataError
from locallearn.data.imagefolder import make_loader
from locallearn.data.super_resolution import SRLoader, augment, bicubic_lr


def image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_div2k(root, scale: int, sizes=((120, 104), (100, 132)), valid=((96, 112),)) -> None:
    """DIV2K_{train,valid}_HR/NNNN.png and DIV2K_{split}_LR_bicubic/X{s}/NNNNx{s}.png."""
    for split, shapes, first in (("train", sizes, 1), ("valid", valid, 801)):
        hr_dir, lr_dir = root / f"DIV2K_{split}_HR", root / f"DIV2K_{split}_LR_bicubic" / f"X{scale}"
        hr_dir.mkdir(parents=True)
        lr_dir.mkdir(parents=True)
        for i, (h, w) in enumerate(shapes):
            lr, hr = bicubic_lr(image(h, w, first + i), scale)
            Image.fromarray(hr).save(hr_dir / f"{first + i:04d}.png")
            Image.fromarray(lr).save(lr_dir / f"{first + i:04d}x{scale}.png")


@pytest.mark.parametrize("scale", [2, 4])
def test_div2k_layout_reads_back(tmp_path, scale):
    write_div2k(tmp_path, scale)
    name = "div2k" if scale == 2 else f"div2k_x{scale}"
    train, test = load_datasets(name, str(tmp_path))
    assert (train.images, test.images, train.scale) == (2, 1, scale)
    assert [p.name for p in train.hr_files] == ["0001.png", "0002.png"]
    lr, hr = train.pair(1)
    assert hr.shape == (3, 100 // scale * scale, 132 // scale * scale)
    assert lr.shape == (3, 100 // scale, 132 // scale) and lr.dtype == torch.uint8
    assert torch.equal(lr, torch.from_numpy(np.array(Image.open(train.lr_files[1]))).permute(2, 0, 1))
    (batch,) = list(make_loader(test, 4, False))  # whole images, one per batch
    assert batch.x.shape == (1, 3, 96 // scale, 112 // scale)
    assert batch.y.shape == (1, 3, 96 // scale * scale, 112 // scale * scale)
    assert 0 <= batch.x.min() and batch.x.max() <= 1 and torch.equal(batch.image, batch.x)


def test_div2k_missing_files_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="DIV2K_train_HR"):
        load_datasets("div2k", str(tmp_path))
    write_div2k(tmp_path, 2)
    next((tmp_path / "DIV2K_train_LR_bicubic" / "X2").iterdir()).unlink()
    with pytest.raises(DataError, match="LR images missing"):
        load_datasets("div2k", str(tmp_path))


def test_training_patches_match_their_hr_crops(tmp_path):
    """LR patches are the bicubic down-scaling of their HR patches (up to the 4-pixel kernel border)."""
    s, p = 2, 16
    folder = tmp_path / "hr"
    folder.mkdir()
    for i in range(3):  # a smooth image, so bicubic down-scaling is local
        yy, xx = np.mgrid[0:80, 0:96]
        img = np.stack([(np.sin(xx / (7 + i)) + np.cos(yy / 9)) * 60 + 128] * 3, -1).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i}.png")
    train, _ = load_datasets("sr_folder", str(folder))
    train.patch = p
    loader = SRLoader(train, 4, True, seed=3)
    batches = list(loader)
    assert len(batches) == len(loader) == -(-len(train) // 4) and len(train) == 3 * train.repeat
    for b in batches:
        assert b.x.shape[1:] == (3, p, p) and b.y.shape[1:] == (3, p * s, p * s)
        down = torch.nn.functional.avg_pool2d(b.y, s)[..., 2:-2, 2:-2]
        assert (down - b.x[..., 2:-2, 2:-2]).abs().mean() < 0.01  # one LR pixel off: 0.03
    again = list(SRLoader(train, 4, True, seed=3))
    assert all(torch.equal(a.x, b.x) and torch.equal(a.y, b.y) for a, b in zip(batches, again))


def test_augment_moves_lr_and_hr_together():
    lr = torch.arange(16.0).view(1, 4, 4)
    hr = lr.repeat_interleave(2, 1).repeat_interleave(2, 2)
    for seed in range(8):
        a, b = augment(lr, hr, torch.Generator().manual_seed(seed))
        assert torch.equal(b[:, ::2, ::2], a)


def test_folder_without_splits_is_both_and_photos_hold_out_rocket(tmp_path):
    pytest.importorskip("skimage")
    folder = tmp_path / "Set5"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(image(64, 72, i)).save(folder / f"img{i}.png")
    train, test = load_datasets("sr_folder_x3", str(folder))
    assert train.hr_files == test.hr_files and train.scale == 3
    lr, hr = test.pair(0)
    assert lr.shape == (3, 21, 24) and hr.shape == (3, 63, 72)
    train, test = load_datasets("skimage_photos_x4", str(tmp_path))
    assert [p.stem for p in train.hr_files] == ["astronaut", "chelsea", "coffee"]
    assert [p.stem for p in test.hr_files] == ["rocket"]
    assert (tmp_path / "skimage_photos" / "test" / "rocket.png").exists()
    with pytest.raises(DataError, match="no image"):
        load_datasets("sr_folder", str(tmp_path / "nothing"))
