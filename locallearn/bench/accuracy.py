"""``locallearn bench accuracy``: test error of every method on real data, same schedule and seeds.

Each (method, seed) is one ordinary ``Run`` (the same code path as ``locallearn train``) on Fashion-MNIST
(padded to 32x32, 1 channel), ResNet-32 K=16 by default. The report gives test error mean +- std over
seeds, the share of the base method's gap to ``bp`` that MAN++ closes,
``(err_base - err_manpp) / (err_base - err_bp)``, test-error curves over epochs for every method on one
set of axes, and test error against peak activation memory (one point per method; activation
checkpointing has ``bp``'s gradients exactly, so it is drawn at ``bp``'s error and checkpointing's memory
from ``memory.csv`` when that file exists).

The default budget is sized for a few CPU minutes and says so in the report; ``--full`` is the papers'
CIFAR recipe (all 60k images, 400 epochs, batch 1024, lr 0.8, 10 warm-up epochs) for a GPU.
"""

from __future__ import annotations

import logging
import multiprocessing
import re
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from locallearn.bench.common import CHECKPOINT, header, markdown_table, parse_spec, read_csv, write_csv

log = logging.getLogger(__name__)
SAFE = re.compile(r"[^\w+.=-]")  # characters kept in run directory names

METHODS = ["bp", "dgl", "dgl+manpp", "infopro", "infopro+manpp"]
BASES = {"dgl+manpp": "dgl", "infopro+manpp": "infopro", "dgl+man": "dgl", "infopro+man": "infopro"}
FULL = {
    "train_subset": None,
    "test_subset": None,
    "epochs": 400,
    "batch_size": 1024,
    "lr": 0.8,
    "warmup_epochs": 10.0,
}  # MAN++ / InfoPro CIFAR recipe (BENCHMARKS.md reference numbers)
COLUMNS = [
    "method",
    "seeds",
    "test_error_mean",
    "test_error_std",
    "errors",
    "gap_closed",
    "peak_activation_MiB",
    "ratio_to_bp",
    "time_per_epoch_s",
]


def base_of(spec: str) -> str | None:
    return BASES.get(parse_spec(spec)[0])


def overrides(
    budget: dict[str, Any],
    backbone: str,
    k: int,
    method: str,
    seed: int,
    runs_dir: str,
    threads: int | None,
    device: str,
) -> list[str]:
    name, options = parse_spec(method)
    e2e = name == "bp"
    out = [
        f"seed={seed}",
        f"out_dir={runs_dir}",
        f"name={SAFE.sub('_', method)}-seed{seed}",
        f"data.name={budget['dataset']}",
        f"data.batch_size={budget['batch_size']}",
        "data.test_batch_size=500",
        f"data.train_subset={'null' if budget['train_subset'] is None else budget['train_subset']}",
        f"data.test_subset={'null' if budget['test_subset'] is None else budget['test_subset']}",
        f"model.backbone={backbone}",
        f"model.num_blocks={1 if e2e else k}",
        "model.split=even",
        f"method.name={name}",
        *options,
        f"optim.lr={budget['lr']}",
        f"optim.epochs={budget['epochs']}",
        f"optim.warmup_epochs={budget['warmup_epochs']}",
        f"engine.device={device}",
        "checkpoint_every=1000000",
    ]
    if threads:
        out.append(f"engine.threads={threads}")
    return out


def train_one(job: tuple[str, list[str]]) -> dict[str, Any]:
    """One run in a worker process: its summary (labelled with the method spec) plus the history."""
    from locallearn.config import load_config
    from locallearn.run import Run

    label, args = job
    run = Run(load_config(None, args), quiet=True)
    summary = run.fit()
    summary["history"] = run.history
    summary["method"] = label
    return summary


def run(
    methods: Sequence[str] = METHODS,
    seeds: Sequence[int] = (0, 1),
    backbone: str = "resnet32",
    k: int = 16,
    dataset: str = "fashion_mnist",
    train_subset: int | None = 4000,
    test_subset: int | None = 2000,
    epochs: int = 3,
    batch_size: int = 64,
    lr: float = 0.05,
    warmup_epochs: float = 0.5,
    full: bool = False,
    jobs: int = 1,
    threads: int | None = None,
    device: str = "auto",
    out_dir: str | Path = "benchmarks/results",
    runs_dir: str = "runs/bench-accuracy",
    name: str = "accuracy",
) -> str:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    budget = {
        "dataset": dataset,
        "train_subset": train_subset,
        "test_subset": test_subset,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "warmup_epochs": warmup_epochs,
    }
    if full:
        budget.update(FULL)
    methods = list(dict.fromkeys(["bp", *methods]))
    # the costliest methods first, so that parallel workers finish together
    jobs_args = [
        (m, overrides(budget, backbone, k, m, s, runs_dir, threads, device))
        for m in reversed(methods)
        for s in seeds
    ]
    t0 = time.perf_counter()
    if jobs > 1:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            summaries = list(pool.map(train_one, jobs_args))
    else:
        summaries = [train_one(a) for a in jobs_args]
    wall = time.perf_counter() - t0
    log.info("accuracy grid: %d runs in %.0f s", len(summaries), wall)
    return write(summaries, methods, budget, backbone, k, out_dir, name, wall, jobs, threads)


def write(
    summaries, methods, budget, backbone, k, out_dir: Path, name: str, wall: float, jobs: int, threads
) -> str:
    curves = [
        {"method": s["method"], "seed": s["seed"], "epoch": h["epoch"], "test_error": 100.0 - h["test_top1"]}
        for s in summaries
        for h in s["history"]
    ]
    write_csv(out_dir / f"{name}_curves.csv", curves, ["method", "seed", "epoch", "test_error"])
    by_method: dict[str, list[dict]] = {m: [s for s in summaries if s["method"] == m] for m in methods}
    rows = []
    for m in methods:
        runs = by_method[m]
        errors = [s["final_test_error"] for s in runs]
        per_image = statistics.mean(s["memory"]["activation_bytes_per_image"] for s in runs)
        rows.append(
            {
                "method": m,
                "seeds": len(runs),
                "test_error_mean": statistics.mean(errors),
                "test_error_std": statistics.stdev(errors) if len(errors) > 1 else 0.0,
                "errors": " / ".join(f"{e:.2f}" for e in errors),
                "peak_activation_MiB": per_image * budget["batch_size"] / 2**20,
                "time_per_epoch_s": statistics.mean(s["time_per_epoch_s"] for s in runs),
            }
        )
    mean = {r["method"]: r["test_error_mean"] for r in rows}
    bp_mem = rows[0]["peak_activation_MiB"]
    for r in rows:
        r["ratio_to_bp"] = r["peak_activation_MiB"] / bp_mem
        base = base_of(r["method"])
        if base in mean and "bp" in mean and mean[base] != mean["bp"]:
            r["gap_closed"] = (mean[base] - r["test_error_mean"]) / (mean[base] - mean["bp"])
    write_csv(out_dir / f"{name}.csv", rows, COLUMNS)
    plot_curves(curves, methods, out_dir / f"{name}_curves.png", budget)
    ckpt = checkpoint_ratio(out_dir / "memory.csv", backbone, k)
    plot_vs_memory(rows, ckpt, out_dir / f"{name}_vs_memory.png", budget)
    images = budget["train_subset"] or "all 60000"
    notes = [
        f"data: {budget['dataset']}, {images} training images, {budget['test_subset'] or 'all'} test images "
        f"(class-balanced first N), {budget['epochs']} epochs, lr {budget['lr']} (SGD, nesterov, cosine, "
        f"{budget['warmup_epochs']} warm-up epochs), augmentation on",
        f"model: {backbone}, K={k} (split even: the layers shared out evenly over the blocks), bp K=1; seeds {sorted({s['seed'] for s in summaries})}",
        f"wall time {wall / 60:.1f} min for {len(summaries)} runs ({jobs} at a time, torch threads {threads or 'default'})",
        "gap_closed = (err_base - err_method) / (err_base - err_bp), on the means; paper (400 epochs, CIFAR-10): "
        "DGL+MAN++ 69%, InfoPro+MAN++ 71%",
        "peak_activation_MiB: saved-tensor bytes of the largest block, measured on the first step at this batch",
    ]
    lines = header(
        "Accuracy: test error on real data, same schedule and seeds", str(budget["batch_size"]), notes=notes
    )
    lines += markdown_table(rows, COLUMNS)
    lines += ["", "## Table I ordering (bp < base+MAN++ < base)", ""]
    for m in methods:
        base = base_of(m)
        if base in mean and m in mean:
            ok = mean["bp"] < mean[m] < mean[base]
            lines.append(
                f"- {m}: bp {mean['bp']:.2f} / {m} {mean[m]:.2f} / {base} {mean[base]:.2f} -> "
                + ("ordering holds" if ok else "ordering does NOT hold")
                + " at this budget"
            )
    lines += [
        "",
        f"![test error over epochs]({name}_curves.png) ![test error vs memory]({name}_vs_memory.png)",
    ]
    md = "\n".join(lines) + "\n"
    (out_dir / f"{name}.md").write_text(md)
    return md


def checkpoint_ratio(path: Path, backbone: str, k: int) -> float | None:
    if not path.exists():
        return None
    for r in read_csv(path):
        if (r["backbone"], r["K"], r["method"]) == (backbone, str(k), CHECKPOINT):
            return float(r["ratio_to_bp"])
    return None


def plot_curves(curves, methods, path: Path, budget) -> None:
    from locallearn.bench.common import plt

    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(6, 4))
    for m in methods:
        pts = [c for c in curves if c["method"] == m]
        epochs = sorted({c["epoch"] for c in pts})
        means = [statistics.mean(c["test_error"] for c in pts if c["epoch"] == e) for e in epochs]
        ax.plot(epochs, means, marker="o", label=m)
        for seed in sorted({c["seed"] for c in pts}):
            run = [c for c in pts if c["seed"] == seed]
            ax.plot(
                [c["epoch"] for c in run],
                [c["test_error"] for c in run],
                lw=0.5,
                alpha=0.4,
                color=ax.lines[-1].get_color(),
            )
    ax.set_xlabel("epoch")
    ax.set_ylabel("test error (%)")
    ax.set_title(f"{budget['dataset']}: mean over seeds (thin: each seed)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot.close(fig)


def plot_vs_memory(rows, ckpt_ratio: float | None, path: Path, budget) -> None:
    from locallearn.bench.common import plt

    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(6, 4))
    points = [(r["method"], r["ratio_to_bp"], r["test_error_mean"], r["test_error_std"]) for r in rows]
    if ckpt_ratio is not None:
        points.append(
            (
                "checkpoint (= bp's gradients)",
                ckpt_ratio,
                rows[0]["test_error_mean"],
                rows[0]["test_error_std"],
            )
        )
    for label, x, y, err in points:
        ax.errorbar([x], [y], yerr=[err], marker="o", capsize=3, label=label)
    ax.set_xlabel("peak activation memory / bp")
    ax.set_ylabel("test error (%)")
    ax.set_title(f"{budget['dataset']}: error vs memory (lower left is better)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot.close(fig)


def add_arguments(p) -> None:
    p.add_argument(
        "--methods",
        nargs="+",
        default=METHODS,
        help="method names, or variants: 'dgl+manpp[momentum.init=copy]'",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--backbone", default="resnet32")
    p.add_argument("-k", "--num-blocks", type=int, default=16)
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--train-subset", type=int, default=4000, help="0 = all")
    p.add_argument("--test-subset", type=int, default=2000, help="0 = all")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05, help="paper: 0.8 at batch 1024 (linear scaling)")
    p.add_argument("--warmup-epochs", type=float, default=0.5)
    p.add_argument(
        "--full", action="store_true", help="the papers' schedule: all data, 400 epochs, batch 1024, lr 0.8"
    )
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (processes)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (engine.threads)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument(
        "--runs-dir", default="runs/bench-accuracy", help="where the individual runs go (not committed)"
    )
    p.add_argument("--name", default="accuracy", help="file stem of the results")


def main(args) -> str:
    return run(
        args.methods,
        args.seeds,
        args.backbone,
        args.num_blocks,
        args.dataset,
        args.train_subset or None,
        args.test_subset or None,
        args.epochs,
        args.batch,
        args.lr,
        args.warmup_epochs,
        args.full,
        args.jobs,
        args.threads,
        args.device,
        args.out,
        args.runs_dir,
        args.name,
    )
