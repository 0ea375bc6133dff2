"""The task contract: the final head and loss, light heads for aux nets, and an evaluator.

A task never knows which method trains it. Dense tasks (``dense = True``) also say which feature
levels their head consumes (``levels``, e.g. ``("C3", "C4", "C5")``) and which of them it reads from
the feature bank (``reads``); aux nets of such tasks end in ``build_local_head``, which takes a dict of
named maps and returns the same output structure as the main head, so one ``loss`` serves both.

Heads keep the task's own initialisation. A module returned by ``build_head``, ``build_local_head`` or
``local_head`` is marked (``keep_init``) when the task's ``keeps_head_init`` is set (the default), and
the backbone family's init that aux nets get (``AuxContext.init_weights``, methods/base.py) restores
every marked module to the weights it was built with, wherever it sits in the aux: RetinaNet's
focal-loss prior bias and std-0.01 convs, torchvision's FPN init, EDSR's and DeepLab's defaults.
Classification opts out: its light Linear heads take the aux's init, as the official classification
codes run their init loop over the whole aux (PRIOR_ART §1). A module a task builds by other means
(a method-specific head) is marked with ``keep_init`` by whoever builds it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from locallearn.types import Batch, FeatureBank, FeatureInfo


class Evaluator:
    """Accumulates a task's test metrics over batches. The default sums ``task.metrics`` (sums over the
    batch) and the loss, and reports means over images (percent for the metric sums).

    Distributed evaluation (``engine.mode=ddp``): each rank updates its own evaluator on its shards of
    the test set, the engine gathers every rank's ``state()`` and hands the list to ``merge``, and
    ``compute()`` then gives the metrics of the whole test set, as one evaluator that saw every batch
    would (up to float summation order). A subclass that accumulates anything else overrides both."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.totals: dict[str, float] = {}
        self.loss_sum, self.n = 0.0, 0

    def update(self, output: Any, batch: Batch) -> None:
        self.loss_sum += self.task.loss(output, batch).item() * len(batch)
        for key, value in self.task.metrics(output, batch).items():
            self.totals[key] = self.totals.get(key, 0.0) + value
        self.n += len(batch)

    def compute(self) -> dict[str, float]:
        out = {key: 100.0 * value / max(self.n, 1) for key, value in self.totals.items()}
        out["loss"] = self.loss_sum / max(self.n, 1)
        return out

    def state(self) -> dict[str, Any]:
        """What this evaluator has accumulated, picklable and on the CPU (``merge`` combines them)."""
        return {"loss_sum": self.loss_sum, "n": self.n, "totals": dict(self.totals)}

    def merge(self, states: Sequence[dict[str, Any]]) -> None:
        """Replace what this evaluator holds with the combination of ``states``: the ``state()`` of
        evaluators that saw disjoint parts of one test set (every rank's, in rank order; one's own
        included)."""
        self.loss_sum = sum(s["loss_sum"] for s in states)
        self.n = sum(s["n"] for s in states)
        self.totals = {}
        for s in states:
            for key, value in s["totals"].items():
                self.totals[key] = self.totals.get(key, 0.0) + value


KEEP_INIT = "_locallearn_keep_init"  # the attribute that marks a module holding the task's own init
HEAD_BUILDERS = ("build_head", "build_local_head", "local_head")


def keep_init(module: nn.Module) -> nn.Module:
    """Mark ``module`` (and so its whole subtree) as holding its own initialisation: the backbone init
    an aux net gets leaves it as built. Returns ``module``."""
    setattr(module, KEEP_INIT, True)
    return module


def keeps_init(module: nn.Module) -> bool:
    return bool(getattr(module, KEEP_INIT, False))


def _marking(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Wrap a head builder so that what it returns is marked when the task keeps its heads' init."""

    @functools.wraps(build)
    def wrapper(self: Task, *args: Any, **kwargs: Any) -> nn.Module:
        module = build(self, *args, **kwargs)
        return keep_init(module) if self.keeps_head_init and isinstance(module, nn.Module) else module

    wrapper.marks_heads = True  # type: ignore[attr-defined]
    return wrapper


class Task:
    """What the network is trained to do. Methods call ``local_head`` / ``build_local_head`` and
    ``loss``; they never hard-code a task."""

    name: str = "task"
    main_metric: str = "loss"
    higher_is_better: bool = False  # of ``main_metric`` (a loss is better lower); tasks say theirs
    # the metric every block's aux is scored by (engine/block_scores.py); "" = ``main_metric``
    block_metric: str = ""
    dense: bool = False  # aux nets end in ``build_local_head`` (maps in) instead of ``local_head``
    levels: tuple[str, ...] = ()  # bank-style names of the feature levels the head consumes
    reads: tuple[str, ...] = ()  # of those, the ones the head takes from the feature bank
    local_reads: tuple[str, ...] = ()  # bank entries an aux's local head may be given besides its maps
    Config: type = type(None)  # the options dataclass (``task.<name>.<field>``)
    # the heads this task builds keep their own init inside aux nets (see the module docstring)
    keeps_head_init: bool = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every head builder a task defines marks what it returns (one place, not per task)."""
        super().__init_subclass__(**kwargs)
        for name in HEAD_BUILDERS:
            build = cls.__dict__.get(name)
            if build is not None and not getattr(build, "marks_heads", False):
                setattr(cls, name, _marking(build))

    def best(self, values: Sequence[float]) -> float | None:
        """The best of ``values`` of the main metric (max or min by ``higher_is_better``); None if empty."""
        if not values:
            return None
        return max(values) if self.higher_is_better else min(values)

    def setup(self, final: FeatureInfo, bank: dict[str, FeatureInfo]) -> None:
        """Called once before any head is built: the last layer's output and the bank's levels."""

    def bind(self, test_data: Any) -> None:
        """Called with the test split before evaluation (detection scores against its ground truth)."""

    def build_head(self, feature: FeatureInfo, bank: dict[str, FeatureInfo] | None = None) -> nn.Module:
        """The head on the last layer's output ``feature``; ``bank`` describes the entries it reads."""
        raise NotImplementedError

    def local_head(self, in_features: int) -> nn.Module:
        """A light head mapping a flat ``in_features`` vector to the task's output (aux nets end in it)."""
        raise NotImplementedError

    def build_local_head(self, features: dict[str, FeatureInfo], shared: HeadRef | None = None) -> nn.Module:
        """Dense tasks: a head whose ``forward(maps)`` takes named maps (a subset of, or other names
        than, ``levels``) and returns what ``loss`` takes. ``shared`` lends the main head's prediction
        layers (memory-augmented MAN's shared head)."""
        raise NotImplementedError(f"task {self.name} has no dense local head")

    def loss(self, output: Any, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def metrics(self, output: Any, batch: Batch) -> dict[str, float]:
        raise NotImplementedError

    def evaluator(self) -> Evaluator:
        return Evaluator(self)

    def shrink_options(self) -> list[str]:
        """The task's config keys that make the aux nets' local heads smaller (build.py's warning)."""
        return []

    def init_model(self, model: nn.Module) -> None:
        """Called once the whole model is built: load initial weights the task's options name
        (``pretrained=``). Not called when a checkpoint is about to be loaded over the model (resume,
        eval: ``build_model(load_weights=False)``), so the file need not exist any more. The default
        does nothing."""


def scaled_grad(t: torch.Tensor, scale: float) -> torch.Tensor:
    """``t`` exactly (``t - t.detach()`` is 0), with the gradient flowing back to it times ``scale``."""
    return t.detach() + scale * (t - t.detach())


class HeadRef:
    """The main head's lent layers, for aux nets that predict with them (the memory-augmented MAN's
    shared head), filled in once the head is built.

    Not a module: an aux holding it does not register the layers, so only the last block's optimizer
    steps them, once per batch, with the gradients that every loss using them added. A local head that
    borrows them says so with ``lend(part)`` at build time (``part``: the submodule it predicts with,
    ``""`` the whole head) and predicts with ``ref()(...)``. ``reduce`` says how the borrowers'
    gradients enter the shared layers, next to the main head's own (which always counts in full):
    ``"mean"`` (default) their mean, ``"sum"`` their sum (about K-1 times a head's step on top of the
    main loss's: RetinaNet at K=4 went NaN at step 64 at the lr end-to-end training uses; docs/detection.md).
    """

    def __init__(self) -> None:
        self.module: nn.Module | None = None  # set once the main head is built (build.build_model)
        self.part: str | None = None
        self.borrowers = 0
        self.reduce = "mean"  # the borrowing method's option (slm.shared_head_grad, checked there)

    def lend(self, part: str = "") -> HeadRef:
        """Record one more aux predicting with the main head's submodule ``part``; returns self."""
        if self.module is not None:
            raise RuntimeError("the shared head is lent after the model was built")
        if self.part is not None and part != self.part:
            raise ValueError(f"the main head's {self.part!r} is lent already; one aux asks for {part!r}")
        self.part, self.borrowers = part, self.borrowers + 1
        return self

    @property
    def aux_scale(self) -> float:
        """What one borrower's gradient is multiplied by before it is added to the shared layers'."""
        return 1.0 / max(self.borrowers, 1) if self.reduce == "mean" else 1.0

    def layers(self) -> nn.Module:
        """The lent layers themselves (the main head's submodule)."""
        if self.module is None:
            raise RuntimeError("the shared head is used before the model was built")
        return self.module.get_submodule(self.part or "")

    def __call__(self) -> Callable[..., Any]:
        """The lent layers as an aux calls them: the same outputs, with the gradient that reaches their
        parameters from this call scaled by ``aux_scale`` (the aux's own layers get theirs unscaled)."""
        layers, scale = self.layers(), self.aux_scale
        if scale == 1.0 or not torch.is_grad_enabled():
            return layers
        return functools.partial(_call_scaled, layers, scale)


def _call_scaled(layers: nn.Module, scale: float, *args: Any, **kwargs: Any) -> Any:
    params = {name: scaled_grad(p, scale) for name, p in layers.named_parameters()}
    return torch.func.functional_call(layers, params, args, kwargs)


class HeadLoss(nn.Module):
    """The aux of the last block: the task head and the task loss."""

    def __init__(self, task: Task, head: nn.Module) -> None:
        super().__init__()
        self.task = task
        self.head = head
        self.reads = tuple(getattr(head, "reads", ()))

    def forward(self, h: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        output = self.head(h, batch.bank) if self.reads else self.head(h)
        return {"loss": self.task.loss(output, batch), "output": output}


__all__ = ["Evaluator", "FeatureBank", "HeadLoss", "HeadRef", "Task", "keep_init", "keeps_init"]
