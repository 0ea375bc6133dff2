"""Every block is scored: each aux is a predictor of the task, so each block gets its own test metric.

In the test pass the bodies run one after the other (as ``LocalModel.forward`` does); after each
block but the last, its aux runs once more on the block's output, in eval mode, and the prediction
it returns as ``'output'`` (methods/base.py) goes to a task evaluator of that block's own: top-1 of
the aux's classifier (DGL's layer-wise accuracy), AP50 of the aux's detections, mIoU of its label
maps, PSNR of its image. The last block's score is the head's, i.e. the run's own test metric. An aux
that predicts nothing (InfoPro's decoder alone, a SupCon projection, MLAAN's first block) is not
scored: its entry is None. Cost: one aux forward per block and one evaluator per block.
"""

from __future__ import annotations

from typing import Any

import torch

from locallearn.model import LocalModel
from locallearn.types import Batch


def block_metric(task: Any) -> str:
    """The metric each block reports: the task's ``block_metric``, else its main metric."""
    return getattr(task, "block_metric", "") or task.main_metric


def block_key(k: int, metric: str) -> str:
    """The evaluation dict's key of block ``k``'s score (``metrics.csv``: ``test_`` + this)."""
    return f"block{k}_{metric}"


class BlockScores:
    """The per-block evaluators of one test pass; ``forward`` stands in for ``model(x, bank)``."""

    def __init__(self, model: LocalModel, task: Any) -> None:
        self.model, self.task = model, task
        self.evaluators: dict[int, Any] = {}

    @classmethod
    def of(cls, model: Any, task: Any) -> BlockScores | None:
        """Scores for ``model``'s blocks, or None for a model that has none (any plain module the
        evaluation loops are also given: it is scored by its output alone)."""
        return cls(model, task) if isinstance(model, LocalModel) else None

    @torch.no_grad()
    def forward(self, x: torch.Tensor, batch: Batch) -> Any:
        """The head's output for ``x`` (what ``model(x, batch.bank)`` returns); on the way, each aux's
        prediction updates its block's evaluator."""
        model, h = self.model, x
        for k in range(model.num_blocks):
            h = model.body(k)(h, batch.bank)
            if k < model.num_blocks - 1:
                out = model.auxes[k](h, batch)
                if "output" in out:
                    self.evaluators.setdefault(k, self.task.evaluator()).update(out["output"], batch)
        return model.head(h, batch.bank) if model.head_reads else model.head(h)

    def compute(self, metrics: dict[str, Any]) -> dict[str, float | None]:
        """``block{k}_{metric}`` for every block, given the head's ``metrics`` (the last block's)."""
        name, last = block_metric(self.task), self.model.num_blocks - 1
        out: dict[str, float | None] = {}
        for k in range(last):
            ev = self.evaluators.get(k)
            out[block_key(k, name)] = ev.compute().get(name) if ev is not None else None
        out[block_key(last, name)] = metrics.get(name)
        return out


def block_values(metrics: dict[str, Any], task: Any, num_blocks: int) -> list[float | None] | None:
    """Each block's score from an evaluation's dict (None where a block is not scored), or None when
    the evaluation scored no block (``log.block_metrics=false``, pipeline and DDP runs)."""
    name = block_metric(task)
    keys = [block_key(k, name) for k in range(num_blocks)]
    if not any(key in metrics for key in keys):
        return None
    return [metrics.get(key) for key in keys]
