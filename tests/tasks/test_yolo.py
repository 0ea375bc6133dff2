"""YOLOv1 head, loss and decoding (locallearn/tasks/yolo.py): encoding round trip, hand-computed loss terms,
gradients, empty images and a short overfit."""

import math

import pytest
import torch
from torchvision.ops import box_iou

from locallearn.tasks.yolo import YoloV1Head, yolo_v1_decode, yolo_v1_encode, yolo_v1_loss

C, S, B = 3, 7, 2


def logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return (p / (1 - p)).log()


def perfect_prediction(targets, image_size, num_classes=C, grid=S) -> torch.Tensor:
    """Raw predictions that encode the targets exactly: box 0 = the ground truth with confidence ~1, box 1 the
    same box with confidence ~0, class logits +-20; empty cells have confidence ~0 everywhere."""
    enc = yolo_v1_encode(targets, image_size, num_classes, grid)
    n = len(targets)
    pred = torch.zeros(n, grid, grid, B * 5 + num_classes, dtype=torch.float64)
    box = enc["box"].double()
    for b in range(B):
        pred[..., 5 * b : 5 * b + 2] = logit(box[..., :2])
        pred[..., 5 * b + 2 : 5 * b + 4] = logit(box[..., 2:])
        pred[..., 5 * b + 4] = -30.0
    pred[..., 4] = torch.where(enc["obj"], 30.0, -30.0)
    labels = enc["labels"].clamp(min=0)
    pred[..., B * 5 :] = -20.0
    pred[..., B * 5 :].scatter_(-1, labels.unsqueeze(-1), 20.0)
    return pred


def sample_targets():
    # Padded batch 96x128; image 1 is smaller (its own size says where the padding starts).
    return [
        {
            "boxes": torch.tensor(
                [[5.0, 6.0, 40.0, 50.0], [60.0, 10.0, 120.0, 90.0], [20.0, 70.0, 30.0, 80.0]]
            ),
            "labels": torch.tensor([0, 2, 1]),
            "size": (96, 128),
        },
        {"boxes": torch.tensor([[10.0, 10.0, 70.0, 60.0]]), "labels": torch.tensor([1]), "size": (64, 80)},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "size": (96, 128)},
    ]


def test_head_shape_any_spatial_size():
    head = YoloV1Head(in_chs=16, num_classes=C, hidden=8)
    for hw in ((3, 5), (7, 7), (19, 25)):
        assert head(torch.randn(2, 16, *hw)).shape == (2, S, S, B * 5 + C)
    with pytest.raises(ValueError, match="NCHW"):
        head(torch.randn(2, 16, 7))


def test_a_map_smaller_than_the_grid_gives_every_cell_its_own_prediction():
    # C5 of a 128-px photo is 4x6: average-pooled up to 7x7, the cells were fixed averages of their
    # neighbours (the 1x1 output conv commutes with the pool), e.g. row 1 = (row 0 + row 2) / 2 exactly,
    # so cells between two others could not say "object here, not there" (YOLOv1 stayed at 0 mAP).
    torch.manual_seed(0)
    head = YoloV1Head(8, 3, grid=7, boxes=2, hidden=16).eval()
    with torch.no_grad():
        out = head(torch.randn(1, 8, 4, 6))
    assert out.shape == (1, 7, 7, 13)
    assert not torch.allclose(out[:, 1], (out[:, 0] + out[:, 2]) / 2, atol=1e-4)


def test_round_trip_decodes_to_the_targets():
    targets, image_size = sample_targets(), (96, 128)
    pred = perfect_prediction(targets, image_size)
    dets = yolo_v1_decode(pred, image_size, [t["size"] for t in targets])
    for t, d in zip(targets, dets, strict=True):
        assert len(d["boxes"]) == len(t["boxes"])
        if len(t["boxes"]) == 0:
            continue
        order = d["boxes"][:, 0].argsort()  # match by left edge: the sample boxes have distinct ones
        truth = t["boxes"][t["boxes"][:, 0].argsort()].double()
        torch.testing.assert_close(d["boxes"][order], truth, atol=1.0, rtol=0)
        assert d["labels"][order].tolist() == t["labels"][t["boxes"][:, 0].argsort()].tolist()
        assert (d["scores"] > 0.99).all()


def test_perfect_loss_is_zero_on_coord_and_cls_and_below_random():
    targets, image_size = sample_targets(), (96, 128)
    perfect = yolo_v1_loss(perfect_prediction(targets, image_size), targets, image_size, C)
    assert perfect["coord"] < 1e-8 and perfect["cls"] < 1e-8
    assert perfect["loss"] < 1e-6
    rand = yolo_v1_loss(torch.randn(3, S, S, B * 5 + C, dtype=torch.float64), targets, image_size, C)
    assert rand["loss"] > 100 * perfect["loss"] + 0.1
    assert torch.isclose(rand["loss"], rand["coord"] + rand["obj"] + rand["noobj"] + rand["cls"])


def test_tiny_case_by_hand():
    # Grid 2 on a 100x100 input: cells are 50 px. GT (10, 20, 50, 40): centre (30, 30) -> cell (0, 0),
    # offsets (0.6, 0.6), w = 0.4, h = 0.2 of the image.
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 50.0, 40.0]]), "labels": torch.tensor([1]), "size": (100, 100)}
    ]
    pred = torch.zeros(1, 2, 2, B * 5 + C, dtype=torch.float64)
    # Box 0: centre (25, 25), sqrt w = sqrt h = 0.2 -> 10x10 px box (20, 20, 30, 30) inside the GT: IoU 100/800.
    pred[0, 0, 0, 2:4] = logit(torch.tensor(0.2, dtype=torch.float64))
    # Box 1: centre (25, 25), 36x25 px -> (7, 12.5, 43, 37.5); intersection 33 x 17.5; union 900 + 800 - 577.5.
    pred[0, 0, 0, 7:9] = logit(torch.tensor([0.6, 0.5], dtype=torch.float64))
    pred[0, 0, 0, 9] = 1.0  # box 1 confidence sigmoid(1); every other confidence sigmoid(0) = 0.5
    out = yolo_v1_loss(pred, targets, (100, 100), C, grid=2)
    iou1 = 33 * 17.5 / (900 + 800 - 33 * 17.5)
    assert iou1 > 100 / 800  # box 1 is the responsible one
    coord = 5.0 * (
        (0.5 - 0.6) ** 2 + (0.5 - 0.6) ** 2 + (0.6 - math.sqrt(0.4)) ** 2 + (0.5 - math.sqrt(0.2)) ** 2
    )
    obj = (1 / (1 + math.exp(-1.0)) - iou1) ** 2
    noobj = 0.5 * 7 * 0.5**2  # box 0 of the object cell + 2 boxes in each of the 3 empty cells
    cls = (1 - 1 / 3) ** 2 + 2 * (1 / 3) ** 2  # uniform softmax vs one-hot
    for name, want in (("coord", coord), ("obj", obj), ("noobj", noobj), ("cls", cls)):
        assert out[name].item() == pytest.approx(want, rel=1e-9), name
    assert out["loss"].item() == pytest.approx(coord + obj + noobj + cls, rel=1e-9)
    # rescore=False: confidence target 1 instead of the IoU; only the obj term moves.
    plain = yolo_v1_loss(pred, targets, (100, 100), C, grid=2, rescore=False)
    assert plain["obj"].item() == pytest.approx((1 / (1 + math.exp(-1.0)) - 1) ** 2, rel=1e-9)
    # The batch size divides every term.
    two = yolo_v1_loss(pred.expand(2, -1, -1, -1), targets * 2, (100, 100), C, grid=2)
    assert two["loss"].item() == pytest.approx(out["loss"].item(), rel=1e-9)


def test_zero_iou_picks_the_closer_box():
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 50.0, 40.0]]), "labels": torch.tensor([0]), "size": (100, 100)}
    ]
    pred = torch.zeros(1, 2, 2, B * 5 + C, dtype=torch.float64)
    pred[..., [2, 3, 7, 8]] = -1000.0  # sqrt w = sqrt h = sigmoid(-1000) = 0: zero-area boxes, both IoUs 0
    pred[0, 0, 0, 5:7] = logit(torch.tensor([0.6, 0.6]))  # box 1 sits on the GT centre
    out = yolo_v1_loss(pred, targets, (100, 100), C, grid=2)
    coord = 5.0 * (0.4 + 0.2)  # box 1 responsible: only the sqrt w, sqrt h errors remain
    assert out["coord"].item() == pytest.approx(coord, rel=1e-6)


def test_two_objects_in_one_cell_keep_the_larger():
    small = [12.0, 12.0, 18.0, 18.0]
    large = [5.0, 5.0, 25.0, 25.0]
    for order in ([small, large], [large, small]):
        t = [{"boxes": torch.tensor(order), "labels": torch.tensor([0, 1] if order[0] is small else [1, 0])}]
        enc = yolo_v1_encode(t, (100, 100), C, grid=2)
        assert enc["obj"].sum() == 1 and enc["labels"][0, 0, 0] == 1
        assert enc["box"][0, 0, 0, 2].item() == pytest.approx(math.sqrt(0.2))


def test_gradients_reach_every_head_parameter():
    head = YoloV1Head(in_chs=8, num_classes=C, hidden=16)
    targets = sample_targets()
    out = yolo_v1_loss(head(torch.randn(3, 8, 6, 8)), targets, (96, 128), C)
    out["loss"].backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_empty_image_has_only_the_noobj_term():
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "size": (64, 64)}]
    pred = torch.randn(1, S, S, B * 5 + C, requires_grad=True)
    out = yolo_v1_loss(pred, targets, (64, 64), C)
    assert out["coord"] == 0 and out["obj"] == 0 and out["cls"] == 0
    conf = pred.detach()[..., [4, 9]].sigmoid()
    assert out["noobj"].item() == pytest.approx(0.5 * conf.square().sum().item(), rel=1e-5)
    out["loss"].backward()
    assert torch.isfinite(pred.grad).all()


def test_decode_clips_to_each_image_and_rejects_bad_shapes():
    # A box that spills into the padding of a 40x50 image inside a 100x100 batch.
    targets = [{"boxes": torch.tensor([[20.0, 10.0, 70.0, 60.0]]), "labels": torch.tensor([2])}]
    pred = perfect_prediction(targets, (100, 100))
    (d,) = yolo_v1_decode(pred, (100, 100), [(40, 50)])
    torch.testing.assert_close(
        d["boxes"], torch.tensor([[20.0, 10.0, 50.0, 40.0]], dtype=torch.float64), atol=1.0, rtol=0
    )
    assert d["labels"].tolist() == [2]
    with pytest.raises(ValueError, match="expected predictions"):
        yolo_v1_loss(torch.zeros(1, S, S, 4), targets, (100, 100), C)
    with pytest.raises(ValueError, match="labels"):
        yolo_v1_loss(pred, [{"boxes": targets[0]["boxes"], "labels": torch.tensor([C])}], (100, 100), C)


def test_overfit_one_box():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    targets = [
        {"boxes": torch.tensor([[8.0, 16.0, 40.0, 56.0]]), "labels": torch.tensor([1]), "size": (64, 64)}
    ]
    head = YoloV1Head(in_chs=3, num_classes=C, hidden=32)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    for _ in range(100):
        loss = yolo_v1_loss(head(x), targets, (64, 64), C)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    (d,) = yolo_v1_decode(head(x), (64, 64), [(64, 64)])
    assert d["labels"][0] == 1
    assert box_iou(d["boxes"][:1], targets[0]["boxes"]).item() > 0.5


# -- YOLOv1 inside local learning: the shared head's BN statistics, the bank (issue 19, defects 3 and 4) --


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convs: threads only contend
    yield
    torch.set_num_threads(threads)


def _yolo_model(method: str = "slm", **overrides):
    from test_detection import det_model

    return det_model(method, head="yolov1", **overrides)


def _bn_state(head) -> list[torch.Tensor]:
    return [b.clone() for m in head.modules() if isinstance(m, torch.nn.BatchNorm2d) for b in m.buffers()]


def test_aux_passes_through_a_shared_head_leave_its_bn_statistics(one_thread):
    from test_detection import det_batch

    model, _, _ = _yolo_model()
    batch = det_batch()
    model.train()
    before = _bn_state(model.head)
    h = batch.x
    for k in range(model.num_blocks - 1):  # K-1 aux passes, each through the main head's layers
        h = model.body(k)(h.detach(), batch.bank)
        model.auxes[k](h, batch)["loss"].backward()
    assert all(torch.equal(a, b) for a, b in zip(before, _bn_state(model.head)))
    h = model.body(model.num_blocks - 1)(h, batch.bank)
    model.auxes[-1](h, batch)  # the main path moves them, once
    after = _bn_state(model.head)
    assert not torch.equal(before[0], after[0]) and int(after[2]) == int(before[2]) + 1


def test_a_shared_head_normalises_aux_features_with_their_batch_statistics():
    head = YoloV1Head(in_chs=8, num_classes=C, hidden=16).train()
    x = torch.randn(4, 8, 6, 6)
    frozen = _bn_state(head)
    quiet = head(x, update_stats=False)
    assert all(torch.equal(a, b) for a, b in zip(frozen, _bn_state(head)))
    assert torch.allclose(quiet, head(x), atol=1e-6)  # same batch-statistics output as a normal pass
    head.eval()
    assert torch.equal(head(x, update_stats=False), head(x))  # in eval both use the running statistics


def test_yolo_slm_aux_reads_the_banked_stage_maps(one_thread):
    from test_detection import det_batch

    model, optimizers, _ = _yolo_model()
    assert model.taps == {4: ("C3",)}  # layer2's output (C3) is banked for the aux of block 2
    assert model.auxes[2].reads == ("C3",)
    fuse = model.auxes[2].head
    assert fuse.fused == ("C3", "C4")  # C3 from the bank, C4 = the aux's own map (layer3)
    assert all(torch.count_nonzero(c.weight) == 0 for c in fuse.fuse)  # a fresh aux = the plain one
    batch = det_batch()
    from locallearn.engine.sequential import train_step

    train_step(model, batch, optimizers)
    assert all(torch.count_nonzero(c.weight) > 0 for c in fuse.fuse)  # the bank's weight is learnt
    # the aux's loss now depends on the banked C3 (and only a detached copy of it: no path back)
    model.train()
    h = batch.x
    for k in range(3):
        h = model.body(k)(h, batch.bank)
    loss = model.auxes[2](h, batch)["loss"]
    batch.bank.write("C3", batch.bank.read("C3") * 2)
    assert not torch.allclose(loss, model.auxes[2](h, batch)["loss"])


def test_yolo_trains_from_scratch_with_sgd_without_diverging(one_thread):
    # bounded sqrt w / sqrt h (sigmoid): with linear ones this went 36 -> 1e4 in 3 steps, 5e6 in 6
    from test_detection import det_batch

    from locallearn.engine.sequential import train_step

    model, optimizers, _ = _yolo_model("bp", k=1)  # SGD 0.01, momentum 0.9
    batch = det_batch()
    losses = [train_step(model, batch, optimizers)[0]["loss"].item() for _ in range(6)]
    assert all(math.isfinite(v) for v in losses) and max(losses[1:]) < losses[0], losses
