"""Aux nets keep the init of the task-built parts inside them (issue 19, defect 1): the backbone
family's init (``AuxContext.init_weights``) covers replica / method-built layers only; RetinaNet's
focal-loss prior and std-0.01 convs, FPNs, YOLO / segmentation / SR heads stay as the task built them."""

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models.detection.retinanet import RetinaNetClassificationHead

from locallearn.build import build_model
from locallearn.config import load_config
from locallearn.engine.optim import build_optimizer
from locallearn.engine.sequential import train_step
from locallearn.methods.base import AuxContext, sparing_task_parts
from locallearn.tasks.base import keep_init, keeps_init
from locallearn.tasks.classification import Classification
from locallearn.tasks.detection import Detection, DetectionConfig
from locallearn.tasks.segmentation import Segmentation
from locallearn.tasks.super_resolution import SuperResolution
from locallearn.types import FeatureInfo

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tasks"))
from test_detection import det_batch, det_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PRIOR = -math.log((1 - 0.01) / 0.01)  # torchvision RetinaNetClassificationHead, prior_probability 0.01
# the optimizer of the shipped MAN++ Table IV configs (SGD 0.01, momentum 0.9, wd 1e-4)
SHIPPED = ROOT / "configs/detection/manpp_coco_retinanet_resnet18_k4_dgl_manpp.yaml"
AUX_METHODS = {
    "dgl": {},
    "dgl+manpp": {},
    "slm": {"method.slm.share_head": "false"},
}


@pytest.mark.parametrize("method", sorted(AUX_METHODS))
def test_retinanet_aux_heads_keep_the_prior_and_train_with_the_shipped_optimizer(method):
    model, _, _ = det_model(method, **AUX_METHODS[method])
    heads = [
        m for aux in model.auxes[:-1] for m in aux.modules() if isinstance(m, RetinaNetClassificationHead)
    ]
    assert len(heads) == model.num_blocks - 1  # one own head per aux
    for head in heads:  # the focal-loss prior and torchvision's N(0, 0.01) convs, not the backbone's init
        assert torch.allclose(head.cls_logits.bias, torch.full_like(head.cls_logits.bias, PRIOR))
        assert 0.008 < head.cls_logits.weight.std().item() < 0.012
        assert 0.008 < head.conv[0][0].weight.std().item() < 0.012
    optim = load_config(str(SHIPPED), []).optim
    optimizers = [build_optimizer(model.block_parameters(i), optim) for i in range(model.num_blocks)]
    batch = det_batch(1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        steps = [
            torch.stack([o["loss"].detach() for o in train_step(model, batch, optimizers)]) for _ in range(3)
        ]
    finally:
        torch.set_num_threads(threads)
    first = steps[0]  # each block's loss before its own first step: the initial losses
    # old code: 100-6000x the main head's loss (the prior zeroed), NaN within a few steps; now the same order
    assert ((0.5 * first[-1] < first[:-1]) & (first[:-1] < 2 * first[-1])).all(), first
    for losses in steps:
        assert torch.isfinite(losses).all() and (losses[:-1] < 10 * first[-1]).all(), steps


def test_sparing_task_parts_restores_marked_modules_only():
    task = Detection(3, DetectionConfig())
    task.setup(FeatureInfo(64, 32), {})
    head = task.build_local_head({"C4": FeatureInfo(32, 16)})
    assert keeps_init(head)
    aux = nn.Sequential(nn.Conv2d(3, 32, 1), nn.Sequential(head))
    built = {k: v.clone() for k, v in aux.state_dict().items()}

    def zero(module: nn.Module) -> None:
        for p in module.parameters():
            nn.init.zeros_(p)

    sparing_task_parts(zero)(aux)
    after = aux.state_dict()
    assert torch.count_nonzero(after["0.weight"]) == 0  # the method's layer: the backbone init
    assert all(torch.equal(after[k], v) for k, v in built.items() if k.startswith("1."))
    keep_init(aux[0])  # a marked module anywhere, the aux itself included, is left as built
    keep_init(aux)
    sparing_task_parts(lambda m: [nn.init.ones_(p) for p in m.parameters()])(aux)
    assert all(torch.equal(aux.state_dict()[k], v) for k, v in after.items())
    ctx_init = AuxContext(0, 2, FeatureInfo(3, 1), None, task, [], [], zero).init_weights
    assert getattr(ctx_init, "spares_task_parts", False)  # every aux's context applies it


def test_which_tasks_mark_their_heads():
    nchw = {"C3": FeatureInfo(16, 8)}
    assert keeps_init(Segmentation(3).build_local_head(nchw))
    assert keeps_init(Segmentation(3).build_head(FeatureInfo(16, 8)))
    sr = {"C0": FeatureInfo(16, 1), "L0": FeatureInfo(16, 1), "input": FeatureInfo(3, 1)}
    assert keeps_init(SuperResolution().build_local_head(sr))
    yolo = Detection(3, DetectionConfig(head="yolov1"))
    assert keeps_init(yolo.build_local_head({"C5": FeatureInfo(32, 32)}))
    # classification's Linear heads take the aux's init, as the official codes do (goldens unchanged)
    assert not keeps_init(Classification(10).local_head(16))
    assert not keeps_init(Classification(10).build_head(FeatureInfo(16, 8)))


def test_segmentation_aux_head_is_not_reinitialised():
    args = ["method.name=dgl", "model.backbone=resnet18", "model.num_blocks=2", "model.cuts=[5]",
            "task.name=segmentation"]  # fmt: skip
    cfg = load_config(None, args)
    from locallearn.types import InputInfo

    inputs = InputInfo(3, 32, (0.5,) * 3, (0.25,) * 3)
    torch.manual_seed(0)
    model, _, _ = build_model(cfg, inputs, 3)
    last = model.auxes[0].head.net[-1]  # the per-pixel classifier conv: PyTorch's init, bias not zeroed
    assert torch.count_nonzero(last.bias) == last.bias.numel()
