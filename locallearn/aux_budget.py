"""Aux nets sized to the model they train (issue 26 §2).

The papers size each aux for their own backbones (CIFAR ResNets, ImageNet ResNets, VGG, ViT: the
listed backbones), and those sizes are kept exactly. On a model from outside those tables
(``torchvision:``, ``timm:``, ``module:``, an ``nn.Module`` given to ``wrap``) the same rules can
build aux nets many times the backbone: DGL's ``mlp-sr`` head flattens a 2x2xC map into
``Linear(4C, 4C)`` x 3 (quadratic in C), and an outside model's layer is a whole stage, so MAN's two
copies of "the next layer" copy a stage. There the defaults change, and only there:

- MAN / MAN++ copy the next layer's first op (its first unit's conv-norm-activation) and MLAAN starts
  its chain with one, where the papers copy one residual unit of their backbones (``copy: auto``;
  ``AuxContext.copy_source``): on small images every copied weight costs weight, gradient and
  momentum, and a unit copy kept ResNet-18's whole step above ``bp``'s; SLM's replica, chained, copies
  the first unit;
- methods with a ``width`` option (DGL, InfoPro, PredSim, AugLocal, SLM, MLAAN; 0 = auto) get the
  widest width of ``LADDER`` whose aux fits its share of ``AUX_SHARE`` x the backbone's parameters:
  every aux is first built at the narrowest width, which gives what cannot shrink (copies, heads); the
  rest of the budget is split evenly over the cuts, and what a cut leaves unused goes to the later ones;
- InfoPro reconstructs at the map's size (``recon_at: auto``), not through a decoder upsampled to the
  image, whose maps alone outweighed what local learning saves; SLM's bank starts at C2
  (``slm.OUTSIDE_MIN_REDUCTION``): the stem's half-size map banked for it was held all step.

A width, copy or ``recon_at`` the config gives is kept as given. ``warn_if_large`` says in one line when the aux
nets hold more parameters than the backbone, naming the options that shrink them; ``warn_if_over_bp``
says in one line when a run's measured whole step holds more than ``bp`` would (``bp_total_estimate``),
naming only the options that shrink it for that method (``REMEDIES``). Parameters within budget do not guarantee a
total below ``bp``'s: the aux nets' activations (InfoPro's decoder at the image size, SLM's replica) and
on small images the weights' three copies can outweigh what local learning saves
(docs/benchmarks.md, "Whole-step total relative to bp").
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from locallearn.metrics.memory import saved_storages
from locallearn.metrics.step_memory import StepMemory
from locallearn.types import FeatureInfo, InputInfo

log = logging.getLogger(__name__)

# The aux nets of an outside model hold at most this share of the backbone's parameters: with
# SGD momentum each parameter is held three times (weight, gradient, momentum), so the aux nets then
# add at most half of what the backbone's weights and state take.
AUX_SHARE = 0.5
LADDER = (1024, 512, 256, 128, 64, 32, 16)  # widths tried, widest first


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def unit_finder(
    inputs: InputInfo,
    first_unit: Callable[[nn.Module], nn.Module | None],
    first_op: Callable[[nn.Module], nn.Module | None] | None = None,
) -> Callable[[nn.Module, FeatureInfo, str], tuple[nn.Module, FeatureInfo] | None]:
    """``AuxContext.unit_of`` for an outside model's layers: ``unit_of(layer, feature, part)`` is
    ``first_unit(layer)`` (part ``unit``) or ``first_op(layer)`` (part ``op``; build.py passes the
    splitter's) and its output's FeatureInfo, measured by running the piece once on a zero map in eval
    mode (the live layer's BatchNorm statistics are left as they were)."""
    finders = {"unit": first_unit, "op": first_op}
    found: dict[tuple[int, str], tuple[nn.Module, FeatureInfo] | None] = {}

    def unit_of(
        layer: nn.Module, feature: FeatureInfo, part: str = "unit"
    ) -> tuple[nn.Module, FeatureInfo] | None:
        if (id(layer), part) in found:
            return found[id(layer), part]
        finder = finders[part]
        unit = finder(layer) if finder is not None and feature.fmt == "NCHW" else None
        result = None
        if unit is not None:
            side = max(1, inputs.size // feature.reduction)
            modes = {m: m.training for m in unit.modules()}
            unit.eval()
            try:
                with torch.no_grad():
                    shape = unit(torch.zeros(1, feature.num_chs, side, side)).shape
            finally:
                for m, training in modes.items():
                    m.training = training
            if len(shape) == 4:
                out = FeatureInfo(shape[1], max(1, round(inputs.size / shape[2])), "NCHW", feature.stage)
                result = (unit, out)
        found[id(layer), part] = result
        return result

    return unit_of


def sized_auxes(
    build: Callable[[int, int | None], nn.Module], n: int, budget: int
) -> tuple[list[nn.Module], list[int]]:
    """The aux nets of cuts 0..n-1, built by ``build(k, width)``, each at the widest ``LADDER`` width
    that keeps the total within ``budget`` parameters (module docstring); and the widths chosen."""
    narrow = [build(k, LADDER[-1]) for k in range(n)]
    least = [count(a) for a in narrow]
    slack = budget - sum(least)
    auxes, widths = [], []
    for k in range(n):
        chosen, width = narrow[k], LADDER[-1]
        if slack > 0:
            share = least[k] + slack / (n - k)
            for w in LADDER[:-1]:
                aux = build(k, w)
                if count(aux) <= share:
                    chosen, width = aux, w
                    break
        slack -= count(chosen) - least[k]
        auxes.append(chosen)
        widths.append(width)
    return auxes, widths


def for_task(options: list[str], task: object) -> list[str]:
    """The method ``options`` that shrink the aux nets on ``task``, after the task's own: on a dense task
    the aux ends in the task's local head, whose widths a method's ``width`` does not set (measured: DGL's
    and SLM's aux nets on detection and SR are the same size at any width), so widths are dropped there."""
    if not getattr(task, "dense", False):
        return list(options)
    return [*task.shrink_options(), *(o for o in options if not o.split("=")[0].endswith(".width"))]


def warn_if_large(counts: dict[str, int], method_name: str, options: list[str]) -> bool:
    """One warning line when the aux nets hold more parameters than the backbone; True if it warned."""
    aux, backbone = counts["aux"], counts["backbone"]
    if aux <= backbone:
        return False
    shrink = " or ".join([*options, "a smaller model.num_blocks"])
    log.warning(
        "%s: the aux nets hold %.2f M parameters, %.1fx the backbone's %.2f M (each held again as "
        "gradient and optimizer state); %s makes them smaller",
        method_name,
        aux / 1e6,
        aux / max(backbone, 1),
        backbone / 1e6,
        shrink,
    )
    return True


# Options that shrink a step above bp, per base method: measured to bring cells below bp
# (docs/benchmarks.md, "Whole-step total relative to bp"; ``benchmarks/aux_sizes.py --remedies``) or,
# for the widths, the narrowest aux. Fewer blocks is named for none (measured: no help). MLAAN's cascade
# holds two blocks' activations at once unless block k-1's are recomputed (``recompute``, on by default
# for outside models); dropping its EMA copy shrinks the step a little more; its width and chain depth
# do not.
REMEDIES = {
    "dgl": ["method.dgl.width=16"],
    "predsim": ["method.predsim.width=16"],
    "auglocal": ["method.auglocal.width=16"],
    "infopro": ["method.infopro.recon_at=feature", "method.infopro.width=16"],
    "slm": ["method.slm.width=16", "method.slm.bank=false"],
    "mlaan": ["method.mlaan.recompute=true", "method.mlaan.ema=false"],
}
# MAN / MAN++: a copy of the next layer's first op instead of its first unit or the whole layer
# (outside models only: the listed backbones' layers are single units; ResNet-18 at 64 px, dgl+man).
MOMENTUM_REMEDIES = ["method.momentum.copy=op"]
# what an ``auto`` value is on (outside models, the listed backbones)
AUTO = {"recon_at": ("feature", "input"), "copy": ("op", "layer"), "recompute": ("true", "false")}


def remedies(method: object, outside: bool, task: object = None) -> list[str]:
    """The options of ``REMEDIES`` that would change ``method``'s build (one already in effect helps
    nothing and is left out); ``method`` is a built Method (``+man`` wrappers: their base's and
    ``MOMENTUM_REMEDIES`` on outside models); on a ``task``, as ``for_task`` keeps them."""
    base = getattr(method, "base", method)
    configs = {base.name: getattr(base, "cfg", None)}
    names = for_task(REMEDIES.get(base.name, []), task)
    if base is not method:
        configs["momentum"] = getattr(method, "cfg", None)
        names += MOMENTUM_REMEDIES if outside else []
    kept = []
    for option in names:
        key, value = option.split("=")
        if not key.startswith("method."):
            kept.append(option)  # a task's option (task.shrink_options)
            continue
        section, field = key.split(".")[1:]
        current = str(getattr(configs.get(section), field, "")).lower()
        if current in ("auto", "none") and field in AUTO:  # None: auto for a bool option
            current = AUTO[field][0 if outside else 1]
        if field == "width" and current not in ("", "0") and int(current) <= int(value):
            continue  # already this narrow
        if current != value:
            kept.append(option)
    return kept


def bp_saved_bytes(model: nn.Module, inputs: InputInfo, batch: int) -> int:
    """Bytes ``bp`` saves for backward at ``batch``: the model's plain path (backbone, then head) run once
    on a zero batch of 2 images under saved-tensor hooks, scaled by ``batch / 2`` (saved bytes are linear
    in the batch). BatchNorm statistics and the RNG state are restored afterwards."""
    exclude = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    first = next(model.parameters())
    x = torch.zeros(2, inputs.channels, inputs.size, inputs.size, device=first.device, dtype=first.dtype)
    buffers = [b.detach().clone() for b in model.buffers()]
    devices = [first.device] if first.device.type == "cuda" else []
    try:  # the run's RNG stream is left as it was (dropout, stochastic depth draw from it)
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            with saved_storages(exclude) as seen:
                model(x)
    finally:
        with torch.no_grad():
            for b, kept in zip(model.buffers(), buffers):
                b.copy_(kept)
    return round(sum(seen.values()) * batch / 2)


def bp_total_estimate(model: nn.Module, step: StepMemory, inputs: InputInfo, batch: int) -> int:
    """What ``bp`` would hold for the same model, data and optimizer, from a local run's measured step
    without building a second model: the backbone's and head's weights, buffers and gradients, optimizer
    state at the run's own state-per-trainable-byte ratio (SGD momentum: 1, AdamW: 2), and what the
    plain path saves for backward at ``batch`` (``bp_saved_bytes``); ``bp``'s backward workspace is left
    out. Within 2 % of ``step_memory`` on a built ``bp`` (ShuffleNet-v2 x0.5 at 48 and 64 px, ResNet-18
    at 64 px, batch 32; tests/test_aux_totals.py holds it to 10 %)."""
    own = [*model.backbone.parameters(), *model.head.parameters()]
    weights = sum(p.numel() * p.element_size() for p in own)
    weights += sum(b.numel() * b.element_size() for b in (*model.backbone.buffers(), *model.head.buffers()))
    grads = sum(p.numel() * p.element_size() for p in own if p.requires_grad)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    state = step.optimizer_state_bytes * grads / trainable if trainable else 0
    return round(weights + grads + state + bp_saved_bytes(model, inputs, batch))


def warn_if_over_bp(
    model: nn.Module, step: StepMemory, inputs: InputInfo, batch: int, method_name: str, options: list[str]
) -> bool:
    """One warning line when a local run's measured whole-step total exceeds ``bp_total_estimate``,
    naming ``options`` (``remedies``: only those that shrink it for this method); True if it warned.
    ``bp`` runs (one block) are not compared with themselves."""
    if getattr(model, "num_blocks", 1) < 2:
        return False
    bp = bp_total_estimate(model, step, inputs, batch)
    if step.peak_total_bytes <= bp:
        return False
    if options:
        advice = " or ".join(options) + " makes it smaller"
    else:
        advice = (
            "no option of this method was measured to shrink it enough (docs/benchmarks.md); bp holds less"
        )
    log.warning(
        "%s: the training step holds %.1f MiB, more than bp would (about %.1f MiB for this model, batch "
        "and optimizer): the aux nets' activations or copies outweigh what local learning saves; %s",
        method_name,
        step.peak_total_bytes / 2**20,
        bp / 2**20,
        advice,
    )
    return True
