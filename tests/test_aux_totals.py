"""Whole-step total of a default outside-model build against bp's (issue 26 §2): measured by
``benchmarks/aux_sizes.step_total`` (one step at batches 2 and 4, extrapolated to batch 32), and the
run's one warning line when a measured step is surely above bp's (``aux_budget.warn_if_over_bp``)."""

import logging
from types import SimpleNamespace

import pytest
import torch

from benchmarks.aux_sizes import measure_build, step_total
from locallearn import aux_budget, report
from locallearn.backbones import external
from locallearn.build import build_method, method_names
from locallearn.config import load_config
from locallearn.types import InputInfo

MODEL, SIZE, CLASSES, K = "torchvision:shufflenet_v2_x0_5", 48, 4, 3


@pytest.fixture(scope="module")
def split():
    return external.from_spec(MODEL, CLASSES, 3, SIZE)


@pytest.fixture(scope="module")
def bp(split):
    return step_total(MODEL, "bp", K, SIZE, CLASSES, backbone=split)


@pytest.mark.parametrize("method", [m for m in method_names() if m != "bp"])
def test_default_build_total_below_bp(method, split, bp):
    total = step_total(MODEL, method, K, SIZE, CLASSES, backbone=split)
    assert total < bp, f"{method}: {total / 2**20:.1f} MiB vs bp {bp / 2**20:.1f} MiB"


def test_papers_sizes_exceed_bp(split, bp):
    """The check can fail: the papers' sizing (MAN++ copying the whole next stage, DGL's mlp-sr without
    a width cap: the issue's 157x row) holds several times bp's total."""
    papers = ("method.momentum.copy=layer", "method.dgl.width=1024")
    total = step_total(MODEL, "dgl+manpp", K, SIZE, CLASSES, papers, backbone=split)
    assert total > 2 * bp


class Data(list):
    """A train set of 1000 images as ``record_measurements`` reads it: its length and its InputInfo."""

    info = InputInfo(3, SIZE, (0.5,) * 3, (0.5,) * 3)

    def __len__(self) -> int:
        return 1000


def test_papers_decoder_exceeds_bp(split, bp):
    """The default ``recon_at`` matters: InfoPro's decoder upsampled to the image (the papers', and
    the outside-model default before) holds more than bp's whole step."""
    assert (
        step_total(MODEL, "infopro", K, SIZE, CLASSES, ("method.infopro.recon_at=input",), backbone=split)
        > bp
    )


@pytest.mark.parametrize(
    "method,extra,says,factor",
    [
        ("dgl", (), None, 1),
        ("infopro", ("method.infopro.recon_at=input",), "method.infopro.recon_at=feature", 1),
        ("mlaan", ("method.mlaan.recompute=false",), None, 1),  # one graph of block k: below bp
        # a step made 20x larger than measured: nothing of MLAAN's is left to name
        ("mlaan", ("method.mlaan.ema=false",), "no option of this method", 20),
    ],
)
def test_run_warns_once_when_over_bp(method, extra, says, factor, split, caplog, monkeypatch):
    """``report.record_measurements`` (after a run's first epoch) warns in one line for a step above
    bp's, naming what shrinks it for that method (or that nothing measured does), and not for one below."""
    step, model, opts = measure_build(MODEL, method, K, SIZE, CLASSES, extra, backbone=split)
    step = step.scaled(factor)
    cfg = load_config(None, [f"method.name={method}", *extra])
    run = SimpleNamespace(
        cfg=SimpleNamespace(
            data=SimpleNamespace(batch_size=32),
            engine=SimpleNamespace(mode="sequential", group_steps=False, replicas=1),
        ),
        train_loader=SimpleNamespace(data=Data()),
        model=model,
        optimizers=opts,
        device=SimpleNamespace(type="cpu"),
        method=build_method(cfg.method.name, cfg.method.options),
        step_times=[],
    )
    # the step at batch 32 as measure_build extrapolated it (a real run measures its own batch)
    monkeypatch.setattr(report, "step_memory", lambda *a, **k: step)
    with caplog.at_level(logging.WARNING, logger=aux_budget.__name__):
        report.record_measurements(run, {"step_times": [0.1]}, [b.activation_bytes for b in step.blocks])
    lines = [r.getMessage() for r in caplog.records if "more than bp would" in r.getMessage()]
    assert len(lines) == (0 if says is None else 1)
    assert run.memory["peak_total_bytes"] == step.peak_total_bytes
    if says:
        assert says in lines[0] and "\n" not in lines[0] and "num_blocks" not in lines[0]
        assert aux_budget.bp_total_estimate(model, step, Data.info, 32) < step.peak_total_bytes


def test_bp_estimate_matches_a_measured_bp_step(split, bp):
    """The warning's estimate of bp (no bp model built) is within 10 % of bp's measured step."""
    step, model, _ = measure_build(MODEL, "dgl", K, SIZE, CLASSES, backbone=split)
    buffers = [b.clone() for b in model.buffers()]
    rng = torch.get_rng_state()
    estimate = aux_budget.bp_total_estimate(model, step, Data.info, 32)
    assert abs(estimate - bp) <= 0.1 * bp, (estimate / 2**20, bp / 2**20)
    # the run goes on as if nothing had run: BN statistics and the RNG stream untouched
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert torch.equal(rng, torch.get_rng_state())


@pytest.mark.parametrize(
    "method,extra,outside,named",
    [
        ("infopro", (), True, ["method.infopro.width=16"]),  # already at the map's size
        (
            "infopro",
            ("method.infopro.recon_at=input",),
            True,
            ["method.infopro.recon_at=feature", "method.infopro.width=16"],
        ),
        (
            "infopro",
            (),
            False,
            ["method.infopro.recon_at=feature", "method.infopro.width=16"],
        ),  # the papers' decoder
        ("dgl+manpp", (), True, ["method.dgl.width=16"]),  # already copies an op
        (
            "dgl+manpp",
            ("method.momentum.copy=unit",),
            True,
            ["method.dgl.width=16", "method.momentum.copy=op"],
        ),
        ("dgl+manpp", ("method.momentum.copy=unit",), False, ["method.dgl.width=16"]),  # no ops to copy
        ("slm+man", ("method.slm.width=16",), True, ["method.slm.bank=false"]),
        ("mlaan", (), True, ["method.mlaan.ema=false"]),  # recompute is on (auto)
        ("mlaan", (), False, ["method.mlaan.recompute=true", "method.mlaan.ema=false"]),
        ("mlaan", ("method.mlaan.ema=false",), True, []),
    ],
)
def test_remedies_name_only_what_changes_the_build(method, extra, outside, named):
    """The over-bp warning names, per method, only options measured to shrink the step (never fewer
    blocks, measured not to) and not one already in effect (an ``auto`` resolved for the model)."""
    cfg = load_config(None, [f"method.name={method}", *extra])
    got = aux_budget.remedies(build_method(cfg.method.name, cfg.method.options), outside)
    assert got == named


@pytest.mark.parametrize(
    "method,fpn,named",
    [
        ("dgl", 256, ["task.detection.fpn_channels=64"]),
        ("dgl+manpp", 256, ["task.detection.fpn_channels=64"]),
        ("slm", 256, ["task.detection.fpn_channels=64", "method.slm.bank=false"]),
        ("dgl", 64, []),  # already that narrow
    ],
)
def test_remedies_on_a_dense_task_name_the_tasks_option_not_widths(method, fpn, named):
    """A dense task's aux nets end in its local head, which the methods' widths do not set (the warning
    named method.dgl.width=16 on RetinaNet, which changes nothing); RetinaNet's FPN width does (ResNet-18
    K=4 dgl on 64-px digit_scenes: 585 MiB -> 210 MiB a step, docs/methods.md)."""
    from locallearn.tasks.detection import Detection, DetectionConfig

    task = Detection(10, DetectionConfig(fpn_channels=fpn))
    assert aux_budget.remedies(build_method(method), False, task) == named


@pytest.mark.parametrize(
    "method,option",
    [("slm", "method.slm.width=16"), ("slm+manpp", "method.slm.bank=false")],
)
def test_named_remedy_keeps_total_below_bp(method, option, split, bp):
    """The options the warning names for SLM (``aux_budget.REMEDIES``) shrink a step already below bp."""
    assert option in aux_budget.remedies(build_method(method), True)
    assert step_total(MODEL, method, K, SIZE, CLASSES, (option,), backbone=split) < bp
