"""The Python API (issue 20.1): ``locallearn.wrap`` -> ``LocalTrainer``; one step per method family,
gradient isolation, the momentum aux's EMA moving inside ``step``, save / load, export of a wrapped
``nn.Module`` back into itself, and the example script CI runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import locallearn
from locallearn.methods.man import MomentumAux

ROOT = Path(__file__).parents[1]
X = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
Y = torch.arange(8) % 10


def tiny(method: str = "dgl", k: int = 4, **kw) -> locallearn.LocalTrainer:
    kw = {"num_classes": 10, "input_size": 8, "lr": 0.05, "device": "cpu", **kw}
    return locallearn.wrap("resnet20", method=method, num_blocks=k, **kw)


def params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


FAMILIES = [("bp", 1), ("dgl", 4), ("infopro", 2), ("predsim", 2), ("auglocal", 2), ("mlaan", 3),
            ("slm", 2), ("dgl+man", 2), ("infopro+manpp", 2)]  # fmt: skip


@pytest.mark.parametrize("method,k", FAMILIES)
def test_one_step_of_every_method_family_trains_every_block(method, k):
    ll = tiny(method, k)
    before = [params(ll.model.body(b)) for b in range(k)]
    losses = ll.step(X, Y)
    assert list(losses) == [f"block{b}" for b in range(k)]
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    for b in range(k):
        moved = any(not torch.equal(p0, p1) for p0, p1 in zip(before[b], ll.model.body(b).parameters()))
        assert moved, f"{method}: block {b} did not train"


@pytest.mark.parametrize("method", ["dgl", "infopro+manpp"])
def test_no_gradient_crosses_a_block(method):
    """When block k's optimizer steps, only block k's parameters (body + aux) hold gradients: its
    loss reached no earlier block, and earlier blocks' gradients were freed before it ran."""
    ll = tiny(method, 3)
    owner = {p: k for k in range(ll.num_blocks) for p in ll.model.block_parameters(k)}
    seen = []
    for k, opt in enumerate(ll.trainer.optimizers):

        def record(*args, _k=k, _step=opt.step, **kwargs):
            seen.append((_k, {owner[p] for p in owner if p.grad is not None}))
            return _step(*args, **kwargs)

        opt.step = record
    ll.step(X, Y)
    assert seen == [(k, {k}) for k in range(3)]


def test_step_updates_the_momentum_aux_ema():
    """MAN++'s EMA follows the next block's first layer after every step (forgetting the sync, the
    old own-loop bug, froze it): EMA_new = m * EMA_old + (1 - m) * layer_after_step."""
    ll = tiny("dgl+manpp", 2, options={"method.momentum.momentum": 0.9})
    (aux,) = [m for m in ll.model.auxes[0].modules() if isinstance(m, MomentumAux)]
    layer = ll.model.backbone.layers[ll.model.cuts[0]]
    ema_old = params(aux.ema)
    ll.step(X, Y)
    for old, new, live in zip(ema_old, aux.ema.parameters(), layer.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * live.detach())
    assert any(not torch.equal(a, b) for a, b in zip(ema_old, aux.ema.parameters()))


def test_save_and_load_continue_exactly(tmp_path):
    a = tiny("dgl+manpp", 2, optimizer="sgd")
    a.step(X, Y)
    a.save(tmp_path / "ll.pt")
    b = tiny("dgl+manpp", 2, seed=1)  # different initial weights: everything must come from the file
    b.load(tmp_path / "ll.pt")
    assert b.steps == 1
    x2 = torch.flip(X, [0])
    assert a.step(x2, Y) == b.step(x2, Y)  # momentum buffers, EMA and schedule restored too
    for p, q in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        assert torch.equal(p, q)


def test_cosine_schedule_when_the_length_is_given():
    ll = tiny("dgl", 2, lr=0.1, epochs=2, steps_per_epoch=2)
    lrs = []
    for _ in range(4):
        lrs.append(ll.lr)
        ll.step(X, Y)
    assert lrs[0] == pytest.approx(0.1) and lrs[1] > lrs[2] > lrs[3] > 0 and ll.lr == pytest.approx(0)
    assert tiny("dgl", 2, lr=0.1).lr == 0.1  # no length given: constant


class Net(nn.Module):
    """A user's own model: stem, two stages, pooled classifier."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.stage2(self.stage1(self.stem(x)))), 1))


def test_a_users_module_trains_evaluates_and_exports_into_itself():
    net = Net()
    ll = locallearn.wrap(
        net, method="dgl", num_blocks=3, cut_at=["stage1", "stage2"], input_size=16, device="cpu"
    )
    assert ll.model.head is ll.model.backbone.source_head()  # its own classifier is the head
    x, y = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    before = params(ll.model.head)
    ll.step(x, y)
    assert any(not torch.equal(p0, p1) for p0, p1 in zip(before, ll.model.head.parameters()))
    metrics = ll.evaluate([(x, y)])
    assert set(metrics) >= {"top1", "loss"}
    fresh = Net()
    fresh.load_state_dict(ll.export(), strict=True)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ll.eval()(x))


@pytest.mark.slow  # ~15 s on one core: MobileNetV3's split is checked in train and eval mode
def test_a_torchvision_model_through_the_api():
    torchvision = pytest.importorskip("torchvision")
    m = torchvision.models.mobilenet_v3_small(num_classes=3)
    ll = locallearn.wrap(m, method="dgl+manpp", num_blocks=2, input_size=32, device="cpu")
    assert ll.step(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])).keys() == {"block0", "block1"}
    fresh = torchvision.models.mobilenet_v3_small(num_classes=3)
    fresh.load_state_dict(ll.export(), strict=True)


def test_head_at_makes_a_conv_classifier_the_head():
    torchvision = pytest.importorskip("torchvision")
    for head_at, params in ((None, 0), ("classifier", 512 * 3 + 3)):
        m = torchvision.models.squeezenet1_1(num_classes=3)
        ll = locallearn.wrap(m, method="dgl", num_blocks=2, input_size=64, head_at=head_at, device="cpu")
        assert sum(p.numel() for p in ll.model.head.parameters()) == params
        ll.step(torch.randn(2, 3, 64, 64), torch.tensor([0, 2]))
        torchvision.models.squeezenet1_1(num_classes=3).load_state_dict(ll.export(), strict=True)
    ll = locallearn.wrap(
        "torchvision:squeezenet1_1", num_classes=3, num_blocks=2, input_size=64, head_at="classifier"
    )
    assert sum(p.numel() for p in ll.model.head.parameters()) == 512 * 3 + 3


def test_wrap_refuses_clearly():
    with pytest.raises(locallearn.ConfigError, match="num_classes"):
        locallearn.wrap("resnet20", input_size=8)
    with pytest.raises(locallearn.ConfigError, match="unknown method"):
        tiny("nope")
    with pytest.raises(locallearn.ConfigError, match="optim.nesterov"):
        tiny("dgl", options={"optim.nesterov": "maybe"})


def test_the_example_script_runs():
    """examples/quickstart_api.py, as docs/api.md shows it (CI runs it through this test)."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart_api.py")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "test top1" in out.stdout and "exported" in out.stdout


def test_the_documented_own_loop_equals_step():
    """docs/api.md "Your own loop": the public primitives, called by hand, train exactly as ``step``."""
    from locallearn import build_model
    from locallearn.engine.optim import build_optimizer
    from locallearn.engine.step import local_step

    ll = tiny("dgl+manpp", 3)
    torch.manual_seed(0)  # wrap's seed, before the same build
    model, _, _ = build_model(ll.config, ll.inputs, 10)
    optimizers = [
        build_optimizer(model.block_parameters(k), ll.config.optim) for k in range(model.num_blocks)
    ]
    batch = ll.batch(X, Y)
    model.train()
    h, mine = batch.x, []
    for k in range(model.num_blocks):
        h, out = local_step(model.body(k), model.auxes[k], h, batch, optimizers[k])
        mine.append(out["loss"].item())
    model.sync_momentum()
    assert list(ll.step(X, Y).values()) == mine
    for p, q in zip(model.state_dict().values(), ll.model.state_dict().values()):
        assert torch.equal(p, q)


class Gained(nn.Module):
    """Bare parameters used in the model's own forward (issue 28.3): a learnable gain after the stem
    and a bias before the pool, as a cls token or a layer scale is."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.g = nn.Parameter(torch.full((1,), 1.5))
        self.down1 = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.down2 = nn.Sequential(nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU())
        self.b = nn.Parameter(torch.zeros(1, 16, 1, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down2(self.down1(self.stem(x) * self.g))
        return self.fc(self.pool(x + self.b).flatten(1))


def test_a_bare_parameter_belongs_to_one_block_and_exports(recwarn):
    ll = locallearn.wrap(Gained(), method="dgl", num_blocks=3, input_size=16, device="cpu")
    assert not [w for w in recwarn if "duplicate" in str(w.message)]
    owners = [[p for g in opt.param_groups for p in g["params"]] for opt in ll.trainer.optimizers]
    every = [p for ps in owners for p in ps]
    assert len({id(p) for p in every}) == len(every)  # no parameter in two optimizers, nor twice in one
    net = ll.model.backbone.source_model()
    assert [k for k, ps in enumerate(owners) if any(p is net.g for p in ps)] == [0]
    assert [k for k, ps in enumerate(owners) if any(p is net.b for p in ps)] == [2]
    x, y = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    ll.step(x, y)
    assert float(net.g) != 1.5  # trained by block 0's loss
    fresh = Gained()
    fresh.load_state_dict(ll.export(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), ll.eval()(x))


def test_a_timm_vit_through_the_api():
    """issue 28.4: timm's ViT forward takes (x, attn_mask=None, is_causal=False); its layers are the
    stem and one per transformer block (no module lowers the resolution), its head timm's."""
    timm = pytest.importorskip("timm")
    kw = {"img_size": 16, "patch_size": 4, "depth": 3, "embed_dim": 32, "num_heads": 2, "num_classes": 3}
    ll = locallearn.wrap(timm.create_model("vit_tiny_patch16_224", **kw), method="dgl+manpp",
                         num_blocks=2, input_size=16, device="cpu")  # fmt: skip
    assert len(ll.model.backbone) == 4  # patch embedding + cls token + position embedding, 3 blocks
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    ll.step(x, y)
    assert set(ll.evaluate([(x, y)])) >= {"top1", "loss"}
    fresh = timm.create_model("vit_tiny_patch16_224", **kw)
    fresh.load_state_dict(ll.export(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), ll.eval()(x))


def test_wrap_refuses_another_number_of_classes_and_names_in_chans():
    """issue 28.7 / 28.8: a 10-way model with num_classes=5, and 1-channel model with 3-channel input."""
    with pytest.raises(locallearn.ConfigError, match="outputs 10 classes") as err:
        locallearn.wrap(Net(classes=10), num_classes=5, num_blocks=2, input_size=16)
    assert "\n" not in str(err.value)

    class Grey(Net):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())

    with pytest.raises(locallearn.ConfigError, match="in_chans=1") as err:
        locallearn.wrap(Grey(), num_blocks=2, input_size=16)
    assert "\n" not in str(err.value)
    ll = locallearn.wrap(Grey(), num_blocks=2, input_size=16, in_chans=1, mean=(0.5,), std=(0.25,))
    ll.step(torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 0]))


def test_options_for_a_named_model_are_refused_for_an_object():
    for key, value in (("model.weights", "DEFAULT"), ("model.kwargs", {"depth": 2})):
        with pytest.raises(locallearn.ConfigError, match=f"{key} applies to a model built from its name"):
            locallearn.wrap(Net(), num_blocks=2, input_size=16, options={key: value})
    with pytest.raises(locallearn.ConfigError, match="model.weights applies"):
        tiny("dgl", 2, options={"model.weights": "DEFAULT"})
    with pytest.raises(locallearn.ConfigError, match="model.kwargs applies"):
        tiny("dgl", 2, options={"model.kwargs": {"depth": 2}})


def test_mlaan_block_0_reports_the_loss_that_trains_it_through_wrap():
    """As in the CLI's logs (issue 28): MLAAN's block 0 has no loss of its own; the cascade trains it."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip
    ll = locallearn.wrap(net, method="mlaan", num_blocks=3, input_size=8, in_chans=1, num_classes=10)
    losses = ll.step(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))
    assert losses["block0"] > 0.1
