"""Does sizing the aux nets to an outside model cost accuracy? A short real run (issue 26 §2).

A model of one's own whose last stage ends in a wide 1x1 conv (as ShuffleNet's ``conv5``: the case
where the papers' DGL head is largest), through ``locallearn.wrap`` on scikit-learn's digits (1500
train / 297 test, grey 8x8 upsampled to 16 px, 3 channels), K=3, SGD lr 0.05 with InfoPro's cosine
over 3 epochs, batch 64, one CPU thread. Each method twice: the default build (aux nets sized
to the backbone: ``locallearn/aux_budget.py``) and the papers' sizes on the same model
(``method.<base>.width`` large enough to change nothing, ``method.momentum.copy=layer``).

    python benchmarks/aux_sizes_accuracy.py    # writes benchmarks/results/aux_sizes_accuracy.md
    python benchmarks/aux_sizes_accuracy.py --defaults   # writes .../aux_defaults_accuracy.md
    python benchmarks/aux_sizes_accuracy.py --defaults --only mlaan   # rerun these rows, keep the rest

``--defaults`` checks the outside-model defaults chosen for the whole step below ``bp``'s (issue 26):
torchvision's ResNet-18 (residual units, so a copy of the next layer's first op differs from a copy of
its first unit) on the same digits at 24 px for 2 epochs, each method by default and with the values those
defaults replaced (``method.momentum.copy=unit``, ``method.infopro.recon_at=input``, SLM's bank from C1,
``method.mlaan.recompute=false``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models import resnet18

import locallearn
from locallearn.methods import slm

OUT = Path(__file__).resolve().parent / "results" / "aux_sizes_accuracy.md"
DEFAULTS_OUT = OUT.with_name("aux_defaults_accuracy.md")
DEFAULTS_SIZE, DEFAULTS_EPOCHS = 24, 2  # short: ResNet-18 on one shared CPU thread
BEFORE = {"method.momentum.copy": "unit", "method.infopro.recon_at": "input"}  # the replaced defaults
EPOCHS, SIZE, K, SEEDS = 3, 16, 3, (0, 1)
PAPER = {"width": 1 << 20}  # larger than any channel count: the papers' widths


def block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class WideTail(nn.Module):
    """Stem, three stages of two conv units, a 1x1 conv to 512 channels, a pooled classifier."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = block(3, 16)
        self.stage1 = nn.Sequential(block(16, 32, 2), block(32, 32))
        self.stage2 = nn.Sequential(block(32, 64, 2), block(64, 64))
        self.stage3 = nn.Sequential(block(64, 128, 2), block(128, 128))
        self.conv5 = nn.Sequential(nn.Conv2d(128, 512, 1, bias=False), nn.BatchNorm2d(512), nn.ReLU())
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv5(self.stage3(self.stage2(self.stage1(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


def data(size: int = SIZE) -> tuple[DataLoader, DataLoader]:
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).div(16).unsqueeze(1)
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    x = (x - 0.5) / 0.25
    y = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(0)
    train = DataLoader(
        TensorDataset(x[:1500], y[:1500]), batch_size=64, shuffle=True, drop_last=True, generator=g
    )
    return train, DataLoader(TensorDataset(x[1500:], y[1500:]), batch_size=512)


def run(
    method: str,
    paper: bool,
    seed: int,
    model=WideTail,
    size: int = SIZE,
    options: dict | None = None,
    epochs: int = EPOCHS,
) -> tuple[float, dict[str, int], float]:
    train, test = data(size)
    base = method.partition("+")[0]
    options = dict(options or {})
    if paper and base != "bp":
        options[f"method.{base}.width"] = PAPER["width"]
    if paper and "+" in method:
        options["method.momentum.copy"] = "layer"
    torch.manual_seed(seed)
    ll = locallearn.wrap(
        model(num_classes=10),
        method=method,
        num_blocks=1 if method == "bp" else K,
        input_size=size,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        lr=0.05,
        epochs=epochs,
        steps_per_epoch=len(train),
        device="cpu",
        seed=seed,
        options=options,
    )
    start = time.perf_counter()
    for _ in range(epochs):
        ll.train()
        for xb, yb in train:
            ll.step(xb, yb)
    return ll.evaluate(test)["top1"], ll.model.parameter_counts(), time.perf_counter() - start


def row(method: str, kind: str, results: list[tuple], seconds: bool = False) -> str:
    """A table row: aux / backbone parameters, each seed's top-1, their mean (and the mean seconds per run)."""
    tops, counts = [r[0] for r in results], results[0][1]
    cells = [method, kind, f"{counts['aux'] / counts['backbone']:.2f}", ", ".join(f"{t:.1f}" for t in tops),
             f"{sum(tops) / len(tops):.1f}"]  # fmt: skip
    if seconds:
        cells.append(f"{sum(r[2] for r in results) / len(results):.0f}")
    return "| " + " | ".join(cells) + " |"


def defaults() -> None:
    """``--defaults``: ResNet-18 by default and with the values the outside-model defaults replaced."""
    lines = [
        "| method | build | aux / backbone | test top1 (seeds " + ", ".join(map(str, SEEDS)) + ") | mean |",
        "|---|---|---:|---|---:|",
    ]
    rows = [
        ("bp", {}, "—"),
        ("dgl+manpp", {}, "default: copy of the next layer's first op"),
        ("dgl+manpp", {"method.momentum.copy": "unit"}, "`method.momentum.copy=unit` (before)"),
        ("infopro+manpp", {}, "default: first op, `recon_at=feature`"),
        ("infopro+manpp", BEFORE, "`copy=unit`, `recon_at=input` (before)"),
        ("slm", {}, "default: bank from C2"),
        ("slm", {"bank from C1": True}, "bank from C1 (before)"),
        ("mlaan", {}, "default: `recompute` (block k-1 recomputed in backward)"),
        ("mlaan", {"method.mlaan.recompute": False}, "`method.mlaan.recompute=false`"),
    ]
    only = sys.argv[sys.argv.index("--only") + 1].split(",") if "--only" in sys.argv else None
    if only:  # rerun these methods' rows; the others are kept from the results file
        kept = {}
        if DEFAULTS_OUT.exists():
            for line in DEFAULTS_OUT.read_text().splitlines():
                cells = line.split(" | ")
                if line.startswith("| ") and len(cells) > 2:
                    kept[cells[0][2:], cells[1]] = line
    for method, options, kind in rows:
        if only and method not in only:
            if (method, kind) in kept:
                lines.append(kept[method, kind])
            continue
        # the bank's first level is a constant, not an option: put back the one it replaced here
        slm.OUTSIDE_MIN_REDUCTION = 1 if options.pop("bank from C1", False) else 4
        results = [run(method, False, s, resnet18, DEFAULTS_SIZE, options, DEFAULTS_EPOCHS) for s in SEEDS]
        lines.append(row(method, kind, results))
        print(lines[-1], flush=True)
    note = (
        f"\ntorchvision ResNet-18 (`locallearn.wrap`) on digits at {DEFAULTS_SIZE} px, K={K}, {DEFAULTS_EPOCHS} epochs, "
        "batch 64, SGD lr 0.05, 1 CPU thread. Produced by `python benchmarks/aux_sizes_accuracy.py --defaults`.\n"
    )
    DEFAULTS_OUT.parent.mkdir(parents=True, exist_ok=True)
    DEFAULTS_OUT.write_text("\n".join(lines) + "\n" + note)
    print(DEFAULTS_OUT.read_text())  # a script, not library code


def main() -> None:
    torch.set_num_threads(1)
    if "--defaults" in sys.argv[1:]:
        defaults()
        return
    lines = [
        "| method | aux nets | aux / backbone | test top1 (seeds "
        + ", ".join(map(str, SEEDS))
        + ") | mean | s per run |",
        "|---|---|---:|---|---:|---:|",
    ]
    for method, paper in [
        ("bp", False),
        ("dgl+manpp", True),
        ("dgl+manpp", False),
        ("infopro+manpp", True),
        ("infopro+manpp", False),
    ]:
        results = [run(method, paper, s) for s in SEEDS]
        kind = "—" if method == "bp" else ("papers' sizes" if paper else "default (sized)")
        lines.append(row(method, kind, results, seconds=True))
        print(lines[-1], flush=True)
    note = (
        f"\nWideTail (a model of one's own, this script) on digits at {SIZE} px, K={K}, {EPOCHS} epochs, batch 64, 1 CPU thread. "
        "Produced by `python benchmarks/aux_sizes_accuracy.py`.\n"
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n" + note)
    print(OUT.read_text())  # a script, not library code


if __name__ == "__main__":
    main()
