"""The task contract: the final head and loss, a light local head for aux nets, and a metric."""

from __future__ import annotations

import torch
from torch import nn

from locallearn.types import Batch, FeatureInfo


class Task:
    """What the network is trained to do. Methods call ``local_head`` and ``loss``; they never
    hard-code a task. ``metrics`` returns sums over the batch so the engine can average exactly."""

    name: str = "task"
    main_metric: str = "loss"
    higher_is_better: bool = True

    def build_head(self, feature: FeatureInfo) -> nn.Module:
        raise NotImplementedError

    def local_head(self, in_features: int) -> nn.Module:
        """A light head mapping a flat ``in_features`` vector to the task's output (aux nets end in it)."""
        raise NotImplementedError

    def loss(self, output: torch.Tensor, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def metrics(self, output: torch.Tensor, batch: Batch) -> dict[str, float]:
        raise NotImplementedError


class HeadLoss(nn.Module):
    """The aux of the last block: the task head and the task loss."""

    def __init__(self, task: Task, head: nn.Module) -> None:
        super().__init__()
        self.task = task
        self.head = head

    def forward(self, h: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        output = self.head(h)
        return {"loss": self.task.loss(output, batch), "output": output}
