"""``model.pretrained=FILE`` (locallearn/build.py): torchvision weights from disk for any task, loaded
before the aux nets copy layers; one-line errors for bad files and backbones; resume / eval / analysis
never re-read the file; and "best" follows ``Task.higher_is_better``."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision

from locallearn.analysis.runs import load_run
from locallearn.build import build_backbone, build_model, check_config
from locallearn.config import ConfigError, load_config, to_dict
from locallearn.engine import checkpoint
from locallearn.resume import config_from_checkpoint
from locallearn.run import Run
from locallearn.run.launch import evaluate_checkpoint, resume_run
from locallearn.tasks.base import Task
from locallearn.tasks.classification import Classification
from locallearn.tasks.detection import Detection
from locallearn.tasks.segmentation import Segmentation
from locallearn.tasks.super_resolution import SuperResolution
from locallearn.types import InputInfo

DIGITS = InputInfo(1, 8, (0.3,), (0.4,))
RGB64 = InputInfo(3, 64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def config(*overrides: str):
    base = ["data.name=digits", "optim.schedule=constant", "optim.warmup_epochs=0", "optim.lr=0.05"]
    return load_config(None, [*base, *overrides])


def weights_file(tmp_path, backbone: str = "resnet18", in_chans: int = 1, seed: int = 7, **extra):
    """A torchvision-format state dict of ``backbone`` with random weights (standing in for ImageNet's),
    plus a classifier of any size, as torchvision's files have."""
    torch.manual_seed(seed)
    state = build_backbone(backbone, in_chans).to_torchvision_state_dict()
    state = {**state, "fc.weight": torch.randn(1000, 3), "fc.bias": torch.zeros(1000), **extra}
    path = tmp_path / f"{backbone}.pth"
    torch.save(state, path)
    return path, state


def assert_backbone_is(model, state) -> None:
    loaded = model.backbone.to_torchvision_state_dict()
    assert all(torch.equal(t, state[k]) for k, t in loaded.items())


# ----------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("init", ["copy", "fresh"])
def test_classification_loads_the_file_before_momentum_copies(tmp_path, init: str) -> None:
    """MAN++ ``init: copy`` copies layer n at build time: from the pretrained layer. ``fresh`` re-inits
    the copies (the official code), whatever the backbone started from."""
    path, state = weights_file(tmp_path)
    cfg = config(
        "model.backbone=resnet18", "model.num_blocks=2", "model.split=cuts", "model.cuts=[3]",
        "method.name=dgl+manpp", f"method.momentum.init={init}", f"model.pretrained={path}",
    )  # fmt: skip
    model, _, _ = build_model(cfg, DIGITS, 10)
    assert_backbone_is(model, state)
    layer = model.backbone.layers[3]
    aux = model.auxes[0]
    for twin in (aux.lb, aux.ema):
        same = [torch.equal(a, b) for a, b in zip(twin.state_dict().values(), layer.state_dict().values())]
        assert all(same) if init == "copy" else not all(same)


def test_every_torchvision_backbone_family_takes_a_file(tmp_path) -> None:
    """VGG's adapter has no ``classifier`` module, yet torchvision's VGG files hold one: ignored."""
    cls = {"classifier.0.weight": torch.zeros(4096, 8), "classifier.6.bias": torch.zeros(1000)}
    path, state = weights_file(tmp_path, "vgg11", **cls)
    model, _, _ = build_model(config("model.backbone=vgg11", "model.num_blocks=1", "method.name=bp",
                                     f"model.pretrained={path}"), DIGITS, 10)  # fmt: skip
    assert_backbone_is(model, state)
    vit_inputs = InputInfo(3, 32, (0.5,) * 3, (0.25,) * 3)
    torch.manual_seed(3)
    vit = build_backbone("vit_tiny", 3, image_size=32)
    vit_state = vit.to_torchvision_state_dict()
    torch.save({**vit_state, "heads.head.weight": torch.zeros(1000, 192)}, tmp_path / "vit.pth")
    cfg = config("model.backbone=vit_tiny", "model.num_blocks=1", "method.name=bp",
                 f"model.pretrained={tmp_path / 'vit.pth'}")  # fmt: skip
    model, _, _ = build_model(cfg, vit_inputs, 10)
    assert_backbone_is(model, vit_state)


def test_segmentation_imagenet_resnet_file_loads_into_the_dilated_backbone(tmp_path) -> None:
    """A torchvision ResNet-50 state dict (random weights standing in for ImageNet's) becomes the
    dilated DeepLab backbone's weights, ``fc`` ignored (moved from task.segmentation.pretrained)."""
    torch.manual_seed(1)
    ref = torchvision.models.resnet50(weights=None).state_dict()
    ref["fc.weight"], ref["fc.bias"] = torch.randn(10, 2048), torch.zeros(10)
    path = tmp_path / "resnet50.pth"
    torch.save(ref, path)
    cfg = config("task.name=segmentation", "model.backbone=resnet50_d8", "model.num_blocks=1",
                 "method.name=bp", f"model.pretrained={path}")  # fmt: skip
    model, _, _ = build_model(cfg, RGB64, 3)
    loaded = model.backbone.to_torchvision_state_dict()
    assert loaded.keys() == {k for k in ref if not k.startswith("fc.")}
    assert all(torch.equal(loaded[k], ref[k]) for k in loaded)


def test_bad_files_fail_in_one_line_and_change_nothing(tmp_path) -> None:
    path, state = weights_file(tmp_path)
    args = ["model.backbone=resnet18", "model.num_blocks=1", "method.name=bp"]

    def fails(content, match: str) -> None:
        bad = tmp_path / "bad.pth"
        if isinstance(content, bytes):
            bad.write_bytes(content)
        else:
            torch.save(content, bad)
        with pytest.raises(ConfigError, match=match) as err:
            build_model(config(*args, f"model.pretrained={bad}"), DIGITS, 10)
        assert "\n" not in str(err.value)

    fails(path.read_bytes()[: 1 << 16], "model.pretrained: cannot read .*bad.pth")  # truncated
    fails(b"not a checkpoint", "cannot read")
    fails({"epoch": 3}, "holds no state dict")
    fails(
        {k: v for k, v in state.items() if k != "layer4.1.conv2.weight"},
        r"1 missing \(layer4.1.conv2.weight\)",
    )
    fails(
        {**state, "layer5.0.conv1.weight": state["conv1.weight"]}, r"1 unexpected \(layer5.0.conv1.weight\)"
    )
    rgb = torchvision.models.resnet18(weights=None).state_dict()  # 3 input channels, digits have 1
    fails({"state_dict": rgb}, r"resnet18: keys 1 reshaped \(conv1.weight \(64, 3, 7, 7\)")
    fails(torchvision.models.resnet34(weights=None).state_dict(), "resnet18: keys .* unexpected")
    with pytest.raises(ConfigError, match="model.pretrained: no file .*nowhere.pth"):
        build_model(config(*args, f"model.pretrained={tmp_path / 'nowhere.pth'}"), DIGITS, 10)
    # a refused file leaves the backbone untouched: ``load_pretrained`` checks every key first
    backbone = build_backbone("resnet18", 1)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    with pytest.raises(ValueError):
        backbone.load_pretrained({**state, "extra.weight": torch.zeros(1)})
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())


@pytest.mark.parametrize(
    ("backbone", "task"), [("resnet20", "classification"), ("edsr_tiny", "super_resolution")]
)
def test_backbones_without_torchvision_weights_are_refused(tmp_path, backbone: str, task: str) -> None:
    path, _ = weights_file(tmp_path)
    extra = ["data.name=skimage_photos"] if task == "super_resolution" else []
    cfg = config(f"model.backbone={backbone}", "model.num_blocks=1", "method.name=bp", f"task.name={task}",
                 *extra, f"model.pretrained={path}")  # fmt: skip
    with pytest.raises(
        ConfigError, match=f"model.pretrained: backbone {backbone} cannot load torchvision weights"
    ):
        build_model(cfg, InputInfo(3, 16, (0.5,) * 3, (0.25,) * 3), 10)


def test_the_old_segmentation_option_names_its_new_place(tmp_path) -> None:
    cfg = config("task.name=segmentation", "model.backbone=resnet18", "model.num_blocks=1", "method.name=bp",
                 "task.segmentation.pretrained=w.pth")  # fmt: skip
    for call in (lambda: check_config(cfg), lambda: build_model(cfg, RGB64, 3)):
        with pytest.raises(
            ConfigError, match=r"task.segmentation.pretrained is now model.pretrained.*=w.pth"
        ):
            call()
    # a checkpoint saved before the move still loads: its config is read in today's keys
    saved = {"config": json.loads(json.dumps(to_dict(cfg)))}
    migrated = config_from_checkpoint(saved)
    assert migrated.model.pretrained == "w.pth" and "pretrained" not in migrated.task.segmentation


# --------------------------------------------------------------- resume / eval skip the file


def test_resume_eval_and_analysis_do_not_read_the_file_again(tmp_path) -> None:
    path, state = weights_file(tmp_path)
    cfg = config(
        "model.backbone=resnet18", "model.num_blocks=2", "model.split=cuts", "model.cuts=[3]",
        "method.name=dgl+manpp", "method.momentum.init=copy", f"model.pretrained={path}",
        "data.train_subset=64", "data.test_subset=32", "data.batch_size=32", "optim.epochs=2",
        "engine.device=cpu", "engine.measure_memory=false", f"out_dir={tmp_path}", "name=run",
    )  # fmt: skip
    run = Run(cfg, quiet=True)
    assert_backbone_is(run.model, state)
    run.fit(stop_after=1)
    trained = {k: v.clone() for k, v in run.model.state_dict().items()}
    del run
    path.unlink()  # the weights file moved away
    resumed = resume_run(tmp_path / "run", quiet=True)
    assert resumed.epoch == 1
    assert all(torch.equal(trained[k], v) for k, v in resumed.model.state_dict().items())
    summary = resumed.fit()
    assert summary["epochs"] == 2
    result = evaluate_checkpoint(tmp_path / "run", device="cpu")
    assert result["epoch"] == 2 and result["top1"] == resumed.history[-1]["test_top1"]
    loaded = load_run(tmp_path / "run", torch.device("cpu"))
    assert loaded.epoch == 2
    for fresh in (lambda: build_model(cfg, DIGITS, 10), lambda: Run(cfg, quiet=True)):  # a new run needs it
        with pytest.raises(ConfigError, match="model.pretrained: no file .*resnet18.pth"):
            fresh()


@pytest.mark.parametrize("mode", ["pipeline", "ddp"])
def test_parallel_resume_builds_without_the_file(tmp_path, monkeypatch, mode: str) -> None:
    """``resume_run`` asks a torchrun mode's run for one that will not read ``model.pretrained``."""
    from locallearn.run import launch

    cfg = config(
        "model.backbone=resnet18", f"model.pretrained={tmp_path / 'gone.pth'}", f"engine.mode={mode}"
    )
    checkpoint.save(tmp_path / "run" / "checkpoint.pt", {"config": to_dict(cfg), "model": {}, "epoch": 1})
    calls = []

    class Stub:
        def load_state_dict(self, state) -> None:
            calls.append(("loaded", state["epoch"]))

    def fake_run(cfg, run_dir=None, quiet=False, load_weights=True):
        calls.append(("built", cfg.engine.mode, load_weights))
        return Stub()

    monkeypatch.setitem(launch.RUNS, mode, fake_run)
    resume_run(tmp_path / "run", quiet=True)
    assert calls == [("built", mode, False), ("loaded", 1)]


def test_super_resolution_checkpoint_init_is_skipped_too(tmp_path) -> None:
    cfg = config("task.name=super_resolution", "model.backbone=edsr_tiny", "model.num_blocks=1", "method.name=bp",
                 "data.name=skimage_photos", f"task.super_resolution.pretrained={tmp_path / 'gone.pt'}")  # fmt: skip
    inputs = InputInfo(3, 16, (0.0,) * 3, (1.0,) * 3)
    build_model(cfg, inputs, 3, load_weights=False)
    with pytest.raises(FileNotFoundError, match="task.super_resolution.pretrained: no file"):
        build_model(cfg, inputs, 3)


# ------------------------------------------------------------------------------ best metric


class LossTask(Classification):
    """A stub task whose main metric is its test loss: lower is better."""

    main_metric = "loss"
    higher_is_better = False


def test_higher_is_better_defaults() -> None:
    assert Task.higher_is_better is False  # the base task's main metric is the loss
    assert LossTask.higher_is_better is False
    for cls in (Classification, Detection, Segmentation, SuperResolution):
        assert cls.higher_is_better is True, cls
    assert LossTask(10).best([0.5, 0.2, 0.9]) == 0.2
    assert Classification(10).best([50.0, 70.0, 60.0]) == 70.0
    assert Task().best([]) is None


def test_run_summary_best_is_the_minimum_of_a_lower_is_better_metric(tmp_path) -> None:
    cfg = config(
        "model.backbone=resnet20", "model.num_blocks=2", "method.name=dgl", "data.train_subset=64",
        "data.test_subset=32", "data.batch_size=32", "optim.epochs=3", "engine.device=cpu",
        "engine.measure_memory=false", f"out_dir={tmp_path}", "name=loss",
    )  # fmt: skip
    run = Run(cfg, quiet=True)
    run.task = LossTask(10)
    summary = run.fit()
    losses = [row["test_loss"] for row in run.history]
    assert summary["metric"] == "loss" and len(set(losses)) == 3
    assert summary["best"] == min(losses) != max(losses)
    assert json.loads((tmp_path / "loss" / "summary.json").read_text())["best"] == min(losses)
