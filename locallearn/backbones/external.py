"""Any ``nn.Module`` as a backbone: ``from_module(model, cut_at=None)`` splits it at module names.

How the split stays correct in train and in eval mode: ``torch.fx`` traces only the model's own
``forward`` and the plain containers (``nn.Sequential`` without a forward of its own) on the way to a
cut; every other module is a leaf, called as it is (torchvision's ``create_feature_extractor`` does
the same with its leaf modules). A module whose forward branches on ``self.training`` (BatchNorm,
timm's ``BatchNormAct2d``, dropout, stochastic depth) therefore keeps that branch live. The code that
is traced (the model's forward, a module a cut goes inside) is traced twice, in train and in eval
mode; a piece whose two traces differ (timm's ``forward_head`` calls ``F.dropout(...,
training=self.training)``) holds both and runs the one of its current mode.

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
import inspect
import math
import pkgutil

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from locallearn.backbones.base import Backbone
from locallearn.types import FeatureInfo

PROBE = 128  # side of the input the stages and reductions are read from (a 16 px input has no stride 32)


class SplitError(ValueError):
    """A model that cannot be split as asked; the message names the model and why."""


def _is_container(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


class _Tracer(fx.Tracer):
    """Traces through the root, plain containers and the modules in ``opened``; the rest are leaves."""

    def __init__(self, opened: set[str]) -> None:
        super().__init__()
        self.opened = opened

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname not in self.opened and not _is_container(m)


def _trace(model: nn.Module, opened: set[str], train: bool, name: str) -> fx.GraphModule:
    was = model.training
    model.train(train)
    try:
        graph = _Tracer(opened).trace(model)
    except Exception as e:  # fx raises many types for data-dependent control flow
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise SplitError(
            f"{name}: torch.fx cannot trace its forward ({reason}); cut only at modules whose "
            "parents have a traceable forward, or wrap the model in an nn.Sequential of its parts"
        ) from None
    finally:
        model.train(was)
    return fx.GraphModule(model, graph)


def _owner(node: fx.Node) -> str:
    if node.op in ("call_module", "get_attr"):
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path = list(stack.values())[-1]
        return path[0] if isinstance(path, tuple) else str(path)
    return ""


def _owned_by(owner: str, name: str) -> bool:
    return owner == name or owner.startswith(name + ".")


def _compute(nodes: list[fx.Node]) -> list[int]:
    return [i for i, n in enumerate(nodes) if n.op not in ("placeholder", "get_attr", "output")]


def _crossing(nodes: list[fx.Node], at: int, end: int) -> list[fx.Node]:
    """Values defined before ``nodes[at]`` (the input included) used at or after it, up to ``end``."""
    defined = {n for n in nodes[:at] if n.op != "get_attr"}
    seen: dict[fx.Node, None] = {}
    for node in nodes[at : end + 1]:
        for arg in node.all_input_nodes:
            if arg in defined:
                seen[arg] = None
    return list(seen)


def _first_node(nodes: list[fx.Node], name: str, after: int) -> int:
    for i in range(after, len(nodes)):
        if nodes[i].op not in ("placeholder", "get_attr", "output") and _owned_by(_owner(nodes[i]), name):
            return i
    raise SplitError(
        f"cut_at/stop_at module {name!r} owns no operation after the previous cut (or does not exist)"
    )


def _segment(gm: fx.GraphModule, nodes: list[fx.Node], source: fx.Node, out: fx.Node) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {source: graph.placeholder("x")}
    for node in nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[out])
    return fx.GraphModule(gm, graph)


class ModePair(nn.Module):
    """A traced piece whose code depends on the mode: runs ``train_graph`` or ``eval_graph``."""

    def __init__(self, train_graph: fx.GraphModule, eval_graph: fx.GraphModule) -> None:
        super().__init__()
        self.train_graph = train_graph
        self.eval_graph = eval_graph

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.train_graph(x) if self.training else self.eval_graph(x)


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _info(shape: tuple[int, ...], side: int, where: str) -> FeatureInfo:
    if len(shape) == 4:
        return FeatureInfo(shape[1], max(1, round(side / shape[2])), "NCHW")
    if len(shape) == 3:
        tokens = shape[1] - 1 if math.isqrt(shape[1] - 1) ** 2 == shape[1] - 1 else shape[1]
        return FeatureInfo(shape[2], max(1, round(side / max(math.isqrt(tokens), 1))), "NLC")
    raise SplitError(
        f"the layer ending at {where} outputs shape {shape}: backbone layers must output NCHW maps or "
        "NLC tokens; leave the model's head out (stop_at / head_at = the pooling or classifier module)"
    )


def _is_pooling(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        kind = type(gm.get_submodule(str(node.target))).__name__.lower()
    else:
        kind = getattr(node.target, "__name__", str(node.target)).lower()
    return any(word in kind for word in ("pool", "flatten", "mean"))


def _head_start(gm: fx.GraphModule, nodes: list[fx.Node], end: int) -> int | None:
    """Where the classifier starts: the first operation with a (batch, features) output, moved back
    over the pooling / flatten operations just before it; None when the output keeps its map."""
    compute = _compute(nodes[: end + 1])
    first = next((i for i in compute if (s := _shape(nodes[i])) is not None and len(s) == 2), None)
    if first is None:
        return None
    at = compute.index(first)
    while (
        at > 0
        and _is_pooling(nodes[compute[at - 1]], gm)
        and len(_crossing(nodes, compute[at - 1], end)) == 1
    ):
        at -= 1
    return compute[at]


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


def _tensor_names(module: nn.Module) -> dict[int, str]:
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    return {id(t): name for name, t in named}


def _key_map(module: nn.Module, theirs: dict[int, str], name: str) -> dict[str, str]:
    ours = _tensor_names(module)
    missing = [n for key, n in ours.items() if key not in theirs]
    if missing:
        raise SplitError(f"{name}: tensors not owned by the model's modules: {missing[:3]} (adapter bug)")
    return {n: theirs[key] for key, n in ours.items()}


def _opened(model: nn.Module, names: list[str], what: str) -> set[str]:
    known = dict(model.named_modules())
    opened = set()
    for n in names:
        if n not in known:
            top = ", ".join(k for k, _ in model.named_children())
            raise SplitError(f"{what}: no module {n!r} in the model (its top-level modules: {top})")
        parts = n.split(".")
        opened.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return opened


def _in_chans(model: nn.Module) -> int:
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else 3


def _boundaries(
    gm: fx.GraphModule, cut_at: list[str] | None, head_at: str | None, auto_head: bool, name: str
) -> tuple[list[str], str | None]:
    """Cut and head positions as node names (the same in both modes' graphs)."""
    nodes = list(gm.graph.nodes)
    output = next(n for n in nodes if n.op == "output")
    end = nodes.index(output)
    if head_at is not None:
        head = _first_node(nodes, head_at, 0)
    elif auto_head:
        head = _head_start(gm, nodes, end)
    else:
        head = None
    stop = head if head is not None else end
    if cut_at is not None:
        starts, prev = [], 0
        for cut in cut_at:
            prev = _first_node(nodes, cut, prev + 1 if starts else 0)
            if prev >= stop:
                raise SplitError(
                    f"{name}: cut at {cut!r} lies in or after the head (from {nodes[stop].name!r})"
                )
            starts.append(prev)
        return [nodes[i].name for i in starts], (nodes[head].name if head is not None else None)
    # the model's stages: a new layer at each leaf module whose output is coarser than the one before
    starts, prev_side = [], None
    candidates = [i for i in _compute(nodes[:stop]) if nodes[i].op == "call_module"]
    for a, b in zip(candidates, [*candidates[1:], stop]):
        if len(_crossing(nodes, a, end)) != 1 or len(_crossing(nodes, b, end)) != 1:
            continue
        (out,) = _crossing(nodes, b, end)
        shape = _shape(out)
        side = shape[2] if shape is not None and len(shape) == 4 else None
        if side is not None and prev_side is not None and side < prev_side and a > 0:
            starts.append(a)
        prev_side = side if side is not None else prev_side
    return [nodes[i].name for i in starts], (nodes[head].name if head is not None else None)


def _pieces(
    gm: fx.GraphModule, cuts: list[str], head: str | None, name: str, cut_names: list[str]
) -> tuple[list[fx.GraphModule], fx.GraphModule | None]:
    nodes = list(gm.graph.nodes)
    index = {n.name: i for i, n in enumerate(nodes)}
    missing = [c for c in [*cuts, *([head] if head else [])] if c not in index]
    if missing:
        raise SplitError(f"{name}: its train- and eval-mode graphs differ at the cut {missing[0]!r}")
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise SplitError(f"{name}: a backbone takes one input tensor, its forward takes {len(inputs)}")
    output = next(n for n in nodes if n.op == "output")
    if not isinstance(output.args[0], fx.Node):
        raise SplitError(
            f"{name}: its forward must return one tensor (it returns {type(output.args[0]).__name__})"
        )
    end = nodes.index(output)
    stop = index[head] if head else end
    bounds = [0, *(index[c] for c in cuts), stop]
    layers, source = [], inputs[0]
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        seg = [n for n in nodes[a:b] if n.op not in ("placeholder", "output")]
        crossing = _crossing(nodes, b, end) if b < end else [output.args[0]]
        if len(crossing) != 1:
            where = cut_names[i] if i < len(cut_names) else "the head"
            names = ", ".join(f"{n.name!r} (from {_owner(n) or 'the input'!r})" for n in crossing)
            raise SplitError(
                f"{name}: cannot cut at {where!r}: {len(crossing)} tensors cross it ({names}); a skip "
                "connection spans the cut. Cut at a module boundary where a single tensor flows."
            )
        seg = [*[n for n in nodes[:a] if n.op == "get_attr"], *seg]
        layers.append(_segment(gm, seg, source, crossing[0]))
        source = crossing[0]
    if head is None:
        return layers, None
    seg = [n for n in nodes[:end] if n.op == "get_attr"] + [
        n for n in nodes[stop:end] if n.op not in ("placeholder", "get_attr")
    ]
    return layers, _segment(gm, seg, source, output.args[0])


def _pair(a: fx.GraphModule, b: fx.GraphModule) -> nn.Module:
    return a if a.code == b.code else ModePair(a, b)


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
    opened = _opened(model, [*(cut_at or []), *([head_at] if head_at else [])], name)
    train_gm = _trace(model, opened, True, name)
    eval_gm = _trace(model, opened, False, name)
    probe = _probe(model, eval_gm, x, name)
    cuts, head = _boundaries(eval_gm, cut_at, head_at, auto_head, name)
    cut_names = list(cut_at) if cut_at is not None else cuts
    t_layers, t_head = _pieces(train_gm, cuts, head, name, cut_names)
    e_layers, e_head = _pieces(eval_gm, cuts, head, name, cut_names)
    layers = [_pair(a, b) for a, b in zip(t_layers, e_layers)]
    head_module = _pair(t_head, e_head) if t_head is not None and e_head is not None else None
    info = _layer_info(eval_gm, cuts, head, probe, cut_names)
    if stages is None:
        stages = [0]
        for a, b in zip(info, info[1:]):
            stages.append(stages[-1] + (b.reduction > a.reduction))
    if len(stages) != len(info) or any(b < a for a, b in zip(stages, stages[1:])):
        raise SplitError(f"stages must give one non-decreasing stage per layer ({len(info)}), got {stages}")
    info = [dataclasses.replace(f, stage=s) for f, s in zip(info, stages)]
    out_shape = _shape(next(n for n in eval_gm.graph.nodes if n.op == "output").args[0])
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


def _probe(model: nn.Module, gm: fx.GraphModule, x: torch.Tensor, name: str) -> int:
    """Record every node's output shape (eval mode, one image) at ``PROBE`` px if the model takes
    it, else at the example's size; returns the side used."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for side in dict.fromkeys((max(PROBE, x.shape[-1]), x.shape[-1])):
                try:
                    ShapeProp(gm).propagate(torch.zeros(1, x.shape[1], side, side, dtype=x.dtype))
                    return side
                except Exception as e:  # a model of fixed input size, or a wrong channel count
                    error = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    finally:
        model.train(was)
    raise SplitError(f"{name}: fails on a {tuple(x.shape[1:])} input ({error})")


def _layer_info(
    gm: fx.GraphModule, cuts: list[str], head: str | None, side: int, cut_names: list[str]
) -> list[FeatureInfo]:
    nodes = list(gm.graph.nodes)
    index = {n.name: i for i, n in enumerate(nodes)}
    output = next(n for n in nodes if n.op == "output")
    end = nodes.index(output)
    ends = [*(index[c] for c in cuts), index[head] if head else end]
    info = []
    for i, b in enumerate(ends):
        (out,) = _crossing(nodes, b, end) if b < end else [output.args[0]]
        where = cut_names[i] if i < len(cut_names) else "the end"
        info.append(_info(_shape(out) or (), side, where))
    return info


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


# -- models named in a config: torchvision:NAME, timm:NAME, package.module:factory ----------------

PREFIXES = ("torchvision", "timm")


def is_spec(name: str) -> bool:
    """Whether a ``model.backbone`` value names a model from outside (``torchvision:resnet18``, ...)."""
    return ":" in name


def _factory(spec: str):
    """The constructor ``spec`` names, called as ``make(**kw)``; ``SplitError`` if there is none."""
    prefix, _, rest = spec.partition(":")
    if prefix == "torchvision":
        import torchvision

        if rest not in torchvision.models.list_models():
            raise SplitError(
                f"model.backbone={spec}: torchvision has no model {rest!r} (torchvision.models.list_models())"
            )
        return lambda **kw: torchvision.models.get_model(rest, weights=None, **kw)
    if prefix == "timm":
        try:
            import timm
        except ImportError:
            raise SplitError(f"model.backbone={spec}: timm is not installed (pip install timm)") from None
        if not timm.is_model(rest):
            raise SplitError(f"model.backbone={spec}: timm has no model {rest!r} (timm.list_models())")
        return lambda **kw: timm.create_model(rest, pretrained=False, **kw)
    try:
        factory = pkgutil.resolve_name(spec)
    except (ImportError, AttributeError, ValueError) as e:
        raise SplitError(
            f"model.backbone={spec}: cannot import it ({e}); write torchvision:NAME, timm:NAME or "
            "package.module:factory"
        ) from None
    if not callable(factory):
        raise SplitError(f"model.backbone={spec}: {rest!r} is not callable")
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    takes = "num_classes" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    return (lambda **kw: factory(**kw)) if takes else (lambda **kw: factory())


def check_spec(spec: str) -> None:
    """Raise ``SplitError`` unless ``spec`` names a model that can be built (nothing is built)."""
    _factory(spec)


def source_model(spec: str, num_classes: int | None = None) -> nn.Module:
    """Build the model ``spec`` names, untrained: ``torchvision:NAME`` (``weights=None``),
    ``timm:NAME`` (``pretrained=False``) or ``package.module:factory`` (called with
    ``num_classes=`` when it takes it). Raises ``SplitError`` with one line if it cannot."""
    model = _factory(spec)(**({} if num_classes is None else {"num_classes": num_classes}))
    if not isinstance(model, nn.Module):
        raise SplitError(
            f"model.backbone={spec}: the factory returned a {type(model).__name__}, not an nn.Module"
        )
    return model


def from_spec(
    spec: str, num_classes: int | None, in_chans: int, size: int, cut_at: list[str] | None = None
) -> ExternalBackbone:
    """``source_model(spec, num_classes)`` split by ``from_module`` on data of ``in_chans`` x ``size`` px."""
    model = source_model(spec, num_classes)
    x = torch.randn(2, in_chans, size, size, generator=torch.Generator().manual_seed(0))
    backbone = from_module(model, cut_at, example_input=x, name=spec)
    if num_classes is not None and backbone.num_outputs not in (None, num_classes):
        raise SplitError(
            f"model.backbone={spec} outputs {backbone.num_outputs} classes but the data has {num_classes}; "
            "give the factory a num_classes argument"
        )
    return backbone
