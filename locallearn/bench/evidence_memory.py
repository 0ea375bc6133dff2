"""Part 2 of ``locallearn bench evidence``: CUDA peak memory of whole training steps next to the saved-tensor meter.

For each cell: ``torch.cuda.max_memory_allocated`` over whole training steps after a warm-up step (weights,
gradients, optimizer state, activations, workspaces: what papers call GPU memory), and the figure our memory tables
print for the same cell: the saved-tensor meter of ``bench memory`` (``memory.py`` / ``memory_dense.py``: the bytes
the largest block saves for backward, measured at two small batches and extrapolated exactly to the target batch;
activation checkpointing analytic from per-layer bytes). ``cuda_rest`` = the CUDA peak minus weights and
optimizer state (activations, gradients, workspaces) bounds the meter's activations-only figure from above. On a
machine without CUDA only the meter runs. Cells run in priority order and each is short; one not started by the deadline is recorded as such.
"""

from __future__ import annotations

import gc
import logging
import time
import traceback
from typing import Any

import torch

from locallearn.bench import memory, memory_dense
from locallearn.bench.common import (
    CHECKPOINT,
    build_cell,
    checkpoint_segments,
    gib,
    markdown_table,
    optimizer_state_bytes,
    param_bytes,
    parse_cell,
    parse_spec,
    synthetic_batch,
    whole_step,
)
from locallearn.engine.sequential import train_step

log = logging.getLogger(__name__)

# MAN++ (TPAMI) whole-GPU memory in GB: Table III (CIFAR-10, batch 1024) and Table IV (COCO RetinaNet, scratch)
PAPER = {
    ("classification", "resnet110", "bp"): 9.26,
    ("classification", "resnet110", "infopro+manpp"): 3.22,
    ("classification", "resnet32", "bp"): 3.37,
    ("classification", "resnet32", "infopro+manpp"): 2.45,
    ("detection", "resnet50", "bp"): 18.1,
    ("detection", "resnet50", "dgl+manpp"): 6.34,
}
RECOMPUTE = "[momentum.recompute=true]"
CLASSIFICATION_METHODS = ["bp", CHECKPOINT, "dgl", "dgl+manpp", "infopro+manpp", f"infopro+manpp{RECOMPUTE}",
                          f"dgl+manpp{RECOMPUTE}"]  # fmt: skip
DETECTION_METHODS = ["bp", "dgl+manpp"]
COLUMNS = ["task", "cell", "method", "batch", "size", "cuda_max_allocated_GiB", "cuda_max_reserved_GiB",
           "weights_and_state_GiB", "cuda_rest_GiB", "meter_GiB", "meter_over_cuda_rest",
           "accounted_GiB", "accounted_over_cuda",
           "cuda_ratio_to_bp", "meter_ratio_to_bp", "paper_GB", "paper_ratio_to_bp", "seconds", "status"]  # fmt: skip


def device_peak(step, device: torch.device, steps: int = 2) -> tuple[float | None, float | None]:
    """(max allocated, max reserved) bytes over ``steps`` calls of ``step`` after one warm-up call (CUDA only)."""
    step()  # allocator pools, cuDNN plans, optimizer state
    if device.type != "cuda":
        return None, None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)


def classification_row(cell: str, spec: str, batch: int, device: torch.device, fit: tuple[int, int]) -> dict:
    backbone, k = parse_cell(cell)
    e2e = parse_spec(spec)[0] in ("bp", CHECKPOINT)
    meters = {}
    for b in fit:  # the meter, exactly as `bench memory` runs it (bp's per-layer bytes for checkpointing)
        torch.manual_seed(0)
        meter_cell = build_cell(backbone, k, "bp" if e2e else spec, device=device)
        x = synthetic_batch(b, device=device)
        meters[b] = memory.BreakdownMeter(meter_cell.model, per_layer=e2e)
        meters[b].image_ptr = x.x.untyped_storage().data_ptr()
        meter_cell.step(x, meters[b])
    blocks, _ = memory.scaled(meters, batch, -1)
    if parse_spec(spec)[0] == CHECKPOINT:
        inputs = {i: memory.affine({b: m.layer_inputs[i] for b, m in meters.items()}, batch)
                  for i in meters[fit[0]].layer_inputs}  # fmt: skip
        layers = {p: v for p, v in blocks[0].items() if p.startswith("layer") or p == "input"}
        meter_bytes = memory.checkpoint_peak(
            layers, inputs, blocks[0].get("aux", 0.0), checkpoint_segments(k)
        )
    else:
        meter_bytes = max(sum(b.values()) for b in blocks)
    static = param_bytes(meter_cell.model)[0] + optimizer_state_bytes(meter_cell.optimizers)
    accounted = whole_step(
        meter_cell.model, meter_cell.optimizers, [sum(b.values()) for b in blocks], fit, batch,
        lambda n: synthetic_batch(n, device=device), meter_cell.autocast,
        checkpoint_bytes=meter_bytes if parse_spec(spec)[0] == CHECKPOINT else None,
    ).peak_total_bytes  # fmt: skip
    del meter_cell, meters, x
    gc.collect()  # the meter's models must not count in the CUDA peak below
    if device.type == "cuda":
        alloc, reserved = memory.cuda_peak(backbone, k, spec, batch, device)
    else:
        alloc = reserved = None
    return {"task": "classification", "cell": f"{backbone}:{k}", "backbone": backbone, "method": spec,
            "batch": batch, "size": 32, "alloc": alloc, "reserved": reserved, "static": static,
            "meter": meter_bytes, "accounted": accounted}  # fmt: skip


def detection_row(
    backbone: str, spec: str, size: int, batch: int, device: torch.device, fit: tuple[int, int]
) -> dict:
    model, opts = memory_dense.build(backbone, spec, True, size, 80, "retinanet")
    model.to(device)  # the optimizers hold the same parameters, now on the device
    blocks = {b: memory_dense.measure(model, opts, memory_dense.detection_batch(b, size, 80, b).to(device))
              for b in fit}  # fmt: skip
    at = [memory.affine({b: blocks[b][k] for b in fit}, batch) for k in range(model.num_blocks)]
    meter_bytes = max(at)
    static = param_bytes(model)[0] + optimizer_state_bytes(opts)
    accounted = whole_step(
        model, opts, at, fit, batch, lambda n: memory_dense.detection_batch(n, size, 80, n).to(device)
    ).peak_total_bytes
    alloc = reserved = None
    if device.type == "cuda":
        x = memory_dense.detection_batch(batch, size, 80).to(device)
        alloc, reserved = device_peak(lambda: train_step(model, x, opts), device, steps=1)
    return {"task": "detection", "cell": f"retinanet-{backbone}", "backbone": backbone,
            "method": spec, "batch": batch, "size": size, "alloc": alloc, "reserved": reserved, "static": static,
            "meter": meter_bytes, "accounted": accounted}  # fmt: skip


def run(s: dict[str, Any], deadline: float, device: torch.device) -> dict[str, Any]:
    jobs = [("classification", m) for m in s["memory_methods"]] + [
        ("detection", m) for m in s["detection_methods"]
    ]
    # priority: every cell the paper reports first, then the variants
    jobs.sort(key=lambda j: 0 if j[1] in ("bp", CHECKPOINT, "dgl", "dgl+manpp", "infopro+manpp") else 1)
    rows, started = [], time.time()
    for task, spec in jobs:
        cell = s["memory_cell"] if task == "classification" else f"retinanet-{s['detection_backbone']}"
        row: dict[str, Any] = {"task": task, "cell": cell, "method": spec}
        if time.time() >= deadline:
            row["status"] = "not started (budget)"
            rows.append(row)
            continue
        t0 = time.time()
        try:
            if task == "classification":
                row = classification_row(
                    s["memory_cell"], spec, s["memory_batch"], device, tuple(s["memory_fit"])
                )
            else:
                row = detection_row(s["detection_backbone"], spec, s["detection_size"], s["detection_batch"], device,
                                    tuple(s["detection_fit"]))  # fmt: skip
            row["status"] = "measured" if device.type == "cuda" else "meter only (no CUDA)"
        except Exception as e:  # one failing cell must not cost the others
            log.error("memory %s %s failed:\n%s", task, spec, traceback.format_exc())
            row["status"] = f"failed: {type(e).__name__}: {e}"
        row["seconds"] = time.time() - t0
        rows.append(row)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows = finish_rows(rows)
    measured = sum(r["status"] in ("measured", "meter only (no CUDA)") for r in rows)
    return {"rows": rows, "status": f"{measured} of {len(rows)} cells in {time.time() - started:.0f} s"}


def finish_rows(rows: list[dict]) -> list[dict]:
    """GiB columns, ratios to the same task's bp and the paper's figures."""
    bp = {r["task"]: r for r in rows if r["method"] == "bp" and r.get("meter")}
    for r in rows:
        if r.get("meter") is None:
            continue
        act = r["alloc"] - r["static"] if r.get("alloc") is not None else None
        ref = bp.get(r["task"])
        r.update(
            cuda_max_allocated_GiB=gib(r["alloc"]), cuda_max_reserved_GiB=gib(r["reserved"]),
            weights_and_state_GiB=gib(r["static"]), cuda_rest_GiB=gib(act), meter_GiB=gib(r["meter"]),
            meter_over_cuda_rest=r["meter"] / act if act else None,
            accounted_GiB=gib(r.get("accounted")),
            accounted_over_cuda=r["accounted"] / r["alloc"] if r.get("accounted") and r.get("alloc") else None,
            meter_ratio_to_bp=r["meter"] / ref["meter"] if ref else None,
            cuda_ratio_to_bp=r["alloc"] / ref["alloc"] if ref and r.get("alloc") and ref.get("alloc") else None,
            paper_GB=PAPER.get((r["task"], r["backbone"], r["method"])),
        )  # fmt: skip
        paper_bp = PAPER.get((r["task"], r["backbone"], "bp"))
        r["paper_ratio_to_bp"] = r["paper_GB"] / paper_bp if r["paper_GB"] and paper_bp else None
    return rows


def report(result: dict[str, Any], s: dict[str, Any]) -> list[str]:
    return [
        "## 2. Peak memory: CUDA allocator vs the saved-tensor meter",
        "",
        f"- classification {s['memory_cell']} at batch {s['memory_batch']} (synthetic 3x32x32, split even); "
        f"detection RetinaNet-{s['detection_backbone']} (K=4 by stages) at {s['detection_size']} px, batch "
        f"{s['detection_batch']}, 4 random boxes per image; fp32",
        "- cuda_max_allocated: `torch.cuda.max_memory_allocated` over whole training steps after one warm-up step "
        "(weights, gradients, optimizer state, activations, workspaces); weights_and_state: parameters (EMA copies "
        "included) + SGD momentum; cuda_rest = allocated - weights_and_state: activations + gradients + workspaces, "
        "which bounds the meter's activations-only figure from above",
        f"- meter: the `bench memory` figure (largest block's saved-for-backward bytes, fitted at batches "
        f"{s['memory_fit']} / {s['detection_fit']} and extrapolated; checkpoint analytic), measured on the same device",
        "- accounted: the library's whole-step account (`locallearn.metrics.step_memory`: weights + optimizer "
        "state + the largest block's gradients, saved activations and backward workspace, the saved bytes and "
        "workspace fitted at the same small batches and extrapolated) for the same step; accounted_over_cuda = "
        "accounted / cuda_max_allocated (1.0 = the account is what CUDA allocated)",
        "- paper: MAN++ Table III (ResNet-110 E2E / InfoPro+MAN++ K=55) and Table IV (RetinaNet-R50 scratch E2E / "
        "MAN++), whole-GPU GB measured in an unstated way: compare the ratios to bp, not the GB",
        "",
        *markdown_table(result["rows"], [c for c in COLUMNS if c not in ("cuda_max_reserved_GiB", "size")]),
    ]
