"""Every block is scored (engine/block_scores.py): each aux's prediction ('output') goes to a task
evaluator of its own in the test pass; the head's metrics do not move; training steps drop it."""

from __future__ import annotations

import pytest
import torch

from locallearn.engine.block_scores import block_values
from locallearn.engine.sequential import evaluate, train_step
from locallearn.tasks.classification import Classification
from tests.methods.methods_util import tiny_batch, tiny_model

K = 4
TASK = Classification(10)


# method (options) -> the blocks whose aux predicts the task (the last block is the head: always)
PREDICTS = {
    "dgl": {},
    "dgl+manpp": {},
    "auglocal": {},
    "slm": {},
    "predsim": {},
    "infopro": {"method.infopro.loss": "cross_entropy"},
    "infopro+manpp": {"method.infopro.loss": "cross_entropy"},
}
SILENT = {  # method (options) -> blocks that predict nothing, and why
    "infopro": ({}, {0, 1, 2}),  # the default SupCon loss: a projection, not logits
    "mlaan": ({}, {0}),  # block 0 learns through cut 1's cascade only: it has no head
    "predsim": ({"method.predsim.beta": 1.0}, {0, 1, 2}),  # the similarity loss alone
}


def scores(method: str, **options):
    model, _, _ = tiny_model(method, k=K, **options)
    batches = [tiny_batch(16, seed=s) for s in (1, 2)]
    got = evaluate(model, batches, TASK, torch.device("cpu"))
    plain = evaluate(model, batches, TASK, torch.device("cpu"), blocks=False)
    return model, TASK, got, plain


@pytest.mark.parametrize("method", sorted(PREDICTS))
def test_every_predicting_aux_is_scored_and_the_head_metrics_do_not_move(method):
    model, task, got, plain = scores(method, **PREDICTS[method])
    values = block_values(got, task, K)
    assert values is not None and len(values) == K
    assert all(v is not None and 0 <= v <= 100 for v in values), values
    assert values[-1] == got["top1"]  # the last block's score is the head's
    assert {k: got[k] for k in plain} == plain  # the same numbers as the plain test pass
    assert block_values(plain, task, K) is None


@pytest.mark.parametrize("method", sorted(SILENT))
def test_an_aux_that_predicts_nothing_is_not_scored(method):
    options, silent = SILENT[method]
    model, task, got, _ = scores(method, **options)
    values = block_values(got, task, K)
    assert {k for k, v in enumerate(values) if v is None} == silent, values


def test_a_block_score_is_its_aux_top1():
    """DGL's layer-wise accuracy by hand: block k's aux on block k's output, argmax against y."""
    model, _, _ = tiny_model("dgl", k=K)
    batch = tiny_batch(32, seed=3)
    got = evaluate(model, [batch], TASK, torch.device("cpu"))
    model.eval()
    with torch.no_grad():
        h = batch.x
        for k in range(K - 1):
            h = model.body(k)(h)
            aux = model.auxes[k]
            logits = aux.head(aux.body(h))
            want = 100.0 * (logits.argmax(1) == batch.y).float().mean().item()
            assert got[f"block{k}_top1"] == pytest.approx(want)


def test_training_steps_hold_no_prediction():
    """The prediction is for the test pass: a training step's outputs drop it (no block holds it past
    its own backward), for the aux nets and the head alike."""
    model, opts, _ = tiny_model("dgl", k=K)
    outs = train_step(model.train(), tiny_batch(8), opts)
    assert all("output" not in o and "loss" in o for o in outs)


def test_detection_blocks_are_scored_by_the_ap50_of_their_aux_detections(tmp_path):
    """The MAN++ Table IV aux (own stride, RetinaNet subnets) on a 4-image COCO fixture: every block
    gets an AP50 from its aux's own post-processed detections, the last block the head's."""
    import numpy as np

    from locallearn.build import build_model
    from locallearn.config import load_config
    from locallearn.data.detection import DetectionLoader, read_coco, write_fixture
    from locallearn.engine.block_scores import block_values
    from locallearn.types import InputInfo

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(4)]
    anns = [[{"box": (8 + i, 8, 40, 44 + i), "label": i % 2}] for i in range(4)]
    write_fixture(tmp_path, "coco", images, anns, ("a", "b"))
    data = read_coco(str(tmp_path), "val")
    cfg = load_config(
        None,
        [
            "task.name=detection",
            "model.backbone=resnet18",
            "model.num_blocks=4",
            "model.cuts=[3,5,7]",
            "method.name=dgl",
            "method.dgl.dense_head=manpp",
            "data.name=coco",
        ],
    )
    torch.manual_seed(0)
    model, _, task = build_model(cfg, InputInfo(3, 64, (0.5,) * 3, (0.25,) * 3), 2)
    task.bind(data)
    got = evaluate(
        model, DetectionLoader(data, 2, False, min_size=64, max_size=64), task, torch.device("cpu")
    )
    values = block_values(got, task, 4)
    assert [f"block{k}_AP50" in got for k in range(4)] == [True] * 4
    assert all(v is not None and 0 <= v <= 100 for v in values), values
    assert values[-1] == got["AP50"]
