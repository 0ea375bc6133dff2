"""Grad-CAM rows: where each run looks when it scores the class (MAN++ §IV-H, Fig. 5).

Grad-CAM (Selvaraju et al., ICCV 2017, arXiv:1610.02391): with A the output of a chosen layer (C maps)
and y_c the final score of class c, the map is ReLU(sum_k alpha_k A_k) with alpha_k the spatial mean of
dy_c/dA_k, upsampled to the image. Token layers (NLC) are mapped back to their patch grid (the class
token is dropped), as in the usual ViT adaptation.

Written here rather than taken from ``grad-cam`` (pytorch-grad-cam, MIT) or ``captum`` (BSD): it is
the fifteen lines of ``grad_cam`` below, while both packages hook modules by name through a model's
attribute tree and bring extra dependencies (opencv, scikit-image / their own plotting stack). A
LocalModel is already a flat list of layers plus a head, so the forward pass is a loop over
``model.backbone.layers`` with the gradient taken at one of them, and no hook is needed.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from locallearn.analysis.runs import (
    LoadedRun,
    dataset_name,
    images,
    load_runs,
    out_dir,
    run_datasets,
    write_csv,
)
from locallearn.config import ConfigError


def tokens_to_map(h: torch.Tensor) -> torch.Tensor:
    """(N, 1 + s*s, C) tokens -> (N, C, s, s) patch grid, class token dropped."""
    side = math.isqrt(h.shape[1] - 1)
    if side * side != h.shape[1] - 1:
        raise ValueError(f"{h.shape[1]} tokens are not a class token plus a square patch grid")
    return h[:, 1:].reshape(h.shape[0], side, side, h.shape[2]).permute(0, 3, 1, 2)


def grad_cam(
    layers: Sequence[nn.Module],
    head: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    layer: int,
    fmt: str = "NCHW",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM of the class scores ``target`` (N,) at the output of ``layers[layer]``.

    Returns the maps (N, H, W), each scaled to [0, 1] at the input resolution, and the logits."""
    with torch.no_grad():
        h = x
        for m in layers[: layer + 1]:
            h = m(h)
    a = h.detach().requires_grad_(True)
    with torch.enable_grad():
        h = a
        for m in layers[layer + 1 :]:
            h = m(h)
        logits = head(h)
        (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), a)
    a = a.detach()
    if fmt == "NLC":
        a, grad = tokens_to_map(a), tokens_to_map(grad)
    weights = grad.mean((2, 3), keepdim=True)
    cam = F.relu((weights * a).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    cam = cam / cam.amax((1, 2), keepdim=True).clamp_min(1e-12)
    return cam, logits.detach()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=int, default=8, help="test images, one column each (default 8)")
    p.add_argument(
        "--layers",
        type=int,
        nargs="+",
        help="layer indices (negative from the end) to take Grad-CAM at; one row per run and layer "
        "(default: the output the task head reads; for token backbones the last layer's input)",
    )
    p.add_argument("--blocks", action="store_true", help="one row per block output of each run instead")
    p.add_argument(
        "--target",
        choices=("label", "pred"),
        default="label",
        help="class to explain (default: the true label)",
    )


def chosen_layers(run: LoadedRun, layers: list[int] | None, blocks: bool) -> list[int]:
    n = len(run.model.backbone.layers)
    if blocks:
        return [c - 1 for c in run.model.cuts] + [n - 1]
    if layers:
        return [i % n for i in layers]
    # A class-token head gives the last layer's patch tokens no gradient: take the map one layer
    # earlier, where the last attention still mixes patches into the class token (the usual ViT choice).
    return [n - 2 if run.model.backbone.feature_info[-1].fmt == "NLC" and n > 1 else n - 1]


def main(args: argparse.Namespace) -> str:
    runs = load_runs(args.runs, args.device, args.data)
    if args.images < 1:
        raise ConfigError(f"--images must be >= 1, got {args.images}")
    num_layers = len(runs[0].model.backbone.layers)
    for i in args.layers or []:
        if not -num_layers <= i < num_layers:
            raise ConfigError(f"--layers {i}: the backbone has {num_layers} layers (0..{num_layers - 1})")
    batch = next(images(runs[0].cfg, args.images, args.images))
    test_set = run_datasets(runs[0].cfg)[1]
    # folder data: class names (sub-folder names) and the folder's own name instead of numbers / "folder"
    names = class_names(test_set)
    dataset = dataset_name(runs[0].cfg)
    picture = batch.image.clamp(0, 1)
    rows, table = [], []
    for r in runs:
        device = next(r.model.parameters()).device
        x = batch.x.to(device)
        for layer in chosen_layers(r, args.layers, args.blocks):
            target = batch.y.to(device)
            if args.target == "pred":
                with torch.no_grad():
                    target = r.model(x).argmax(1)
            fmt = r.model.backbone.feature_info[layer].fmt
            cam, logits = grad_cam(r.model.backbone.layers, r.model.head, x, target, layer, fmt)
            pred, prob = logits.argmax(1).cpu(), logits.softmax(1).gather(1, target[:, None])[:, 0].cpu()
            rows.append((f"{r.label}\nlayer {layer}", cam.cpu(), pred))
            for j in range(len(batch)):
                peak = divmod(int(cam[j].argmax()), cam.shape[-1])
                table.append(
                    {
                        "run": r.label,
                        "run_dir": str(r.run_dir),
                        "layer": layer,
                        "image": j,
                        "label": int(batch.y[j]),
                        "label_name": names(int(batch.y[j])),
                        "target": int(target[j]),
                        "pred": int(pred[j]),
                        "pred_name": names(int(pred[j])),
                        "target_prob": float(prob[j]),
                        "cam_peak_row": peak[0],
                        "cam_peak_col": peak[1],
                        "cam_mean": float(cam[j].mean()),
                    }
                )
    out = out_dir(args)
    write_csv(out / "gradcam.csv", table)
    title = f"Grad-CAM of the {args.target} class score, {dataset} test images"
    plot(picture, batch.y, rows, out / "gradcam.png", title, names)
    return f"Grad-CAM of {len(batch)} images x {len(rows)} rows: wrote {out / 'gradcam.csv'} and {out / 'gradcam.png'}"


def class_names(dataset) -> Callable[[int], str]:
    """Label -> its class name (``dataset.classes``, e.g. folder data), or the number itself."""
    classes = list(getattr(dataset, "classes", None) or [])
    return lambda c: classes[c] if 0 <= c < len(classes) else str(c)


def plot(
    picture: torch.Tensor,
    labels: torch.Tensor,
    rows: list,
    path: Path,
    title: str,
    names: Callable[[int], str] = str,
) -> None:
    from locallearn.bench.common import plt

    pyplot = plt()
    n = len(picture)
    fig, axes = pyplot.subplots(
        len(rows) + 1, n, figsize=(1.3 * n + 1.2, 1.3 * (len(rows) + 1) + 0.4), squeeze=False
    )
    gray = picture.shape[1] == 1
    shown = picture[:, 0] if gray else picture.permute(0, 2, 3, 1)
    for j in range(n):
        axes[0, j].imshow(shown[j].numpy(), cmap="gray" if gray else None, vmin=0, vmax=1)
        axes[0, j].set_title(f"label {names(int(labels[j]))}", fontsize=7)
        for i, (_, cam, pred) in enumerate(rows, start=1):
            ax = axes[i, j]
            ax.imshow(shown[j].numpy(), cmap="gray" if gray else None, vmin=0, vmax=1)
            ax.imshow(cam[j].numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)
            ax.set_title(
                f"pred {names(int(pred[j]))}", fontsize=6, color="black" if pred[j] == labels[j] else "red"
            )
    axes[0, 0].set_ylabel("image", fontsize=7)
    for i, (label, _, _) in enumerate(rows, start=1):
        axes[i, 0].set_ylabel(label, fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot.close(fig)
