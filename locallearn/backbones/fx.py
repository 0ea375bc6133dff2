"""Any traceable model as a backbone: ``from_model(model, cut_at=[module names])`` via ``torch.fx``.

The model is traced once; every graph node belongs to the module that created it (``call_module``
target, or the innermost entry of ``nn_module_stack`` for functions and methods). A cut at module
``M`` starts a new layer at the first node owned by ``M`` (or a submodule of it). Exactly one tensor
may cross a cut: a value defined before the cut and used after it that is not the layer's output is
a skip connection around the cut, and the cut is refused naming it. Parameters read with
``get_attr`` are fetched again in each layer and never count. ``stop_at`` drops the nodes from that
module on (e.g. ``"avgpool"``), so the task head replaces the model's own. ``FeatureInfo`` is read off
one forward of an example input; its ``stage`` is given by ``stages`` (one per layer) or, without it,
starts at 0 and grows by one at every layer whose output resolution is coarser than the previous one's.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import fx, nn

from locallearn.backbones.base import Backbone
from locallearn.types import FeatureInfo


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


def _first_node(nodes: list[fx.Node], name: str, after: int) -> int:
    for i in range(after, len(nodes)):
        if nodes[i].op not in ("placeholder", "get_attr", "output") and _owned_by(_owner(nodes[i]), name):
            return i
    raise ValueError(
        f"cut_at/stop_at module {name!r} owns no operation after the previous cut (or does not exist)"
    )


def _segment(gm: fx.GraphModule, nodes: list[fx.Node], source: fx.Node, out: fx.Node) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {source: graph.placeholder("x")}
    for node in nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[out])
    return fx.GraphModule(gm, graph)


def _crossing(before: list[fx.Node], after: list[fx.Node]) -> list[fx.Node]:
    defined = {n for n in before if n.op != "get_attr"}
    seen: dict[fx.Node, None] = {}
    for node in after:
        for arg in node.all_input_nodes:
            if arg in defined:
                seen[arg] = None
    return list(seen)


def _info(y: torch.Tensor, size: int, where: str) -> FeatureInfo:
    if y.dim() == 4:
        return FeatureInfo(y.shape[1], max(1, round(size / y.shape[2])), "NCHW")
    if y.dim() == 3:
        side = (
            math.isqrt(y.shape[1] - 1)
            if math.isqrt(y.shape[1] - 1) ** 2 == y.shape[1] - 1
            else math.isqrt(y.shape[1])
        )
        return FeatureInfo(y.shape[2], max(1, round(size / max(side, 1))), "NLC")
    raise ValueError(
        f"layer ending at {where} outputs shape {tuple(y.shape)}: backbone layers must output NCHW maps "
        "or NLC tokens; pass stop_at=<the pooling / classifier module> to leave the model's head out"
    )


class FxBackbone(Backbone):
    """Backbone whose layers are ``GraphModule`` pieces of one traced model."""

    def init_weights(self, module: nn.Module) -> None:
        super().init_weights(module)


def from_model(
    model: nn.Module,
    cut_at: list[str],
    stop_at: str | None = None,
    example_input: torch.Tensor | None = None,
    stages: list[int] | None = None,
) -> FxBackbone:
    """Split ``model`` into layers starting at each module in ``cut_at`` (in forward order)."""
    gm = fx.symbolic_trace(model)
    nodes = list(gm.graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise ValueError(f"from_model needs a model with one input, got {len(inputs)}")
    output = next(n for n in nodes if n.op == "output")
    end = _first_node(nodes, stop_at, 0) if stop_at else nodes.index(output)
    starts, prev = [], 0
    for name in cut_at:
        prev = _first_node(nodes, name, prev + 1 if starts else 0)
        if prev >= end:
            raise ValueError(f"cut at {name!r} lies after stop_at={stop_at!r}")
        starts.append(prev)
    bounds = [0, *starts, end]
    body = [n for n in nodes[:end] if n.op not in ("placeholder", "output")]
    last_out = output.args[0] if not stop_at else None
    if stop_at:
        crossing = _crossing(nodes[:end], nodes[end:])
        if len(crossing) != 1:
            raise ValueError(
                f"stop_at={stop_at!r} is reached by {len(crossing)} tensors {[n.name for n in crossing]}"
            )
        last_out = crossing[0]
    if not isinstance(last_out, fx.Node):
        raise ValueError("the model's output must be one tensor")
    layers, source = [], inputs[0]
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        seg = [n for n in nodes[a:b] if n in body or n.op == "get_attr"]
        seg = [n for n in seg if n.op not in ("placeholder", "output")]
        if b == end:
            out = last_out
        else:
            crossing = _crossing(nodes[:b], nodes[b:end] + ([last_out] if last_out in nodes[:b] else []))
            if len(crossing) != 1:
                names = ", ".join(f"{n.name!r} (from {_owner(n) or 'the input'!r})" for n in crossing)
                raise ValueError(
                    f"cannot cut at {cut_at[i]!r}: {len(crossing)} tensors cross it ({names}); a skip "
                    "connection spans the cut. Cut at a module boundary where a single tensor flows."
                )
            out = crossing[0]
        layers.append(_segment(gm, seg, source, out))
        source = out
    x = example_input if example_input is not None else torch.zeros(1, 3, 224, 224)
    info = []
    with torch.no_grad():
        was_training = model.training
        model.eval()
        h = x
        for i, layer in enumerate(layers):
            h = layer(h)
            info.append(_info(h, x.shape[-1], cut_at[i] if i < len(cut_at) else "the end"))
        model.train(was_training)
    if stages is None:
        stages = [0]
        for a, b in zip(info, info[1:]):
            stages.append(stages[-1] + (b.reduction > a.reduction))
    if len(stages) != len(info) or any(b < a for a, b in zip(stages, stages[1:])):
        raise ValueError(f"stages must give one non-decreasing stage per layer ({len(info)}), got {stages}")
    info = [dataclasses.replace(f, stage=s) for f, s in zip(info, stages)]
    return FxBackbone(layers, info, x.shape[1])
