"""Super-resolution task: EDSR shapes, one step per method, gradient isolation with the LR image in
the bank, PSNR / SSIM against known values, x2 -> x4 initialisation, a short run beating bicubic."""

import numpy as np
import pytest
import torch
from PIL import Image

from locallearn.backbones.edsr import EDSR, edsr, edsr_baseline
from locallearn.build import build_model
from locallearn.config import ConfigError, load_config
from locallearn.engine.optim import build_optimizer
from locallearn.engine.sequential import train_step
from locallearn.tasks.super_resolution import SRLocalHead, psnr, quantize, ssim
from locallearn.types import Batch, FeatureInfo, InputInfo

INPUTS = InputInfo(3, 16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def sr_batch(n: int = 2, scale: int = 2, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    hr = torch.rand(n, 3, 16 * scale, 16 * scale, generator=g)
    lr = torch.nn.functional.avg_pool2d(hr, scale)
    return Batch(lr, hr, torch.zeros(3, 1, 1), torch.ones(3, 1, 1))


def sr_model(method: str, k: int = 3, scale: int = 2, seed: int = 0, **overrides):
    args = [
        f"method.name={method}", "model.backbone=edsr_tiny", f"model.num_blocks={k}", "model.split=even",
        "task.name=super_resolution", f"task.super_resolution.scale={scale}", "optim.name=adamw",
        "optim.lr=1e-3", "optim.schedule=constant", "optim.warmup_epochs=0", "optim.weight_decay=0",
        "data.name=skimage_photos",
    ]  # fmt: skip
    args += [f"{key}={value}" for key, value in overrides.items()]
    cfg = load_config(None, args)
    torch.manual_seed(seed)
    model, _, task = build_model(cfg, INPUTS, 3)
    optimizers = [build_optimizer(model.block_parameters(i), cfg.optim) for i in range(model.num_blocks)]
    return model, optimizers, task


def test_edsr_sizes_match_the_paper():
    def params(b):
        return sum(p.numel() for p in b.parameters())

    # EDSR-PyTorch x2: baseline 1,369,859 and EDSR 40,729,603 parameters, of which the upsampler + tail
    # (conv n->4n, conv n->3) are 4*n*n*9+4*n + 3*n*9+3
    assert params(edsr_baseline()) == 1_369_859 - (64 * 256 * 9 + 256 + 64 * 3 * 9 + 3)
    assert params(edsr()) == 40_729_603 - (256 * 1024 * 9 + 1024 + 256 * 3 * 9 + 3)
    b = EDSR(2, 8, 0.1)
    assert [f.stage for f in b.feature_info] == [0, 1, 1, 1] and all(f.reduction == 1 for f in b.feature_info)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_bp_output_shape_and_global_skip(scale):
    model, _, _ = sr_model("bp", k=1, scale=scale)
    assert model.taps == {0: ("L0",)}  # the head reads the head conv's output from the bank
    out = model(torch.rand(2, 3, 10, 12))
    assert out.shape == (2, 3, 10 * scale, 12 * scale)


def test_bp_global_skip_trains_the_head_conv_directly(monkeypatch):
    """Under bp (K=1) the head reads L0 from the bank inside the block that wrote it: the read is live,
    so the global skip's gradient reaches the head conv as in EDSR (it used to be detached)."""
    from locallearn.types import FeatureBank

    def head_conv_grad():
        model, _, task = sr_model("bp", k=1)
        batch = sr_batch()
        batch.bank = FeatureBank()
        task.loss(model(batch.x, batch.bank), batch).backward()
        return next(model.body(0)[0].parameters()).grad.clone()

    live = head_conv_grad()
    monkeypatch.setattr(FeatureBank, "read", lambda self, name: self._entries[name])  # the old, detached read
    detached = head_conv_grad()
    assert not torch.allclose(live, detached)


@pytest.mark.parametrize("method", ["bp", "dgl", "slm", "slm+manpp"])
def test_one_step_every_method(method):
    model, optimizers, task = sr_model(method, k=1 if method == "bp" else 3)
    outs = train_step(model, sr_batch(), optimizers)
    losses = torch.stack([o["loss"].detach() for o in outs])
    assert torch.isfinite(losses).all() and (losses > 0).all()
    ev = task.evaluator()
    model.eval()
    batch = sr_batch(1, seed=1)
    with torch.no_grad():
        ev.update(model(batch.x), batch)
    got = ev.compute()
    assert set(got) == {"psnr", "ssim", "psnr_rgb", "loss"} and np.isfinite(got["psnr"])


def test_slm_fuses_the_lr_image_and_no_gradient_crosses_blocks():
    model, _, _ = sr_model("slm", k=3)
    assert model.cuts == [2, 4] and all(aux.reads == ("L0", "input") for aux in model.auxes[:-1])
    heads = [m for aux in model.auxes[:-1] for m in aux.modules() if isinstance(m, SRLocalHead)]
    assert len(heads) == 2 and all(h.fused == ("input",) and h.skip for h in heads)
    batch = sr_batch()
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
        if k < len(heads):  # the LR image reaches the loss through the fusion conv
            assert heads[k].fuse[0].weight.grad.abs().sum() > 0
    assert {"input", "L0"} <= {name for name, _ in batch.bank.items()}


def test_dgl_local_head_has_no_fusion():
    model, _, _ = sr_model("dgl", k=3)
    heads = [m for aux in model.auxes[:-1] for m in aux.modules() if isinstance(m, SRLocalHead)]
    assert heads and all(h.fused == () and not h.skip for h in heads)


def test_local_head_rejects_two_maps():
    with pytest.raises(ValueError, match="one feature map"):
        SRLocalHead({"C0": FeatureInfo(8, 1), "C1": FeatureInfo(8, 2)}, ("input",), 2)


def test_psnr_ssim_known_values():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 32, 32, generator=g)
    assert torch.isinf(psnr(a, a, 2)).all()
    assert torch.allclose(ssim(a, a, 2), torch.ones(2, dtype=torch.float64))
    # a uniform error of 1/255 in every channel: Y moves by (65.481 + 128.553 + 24.966) / 255
    b = a + 1 / 255
    dy = (65.481 + 128.553 + 24.966) / 255
    assert psnr(a, b, 2).tolist() == pytest.approx([10 * np.log10(255**2 / dy**2)] * 2, abs=1e-3)
    assert psnr(a, b, 0, y_channel=False).tolist() == pytest.approx([20 * np.log10(255)] * 2, abs=1e-3)
    assert torch.equal(quantize(torch.tensor([-0.1, 0.5, 1.2])), torch.tensor([0.0, 128 / 255, 1.0]))


def bicubic_pair(name: str, scale: int):
    skdata = pytest.importorskip("skimage.data")
    hr = getattr(skdata, name)()
    h, w = hr.shape[0] // scale * scale, hr.shape[1] // scale * scale
    im = Image.fromarray(hr[:h, :w])
    up = im.resize((w // scale, h // scale), Image.BICUBIC).resize((w, h), Image.BICUBIC)
    to_t = lambda a: torch.from_numpy(np.asarray(a).copy()).permute(2, 0, 1)[None].float() / 255  # noqa: E731
    return to_t(up), to_t(im)


def test_bicubic_x4_astronaut_matches_data_md_and_ssim_matches_skimage():
    metrics = pytest.importorskip("skimage.metrics")
    up, hr = bicubic_pair("astronaut", 4)
    # DATA.md's 25.38 dB is RGB PSNR over the whole image (no border crop) of PIL bicubic x4
    assert psnr(up, hr, 0, y_channel=False).item() == pytest.approx(25.38, abs=0.01)
    # the benchmark protocol (Y channel, 4-pixel border) scores the same images higher
    assert psnr(up, hr, 4).item() == pytest.approx(26.84, abs=0.01)
    y = lambda t: (16 + (t * torch.tensor([65.481, 128.553, 24.966]).view(1, 3, 1, 1)).sum(1))[0, 4:-4, 4:-4]  # noqa: E731
    ref = metrics.structural_similarity(
        y(up).double().numpy(), y(hr).double().numpy(), data_range=255, gaussian_weights=True,
        sigma=1.5, use_sample_covariance=False,
    )  # fmt: skip
    assert ssim(up, hr, 4).item() == pytest.approx(ref, abs=1e-5)
    assert 0.8 < ref < 0.9


def test_x2_checkpoint_initialises_a_x4_model(tmp_path):
    model2, _, _ = sr_model("bp", k=1, scale=2, seed=1)
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model2.state_dict()}, path)
    model4, _, _ = sr_model("bp", k=1, scale=4, seed=2, **{"task.super_resolution.pretrained": str(path)})
    s2, s4 = model2.state_dict(), model4.state_dict()
    assert all(torch.equal(s2[k], s4[k]) for k in s4 if k.startswith("backbone."))
    up2 = [k for k in s4 if "upsample.0." in k]  # the first (conv, shuffle x2) has the x2 shape
    assert up2 and all(torch.equal(s2[k], s4[k]) for k in up2)
    with pytest.raises(ConfigError, match="scale"):
        sr_model("bp", k=1, scale=5)


def test_scale_mismatch_is_a_clear_error():
    model, _, task = sr_model("bp", k=1, scale=3)
    with pytest.raises(ValueError, match="scale"):
        task.loss(model(sr_batch(1).x), sr_batch(1))


@pytest.mark.slow
def test_short_run_beats_bicubic_on_a_held_out_photo(tmp_path):
    """x2 EDSR-tiny on 48px LR patches of astronaut / coffee / chelsea, scored on rocket."""
    from locallearn.data.super_resolution import SRLoader, skimage_photos

    torch.manual_seed(0)
    train, test = skimage_photos(str(tmp_path), False, 2)
    model, optimizers, task = sr_model("bp", k=1, scale=2, **{"optim.lr": "1e-3"})
    loader = SRLoader(train, 16, True, seed=0)
    for epoch in range(150):  # 450 steps
        loader.set_epoch(epoch)
        model.train()
        for batch in loader:
            train_step(model, batch, optimizers)
    model.eval()
    ev = task.evaluator()
    with torch.no_grad():
        for batch in SRLoader(test, 1, False):
            ev.update(model(batch.x), batch)
    up, hr = bicubic_pair("rocket", 2)
    floor = psnr(quantize(up), hr, 2).item()
    assert ev.compute()["psnr"] > floor + 0.3, (ev.compute(), floor)
