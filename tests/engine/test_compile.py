"""engine.compile: per-block torch.compile leaves the computation, the state dict and checkpoints as
they are, and blocks of one structure share compiled graphs. The wiring is tested with Dynamo's
``eager`` backend (graph capture, no code generation: bitwise equal to eager); one inductor test is
marked slow."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from dist_helpers import launch, tiny_config
from helpers import make_batch, make_model
from torch._dynamo.utils import counters

from locallearn.config import ConfigError, load_config
from locallearn.engine import checkpoint
from locallearn.engine.compile import compile_blocks, compile_function, compile_module, is_compiled
from locallearn.engine.sequential import train_step
from locallearn.engine.step import block_forward, local_step
from locallearn.model import Body
from locallearn.run import Run
from locallearn.run.launch import resume_run
from locallearn.types import Batch, FeatureBank


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _pair(method: str, k: int = 4, **extra):
    torch.manual_seed(0)
    eager = make_model(method, k=k, **extra)
    torch.manual_seed(0)
    compiled = make_model(method, k=k, **extra)
    return eager, compiled


def _steps(model, optimizers, n: int = 3, size: int = 8) -> list[torch.Tensor]:
    return [
        torch.stack([o["loss"].detach() for o in train_step(model, make_batch(size, seed=i), optimizers)])
        for i in range(n)
    ]


@pytest.mark.parametrize("method", ["dgl+manpp", "infopro", "mlaan"])
def test_compiled_blocks_train_exactly_as_eager(method):
    """Three steps, eager backend: the same losses and every parameter and BN statistic bitwise equal
    (MAN++ momentum syncs and MLAAN's window-2 cascade included), with the same state-dict keys."""
    (ma, oa, _, _), (mb, ob, _, _) = _pair(method)
    keys = list(mb.state_dict())
    compile_blocks(mb, backend="eager", region="module")
    assert all(is_compiled(mb.body(k)) and is_compiled(mb.auxes[k]) for k in range(mb.num_blocks))
    assert list(mb.state_dict()) == keys and not any("_orig_mod" in key for key in keys)
    for la, lb in zip(_steps(ma, oa), _steps(mb, ob)):
        assert torch.equal(la, lb)
    sa, sb = ma.state_dict(), mb.state_dict()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert counters["stats"]["unique_graphs"] > 0  # something was really compiled


def test_mlaan_recompute_gets_module_regions_and_trains_exactly_as_eager():
    """``method.mlaan.recompute``: block k-1 of the cascade under torch.utils.checkpoint in the engine's
    block forward; such a model gets module regions (one per body and aux), bitwise equal to eager."""
    extra = {"method.mlaan.recompute": "true"}
    (ma, oa, _, _), (mb, ob, _, _) = _pair("mlaan", **extra)
    compile_blocks(mb, backend="eager", region="block")
    assert all(is_compiled(mb.body(k)) for k in range(mb.num_blocks))
    assert not any(hasattr(mb.body(k), "compiled_block_forward") for k in range(mb.num_blocks))
    for la, lb in zip(_steps(ma, oa), _steps(mb, ob)):
        assert torch.equal(la, lb)
    sa, sb = ma.state_dict(), mb.state_dict()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_blocks_of_one_structure_share_their_graphs():
    """resnet20 K=10 (dgl): 10 bodies and 10 aux nets, but only the distinct structures compile: bodies
    stem, 16, 16->32, 32, 32->64, 64; aux nets at 16, 32, 64 channels; the head."""
    model, opts, _, _ = make_model("dgl", k=10)
    compile_blocks(model, backend="eager", region="module")
    _steps(model, opts, n=2)
    assert counters["stats"]["unique_graphs"] == 6 + 3 + 1
    assert sum(counters["graph_break"].values()) == 0


def test_infopro_loss_weights_do_not_compile_a_graph_per_block():
    """InfoPro's per-block loss weights are Python floats: they become graph inputs after the first
    difference instead of one aux graph per block (7 aux nets of 3 shapes here)."""
    model, opts, _, _ = make_model("infopro", k=8)
    compile_blocks(model, backend="eager", region="module")
    _steps(model, opts, n=1)
    weights = {(a.lambda1, a.lambda2) for a in list(model.auxes)[:-1]}
    assert len(weights) == 7
    aux_graphs = counters["stats"]["unique_graphs"] - 6 - 1  # bodies, head
    assert aux_graphs <= 3 + 1  # a graph per shape, plus the first one before the weights went symbolic


def test_a_new_batch_size_recompiles_static_shapes():
    model, opts, _, _ = make_model("dgl", k=4)
    compile_blocks(model, backend="eager", region="module")
    _steps(model, opts, n=1, size=8)
    first = counters["stats"]["unique_graphs"]
    _steps(model, opts, n=1, size=6)  # an epoch's smaller last batch: its own static graphs
    assert counters["stats"]["unique_graphs"] == 2 * first
    _steps(model, opts, n=1, size=8)  # both cached
    assert counters["stats"]["unique_graphs"] == 2 * first


def test_compiled_body_writes_detached_bank_entries():
    layers = [torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 1)]
    body = Body(layers, range(3), {-1: ("input",), 1: ("C0",)})
    compile_module(body, backend="eager")
    bank = FeatureBank()
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    out = body(x, bank)
    assert sorted(name for name, _ in bank.items()) == ["C0", "input"]
    assert all(not t.requires_grad for _, t in bank.items())
    assert torch.equal(bank.read("input"), x.detach())
    out.sum().backward()
    assert x.grad is not None


def test_recomputing_momentum_aux_stays_eager(caplog):
    model, _, _, _ = make_model("dgl+manpp", k=4, **{"method.momentum.recompute": "true"})
    with caplog.at_level("INFO", logger="locallearn.engine.compile"):
        compile_blocks(model, backend="eager")
    assert all(is_compiled(model.body(k)) for k in range(model.num_blocks))
    assert not any(is_compiled(model.auxes[k]) for k in range(model.num_blocks - 1))
    assert is_compiled(model.auxes[-1])
    assert "torch.utils.checkpoint" in caplog.text


def test_bodies_only():
    model, opts, _, _ = make_model("dgl", k=4)
    compile_blocks(model, backend="eager", auxes=False, region="module")
    assert not any(is_compiled(a) for a in model.auxes)
    _steps(model, opts, n=1)


BLOCK_CASES = [
    ("bp", 1, "eager"),
    ("dgl", 4, "eager"),
    ("infopro", 4, "eager"),
    ("dgl+manpp", 4, "eager"),
    ("mlaan", 4, "eager"),
    ("bp", 1, "aot_eager"),
    ("dgl", 4, "aot_eager"),
    ("dgl+manpp", 4, "aot_eager"),
    ("mlaan", 4, "aot_eager"),
    # not infopro under aot_eager: its loss weights become symbolic graph inputs there, which rounds
    # the weighted sum differently from eager in the last bit (module regions alike)
]


@pytest.mark.parametrize(("method", "k", "backend"), BLOCK_CASES)
def test_block_regions_train_exactly_as_eager(method, k, backend):
    """engine.compile_region=block: body + aux (+ block k-1 again for MLAAN's cascade) as one region
    per block; three steps bitwise equal to uncompiled training, state-dict keys unchanged."""
    (ma, oa, _, _), (mb, ob, _, _) = _pair(method, k=k)
    keys = list(mb.state_dict())
    compile_blocks(mb, backend=backend, region="block")
    assert all(is_compiled(mb.body(i)) for i in range(mb.num_blocks))
    assert not any(getattr(m, "_compiled_call_impl", None) for m in [*mb.auxes, *mb._bodies])
    assert list(mb.state_dict()) == keys
    for la, lb in zip(_steps(ma, oa), _steps(mb, ob)):
        assert torch.equal(la, lb)
    sa, sb = ma.state_dict(), mb.state_dict()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert counters["stats"]["unique_graphs"] > 0
    assert sum(counters["graph_break"].values()) == 0


@pytest.mark.slow  # 20-40 s each
@pytest.mark.parametrize("region", ["module", "block"])
def test_a_shared_detection_head_compiles_exactly(region):
    """slm's aux calls the main head's layers through functional_call with gradient-scaled parameters
    (tasks/base.py HeadRef): compiled, two steps are bitwise equal to eager, parameters included."""
    from tests.tasks.test_detection import det_batch, det_model

    (ma, oa, _), (mb, ob, _) = det_model("slm"), det_model("slm")
    compile_blocks(mb, backend="aot_eager", region=region)
    for step in range(2):
        la = torch.stack([o["loss"].detach() for o in train_step(ma, det_batch(seed=step), oa)])
        lb = torch.stack([o["loss"].detach() for o in train_step(mb, det_batch(seed=step), ob)])
        assert torch.equal(la, lb)
    sa, sb = ma.state_dict(), mb.state_dict()
    assert all(torch.equal(sa[key], sb[key]) for key in sa)


def test_block_regions_share_graphs_between_blocks_of_one_structure():
    """resnet20 K=10 (dgl): one graph per distinct (body, aux) pair: stem, 16, 16->32, 32, 32->64 and
    64 channels with a DGL aux, 64 with the head: 7 graphs for 10 blocks (module regions: 10)."""
    model, opts, _, _ = make_model("dgl", k=10)
    compile_blocks(model, backend="eager", region="block")
    _steps(model, opts, n=2)
    assert counters["stats"]["unique_graphs"] == 7
    assert sum(counters["graph_break"].values()) == 0


def test_block_regions_infopro_loss_weights_are_graph_inputs():
    model, opts, _, _ = make_model("infopro", k=8)
    compile_blocks(model, backend="eager", region="block")
    _steps(model, opts, n=1)
    assert len({(a.lambda1, a.lambda2) for a in list(model.auxes)[:-1]}) == 7
    # stem, 16, 16->32, 32, 32->64, 64 with the head; plus at most one before the weights went symbolic
    assert counters["stats"]["unique_graphs"] <= 6 + 1 + 1


def test_block_region_with_bank_writing_body_matches_eager():
    """A body that writes bank entries and an aux that reads one, as one compiled region: the same
    loss and gradients as eager, and the stored entries are detached."""

    class ReadsBank(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 1)

        def forward(self, h, batch):
            c0 = batch.bank.read("C0")
            return {"loss": self.fc(h.mean((2, 3))).square().mean() + c0.square().mean()}

    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        layers = [torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 1)]
        body, aux = Body(layers, range(3), {-1: ("input",), 1: ("C0",)}), ReadsBank()
        if compiled:
            body.compiled_block_forward = compile_function(block_forward, backend="eager")
        g = torch.Generator().manual_seed(0)
        batch = Batch(torch.randn(2, 3, 8, 8, generator=g), torch.arange(2), torch.zeros(3), torch.ones(3))
        params = [*body.parameters(), *aux.parameters()]
        h, out = local_step(body, aux, batch.x, batch, torch.optim.SGD(params, lr=0.1))
        assert not h.requires_grad
        assert sorted(name for name, _ in batch.bank.items()) == ["C0", "input"]
        assert all(not t.requires_grad for _, t in batch.bank.items())
        results.append(
            [out["loss"].detach(), *(p.detach() for p in params), *(t for _, t in batch.bank.items())]
        )
    assert counters["stats"]["unique_graphs"] == 1
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_block_regions_fall_back_to_module_regions_with_a_reason(caplog):
    model, opts, _, _ = make_model("dgl+manpp", k=4, **{"method.momentum.recompute": "true"})
    with caplog.at_level("INFO", logger="locallearn.engine.compile"):
        compile_blocks(model, backend="eager", region="block")
    assert "module regions instead of block regions" in caplog.text
    assert "torch.utils.checkpoint" in caplog.text
    assert not any(getattr(model.body(k), "compiled_block_forward", None) for k in range(4))
    assert all(getattr(model.body(k), "_compiled_call_impl", None) for k in range(4))
    _steps(model, opts, n=1)
    caplog.clear()
    model, opts, _, _ = make_model("dgl", k=4)
    with caplog.at_level("INFO", logger="locallearn.engine.compile"):
        compile_blocks(model, backend="eager", auxes=False, region="block")  # a dense task
    assert "aux nets stay eager" in caplog.text
    assert not any(is_compiled(a) for a in model.auxes)


def test_unknown_backend_or_mode_is_refused():
    with pytest.raises(ConfigError, match="engine.compile_backend"):
        load_config(None, ["engine.compile=true", "engine.compile_backend=tvm"])
    with pytest.raises(ConfigError, match="engine.compile_mode"):
        load_config(None, ["engine.compile_mode=fast"])
    with pytest.raises(ConfigError, match="engine.compile_region"):
        load_config(None, ["engine.compile_region=step"])
    with pytest.raises(ValueError, match="compile_backend"):
        compile_module(torch.nn.Linear(2, 2), backend="tvm")
    with pytest.raises(ValueError, match="compile_region"):
        compile_blocks(make_model("dgl", k=2)[0], backend="eager", region="step")


RUN = [
    "data.name=digits",
    "data.train_subset=96",
    "data.test_subset=32",
    "data.batch_size=32",
    "model.backbone=resnet20",
    "model.num_blocks=3",
    "method.name=dgl+manpp",
    "optim.lr=0.05",
    "optim.epochs=2",
    "optim.warmup_epochs=0",
    "engine.device=cpu",
    "engine.compile_backend=eager",
]


@pytest.mark.parametrize("region", ["module", "block"])
def test_compiled_run_checkpoints_and_resumes_uncompiled(tmp_path, region):
    """A compiled run (memory meter on) saves ordinary checkpoints: resumed without compile, it ends
    bitwise where an uncompiled run does."""
    straight = Run(load_config(None, [*RUN, f"out_dir={tmp_path}", "name=straight"]), quiet=True)
    straight.fit()
    overrides = [
        f"out_dir={tmp_path}",
        "name=compiled",
        "engine.compile=true",
        f"engine.compile_region={region}",
    ]
    compiled = Run(load_config(None, [*RUN, *overrides]), quiet=True)
    assert is_compiled(compiled.model.body(0))
    assert is_compiled(compiled.model.auxes[0]) == (region == "module")
    compiled.fit(stop_after=1)
    assert compiled.memory["peak_activation_bytes"] > 0
    resumed = resume_run(tmp_path / "compiled", quiet=True, overrides=["engine.compile=false"])
    assert not is_compiled(resumed.model.body(0))
    resumed.fit()
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("region", ["module", "block"])
def test_inductor_matches_eager_closely(region):
    """Real code generation on the CPU (a C++ compiler is needed): close to eager, not bitwise (fused
    kernels sum in another order)."""
    (ma, oa, _, _), (mb, ob, _, _) = _pair("dgl+manpp", k=3)
    compile_blocks(mb, backend="inductor", region=region)
    for la, lb in zip(_steps(ma, oa, n=2), _steps(mb, ob, n=2)):
        assert torch.allclose(la, lb, rtol=1e-4, atol=1e-5), (la, lb)
    sa, sb = ma.state_dict(), mb.state_dict()
    for key in sa:
        if sa[key].is_floating_point():
            # two SGD steps on 8 images of 8x8: BatchNorm's backward amplifies the reordering
            assert torch.allclose(sa[key], sb[key], rtol=1e-2, atol=2e-3), key


@pytest.mark.slow
def test_pipeline_ranks_compile_their_own_blocks(tmp_path):
    """engine.mode=pipeline with compile (eager backend): each rank compiles its blocks (lazily, at
    their first call) and every rank's checkpoint equals the uncompiled sequential engine bitwise."""
    cfg = tiny_config(tmp_path / "pipe", mode="pipeline", pipeline_depth=1, pipeline_blocks=[2, 2])
    cfg.engine.compile, cfg.engine.compile_backend = True, "eager"
    cfg.optim.epochs = 1
    launch(2, tmp_path, cfg)
    seq = dataclasses.replace(cfg, out_dir=str(tmp_path / "seq"))
    seq.engine = dataclasses.replace(cfg.engine, mode="sequential", compile=False)
    threads = torch.get_num_threads()
    try:
        run = Run(seq, quiet=True)
        run.fit()
    finally:
        torch.set_num_threads(threads)
    reference = run.model.state_dict()
    for r in range(2):
        state = checkpoint.load(tmp_path / "pipe" / "run" / f"checkpoint.rank{r}.pt")
        for key, value in state["model"].items():
            assert torch.equal(value, reference[key]), (r, key)
