"""Aux parameters / backbone parameters of each method's default build, on every listed backbone and on
models from outside the papers' tables (issue 26 §2). Measured by building each model, not computed by
hand; the listed backbones are built on the meta device (same shapes, no weights drawn).

    python benchmarks/aux_sizes.py     # writes benchmarks/results/aux_sizes.md and its section of docs/benchmarks.md
    python benchmarks/aux_sizes.py --totals   # whole-step total / bp: benchmarks/results/aux_totals.md + docs
    python benchmarks/aux_sizes.py --remedies # options tried on the cells above bp: aux_remedies.md + docs

The second table runs one training step per cell at batches 2 and 4 on random data (CPU), extrapolates
the saved bytes to batch 32 and measures backward's workspace at 32 (``step_total``); a few minutes.

Parameters count the backbone with its classifier, and all aux parameters (frozen EMA copies included).
"""

from __future__ import annotations

import argparse
import copy
import logging
import re
import sys
from pathlib import Path

import torch

from locallearn.bench.common import synthetic_batch, whole_step
from locallearn.build import build_model, method_names
from locallearn.config import load_config
from locallearn.engine.optim import build_optimizer
from locallearn.engine.sequential import train_step
from locallearn.metrics.step_memory import StepMemory, StepMeter
from locallearn.model import LocalModel
from locallearn.types import InputInfo

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "aux_sizes.md"
DOC = ROOT / "docs" / "benchmarks.md"
TOTALS_OUT = ROOT / "benchmarks" / "results" / "aux_totals.md"


def block(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- results:{name} -->\n)(.*?)(<!-- /results:{name} -->)", re.S)


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
# (model, image size, K) of the total / bp table: small images keep one CPU step cheap
TOTALS = (
    ("torchvision:shufflenet_v2_x0_5", 64, 3),
    ("torchvision:mobilenet_v3_small", 64, 3),
    ("torchvision:resnet18", 64, 4),
    ("torchvision:efficientnet_b0", 64, 4),
    ("torchvision:regnet_x_400mf", 64, 4),
    ("timm:resnet18d", 64, 4),
    ("torchvision:resnet18", 224, 4),  # the same model at ImageNet size: not a small-image artefact
)
TOTAL_CLASSES = 10
# (model, size, K, method, option): what each default choice for outside models buys (the option puts
# back the value it replaced) and the options tried on cells still above bp (``--remedies``)
REMEDY_ROWS = (
    ("torchvision:shufflenet_v2_x0_5", 64, 3, "infopro", "method.infopro.recon_at=input"),
    ("torchvision:shufflenet_v2_x0_5", 64, 3, "infopro+manpp", "method.infopro.recon_at=input"),
    ("torchvision:resnet18", 64, 4, "infopro", "method.infopro.recon_at=input"),
    ("torchvision:resnet18", 64, 4, "dgl+man", "method.momentum.copy=unit"),
    ("torchvision:resnet18", 64, 4, "infopro+manpp", "method.momentum.copy=unit"),
    ("torchvision:resnet18", 64, 4, "slm", "method.slm.width=16"),
    ("torchvision:shufflenet_v2_x0_5", 64, 3, "slm+manpp", "method.slm.bank=false"),
    ("torchvision:shufflenet_v2_x0_5", 64, 3, "mlaan", "method.mlaan.recompute=false"),
    ("torchvision:mobilenet_v3_small", 64, 3, "mlaan", "method.mlaan.recompute=false"),
    ("torchvision:shufflenet_v2_x0_5", 64, 3, "mlaan", "method.mlaan.ema=false"),
    ("torchvision:resnet18", 64, 4, "mlaan", "method.mlaan.recompute=false"),
    ("torchvision:resnet18", 224, 4, "slm", "method.slm.width=16"),
    ("torchvision:resnet18", 224, 4, "slm+manpp", "method.slm.width=16"),
    ("torchvision:resnet18", 224, 4, "slm+manpp", "method.slm.bank=false"),
    ("torchvision:resnet18", 224, 4, "mlaan", "method.mlaan.recompute=false"),
    ("torchvision:resnet18", 224, 4, "mlaan", "method.mlaan.ema=false"),
)
TOTAL_BATCH = 32  # the batch for "whole-step total below bp's"
FIT_BATCHES = (2, 4)  # the meter's saved bytes, measured here, are linear in the batch: extrapolated
# Backward's workspace is not affine at small batches (a fixed part wins below ~8 images, then the
# largest live tensors grow with the batch; with MLAAN's recompute the peak moves to block k-1's
# recomputation): measured at the table's batch itself (``whole_step`` with batches (at,))


def measure_build(
    model: str,
    method: str,
    k: int,
    size: int,
    classes: int,
    extra: tuple[str, ...] = (),
    backbone=None,
    at: int = TOTAL_BATCH,
) -> tuple[StepMemory, LocalModel, list[torch.optim.Optimizer]]:
    """The whole step (``metrics.step_memory``) of ``method``'s default build at batch ``at``,
    with the default optimizer (SGD, momentum 0.9, nesterov): one training step at each of ``FIT_BATCHES``
    under the step meter gives each block's saved bytes (extrapolated linearly to ``at``), and
    ``bench.common.whole_step`` measures backward's workspace at ``at`` itself. ``backbone``: an already
    split model (``external.from_spec``), deep-copied so each build trains its own. ``bp`` is K = 1.
    Returns the step, the model and its optimizers."""
    overrides = [f"model.backbone={model}", f"method.name={method}"]
    overrides += [f"model.num_blocks={1 if method == 'bp' else k}", *extra]
    cfg = load_config(None, overrides)
    inputs = InputInfo(3, size, (0.5,) * 3, (0.5,) * 3)
    torch.manual_seed(0)
    bb = copy.deepcopy(backbone) if backbone is not None else None
    net = build_model(cfg, inputs, classes, backbone=bb)[0]
    net.train()
    opts = [build_optimizer(net.block_parameters(b), cfg.optim) for b in range(net.num_blocks)]
    for opt in opts:  # random data: a small lr keeps the step finite (the bytes do not depend on it)
        for group in opt.param_groups:
            group["lr"] = 0.01
    saved = {}
    for n in FIT_BATCHES:
        meter = StepMeter(net)
        train_step(net, synthetic_batch(n, inputs, classes), opts, meter=meter)
        saved[n] = meter.block_bytes
    a, b = FIT_BATCHES
    per_block = [
        saved[a][i] + (saved[b][i] - saved[a][i]) / (b - a) * (at - a) for i in range(net.num_blocks)
    ]
    total = whole_step(  # backward's workspace measured at ``at`` itself (see WORKSPACE_BATCHES)
        net, opts, per_block, (at,), at,
        make_batch=lambda n: synthetic_batch(n, inputs, classes), group_steps=cfg.engine.group_steps,
    )  # fmt: skip
    return total, net, opts


def step_total(
    model: str, method: str, k: int, size: int, classes: int, extra: tuple[str, ...] = (), backbone=None
) -> int:
    """Whole-step peak total bytes of ``measure_build``'s step at batch ``TOTAL_BATCH``."""
    return measure_build(model, method, k, size, classes, extra, backbone)[0].peak_total_bytes


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


def totals_table() -> str:
    """Whole-step total / ``bp``'s per outside model and method (``step_total``)."""
    from locallearn.backbones import external

    head = "| model | px | K | bp total | " + " | ".join(METHODS) + " |"
    lines = [head, "|" + "---|" * 3 + "---:|" * (1 + len(METHODS))]
    over = []
    for model, size, k in TOTALS:
        split = external.from_spec(model, TOTAL_CLASSES, 3, size)
        bp = step_total(model, "bp", k, size, TOTAL_CLASSES, backbone=split)
        cells = []
        for method in METHODS:
            try:
                ratio = step_total(model, method, k, size, TOTAL_CLASSES, backbone=split) / bp
            except ValueError as e:
                cells.append("–")
                print(f"{model} {method}: {str(e).splitlines()[0][:120]}", file=sys.stderr)
                continue
            cells.append(f"**{ratio:.2f}**" if ratio > 1 else f"{ratio:.2f}")
            if ratio > 1:
                over.append(f"{model} {method}")
        lines.append(f"| `{model}` | {size} | {k} | {bp / 2**20:.1f} MiB | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    note = (
        f"\nCells: whole-step peak total (`locallearn.metrics.step_memory`: weights, buffers, gradients, "
        f"SGD momentum state, saved activations and backward's workspace, as the sequential engine "
        f"schedules them) of each method's default build over `bp`'s, at batch {TOTAL_BATCH} "
        f"(saved bytes measured at batches {FIT_BATCHES[0]} and {FIT_BATCHES[1]} and extrapolated, backward's "
        f"workspace measured at {TOTAL_BATCH}), "
        f"{TOTAL_CLASSES} classes, float32. **Bold**: above `bp` ({len(over)} of "
        f"{len(TOTALS) * len(METHODS)} cells). Produced by `python benchmarks/aux_sizes.py --totals`.\n"
    )
    return "\n".join(lines) + "\n" + note


def remedies_table() -> str:
    """Total / ``bp``'s of cells above ``bp``, by default and with one option (``REMEDY_ROWS``)."""
    from locallearn.backbones import external

    lines = [
        "| model | px | K | method | default | option | with the option |",
        "|---|---|---|---|---:|---|---:|",
    ]
    splits, bps = {}, {}
    for model, size, k, method, option in REMEDY_ROWS:
        if (model, size) not in splits:
            splits[model, size] = external.from_spec(model, TOTAL_CLASSES, 3, size)
        split = splits[model, size]
        if (model, size, k) not in bps:
            bps[model, size, k] = step_total(model, "bp", k, size, TOTAL_CLASSES, backbone=split)
        bp = bps[model, size, k]
        default = step_total(model, method, k, size, TOTAL_CLASSES, backbone=split) / bp
        changed = step_total(model, method, k, size, TOTAL_CLASSES, (option,), backbone=split) / bp
        lines.append(f"| `{model}` | {size} | {k} | {method} | {default:.2f} | `{option}` | {changed:.2f} |")
        print(lines[-1], flush=True)
    note = (
        f"\nCells: whole-step total / `bp`'s at batch {TOTAL_BATCH}, as in the table above. "
        "Produced by `python benchmarks/aux_sizes.py --remedies`.\n"
    )
    return "\n".join(lines) + "\n" + note


def write(name: str, out: Path, text: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    try:  # run as a script (benchmarks/ on sys.path) or as a module of the benchmarks package
        from update_readme import render
    except ImportError:
        from benchmarks.update_readme import render
    DOC.write_text(block(name).sub(lambda m: m[1] + render(name, "../") + m[3], DOC.read_text()))
    print(text)  # a script, not library code


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--totals", action="store_true", help="whole-step total / bp per outside model")
    which.add_argument("--remedies", action="store_true", help="options tried on the cells above bp")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the build's own warning for each cell over 1.0
    if args.totals:
        write("aux_totals", TOTALS_OUT, totals_table())
    elif args.remedies:
        write("aux_remedies", OUT.with_name("aux_remedies.md"), remedies_table())
    else:
        write("aux_sizes", OUT, table())


if __name__ == "__main__":
    main()
