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
