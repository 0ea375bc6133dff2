"""The official MAN++ COCO aux (``method.dgl.dense_head=manpp``, methods/detection_aux.py): levels and
shapes per block, RetinaNet's init kept through the backbone init, a loss of the main head's order, finite
SGD steps with the Table IV optimizer, gradient isolation, and the Table IV configs using it."""

import math
from pathlib import Path

import pytest
import torch
import yaml
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork

from locallearn.build import build_model
from locallearn.config import load_config
from locallearn.engine.optim import build_optimizer
from locallearn.engine.sequential import train_step
from locallearn.methods.detection_aux import OwnStrideDetectionAux, own_levels
from locallearn.types import Batch, InputInfo

CONFIGS = Path(__file__).parents[2] / "configs" / "detection"
TABLE_IV = CONFIGS / "manpp_coco_retinanet_resnet50_k4_dgl_manpp.yaml"
SIZE, CLASSES = 64, 3
INPUTS = InputInfo(3, SIZE, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def batch(n: int = 2, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, SIZE, SIZE, generator=g)
    boxes = torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 20.0, 60.0, 44.0]])
    targets = [
        {"boxes": boxes, "labels": torch.tensor([0, 2]), "image_id": i, "orig_size": (SIZE, SIZE),
         "size": (SIZE, SIZE), "scale": 1.0}
        for i in range(n)
    ]  # fmt: skip
    return Batch(
        x, targets, torch.tensor(INPUTS.mean).view(-1, 1, 1), torch.tensor(INPUTS.std).view(-1, 1, 1)
    )


def table_iv(*overrides: str, seed: int = 0):
    """The Table IV config (dgl+manpp, K=4 by stages, SGD 0.01) on a ResNet-18 at 64 px."""
    cfg = load_config(TABLE_IV, ["model.backbone=resnet18", "model.cuts=[3,5,7]", *overrides])
    torch.manual_seed(seed)
    model, _, task = build_model(cfg, INPUTS, CLASSES)
    opts = [build_optimizer(model.block_parameters(k), cfg.optim) for k in range(model.num_blocks)]
    return model, opts, task


def official(aux) -> OwnStrideDetectionAux:
    return aux.base if hasattr(aux, "base") else aux


def test_table_iv_configs_use_the_official_aux():
    files = sorted(CONFIGS.glob("manpp_coco_*_k4_dgl_manpp.yaml"))
    assert len(files) == 5
    for path in files:
        cfg = load_config(path, [])
        assert cfg.method.options["dgl"]["dense_head"] == "manpp", path.name


def test_levels_and_shapes_per_block():
    model, _, _ = table_iv()
    auxes = [official(a) for a in model.auxes[:-1]]
    assert [a.levels for a in auxes] == [(3,), (4,), (5, 6, 7)]  # block 0 -> P3, 1 -> P4, 2 -> P5-P7
    for aux in auxes:  # no local FPN, 2-conv subnets (RetinaNet's main head has 4)
        assert not any(isinstance(m, FeaturePyramidNetwork) for m in aux.modules())
        assert len(aux.predict.classification_head.conv) == len(aux.predict.regression_head.conv) == 2
    seen = {}
    for k, aux in enumerate(auxes):
        aux.predict.register_forward_hook(lambda m, a, out, k=k: seen.__setitem__(k, (a[0], out)))
    b = batch()
    h = b.x
    for k in range(model.num_blocks):
        h = model.body(k)(h, b.bank)
        model.auxes[k](h, b)
    want = {0: [(8, 8)], 1: [(4, 4)], 2: [(2, 2), (1, 1), (1, 1)]}  # strides 8 | 16 | 32, 64, 128
    for k, sizes in want.items():
        maps, out = seen[k]
        assert [tuple(m.shape[-2:]) for m in maps] == sizes and all(m.shape[1] == 256 for m in maps)
        anchors = sum(s[0] * s[1] for s in sizes) * 9
        assert out["cls_logits"].shape == (2, anchors, CLASSES)
        assert out["bbox_regression"].shape == (2, anchors, 4)


def test_own_levels_of_any_stride(tmp_path):
    assert own_levels(4) == (3,) and own_levels(8) == (3,) and own_levels(16) == (4,)
    assert own_levels(32) == (5, 6, 7) and own_levels(64) == (5, 6, 7)
    plain = yaml.safe_load(TABLE_IV.read_text())
    plain["method"] = {"name": "dgl", "dgl": plain["method"]["dgl"]}  # the file without MAN++'s section
    (tmp_path / "dgl.yaml").write_text(yaml.safe_dump(plain))
    cfg = load_config(tmp_path / "dgl.yaml", ["model.backbone=resnet18", "model.cuts=[3,5,7]"])
    model, _, _ = build_model(cfg, INPUTS, CLASSES)  # plain DGL: block 0 ends at stride 4, pooled to P3
    assert official(model.auxes[0]).pool == 2 and official(model.auxes[1]).pool == 1


def test_retinanet_init_survives_and_loss_is_the_main_heads_order():
    model, _, _ = table_iv()
    prior = -math.log(99)
    for aux in model.auxes[:-1]:
        net = official(aux)
        assert torch.allclose(net.predict.classification_head.cls_logits.bias, torch.tensor(prior))
        for conv in (net.project[0], net.predict.classification_head.conv[0][0]):
            assert 0.007 < conv.weight.std().item() < 0.013 and not conv.bias.any()
    b = batch()
    model.train()
    with torch.no_grad():
        losses, h = [], b.x
        for k in range(model.num_blocks):
            h = model.body(k)(h, b.bank)
            losses.append(model.auxes[k](h, b)["loss"].item())
    main = losses[-1]
    assert all(math.isfinite(v) for v in losses)
    for v in losses[:-1]:  # the official aux starts where RetinaNet's own head starts
        assert main / 3 < v < 3 * main, (losses, main)


def test_table_iv_sgd_steps_stay_finite():
    model, opts, _ = table_iv()
    for step in range(3):
        losses = [o["loss"].item() for o in train_step(model, batch(n=1, seed=step), opts)]
        assert all(math.isfinite(v) and v > 0 for v in losses), (step, losses)


def test_no_gradient_crosses_blocks():
    model, _, _ = table_iv()
    b = batch()
    h = b.x
    for k in range(model.num_blocks):
        h_in = h.detach().requires_grad_(k > 0)
        model.zero_grad(set_to_none=True)
        h = model.body(k)(h_in, b.bank)
        model.auxes[k](h, b)["loss"].backward()
        for j in range(model.num_blocks):
            got = any(p.grad is not None for p in model.body(j).parameters())
            assert got == (j == k), (k, j)
        others = [p for j, a in enumerate(model.auxes) if j != k for p in a.parameters()]
        assert all(p.grad is None for p in others), k


def test_only_for_retinanet_and_valid_options():
    with pytest.raises(ValueError, match="needs task.name=detection"):
        table_iv("task.detection.head=yolov1")
    with pytest.raises(ValueError, match="dense_head"):
        table_iv("method.dgl.dense_head=full")
    with pytest.raises(ValueError, match="head_convs"):
        table_iv("method.dgl.head_convs=5")


def test_table_iv_configs_recompute_the_copies():
    """Issue 26's RetinaNet goal (whole step <= 0.60x bp at 600 px, batch 16) is met by the shipped configs only
    because they re-run the MAN++ copies in backward (0.593x; 0.706x without, docs/benchmarks.md)."""
    for path in sorted(CONFIGS.glob("manpp_coco_*_k4_dgl_manpp.yaml")):
        assert load_config(path, []).method.options["momentum"]["recompute"] is True, path.name
