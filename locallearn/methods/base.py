"""The method contract: a factory of aux nets.

``Method.build_aux(k, ctx)`` returns the aux of block ``k`` (k < K-1; the last block is trained by the
task head). The aux's ``forward(h, batch)`` returns ``{'loss': tensor, ...logs}``, plus ``'output'``
when the aux predicts the task: its prediction in the task's output format, what ``task.loss`` and
``task.evaluator()`` take (logits, RetinaNet's dict, a label map's logits, an image). Every block is
then scored on the test set with the task's own evaluator (``engine/block_scores.py``); an aux without
``'output'`` (InfoPro's decoder alone, a SupCon projection) is not scored. Training steps drop the
prediction after the backward (``engine/step.py``), so no block holds it past its own step. A method declares
what the engine must honour: ``window`` (how many blocks one local loss may span) and ``needs_next``
(the aux reads a later layer's live weights every step; the engine then calls ``aux.sync(layer)``
after the optimizer steps, with the live first layer of block k+1).

``window = 2`` (MLAAN's cascade): for k >= 1 the engine runs block k-1 again on its cached, detached
input, block k on that, and calls ``aux(h, batch, cascade=True)``; the aux returns ``own_loss`` (its
gradient reaches block k and the aux only) and ``cascade_loss`` (reaches blocks k-1 and k) besides
``loss``, and block k-1's optimizer steps after block k's backward. The last
block's aux is what ``make_head`` returns (default: the task head and loss unchanged).

Initialisation of aux nets: ``AuxContext.init_weights`` is the backbone family's init for the layers a
method builds or copies from the backbone (replicas, momentum copies, decoders, DGL's convs), and it
leaves every module a task built (``tasks/base.py: keep_init``: RetinaNet heads and their prior, FPNs,
YOLO, segmentation and SR heads) as the task built it, wherever it sits in the aux. It runs the family's
init over the whole module and then restores the marked parts, so the random draws of everything else
are those of a plain init over the module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from locallearn.tasks.base import HeadRef, Task, keeps_init
from locallearn.types import FeatureInfo, InputInfo


def stage_starts(features: list[FeatureInfo]) -> list[int]:
    """Indices of the first layer of each stage in ``features`` (a run of layers, e.g. those after a
    cut). Index 0 always starts one, possibly a stage already begun before the cut. The stage is the
    backbone's ``FeatureInfo.stage``, not a change of shape: a VGG layer that ends in a max-pool
    changes shape in the middle of its stage."""
    return [j for j, f in enumerate(features) if j == 0 or f.stage != features[j - 1].stage]


def level_name(feature: FeatureInfo) -> str:
    """The bank-style name of a map at this feature's stride (``"C3"`` for stride 8)."""
    return f"C{feature.reduction.bit_length() - 1}"


def sparing_task_parts(init: Callable[[nn.Module], None]) -> Callable[[nn.Module], None]:
    """``init`` over a module, then every task-built part inside it (``keeps_init``) back to the
    weights and buffers it had: the backbone init never overwrites a task's own (a focal-loss prior)."""
    if getattr(init, "spares_task_parts", False):
        return init

    def apply(module: nn.Module) -> None:
        kept, names = [], []  # the outermost marked modules (a marked module's subtree is restored with it)
        for name, m in module.named_modules():
            if keeps_init(m) and not any(name.startswith(f"{n}.") or n == "" for n in names):
                kept.append(m)
                names.append(name)
        saved = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in kept]
        init(module)
        with torch.no_grad():
            for m, state in zip(kept, saved):
                m.load_state_dict(state)

    apply.spares_task_parts = True  # type: ignore[attr-defined]
    apply.__wrapped__ = init  # type: ignore[attr-defined]
    return apply


@dataclass
class AuxContext:
    """Everything an aux net may know about where it sits."""

    k: int  # block index (0-based)
    num_blocks: int  # K
    feature: FeatureInfo  # output of block k = input of the aux
    inputs: InputInfo  # the image the network eats (decoders reconstruct it)
    task: Task
    next_layers: list[nn.Module]  # live layers after the cut (read-only: copy, never register them)
    next_features: list[FeatureInfo]  # their FeatureInfo
    # the backbone family's initialisation; task-built parts keep theirs (``sparing_task_parts``)
    init_weights: Callable[[nn.Module], None]
    # layers of the whole backbone (the cut sits before layer num_layers - len(next_layers))
    num_layers: int = 0
    # Feature-bank entries written before this cut, by name ("input", "C3", ...): what the aux may
    # read as inputs (``batch.bank.read(name)``). An aux that reads entries lists them in ``reads``.
    bank: dict[str, FeatureInfo] = dataclasses.field(default_factory=dict)
    head_ref: HeadRef | None = None  # the main task head, for aux nets that share it (dense tasks)
    # Outside models only (``torchvision:`` / ``timm:`` / ``module:`` / ``wrap``; build.py's
    # ``aux_budget``): the widest channels an aux may build fresh, chosen so the aux nets fit the
    # backbone's size; None = the method's own (the papers') widths, as on the listed backbones.
    width: int | None = None
    # Outside models only: ``unit_of(layer, its input, part)`` = the layer's first unit (part "unit")
    # or its first op (part "op": the first unit's leading conv-norm-activation) and what it outputs,
    # or None. There a layer is a whole stage; the papers copy one unit (a residual block) of the next
    # layer. None on the listed backbones, whose layers are units already.
    unit_of: Callable[[nn.Module, FeatureInfo, str], tuple[nn.Module, FeatureInfo] | None] | None = None

    def __post_init__(self) -> None:
        self.init_weights = sparing_task_parts(self.init_weights)

    @property
    def outside(self) -> bool:
        """Whether the backbone comes from outside the papers' tables (build.py gives only those a
        ``unit_of``): methods whose ``auto`` options differ there read this."""
        return self.unit_of is not None

    def with_feature(self, feature: FeatureInfo) -> AuxContext:
        """The context of an aux that is fed another feature (e.g. the next layer's output)."""
        return dataclasses.replace(self, feature=feature)

    def after_next(self) -> AuxContext:
        """The context of an aux fed layer ``n``'s output (the first layer after the cut): what a base
        method sees behind a momentum aux, which stands in for layer ``n``."""
        return dataclasses.replace(
            self,
            feature=self.next_features[0],
            next_layers=self.next_layers[1:],
            next_features=self.next_features[1:],
        )

    def copy_source(self, j: int, copy: str, chained: bool = False) -> tuple[nn.Module, FeatureInfo]:
        """What a method copies for later layer ``j`` (index into ``next_layers``) and what the copy
        outputs. ``copy``: ``layer`` = the whole layer; ``unit`` = its first unit where ``unit_of``
        knows one (outside models); ``op`` = its first op there (the first unit's conv-norm-activation),
        else its first unit; ``auto`` = on outside models the op where its output is no larger than the
        unit's (an inverted residual's first op expands: the aux behind it would run on a map several
        times the unit's), else the unit, and ``layer`` elsewhere. ``chained``: a copy of layer j+1
        reads this copy's output, so a piece that outputs another shape than its layer (an op;
        ShuffleNet's last stage ends in a 1x1 conv to 1024) is not used."""
        if copy not in ("auto", "layer", "unit", "op"):
            raise ValueError(f"copy must be 'auto', 'layer', 'unit' or 'op', got {copy!r}")
        layer, out = self.next_layers[j], self.next_features[j]
        if copy == "layer" or self.unit_of is None:
            return layer, out
        feature = self.feature if j == 0 else self.next_features[j - 1]
        found = {}
        for part in ("unit",) if copy == "unit" else ("op", "unit"):
            piece = self.unit_of(layer, feature, part)
            # a dense task's local heads name maps by their stride (C3, C4): an op at another stride
            # than its layer's output (a Bottleneck's 1x1 conv) would hand them the wrong level
            same = chained or (part == "op" and self.task.dense)
            if piece is not None and not (same and piece[1] != out):
                found[part] = piece
        if copy == "auto" and len(found) == 2 and elements(found["op"][1]) > elements(found["unit"][1]):
            del found["op"]
        return next(iter(found.values()), (layer, out))

    def spatial(self, feature: FeatureInfo | None = None) -> int:
        """Side length of the feature map (input size / reduction)."""
        f = feature or self.feature
        return max(1, self.inputs.size // f.reduction)


def elements(feature: FeatureInfo) -> float:
    """Values per image of a map, relative to the input's pixel count (channels / reduction squared)."""
    return feature.num_chs / feature.reduction**2


class Method:
    """Base class. Subclasses set ``name``, ``Config`` (a dataclass) and implement ``build_aux``."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    Config: ClassVar[type] = type(None)
    window: ClassVar[int] = 1
    needs_next: ClassVar[bool] = False
    composes_with_momentum: ClassVar[bool] = True  # may be wrapped by "+man" / "+manpp"

    def __init__(self, cfg: Any = None) -> None:
        self.cfg = cfg if cfg is not None else self.Config()

    def build_aux(self, k: int, ctx: AuxContext) -> nn.Module:
        raise NotImplementedError

    def make_aux(self, k: int, ctx: AuxContext) -> nn.Module:
        """``build_aux`` followed by the backbone family's initialisation (InfoPro's init loop runs over
        the aux nets too, PRIOR_ART §1), which spares the parts the task built (module docstring).
        Wrappers that copy live layers override this."""
        aux = self.build_aux(k, ctx)
        ctx.init_weights(aux)
        return aux

    def make_head(self, head: nn.Module) -> nn.Module:
        """The aux of the last block, given the task's ``HeadLoss``. Methods whose last block needs
        more than the task loss (MLAAN's cascade, the feature bank's writer) wrap it; the wrapper
        must expose the task head as ``.head``."""
        return head

    def check(self, num_blocks: int) -> None:
        """Refuse impossible settings with a clear ValueError."""

    def replicates_later(self, ctx: AuxContext) -> bool:
        """Whether this method's aux at ``ctx`` runs copies of later layers on its input (SLM's replica):
        a momentum aux in front must then output what the next layer outputs."""
        return False

    def sized_by_width(self) -> bool:
        """Whether this method's aux widths follow ``AuxContext.width`` (its ``width`` option left at
        0 = auto); build.py then picks the width for an outside model."""
        return getattr(self.cfg, "width", None) == 0

    def shrink_options(self) -> list[str]:
        """The config keys that make this method's aux nets smaller (named in build.py's warning)."""
        return [f"method.{self.name}.width=64"] if hasattr(self.cfg, "width") else []
