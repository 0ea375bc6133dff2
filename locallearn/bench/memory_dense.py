"""``locallearn bench memory --task detection``: activation memory of RetinaNet training, per method.

The same saved-tensor meter as the classification bench (plus what the feature bank holds while each
block runs), on real training steps of RetinaNet over a torchvision ResNet at ``--size`` px with a few
boxes per image. Bytes are measured at two small batches and extrapolated affinely to
``--target-batch`` (per-image tensors plus small per-step ones: anchors, matching, BN statistics); a
third batch checks the fit. On CUDA (``--cuda-batch``) real steps also report
``max_memory_allocated``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from locallearn.bench.common import header, markdown_table, mib, write_csv
from locallearn.build import build_model
from locallearn.config import load_config
from locallearn.engine.optim import build_optimizer
from locallearn.engine.sequential import train_step
from locallearn.metrics.memory import ActivationMeter
from locallearn.types import Batch, InputInfo

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DENSE_METHODS = ["bp", "dgl", "slm", "dgl+manpp", "slm+manpp"]


def unit_cuts(stages: list[int], by_stage: bool) -> list[int]:
    """Cuts of a torchvision ResNet: at each stage's first unit (K = 4), or before every unit with the
    stem joined to the first (MAN's K = number of residual units: R34/R50 16, R101 33, R152 50)."""
    if by_stage:
        return [i for i in range(2, len(stages)) if stages[i] != stages[i - 1]]
    return list(range(2, len(stages)))


def detection_batch(n: int, size: int, classes: int, seed: int = 0) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=gen)
    targets = []
    for i in range(n):
        xy = torch.rand(4, 2, generator=gen) * size * 0.6
        wh = 16 + torch.rand(4, 2, generator=gen) * size * 0.35
        boxes = torch.cat([xy, xy + wh], 1).clamp(max=size - 1)
        targets.append({"boxes": boxes, "labels": torch.randint(0, classes, (4,), generator=gen),
                        "image_id": i, "orig_size": (size, size), "size": (size, size), "scale": 1.0})  # fmt: skip
    mean, std = (torch.tensor(v).view(-1, 1, 1) for v in IMAGENET)
    return Batch(x, targets, mean, std)


def build(backbone: str, method: str, by_stage: bool, size: int, classes: int, head: str):
    args = [
        f"model.backbone={backbone}",
        f"method.name={method}",
        "task.name=detection",
        f"task.detection.head={head}",
    ]
    probe = load_config(None, [f"model.backbone={backbone}", "method.name=bp", "model.num_blocks=1"])
    inputs = InputInfo(3, size, *IMAGENET)
    if method != "bp":
        layers, _, _ = build_model(probe, inputs, classes)
        cuts = unit_cuts([f.stage for f in layers.backbone.feature_info], by_stage)
        args += [f"model.num_blocks={len(cuts) + 1}", f"model.cuts={cuts}"]
    else:
        args.append("model.num_blocks=1")
    cfg = load_config(None, args)
    model, _, _ = build_model(cfg, inputs, classes)
    model.train()
    opts = [build_optimizer(model.block_parameters(k), cfg.optim) for k in range(model.num_blocks)]
    return model, opts


def measure(model, opts, batch: Batch) -> list[int]:
    meter = ActivationMeter(model)
    train_step(model, batch, opts, meter=meter)
    return meter.block_bytes


def run(
    backbone: str = "resnet50",
    methods: list[str] = DENSE_METHODS,
    size: int = 600,
    batches: tuple[int, ...] = (1, 2, 3),
    target_batch: int = 16,
    by_stage: bool = True,
    head: str = "retinanet",
    out_dir: str | Path = "benchmarks/results",
    name: str = "memory_detection",
    cuda_batch: int | None = None,
) -> str:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = list(dict.fromkeys(["bp", *methods]))
    use_cuda = torch.cuda.is_available() and cuda_batch is not None
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for method in methods:
        model, opts = build(backbone, method, by_stage, size, 80, head)
        peaks = {b: max(measure(model, opts, detection_batch(b, size, 80, seed=b))) for b in batches}
        b0, b1 = batches[0], batches[1]
        slope = (peaks[b1] - peaks[b0]) / (b1 - b0)
        fixed = peaks[b0] - slope * b0
        check = batches[2] if len(batches) > 2 else None
        row = {
            "method": method,
            "K": model.num_blocks,
            "peak_MiB_at_target": mib(fixed + slope * target_batch),
            "per_image_MiB": mib(slope),
            "fit_error_pct": 100 * abs(fixed + slope * check - peaks[check]) / peaks[check]
            if check
            else None,
            "params_M_backbone": model.parameter_counts()["backbone"] / 1e6,
            "params_M_aux": model.parameter_counts()["aux"] / 1e6,
        }
        if use_cuda:
            device = torch.device("cuda")
            model.to(device)  # the optimizers hold the same parameters, now on the device
            batch = detection_batch(cuda_batch, size, 80).to(device)
            torch.cuda.reset_peak_memory_stats()
            train_step(model, batch, opts)
            torch.cuda.synchronize()
            row["cuda_max_allocated_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        rows.append(row)
    bp = rows[0]["peak_MiB_at_target"]
    for row in rows:
        row["ratio_to_bp"] = row["peak_MiB_at_target"] / bp
    columns = ["method", "K", "peak_MiB_at_target", "ratio_to_bp", "per_image_MiB", "fit_error_pct",
               "params_M_backbone", "params_M_aux"] + (["cuda_max_allocated_GiB"] if use_cuda else [])  # fmt: skip
    write_csv(out_dir / f"{name}.csv", rows, columns)
    split = "by stages (K=4, MAN++ Table IV)" if by_stage else "one residual unit per block (MAN Tables 2-4)"
    lines = header(
        f"Detection memory: RetinaNet-{backbone} at {size}x{size}, saved-tensor bytes of the largest block",
        f"extrapolated to {target_batch} from {list(batches[:2])} (checked at {batches[2:]})",
        notes=[
            f"split: {split}; 80 classes, 4 random boxes per image, synthetic images; {head} head",
            "peak = bytes saved for backward by the largest block (body + aux), plus the feature-bank entries "
            "alive while it runs; bp is one block",
            f"wall time {time.perf_counter() - t0:.0f} s",
        ],
    )
    lines += markdown_table(rows, columns)
    text = "\n".join(lines) + "\n"
    (out_dir / f"{name}.md").write_text(text)
    return text
