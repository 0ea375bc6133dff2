"""InfoPro ``recon_at``: ``input`` (default) is the papers' decoder unchanged; ``feature`` reconstructs
the area-downsampled image at the cut's map size, one downsample per batch and size, blocks isolated."""

import copy
import gc
import json
import pickle
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from locallearn.build import build_model
from locallearn.config import load_config
from locallearn.engine.optim import build_optimizer
from locallearn.engine.sequential import train_step
from locallearn.methods.infopro_recon import ReconTargets
from locallearn.types import Batch, InputInfo
from tests.helpers import make_batch, make_model

sys.path.insert(0, str(Path(__file__).parent))
from methods_util import tiny_batch, tiny_model  # noqa: E402

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
FEATURE = {"method.infopro.recon_at": "feature"}
FEATURE_OVERRIDE = [f"{k}={v}" for k, v in FEATURE.items()]
INPUTS16 = InputInfo(channels=3, size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def trajectory(method: str, **overrides) -> list[list[float]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, optimizers, _ = tiny_model(method, k=3, seed=0, **overrides)
        batch = tiny_batch(8, seed=1)
        return [[o["loss"].item() for o in train_step(model, batch, optimizers)] for _ in range(5)]
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("method", ["infopro", "infopro+manpp"])
def test_default_is_the_golden_trajectory(method):
    """Golden files captured before ``recon_at`` existed; ``input`` spelled out is the same run."""
    want = json.loads((GOLDEN / f"{method.replace('+', '_')}.json").read_text())["losses"]
    got = trajectory(method)
    assert torch.allclose(torch.tensor(got), torch.tensor(want), rtol=1e-3, atol=1e-5), (got, want)
    assert trajectory(method, **{"method.infopro.recon_at": "input"}) == got


@pytest.mark.parametrize("method", ["infopro", "infopro+manpp"])
def test_feature_mode_trains_differently_and_finitely(method):
    got = trajectory(method, **FEATURE)
    assert all(torch.isfinite(torch.tensor(row)).all() for row in got)
    assert got != trajectory(method)


@pytest.fixture
def bce_calls(monkeypatch):
    """Every (decoded, target) pair the aux nets' BCE compares."""
    calls = []
    original = F.binary_cross_entropy_with_logits

    def spy(decoded, target, *args, **kwargs):
        calls.append((decoded, target))
        return original(decoded, target, *args, **kwargs)

    monkeypatch.setattr(F, "binary_cross_entropy_with_logits", spy)
    return calls


def recon_inputs(aux, h, batch, calls):
    aux(h, batch)
    return calls[-1]


def test_target_is_the_area_downsampled_image_at_the_map_size(bce_calls):
    model, *_ = make_model("infopro", "resnet20", 4, inputs=INPUTS16, **FEATURE)
    batch = make_batch(4, INPUTS16)
    image = batch.image.clamp(0, 1)
    for aux in model.auxes[:-1]:
        chs = aux.decoder.net[0].in_channels
        side = {16: 16, 32: 8, 64: 4}[chs]  # resnet20's stages at 16 px
        decoded, target = recon_inputs(aux, torch.randn(4, chs, side, side), batch, bce_calls)
        assert decoded.shape == target.shape == (4, 3, side, side)
        r = 16 // side
        torch.testing.assert_close(target, F.avg_pool2d(image, r) if r > 1 else image)
        assert not target.requires_grad and target.grad_fn is None


def test_input_mode_decodes_at_the_image_size(bce_calls):
    model, *_ = make_model("infopro", "resnet20", 4, inputs=INPUTS16)
    aux = model.auxes[-2]
    decoded, target = recon_inputs(aux, torch.randn(4, 64, 4, 4), make_batch(4, INPUTS16), bce_calls)
    assert decoded.shape == target.shape == (4, 3, 16, 16)


@pytest.mark.parametrize("method", ["infopro", "infopro+manpp"])
def test_one_downsample_per_batch_and_size(method, monkeypatch, bce_calls):
    """K=8 on resnet20 at 16 px: 7 cuts over maps of 16, 8 and 4 px -> 3 targets per batch, not 7."""
    model, optimizers, *_ = make_model(method, "resnet20", 8, inputs=INPUTS16, **FEATURE)
    cuts = [getattr(aux, "base", aux) for aux in model.auxes[:-1]]  # +manpp: the InfoPro aux inside
    assert len({id(aux.targets) for aux in cuts}) == 1  # one cache shared by every block of the method
    cache = cuts[0].targets
    pools = []
    original = F.adaptive_avg_pool2d

    def pool(x, size):
        if not torch.is_grad_enabled():  # the targets are computed without autograd; aux heads pool with it
            pools.append(tuple(size))
        return original(x, size)

    monkeypatch.setattr(F, "adaptive_avg_pool2d", pool)
    for step in range(3):
        before, calls = cache.computed, len(bce_calls)
        train_step(model, make_batch(4, INPUTS16, seed=step), optimizers)
        sizes = [tuple(d.shape[-2:]) for d, _ in bce_calls[calls:]]
        assert len(sizes) == 7 and set(sizes) == {(16, 16), (8, 8), (4, 4)}
        assert all(d.shape == t.shape for d, t in bce_calls[calls:])
        assert cache.computed - before == 3, "one target per distinct map size per batch"
    assert sorted(pools) == sorted([(8, 8), (4, 4)] * 3)  # the 16 px target is the image itself


def test_cache_follows_the_batch_and_holds_no_graph():
    cache = ReconTargets()
    batch = make_batch(2, INPUTS16)
    a = cache.get(batch, (8, 8))
    assert cache.get(batch, (8, 8)) is a and cache.computed == 1
    batch.x.mul_(0.5)  # the same tensor edited in place is a new image
    assert not torch.equal(cache.get(batch, (8, 8)), a) and cache.computed == 2
    other = make_batch(2, INPUTS16, seed=1)
    cache.get(other, (8, 8))
    assert cache.computed == 3
    held = cache._targets
    del other
    gc.collect()
    assert not held  # the targets go with their batch's image
    with torch.enable_grad():
        x = torch.randn(2, 3, 16, 16, requires_grad=True)
        batch.x = x * 1.0
        t = cache.get(batch, (4, 4))
    assert t.grad_fn is None and not t.requires_grad
    with torch.inference_mode():
        assert cache.get(make_batch(2, INPUTS16), (8, 8)).shape == (2, 3, 8, 8)


def test_copies_start_with_an_empty_cache():
    model, *_ = make_model("infopro", "resnet20", 4, inputs=INPUTS16, **FEATURE)
    model.auxes[0].targets.get(make_batch(2, INPUTS16), (8, 8))
    clone = copy.deepcopy(model)
    caches = {id(aux.targets) for aux in clone.auxes[:-1]}
    assert len(caches) == 1 and clone.auxes[0].targets is not model.auxes[0].targets
    assert clone.auxes[0].targets.computed == 0
    assert pickle.loads(pickle.dumps(model.auxes[0].targets)).computed == 0


@pytest.mark.parametrize("method", ["infopro", "infopro+man", "infopro+manpp"])
def test_gradient_isolation_at_feature_resolution(method):
    """When block k's optimizer steps, only block k's own parameters (and its aux's) carry a gradient."""
    model, optimizers, _, _ = make_model(method, "resnet20", 4, **FEATURE)
    owned = [{id(p) for p in model.block_parameters(k)} for k in range(model.num_blocks)]
    everything = list(model.parameters())
    seen: list[set[int]] = []
    for opt in optimizers:
        original = opt.step

        def step(*args, _original=original, **kwargs):
            seen.append({id(p) for p in everything if p.grad is not None})
            return _original(*args, **kwargs)

        opt.step = step
    train_step(model, make_batch(), optimizers)
    assert len(seen) == model.num_blocks
    for k, with_grad in enumerate(seen):
        assert with_grad, f"block {k} got no gradient at all"
        assert with_grad <= owned[k], f"block {k}'s loss reached parameters of another block"


def test_imagenet_decoder_has_no_resize_at_feature_resolution(bce_calls):
    options = {**FEATURE, "method.infopro.heads": "imagenet"}
    model, *_ = make_model("infopro", "resnet20", 4, inputs=INPUTS16, **options)
    aux = model.auxes[1]
    assert not any(type(m).__name__ == "Resize" for m in aux.decoder.modules())
    decoded, target = recon_inputs(aux, torch.randn(2, 32, 8, 8), make_batch(2, INPUTS16), bce_calls)
    assert decoded.shape == target.shape == (2, 3, 8, 8)


def test_bad_recon_at_is_a_clear_error():
    with pytest.raises(ValueError, match="recon_at must be 'auto', 'input' or 'feature', got 'full'"):
        make_model("infopro", "resnet20", 4, **{"method.infopro.recon_at": "full"})


@pytest.mark.parametrize("backbone", ["resnet18", "vit_tiny"])
def test_feature_mode_on_wide_maps_and_tokens(backbone, bce_calls):
    """The ImageNet decoder on wide maps and on tokens laid out on their patch grid: one step, targets
    at the map (patch grid) size, never at the 32 px image size."""
    cfg = load_config(
        None,
        ["method.name=infopro+man", f"model.backbone={backbone}", "model.num_blocks=3", *FEATURE_OVERRIDE],
    )
    inputs = InputInfo(3, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    model, _, _ = build_model(cfg, inputs, 10)
    optimizers = [build_optimizer(model.block_parameters(b), cfg.optim) for b in range(3)]
    batch = Batch(
        torch.randn(4, 3, 32, 32),
        torch.arange(4) % 2,
        torch.full((3, 1, 1), 0.5),
        torch.full((3, 1, 1), 0.25),
    )
    outs = train_step(model, batch, optimizers)
    assert all(torch.isfinite(o["loss"]) for o in outs)
    assert len(bce_calls) == 2 and all(d.shape == t.shape and d.shape[-1] < 32 for d, t in bce_calls)
