"""Linear separability of every layer's features: a linear probe per layer, trained on frozen features.

The probe is a closed-form ridge least-squares classifier (one-hot targets, argmax prediction; Rifkin
et al. 2003 find it on par with a linear SVM / logistic regression). Closed form because it is exact
and deterministic: one pass over the training images accumulates X^T X and X^T Y per layer in float64
(p^2 numbers, whatever the number of images), a p x p solve fits it, and no learning rate or epoch
count can make one method look better than another. Features are the pooled per-layer outputs (GAP of
NCHW maps, the class token of NLC tokens); accuracy is measured on the test images.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from locallearn.analysis.runs import (
    LoadedRun,
    data_shape,
    dataset_name,
    images,
    load_runs,
    out_dir,
    pooled_features,
    write_csv,
)


class RidgeProbe:
    """Streaming ridge regression onto one-hot labels, with a bias (fitted on centred features)."""

    def __init__(self, num_classes: int, ridge: float = 1e-3) -> None:
        self.num_classes = num_classes
        self.ridge = ridge  # relative to the mean feature variance, so the scale of a layer does not matter
        self.n = 0
        self.sx = self.sy = self.xx = self.xy = None
        self.W: torch.Tensor | None = None
        self.b: torch.Tensor | None = None

    @torch.no_grad()
    def update(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        x = x.flatten(1).to("cpu", torch.float64)
        y = torch.nn.functional.one_hot(labels.cpu(), self.num_classes).to(torch.float64)
        if self.xx is None:
            p = x.shape[1]
            self.sx, self.sy = torch.zeros(p, dtype=x.dtype), torch.zeros(self.num_classes, dtype=x.dtype)
            self.xx, self.xy = (
                torch.zeros(p, p, dtype=x.dtype),
                torch.zeros(p, self.num_classes, dtype=x.dtype),
            )
        self.n += len(x)
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.xx += x.T @ x
        self.xy += x.T @ y

    def fit(self) -> RidgeProbe:
        if self.n == 0:
            raise ValueError("the probe saw no training images")
        mx, my = self.sx / self.n, self.sy / self.n
        cxx = self.xx - self.n * torch.outer(mx, mx)
        cxy = self.xy - self.n * torch.outer(mx, my)
        lam = self.ridge * max(cxx.trace().item() / len(cxx), 1e-12)
        self.W = torch.linalg.solve(cxx + lam * torch.eye(len(cxx), dtype=cxx.dtype), cxy)
        self.b = my - mx @ self.W
        return self

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        if self.W is None:
            raise RuntimeError("fit the probe first")
        return (x.flatten(1).to("cpu", torch.float64) @ self.W + self.b).argmax(1)


def layerwise_probe(
    run: LoadedRun, train_images: int | None, test_images: int | None, batch_size: int, ridge: float
) -> list[float]:
    """Test accuracy (%) of a linear probe on each layer's pooled features."""
    device = next(run.model.parameters()).device
    _, num_classes = data_shape(run.cfg)
    probes = [RidgeProbe(num_classes, ridge) for _ in run.model.backbone.layers]
    for batch in images(run.cfg, train_images, batch_size, train=True):
        for probe, f in zip(probes, pooled_features(run.model, batch.x.to(device))):
            probe.update(f, batch.y)
    for probe in probes:
        probe.fit()
    hits, total = [0] * len(probes), 0
    for batch in images(run.cfg, test_images, batch_size):
        total += len(batch)
        for i, (probe, f) in enumerate(zip(probes, pooled_features(run.model, batch.x.to(device)))):
            hits[i] += (probe.predict(f) == batch.y.cpu()).sum().item()
    return [100.0 * h / total for h in hits]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--train-images", type=int, help="probe training images (default: the run's data.train_subset)"
    )
    p.add_argument("--images", type=int, help="test images (default: the run's data.test_subset)")
    p.add_argument("--ridge", type=float, default=1e-3, help="ridge, relative to the mean feature variance")
    p.add_argument("--batch-size", type=int, default=500)


def main(args: argparse.Namespace) -> str:
    runs = load_runs(args.runs, args.device, args.data)
    values = {}
    for r in runs:
        train_n = args.train_images if args.train_images is not None else r.cfg.data.train_subset
        test_n = args.images if args.images is not None else r.cfg.data.test_subset
        values[r.label] = layerwise_probe(r, train_n, test_n, args.batch_size, args.ridge)
    out = out_dir(args)
    rows = [
        {
            "run": r.label,
            "run_dir": str(r.run_dir),
            "layer": i,
            "layer_type": type(layer).__name__,
            "test_acc": v,
        }
        for r in runs
        for i, (layer, v) in enumerate(zip(r.model.backbone.layers, values[r.label]))
    ]
    write_csv(out / "probe.csv", rows)
    plot(values, out / "probe.png", f"linear probe per layer, {dataset_name(runs[0].cfg)} test accuracy")
    lines = ["linear probe test accuracy per layer (%):"]
    lines += [f"  {label:<24} " + " ".join(f"{v:.1f}" for v in acc) for label, acc in values.items()]
    return "\n".join([*lines, f"wrote {out / 'probe.csv'} and {out / 'probe.png'}"])


def plot(values: dict[str, list[float]], path: Path, title: str) -> None:
    from locallearn.bench.common import plt

    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(6, 3.6))
    for label, v in values.items():
        ax.plot(range(len(v)), v, marker="o", ms=3, label=label)
    ax.set_xlabel("layer")
    ax.set_ylabel("probe test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot.close(fig)
