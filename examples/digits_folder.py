"""Write a small ImageFolder tree to try ``data.name=folder`` on: 4 classes (the digits 0-3 of
scikit-learn's bundled 8x8 digits), 25 training and 10 validation images per class, each upscaled to
64x64 RGB and tinted a random colour (the colour says nothing about the class).

    python examples/digits_folder.py photos        # photos/train/<class>/*.png, photos/val/<class>/*.png
    locallearn train model.backbone=torchvision:mobilenet_v3_small data.name=folder data.root=photos data.image_size=96

The measured result of that command is in docs/usage.md ("Folder data: small-data defaults").
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

CLASSES = ("zero", "one", "two", "three")


def write_digits_folder(
    root: str | Path, train: int = 25, val: int = 10, size: int = 64, seed: int = 0
) -> Path:
    """``root/train/<class>/*.png`` (``train`` per class) and ``root/val/<class>/*.png`` (``val`` per class)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = Path(root)
    digits = load_digits()
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        images = digits.images[digits.target == c][: train + val] / 16.0  # 8x8 in [0, 1]
        for i, image in enumerate(images):
            split = "train" if i < train else "val"
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            ink, paper = rng.uniform(0.5, 1.0, 3), rng.uniform(0.0, 0.4, 3)
            rgb = paper + image[..., None] * (ink - paper)  # a random ink on a random paper colour
            pixels = Image.fromarray((rgb * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
            pixels.save(folder / f"{i:03d}.png")
    return root


if __name__ == "__main__":
    out = write_digits_folder(sys.argv[1] if len(sys.argv) > 1 else "photos")
    print(f"wrote {out}/train and {out}/val: 4 classes, 25 + 10 images each, 64x64 PNG")
