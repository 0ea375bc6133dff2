"""Export a trained model as its source model's own state dict (``locallearn export RUN OUT.pt``).

What maps back, and how:
- ``torchvision:NAME`` / ``timm:NAME`` / ``package.module:factory`` backbones (and any model split with
  ``from_module``): the layers and the head are the source model's own modules, so every tensor keeps
  its source name (``ExternalBackbone.source_state_dict``); the head is the model's own classifier.
- listed torchvision ResNets (``resnet18`` .. ``resnext101_32x8d``, ``resnet50_d8``): the adapter's key
  map, and the task head's Linear becomes ``fc`` (its GAP + Linear is torchvision's avgpool + flatten
  + fc, the same function).
Anything else (CIFAR ResNets, VGG and ViT adapters, whose heads are not torchvision's, dense tasks,
a 1-channel stem) is refused with one line (``ExportError``).

``export_run`` checks what it writes: a fresh source model (the constructor, untrained) loads the file
with ``strict=True`` and its eval-mode outputs equal the run's model's on one batch.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from locallearn.config import ConfigError
from locallearn.engine import checkpoint
from locallearn.rundir import RunLock

log = logging.getLogger(__name__)


class ExportError(ConfigError):
    """The run's model does not map back onto a source model; the message says why."""


def export_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the model ``model`` (a ``LocalModel``) was cut from, holding its trained
    weights (CPU copies): load it into the source constructor with ``strict=True``.

    Raises ``ExportError`` when the backbone has no source model or the task head is not the
    source model's classifier."""
    backbone, head = model.backbone, model.head
    name = getattr(backbone, "name", None) or getattr(backbone, "arch", None) or type(backbone).__name__
    source_state = getattr(backbone, "source_state_dict", None)  # any model split by from_module
    if source_state is not None:
        if head is not backbone.source_head():
            raise ExportError(
                f"{name}: the run's head is the task's, not the model's own classifier (a model that "
                "outputs a feature map, or a task other than classification): nothing to map it to"
            )
        return {k: v.detach().cpu().clone() for k, v in source_state(head).items()}
    if getattr(backbone, "head_linear", None) == "fc":  # the torchvision ResNet adapters
        if backbone.in_chans != 3:
            raise ExportError(f"{name}: built for {backbone.in_chans}-channel input; torchvision's takes 3")
        linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
        pool = head[0] if isinstance(head, nn.Sequential) and len(head) == 2 else None
        if getattr(pool, "fmt", None) != "NCHW" or len(linears) != 1 or head[1] is not linears[0]:
            raise ExportError(f"{name}: the task head is not GAP + Linear, so it is not torchvision's fc")
        state = backbone.to_torchvision_state_dict(head)
        missing = sorted(backbone.tv_unused - state.keys())
        if missing:
            raise ExportError(f"{name}: torchvision's model has tensors the run never trained: {missing[:3]}")
        return {k: v.detach().cpu().clone() for k, v in state.items()}
    raise ExportError(
        f"backbone {name} has no source model to export to; export works for torchvision:NAME, timm:NAME, "
        "package.module:factory backbones and the listed torchvision ResNets"
    )


def how_to_load(backbone: str, num_classes: int, path: str, kwargs: dict | None = None) -> str:
    """The Python line that rebuilds the source model (with ``model.kwargs``) and loads the exported file."""
    prefix, _, rest = backbone.partition(":")
    extra = "".join(f", {k}={v!r}" for k, v in (kwargs or {}).items())
    if prefix == "torchvision" or not rest:
        arch = rest or backbone.removesuffix("_d8")
        make = f"torchvision.models.get_model({arch!r}, num_classes={num_classes}{extra})"
    elif prefix == "timm":
        make = f"timm.create_model({rest!r}, num_classes={num_classes}{extra})"
    else:
        make = f"{prefix}.{rest}({extra.removeprefix(', ') or '...'})"
    return f"{make}.load_state_dict(torch.load({path!r}))"


def check_destination(out: Path) -> Path:
    """Refuse, before any work, a destination the export cannot be written to (one line each)."""
    if out.is_dir():
        raise ExportError(
            f"{str(out)!r} is a directory; name the file to write (e.g. {str(out / 'model.pt')!r})"
        )
    if not out.parent.is_dir():
        raise ExportError(f"cannot write {str(out)!r}: the directory {str(out.parent)!r} does not exist")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write {str(out)!r}: the directory {str(out.parent)!r} is not writable")
    return out


def export_run(run: str | Path, out: str | Path, device: str = "cpu") -> str:
    """Write the run's model (``RUN`` = run directory or checkpoint) to ``out`` as the source model's
    state dict, after checking a fresh source model loads it (``strict=True``) and, in eval mode,
    outputs what the run's model outputs. Returns a one-paragraph report."""
    from locallearn.analysis.runs import checkpoint_path, data_shape, load_run
    from locallearn.build import source_model

    out = check_destination(Path(out))
    training = RunLock(checkpoint_path(run).parent).holder()  # saves are atomic: safe to read meanwhile
    loaded = load_run(run, torch.device(device))
    model, cfg = loaded.model, loaded.cfg
    state = export_state_dict(model)
    info, num_classes = data_shape(cfg)
    fresh = source_model(cfg, num_classes)
    try:
        fresh.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:200]
        raise ExportError(
            f"{cfg.model.backbone}: the source model does not load the export ({first})"
        ) from None
    fresh.to(device).eval()
    x = torch.randn(2, info.channels, info.size, info.size, generator=torch.Generator().manual_seed(0))
    x = x.to(device)
    with torch.no_grad():
        ours, theirs = model.eval()(x), fresh(x)
    diff = float((ours - theirs).abs().max())
    if diff > 1e-5 * float(ours.abs().max()) + 1e-12:  # the same operations: round-off at most
        raise ExportError(
            f"{cfg.model.backbone}: the exported model's outputs differ from the run's (max {diff:.3g})"
        )
    checkpoint.save_atomic(out, state)
    log.info("exported %s (%d tensors) to %s", cfg.model.backbone, len(state), out)
    if training:
        log.warning(
            "%s is still training (process %s): exported its last checkpoint, epoch %d of %d",
            loaded.run_dir,
            training,
            loaded.epoch,
            cfg.optim.epochs,
        )
    return (
        f"wrote {out}: the state dict of {cfg.model.backbone} ({len(state)} tensors, epoch {loaded.epoch}, "
        f"{num_classes} classes). Loads with strict=True into the source model; eval outputs equal the "
        f"run's (max |diff| {diff:.2g}).\n{how_to_load(cfg.model.backbone, num_classes, str(out), cfg.model.kwargs)}"
    )
