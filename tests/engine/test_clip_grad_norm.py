"""``optim.clip_grad_norm``: off by default; when set, each block's gradients (its layers and its aux,
one global norm) are clipped before that block's step, in the per-block and the grouped step alike."""

from __future__ import annotations

import pytest
import torch

from locallearn.config import ConfigError, load_config
from locallearn.engine.optim import group_optimizers
from locallearn.engine.sequential import train_step
from tests.methods.methods_util import tiny_batch, tiny_model

K = 3


def step_norms(clip: float | None, method: str = "dgl", scale: float | None = None) -> list[float]:
    """Each block's gradient norm as its optimizer steps (one training step); ``scale``: with loss
    scaling (fp16's GradScaler, here on the CPU) at that initial scale."""
    model, opts, _ = tiny_model(method, k=K)
    scalers = [torch.amp.GradScaler("cpu", init_scale=scale) for _ in opts] if scale else None
    norms: list[float] = []
    for opt in opts:
        step = opt.step

        def spy(*args, opt=opt, step=step, **kwargs):
            grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
            norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
            return step(*args, **kwargs)

        opt.step = spy
    train_step(model.train(), tiny_batch(8), opts, scalers=scalers, clip=clip)
    return norms


def test_off_by_default_and_refused_when_not_positive_or_under_ddp():
    assert load_config(None, []).optim.clip_grad_norm is None
    with pytest.raises(ConfigError, match="optim.clip_grad_norm must be > 0"):
        load_config(None, ["optim.clip_grad_norm=0"])
    with pytest.raises(ConfigError, match="engine.mode=ddp"):
        load_config(None, ["optim.clip_grad_norm=1.0", "engine.mode=ddp"])


@pytest.mark.parametrize("method", ["dgl", "mlaan"])
def test_each_block_steps_with_its_gradient_norm_clipped(method):
    free = step_norms(None, method)
    assert len(free) == K and min(free) > 0.05  # the clip below bites on every block
    clipped = step_norms(0.05, method)
    assert clipped == pytest.approx([0.05] * K, rel=1e-4)
    loose = step_norms(1e6, method)  # a bound above the norm leaves the gradients as they are
    assert loose == pytest.approx(free, rel=1e-6)


def test_loss_scaling_clips_the_unscaled_gradients():
    """fp16: the norm bound applies to the true gradients (unscaled first), not the scaled ones."""
    assert step_norms(0.05, scale=1024.0) == pytest.approx([0.05] * K, rel=1e-4)


def test_grouped_steps_clip_each_block_as_the_per_block_steps_do():
    a, opts_a, _ = tiny_model("dgl", k=K)
    b, opts_b, _ = tiny_model("dgl", k=K)
    train_step(a.train(), tiny_batch(8), opts_a, clip=0.05)
    train_step(b.train(), tiny_batch(8), opts_b, grouped=group_optimizers(opts_b, True), clip=0.05)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(x.float(), y.float(), atol=1e-6), name


def test_a_run_reads_the_config_key(monkeypatch):
    """The trainer passes ``optim.clip_grad_norm`` down to every step."""
    import locallearn.engine.step as step_module
    from locallearn.trainer import Trainer

    seen = []
    real = step_module.clip_block
    monkeypatch.setattr(step_module, "clip_block", lambda opt, clip: (seen.append(clip), real(opt, clip)))
    model, _, _ = tiny_model("dgl", k=K)
    cfg = load_config(None, ["optim.clip_grad_norm=2.5"])
    Trainer(model, cfg.optim, 1).step(tiny_batch(8))
    assert seen == [2.5] * K


def test_the_manpp_coco_configs_clip_as_the_official_recipe():
    """MAN++'s official COCO recipe clips the gradient norm at 1.0 every step (docs/detection.md)."""
    from pathlib import Path

    files = sorted((Path(__file__).parents[2] / "configs" / "detection").glob("manpp_coco_*.yaml"))
    assert len(files) == 10  # Table IV: R18-R152, e2e and k4_dgl_manpp
    assert all(load_config(f).optim.clip_grad_norm == 1.0 for f in files)
