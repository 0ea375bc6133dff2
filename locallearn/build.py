"""The only wiring: config -> backbone -> split -> method aux nets -> task head -> LocalModel.

This is the one module that imports every plug-in; a plug-in is one file plus one line in a dict here.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from locallearn import aux_budget
from locallearn.backbones import (
    edsr,
    external,
    resnet_cifar,
    torchvision_resnet,
    torchvision_vgg,
    vit,
    weights,
)
from locallearn.backbones.base import Backbone
from locallearn.backbones.sources import trust_modules, untrusted  # noqa: F401 (re-exported: resume, API)
from locallearn.backbones.torchvision_adapter import read_state_dict
from locallearn.config import Config, ConfigError, from_dict
from locallearn.methods.auglocal import AugLocal
from locallearn.methods.base import AuxContext, Method
from locallearn.methods.bp import BP
from locallearn.methods.dgl import DGL
from locallearn.methods.infopro import InfoPro
from locallearn.methods.man import MAN_DEFAULTS, Momentum, MomentumConfig
from locallearn.methods.mlaan import MLAAN
from locallearn.methods.predsim import PredSim
from locallearn.methods.slm import SLM
from locallearn.model import INPUT, LocalModel
from locallearn.split import layer_activation_bytes, resolve_cuts
from locallearn.tasks.base import HeadLoss, HeadRef, Task
from locallearn.tasks.classification import Classification
from locallearn.tasks.detection import Detection
from locallearn.tasks.segmentation import Segmentation
from locallearn.tasks.super_resolution import SuperResolution
from locallearn.types import FeatureInfo, InputInfo

log = logging.getLogger(__name__)

BACKBONES: dict[str, Callable[..., Backbone]] = {
    "resnet20": resnet_cifar.resnet20,
    "resnet32": resnet_cifar.resnet32,
    "resnet56": resnet_cifar.resnet56,
    "resnet110": resnet_cifar.resnet110,
    **torchvision_resnet.FACTORIES,  # resnet18..152, resnext50_32x4d, resnext101_32x8d (ImageNet stem)
    **torchvision_vgg.FACTORIES,  # vgg11/13/16/19 (+ _bn)
    **vit.FACTORIES,  # vit_tiny / vit_small / vit_base, patch 16
    **edsr.FACTORIES,  # edsr_tiny / edsr_baseline / edsr (super-resolution)
}
METHODS: dict[str, type[Method]] = {
    "bp": BP,
    "dgl": DGL,
    "infopro": InfoPro,
    "predsim": PredSim,
    "auglocal": AugLocal,
    "mlaan": MLAAN,
    "slm": SLM,
}
MOMENTUM: dict[str, dict[str, Any]] = MAN_DEFAULTS  # "+man" / "+manpp" suffixes, composable with any base
# a task is a Task subclass with a ``Config`` dataclass, built as ``cls(num_classes, cfg)``
TASKS: dict[str, type[Task]] = {
    "classification": Classification,
    "detection": Detection,
    "segmentation": Segmentation,
    "super_resolution": SuperResolution,
}
# the targets each task trains on, in the words datasets use for theirs (data.datasets.TARGETS)
TASK_TARGETS: dict[str, str] = {
    "classification": "class labels",
    "detection": "boxes",
    "segmentation": "label maps",
    "super_resolution": "HR images",
}


def method_names() -> list[str]:
    composable = [name for name, cls in METHODS.items() if cls.composes_with_momentum]
    return [*METHODS, *(f"{b}+{m}" for b in composable for m in MOMENTUM)]


def build_method(name: str, options: dict[str, dict[str, Any]] | None = None) -> Method:
    """``"infopro"``, ``"dgl+manpp"``, ... with options ``{section: {field: value}}``.

    Sections: the base method's name (``infopro``) and ``momentum`` for the MAN / MAN++ wrapper.
    """
    options = dict(options or {})
    base_name, _, wrapper = name.partition("+")
    if base_name not in METHODS or (wrapper and wrapper not in MOMENTUM):
        raise ConfigError(f"unknown method {name!r}; choose from {method_names()}")
    base_cls = METHODS[base_name]
    if wrapper and not base_cls.composes_with_momentum:
        raise ConfigError(
            f"{base_name} does not compose with a momentum aux; +{wrapper} composes with: "
            f"{', '.join(n for n, c in METHODS.items() if c.composes_with_momentum)}"
        )
    allowed = {base_name} | ({"momentum"} if wrapper else set())
    for section in options:
        if section not in allowed:
            raise ConfigError(
                f"method options section {section!r} does not apply to method {name!r}; valid: {sorted(allowed)}"
            )
    base = base_cls(from_dict(base_cls.Config, options.get(base_name, {}), f"method.{base_name}"))
    if not wrapper:
        return base
    momentum = {**MOMENTUM[wrapper], **options.get("momentum", {})}
    return Momentum(base, from_dict(MomentumConfig, momentum, "method.momentum"), wrapper)


def resolved_method_options(method: Method) -> dict[str, dict[str, Any]]:
    """The method's full option sections, defaults filled in (written to config.yaml)."""
    if isinstance(method, Momentum):
        return {
            method.base.name: dataclasses.asdict(method.base.cfg),
            "momentum": dataclasses.asdict(method.cfg),
        }
    return {method.name: dataclasses.asdict(method.cfg)} if dataclasses.asdict(method.cfg) else {}


def build_backbone(name: str, in_chans: int, **kw) -> Backbone:
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; choose from {sorted(BACKBONES)}")
    factory = BACKBONES[name]
    if "image_size" in kw and "image_size" not in inspect.signature(factory).parameters:
        kw.pop("image_size")  # only token models (ViT) fix their input size
    return factory(in_chans=in_chans, **kw)


def refuse_moved_options(cfg: Config) -> None:
    """Options that moved, named with their new place (instead of "unknown key")."""
    if "pretrained" in cfg.task.segmentation:
        raise ConfigError(
            "task.segmentation.pretrained is now model.pretrained (it applies to every task): "
            f"write model.pretrained={cfg.task.segmentation['pretrained']}"
        )


def external_backbone(
    cfg: Config, inputs: InputInfo, num_classes: int, load_weights: bool = True
) -> Backbone:
    """``torchvision:NAME`` / ``timm:NAME`` / ``package.module:factory`` split at ``model.cut_at``
    (default: its stages) and checked against the model; a classification model gets the data's
    classes (its classifier becomes the task head)."""
    if cfg.model.droprate:
        raise ConfigError(
            f"model.droprate applies to the listed backbones; {cfg.model.backbone} keeps its own"
        )
    classes = num_classes if cfg.task.name == "classification" else None
    kwargs = dict(cfg.model.kwargs)
    try:
        if load_weights and cfg.model.weights and cfg.model.backbone.startswith("timm:"):
            # timm loads its own file (its filter resizes position embeddings, drops another classifier)
            kwargs.update(weights.timm_kwargs(cfg.model.backbone, cfg.model.weights))
        return external.from_spec(
            cfg.model.backbone,
            classes,
            inputs.channels,
            inputs.size,
            cfg.model.cut_at,
            cfg.model.head_at,
            kwargs,
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None


def source_model(cfg: Config, num_classes: int) -> nn.Module:
    """A fresh, untrained model of the kind the run's backbone was cut from (what ``locallearn
    export`` writes a state dict for): the ``torchvision:`` / ``timm:`` / ``module:`` model, or
    torchvision's own class for a listed torchvision ResNet. ``ConfigError`` for other backbones."""
    name = cfg.model.backbone
    if external.is_spec(name):
        classes = num_classes if cfg.task.name == "classification" else None
        try:
            return external.source_model(name, classes, cfg.model.kwargs)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if name in torchvision_resnet.FACTORIES:
        from torchvision import models

        dilated = {"replace_stride_with_dilation": [False, True, True]} if name.endswith("_d8") else {}
        return models.get_model(name.removesuffix("_d8"), weights=None, num_classes=num_classes, **dilated)
    raise ConfigError(f"backbone {name} has no source model outside locallearn to export to")


def weights_file(cfg: Config) -> Path:
    """``model.weights``: the cached (or just downloaded) file of the named weights; ``ConfigError``
    in one line saying where it looked when there is none."""
    try:
        if cfg.model.backbone.startswith("timm:"):
            return weights.timm_file(cfg.model.backbone, cfg.model.weights)[0]
        return weights.torchvision_file(cfg.model.backbone, cfg.model.weights)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def load_pretrained_backbone(
    backbone: Backbone, name: str, path: str, what: str = "model.pretrained"
) -> None:
    """``model.pretrained=FILE``: a state dict of exactly this torchvision architecture (ImageNet
    weights: ``resnet50-0676ba61.pth``, ...; dilated ResNets take their plain ResNet's file); the
    torchvision classifier in the file is ignored. One-line ``ConfigError`` otherwise."""
    load = getattr(backbone, "load_pretrained", None)
    if load is None:
        raise ConfigError(
            f"{what}: backbone {name} cannot load torchvision weights; use a torchvision backbone "
            "(resnet18..152, resnext*, resnet50_d8 / resnet101_d8, vgg*, vit_*)"
        )
    file = Path(path).expanduser()
    try:
        load(read_state_dict(file, what), f"{what}={str(file)!r}")
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
    log.info("backbone %s initialised from %s", name, file)


def build_task(cfg: Config, num_classes: int) -> Task:
    """The task named by ``task.name``, its options (``task.<name>.<field>``) checked against the task
    class's own ``Config`` dataclass."""
    name = cfg.task.name
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    refuse_moved_options(cfg)
    options = {
        "classification": {"label_smoothing": cfg.task.label_smoothing},
        "detection": cfg.task.detection,
        "segmentation": cfg.task.segmentation,
        "super_resolution": cfg.task.super_resolution,
    }[name]
    cls = TASKS[name]
    try:
        return cls(num_classes, from_dict(cls.Config, options, f"task.{name}"))
    except ValueError as e:  # ConfigError included: unknown keys, wrong types, out-of-range values
        raise ConfigError(str(e)) from None


def check_config(cfg: Config, load_weights: bool = True) -> None:
    """Fail fast on names and options, before any data is read (and on a missing ``model.pretrained``
    file, unless ``load_weights`` is False: a checkpoint will be loaded instead)."""
    if external.is_spec(cfg.model.backbone):
        try:
            external.check_spec(cfg.model.backbone)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    elif cfg.model.backbone not in BACKBONES:
        raise ConfigError(
            f"unknown backbone {cfg.model.backbone!r}; choose from {sorted(BACKBONES)}, or any model as "
            "torchvision:NAME, timm:NAME or package.module:factory"
        )
    elif cfg.model.cut_at is not None or cfg.model.head_at is not None or cfg.model.kwargs:
        key = next(
            k for k, v in (("cut_at", cfg.model.cut_at), ("head_at", cfg.model.head_at), ("kwargs", 1)) if v
        )
        raise ConfigError(
            f"model.{key} applies to torchvision:NAME, timm:NAME and package.module:factory backbones"
        )
    if cfg.model.weights and not cfg.model.backbone.startswith(("torchvision:", "timm:")):
        raise ConfigError(
            f"model.weights names torchvision's or timm's weights; for {cfg.model.backbone} give the "
            "file: model.pretrained=FILE"
        )
    if load_weights and cfg.model.weights:
        weights_file(cfg)  # fail before any data is read: not cached and not downloadable
    if cfg.task.name not in TASKS:
        raise ConfigError(f"unknown task {cfg.task.name!r}; choose from {sorted(TASKS)}")
    refuse_moved_options(cfg)
    check_task_fits_data(cfg.task.name, cfg.data.name)
    if load_weights and cfg.model.pretrained and not Path(cfg.model.pretrained).expanduser().is_file():
        raise ConfigError(f"model.pretrained: no file {cfg.model.pretrained!r}")
    build_method(cfg.method.name, cfg.method.options)


def check_task_fits_data(task: str, data: str) -> None:
    """One line naming both when ``data``'s targets are not what ``task`` trains on (a dataset
    without declared targets, or an unknown name, is left to the data loader)."""
    from locallearn.data.datasets import TARGETS

    held, needed = TARGETS.get(data), TASK_TARGETS.get(task)
    if held is None or needed is None or needed in held:
        return
    tasks = [t for t, n in TASK_TARGETS.items() if n in held]
    fitting = [d for d, t in TARGETS.items() if needed in t]
    raise ConfigError(
        f"task.name={task} does not fit data.name={data}: {data} holds {' and '.join(held)}, {task} needs "
        f"{needed}. "
        f"Use task.name={' or '.join(tasks)} with {data}, or {task} with data.name="
        f"{' | '.join(fitting)}"
    )


def build_model(
    cfg: Config,
    inputs: InputInfo,
    num_classes: int,
    load_weights: bool = True,
    backbone: Backbone | None = None,
) -> tuple[LocalModel, Method, Task]:
    """Build the LocalModel for ``cfg`` on data shaped like ``inputs``.

    ``load_weights``: read the initial weights the config names (``model.pretrained``, the task's
    ``init_model``). False when a checkpoint is loaded over the model next (resume, eval): the files
    are then neither needed nor read. ``backbone``: an already built one (``locallearn.wrap`` of a
    model object, split by ``external.from_module``) instead of ``model.backbone``'s."""
    named = cfg.model.backbone.startswith(("torchvision:", "timm:"))
    built_here = backbone is None and external.is_spec(cfg.model.backbone)
    if (cfg.model.weights and not named) or (cfg.model.kwargs and not built_here):
        key = "model.weights" if cfg.model.weights and not named else "model.kwargs"
        raise ConfigError(
            f"{key} applies to a model built from its name (torchvision:NAME, timm:NAME"
            f"{'' if key == 'model.weights' else ', package.module:factory'}), not to {cfg.model.backbone}"
        )
    if backbone is not None:
        pass
    elif external.is_spec(cfg.model.backbone):
        backbone = external_backbone(cfg, inputs, num_classes, load_weights)
    else:
        backbone = build_backbone(
            cfg.model.backbone, inputs.channels, droprate=cfg.model.droprate, image_size=inputs.size
        )
    if cfg.model.pretrained and load_weights:
        # before the aux nets are built: the copies of later layers made at build time (MAN's
        # ``init: copy``, MLAAN's chain) start from the pretrained layers; re-initialised ones stay so
        load_pretrained_backbone(backbone, cfg.model.backbone, cfg.model.pretrained)
    if cfg.model.weights and load_weights and cfg.model.backbone.startswith("torchvision:"):
        load_pretrained_backbone(backbone, cfg.model.backbone, str(weights_file(cfg)), "model.weights")
    method = build_method(cfg.method.name, cfg.method.options)
    task = build_task(cfg, num_classes)
    k_total = cfg.model.num_blocks
    try:
        cuts = resolve_cuts(
            len(backbone),
            k_total,
            cfg.model.split,
            cfg.model.cuts,
            cfg.model.backbone,
            getattr(backbone, "stage_block_to_layer", None),
            costs=lambda: layer_activation_bytes(backbone, inputs.channels, inputs.size),
        )
        method.check(k_total)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    layers, info = list(backbone.layers), backbone.feature_info
    levels = bank_levels(info, inputs)
    head_ref = HeadRef()
    task.setup(info[-1], {name: f for name, (_, f) in levels.items()})
    # an outside model: its aux nets are sized to it (aux_budget); the listed backbones keep the papers'
    outside = isinstance(backbone, external.ExternalBackbone)
    unit_of = aux_budget.unit_finder(inputs, external.first_unit, external.first_op) if outside else None
    contexts = [
        AuxContext(
            k=k,
            num_blocks=k_total,
            feature=info[cut - 1],
            inputs=inputs,
            task=task,
            next_layers=layers[cut:],
            next_features=info[cut:],
            init_weights=backbone.init_weights,
            num_layers=len(layers),
            bank={name: f for name, (i, f) in levels.items() if i < cut},
            head_ref=head_ref,
            unit_of=unit_of,
        )
        for k, cut in enumerate(cuts)
    ]
    if outside and method.sized_by_width() and not task.dense and contexts:
        own_head = backbone.source_head()
        budget = aux_budget.AUX_SHARE * (count_parameters(backbone) + count_parameters(own_head))
        auxes, widths = aux_budget.sized_auxes(
            lambda k, w: method.make_aux(k, dataclasses.replace(contexts[k], width=w)),
            len(contexts),
            int(budget),
        )
        log.info("%s on %s: aux widths %s (sized to the backbone)", method.name, cfg.model.backbone, widths)
    else:
        auxes = [method.make_aux(k, ctx) for k, ctx in enumerate(contexts)]
    missing = [name for name in task.reads if name not in levels]
    if missing:
        raise ConfigError(
            f"task {task.name} reads {missing} from the feature bank but backbone {cfg.model.backbone} "
            f"has no such level (it has {sorted(levels)})"
        )
    own = backbone.source_head() if isinstance(backbone, external.ExternalBackbone) else None
    if own is not None and task.name == "classification":
        head = own  # the model's own classifier: the trained model is the user's model
    else:
        head = task.build_head(info[-1], {name: levels[name][1] for name in task.reads})
    head_ref.module = head
    auxes.append(method.make_head(HeadLoss(task, head)))
    taps = bank_taps(auxes, [*cuts, len(layers)], levels)
    model = LocalModel(backbone, cuts, auxes, window=method.window, taps=taps)
    aux_budget.warn_if_large(
        model.parameter_counts(), method.name, aux_budget.for_task(method.shrink_options(), task)
    )
    if load_weights:
        task.init_model(model)  # super-resolution: task.super_resolution.pretrained (a x2 run)
    try:
        model.freeze(cfg.model.frozen_blocks)  # the range is the config's check; wrap() may build K otherwise
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return model, method, task


def count_parameters(module: nn.Module | None) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def bank_levels(info: list[FeatureInfo], inputs: InputInfo) -> dict[str, tuple[int, FeatureInfo]]:
    """Bank entries a backbone can write: ``"input"`` (before layer 0), ``"C{s}"``, the output of
    the last layer at stride ``2**s`` (the map before each down-sampling), and ``"L{i}"``, the output
    of layer i (e.g. EDSR's head conv for its global skip); name -> (layer, info)."""
    levels = {"input": (INPUT, FeatureInfo(inputs.channels, 1))}
    for i, f in enumerate(info):
        levels[f"L{i}"] = (i, f)
        if f.fmt == "NCHW" and f.reduction & (f.reduction - 1) == 0:
            levels[f"C{f.reduction.bit_length() - 1}"] = (i, f)
    return levels


def bank_taps(
    auxes: list[nn.Module], ends: list[int], levels: dict[str, tuple[int, FeatureInfo]]
) -> dict[int, tuple[str, ...]]:
    """The layers whose outputs go to the bank: those some aux net (or the head) ``reads``. An aux of
    block k may only read what blocks 0..k write (``ends[k]`` = first layer after block k)."""
    taps: dict[int, tuple[str, ...]] = {}
    for k, aux in enumerate(auxes):
        for module in aux.modules():
            for name in getattr(module, "reads", ()):
                if name not in levels or levels[name][0] >= ends[k]:
                    raise ConfigError(
                        f"the aux of block {k} reads bank entry {name!r}, which no earlier layer writes"
                    )
                index = levels[name][0]
                taps[index] = tuple(sorted({*taps.get(index, ()), name}))
    return taps
