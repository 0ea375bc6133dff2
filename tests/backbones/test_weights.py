"""``model.weights`` (issue 28.6): torchvision's and timm's pretrained weights by name, from the file
the library's own cache holds. Each test writes that file itself (random weights standing in for
ImageNet's) into a cache under tmp_path: nothing is downloaded."""

from __future__ import annotations

import pytest
import torch
import torchvision

from locallearn.backbones import weights
from locallearn.build import build_model, check_config
from locallearn.config import ConfigError, load_config
from locallearn.types import InputInfo

timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")

RGB32 = InputInfo(3, 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty torch hub and Hugging Face caches under tmp_path; downloads off."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("LOCALLEARN_OFFLINE", "1")
    return tmp_path


def config(*overrides: str):
    return load_config(None, ["model.num_blocks=2", "method.name=dgl", *overrides])


def test_torchvision_default_weights_from_the_torch_hub_cache(caches) -> None:
    torch.manual_seed(3)
    state = torchvision.models.resnet18().state_dict()  # 1000 classes, as torchvision's file
    path = caches / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    cfg = config("model.backbone=torchvision:resnet18", "model.weights=DEFAULT")
    check_config(cfg)
    model, _, _ = build_model(cfg, RGB32, 10)
    net = model.backbone.source_model()
    assert torch.equal(net.conv1.weight, state["conv1.weight"])
    assert torch.equal(net.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
    assert net.fc.weight.shape == (10, 512)  # the data's classes: a fresh classifier
    # eval / resume build without reading it (the checkpoint holds the weights): an empty cache is fine
    path.unlink()
    build_model(cfg, RGB32, 10, load_weights=False)
    check_config(cfg, load_weights=False)


def test_timm_pretrained_weights_from_the_hugging_face_cache(caches) -> None:
    """timm's own loader reads the cached file: a ViT at another input size gets its position
    embedding resized, and a classifier of another width is left fresh."""
    spec, kw = "timm:test_vit", ["model.kwargs={img_size: 32, patch_size: 8, dynamic_img_size: false}"]
    torch.manual_seed(3)
    state = timm.create_model("test_vit", patch_size=8).state_dict()  # 160 px, 1000 classes
    snapshot = caches / "hf" / "hub" / "models--timm--test_vit.r160_in1k"
    (snapshot / "refs").mkdir(parents=True)
    (snapshot / "refs" / "main").write_text("0" * 40)
    (snapshot / "snapshots" / ("0" * 40)).mkdir(parents=True)
    safetensors_torch.save_file(state, str(snapshot / "snapshots" / ("0" * 40) / "model.safetensors"))
    cfg = config(f"model.backbone={spec}", "model.weights=pretrained", *kw)
    check_config(cfg)
    model, _, _ = build_model(cfg, RGB32, 5)
    net = model.backbone.source_model()
    assert torch.equal(net.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    assert net.pos_embed.shape == (1, 1 + 16, 64) != state["pos_embed"].shape  # resized by timm
    assert net.head.weight.shape == (5, 64)
    fresh, _, _ = build_model(config(f"model.backbone={spec}", *kw), RGB32, 5)
    assert not torch.equal(
        fresh.backbone.source_model().blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"]
    )


def test_without_a_cached_file_one_line_says_where_it_looked(caches) -> None:
    with pytest.raises(ConfigError) as err:
        check_config(config("model.backbone=torchvision:resnet18", "model.weights=DEFAULT"))
    line = str(err.value)
    assert str(caches / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in line
    assert "downloads are off" in line and "python -c" in line and "\n" not in line
    with pytest.raises(ConfigError, match="not in the Hugging Face cache") as err:
        check_config(config("model.backbone=timm:test_resnet", "model.weights=pretrained"))
    assert str(caches / "hf" / "hub") in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="timm has no pretrained weights for test_resnet.nope"):
        check_config(config("model.backbone=timm:test_resnet", "model.weights=nope"))


def test_weights_and_a_file_exclude_each_other() -> None:
    with pytest.raises(ConfigError, match="set one"):
        config("model.backbone=torchvision:resnet18", "model.weights=DEFAULT", "model.pretrained=x.pth")


def test_the_offline_switches(monkeypatch) -> None:
    for key in ("LOCALLEARN_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    assert not weights.offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert weights.offline()
