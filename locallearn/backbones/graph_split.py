"""Splitting a traced model into pieces, correctly in train and in eval mode (used by ``external``).

``torch.fx`` traces only the model's own ``forward``, plain ``nn.Sequential`` containers and the
modules a cut goes inside (``opened_modules``); every other module is a leaf, called as it is
(torchvision's ``create_feature_extractor`` does the same with its leaf modules), so a module whose
forward branches on ``self.training`` (BatchNorm, timm's ``BatchNormAct2d``, dropout, stochastic
depth) keeps that branch live. The model is traced once per mode; ``pair`` keeps both traces of a
piece whose code differs between them (``ModePair``). Positions in the graph: a cut at module ``M``
starts at the first node ``M`` owns (``call_module`` target, or the innermost ``nn_module_stack``
entry); exactly one tensor may cross a cut (``crossing``).
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import fx, nn

from locallearn.types import FeatureInfo

PROBE = 128  # side of the input the stages and reductions are read from (a 16 px input has no stride 32)


class SplitError(ValueError):
    """A model that cannot be split as asked; the message names the model and why."""


def _is_container(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


class Tracer(fx.Tracer):
    """Traces through the root, plain containers and the modules in ``opened``; the rest are leaves."""

    def __init__(self, opened: set[str]) -> None:
        super().__init__()
        self.opened = opened

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname not in self.opened and not _is_container(m)


def _defaults(model: nn.Module, name: str) -> dict[str, object]:
    """forward's arguments after the image, each fixed at its default (timm's ViT:
    ``forward(x, attn_mask=None, is_causal=False)``); one without a default is refused."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())[1:]
    except (TypeError, ValueError):  # a forward without a signature: traced as it is
        return {}
    named = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    required = [p.name for p in named if p.default is p.empty]
    if required:
        raise SplitError(
            f"{name}: a backbone takes one input tensor; its forward also needs {', '.join(required)} "
            "(no default): wrap the model in a module whose forward takes the image alone"
        )
    return {p.name: p.default for p in named}


def _drop_fixed_inputs(graph: fx.Graph) -> None:
    """Remove the placeholders of the arguments fixed at their defaults and the checks fx adds that
    they keep that value (nothing else reads them: a fixed argument steers Python, not the graph)."""
    for ph in [n for n in graph.nodes if n.op == "placeholder"][1:]:
        dead, todo = {ph}, [ph]
        while todo:
            for user in todo.pop().users:
                if user not in dead:
                    dead.add(user)
                    todo.append(user)
        if any(n.op == "output" for n in dead):
            continue  # returned as it is: left for ``pieces`` to refuse
        for n in reversed([n for n in graph.nodes if n in dead]):
            graph.erase_node(n)


def trace(model: nn.Module, opened: set[str], train: bool, name: str) -> fx.GraphModule:
    fixed = _defaults(model, name)
    was = model.training
    model.train(train)
    try:
        graph = Tracer(opened).trace(model, concrete_args=fixed or None)
        _drop_fixed_inputs(graph)
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


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    return node.meta.get("locallearn_shape")


class _Shapes(fx.Interpreter):
    """Runs the graph, recording each tensor-valued node's output shape (torch's ``ShapeProp`` would
    print a traceback for a model that refuses the input size; this raises the model's own error)."""

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        n.meta["locallearn_shape"] = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        return out


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
    first = next((i for i in compute if (s := shape_of(nodes[i])) is not None and len(s) == 2), None)
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


def opened_modules(model: nn.Module, names: list[str], what: str) -> set[str]:
    known = dict(model.named_modules())
    opened = set()
    for n in names:
        if n not in known:
            top = ", ".join(k for k, _ in model.named_children())
            raise SplitError(f"{what}: no module {n!r} in the model (its top-level modules: {top})")
        parts = n.split(".")
        opened.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return opened


def boundaries(
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
        shape = shape_of(out)
        side = shape[2] if shape is not None and len(shape) == 4 else None
        if side is not None and prev_side is not None and side < prev_side and a > 0:
            starts.append(a)
        prev_side = side if side is not None else prev_side
    return [nodes[i].name for i in starts], (nodes[head].name if head is not None else None)


def repeated_units(model: nn.Module) -> list[str]:
    """The children of the model's longest container of modules of one type with parameters (a
    ViT's ``blocks.0`` .. ``blocks.11``, torchvision's ``encoder.layers.encoder_layer_0`` ..): where
    layers start when no module lowers the resolution (the glossary's "one transformer block")."""
    best: list[str] = []
    for name, m in model.named_modules():
        kids = list(m.named_children()) if isinstance(m, nn.Sequential | nn.ModuleList) else []
        if len(kids) < 2 or len({type(c) for _, c in kids}) != 1:
            continue
        if len(kids) > len(best) and any(True for _, c in kids for _ in c.parameters()):
            best = [f"{name}.{k}" if name else k for k, _ in kids]
    return best


def pieces(
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
        layers.append(_segment(gm, _with_attrs(nodes, seg), source, crossing[0]))
        source = crossing[0]
    if head is None:
        return layers, None
    seg = [n for n in nodes[stop:end] if n.op != "placeholder"]
    return layers, _segment(gm, _with_attrs(nodes, seg), source, output.args[0])


def _with_attrs(nodes: list[fx.Node], seg: list[fx.Node]) -> list[fx.Node]:
    """``seg``'s operations after the ``get_attr`` nodes they read (a bare ``nn.Parameter`` or buffer
    of the model: a class token, a learnable gain), wherever fx placed them. Only those: a piece that
    held every attribute read before it would put that parameter into every later block's optimizer."""
    compute = [n for n in seg if n.op != "get_attr"]
    used = {a for n in compute for a in n.all_input_nodes}
    return [*(n for n in nodes if n.op == "get_attr" and n in used), *compute]


def pair(a: fx.GraphModule, b: fx.GraphModule) -> nn.Module:
    return a if a.code == b.code else ModePair(a, b)


def probe(model: nn.Module, gm: fx.GraphModule, x: torch.Tensor, name: str) -> int:
    """Record every node's output shape (eval mode, one image) at ``PROBE`` px if the model takes
    it, else at the example's size; returns the side used."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for side in dict.fromkeys((max(PROBE, x.shape[-1]), x.shape[-1])):
                try:
                    _Shapes(gm).run(torch.zeros(1, x.shape[1], side, side, dtype=x.dtype))
                    return side
                except Exception as e:  # a model of fixed input size, or a wrong channel count
                    error = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    finally:
        model.train(was)
    raise SplitError(f"{name}: fails on a {tuple(x.shape[1:])} input ({error})")


def layer_info(
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
        info.append(_info(shape_of(out) or (), side, where))
    return info


def _unit_end(gm: fx.GraphModule) -> int | None:
    """Where the first unit of a traced layer ends: at the next module with weights (not a
    normalisation) after its first one, where a single tensor flows on (so a plain conv-BN-ReLU run
    keeps its BN and ReLU); None when there is no such place (the layer is one unit)."""
    nodes = list(gm.graph.nodes)
    end = next(i for i, n in enumerate(nodes) if n.op == "output")
    seen_weights = False
    for i in _compute(nodes[:end]):
        node = nodes[i]
        weighted = False
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            norm = isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm))
            weighted = not norm and any(True for _ in module.parameters())
        if weighted and seen_weights and len(_crossing(nodes, i, end)) == 1:
            return i
        seen_weights = seen_weights or weighted
    return None


def _prefix(gm: fx.GraphModule, at: int) -> fx.GraphModule:
    nodes = list(gm.graph.nodes)
    end = next(i for i, n in enumerate(nodes) if n.op == "output")
    (out,) = _crossing(nodes, at, end)
    source = next(n for n in nodes if n.op == "placeholder")
    seg = [n for n in nodes[:at] if n.op not in ("placeholder", "output")]
    return _segment(gm, seg, source, out)


# what may follow a layer's first weighted module in its first op: normalisations, activations and
# the identities timm leaves in their place (drop_block, aa)
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
_ACTS = (
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.LeakyReLU,
    nn.ELU,
    nn.Mish,
    nn.PReLU,
    nn.Identity,
)
_ACT_FNS = {torch.relu, torch.nn.functional.relu, torch.nn.functional.relu6, torch.nn.functional.silu,
            torch.nn.functional.gelu, torch.nn.functional.hardswish, torch.nn.functional.leaky_relu}  # fmt: skip


def _op_end(gm: fx.GraphModule) -> int | None:
    """Where the first op of a traced layer ends: its first module with weights (not a normalisation),
    then the normalisations and activations that read only it in a row (conv-BN-ReLU); None when the
    layer has no such module or that op is the whole layer."""
    nodes = list(gm.graph.nodes)
    end = next(i for i, n in enumerate(nodes) if n.op == "output")
    compute = _compute(nodes[:end])
    for at, i in enumerate(compute):
        node = nodes[i]
        if node.op != "call_module":
            continue
        module = gm.get_submodule(str(node.target))
        if isinstance(module, _NORMS) or not any(True for _ in module.parameters()):
            continue
        last = i
        for j in compute[at + 1 :]:
            after = nodes[j]
            if after.all_input_nodes != [nodes[last]] or len(nodes[last].users) != 1:
                break
            follows = after.op == "call_function" and after.target in _ACT_FNS
            if after.op == "call_module":
                follows = isinstance(gm.get_submodule(str(after.target)), (*_NORMS, *_ACTS))
            if not follows:
                break
            last = j
        return None if last == compute[-1] else last
    return None


def _upto(gm: fx.GraphModule, at: int) -> fx.GraphModule:
    """The piece of ``gm`` that computes node ``at`` from the input (only what it depends on)."""
    nodes = list(gm.graph.nodes)
    needed, todo = set(), [nodes[at]]
    while todo:
        node = todo.pop()
        if node not in needed:
            needed.add(node)
            todo.extend(node.all_input_nodes)
    source = next(n for n in nodes if n.op == "placeholder")
    seg = [n for n in nodes[: at + 1] if n in needed and n.op != "placeholder"]
    return _segment(gm, seg, source, nodes[at])


def _inlined(gm: fx.GraphModule, depth: int = 4) -> fx.GraphModule | None:
    """``gm`` with its first weighted module opened up while it is a container the tracer kept whole
    (torchvision's BasicBlock, a conv-norm-activation Sequential): that module's traced graph put in
    its place, its modules called by their full names in ``gm`` (same weights, same parameter names).
    None when it cannot be traced."""
    nodes = list(gm.graph.nodes)
    for node in nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(str(node.target))
        if isinstance(module, _NORMS) or not any(True for _ in module.parameters()):
            continue
        if not any(True for _ in module.children()):
            return gm
        if depth == 0 or node.kwargs:
            return None
        try:
            inner = fx.symbolic_trace(module)
        except Exception:  # untraceable code: no op copy, the caller falls back to the unit
            return None
        places = [n for n in inner.graph.nodes if n.op == "placeholder"]
        if len(places) != len(node.args):
            return None
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for n in nodes:
            if n is not node:
                env[n] = graph.node_copy(n, env.__getitem__)
                continue
            inner_env = dict(zip(places, (env[a] for a in node.args)))
            for m in inner.graph.nodes:
                if m.op == "placeholder":
                    continue
                if m.op == "output":
                    env[n] = inner_env[m.args[0]]
                    break
                copied = graph.node_copy(m, inner_env.__getitem__)
                if m.op in ("call_module", "get_attr"):
                    copied.target = f"{node.target}.{m.target}"
                inner_env[m] = copied
        return _inlined(fx.GraphModule(gm, graph), depth - 1)
    return None


def first_op(layer: nn.Module) -> nn.Module | None:
    """The first op of a traced layer (a whole stage cut out of an outside model): its first module
    with weights and the normalisation and activation right after it (ResNet: ``layer3.0.conv1``,
    ``bn1``, ``relu``), sharing the layer's weights and parameter names as ``first_unit`` does. None
    when the layer is not traced or is that one op."""
    if isinstance(layer, ModePair):
        train, evaluate = _inlined(layer.train_graph), _inlined(layer.eval_graph)
        if train is None or evaluate is None:
            return None
        at = _op_end(train)
        if at is None:
            return None
        name = list(train.graph.nodes)[at].name
        other = [n.name for n in evaluate.graph.nodes]
        if name not in other:
            return None
        return ModePair(_upto(train, at), _upto(evaluate, other.index(name)))
    if isinstance(layer, fx.GraphModule):
        inlined = _inlined(layer)
        at = None if inlined is None else _op_end(inlined)
        return None if at is None else _upto(inlined, at)
    return None


def first_unit(layer: nn.Module) -> nn.Module | None:
    """The first unit of a traced layer (a whole stage cut out of an outside model): its operations up
    to the next module with weights (ResNet: ``layer3.0``; ShuffleNet: ``stage4.0``; conv-BN-ReLU),
    sharing that module's weights and keeping its parameter names, so a copy of it tracks the live
    layer by name. None when the layer is not traced or is a single unit already."""
    if isinstance(layer, ModePair):
        at = _unit_end(layer.train_graph)
        if at is None:
            return None
        names = [n.name for n in layer.train_graph.graph.nodes]
        other = [n.name for n in layer.eval_graph.graph.nodes]
        if names[at] not in other:
            return None
        return ModePair(_prefix(layer.train_graph, at), _prefix(layer.eval_graph, other.index(names[at])))
    if isinstance(layer, fx.GraphModule):
        at = _unit_end(layer)
        return None if at is None else _prefix(layer, at)
    return None
