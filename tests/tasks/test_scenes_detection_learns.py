"""Issue 27.4-27.7, detection: learning proofs on ``digit_scenes`` scored on its test split (digits from
source images no training scene used), each against the same run with the early blocks frozen at init
(their optimizers never step, so neither do their aux nets; batch norm still normalises with the batch's
statistics, as in the trained run). The one-photo proofs (test_detection_learns.py) train and score on
one image, which the last block and the head fit on random early features; these cannot be passed so.

Recipe (``RECIPE``; docs/detection.md "Learning proof" says why each choice): RetinaNet on ResNet-18 cut by
stages (K=4, ``model.cuts=[3,5,7]``, the MAN++ R18 configs' cuts), FPN width 64, anchors 16..256; YOLOv1 on
CIFAR ResNet-20 (4x4 grid; see ``YOLO``); 32-px scenes of one digit of 16-24 px, 480 training / 128 test
scenes, batch 16, AdamW without weight decay (the optimizer of configs/detection/digit_scenes_r18_dgl.yaml):
lr 1e-3 for RetinaNet (the config's; ``RETINA``), 3e-3 for YOLOv1 (the segmentation proof's), cosine over
10 epochs of 30 steps, stopped after each case's ``steps``; detections kept down to a score of 0.001 (torchvision's 0.05
drops a young focal-loss model's correct but low-scored boxes).

Slow proofs (``pytest -s -m slow tests/tasks/test_scenes_detection_learns.py``), per ``PROVEN`` case and
seed, one thread: (a) held-out AP50 >= the case's bar; (b) the frozen control's AP50 at least ``margin``
lower; (c) the early blocks' own held-out AP50 (their aux's detections) at least ``early_gain`` above their
value at init. Each prints a ``PROOF`` line (tests/proof_report.py). Other cases (not yet measured, or
failing a bar: docs/detection.md) print theirs with ``python -m tests.tasks.test_scenes_detection_learns
NAME SEED``.

The fast proof (default suite, ~25 s of CPU): RetinaNet dgl trained 30 steps on tiny scenes; each early
block's aux training loss must fall below ``TINY_FALL`` of its first value, which a block whose optimizer
does not step cannot do (checked by the slow ``test_the_tiny_proof_fails_when_block_0_does_not_step``).
30 steps do not yet detect held-out digits: its held-out AP50 and losses are printed, not asserted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from locallearn.config import load_config
from locallearn.engine.block_scores import BlockScores
from locallearn.trainer import Trainer
from tests.proof_report import report
from tests.tasks.scenes_helpers import ScenesRun, train_on_scenes

RECIPE = {
    "task.name": "detection", "model.backbone": "resnet18", "model.num_blocks": 4, "model.cuts": "[3,5,7]",
    "task.detection.fpn_channels": 64, "task.detection.anchor_sizes": "[16,32,64,128,256]",
    "task.detection.score_thresh": 0.001,
    "data.name": "digit_scenes", "data.scenes.size": 32, "data.scenes.objects": 1,
    "data.scenes.min_digit": 16, "data.scenes.max_digit": 24, "data.scenes.train_images": 480,
    "data.scenes.test_images": 128, "data.batch_size": 16, "data.test_batch_size": 64, "data.augment": "false",
    "optim.name": "adamw", "optim.lr": 0.003, "optim.weight_decay": 0, "optim.epochs": 10, "optim.warmup_epochs": 0,
}  # fmt: skip
MANPP_AUX = {"method.dgl.dense_head": "manpp", "method.dgl.head_convs": 2}
# RetinaNet at the lr of configs/detection/digit_scenes_r18_dgl.yaml (1e-3) over the whole 300-step cosine: at
# 3e-3 its main head stalls at the focal-loss prior (bp, 32 px, 200 steps: AP50 0.3; at 5e-4: 10.7), which
# left the RetinaNet proofs at AP50 5 whatever the early blocks did
RETINA = {"optim.lr": 0.001}
# YOLOv1 predicts from the last map only: ResNet-18's C5 is 1x1 on a 32-px scene (every cell would see the same
# feature), so YOLOv1 runs on the CIFAR ResNets, whose last map is 8x8 there (stride 4), on a 4x4 grid
YOLO = {"task.detection.head": "yolov1", "task.detection.yolo_grid": 4, "model.cuts": "null"}
# K=16 with the shared head (the memory-augmented MAN configs' setting, man_*_k16_slm.yaml: slm's default
# share_head=true): ResNet-32 has 16 layers (stem + 15 units), one per block
K16 = {"model.backbone": "resnet32", "model.num_blocks": 16, "method.slm.share_head": "true"}


@dataclass(frozen=True)
class Case:
    overrides: dict
    bar: float  # held-out AP50 the trained run must reach
    margin: float  # points of AP50 the frozen control must stay below the trained run
    early_gain: float  # points of AP50 each early block's aux must rise above its value at init
    steps: int
    frozen: int  # blocks the control freezes (all but the last; 0: no control, bp)
    early: tuple[int, ...]  # the blocks whose own AP50 must rise (their aux predicts boxes)


# bars from the measured runs (docs/detection.md "Learning proof"), a little under the lower seed's value
CASES = {
    # the reference: end-to-end RetinaNet on the same recipe (no early blocks, so no control); measured AP50
    # 12.5 / 11.1 (seeds 0 / 1)
    "retinanet-bp": Case(
        {"method.name": "bp", "model.num_blocks": 1, "model.cuts": "null", **RETINA}, 10.0, 0, 0, 300, 0, ()
    ),
    # measured AP50 15.4 / 14.3 (seeds 0 / 1), frozen 9.4 / 7.4; early blocks' gains >= 2.0 (block 2)
    "retinanet-dgl+manpp": Case(
        {"method.name": "dgl+manpp", **MANPP_AUX, **RETINA}, 12.0, 4.0, 1.5, 300, 3, (0, 1, 2)
    ),
    # measured AP50 54.2 / 61.5 (seeds 0 / 1), frozen 24.4 / 33.0; early blocks' gains >= 9.5
    "yolov1-slm": Case(
        {"method.name": "slm", "model.backbone": "resnet20", **YOLO}, 35.0, 15.0, 5.0, 200, 3, (0, 1, 2)
    ),
    # measured AP50 55.3 / 56.9 (seeds 0 / 1), frozen 21.3 / 31.8; early blocks' gains >= 1.2 (block 0, seed 1)
    "yolov1-slm+man": Case(
        {"method.name": "slm+man", "model.backbone": "resnet20", **YOLO}, 35.0, 15.0, 1.0, 200, 3, (0, 1, 2)
    ),
    # measured AP50 33.7 / 26.4 (seeds 0 / 1), frozen (blocks 0-14) 8.1 / 23.2: seed 1's margin is narrow
    # (3.2); blocks 0, 4, 8 rise 18.0-20.5 points from 0, the frozen ones stay at 0 (docs/detection.md)
    "yolov1-slm-k16": Case({"method.name": "slm", **YOLO, **K16}, 24.0, 2.5, 10.0, 200, 15, (0, 4, 8)),
    # measured AP50 15.5 / 10.5 (seeds 0 / 1), frozen 9.4 / 7.4 (the same control as dgl+manpp: with the early
    # blocks frozen the two runs are one); early blocks' gains >= 1.8 (block 2, seed 1)
    "retinanet-dgl+man": Case(
        {"method.name": "dgl+man", **MANPP_AUX, **RETINA}, 9.0, 2.5, 1.5, 300, 3, (0, 1, 2)
    ),
}
SEEDS = (0, 1)
# the cases whose bars were set from measured runs (docs/detection.md "Learning proof"); the others run with
# ``python -m tests.tasks.test_scenes_detection_learns NAME SEED`` until they are measured
PROVEN = [
    "retinanet-bp",
    "retinanet-dgl+manpp",
    "retinanet-dgl+man",
    "yolov1-slm",
    "yolov1-slm+man",
    "yolov1-slm-k16",
]


Result = ScenesRun  # at_init / final: the head's metrics and ``block{k}`` -> block k's aux's; losses per step


def scores(trainer: Trainer, test_loader) -> dict:
    """The head's test metrics, plus ``block{k}``: the full metrics (AP50, loss, ...) of block k's aux."""
    model, task = trainer.model, trainer.task
    model.eval()
    head = task.evaluator()
    per_block = BlockScores(model, task)
    with torch.no_grad():
        for batch in test_loader:
            head.update(per_block.forward(batch.x, batch), batch)
    out = head.compute()
    out.update({f"block{k}": ev.compute() for k, ev in per_block.evaluators.items()})
    return out


def train(overrides: dict, steps: int, frozen: int = 0, seed: int = 0) -> Result:
    """``RECIPE`` with ``overrides`` trained ``steps`` steps; the first ``frozen`` blocks' optimizers never
    step (their aux nets neither). One thread."""
    cfg = load_config(None, [f"{k}={v}" for k, v in {**RECIPE, **overrides}.items()])
    return train_on_scenes(cfg, steps, seed, never_step=frozen, score=scores)


def blocks_line(r: Result, metric: str = "AP50") -> str:
    """Each block's ``metric`` at init -> final, the last block's being the head's."""
    k_last = max((int(k[5:]) for k in r.final if k.startswith("block")), default=-1) + 1
    parts = [
        f"{r.at_init[f'block{k}'][metric]:.1f}->{r.final[f'block{k}'][metric]:.1f}" for k in range(k_last)
    ]
    return " ".join([*parts, f"{r.at_init[metric]:.1f}->{r.final[metric]:.1f}"])


def head_loss_line(r: Result) -> str:
    """The last block's training loss: mean of the first and of the last 20 steps, and its highest step."""
    head = [s[-1] for s in r.losses]
    return f"{sum(head[:20]) / len(head[:20]):.2f}->{sum(head[-20:]) / len(head[-20:]):.2f} (max {max(head):.2f})"


def proof_failures(case: Case, normal: Result, frozen: Result | None) -> list[str]:
    """What the proof finds wrong with ``normal`` against its init and the ``frozen`` control."""
    bad = []
    steps = [s for s in normal.losses if not all(math.isfinite(v) for v in s)]
    if steps:
        bad.append(f"non-finite training loss: {steps[0]}")
    if not normal.final["AP50"] >= case.bar:
        bad.append(f"held-out AP50 {normal.final['AP50']:.1f} is below the bar {case.bar}")
    if frozen is not None and not normal.final["AP50"] >= frozen.final["AP50"] + case.margin:
        bad.append(
            f"held-out AP50 {normal.final['AP50']:.1f} is not {case.margin} above the frozen control's "
            f"{frozen.final['AP50']:.1f}"
        )
    for k in case.early:
        got, init = normal.final[f"block{k}"]["AP50"], normal.at_init[f"block{k}"]["AP50"]
        if not got >= init + case.early_gain:
            bad.append(f"block {k}'s AP50 {got:.1f} is not {case.early_gain} above its init {init:.1f}")
    return bad


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", PROVEN)
def test_detection_learns_held_out_digits_and_beats_the_frozen_control(name: str, seed: int) -> None:
    assert prove(name, seed) == []


def prove(name: str, seed: int) -> list[str]:
    """Train case ``name`` and its frozen control, print the PROOF line, return the failures."""
    case = CASES[name]
    normal = train(case.overrides, case.steps, seed=seed)
    frozen = train(case.overrides, case.steps, frozen=case.frozen, seed=seed) if case.frozen else None
    report(
        "detection", name, seed, "AP50", normal.final["AP50"], case.bar,
        frozen=frozen.final["AP50"] if frozen else None, margin=case.margin if frozen else None,
        at_init=normal.at_init["AP50"], steps=case.steps, blocks=blocks_line(normal),
        frozen_blocks=blocks_line(frozen) if frozen else None, head_loss=head_loss_line(normal),
    )  # fmt: skip
    return proof_failures(case, normal, frozen)


# ------------------------------------------------------------------------ the fast proof (default suite)

TINY = {
    "data.scenes.train_images": 160,
    "data.scenes.test_images": 32,
    "data.batch_size": 8,
    "method.name": "dgl",
}
TINY_STEPS = 30
TINY_EARLY = (0, 1, 2)
TINY_FALL = (
    0.95  # each early block's training loss (mean of the last 5 steps) must end below this share of its first
)


def tiny_failures(r: Result) -> list[str]:
    bad = []
    for k in TINY_EARLY:
        first, last = r.losses[0][k], sum(s[k] for s in r.losses[-5:]) / 5
        if not last <= TINY_FALL * first:
            bad.append(
                f"block {k}'s training loss {first:.3f} -> {last:.3f} did not fall below {TINY_FALL} of it"
            )
    return bad


def test_every_early_block_learns_on_tiny_scenes() -> None:
    r = train(TINY, TINY_STEPS)
    report(
        "detection", "retinanet-dgl-tiny", 0, "AP50", r.final["AP50"], float("nan"), at_init=r.at_init["AP50"],
        steps=TINY_STEPS, blocks=blocks_line(r), held_out_loss=blocks_line(r, "loss"),
        train_loss=" ".join(f"{a:.3f}->{b:.3f}" for a, b in zip(r.losses[0], r.losses[-1])),
    )  # fmt: skip
    assert tiny_failures(r) == []


@pytest.mark.slow
def test_the_tiny_proof_fails_when_block_0_does_not_step() -> None:
    r = train(TINY, TINY_STEPS, frozen=1)
    print(f"tiny, block 0 frozen: held-out loss per block {blocks_line(r, 'loss')}")
    assert any(f.startswith("block 0") for f in tiny_failures(r))


if __name__ == "__main__":
    # One case's trained run and its frozen control, printed as the slow test prints them (any case, also
    # those not yet in the slow suite), e.g. python -m tests.tasks.test_scenes_detection_learns yolov1-slm-k16 0;
    # a third argument trains that many steps instead of the case's, and KEY=VALUE after it change the
    # case's config, e.g. ... retinanet-dgl+manpp 0 300 optim.lr=0.003
    import dataclasses
    import sys

    name, seed = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0
    if len(sys.argv) > 3:
        extra = dict(item.split("=", 1) for item in sys.argv[4:])
        case = CASES[name]
        CASES[name] = dataclasses.replace(case, steps=int(sys.argv[3]), overrides={**case.overrides, **extra})
    print(prove(name, seed) or "the proof holds")
