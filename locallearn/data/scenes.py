"""``digit_scenes``: a detection and segmentation dataset generated in memory from data that ships with
the install, so that a dense learning proof can score on objects it never trained on, offline.

Each scene is a ``size`` x ``size`` RGB image: a smooth random colour field with a finer grey texture
and pixel noise, onto which 1..``objects`` of scikit-learn's 8x8 digits (1,797 of them,
``sklearn.datasets.load_digits``) are pasted, each upscaled (bilinear) to a random side in
``min_digit..max_digit`` px, in a random colour whose brightness is opposite to the background under it,
at a random place where it overlaps no other digit (a digit that finds no free place in 20 draws is left
out, so a scene may hold fewer). A digit's pixels are those where its upscaled ink is above half of the
maximum (16); they are its segmentation mask, and its box is the tight box around them (xyxy, continuous
pixels: ``x2 = last column + 1``), so boxes and masks agree exactly.

The split is **by source digit**: ``test_fraction`` of each class's source digits (drawn from ``seed``)
are used only by the test scenes, the rest only by the training scenes; test objects were never seen.
The training and test scenes come from their own streams of the seed, and every scene from its own
child stream: neither split depends on the other's count, and the first N scenes of a split are the same
for any count >= N. Everything follows from ``data.scenes`` (config.py ``ScenesConfig``); the run's seed
plays no part.

Targets: detection as every detection dataset here (``DetectionDataset``: boxes, labels 0..9 = the digit,
COCO-scored test split); segmentation as ``SegmentationDataset`` (label maps, 0 = background, 1..10 =
digits 0..9, no ignored pixel). Neither flips its images (a mirrored digit is not that digit); the
segmentation training crop is the scene's size with random scales 0.75-1.25.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from locallearn.config import ScenesConfig
from locallearn.data.detection import DetectionDataset
from locallearn.data.errors import DataError
from locallearn.data.loader import first_images
from locallearn.data.segmentation import SegmentationDataset

NAME = "digit_scenes"
DIGITS = tuple(str(d) for d in range(10))
MEAN = (0.5, 0.5, 0.5)  # roughly the scenes' statistics (grey-centred backgrounds), fixed, not measured
STD = (0.25, 0.25, 0.25)
PLACE_TRIES = 20  # draws of a free place per digit before it is left out
INK = 0.5  # a pixel belongs to a digit where its upscaled ink is above this share of the maximum (16)


@dataclass
class Scenes:
    """One split as arrays: ``images`` (N, S, S, 3) uint8, ``label_maps`` (N, S, S) uint8 (0 =
    background, d + 1 = digit d), and per scene its ``boxes`` (n, 4) xyxy float32, ``labels`` (n,) int64
    and ``sources`` (n,) int64: the index in ``load_digits()`` of each pasted digit."""

    images: np.ndarray
    label_maps: np.ndarray
    boxes: list[np.ndarray]
    labels: list[np.ndarray]
    sources: list[np.ndarray]


def source_split(targets: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A boolean mask over the source digits: ``fraction`` of each class (at least one) for test."""
    test = np.zeros(len(targets), bool)
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(targets == c))
        test[idx[: max(1, round(len(idx) * fraction))]] = True
    return test


def backgrounds(size: int, rngs: list[np.random.Generator]) -> np.ndarray:
    """(len(rngs), size, size, 3) float32 in [0, 1], one scene per generator: a colour field from a 4x4
    grid plus a grey texture from a (size / 6)-grid, each bilinear-upsampled (smooth at two scales),
    plus uniform pixel noise."""
    fine_side = max(2, size // 6)
    draws = [(r.random((3, 4, 4), np.float32), r.random((1, fine_side, fine_side), np.float32)) for r in rngs]
    coarse = torch.from_numpy(np.stack([c for c, _ in draws]))
    fine = torch.from_numpy(np.stack([f for _, f in draws]))
    noise = torch.from_numpy(np.stack([r.random((size, size, 1), np.float32) for r in rngs]))
    img = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False).mul_(0.45)
    img += F.interpolate(fine, size=(size, size), mode="bilinear", align_corners=False).sub_(0.5).mul_(0.35)
    img = img.permute(0, 2, 3, 1).add_(noise.sub_(0.5).mul_(0.1)).add_(0.2).clamp_(0, 1)
    return img.contiguous().numpy()


def _overlaps(box: tuple[int, int, int, int], taken: list[tuple[int, int, int, int]]) -> bool:
    x1, y1, x2, y2 = box
    return any(x1 < b[2] and b[0] < x2 and y1 < b[3] and b[1] < y2 for b in taken)


def scenes(
    cfg: ScenesConfig,
    n: int,
    pool: np.ndarray,
    digits: np.ndarray,
    targets: np.ndarray,
    seq: np.random.SeedSequence,
) -> Scenes:
    """``n`` scenes whose digits are drawn from the source indices ``pool`` (``digits``: (1797, 8, 8)
    ink 0..16, ``targets``: their classes). Scene ``i`` draws from the ``i``-th child of ``seq`` only, so
    the first scenes stay the same whatever ``n`` is. Every draw is made first; the digits are then
    upscaled in one call per side (not one per digit) and pasted."""
    size = cfg.size
    rngs = [np.random.default_rng(s) for s in seq.spawn(n)]
    images = backgrounds(size, rngs)
    placed: list[list[tuple[int, int, int, int, np.ndarray]]] = []  # per scene: (source, side, x, y, tint)
    for rng in rngs:
        taken: list[tuple[int, int, int, int]] = []
        objs = []
        for _ in range(int(rng.integers(1, cfg.objects + 1))):
            s = int(pool[rng.integers(len(pool))])
            side = int(rng.integers(cfg.min_digit, cfg.max_digit + 1))
            tint = rng.random(3, dtype=np.float32) * 0.3
            for _ in range(PLACE_TRIES):  # the place: the pasted square overlaps no other digit's square
                x, y = (int(v) for v in rng.integers(0, size - side + 1, 2))
                if not _overlaps((x, y, x + side, y + side), taken):
                    taken.append((x, y, x + side, y + side))
                    objs.append((s, side, x, y, tint))
                    break
        placed.append(objs)
    ink = torch.from_numpy(digits.astype(np.float32) / 16)[:, None]
    alphas: dict[tuple[int, int], np.ndarray] = {}  # (source, side) -> (side, side) ink in [0, 1]
    for side in sorted({o[1] for objs in placed for o in objs}):
        srcs = sorted({o[0] for objs in placed for o in objs if o[1] == side})
        up = F.interpolate(ink[srcs], size=(side, side), mode="bilinear", align_corners=False)
        alphas.update(zip(((s, side) for s in srcs), up[:, 0].clamp(0, 1).numpy()))
    label_maps = np.zeros((n, size, size), np.uint8)
    boxes, labels, sources = [], [], []
    for i, objs in enumerate(placed):
        b, lab, src = [], [], []
        for s, side, x, y, tint in objs:
            alpha = alphas[(s, side)]
            mask = alpha > INK
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            if not len(rows):  # an upscaled digit without a pixel above INK (none in sklearn's set)
                continue
            patch = images[i, y : y + side, x : x + side]
            # a random tint, bright on a dark background and dark on a bright one (under the digit)
            colour = tint + (0.7 if patch.mean() < 0.5 else 0.0)
            patch[:] = patch * (1 - alpha[..., None]) + colour * alpha[..., None]
            label_maps[i, y : y + side, x : x + side][mask] = targets[s] + 1
            b.append((x + cols[0], y + rows[0], x + cols[-1] + 1, y + rows[-1] + 1))
            lab.append(int(targets[s]))
            src.append(s)
        boxes.append(np.array(b, np.float32).reshape(-1, 4))
        labels.append(np.array(lab, np.int64))
        sources.append(np.array(src, np.int64))
    pixels = np.round(images * 255).astype(np.uint8)
    return Scenes(pixels, label_maps, boxes, labels, sources)


def generate(cfg: ScenesConfig) -> tuple[Scenes, Scenes]:
    """(train, test) scenes of ``cfg``; the same ``cfg`` gives the same arrays."""
    from sklearn.datasets import load_digits

    d = load_digits()
    split_seq, train_seq, test_seq = np.random.SeedSequence(cfg.seed).spawn(3)
    test = source_split(d.target, cfg.test_fraction, np.random.default_rng(split_seq))
    return (
        scenes(cfg, cfg.train_images, np.flatnonzero(~test), d.images, d.target, train_seq),
        scenes(cfg, cfg.test_images, np.flatnonzero(test), d.images, d.target, test_seq),
    )


# ------------------------------------------------------------------------------------ the two views


@dataclass
class SceneDetection(DetectionDataset):
    """A ``DetectionDataset`` whose images are in memory (``pixels``, (N, S, S, 3) uint8), not files."""

    pixels: np.ndarray | None = None
    sources: list[np.ndarray] = field(default_factory=list)

    def subset(self, n: int | None) -> SceneDetection:
        lists = (
            "files",
            "image_ids",
            "sizes",
            "boxes",
            "labels",
            "ignored",
            "ignored_labels",
            "pixels",
            "sources",
        )
        return first_images(self, n, lists)

    def check_files(self) -> None:
        """Nothing to check: the images are generated, not read."""

    def read_image(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.pixels[i]).permute(2, 0, 1)


@dataclass
class SceneSegmentation(SegmentationDataset):
    """A ``SegmentationDataset`` over arrays: ``images`` (N, S, S, 3) uint8, ``labels`` (N, S, S) uint8."""

    def check_files(self) -> None:
        """Nothing to check: the label values are class ids by construction."""

    def read(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = torch.from_numpy(self.images[i]).permute(2, 0, 1).contiguous()
        return img, torch.from_numpy(self.labels[i].astype(np.int64))


def detection_split(s: Scenes, split: str, size: int) -> SceneDetection:
    n = len(s.images)
    return SceneDetection(
        NAME,
        DIGITS,
        [Path(f"{NAME}_{split}_{i:06d}.png") for i in range(n)],  # names only (COCO's file_name)
        list(range(1, n + 1)),
        [(size, size)] * n,
        s.boxes,
        s.labels,
        list(range(1, 11)),
        min_size=size,
        mean=MEAN,
        std=STD,
        flip=False,
        pixels=s.images,
        sources=s.sources,
    )


def segmentation_split(s: Scenes, size: int) -> SceneSegmentation:
    return SceneSegmentation(
        NAME,
        ("background", *DIGITS),
        s.images,
        s.label_maps,
        crop_size=size,
        scale_range=(0.75, 1.25),
        mean=MEAN,
        std=STD,
        flip=False,
    )


TASKS = ("detection", "segmentation")


def digit_scenes(cfg: ScenesConfig | None = None, task: str | None = None) -> tuple:
    """(train, test) ``digit_scenes`` for ``task`` (detection, the default, or segmentation)."""
    cfg = cfg or ScenesConfig()
    task = task or "detection"
    if task not in TASKS:
        raise DataError(f"{NAME} holds boxes and label maps for {' and '.join(TASKS)}, not for {task}")
    train, test = generate(cfg)
    if task == "detection":
        return detection_split(train, "train", cfg.size), detection_split(test, "test", cfg.size)
    return segmentation_split(train, cfg.size), segmentation_split(test, cfg.size)
