"""The Python API: ``locallearn.wrap`` turns a model into a ``LocalTrainer`` you drive from your own loop.

::

    ll = locallearn.wrap(torchvision.models.resnet18(num_classes=10), method="dgl+manpp", num_blocks=4,
                         input_size=32, lr=0.05)
    for x, y in loader:
        losses = ll.step(x, y)          # every block: forward, backward, optimizer step; EMA sync
    metrics = ll.evaluate(test_loader)  # {'top1': ..., 'loss': ...}
    torch.save(ll.export(), "resnet18.pt")  # the source model's own state dict

The model is a listed backbone name (``"resnet32"``), a ``"torchvision:NAME"`` / ``"timm:NAME"`` /
``"package.module:factory"`` spec, or an ``nn.Module`` (torchvision, timm, your own), cut into layers at
``cut_at`` module names or at its stages (``backbones/external.py``); such a model's own classifier is
the last block's head, so ``export()`` is the user's model with the trained weights. Everything the
trainer does per batch (``trainer.py``) is the same code a ``locallearn train`` run executes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from locallearn.backbones import external
from locallearn.build import build_model, resolved_method_options
from locallearn.config import Config, ConfigError, load_config, to_dict
from locallearn.engine import checkpoint
from locallearn.engine.errors import check_finite
from locallearn.engine.sequential import reported_losses
from locallearn.model import LocalModel
from locallearn.trainer import Trainer, select_device
from locallearn.types import Batch, InputInfo

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

log = logging.getLogger(__name__)


def _nested(dotted: Mapping[str, Any]) -> dict[str, Any]:
    """``{"optim.lr": 0.1}`` -> ``{"optim": {"lr": 0.1}}`` (the config loader's own layout)."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def wrap(
    model: str | nn.Module,
    method: str = "dgl+manpp",
    num_blocks: int = 4,
    task: str = "classification",
    num_classes: int | None = None,
    *,
    cut_at: list[str] | None = None,
    head_at: str | None = None,
    split: str = "even",
    input_size: int = 32,
    in_chans: int = 3,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    lr: float = 0.1,
    optimizer: str = "sgd",
    weight_decay: float = 5e-4,
    epochs: int | None = None,
    steps_per_epoch: int | None = None,
    amp: str = "none",
    device: str = "auto",
    seed: int | None = 0,
    options: Mapping[str, Any] | None = None,
    memory_budget: str | int | None = None,
    batch_size: int | None = None,
) -> LocalTrainer:
    """Cut ``model`` into ``num_blocks`` gradient-isolated blocks trained by ``method``.

    ``model``: a listed backbone name, a ``torchvision:`` / ``timm:`` / ``module:factory`` spec, or an
    ``nn.Module``; ``cut_at`` names the modules where layers start (default: the model's stages),
    ``head_at`` the module where its classifier starts (default: found at the global pool).
    ``input_size`` / ``in_chans``: the images ``step`` will see (used to build the aux nets and to
    check the split); ``mean`` / ``std``: the normalisation your loader applied (methods that
    reconstruct the image, InfoPro, need it). ``num_classes``: default = the model's classifier's.
    Schedule: constant ``lr``, or InfoPro's cosine when ``epochs`` and ``steps_per_epoch`` are given.
    ``options``: any other config key, dotted as in a YAML file or on the command line
    (``{"method.momentum.momentum": 0.99, "optim.nesterov": False, "engine.channels_last": True}``).
    ``seed``: seeds torch before the model's aux nets are built (None: leave the RNG alone).
    ``memory_budget`` (``"8GiB"``, bytes) with ``batch_size`` (the batch your loader yields): plan K, the cuts
    and recomputation (``momentum.recompute``, ``mlaan.recompute``) so that a training step at that batch fits (``locallearn.plan``); the plan is
    logged and ``trainer.config`` holds it. ``num_blocks`` is then the largest K you accept."""
    if memory_budget is not None:
        return _wrap_for_budget(locals())
    if seed is not None:
        torch.manual_seed(seed)
    backbone = None
    if isinstance(model, nn.Module):
        name = type(model).__name__
        x = torch.randn(2, in_chans, input_size, input_size, generator=torch.Generator().manual_seed(0))
        try:
            backbone = external.from_module(model, cut_at, example_input=x, name=name, head_at=head_at)
        except ValueError as e:
            takes = external.first_conv_channels(model)
            if takes is not None and takes != in_chans and "fails on a" in str(e):
                raise ConfigError(
                    f"wrap({name}): the model takes {takes}-channel images but in_chans={in_chans}; pass "
                    f"in_chans={takes} (the channels of the images step() will see)"
                ) from None
            raise ConfigError(str(e)) from None
        if num_classes is None:
            num_classes = backbone.num_outputs
        elif backbone.num_outputs not in (None, num_classes):
            raise ConfigError(
                f"wrap({name}, num_classes={num_classes}): the model's classifier outputs "
                f"{backbone.num_outputs} classes; build the model with {num_classes} (e.g. "
                f"resnet18(num_classes={num_classes})) or leave num_classes out"
            )
    elif not isinstance(model, str):
        raise TypeError(f"wrap: model must be a name or an nn.Module, got {type(model).__name__}")
    else:
        name = model
    if num_classes is None:
        raise ConfigError(f"wrap({name!r}): give num_classes (the model has no classifier to read it from)")
    cosine = epochs is not None and steps_per_epoch is not None
    settings = {
        "seed": seed or 0,
        "model.backbone": name,
        "model.num_blocks": num_blocks,
        "model.split": split,
        "model.cut_at": list(cut_at) if cut_at is not None and backbone is None else None,
        "model.head_at": head_at if backbone is None else None,
        "method.name": method,
        "task.name": task,
        "optim.name": optimizer,
        "optim.lr": lr,
        "optim.weight_decay": weight_decay,
        "optim.schedule": "cosine" if cosine else "constant",
        "optim.epochs": epochs or 1,
        "optim.warmup_epochs": 0.0,
        "engine.amp": amp,
        "engine.device": device,
        **(options or {}),
    }
    cfg = load_config(None, [], base=_nested(settings))
    inputs = InputInfo(in_chans, input_size, tuple(mean), tuple(std))
    try:
        local, meth, task_obj = build_model(cfg, inputs, num_classes, backbone=backbone)
    except ValueError as e:  # ConfigError included; the method's own refusals are ValueErrors
        raise ConfigError(str(e)) from None
    cfg.method.options = resolved_method_options(meth)
    trainer = Trainer(
        local, cfg.optim, steps_per_epoch or 1, task=task_obj, device=select_device(device), engine=cfg.engine
    )
    return LocalTrainer(trainer, cfg, inputs)


def _wrap_for_budget(args: dict[str, Any]) -> LocalTrainer:
    """``wrap(..., memory_budget=)``: the planner's search with ``wrap`` itself as the builder."""
    from locallearn.plan import parse_bytes, plan, recompute_option, synthetic

    budget_text, batch_size = args.pop("memory_budget"), args.pop("batch_size")
    if batch_size is None:
        raise ConfigError("wrap(memory_budget=...): give batch_size=, the batch your loader yields")
    try:
        budget = parse_bytes(budget_text)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    max_k = args.pop("num_blocks")
    options = dict(args.pop("options") or {})
    method = args.pop("method")
    option = recompute_option(method)

    def build(k: int, cuts: list[int] | None, recompute: bool):
        extra = {"model.split": "cuts", "model.cuts": cuts} if cuts else {}
        if option and k > 1:
            extra[option] = recompute
        given = options if k > 1 else {o: v for o, v in options.items() if not o.startswith("method.")}
        t = wrap(**args, method=method if k > 1 else "bp", num_blocks=k, options={**given, **extra})
        return t.model, t.trainer.optimizers, t.config.engine.group_steps

    # the candidates are trained for a few steps while measured: an nn.Module's own weights (shared with
    # them) are put back afterwards
    user_model = args["model"] if isinstance(args["model"], nn.Module) else None
    kept = (
        {k: v.detach().clone() for k, v in user_model.state_dict().items()}
        if user_model is not None
        else None
    )
    probe = build(1, None, False)[0].eval()  # the number of classes, from the model's own output
    with torch.no_grad():
        num_classes = int(
            probe(torch.zeros(2, args["in_chans"], args["input_size"], args["input_size"])).shape[1]
        )
    make = synthetic(InputInfo(args["in_chans"], args["input_size"], tuple(args["mean"]), tuple(args["std"])),
                     num_classes, select_device(args["device"]))  # fmt: skip
    result = plan(build, make, budget, batch_size, batch_size, None, None, option, dry_run=False,
                  device=select_device(args["device"]), max_blocks=max_k)  # fmt: skip
    if user_model is not None:
        user_model.load_state_dict(kept)
    if not result.fits:
        raise ConfigError(f"wrap(memory_budget={budget_text!r}): {result.needed}")
    log.info("memory_budget %s at batch %d: %s", budget_text, batch_size, " ".join(result.overrides))
    extra = {"model.split": "cuts", "model.cuts": result.cuts} if result.num_blocks > 1 else {}
    if result.recompute is not None:  # as measured (an auto default may differ)
        extra[option] = result.recompute
    return wrap(**args, method=method, num_blocks=result.num_blocks, options={**options, **extra})


class LocalTrainer:
    """A wrapped model and its trainer: ``step`` one batch, ``evaluate``, save / load, ``export``.

    ``model`` is the ``LocalModel`` (an ``nn.Module``: ``model(x)`` is inference, backbone + head);
    ``trainer`` holds one optimizer per block, the schedule and AMP (``locallearn.trainer.Trainer``)."""

    def __init__(self, trainer: Trainer, config: Config, inputs: InputInfo) -> None:
        self.trainer, self.config, self.inputs = trainer, config, inputs
        self.steps = 0
        self._mean = torch.tensor(inputs.mean).view(-1, 1, 1)
        self._std = torch.tensor(inputs.std).view(-1, 1, 1)

    @property
    def model(self) -> LocalModel:
        return self.trainer.model

    @property
    def task(self) -> Any:
        return self.trainer.task

    @property
    def device(self) -> torch.device:
        return self.trainer.device

    @property
    def num_blocks(self) -> int:
        return self.model.num_blocks

    @property
    def lr(self) -> float:
        """The learning rate the next ``step`` trains at."""
        return self.trainer.lr

    def batch(self, x: torch.Tensor | Batch, y: Any = None) -> Batch:
        """``x`` (normalised images, N x C x H x W) and ``y`` (the task's targets) as a ``Batch``."""
        if isinstance(x, Batch):
            return x
        return Batch(x, y, self._mean.to(x.dtype), self._std.to(x.dtype))

    def step(self, x: torch.Tensor | Batch, y: Any = None) -> dict[str, float]:
        """Train on one batch: each block's forward, local loss, backward and optimizer step in turn
        (no gradient crosses a block), then the momentum aux's EMA update (MAN / MAN++) and the
        schedule. Returns each block's loss, ``{"block0": ..., "block1": ...}``; a non-finite loss
        raises ``NonFiniteLossError`` naming the block."""
        outs = self.trainer.step(self.batch(x, y))
        losses = reported_losses(outs)  # MLAAN block 0: the cascaded loss that trains it, as the CLI logs
        check_finite(losses, self.steps)
        self.steps += 1
        return {f"block{k}": float(v) for k, v in enumerate(losses)}

    def _batches(self, loader: Iterable) -> Iterable[Batch]:
        for item in loader:
            yield item if isinstance(item, Batch) else self.batch(*item)

    def evaluate(self, loader: Iterable, blocks: bool = True) -> dict[str, float]:
        """The task's metrics (classification: ``top1``, ``top5``, ``loss``) over ``loader``, which
        yields ``(x, y)`` pairs or ``Batch`` objects, in eval mode; with ``blocks`` also each block's
        aux scored by the task's metric, ``block{k}_top1`` (None where an aux predicts nothing)."""
        return self.trainer.evaluate(self._batches(loader), blocks=blocks)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Inference: the model's output for ``x`` (logits for classification)."""
        return self.model(x.to(self.device))

    def train(self, mode: bool = True) -> LocalTrainer:
        self.model.train(mode)
        return self

    def eval(self) -> LocalTrainer:
        return self.train(False)

    def state_dict(self) -> dict[str, Any]:
        """Model, every block's optimizer, the schedule, the loss scalers, the step count."""
        return {**self.trainer.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trainer.load_state_dict(state)
        self.steps = int(state.get("steps", 0))

    def save(self, path: str | Path) -> None:
        """``state_dict()`` plus the resolved config, written atomically (a crash keeps the old file)."""
        checkpoint.save(Path(path), {"config": to_dict(self.config), **self.state_dict()})

    def load(self, path: str | Path) -> None:
        """Load what ``save`` wrote into this (identically wrapped) model and its optimizers."""
        self.load_state_dict(checkpoint.load(Path(path), require=("model", "optimizers", "schedule")))

    def export(self) -> dict[str, torch.Tensor]:
        """The trained weights as the source model's own state dict (load it into the model you
        wrapped, or its constructor, with ``strict=True``); ``ExportError`` where the model does not
        map back (the CIFAR ResNets, VGG / ViT adapters, a head that is the task's own)."""
        from locallearn.export import export_state_dict

        return export_state_dict(self.model)
