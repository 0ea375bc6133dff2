"""What every analysis shares: a trained model rebuilt from its run directory, the images the runs are
compared on, pooled per-layer features, and the CSV + figure writers.

Analyses never retrain: a run directory holds the resolved config and ``checkpoint.pt`` (run/single.py),
which is all it takes to rebuild the exact ``LocalModel``.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from locallearn.build import build_model
from locallearn.config import Config, ConfigError, ScenesConfig
from locallearn.data import load_datasets
from locallearn.data.imagefolder import make_loader
from locallearn.engine import checkpoint
from locallearn.model import LocalModel
from locallearn.resume import config_from_checkpoint
from locallearn.trainer import select_device
from locallearn.types import Batch


@dataclasses.dataclass
class LoadedRun:
    run_dir: Path
    cfg: Config
    model: LocalModel  # eval mode, on the analysis device
    epoch: int
    label: str = ""  # legend / row title

    @property
    def fmts(self) -> list[str]:
        return [info.fmt for info in self.model.backbone.feature_info]


def checkpoint_path(run_dir: str | Path) -> Path:
    """``RUN_DIR/checkpoint.pt`` (or the file itself); a clear error for anything else."""
    path = Path(run_dir)
    if not path.exists():
        raise ConfigError(f"run directory {str(path)!r} does not exist")
    ckpt = path / "checkpoint.pt" if path.is_dir() else path
    if not ckpt.is_file():
        hint = (
            " (a pipeline run: analyses read single-process runs)"
            if any(path.glob("checkpoint.rank*.pt"))
            else ""
        )
        raise ConfigError(f"{str(path)!r} is not a run directory: no checkpoint.pt{hint}")
    return ckpt


def run_config(run_dir: str | Path) -> Config:
    """The resolved config of a run, without building its model."""
    return config_from_checkpoint(checkpoint.load(checkpoint_path(run_dir)))


def load_run(
    run_dir: str | Path,
    device: torch.device,
    data_root: str | None = None,
    state: dict[str, Any] | None = None,
) -> LoadedRun:
    """Rebuild the model of a run from its config and load the trained weights (no data read)."""
    ckpt = checkpoint_path(run_dir)
    state = state if state is not None else checkpoint.load(ckpt)
    cfg = config_from_checkpoint(state)
    if data_root is not None:
        cfg.data.root = data_root
    info, num_classes = data_shape(cfg)
    model, _, _ = build_model(cfg, info, num_classes, load_weights=False)  # the run's weights come next
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as e:
        raise checkpoint.CheckpointError(
            f"{str(ckpt)!r}: weights do not fit the model in its config ({e})"
        ) from None
    model.to(device).eval()
    return LoadedRun(ckpt.parent, cfg, model, int(state["epoch"]))


@functools.lru_cache(maxsize=2)
def datasets(
    name: str, root: str, image_size: int | None = None, mean=None, std=None, task=None, scenes=None
):
    """(train, test) of a dataset, read once per process: every run of an analysis shares them.
    ``image_size``, ``mean``, ``std`` (tuples): the folder readers' options; ``task`` and ``scenes``
    (``ScenesConfig`` fields as a tuple): digit_scenes' (``load_datasets``)."""
    scenes = ScenesConfig(*scenes) if scenes is not None else None
    return load_datasets(name, root, False, image_size, mean and list(mean), std and list(std), task, scenes)


def run_datasets(cfg: Config):
    """``datasets`` for a run's config (its data section's name, root, size, normalisation, scenes)."""
    d = cfg.data
    mean, std = d.mean and tuple(d.mean), d.std and tuple(d.std)
    return datasets(d.name, d.root, d.image_size, mean, std, cfg.task.name, dataclasses.astuple(d.scenes))


def dataset_name(cfg: Config) -> str:
    """The run's data as titles name it: folder data by its folder's name, others by ``data.name``."""
    return run_datasets(cfg)[1].name if cfg.data.name == "folder" else cfg.data.name


def data_shape(cfg: Config):
    """(InputInfo, num_classes) of the run's dataset."""
    train, _ = run_datasets(cfg)
    return train.info, train.num_classes


def load_runs(
    run_dirs: Sequence[str | Path], device: str = "auto", data_root: str | None = None
) -> list[LoadedRun]:
    """Every run, checked to be on the same data and backbone, with distinct labels."""
    paths = [checkpoint_path(d) for d in run_dirs]  # every path is checked before anything is read
    states = [checkpoint.load(p) for p in paths]
    cfgs = [config_from_checkpoint(s) for s in states]
    for p, cfg in zip(paths[1:], cfgs[1:]):
        if cfg.data.name != cfgs[0].data.name:
            raise ConfigError(
                f"runs use different data: {paths[0].parent.name} is on {cfgs[0].data.name}, "
                f"{p.parent.name} on {cfg.data.name}; an analysis compares runs on the same images"
            )
        if cfg.model.backbone != cfgs[0].model.backbone:
            raise ConfigError(
                f"runs use different backbones: {paths[0].parent.name} is a {cfgs[0].model.backbone}, "
                f"{p.parent.name} a {cfg.model.backbone}; layer-by-layer analyses need one backbone"
            )
    dev = select_device(device)
    runs = [load_run(p, dev, data_root, s) for p, s in zip(paths, states)]
    labels = [f"{r.cfg.method.name} K={r.model.num_blocks}" for r in runs]
    for r, label in zip(runs, labels):
        r.label = label if labels.count(label) == 1 else r.run_dir.name
    return runs


def images(cfg: Config, n: int | None, batch_size: int, train: bool = False) -> Iterator[Batch]:
    """The first ``n`` (class-balanced, fixed) test or training images, un-augmented, in a fixed order."""
    train_set, test_set = run_datasets(cfg)
    data = (train_set if train else test_set).subset(n)
    return iter(make_loader(data, batch_size, False))


def pool(h: torch.Tensor, fmt: str) -> torch.Tensor:
    """One vector per image: global average pool of an ``NCHW`` map, the class token of ``NLC`` tokens."""
    return h[:, 0] if fmt == "NLC" else F.adaptive_avg_pool2d(h, 1).flatten(1)


@torch.no_grad()
def pooled_features(model: LocalModel, x: torch.Tensor) -> list[torch.Tensor]:
    """The pooled output of every backbone layer (float32), in layer order."""
    out, h = [], x
    for layer, info in zip(model.backbone.layers, model.backbone.feature_info):
        h = layer(h)
        out.append(pool(h, info.fmt).float())
    return out


# -- writers -------------------------------------------------------------------------------------


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def out_dir(args: Any) -> Path:
    """``--out`` or ``FIRST_RUN/analysis``."""
    path = Path(args.out) if args.out else Path(args.runs[0]) / "analysis"
    path.mkdir(parents=True, exist_ok=True)
    return path
