"""Any ``nn.Module`` as a backbone: ``from_module(model, cut_at=None)`` splits it at module names.

How the split stays correct in train and in eval mode: ``graph_split`` (leaf modules keep their
``self.training`` branches live; the traced code is traced in both modes). Names in a config
(``torchvision:NAME``, ``timm:NAME``, ``package.module:factory``): ``sources``.

Layers: a layer starts at the first operation of each module in ``cut_at`` (forward order). Default:
the model's stages, timm's ``feature_info`` convention: a new layer at each leaf module that lowers
the resolution (ResNet: stem, maxpool + layer1, layer2, layer3, layer4). Exactly one tensor may cross
a cut; a skip connection around it is refused, naming the tensor.

Head: the model's own classifier. From the global pooling on (the first operation that leaves the
spatial map or token sequence, with the pooling right before it) the rest of the graph is
``backbone.source_head()``: torchvision's avgpool + flatten + fc / classifier, timm's
``forward_head``. A model that outputs a feature map has no head.

Check (``check=True``): the split model (layers, then head) and the source model are run on one batch
in train mode (same seed: dropout masks match; outputs, BatchNorm statistics and gradients compared)
and in eval mode; any difference raises. The source model's state is restored afterwards.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from locallearn.backbones import graph_split as gs
from locallearn.backbones.base import Backbone
from locallearn.backbones.graph_split import ModePair, SplitError, first_op, first_unit
from locallearn.backbones.sources import check_spec, is_spec, source_model
from locallearn.types import FeatureInfo

__all__ = [
    "ExternalBackbone",
    "ModePair",
    "SplitError",
    "check_spec",
    "check_split",
    "first_op",
    "first_unit",
    "from_module",
    "from_spec",
    "is_spec",
    "source_model",
]


class ExternalBackbone(Backbone):
    """Layers cut out of a source model, sharing its modules (tensor identity maps the state dicts).

    ``source_head()``: the model's own classifier (or None); ``source_model()``: the model itself;
    ``source_keys`` / ``head_keys``: our state-dict names -> the source model's."""

    def __init__(
        self,
        layers: list[nn.Module],
        feature_info: list[FeatureInfo],
        in_chans: int,
        source: nn.Module,
        head: nn.Module | None,
        name: str,
        num_outputs: int | None,
    ) -> None:
        super().__init__(layers, feature_info, in_chans)
        self.name = name
        self.num_outputs = num_outputs  # width of the model's output (its classes) when it has a head
        self._source = [source]  # a list: not a registered submodule (its tensors are already ours)
        self._head = [head]
        theirs = _tensor_names(source)
        self.source_keys = _key_map(self, theirs, name)
        self.head_keys = _key_map(head, theirs, name) if head is not None else {}

    def source_model(self) -> nn.Module:
        return self._source[0]

    def source_head(self) -> nn.Module | None:
        return self._head[0]

    def source_state_dict(self, head: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """The source model's own state dict with this backbone's (trained) tensors and, if given, the
        head's (``head`` must be ``source_head()`` or a module of the same structure). Tensors no layer
        uses come from the source model as it is."""
        state = {k: v.detach().clone() for k, v in self.source_model().state_dict().items()}
        for k, v in self.state_dict().items():
            state[self.source_keys[k]] = v.detach().clone()
        if head is not None:
            for k, v in head.state_dict().items():
                state[self.head_keys[k]] = v.detach().clone()
        return state

    def load_pretrained(self, state: dict[str, torch.Tensor], source: str = "the state dict") -> None:
        """``model.pretrained=FILE``: the source model's own weights (a torchvision or timm file, or
        ``torch.save(model.state_dict())``). Every tensor must be there with its shape, except the
        classifier's, which keeps its built shape when the file has another number of classes.
        Raises ``ValueError`` naming the missing, unexpected and reshaped keys."""
        model = self.source_model()
        own = model.state_dict()
        head = set(self.head_keys.values())
        unexpected = [k for k in state if k not in own]
        missing = [
            k for k in own if k not in state and k not in head and not k.endswith("num_batches_tracked")
        ]
        reshaped = [k for k in own if k in state and state[k].shape != own[k].shape and k not in head]
        if missing or unexpected or reshaped:
            parts = [
                f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                for what, keys in (("missing", missing), ("unexpected", unexpected), ("reshaped", reshaped))
                if keys
            ]
            raise ValueError(f"{source} does not fit {self.name}: keys {'; '.join(parts)}")
        model.load_state_dict({k: v for k, v in state.items() if v.shape == own[k].shape}, strict=False)


def _tensor_names(module: nn.Module) -> dict[int, str]:
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    return {id(t): name for name, t in named}


def _key_map(module: nn.Module, theirs: dict[int, str], name: str) -> dict[str, str]:
    """Every state-dict name of ``module`` -> the source model's name of the same tensor (a tensor
    may have two names here: a ``ModePair`` holds it in both modes' graphs)."""
    ours = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    missing = [n for n, t in ours if id(t) not in theirs]
    if missing:
        raise SplitError(f"{name}: tensors not owned by the model's modules: {missing[:3]} (adapter bug)")
    return {n: theirs[id(t)] for n, t in ours}


def _one_owner(pieces: list[nn.Module | None], source: nn.Module, name: str) -> None:
    """Refuse a parameter used by two pieces (the layers, then the head): each block's optimizer
    would step it with its own loss (tied weights, a gain used before and after a cut)."""
    theirs = _tensor_names(source)
    owner: dict[int, int] = {}
    for i, piece in enumerate(pieces):
        for p in piece.parameters() if piece is not None else ():
            j = owner.setdefault(id(p), i)
            if j != i:
                where = "the head" if i == len(pieces) - 1 else f"layer {i}"
                raise SplitError(
                    f"{name}: parameter {theirs.get(id(p), '?')!r} is used by layer {j} and by {where}; "
                    "a parameter belongs to one block: cut where no parameter is used on both sides "
                    "(model.cut_at / cut_at=)"
                )


def first_conv_channels(model: nn.Module) -> int | None:
    """The input channels of the model's first ``Conv2d`` (its stem, in the usual module order)."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else None


def _in_chans(model: nn.Module) -> int:
    return first_conv_channels(model) or 3


def from_module(
    model: nn.Module,
    cut_at: list[str] | None = None,
    example_input: torch.Tensor | None = None,
    name: str | None = None,
    check: bool = True,
    head_at: str | None = None,
    auto_head: bool = True,
    stages: list[int] | None = None,
) -> ExternalBackbone:
    """Split ``model`` (torchvision, timm, your own) into a backbone; its classifier is ``source_head()``.

    ``cut_at``: module names (``named_modules``) where a layer starts, in forward order; None = the
    model's stages. ``example_input``: a batch shaped like the data (default 2 x 3 x 64 x 64; batch
    >= 2 for the train-mode check). ``name``: how errors name the model. ``check``: compare with the
    source model in train and eval mode (outputs, BN statistics, gradients). ``head_at``: the module
    where the classifier starts (default: found at the global pool); ``auto_head=False`` keeps the
    whole forward in the layers. ``stages``: one [stage, block] stage per layer (default: grows at
    each coarser layer). Raises ``SplitError`` (a ``ValueError``) with one line naming the model."""
    name = name or type(model).__name__
    x = example_input if example_input is not None else torch.randn(2, _in_chans(model), 64, 64)
    if x.shape[0] == 1:  # train-mode BatchNorm needs more than one value per channel
        x = torch.cat([x, x.roll(1, -1)])
    opened = gs.opened_modules(model, [*(cut_at or []), *([head_at] if head_at else [])], name)
    train_gm = gs.trace(model, opened, True, name)
    eval_gm = gs.trace(model, opened, False, name)
    probe = gs.probe(model, eval_gm, x, name)
    cuts, head = gs.boundaries(eval_gm, cut_at, head_at, auto_head, name)
    units = gs.repeated_units(model) if cut_at is None and not cuts else []
    if units:  # one resolution throughout (a ViT's tokens): a layer per transformer block
        try:
            return from_module(model, units, example_input, name, check, head_at, auto_head, stages)
        except SplitError:
            pass  # units a single tensor does not flow between: one layer, as the stage rule says
    cut_names = list(cut_at) if cut_at is not None else cuts
    t_layers, t_head = gs.pieces(train_gm, cuts, head, name, cut_names)
    e_layers, e_head = gs.pieces(eval_gm, cuts, head, name, cut_names)
    layers = [gs.pair(a, b) for a, b in zip(t_layers, e_layers)]
    head_module = gs.pair(t_head, e_head) if t_head is not None and e_head is not None else None
    _one_owner([*layers, head_module], model, name)
    info = gs.layer_info(eval_gm, cuts, head, probe, cut_names)
    if stages is None:
        stages = [0]
        for a, b in zip(info, info[1:]):
            stages.append(stages[-1] + (b.reduction > a.reduction))
    if len(stages) != len(info) or any(b < a for a, b in zip(stages, stages[1:])):
        raise SplitError(f"stages must give one non-decreasing stage per layer ({len(info)}), got {stages}")
    info = [dataclasses.replace(f, stage=s) for f, s in zip(info, stages)]
    out_shape = gs.shape_of(next(n for n in eval_gm.graph.nodes if n.op == "output").args[0])
    num_outputs = out_shape[1] if head_module is not None and out_shape is not None else None
    backbone = ExternalBackbone(layers, info, x.shape[1], model, head_module, name, num_outputs)
    if check:
        # 32 px is enough to run every operation once (4x cheaper than 64 px); a model that needs
        # its full input size is checked at that size
        small = x[..., :32, :32] if x.dim() == 4 and min(x.shape[-2:]) > 32 else x
        try:
            check_split(backbone, small)
        except SplitError:
            raise
        except Exception:
            check_split(backbone, x)
    return backbone


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def _differs(ref: torch.Tensor | None, out: torch.Tensor | None, rtol: float) -> bool:
    """Beyond float32 round-off of the same operations, relative to the reference's largest value
    (a fresh model's outputs may be ~1e-5 in eval mode: an absolute tolerance would pass anything)."""
    if ref is None or out is None:
        return (ref is None) != (out is None)
    if ref.shape != out.shape:
        return True
    return ref.numel() > 0 and _max_diff(ref, out) > rtol * float(ref.float().abs().max()) + 1e-12


@torch.no_grad()
def _restore(model: nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    for k, v in model.named_buffers():
        v.copy_(buffers[k])


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_buffers()}


def check_split(backbone: ExternalBackbone, x: torch.Tensor) -> None:
    """Raise ``SplitError`` unless layers + head equal the source model on ``x``: outputs in eval and
    train mode, BatchNorm statistics and parameter gradients in train mode (same seed for both).
    Only buffers change in a forward pass: they are restored afterwards."""
    source, head = backbone.source_model(), backbone.source_head()
    split = nn.Sequential(backbone, head) if head is not None else backbone
    saved = _buffers(source)
    was = source.training
    named = [(n, p) for n, p in source.named_parameters() if p.requires_grad]

    def run(net: nn.Module, train: bool) -> tuple[torch.Tensor, tuple, dict]:
        source.train(train)
        split.train(train)
        with torch.random.fork_rng(devices=[]), torch.set_grad_enabled(train):
            torch.manual_seed(0)
            y = net(x)
            w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
            ps = [p for _, p in named]
            grads = torch.autograd.grad((y * w).sum(), ps, allow_unused=True) if train else ()
        stats = _buffers(source)
        _restore(source, saved)
        return y.detach(), grads, stats

    try:
        for train in (True, False):
            mode = "train" if train else "eval"
            (ref, ref_grads, ref_stats), (out, grads, stats) = run(source, train), run(split, train)
            if _differs(ref, out, 1e-5):
                diff = _max_diff(ref, out) if ref.shape == out.shape else f"shape {tuple(out.shape)}"
                raise SplitError(
                    f"{backbone.name}: the split model's {mode}-mode output differs from the model's "
                    f"(max |diff| {diff}); cut elsewhere or report the model"
                )
            for k, r in ref_stats.items():
                if r.is_floating_point() and not torch.equal(r, stats[k]) and _differs(r, stats[k], 1e-5):
                    raise SplitError(
                        f"{backbone.name}: {mode}-mode buffer {k} differs after the split model ran"
                    )
            for (n, _), g, r in zip(named, grads, ref_grads):
                same = g is not None and r is not None and torch.equal(g, r)
                if not same and _differs(r, g, 1e-4):
                    raise SplitError(
                        f"{backbone.name}: the train-mode gradient of {n} differs after the split"
                    )
    finally:
        _restore(source, saved)
        source.train(was)
        split.train(was)


def from_spec(
    spec: str,
    num_classes: int | None,
    in_chans: int,
    size: int,
    cut_at: list[str] | None = None,
    head_at: str | None = None,
    kwargs: dict | None = None,
) -> ExternalBackbone:
    """``source_model(spec, num_classes, kwargs)`` split by ``from_module`` on data of ``in_chans`` x
    ``size`` px."""
    model = source_model(spec, num_classes, kwargs)
    x = torch.randn(2, in_chans, size, size, generator=torch.Generator().manual_seed(0))
    try:
        backbone = from_module(model, cut_at, example_input=x, name=spec, head_at=head_at)
    except SplitError as e:
        takes = first_conv_channels(model)
        if takes is None or takes == in_chans or "fails on a" not in str(e):
            raise
        option = (
            "model.kwargs.in_chans" if spec.startswith("timm:") else "a constructor argument in model.kwargs"
        )
        raise SplitError(
            f"model.backbone={spec} takes {takes}-channel images but the data has {in_chans}: build it for "
            f"{in_chans} ({option}) or give data of {takes} channels"
        ) from None
    if num_classes is not None and backbone.num_outputs not in (None, num_classes):
        raise SplitError(
            f"model.backbone={spec} outputs {backbone.num_outputs} classes but the data has {num_classes}; "
            "give the factory a num_classes argument"
        )
    return backbone
