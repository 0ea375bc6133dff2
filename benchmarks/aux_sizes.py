"""Aux parameters / backbone parameters of each method's default build, on every listed backbone and on
models from outside the papers' tables (issue 26 §2). Measured by building each model, not computed by
hand; the listed backbones are built on the meta device (same shapes, no weights drawn).

    python benchmarks/aux_sizes.py     # writes benchmarks/results/aux_sizes.md and its section of docs/benchmarks.md

Parameters count the backbone with its classifier, and all aux parameters (frozen EMA copies included).
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import torch

from locallearn.build import build_model, method_names
from locallearn.config import load_config
from locallearn.types import InputInfo

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "aux_sizes.md"
DOC = ROOT / "docs" / "benchmarks.md"
BLOCK = re.compile(r"(<!-- results:aux_sizes -->\n)(.*?)(<!-- /results:aux_sizes -->)", re.S)

CIFAR = ("resnet20", "resnet32", "resnet56", "resnet110")
IMAGENET = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
    "resnet50_d8", "resnet101_d8", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19",
    "vgg19_bn", "vit_tiny", "vit_small", "vit_base",
)  # fmt: skip
# (model, image size, classes, K): the rows first
OUTSIDE = (
    ("torchvision:shufflenet_v2_x0_5", 72, 4, 3),
    ("torchvision:mobilenet_v3_small", 96, 1000, 3),
    ("torchvision:efficientnet_b0", 224, 1000, 4),
    ("torchvision:resnet50", 224, 1000, 4),
    ("torchvision:mobilenet_v2", 224, 1000, 4),
    ("torchvision:resnet18", 224, 1000, 4),
    ("torchvision:regnet_y_400mf", 224, 1000, 4),
    ("timm:resnet18", 224, 1000, 4),
)
METHODS = [m for m in method_names() if m != "bp"]


def rows() -> list[tuple[str, int, int, int, bool]]:
    listed = [(b, 32, 10, 4, True) for b in CIFAR] + [(b, 224, 1000, 4, True) for b in IMAGENET]
    return listed + [(*o, False) for o in OUTSIDE]


def ratios(model: str, size: int, classes: int, k: int, meta: bool) -> tuple[int, list[str]]:
    cells, backbone = [], 0
    for method in METHODS:
        cfg = load_config(None, [f"model.backbone={model}", f"method.name={method}", f"model.num_blocks={k}"])
        inputs = InputInfo(3, size, (0.5,) * 3, (0.5,) * 3)
        torch.manual_seed(0)
        try:
            with torch.device("meta" if meta else "cpu"):
                counts = build_model(cfg, inputs, classes)[0].parameter_counts()
        except ValueError as e:  # a method that refuses this backbone (token features, ...)
            cells.append("–")
            print(f"{model} {method}: {str(e).splitlines()[0][:120]}", file=sys.stderr)
            continue
        backbone = counts["backbone"]
        cells.append(f"{counts['aux'] / backbone:.2f}")
    return backbone, cells


def table() -> str:
    head = "| model | px | classes | K | backbone | " + " | ".join(METHODS) + " |"
    lines = [head, "|" + "---|" * 4 + "---:|" * (1 + len(METHODS))]
    for model, size, classes, k, listed in rows():
        backbone, cells = ratios(model, size, classes, k, listed)
        name = model if listed else f"`{model}`"
        lines.append(
            f"| {name} | {size} | {classes} | {k} | {backbone / 1e6:.2f} M | " + " | ".join(cells) + " |"
        )
        print(lines[-1], flush=True)
    note = (
        "\nCells: aux parameters / backbone parameters (classifier included) of the default build, even "
        "split; listed backbones as the papers size their aux nets, `torchvision:` / `timm:` models with "
        "the sizes of `locallearn/aux_budget.py`. '–': the method refuses the backbone. "
        "Produced by `python benchmarks/aux_sizes.py`.\n"
    )
    return "\n".join(lines) + "\n" + note


def main() -> None:
    logging.disable(logging.WARNING)  # the build's own warning for each cell over 1.0
    text = table()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    try:  # run as a script (benchmarks/ on sys.path) or as a module of the benchmarks package
        from update_readme import render
    except ImportError:
        from benchmarks.update_readme import render
    DOC.write_text(BLOCK.sub(lambda m: m[1] + render("aux_sizes", "../") + m[3], DOC.read_text()))
    print(text)  # a script, not library code


if __name__ == "__main__":
    main()
