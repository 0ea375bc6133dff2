"""End-to-end backpropagation: the baseline of every comparison.

K = 1: the whole backbone is one block trained by the task head, through the same engine, data and
schedule as every local method, so a comparison differs in the learning rule only.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from locallearn.methods.base import AuxContext, Method


@dataclass
class BPConfig:
    pass


class BP(Method):
    name = "bp"
    paper = "end-to-end backpropagation (baseline)"
    Config = BPConfig
    composes_with_momentum = False  # K = 1: no aux net to wrap

    def check(self, num_blocks: int) -> None:
        if num_blocks != 1:
            raise ValueError(
                f"method 'bp' is end-to-end training and needs num_blocks (K) = 1, got {num_blocks}"
            )

    def build_aux(self, k: int, ctx: AuxContext) -> nn.Module:
        raise ValueError("method 'bp' has no aux nets (K = 1)")
