"""Test error and test loss per epoch of several runs on one figure, from their ``metrics.csv``, and a
third panel with each block's own test metric at the last epoch (``test_block{k}_{metric}``: the aux of
block k scored as a predictor of the task) when the runs scored their blocks.

Reads only the per-epoch table every run writes (run/single.py), so it works on unfinished runs too and
builds no model.
"""

from __future__ import annotations

import argparse
import csv
import re
from pathlib import Path

from locallearn.analysis.runs import out_dir, write_csv
from locallearn.config import ConfigError, load_config


def read_metrics(run_dir: str | Path) -> list[dict[str, str]]:
    path = Path(run_dir)
    if not path.is_dir():
        raise ConfigError(f"run directory {str(path)!r} does not exist")
    if not (path / "metrics.csv").is_file():
        raise ConfigError(f"{str(path)!r} has no metrics.csv (not a run directory, or no epoch finished yet)")
    with open(path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "test_loss" not in rows[0]:
        raise ConfigError(f"{str(path / 'metrics.csv')!r} holds no per-epoch test_loss column")
    return rows


BLOCK_COLUMN = re.compile(r"test_block(\d+)_(.+)")


def block_scores(row: dict[str, str]) -> tuple[str, list[float]] | None:
    """The metric name and each block's score in one ``metrics.csv`` row (nan: a block not scored),
    or None when the row holds no per-block column."""
    found = {}
    for key, value in row.items():
        m = BLOCK_COLUMN.fullmatch(key or "")
        if m:
            found[int(m.group(1))] = (m.group(2), float(value) if value not in (None, "") else float("nan"))
    if not found:
        return None
    metric = found[min(found)][0]
    return metric, [found[k][1] if k in found else float("nan") for k in range(max(found) + 1)]


def run_label(run_dir: Path) -> str:
    """``method K=k`` from the run's config.yaml, else the directory name."""
    try:
        cfg = load_config(run_dir / "config.yaml")
    except (OSError, ConfigError):
        return run_dir.name
    k = 1 if cfg.method.name == "bp" else cfg.model.num_blocks
    return f"{cfg.method.name} K={k}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    del p  # no options of its own


def main(args: argparse.Namespace) -> str:
    tables = {Path(d): read_metrics(d) for d in args.runs}
    labels = [run_label(d) for d in tables]
    labels = [lab if labels.count(lab) == 1 else d.name for lab, d in zip(labels, tables)]
    rows = []
    for label, (d, table) in zip(labels, tables.items()):
        for r in table:
            acc = r.get("test_top1")
            rows.append(
                {
                    "run": label,
                    "run_dir": str(d),
                    "epoch": int(r["epoch"]),
                    "test_error": 100 - float(acc) if acc not in (None, "") else float("nan"),
                    "test_loss": float(r["test_loss"]),
                }
            )
    blocks = []  # each run's per-block scores at its last epoch
    for label, (d, table) in zip(labels, tables.items()):
        scored = block_scores(table[-1])
        for k, value in enumerate(scored[1] if scored else []):
            blocks.append({"run": label, "run_dir": str(d), "block": k, "metric": scored[0], "value": value})
    out = out_dir(args)
    write_csv(out / "curves.csv", rows)
    written = [out / "curves.csv"]
    if blocks:
        write_csv(out / "blocks.csv", blocks)
        written.append(out / "blocks.csv")
    plot(rows, labels, out / "curves.png", blocks)
    lines = ["final test error / loss:"]
    for label in labels:
        last = [r for r in rows if r["run"] == label][-1]
        lines.append(
            f"  {label:<24} epoch {last['epoch']}: {last['test_error']:.2f}% / {last['test_loss']:.4f}"
        )
        mine = [b for b in blocks if b["run"] == label]
        if mine:
            shown = " ".join("-" if b["value"] != b["value"] else f"{b['value']:.2f}" for b in mine)
            lines.append(f"  {'':<24} per block test {mine[0]['metric']}: {shown}")
    files = " and ".join(str(p) for p in [*written, out / "curves.png"])
    return "\n".join([*lines, f"wrote {files}"])


def plot(rows: list[dict], labels: list[str], path: Path, blocks: list[dict] | None = None) -> None:
    from matplotlib.ticker import MaxNLocator

    from locallearn.bench.common import plt

    pyplot = plt()
    if blocks:
        fig, (err, loss, per_block) = pyplot.subplots(1, 3, figsize=(13.5, 3.4))
        for label in labels:
            mine = [b for b in blocks if b["run"] == label]
            if mine:
                per_block.plot(
                    [b["block"] for b in mine], [b["value"] for b in mine], marker="o", ms=3, label=label
                )
        per_block.set_xlabel("block")
        per_block.set_ylabel(f"test {blocks[0]['metric']} of the block's aux (last epoch)")
        per_block.xaxis.set_major_locator(MaxNLocator(integer=True))
        per_block.grid(alpha=0.3)
    else:
        fig, (err, loss) = pyplot.subplots(1, 2, figsize=(9, 3.4))
    for label in labels:
        mine = [r for r in rows if r["run"] == label]
        epochs = [r["epoch"] for r in mine]
        err.plot(epochs, [r["test_error"] for r in mine], marker="o", ms=3, label=label)
        loss.plot(epochs, [r["test_loss"] for r in mine], marker="o", ms=3, label=label)
    err.set_ylabel("test error (%)")
    loss.set_ylabel("test loss")
    for ax in (err, loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    err.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot.close(fig)
