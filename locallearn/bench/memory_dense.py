"""``locallearn bench memory --task detection``: activation memory of RetinaNet training, per method.

The same saved-tensor meter as the classification bench (plus what the feature bank holds while each
block runs), on real training steps of RetinaNet over a torchvision ResNet at ``--size`` px with a few
boxes per image. Bytes are measured at two small batches and extrapolated affinely to
``--target-batch`` (per-image tensors plus small per-step ones: anchors, matching, BN statistics); a
third batch checks the fit. Each block is fitted on its own and printed (``blocks_MiB``); the step's peak
is the largest. Rows by stages are built from MAN++ Table IV's configs (``detection_config``), so
``dgl+manpp`` is the Table IV cell with the official MAN++ aux; variants are specs
(``dgl+manpp[momentum.recompute=true]``). On CUDA (``--cuda-batch``) real steps also report
``max_memory_allocated``.

``--task segmentation`` (DeepLabV3, MAN++ TPAMI Table VI) and ``--task super_resolution`` (EDSR, memory-
augmented MAN Table 5) build each method from the repository's paper-cell configs (same split and aux
options). A real step at the paper's crop takes minutes on a CPU, so their bytes are fitted per block as
``batch * (a * pixels + b) + c`` (every map of these fully convolutional nets scales with the input's
pixels when the side is a multiple of the stride; BN statistics do not scale) from three steps at small
sizes, checked at a fourth small point and, with ``full_check``, against one real step at the full size.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from locallearn.bench.common import header, markdown_table, mib, parse_spec, whole_step, write_csv
from locallearn.build import build_model
from locallearn.config import load_config, load_yaml
from locallearn.engine.optim import build_optimizer
from locallearn.engine.sequential import train_step
from locallearn.metrics.memory import ActivationMeter
from locallearn.types import Batch, InputInfo

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DENSE_METHODS = ["bp", "dgl", "slm", "dgl+manpp", "dgl+manpp[momentum.recompute=false]", "slm+manpp"]


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


def detection_config(backbone: str, spec: str, by_stage: bool) -> tuple[str, dict, list[str]]:
    """The config a detection row is built from: its file name (or ``-``), its content and the overrides.

    By stages (K=4): MAN++ Table IV's ``manpp_coco_retinanet_{backbone}_{e2e,k4_dgl_manpp}.yaml`` (the
    resnet50 file for other backbones): bp = E2E; any other method gets the K=4 file with its name swapped
    in and the file's options that apply to it (``dgl``'s official aux, ``momentum``). By units (MAN Tables
    2-4's one residual unit per block): the method's defaults. ``spec`` may carry options
    (``dgl+manpp[momentum.recompute=true]``, ``dgl+manpp[dgl.dense_head=fpn]``)."""
    name, options = parse_spec(spec)
    data: dict = {"task": {"name": "detection"}, "method": {"name": name}}
    file = "-"
    if by_stage:
        cell = "e2e" if name == "bp" else "k4_dgl_manpp"
        path = CONFIGS / "detection" / f"manpp_coco_retinanet_{backbone}_{cell}.yaml"
        if not path.is_file():
            path = CONFIGS / "detection" / f"manpp_coco_retinanet_resnet50_{cell}.yaml"
        data, file = load_yaml(path), path.name
        keep = {name.split("+")[0], *(("momentum",) if "+" in name else ())}
        data["method"] = {"name": name, **{k: v for k, v in data["method"].items() if k in keep}}
    return file, data, [f"model.backbone={backbone}", *options]


def build(backbone: str, method: str, by_stage: bool, size: int, classes: int, head: str, with_file=False):
    """The model and optimizers of one row (``method`` a spec); the config file's name with ``with_file``."""
    file, data, overrides = detection_config(backbone, method, by_stage)
    args = [*overrides, f"task.detection.head={head}"]
    probe = load_config(None, [f"model.backbone={backbone}", "method.name=bp", "model.num_blocks=1"])
    inputs = InputInfo(3, size, *IMAGENET)
    if data["method"]["name"] != "bp":  # the stage (or unit) cuts of this backbone
        layers, _, _ = build_model(probe, inputs, classes)
        cuts = unit_cuts([f.stage for f in layers.backbone.feature_info], by_stage)
        args = [f"model.num_blocks={len(cuts) + 1}", f"model.cuts={cuts}", *args]
    else:
        args = ["model.num_blocks=1", *args]
    cfg = load_config(None, args, base=data)
    torch.manual_seed(0)
    model, _, _ = build_model(cfg, inputs, classes)
    model.train()
    opts = [build_optimizer(model.block_parameters(k), cfg.optim) for k in range(model.num_blocks)]
    return (model, opts, file) if with_file else (model, opts)


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
        model, opts, file = build(backbone, method, by_stage, size, 80, head, with_file=True)
        blocks = {b: measure(model, opts, detection_batch(b, size, 80, seed=b)) for b in batches}
        b0, b1 = batches[0], batches[1]
        # per block: bytes = fixed + slope * batch (the blocks run one after the other: the peak is the largest)
        slopes = [(y1 - y0) / (b1 - b0) for y0, y1 in zip(blocks[b0], blocks[b1])]
        fixed = [y0 - a * b0 for y0, a in zip(blocks[b0], slopes)]
        at = [c + a * target_batch for c, a in zip(fixed, slopes)]
        peak = max(at)
        k = at.index(peak)
        check = batches[2] if len(batches) > 2 else None
        total = whole_step(
            model, opts, at, batches, target_batch, lambda n: detection_batch(n, size, 80, seed=n)
        )
        row = {
            "method": method,
            "K": model.num_blocks,
            "cuts": " ".join(map(str, model.cuts)) or "-",
            "peak_block": k,
            "peak_MiB_at_target": mib(peak),
            "blocks_MiB": " / ".join(f"{mib(v):.0f}" for v in at),
            "per_image_MiB": mib(slopes[k]),
            "fit_error_pct": 100 * abs(fixed[k] + slopes[k] * check - blocks[check][k]) / blocks[check][k]
            if check
            else None,
            "params_M_backbone": model.parameter_counts()["backbone"] / 1e6,
            "params_M_aux": model.parameter_counts()["aux"] / 1e6,
            "peak_total_MiB": mib(total.peak_total_bytes),
            "params_and_state_MiB": mib(total.resident_bytes),
            "config": file,
        }
        if use_cuda:
            row["cuda_max_allocated_GiB"] = cuda_step(model, opts, detection_batch(cuda_batch, size, 80))
        rows.append(row)
        del model, opts
    bp, bp_total = rows[0]["peak_MiB_at_target"], rows[0]["peak_total_MiB"]
    for row in rows:
        row["ratio_to_bp"] = row["peak_MiB_at_target"] / bp
        row["total_ratio_to_bp"] = row["peak_total_MiB"] / bp_total
    columns = ["method", "K", "cuts", "peak_block", "peak_MiB_at_target", "ratio_to_bp", "peak_total_MiB",
               "total_ratio_to_bp", "params_and_state_MiB", "blocks_MiB", "per_image_MiB",
               "fit_error_pct", "params_M_backbone", "params_M_aux", "config"] + (["cuda_max_allocated_GiB"] if use_cuda else [])  # fmt: skip
    write_csv(out_dir / f"{name}.csv", rows, columns)
    split = "by stages (K=4, MAN++ Table IV)" if by_stage else "one residual unit per block (MAN Tables 2-4)"
    lines = header(
        f"Detection memory: RetinaNet-{backbone} at {size}x{size}, saved-tensor bytes of the largest block",
        f"extrapolated to {target_batch} from {list(batches[:2])} (checked at {batches[2:]})",
        notes=[
            f"split: {split}; 80 classes, 4 random boxes per image, synthetic images; {head} head",
            "rows by stages are built from MAN++ Table IV's configs (`config`; bp = E2E, the others the K=4 "
            "dgl+manpp file with the method swapped in and its options that apply: dgl's `dense_head: manpp` is the "
            "official MAN++ COCO aux, `[dgl.dense_head=fpn]` ours)",
            "blocks_MiB: every block's bytes at the target batch, each fitted on its own (block 0 = stem + layer1 + "
            "its aux, the last = layer4 + FPN + RetinaNet head); the step's peak is the largest: the blocks run one "
            "after the other and each frees its graph before the next",
            "peak = bytes saved for backward by the largest block (body + aux), plus the feature-bank entries "
            "alive while it runs; bp is one block",
            "peak_total = the whole step (`locallearn.metrics.step_memory`): weights + SGD state + the largest "
            "block's gradients, saved bytes and backward workspace (allocator-measured at the fit batches, "
            "extrapolated); total_ratio_to_bp compares totals",
            f"wall time {time.perf_counter() - t0:.0f} s",
        ],
    )
    lines += markdown_table(rows, columns)
    text = "\n".join(lines) + "\n"
    (out_dir / f"{name}.md").write_text(text)
    return text


# ------------------------------------------------------------------ segmentation and super-resolution

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PIXEL_TASKS = {
    # task: default backbone, size, fit sizes, batches (b0, b1), methods, classes (SR: image channels)
    "segmentation": ("resnet50_d8", 768, (128, 256), (2, 3), ["bp", "infopro", "infopro+manpp", "dgl"], 19),
    "super_resolution": ("edsr", 48, (16, 24), (1, 2), ["bp", "dgl", "dgl+manpp", "slm", "slm+manpp"], 3),
}


def paper_config(task: str, backbone: str, spec: str, scale: int = 2) -> tuple[Path, dict, list[str]]:
    """The paper-cell YAML a method's row is built from: its path, its content with the method set, and
    the overrides on top of it.

    Segmentation: MAN++ Table V/VI's ``deeplabv3_r{50,101}_{e2e,infopro_k2,infopro_manpp_k2}.yaml``
    (bp K=1; InfoPro K=2 cut at layer 5); any other method gets the InfoPro K=2 file (same cut) with its
    name swapped in. Super-resolution: MAN Table 5's ``edsr_x2_{bp,dgl,man}.yaml`` (K=4 even; ``slm`` =
    MAN, the LR image in the bank); ``+man``/``+manpp`` use their base's file. ``spec`` may carry
    options (``infopro+manpp[momentum.recompute=true]``)."""
    name, options = parse_spec(spec)
    base = name.split("+")[0]
    if task == "segmentation":
        depth = "r101" if "101" in backbone else "r50"
        cell = {"bp": "e2e", "infopro+manpp": "infopro_manpp_k2"}.get(name, "infopro_k2")
        path = CONFIGS / "segmentation" / f"deeplabv3_{depth}_{cell}.yaml"
    elif task == "super_resolution":
        cell = {"bp": "bp", "dgl": "dgl", "slm": "man"}.get(base)
        if cell is None:
            raise ValueError(f"no EDSR config for {spec!r}: use bp, dgl, slm (MAN) and their +man/+manpp")
        path = CONFIGS / "super_resolution" / f"edsr_x2_{cell}.yaml"
        options = [f"task.super_resolution.scale={scale}", *options]
    else:
        raise ValueError(f"no paper configs for task {task!r}")
    if not path.is_file():
        raise FileNotFoundError(f"{path} (the bench builds its rows from the repository's configs/)")
    data = load_yaml(path)
    # keep the file's method options that apply to this method (InfoPro's for infopro*, momentum for +man*)
    keep = {base, *(("momentum",) if "+" in name else ())}
    data["method"] = {"name": name, **{k: v for k, v in data["method"].items() if k in keep}}
    return path, data, [f"model.backbone={backbone}", *options]


def pixel_batch(task: str, n: int, size: int, scale: int = 2, seed: int = 0) -> Batch:
    """Synthetic segmentation (ImageNet-normalised image, 19-class label map with a void border) or
    SR (an LR patch ``size`` x ``size`` in [0, 1] = the HR patch average-pooled) batch."""
    gen = torch.Generator().manual_seed(seed)
    if task == "segmentation":
        x = torch.randn(n, 3, size, size, generator=gen)
        y = torch.randint(0, 19, (n, size, size), generator=gen)
        y[:, : size // 16] = 255
        mean, std = (torch.tensor(v).view(-1, 1, 1) for v in IMAGENET)
        return Batch(x, y, mean, std)
    hr = torch.rand(n, 3, size * scale, size * scale, generator=gen)
    lr = torch.nn.functional.avg_pool2d(hr, scale)
    return Batch(lr, hr, torch.zeros(3, 1, 1), torch.ones(3, 1, 1))


def build_pixel(task: str, backbone: str, spec: str, size: int, scale: int = 2):
    path, data, overrides = paper_config(task, backbone, spec, scale)
    cfg = load_config(None, overrides, base=data)
    classes = PIXEL_TASKS[task][5]
    inputs = InputInfo(3, size, *(IMAGENET if task == "segmentation" else ((0.0,) * 3, (1.0,) * 3)))
    torch.manual_seed(0)
    model, _, _ = build_model(cfg, inputs, classes)
    model.train()
    opts = [build_optimizer(model.block_parameters(k), cfg.optim) for k in range(model.num_blocks)]
    for opt in opts:  # random data: keep the weights finite over the few measured steps
        for group in opt.param_groups:
            group["lr"] = 1e-4
    return model, opts, path


def pixel_fit(points: dict[tuple[int, int], list[int]], b0: int, b1: int, s0: int, s1: int):
    """Per block ``(a, b, c)`` of ``bytes = n * (a * pixels + b) + c`` from the steps at (b0, s0),
    (b1, s0) and (b0, s1)."""
    p0, p1 = s0 * s0, s1 * s1
    fits = []
    for y00, y10, y01 in zip(points[b0, s0], points[b1, s0], points[b0, s1]):
        per0 = (y10 - y00) / (b1 - b0)  # per-image bytes at s0
        c = y00 - b0 * per0
        per1 = (y01 - c) / b0
        a = (per1 - per0) / (p1 - p0)
        fits.append((a, per0 - a * p0, c))
    return fits


def predict(fits, n: int, size: int) -> list[float]:
    return [n * (a * size * size + b) + c for a, b, c in fits]


def error_pct(fits, n: int, size: int, measured: list[int]) -> float:
    """Largest relative error of the fitted peak block vs a measured step (its peak)."""
    return 100 * abs(max(predict(fits, n, size)) - max(measured)) / max(measured)


def run_pixels(
    task: str,
    backbone: str | None = None,
    methods: Sequence[str] | None = None,
    size: int | None = None,
    scale: int = 2,
    fit_sizes: Sequence[int] | None = None,
    batches: Sequence[int] | None = None,
    target_batch: int = 16,
    full_check: bool = True,
    out_dir: str | Path = "benchmarks/results",
    name: str | None = None,
    cuda_batch: int | None = None,
) -> str:
    """Rows for ``task`` (segmentation | super_resolution); write ``{name}.md`` / ``.csv``; return the Markdown."""
    d_backbone, d_size, d_fit, d_batches, d_methods, _ = PIXEL_TASKS[task]
    backbone, size = backbone or d_backbone, size or d_size
    s0, s1 = fit_sizes or d_fit
    b0, b1 = (batches or d_batches)[:2]
    methods = list(dict.fromkeys(["bp", *(methods or d_methods)]))
    name = (
        name
        or f"memory_{task}_{backbone}" + (f"_x{scale}" if task == "super_resolution" else "") + f"_{size}"
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    use_cuda = torch.cuda.is_available() and cuda_batch is not None
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for spec in methods:
        points = {}
        for s in (s0, s1):  # a model per size: InfoPro's decoder resizes to the size it was built for
            model, opts, _ = build_pixel(task, backbone, spec, s, scale)
            for n in (b0, b1):
                points[n, s] = measure(model, opts, pixel_batch(task, n, s, scale, seed=n))
        model, opts, path = build_pixel(task, backbone, spec, size, scale)
        fits = pixel_fit(points, b0, b1, s0, s1)
        peaks = predict(fits, target_batch, size)
        peak = max(peaks)
        a, b, _ = fits[peaks.index(peak)]
        counts = model.parameter_counts()
        row = {
            "method": spec,
            "K": model.num_blocks,
            "cuts": " ".join(map(str, model.cuts)) or "-",
            "config": path.name,
            "peak_block": peaks.index(peak),
            "peak_MiB_at_target": mib(peak),
            "blocks_MiB": " / ".join(f"{mib(v):.0f}" for v in peaks),
            "per_image_MiB": mib(a * size * size + b),
            "fit_error_pct": error_pct(fits, b1, s1, points[b1, s1]),
            "params_M_backbone": counts["backbone"] / 1e6,
            "params_M_aux": counts["aux"] / 1e6,
        }
        if full_check:
            full = measure(model, opts, pixel_batch(task, b0, size, scale, seed=99))
            row["full_size_MiB"] = mib(max(full))
            row["full_size_error_pct"] = error_pct(fits, b0, size, full)
        if use_cuda:
            row["cuda_max_allocated_GiB"] = cuda_step(model, opts, pixel_batch(task, cuda_batch, size, scale))
        rows.append(row)
        del model, opts
    for row in rows:
        row["ratio_to_bp"] = row["peak_MiB_at_target"] / rows[0]["peak_MiB_at_target"]
    columns = ["method", "K", "cuts", "peak_block", "peak_MiB_at_target", "ratio_to_bp", "blocks_MiB",
               "per_image_MiB", "fit_error_pct"] + (["full_size_MiB", "full_size_error_pct"] if full_check else [])  # fmt: skip
    columns += ["params_M_backbone", "params_M_aux", "config"] + (
        ["cuda_max_allocated_GiB"] if use_cuda else []
    )
    write_csv(out_dir / f"{name}.csv", rows, columns)
    lines = header(*pixel_titles(task, backbone, size, scale, target_batch, cuda_batch if use_cuda else None),
                   notes=pixel_notes(task, size, scale, (b0, b1), (s0, s1), full_check, time.perf_counter() - t0))  # fmt: skip
    lines += markdown_table(rows, columns)
    text = "\n".join(lines) + "\n"
    (out_dir / f"{name}.md").write_text(text)
    return text


def cuda_step(model, opts, batch: Batch) -> float:
    """``max_memory_allocated`` (GiB) of one real training step on CUDA (model moved, optimizers kept)."""
    device = torch.device("cuda")
    model.to(device)
    batch = batch.to(device)
    torch.cuda.reset_peak_memory_stats()
    train_step(model, batch, opts)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def pixel_titles(task, backbone, size, scale, target_batch, cuda_batch) -> tuple[str, str]:
    what = (
        f"DeepLabV3-{backbone} at crop {size}x{size}"
        if task == "segmentation"
        else f"EDSR ({backbone}) x{scale} on {size}x{size} LR patches ({size * scale}x{size * scale} HR)"
    )
    batch = f"{target_batch} (extrapolated)" + (
        f"; CUDA column: one real step at batch {cuda_batch}" if cuda_batch else ""
    )
    return (
        f"{task.replace('_', '-').capitalize()} memory: {what}, saved-tensor bytes of the largest block",
        batch,
    )


def pixel_notes(task, size, scale, batches, fit_sizes, full_check, seconds) -> list[str]:
    b0, b1 = batches
    s0, s1 = fit_sizes
    if task == "segmentation":
        paper = ("MAN++ (TPAMI) Table V/VI cells: bp = E2E (K=1); infopro / infopro+manpp = InfoPro K=2 cut before "
                 "layer 5 (layer2[1]: the MAN++ ImageNet K=2 cut), the configs' aux options; other methods: the "
                 "same K=2 cut; 19 classes, synthetic images and label maps; target batch 16 = the paper's per-GPU "
                 "batch (128 on 8 GPUs). Paper Table VI (whole-GPU memory, R50 scratch): E2E 23.90 GB, InfoPro "
                 "20.71 GB (-13.4%), InfoPro+MAN++ 20.95 GB (-12.3%)")  # fmt: skip
    else:
        paper = ("memory-augmented MAN Table 5 cells: bp (K=1); dgl = the traditional local baseline and slm = MAN "
                 "(SLM aux = replica + upsampler, the LR image fused from the feature bank), both K=4 even "
                 "(configs/super_resolution/edsr_x2_*.yaml); +manpp composed on each; synthetic LR/HR pairs; "
                 f"x{scale}; target batch 16 = EDSR-PyTorch's. Paper (whole-GPU memory): MAN 5.20 GB at x2, 51% "
                 "below BP")  # fmt: skip
    return [
        paper,
        "blocks_MiB: every block's bytes at the target batch (the step's peak is the largest: the blocks run "
        "one after the other and each frees its graph before the next)",
        "bytes = saved-for-backward storages of the largest block (body + aux) plus the feature-bank entries alive "
        "while it runs (activations only: no weights, gradients, optimizer state or workspace); bp is one block",
        f"fit per block: bytes = batch * (a * pixels + b) + c from real steps at (batch, side) = ({b0}, {s0}), "
        f"({b1}, {s0}), ({b0}, {s1}); fit_error_pct = |fit - measured| / measured at ({b1}, {s1})"
        + (
            f"; full_size_error_pct: the same at ({b0}, {size}), one real step at the full size (full_size_MiB)"
            if full_check
            else ""
        ),
        f"wall time {seconds:.0f} s",
    ]
