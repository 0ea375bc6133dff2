"""Test error and test loss per epoch of several runs on one figure, from their ``metrics.csv``.

Reads only the per-epoch table every run writes (runner.py), so it works on unfinished runs too and
builds no model.
"""

from __future__ import annotations

import argparse
import csv
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
    out = out_dir(args)
    write_csv(out / "curves.csv", rows)
    plot(rows, labels, out / "curves.png")
    lines = ["final test error / loss:"]
    for label in labels:
        last = [r for r in rows if r["run"] == label][-1]
        lines.append(
            f"  {label:<24} epoch {last['epoch']}: {last['test_error']:.2f}% / {last['test_loss']:.4f}"
        )
    return "\n".join([*lines, f"wrote {out / 'curves.csv'} and {out / 'curves.png'}"])


def plot(rows: list[dict], labels: list[str], path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    from locallearn.bench.common import plt

    pyplot = plt()
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
