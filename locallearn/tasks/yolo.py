"""YOLOv1 (Redmon et al., "You Only Look Once", CVPR 2016, arXiv:1506.02640): head, loss and decoding.

The memory-augmented MAN paper (Appendix A.3) trains a "ResNet-based YOLOv1": a ResNet backbone, a grid of
S x S cells, B boxes per cell, each box ``(x, y, sqrt w, sqrt h, confidence)`` and one class distribution per
cell, trained with the sum-squared loss of the paper (λcoord 5, λnoobj 0.5). No maintained library ships this
loss, so it is written here; IoU and NMS come from ``torchvision.ops``.

Layout of the last dimension of a prediction (``B*5 + C``): box ``b`` is ``pred[..., 5b:5b+5]`` =
``(x, y, sqrt w, sqrt h, conf)``, then ``C`` class logits. ``x, y`` are the box centre's offset inside its cell
in [0, 1]; ``w, h`` are relative to the padded input (the grid covers the padded input, as the feature map
does); the network predicts their square roots, as the paper does, so that an error on a small box costs more.

Choices the paper leaves open, or where we deviate from it (darknet's ``detection_layer`` where it decides):
- Sigmoid on ``x, y``, ``sqrt w, sqrt h`` and the confidence (darknet uses linear outputs): every one of them
  lies in [0, 1] (``w, h`` are fractions of the input). Linear ``sqrt w, sqrt h`` make the coordinate loss
  unbounded, and from scratch with SGD 0.01 (momentum 0.9) a ResNet-18 YOLOv1 went from loss 36 to 1e4 in
  three steps and 5e6 in six; with the sigmoid, 15.6 to 0.9 (issue 19; tests/tasks/test_yolo.py).
- Class probabilities are a softmax over the cell's logits, with squared error against the one-hot label (the
  paper's squared error on probabilities), so ``conf x prob`` is a proper class-specific score.
- Confidence target of the responsible box = its IoU with the ground truth, detached (the paper; darknet's
  ``rescore=1``); ``rescore=False`` uses 1, which many re-implementations prefer early in training.
- The responsible box is the one of the cell's B boxes with the highest IoU; when all IoUs are 0 (e.g. at
  initialisation) the one with the smallest coordinate error, as darknet does, instead of always box 0.
- The non-responsible boxes of an object cell get the no-object term (target 0), as in darknet.
- One object per cell: if several box centres fall in one cell, the largest box (by area) is kept.
- Boxes with zero width or height are ignored. The loss is summed and divided by the batch size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import nn


class YoloV1Head(nn.Module):
    """YOLOv1 head on a backbone's last ``NCHW`` feature map of any spatial size.

    Two conv3x3-BN-LeakyReLU(0.1) layers, adaptive average pool to ``grid x grid``, then a 1x1 conv to
    ``boxes*5 + num_classes`` channels. The paper ends in a 4096-wide fully connected layer on a fixed 448 px
    input; ResNet-YOLOv1 re-implementations use a convolutional head like this one, which also takes the
    variable (padded) input sizes of detection batches. ``forward`` returns raw predictions ``(N, S, S, B*5+C)``.
    """

    def __init__(
        self, in_chs: int, num_classes: int, grid: int = 7, boxes: int = 2, hidden: int = 512
    ) -> None:
        super().__init__()
        self.grid, self.boxes, self.num_classes = grid, boxes, num_classes
        self.body = nn.Sequential(
            nn.Conv2d(in_chs, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.LeakyReLU(0.1, inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.out = nn.Conv2d(hidden, boxes * 5 + num_classes, 1)

    def forward(self, h: torch.Tensor, update_stats: bool = True) -> torch.Tensor:
        """``update_stats=False``: in training, BatchNorm normalises with the batch's statistics as usual
        but leaves the running statistics alone (``F.batch_norm`` without the buffers). Aux nets that
        share this head call it so: the running statistics the head evaluates with are the main path's,
        not an average over every aux's features (K updates per step, K-1 of them on aux features)."""
        if h.dim() != 4:
            raise ValueError(f"YoloV1Head takes an NCHW feature map, got shape {tuple(h.shape)}")
        if min(h.shape[-2:]) < self.grid:
            # A map smaller than the grid (C5 of an input under 32 * grid px, e.g. 4x6 at 128 px): the
            # adaptive pool would copy one feature into several cells, which then cannot predict different
            # boxes or "object here / not here". Upsampled first, the 3x3 convs see each cell's own mix.
            size = (max(h.shape[-2], self.grid), max(h.shape[-1], self.grid))
            h = F.interpolate(h, size=size, mode="bilinear", align_corners=False)
        if update_stats or not self.training:
            h = self.body(h)
        else:
            for layer in self.body:
                if isinstance(layer, nn.BatchNorm2d):
                    h = F.batch_norm(h, None, None, layer.weight, layer.bias, True, 0.0, layer.eps)
                else:
                    h = layer(h)
        return self.out(self.pool(h)).permute(0, 2, 3, 1)


class YoloLocalHead(nn.Module):
    """An aux's YOLOv1 head: its deepest map, plus the other stage maps it is given (``fuse``: the
    banked C3 / C4 of earlier blocks, or its own replica's) average-pooled to that map's size, each
    through a 1x1 conv and added (the memory-augmented MAN paper's Eq. 5: the bank is an input of the
    aux). The 1x1 convs start at zero, so a fresh aux predicts as the plain one and learns how much of
    the bank to use (as SLM's classification aux does). Then its own YOLOv1 head, or with ``shared`` a
    1x1 projection into the main head, run without moving the main head's BN statistics."""

    def __init__(
        self,
        features: dict,
        main_chs: int,
        num_classes: int,
        grid: int,
        boxes: int,
        fuse: tuple[str, ...] = (),
        shared=None,
    ) -> None:
        super().__init__()
        self.source = max(features, key=lambda n: features[n].reduction)
        chs = features[self.source].num_chs
        self.fused = tuple(n for n in fuse if n in features and n != self.source)
        self.fuse = nn.ModuleList(nn.Conv2d(features[n].num_chs, chs, 1) for n in self.fused)
        for conv in self.fuse:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        self._shared = shared  # a HeadRef: not registered, the last block owns the main head
        if shared is None:
            self.head = YoloV1Head(chs, num_classes, grid, boxes)
        else:
            shared.lend("")  # the whole main head
            self.head = nn.Conv2d(chs, main_chs, 1)

    def forward(self, maps: dict[str, torch.Tensor]) -> torch.Tensor:
        h = maps[self.source]
        for name, conv in zip(self.fused, self.fuse):
            h = h + conv(F.adaptive_avg_pool2d(maps[name], h.shape[-2:]))
        out = self.head(h)
        return out if self._shared is None else self._shared()(out, update_stats=False)


def _split(
    pred: torch.Tensor, boxes: int, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw ``(N, S, S, B*5+C)`` -> activated boxes ``(N, S, S, B, 4)`` (x, y, sqrt w, sqrt h), conf
    ``(N, S, S, B)``, class probabilities ``(N, S, S, C)``."""
    if pred.dim() != 4 or pred.shape[1] != pred.shape[2] or pred.shape[3] != boxes * 5 + num_classes:
        raise ValueError(
            f"expected predictions (N, S, S, {boxes * 5 + num_classes}) for {boxes} boxes and {num_classes} "
            f"classes, got {tuple(pred.shape)}"
        )
    box = pred[..., : boxes * 5].unflatten(-1, (boxes, 5))
    xywh = box[..., :4].sigmoid()
    return xywh, box[..., 4].sigmoid(), pred[..., boxes * 5 :].softmax(-1)


def _to_xyxy(xywh: torch.Tensor, grid: int) -> torch.Tensor:
    """Cell-encoded ``(..., S, S, [B,] 4)`` (x, y, sqrt w, sqrt h) -> xyxy relative to the padded input."""
    s = torch.arange(grid, device=xywh.device, dtype=xywh.dtype)
    extra = (1,) * (xywh.dim() - 4)  # the box dimension, when there is one
    cx = (xywh[..., 0] + s.view(1, grid, *extra)) / grid  # columns run along the last grid axis
    cy = (xywh[..., 1] + s.view(grid, 1, *extra)) / grid
    w, h = xywh[..., 2].square(), xywh[..., 3].square()
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def _pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise IoU of two broadcastable xyxy tensors (``box_iou`` is all-pairs). The union is clamped so
    empty cells (zero boxes on both sides) give 0, not NaN."""
    wh = (torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area = (a[..., 2:] - a[..., :2]).prod(-1) + (b[..., 2:] - b[..., :2]).prod(-1)
    return inter / (area - inter).clamp(min=1e-12)


def yolo_v1_encode(
    targets: Sequence[dict],
    image_size: tuple[int, int],
    num_classes: int,
    grid: int = 7,
    *,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Per-cell targets: ``obj`` bool ``(N, S, S)``, ``box`` ``(N, S, S, 4)`` (x, y, sqrt w, sqrt h) and
    ``labels`` int64 ``(N, S, S)`` (``-1`` where no object). Cell = the one holding the box centre; of several
    centres in one cell, the largest box wins."""
    H, W = float(image_size[0]), float(image_size[1])
    device = targets[0]["boxes"].device if len(targets) else torch.device("cpu")
    n = len(targets)
    obj = torch.zeros(n, grid * grid, dtype=torch.bool, device=device)
    box = torch.zeros(n, grid * grid, 4, dtype=dtype, device=device)
    labels = torch.full((n, grid * grid), -1, dtype=torch.int64, device=device)
    for i, t in enumerate(targets):
        xyxy, lab = t["boxes"].to(box.dtype).reshape(-1, 4), t["labels"].reshape(-1)
        if lab.numel() and (lab.min() < 0 or lab.max() >= num_classes):
            raise ValueError(f"labels must lie in 0..{num_classes - 1}, got {lab.tolist()}")
        w, h = (xyxy[:, 2] - xyxy[:, 0]) / W, (xyxy[:, 3] - xyxy[:, 1]) / H
        valid = (w > 0) & (h > 0)
        xyxy, lab, w, h = xyxy[valid], lab[valid], w[valid], h[valid]
        # Larger boxes first, then keep each cell's first box: deterministic, unlike overlapping index writes.
        order = (w * h).argsort(descending=True, stable=True)
        xyxy, lab, w, h = xyxy[order], lab[order], w[order], h[order]
        cx = ((xyxy[:, 0] + xyxy[:, 2]) / (2 * W) * grid).clamp(0, grid - 1e-6)
        cy = ((xyxy[:, 1] + xyxy[:, 3]) / (2 * H) * grid).clamp(0, grid - 1e-6)
        col, row = cx.floor().long(), cy.floor().long()
        cell = row * grid + col
        rank = torch.arange(len(cell), device=device)
        first = torch.full((grid * grid,), len(cell), device=device).scatter_reduce(0, cell, rank, "amin")
        keep = first[cell] == rank
        cell = cell[keep]
        obj[i, cell] = True
        box[i, cell] = torch.stack([cx - col, cy - row, w.sqrt(), h.sqrt()], dim=-1)[keep]
        labels[i, cell] = lab[keep]
    unflat = (n, grid, grid)
    return {"obj": obj.view(unflat), "box": box.view(*unflat, 4), "labels": labels.view(unflat)}


def yolo_v1_loss(
    pred: torch.Tensor,
    targets: Sequence[dict],
    image_size: tuple[int, int],
    num_classes: int,
    grid: int = 7,
    boxes: int = 2,
    l_coord: float = 5.0,
    l_noobj: float = 0.5,
    *,
    rescore: bool = True,
) -> dict[str, torch.Tensor]:
    """The YOLOv1 sum-squared loss (paper Eq. 3) over raw predictions ``(N, S, S, B*5+C)``.

    Returns ``loss = coord + obj + noobj + cls``, each part already weighted (λcoord, λnoobj) and divided by
    the batch size N. ``targets``: one dict per image with ``boxes`` xyxy in pixels of the padded input and
    ``labels`` in 0..C-1; ``image_size`` = (H, W) of the padded batch. Each image's ``size`` is not used: the
    grid covers the padded input, and cells in the padding learn "no object" like any empty cell."""
    xywh, conf, prob = _split(pred, boxes, num_classes)
    if xywh.shape[1] != grid:
        raise ValueError(f"predictions have a {xywh.shape[1]}x{xywh.shape[1]} grid, expected {grid}")
    enc = yolo_v1_encode(targets, image_size, num_classes, grid, dtype=pred.dtype)
    obj_cell, tbox = enc["obj"], enc["box"]
    with torch.no_grad():  # the IoU picks the responsible box and is its confidence target, not a path
        iou = _pairwise_iou(_to_xyxy(xywh, grid), _to_xyxy(tbox, grid).unsqueeze(-2))
        err = (xywh - tbox.unsqueeze(-2)).square().sum(-1)
        best = torch.where(iou.amax(-1) > 0, iou.argmax(-1), err.argmin(-1))
    resp = F.one_hot(best, boxes).bool() & obj_cell.unsqueeze(-1)  # (N, S, S, B)
    n = pred.shape[0]
    rbox = xywh[resp]
    coord = l_coord * (rbox - tbox.unsqueeze(-2).expand_as(xywh)[resp]).square().sum()
    conf_target = iou[resp] if rescore else torch.ones_like(iou[resp])
    obj = (conf[resp] - conf_target).square().sum()
    noobj = l_noobj * conf[~resp].square().sum()
    onehot = F.one_hot(enc["labels"][obj_cell], num_classes).to(prob.dtype)
    cls = (prob[obj_cell] - onehot).square().sum()
    parts = {"coord": coord / n, "obj": obj / n, "noobj": noobj / n, "cls": cls / n}
    return {"loss": sum(parts.values()), **parts}


@torch.no_grad()
def yolo_v1_decode(
    pred: torch.Tensor,
    image_size: tuple[int, int],
    sizes: Sequence[tuple[int, int]],
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    max_det: int = 100,
    *,
    num_classes: int | None = None,
    boxes: int = 2,
) -> list[dict[str, torch.Tensor]]:
    """Raw predictions -> per image ``{boxes (m, 4) xyxy pixels, scores (m,), labels (m,)}``.

    Score = confidence x class probability for every (box, class) pair, as the paper does at test time;
    pairs above ``score_thresh`` go through class-wise NMS (``torchvision.ops.batched_nms``), then the top
    ``max_det`` are kept. Boxes are clipped to each image's own (h, w) in ``sizes`` (padding is not image),
    and boxes with no area left after clipping are dropped. ``num_classes`` defaults to what the last
    dimension leaves after ``boxes * 5``."""
    C = pred.shape[-1] - boxes * 5 if num_classes is None else num_classes
    xywh, conf, prob = _split(pred, boxes, C)
    H, W = float(image_size[0]), float(image_size[1])
    scale = torch.tensor([W, H, W, H], dtype=xywh.dtype, device=pred.device)
    all_boxes = (_to_xyxy(xywh, pred.shape[1]) * scale).flatten(1, 3)  # (N, S*S*B, 4)
    scores = (conf.unsqueeze(-1) * prob.unsqueeze(-2)).flatten(1, 3)  # (N, S*S*B, C)
    out = []
    for i, (h, w) in enumerate(sizes):
        hw = torch.tensor([float(w), float(h)], dtype=xywh.dtype, device=pred.device)
        bx = torch.minimum(all_boxes[i].clamp(min=0), hw.repeat(2))
        idx, lab = (scores[i] > score_thresh).nonzero(as_tuple=True)
        bx, sc = bx[idx], scores[i][idx, lab]
        ok = (bx[:, 2] > bx[:, 0]) & (bx[:, 3] > bx[:, 1])
        bx, sc, lab = bx[ok], sc[ok], lab[ok]
        keep = torchvision.ops.batched_nms(bx, sc, lab, nms_thresh)[:max_det]
        out.append({"boxes": bx[keep], "scores": sc[keep], "labels": lab[keep]})
    return out
