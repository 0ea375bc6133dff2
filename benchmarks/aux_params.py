"""Parameter counts of each method's aux nets on ResNet-32 (CIFAR-10, 32x32, 10 classes), K=16, next to
the backbone's. Measured by building each model, not computed by hand.

    python benchmarks/aux_params.py            # prints the table, writes benchmarks/results/aux_params.md
"""

from __future__ import annotations

from pathlib import Path

from locallearn.build import build_model
from locallearn.config import load_config
from locallearn.types import InputInfo

CIFAR = InputInfo(channels=3, size=32, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
BASES = ["dgl", "infopro", "predsim", "auglocal", "mlaan", "slm"]
METHODS = ["bp", *BASES, *(f"{b}+manpp" for b in BASES if b != "mlaan")]
OUT = Path(__file__).resolve().parent / "results" / "aux_params.md"


def count(method: str, num_blocks: int = 16) -> dict[str, int]:
    k = 1 if method == "bp" else num_blocks
    overrides = [f"method.name={method}", "model.backbone=resnet32", f"model.num_blocks={k}"]
    overrides += ["model.split=infopro"] if k > 1 else []
    model, _, _ = build_model(load_config(None, overrides), CIFAR, 10)
    return {"K": k, **model.parameter_counts()}


def table() -> str:
    rows = [
        "| method | K | backbone + head | aux (all) | aux (trainable) | aux / backbone |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for method in METHODS:
        c = count(method)
        rows.append(
            f"| {method} | {c['K']} | {c['backbone']:,} | {c['aux']:,} | {c['aux_trainable']:,} "
            f"| {c['aux'] / c['backbone']:.2f}x |"
        )
    note = (
        "\nResNet-32, CIFAR-10 input (3x32x32, 10 classes), InfoPro K=16 split (every layer its own block), "
        "each method's default Config; 'aux (all)' includes frozen EMA copies, 'trainable' does not. "
        "bp is K=1 (no aux). Produced by `python benchmarks/aux_params.py`.\n"
    )
    return "\n".join(rows) + "\n" + note


def main() -> None:
    text = table()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(text)  # a script, not library code


if __name__ == "__main__":
    main()
