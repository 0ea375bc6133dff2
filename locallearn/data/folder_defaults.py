"""Defaults for ``data.name=folder``: sized to the folder, not ImageNet's recipe (issue 28.9).

The dataclass defaults are the papers' CIFAR / ImageNet values (batch 1024, lr 0.8, 400 epochs, 10
warm-up epochs, K=16): on a folder of a few hundred images a batch of 1024 is the whole set, one
step an epoch, and 400 such steps at lr 0.8 diverge or stay at chance. A folder run instead starts
from values computed from its training image count ``n`` (every value the user gives, in a YAML file or
on the command line, still wins):

- ``data.batch_size``: the largest power of two up to n / 6 (about six steps an epoch or more), in 8..128;
  ``data.test_batch_size`` twice that;
- ``optim.lr``: 0.1 x batch / 32 (SGD with Nesterov momentum, linear in the batch);
- ``optim.epochs``: enough epochs for about 200 steps, in 10..100; ``optim.warmup_epochs`` 1 from
  ``optim.warmup_lr`` = lr / 10;
- ``method.name``: ``dgl`` (the smallest aux net: a few hundred images do not feed InfoPro's decoder;
  measured at chance on the 100-image folder of ``examples/digits_folder.py``, docs/usage.md);
- ``model.num_blocks``: 4 (a model split at its stages has 5 layers).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from locallearn.config import Config, to_dict

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
TARGET_STEPS = 200  # optimizer steps the default schedule aims at
MIN_EPOCHS, MAX_EPOCHS = 10, 100


def count_images(train_dir: Path) -> int:
    """Image files under ``train_dir`` (links not followed: an estimate, the reader counts exactly)."""
    return sum(1 for _, _, files in os.walk(train_dir) for f in files if f.lower().endswith(IMAGE_EXTENSIONS))


def small_data_values(n: int, batch: int | None = None) -> dict[str, Any]:
    """The folder defaults for ``n`` training images, as a nested config mapping; ``batch``: the batch
    the user chose, which the learning rate and the epochs then follow."""
    if batch is None:
        batch = min(max(2 ** int(math.log2(max(n / 6, 1))), 8), 128)
    steps = math.ceil(n / batch)
    epochs = min(max(math.ceil(TARGET_STEPS / steps), MIN_EPOCHS), MAX_EPOCHS)
    lr = 0.1 * batch / 32
    return {
        "method": {"name": "dgl"},
        "model": {"num_blocks": 4},
        "data": {"batch_size": batch, "test_batch_size": 2 * batch},
        "optim": {"lr": lr, "epochs": epochs, "warmup_epochs": 1.0, "warmup_lr": lr / 10},
    }


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "options":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def folder_defaults(load, cfg: Config) -> tuple[Config, str | None]:
    """``cfg`` again with the folder defaults under what the user gave, and the log line that says which
    were taken and why (None when ``cfg`` is not folder data or its folder has no ``train/``).
    ``load(base)`` resolves the user's config over ``base`` (``config.load_config`` with their file
    and overrides), so a value the user set is never replaced, even one equal to a dataclass default."""
    train = Path(cfg.data.root).expanduser() / "train"
    if cfg.data.name != "folder" or not train.is_dir():
        return cfg, None  # a missing folder is reported by the reader
    n = count_images(train)
    if cfg.data.train_subset:
        n = min(n, cfg.data.train_subset)
    if n == 0:
        return cfg, None
    batch = small_data_values(n)["data"]["batch_size"]
    ours = load(small_data_values(n))  # (load_config merges the overrides into the mapping it is given)
    if ours.data.batch_size != batch:  # the user's batch: lr and epochs follow it
        ours = load(small_data_values(n, ours.data.batch_size))
    before, after = _flat(to_dict(cfg)), _flat(to_dict(ours))
    taken = [f"{k}={after[k]:g}" if isinstance(after[k], float) else f"{k}={after[k]}" for k in after]
    taken = [t for t, k in zip(taken, after) if after[k] != before[k]]
    if not taken:
        return cfg, None
    return ours, (
        f"folder data with {n} training images: small-data defaults {', '.join(taken)} (instead of the "
        "ImageNet recipe: batch 1024, lr 0.8, 400 epochs; set any of them to change it)"
    )
