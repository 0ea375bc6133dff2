"""MAN++'s LB and EMA copies of layer n run as one call (``method.momentum.grouped``; ours, not the papers').

Both copies are the same layer with different weights on the same input ``h``. The layer is traced
once with ``torch.fx`` and run on *grouped* tensors: the two copies' values side by side on the
channel dimension, ``[LB | EMA]``. A convolution becomes one grouped convolution (``groups`` doubled,
the two weight sets stacked), BatchNorm runs once over the stacked channels (its statistics are per
channel, so nothing mixes) and writes the running statistics back to each copy's own buffers, and
ReLU, pooling and the residual additions act element- or channel-wise on the stacked tensor.

Exactness: every output element is computed by the same arithmetic as in the two separate calls,
so outputs, losses, LB's and the scale's gradients and the BN buffers are bitwise equal (on the
CPU kernels we test). The gradient into ``h`` sums one term per use of ``h`` per copy; autograd adds
them in the order it runs the nodes (the later-created first: EMA's uses, then LB's, each last use
first), so :class:`Fork` hands each use its own stacked copy of ``h`` and adds their gradients in
that same order.

A layer built from ``Conv2d``, ``BatchNorm2d``, ReLU, pooling, ``Identity`` and element-wise
additions and products (a CIFAR or torchvision ResNet unit, a VGG group, a ResNet stem, an EDSR
block) runs as one call; anything else (attention, ``Linear``, ``LayerNorm``, dropout with ``p > 0``,
an untraceable forward) raises :class:`Unsupported` and the momentum aux keeps the two calls.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

STATELESS = (nn.ReLU, nn.Identity, nn.MaxPool2d, nn.AvgPool2d)
ELEMENTWISE = {operator.add, operator.iadd, operator.mul, torch.add, torch.mul, torch.relu, F.relu}
ELEMENTWISE_METHODS = {"add", "add_", "mul", "mul_", "relu", "relu_"}
IN_PLACE = {operator.iadd, "add_", "mul_", "relu_"}


class Unsupported(Exception):
    """The layer has a part that the grouped call cannot run exactly as two separate calls."""


def _cat(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return None if a is None else torch.cat([a, b])


def _dense(t: torch.Tensor, fmt: torch.memory_format | None) -> torch.Tensor:
    return t.contiguous() if fmt is None else t.contiguous(memory_format=fmt)


class Fork(torch.autograd.Function):
    """``h`` once per use: ``[h | h]`` stacked (``uses[i]`` True) or as two aliases (False, for a
    convolution that reads ``h`` once for both copies). Backward adds the uses' gradients in the
    order autograd would for two separate calls: EMA's (its nodes were created later), then LB's,
    each copy's last use first."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, uses: tuple[bool, ...]) -> tuple[torch.Tensor, ...]:
        ctx.uses = uses
        outs: list[torch.Tensor] = []
        for stacked in uses:
            outs += [torch.cat([h, h], 1)] if stacked else [h.view_as(h), h.view_as(h)]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        per_use, i = [], 0  # (LB's, EMA's) gradient of each use
        for stacked in ctx.uses:
            if stacked:
                per_use.append((None, None) if grads[i] is None else grads[i].chunk(2, 1))
                i += 1
            else:
                per_use.append(grads[i : i + 2])
                i += 2
        total = None
        for copy in (1, 0):
            for grad in (use[copy] for use in reversed(per_use)):
                if grad is not None:
                    total = grad if total is None else total + grad
        return total, None


class Conv(torch.autograd.Function):
    """Both copies' convolution as one call forward; backward runs each copy's own
    ``convolution_backward``, the very kernels of two separate calls, so gradients stay bitwise equal.
    ``x_b is None``: ``x_a`` is stacked ``[LB | EMA]`` (a grouped convolution); otherwise ``x_a`` and
    ``x_b`` are the same shared input and the weight sets are stacked on the output channels."""

    @staticmethod
    def forward(ctx, x_a, x_b, w_a, w_b, b_a, b_b, conv: nn.Conv2d):
        ctx.save_for_backward(x_a, w_a, w_b)
        ctx.args = (conv.stride, conv.padding, conv.dilation)
        ctx.groups, ctx.stacked, ctx.bias = conv.groups, x_b is None, b_a is not None
        weight, bias = torch.cat([w_a, w_b]), _cat(b_a, b_b)
        groups = 2 * conv.groups if ctx.stacked else conv.groups
        return F.conv2d(x_a, weight, bias, *ctx.args, groups)

    @staticmethod
    def backward(ctx, grad):
        x, w_a, w_b = ctx.saved_tensors
        x_a, x_b = x.chunk(2, 1) if ctx.stacked else (x, x)
        need = ctx.needs_input_grad  # x_a, x_b, w_a, w_b, b_a, b_b, conv
        need_x_b = need[0] if ctx.stacked else need[1]
        bias = [w_a.shape[0]] if ctx.bias else None
        # the memory format two separate calls would have seen (channels_last on GPU runs)
        fmt = (
            torch.channels_last
            if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            else None
        )
        fmt = None if x.is_contiguous() else fmt
        results = []
        for x_c, g, w, mask in (
            (x_a, grad[:, : w_a.shape[0]], w_a, [need[0], need[2], need[4]]),
            (x_b, grad[:, w_a.shape[0] :], w_b, [need_x_b, need[3], need[5]]),
        ):
            results.append(
                torch.ops.aten.convolution_backward(
                    _dense(g, fmt), _dense(x_c, fmt), w, bias, *ctx.args, False, [0, 0], ctx.groups, mask
                )
            )
        (gx_a, gw_a, gb_a), (gx_b, gw_b, gb_b) = results
        if ctx.stacked:
            gx = torch.cat([gx_a, gx_b], 1) if need[0] else None
            return gx, None, gw_a, gw_b, gb_a, gb_b, None
        return gx_a, gx_b, gw_a, gw_b, gb_a, gb_b, None


@dataclass(frozen=True)
class Ref:
    """An argument: the value of step ``index``."""

    index: int


@dataclass(frozen=True)
class Use:
    """An argument: the layer's input at its ``index``-th use."""

    index: int


@dataclass
class Step:
    kind: str  # "conv" | "bn" | "module" | "function" | "method"
    target: Any  # the function or method name ("function", "method")
    a: nn.Module | None  # the two copies' module ("conv", "bn", "module")
    b: nn.Module | None
    args: tuple
    kwargs: dict


class GroupedPair:
    """``pair(h) -> (a(h), b(h))`` for two structurally identical layers, as one call.

    The plan is plain data (steps holding the two copies' submodules), so a deep copy of the
    momentum aux carries a plan that runs its own copies."""

    def __init__(self, a: nn.Module, b: nn.Module) -> None:
        try:
            graph = fx.symbolic_trace(a).graph
        except Exception as err:  # noqa: BLE001 - any trace failure means "not supported"
            raise Unsupported(f"torch.fx cannot trace {type(a).__name__}: {err}") from err
        self.steps: list[Step] = []
        self.stacked: list[bool] = []  # per use of the input: stacked [h | h], or shared by a convolution
        self.output: Ref | None = None
        index: dict[fx.Node, Ref] = {}
        inputs = [node for node in graph.nodes if node.op == "placeholder"]
        if len(inputs) != 1:
            raise Unsupported("the layer does not take exactly one input")
        for node in graph.nodes:
            if node.op == "output":
                if node.args[0] not in index:
                    raise Unsupported("the layer does not return one computed tensor")
                self.output = index[node.args[0]]
            elif node.op != "placeholder":
                index[node] = Ref(len(self.steps))
                self.steps.append(self._plan(node, inputs[0], index, a, b))
        if not self.stacked:
            raise Unsupported(f"{type(a).__name__}'s output does not depend on its input")

    def _plan(self, node: fx.Node, x: fx.Node, index: dict, a: nn.Module, b: nn.Module) -> Step:
        ma = a.get_submodule(node.target) if node.op == "call_module" else None
        mb = b.get_submodule(node.target) if node.op == "call_module" else None
        shared = type(ma) is nn.Conv2d and ma.groups == 1  # reads the input once for both copies

        def arg(value):
            if value is x:
                if node.target in IN_PLACE or node.kwargs.get("inplace") or getattr(ma, "inplace", False):
                    raise Unsupported(f"in-place {node.target} on the layer's input")
                self.stacked.append(not shared)
                return Use(len(self.stacked) - 1)
            if isinstance(value, fx.Node):
                return index[value]
            if isinstance(value, list | tuple | dict | slice):
                raise Unsupported(f"{node.target} takes a structured argument")
            return value

        args = tuple(arg(v) for v in node.args)
        kwargs = {k: arg(v) for k, v in node.kwargs.items()}
        if node.op == "call_function" and node.target in ELEMENTWISE:
            return Step("function", node.target, None, None, args, kwargs)
        if node.op == "call_method" and node.target in ELEMENTWISE_METHODS:
            return Step("method", node.target, None, None, args, kwargs)
        if node.op != "call_module":
            raise Unsupported(f"{node.op} {node.target}")
        if type(ma) is nn.Conv2d:
            if ma.padding_mode != "zeros":
                raise Unsupported(f"Conv2d padding_mode {ma.padding_mode!r}")
            return Step("conv", None, ma, mb, args, kwargs)
        if type(ma) is nn.BatchNorm2d:
            if ma.momentum is None:
                raise Unsupported("BatchNorm2d with momentum=None (cumulative average)")
            return Step("bn", None, ma, mb, args, kwargs)
        if type(ma) in STATELESS or (type(ma) is nn.Dropout and ma.p == 0):
            return Step("module", None, ma, mb, args, kwargs)
        raise Unsupported(f"{type(ma).__name__} (module {node.target!r})")

    @staticmethod
    def _bn(x: torch.Tensor, ma: nn.BatchNorm2d, mb: nn.BatchNorm2d) -> torch.Tensor:
        # nn.BatchNorm2d.forward over both copies' channels side by side
        training = ma.training or ma.running_mean is None
        mean, var = _cat(ma.running_mean, mb.running_mean), _cat(ma.running_var, mb.running_var)
        weight, bias = _cat(ma.weight, mb.weight), _cat(ma.bias, mb.bias)
        out = F.batch_norm(x, mean, var, weight, bias, training, ma.momentum, ma.eps)
        if ma.training and ma.track_running_stats:  # F.batch_norm updated the stacked copies
            n = ma.num_features
            torch._foreach_copy_(
                [ma.running_mean, mb.running_mean, ma.running_var, mb.running_var],
                [mean[:n], mean[n:], var[:n], var[n:]],
            )
            torch._foreach_add_([ma.num_batches_tracked, mb.num_batches_tracked], 1)
        return out

    def __call__(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        forks = iter(Fork.apply(h, tuple(self.stacked)))
        uses = [next(forks) if stacked else (next(forks), next(forks)) for stacked in self.stacked]
        values: list = []

        def value(arg):
            if isinstance(arg, Ref):
                return values[arg.index]
            return uses[arg.index] if isinstance(arg, Use) else arg

        for step in self.steps:
            args = [value(v) for v in step.args]
            kwargs = {k: value(v) for k, v in step.kwargs.items()}
            if step.kind == "conv":
                x_a, x_b = args[0] if isinstance(args[0], tuple) else (args[0], None)
                ma, mb = step.a, step.b
                out = Conv.apply(x_a, x_b, ma.weight, mb.weight, ma.bias, mb.bias, ma)
            elif step.kind == "bn":
                out = self._bn(args[0], step.a, step.b)
            elif step.kind == "module":
                out = step.a(*args, **kwargs)
            elif step.kind == "function":
                out = step.target(*args, **kwargs)
            else:
                out = getattr(args[0], step.target)(*args[1:], **kwargs)
            values.append(out)
        y = values[self.output.index]
        lb, ema = y.split(y.shape[1] // 2, dim=1)  # backward: one cat, not two zero-filled slices
        return lb, ema
