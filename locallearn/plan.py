"""The memory planner: the smallest K, its cuts, recomputation and the largest batch that fit a budget.

``locallearn plan --memory 8GiB [key=value ...]`` and ``locallearn.wrap(..., memory_budget="8GiB")``. The model
is the one ``metrics.step_memory`` accounts (weights and optimizer state resident; one block's gradients, saved
activations and backward workspace live at a time). The search:

- per layer, the bytes it saves for backward (the activation meter on a batch of 2, linear in the batch) and
  its gradient bytes; for each K, the cuts that minimise the largest block's live bytes (an exact dynamic
  programme over the backbone's layers, ``split.balanced_cuts``);
- each candidate (K, cuts, recompute) is built as it would train and measured at two small batches (the meter's
  saved bytes, the allocator's workspace), its whole step extrapolated to any batch (affine in the batch); one
  that fits by that is measured again with the workspace at the batch itself (``Candidate.measured_at``: the
  workspace is not affine at small batches), which must fit too;
- batches from the one given (kept as it is) or from the config's down by halves when none is given (the largest
  that fits); K from 2 upwards (K costs accuracy: the smallest that fits wins); recomputation
  (``recompute_option``: MAN/MAN++'s ``momentum.recompute``, MLAAN's ``mlaan.recompute``) only where the
  method has it and K alone does not fit;
- the chosen plan is confirmed by one real training step at its batch on the planning device
  (``step_memory.allocated_peak``: the CPU allocator's records, or ``torch.cuda.max_memory_allocated``).

A paper config is never resized silently: the plan is printed as overrides (``model.num_blocks=..
model.split=cuts model.cuts=[..] data.batch_size=..``) that ``locallearn train`` takes as printed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from locallearn.engine.sequential import train_step
from locallearn.metrics.step_memory import StepMemory, StepMeter, block_workspace, step_memory
from locallearn.split import balanced_cuts, layer_activation_bytes
from locallearn.types import Batch, InputInfo

log = logging.getLogger(__name__)

UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20, "MIB": 2**20}
UNITS.update({"G": 2**30, "GB": 2**30, "GIB": 2**30, "T": 2**40, "TB": 2**40, "TIB": 2**40})
FIT_BATCHES = (2, 4)


def parse_bytes(text: str | int | float) -> int:
    """``"8GiB"``, ``"512 MiB"``, ``"1.5G"`` or a number of bytes (binary units: 1 GiB = 1 GB = 2**30 here)."""
    if isinstance(text, (int, float)):
        value = int(text)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        if not match or match[2].upper() not in UNITS:
            raise ValueError(f"memory budget {text!r}: give a size such as 8GiB, 512MiB or 1.5G")
        value = int(float(match[1]) * UNITS[match[2].upper()])
    if value <= 0:
        raise ValueError(f"memory budget {text!r} must be positive")
    return value


Build = Callable[[int, "list[int] | None", bool], tuple[Any, list[torch.optim.Optimizer], bool]]
"""(K, cuts or None for K=1, recompute) -> (LocalModel, its block optimizers, engine.group_steps)."""


@dataclass
class Candidate:
    """One measured configuration: its whole step at the two fit batches, extrapolated to any batch."""

    num_blocks: int
    cuts: list[int]
    recompute: bool
    small: dict[int, StepMemory]  # fit batch -> the whole step at that batch
    flops_per_image: float | None = None
    model: Any = None
    optimizers: list[torch.optim.Optimizer] = field(default_factory=list)
    exact: dict[int, StepMemory] = field(default_factory=dict)  # ``measured_at``'s

    def at(self, batch: int) -> StepMemory:
        (b1, s1), (b2, s2) = sorted(self.small.items())
        blocks = []
        for x, y in zip(s1.blocks, s2.blocks):
            act = x.activation_bytes + (y.activation_bytes - x.activation_bytes) * (batch - b1) / (b2 - b1)
            work = x.workspace_bytes + (y.workspace_bytes - x.workspace_bytes) * (batch - b1) / (b2 - b1)
            blocks.append((max(0, round(act)), max(0, round(work))))
        return s1.with_saved([a for a, _ in blocks], [w for _, w in blocks])

    def total(self, batch: int) -> int:
        return self.at(batch).peak_total_bytes

    def measured_at(self, batch: int, make_batch: Callable[[int], Batch], autocast=nullcontext) -> StepMemory:
        """The step at ``batch`` with backward's workspace measured there (``block_workspace``) instead of
        extrapolated: it is not affine at the fit batches (a fixed part wins below ~8 images; with MLAAN's
        recompute the peak moves to block k-1's recomputation as the batch grows). Saved bytes are linear."""
        if batch not in self.exact:
            work = block_workspace(self.model, make_batch(batch), autocast)
            acts = [b.activation_bytes for b in self.at(batch).blocks]
            self.exact[batch] = self.at(batch).with_saved(
                acts, [w + h for w, h in zip(work.workspace_bytes, work.held_bytes)]
            )
        return self.exact[batch]


def measure(
    build: Build,
    make_batch: Callable[[int], Batch],
    num_blocks: int,
    cuts: list[int] | None,
    recompute: bool,
    autocast: Callable[[], Any] = nullcontext,
) -> Candidate:
    """Build the candidate and account for one step at each fit batch (after a first step, so that the
    optimizers hold their state as in training); FLOPs per image from the first fit batch."""
    torch.manual_seed(0)
    model, opts, grouped = build(num_blocks, cuts, recompute)
    small, flops = {}, None
    for b in FIT_BATCHES:
        train_step(model, make_batch(b), opts, autocast=autocast)
        meter = StepMeter(model)
        counter = FlopCounterMode(display=False) if flops is None else nullcontext()
        with counter:
            train_step(model, make_batch(b), opts, autocast=autocast, meter=meter)
        if flops is None:
            flops = counter.get_total_flops() / b
        work = block_workspace(model, make_batch(b), autocast)
        small[b] = step_memory(
            model, opts, meter.block_bytes, max(meter.bank_bytes), work, group_steps=grouped
        )
    return Candidate(num_blocks, list(model.cuts), recompute, small, flops, model, opts)


@dataclass
class Plan:
    """The planner's answer (``as_json`` is ``locallearn plan --json``)."""

    fits: bool
    budget_bytes: int
    batch_size: int
    num_blocks: int
    cuts: list[int]
    recompute: bool | None  # None: the method has nothing to recompute (``recompute_option``)
    peak_total_bytes: int  # the account at batch_size (saved bytes extrapolated, workspace measured there)
    bp_peak_total_bytes: int
    checkpoint_peak_total_bytes: int
    checkpoint_segments: int
    flops_per_step: float | None = None
    bp_flops_per_step: float | None = None
    measured_peak_total_bytes: int | None = None
    needed: str = ""  # when nothing fits: what would
    recompute_option: str = "method.momentum.recompute"  # the option ``recompute`` sets

    @property
    def overrides(self) -> list[str]:
        out = [f"model.num_blocks={self.num_blocks}"]
        if self.num_blocks > 1:
            out += ["model.split=cuts", f"model.cuts=[{','.join(map(str, self.cuts))}]"]
        # as measured; off is named only where the default may be on (MLAAN's auto, on outside models)
        if self.recompute or (self.recompute is False and self.recompute_option in AUTO_ON):
            out.append(f"{self.recompute_option}={str(self.recompute).lower()}")
        return out + [f"data.batch_size={self.batch_size}"]

    def as_json(self) -> dict[str, Any]:
        return {
            "fits": self.fits,
            "budget_bytes": self.budget_bytes,
            "bp_peak_total_bytes": self.bp_peak_total_bytes,
            "checkpoint_peak_total_bytes": self.checkpoint_peak_total_bytes,
            "peak_total_bytes": self.peak_total_bytes,
            "measured_peak_total_bytes": self.measured_peak_total_bytes,
            "num_blocks": self.num_blocks,
            "cuts": self.cuts,
            "recompute": self.recompute,
            "batch_size": self.batch_size,
            "flops_per_step": self.flops_per_step,
            "overrides": self.overrides,
            "needed": self.needed or None,
        }


def checkpoint_total(bp: StepMemory, num_layers: int) -> tuple[int, int]:
    """Activation checkpointing of ``bp`` over ~sqrt(L) segments, estimated: the segments' inputs plus one
    segment's saved bytes held, about ``2 / sqrt(L)`` of ``bp``'s saved bytes; weights, state, gradients
    and workspace as ``bp``'s (recomputation's own workspace not counted)."""
    segments = max(1, round(math.sqrt(num_layers)))
    block = bp.blocks[0]
    saved = round(block.activation_bytes * min(1.0, 2 / segments))
    total = bp.resident_bytes + block.gradient_bytes + saved + block.workspace_bytes
    return total, segments


def layer_live_costs(model: Any, make_batch: Callable[[int], Batch], batch: int) -> list[float]:
    """Per layer of the backbone: its saved bytes at ``batch`` (measured on 2 images, linear) + its gradient
    bytes: what a block made of these layers holds live (the DP's cost, aux nets aside)."""
    backbone = model.backbone
    x = make_batch(2).x
    saved = layer_activation_bytes(backbone, x.shape[1], x.shape[-1], example=x)
    grads = [
        sum(p.numel() * p.element_size() for p in layer.parameters() if p.requires_grad)
        for layer in backbone.layers
    ]
    return [a * batch / 2 + g for a, g in zip(saved, grads)]


def candidate_ks(num_layers: int) -> list[int]:
    """K = 2, 3, 4, 6, 8, 12, 16, ... up to one layer per block."""
    ks, k = [], 2
    while k < num_layers:
        ks.append(k)
        k = k + 1 if k < 4 else int(k * 1.5) if k % 2 else k * 3 // 2
    return sorted({*ks, num_layers})


AUTO_ON = ("method.mlaan.recompute",)  # recompute options whose default (auto) can be on


def recompute_option(method_name: str) -> str | None:
    """The option by which ``method_name`` trades one more forward for memory (None: it has none)."""
    if "+man" in method_name:
        return "method.momentum.recompute"  # the LB / EMA copies
    if method_name == "mlaan":
        return "method.mlaan.recompute"  # block k-1 in the cascade
    return None


def plan(
    build: Build,
    make_batch: Callable[[int], Batch],
    budget: int,
    batch_size: int | None,
    default_batch: int,
    num_blocks: int | None = None,
    cuts: list[int] | None = None,
    option: str | None = None,
    recompute: bool | None = None,
    autocast: Callable[[], Any] = nullcontext,
    dry_run: bool = True,
    device: torch.device | None = None,
    max_blocks: int | None = None,
) -> Plan:
    """Search (module docstring); ``num_blocks`` / ``cuts`` / ``recompute`` given by the user are kept;
    ``option``: the method's ``recompute_option`` (None: nothing to recompute); ``max_blocks`` bounds
    the K tried."""
    has_recompute = option is not None
    bp = measure(build, make_batch, 1, None, False, autocast)
    num_layers = len(bp.model.backbone)
    batches = [batch_size] if batch_size else _halvings(default_batch)
    ks = (
        [num_blocks]
        if num_blocks
        else [k for k in candidate_ks(num_layers) if k <= (max_blocks or num_layers)]
    )
    recomputes = [recompute] if recompute is not None else ([False, True] if has_recompute else [False])
    measured: dict[tuple, Candidate] = {}
    costs_at_default = layer_live_costs(bp.model, make_batch, batches[0])
    chosen = None
    for batch in batches:
        for k in ks:
            if k == 1:
                options = [(bp, None)]
            else:
                k_cuts = cuts if cuts is not None else balanced_cuts(costs_at_default, k)
                options = []
                for rc in recomputes:
                    key = (k, tuple(k_cuts), rc)
                    if key not in measured:
                        log.info("plan: measuring K=%d cuts %s recompute=%s", k, k_cuts, rc)
                        measured[key] = measure(build, make_batch, k, k_cuts, rc, autocast)
                    options.append((measured[key], rc))
            for cand, rc in options:
                # the extrapolation rules out; what passes it is confirmed with the workspace at ``batch``
                if cand.total(batch) > budget:
                    continue
                if cand.measured_at(batch, make_batch, autocast).peak_total_bytes <= budget:
                    chosen = (cand, rc, batch)
                    break
            if chosen:
                break
        if chosen:
            break
    bp_batch = chosen[2] if chosen else batches[-1]
    bp_step = bp.measured_at(bp_batch, make_batch, autocast)
    bp_total = bp_step.peak_total_bytes
    ckpt, segments = checkpoint_total(bp_step, num_layers)
    if chosen is None:
        best = min(measured.values() or [bp], key=lambda c: c.total(batches[-1]))
        need = best.total(batches[-1])
        return Plan(
            False, budget, batches[-1], best.num_blocks, best.cuts, best.recompute if has_recompute else None,
            need, bp_total, ckpt, segments,
            needed=f"nothing fits {fmt(budget)}: the smallest plan (K={best.num_blocks}, batch {batches[-1]}"
            f"{', ' + option.removeprefix('method.') if best.recompute else ''}) needs {fmt(need)}",
            recompute_option=option or "",
        )  # fmt: skip
    cand, rc, batch = chosen
    out = Plan(
        True, budget, batch, cand.num_blocks, cand.cuts, rc if has_recompute else None,
        cand.measured_at(batch, make_batch, autocast).peak_total_bytes,
        bp_total, ckpt, segments,
        flops_per_step=cand.flops_per_image * batch if cand.flops_per_image else None,
        bp_flops_per_step=bp.flops_per_image * batch if bp.flops_per_image else None,
        recompute_option=option or "",
    )  # fmt: skip
    if dry_run:
        for other in (bp, *measured.values()):  # the allocator's count must see the chosen model only
            if other is not cand:
                other.model, other.optimizers = None, []
        out.measured_peak_total_bytes = dry_run_peak(cand, make_batch, batch, autocast, device)
        if out.measured_peak_total_bytes > budget:
            out.fits = False
            out.needed = (
                f"the measured step at batch {batch} holds {fmt(out.measured_peak_total_bytes)}, "
                f"over the budget {fmt(budget)} (the account said {fmt(out.peak_total_bytes)})"
            )
    return out


def dry_run_peak(
    cand: Candidate, make_batch: Callable[[int], Batch], batch: int, autocast, device: torch.device | None
) -> int:
    """One real training step of the chosen candidate at ``batch``: the bytes of its tensors before the step
    (weights, buffers, optimizer state, the batch) plus the most the allocator held above that during it
    (``step_memory.allocator_rise``: the CPU allocator's records, or CUDA's peak statistics). Other models
    the planner measured may still be alive; they are not counted."""
    from locallearn.metrics.step_memory import allocator_rise, storage_bytes

    x = make_batch(batch)
    state = [v for opt in cand.optimizers for s in opt.state.values() for v in s.values()]
    held = storage_bytes([*cand.model.parameters(), *cand.model.buffers(), *state, x.x, x.y])
    rise = allocator_rise(
        lambda: train_step(cand.model, x, cand.optimizers, autocast=autocast), device or "cpu"
    )
    return held + rise


def _halvings(batch: int) -> list[int]:
    out = [batch]
    while out[-1] > 2:
        out.append(out[-1] // 2)
    return out


def fmt(n: float) -> str:
    from locallearn.metrics.memory import fmt_bytes

    return fmt_bytes(n)


def synthetic(
    inputs: InputInfo, num_classes: int, device: torch.device | str = "cpu"
) -> Callable[[int], Batch]:
    """Random images shaped like the data and random labels: memory does not depend on the values."""

    def make(n: int) -> Batch:
        gen = torch.Generator().manual_seed(n)
        x = torch.randn(n, inputs.channels, inputs.size, inputs.size, generator=gen)
        y = torch.randint(0, num_classes, (n,), generator=gen)
        mean = torch.tensor(inputs.mean).view(-1, 1, 1)
        std = torch.tensor(inputs.std).view(-1, 1, 1)
        return Batch(x, y, mean, std).to(torch.device(device))

    return make


def table(p: Plan) -> list[str]:
    """bp, activation checkpointing and the plan side by side."""
    gf = lambda f: f"{f / 1e9:.1f}" if f else "-"  # noqa: E731
    rows = [
        ("bp", 1, "-", p.bp_peak_total_bytes, p.bp_flops_per_step),
        (f"checkpoint ({p.checkpoint_segments} segments, estimate)", 1, "-", p.checkpoint_peak_total_bytes,
         p.bp_flops_per_step * 4 / 3 if p.bp_flops_per_step else None),
        ("plan" + (" + " + p.recompute_option.removeprefix("method.") if p.recompute else ""), p.num_blocks, " ".join(map(str, p.cuts)) or "-",
         p.peak_total_bytes, p.flops_per_step),
    ]  # fmt: skip
    lines = [f"{'':<34} {'K':>3} {'peak train mem':>15} {'GFLOP/step':>11}  cuts"]
    for name, k, cut, total, flops in rows:
        lines.append(f"{name:<34} {k:>3} {fmt(total):>15} {gf(flops):>11}  {cut}")
    return lines


# -- from a config (``locallearn plan``) ------------------------------------------------------------------

# image shape and classes of datasets that may not be on this machine (memory depends on nothing else)
SHAPES = {"cifar10": (3, 32, 10), "cifar100": (3, 32, 100), "svhn": (3, 32, 10), "stl10": (3, 96, 10)}


def data_shape(cfg: Any) -> tuple[InputInfo, int]:
    """The input shape and class count of the config's data: read from the data when it is here, from
    ``SHAPES`` when it is not (``data.image_size`` wins)."""
    from locallearn.config import ConfigError
    from locallearn.data import DataError
    from locallearn.data.datasets import load_data

    try:
        train, _ = load_data(cfg.data, cfg.task.name)
        info, classes = train.info, train.num_classes
    except DataError:
        if cfg.data.name not in SHAPES:
            raise ConfigError(
                f"locallearn plan: data {cfg.data.name!r} is not here and its image shape is not known "
                f"(known without files: {', '.join(SHAPES)})"
            ) from None
        channels, size, classes = SHAPES[cfg.data.name]
        info = InputInfo(channels, size, (0.5,) * channels, (0.5,) * channels)
    if cfg.data.image_size:
        info = InputInfo(info.channels, cfg.data.image_size, info.mean, info.std)
    return info, classes


def plan_config(
    overrides: Sequence[str], budget: int, base: dict | None = None, dry_run: bool = True
) -> tuple[Plan, list[str]]:
    """The plan for the config ``base`` <- ``overrides``; returns it and the overrides to train it with (the
    user's own, then the plan's)."""
    from locallearn.build import build_model
    from locallearn.config import ConfigError, load_config, parse_override
    from locallearn.engine.optim import build_optimizer
    from locallearn.trainer import autocast_factory, select_device

    given = {".".join(keys): value for keys, value in map(parse_override, overrides)}
    cfg = load_config(None, list(overrides), base=base)
    if cfg.task.name != "classification":
        raise ConfigError(
            f"locallearn plan: task.name={cfg.task.name} is not planned yet (classification only)"
        )
    if cfg.method.name == "bp" and "model.num_blocks" not in given:
        given["model.num_blocks"] = 1
    inputs, classes = data_shape(cfg)
    device = select_device(cfg.engine.device)
    autocast = autocast_factory(cfg.engine.amp, device)
    option = recompute_option(cfg.method.name)
    fixed = [o for o in overrides if not o.startswith(("model.num_blocks=", "model.cuts=", "model.split=",
                                                       "data.batch_size=", f"{option}="))]  # fmt: skip

    def build(k: int, cuts: list[int] | None, recompute: bool):
        extra = [f"model.num_blocks={k}"]
        if k == 1:
            extra += ["method.name=bp", "model.split=even", "model.cuts=null"]
        else:
            extra += ["model.split=cuts", f"model.cuts=[{','.join(map(str, cuts))}]"]
            if option:
                extra.append(f"{option}={str(recompute).lower()}")
        c = load_config(None, [*fixed, *extra], base=base)
        if k == 1:  # bp takes no method options (the method's own, from the overrides or the config)
            c = dataclasses.replace(c, method=dataclasses.replace(c.method, options={}))
        try:
            model, _, _ = build_model(c, inputs, classes)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        model.to(device).train()
        opts = [build_optimizer(model.block_parameters(b), c.optim) for b in range(model.num_blocks)]
        return model, opts, c.engine.group_steps

    cuts = [int(c) for c in given["model.cuts"]] if given.get("model.cuts") else None
    k = int(given["model.num_blocks"]) if "model.num_blocks" in given else (len(cuts) + 1 if cuts else None)
    rc = given.get(option) if option else None
    result = plan(
        build, synthetic(inputs, classes, device), budget,
        int(given["data.batch_size"]) if "data.batch_size" in given else None, cfg.data.batch_size,
        k, cuts, option, None if rc is None else bool(rc), autocast, dry_run, device,
    )  # fmt: skip
    return result, [*fixed, *result.overrides]
