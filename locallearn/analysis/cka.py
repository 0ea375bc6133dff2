"""Layer-wise linear CKA of each run's features against a reference run (MAN++ §IV-I, Fig. 6).

Linear CKA (Kornblith et al., ICML 2019, arXiv:1905.00414) of two representations X (n x p) and
Y (n x q) of the same n images is ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) with Xc, Yc the
column-centred features; it is invariant to orthogonal transforms and isotropic scaling, so it compares
what two networks represent, not how their units happen to be ordered. The debiased variant replaces
each HSIC by its unbiased estimator (Song et al. 2012), which removes the upward bias at small n.

Every quantity is a sum over images, so ``LinearCKA`` accumulates feature-space Gram matrices batch by
batch in float64 (p + q)^2 numbers per layer, whatever n is: 10k test images need no n x n matrix.
Features are the pooled per-layer outputs (GAP of NCHW maps, the class token of NLC tokens).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from locallearn.analysis.runs import (
    LoadedRun,
    dataset_name,
    images,
    load_runs,
    out_dir,
    pooled_features,
    write_csv,
)
from locallearn.config import ConfigError


class LinearCKA:
    """Streaming linear CKA between two feature matrices fed in matching mini-batches."""

    def __init__(self) -> None:
        self.n = 0
        self.dx = 0
        self.shift: torch.Tensor | None = None  # first batch's mean: keeps the sums well conditioned
        self.s = self.S = self.P = self.sa = self.A = None

    @torch.no_grad()
    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
        z = torch.cat([x.flatten(1), y.flatten(1)], 1).detach().to("cpu", torch.float64)
        if self.shift is None:
            self.dx, self.shift = x.flatten(1).shape[1], z.mean(0)
            d = z.shape[1]
            self.s, self.S = torch.zeros(d, dtype=z.dtype), torch.zeros(d, d, dtype=z.dtype)
            self.P, self.sa = torch.zeros(d, 2, dtype=z.dtype), torch.zeros(2, dtype=z.dtype)
            self.A = torch.zeros(2, 2, dtype=z.dtype)
        z = z - self.shift  # centred statistics do not change under a shift
        a = torch.stack([z[:, : self.dx].square().sum(1), z[:, self.dx :].square().sum(1)], 1)
        self.n += len(z)
        self.s += z.sum(0)
        self.S += z.T @ z
        self.P += z.T @ a
        self.sa += a.sum(0)
        self.A += a.T @ a

    def value(self, debiased: bool = False) -> float:
        n = self.n
        if n < (4 if debiased else 2):
            raise ValueError(f"CKA needs at least {4 if debiased else 2} images, got {n}")
        m = self.s / n
        C = self.S - n * torch.outer(m, m)  # Zc^T Zc
        blocks = (slice(0, self.dx), slice(self.dx, None))

        def hsic(u: int, v: int) -> torch.Tensor:
            U, V = blocks[u], blocks[v]
            dot = C[U, V].square().sum()
            if not debiased:
                return dot
            # sum_i |xc_i|^2 |yc_i|^2 from the shifted sums: |xc_i|^2 = a_i - 2 z_i.m + |m|^2
            mu, mv = m[U], m[V]
            cu, cv = mu @ mu, mv @ mv
            rr = (
                self.A[u, v]
                - 2 * mv @ self.P[V, u]
                - 2 * mu @ self.P[U, v]
                + 4 * mu @ self.S[U, V] @ mv
                + cv * self.sa[u]
                + cu * self.sa[v]
                - 2 * cv * (mu @ self.s[U])
                - 2 * cu * (mv @ self.s[V])
                + n * cu * cv
            )
            ru, rv = C[U, U].trace(), C[V, V].trace()  # sum_i |xc_i|^2
            return dot - n / (n - 2) * rr + ru * rv / ((n - 1) * (n - 2))

        xy, xx, yy = hsic(0, 1), hsic(0, 0), hsic(1, 1)
        denom = (xx * yy).sqrt()
        return float(xy / denom) if denom > 0 else float("nan")


def linear_cka(x: torch.Tensor, y: torch.Tensor, debiased: bool = False) -> float:
    """Linear CKA of two whole feature matrices (rows = the same images)."""
    acc = LinearCKA()
    acc.update(x, y)
    return acc.value(debiased)


def layerwise_cka(
    runs: list[LoadedRun], reference: LoadedRun, n: int | None, batch_size: int, debiased: bool
) -> dict[str, list[float]]:
    """CKA of layer l of each run against layer l of the reference, on the same n test images."""
    accs = {r.label: [LinearCKA() for _ in r.model.backbone.layers] for r in runs}
    device = next(reference.model.parameters()).device
    for batch in images(reference.cfg, n, batch_size):
        x = batch.x.to(device)
        ref = pooled_features(reference.model, x)
        for r in runs:
            for acc, f, g in zip(accs[r.label], pooled_features(r.model, x), ref):
                acc.update(f, g)
    return {label: [a.value(debiased) for a in layer_accs] for label, layer_accs in accs.items()}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--reference", help="the end-to-end run to compare against (default: the bp run among RUNS)"
    )
    p.add_argument("--images", type=int, help="test images (default: the reference run's data.test_subset)")
    p.add_argument("--debiased", action="store_true", help="unbiased HSIC estimator (Song et al. 2012)")
    p.add_argument("--batch-size", type=int, default=500)


def main(args: argparse.Namespace) -> str:
    paths = list(args.runs) + ([args.reference] if args.reference else [])
    loaded = load_runs(paths, args.device, args.data)
    if args.reference:
        reference = loaded[-1]
        runs = [r for r in loaded[:-1] if r.run_dir.resolve() != reference.run_dir.resolve()]
    else:
        bps = [r for r in loaded if r.cfg.method.name == "bp"]
        if not bps:
            raise ConfigError("cka needs a reference run: pass --reference BP_RUN or include a bp run")
        reference = bps[0]
        runs = [r for r in loaded if r is not reference]
    if not runs:
        raise ConfigError("cka needs at least one run besides the reference")
    n = args.images if args.images is not None else reference.cfg.data.test_subset
    values = layerwise_cka(runs, reference, n, args.batch_size, args.debiased)
    out = out_dir(args)
    kind = "debiased linear CKA" if args.debiased else "linear CKA"
    rows = [
        {"run": r.label, "run_dir": str(r.run_dir), "layer": i, "layer_type": type(layer).__name__, "cka": v}
        for r in runs
        for i, (layer, v) in enumerate(zip(r.model.backbone.layers, values[r.label]))
    ]
    write_csv(out / "cka.csv", rows)
    plot(values, out / "cka.png", f"{kind} vs {reference.label}, {dataset_name(reference.cfg)} test images")
    lines = [f"{kind} per layer against {reference.label} ({reference.run_dir}):"]
    lines += [f"  {label:<24} mean {statistics.mean(v):.3f}  last {v[-1]:.3f}" for label, v in values.items()]
    return "\n".join([*lines, f"wrote {out / 'cka.csv'} and {out / 'cka.png'}"])


def plot(values: dict[str, list[float]], path: Path, title: str) -> None:
    from locallearn.bench.common import plt

    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(6, 3.6))
    for label, v in values.items():
        ax.plot(range(len(v)), v, marker="o", ms=3, label=f"{label} (mean {statistics.mean(v):.2f})")
    ax.set_xlabel("layer")
    ax.set_ylabel("CKA")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot.close(fig)
