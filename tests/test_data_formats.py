"""Dataset readers on fixture files written in the real on-disk formats; the batch loader."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from locallearn.data import DataError, Loader, load_datasets


def write_cifar10(root, n=20):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = list(rng.integers(0, 10, n))
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels, "batch_label": name}, f)
        images[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    return images


def test_cifar10_pickles(tmp_path):
    written = write_cifar10(tmp_path)
    train, test = load_datasets("cifar10", str(tmp_path))
    assert len(train) == 100 and len(test) == 20
    assert train.images.shape == (100, 3, 32, 32) and train.images.dtype == torch.uint8
    data, labels = written["data_batch_2"]
    # CIFAR rows are R plane, G plane, B plane of 32x32 each
    assert torch.equal(train.images[20], torch.from_numpy(data[0].reshape(3, 32, 32)))
    assert train.labels[20].item() == labels[0]
    assert train.augment.pad_mode == "reflect" and train.augment.flip


def test_cifar100_pickles(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, n in (("train", 12), ("test", 6)):
        data = np.full((n, 3072), 7, dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "fine_labels": list(range(88, 88 + n)), "coarse_labels": [0] * n}, f)
    train, test = load_datasets("cifar100", str(tmp_path))
    assert train.num_classes == 100 and train.labels.tolist() == list(
        range(88, 100)
    )  # labels < 100 (issue 14)


def test_svhn_mat(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(1)
    for split, n in (("train", 10), ("test", 4)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = np.array([[10]] + [[i] for i in range(1, n)], dtype=np.uint8)  # 10 means digit 0
        savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": y})
        if split == "train":
            first = x[..., 0]
    train, test = load_datasets("svhn", str(tmp_path))
    assert train.images.shape == (10, 3, 32, 32) and len(test) == 4
    assert train.labels[:3].tolist() == [0, 1, 2]
    assert torch.equal(train.images[0], torch.from_numpy(first.transpose(2, 0, 1).copy()))
    assert not train.augment.flip and train.augment.pad == 2


def test_stl10_binary(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    img = np.arange(3 * 96 * 96, dtype=np.uint32).astype(np.uint8).reshape(3, 96, 96)
    for split, n in (("train", 3), ("test", 2)):
        # the official files are column-major: each channel stored transposed
        np.stack([img] * n).transpose(0, 1, 3, 2).tofile(folder / f"{split}_X.bin")
        np.arange(1, n + 1, dtype=np.uint8).tofile(folder / f"{split}_y.bin")
    train, test = load_datasets("stl10", str(tmp_path))
    assert train.images.shape == (3, 3, 96, 96)
    assert torch.equal(train.images[1], torch.from_numpy(img))
    assert train.labels.tolist() == [0, 1, 2]


def write_idx(path, array):
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx(tmp_path):
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for prefix, n in (("train", 6), ("t10k", 3)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", np.full((n, 28, 28), 200))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n))
    train, test = load_datasets("fashion_mnist", str(tmp_path))
    assert train.images.shape == (6, 1, 32, 32)  # padded to CIFAR size
    assert train.images[0, 0, 0, 0] == 0 and train.images[0, 0, 2, 2] == 200
    assert test.labels.tolist() == [0, 1, 2]


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "stl10"])
def test_missing_dataset_says_where_and_how(tmp_path, name):
    with pytest.raises(DataError, match="data.download=true"):
        load_datasets(name, str(tmp_path / "empty"))


def test_unknown_dataset():
    with pytest.raises(DataError, match="choose from"):
        load_datasets("imagenet22k")


def test_corrupt_file_is_a_data_error(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataError, match="cannot read"):
        load_datasets("cifar10", str(tmp_path))


def test_digits_split_and_loader():
    train, test = load_datasets("digits")
    assert len(train) + len(test) == 1797 and train.images.shape[1:] == (1, 8, 8)
    loader = Loader(train, 256, train=True, seed=3)
    loader.set_epoch(1)
    first = [b.x for b in loader]
    loader.set_epoch(1)
    again = [b.x for b in loader]
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # an epoch is reproducible
    loader.set_epoch(2)
    assert not torch.equal(next(iter(loader)).x, first[0])
    batch = next(iter(Loader(test, 10, train=False)))
    assert batch.x.shape == (10, 1, 8, 8)
    torch.testing.assert_close(batch.image, test.images[:10].float() / 255)


def test_subset_is_class_balanced():
    train, _ = load_datasets("digits")
    sub = train.subset(100)
    assert len(sub) == 100 and torch.bincount(sub.labels).tolist() == [10] * 10
