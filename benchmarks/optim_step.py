"""Optimizer-step time alone (issue 13): per-block vs grouped (``engine.group_steps``) and for-loop vs
``optim.foreach`` vs ``optim.fused`` kernels, on the real parameter lists of a bench cell, interleaved.
The step-time bench (``locallearn bench speed``) is too noisy on a shared CPU to resolve a few ms;
this isolates them. ``python benchmarks/optim_step.py [--cell resnet32:16] [--rounds 60]``."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from locallearn.bench.common import build_cell, markdown_table, parse_cell
from locallearn.engine.optim import GroupedOptimizer
from locallearn.engine.step import step_grouped

KERNELS = {"loop": "optim.foreach=false", "foreach": "optim.foreach=true", "fused": "optim.fused=true"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--cell", default="resnet32:16")
    p.add_argument("--methods", nargs="+", default=["bp", "dgl", "dgl+manpp", "infopro"])
    p.add_argument("--rounds", type=int, default=60)
    args = p.parse_args()
    torch.set_num_threads(1)
    backbone, k = parse_cell(args.cell)
    cases = {}  # (method, kernel, mode) -> (params, step)
    for method in args.methods:
        for kernel, option in KERNELS.items():
            cell = build_cell(backbone, k, f"{method}[{option}]")
            params = [q for opt in cell.optimizers for g in opt.param_groups for q in g["params"]]
            opts = cell.optimizers
            cases[(method, kernel, "per-block")] = (params, lambda opts=opts: [o.step() for o in opts])
            if len(opts) > 1:
                grouped = GroupedOptimizer(opts)
                cases[(method, kernel, "grouped")] = (params, lambda g=grouped: step_grouped(g))
    times: dict = {key: [] for key in cases}
    for _ in range(args.rounds):
        for key, (params, step) in cases.items():
            for q in params:
                q.grad = torch.full_like(q, 1e-3)
            t0 = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - t0)
    rows = []
    for (method, kernel, mode), t in times.items():
        params = cases[(method, kernel, mode)][0]
        rows.append(
            {
                "method": method,
                "kernel": kernel,
                "steps": mode,
                "tensors": len(params),
                "params_M": sum(q.numel() for q in params) / 1e6,
                "median_ms": statistics.median(t[len(t) // 6 :]) * 1e3,
            }
        )
    print(
        f"# optimizer step alone, {args.cell}, SGD nesterov + wd, 1 thread, {args.rounds} interleaved rounds\n"
    )
    print("\n".join(markdown_table(rows, list(rows[0]))))


if __name__ == "__main__":
    main()
