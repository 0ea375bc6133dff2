"""Typed run configuration: dataclass defaults, a YAML file over them, dotted overrides over that.

Defaults are the papers' values where a paper sets one (source in the comment). Unknown keys and
values of the wrong type are errors (``ConfigError``), reported as one line by the CLI. Method
options live in ``method.<name>`` sections (``method.infopro.ixx_1=5``); they are checked against the
method's own ``Config`` dataclass when the model is built.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration the user wrote is wrong (unknown key, bad type, unreadable YAML)."""


# PyYAML reads YAML 1.1, where ``1e-3`` (no dot, unsigned exponent) is a string: float fields take it.
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


# What the run's tensors can hold: a float beyond float32 overflows on the first step (or rounds to 0), an
# int beyond int64 does not fit a tensor, a seed outside 0..2**32-1 is refused by numpy's seeding.
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.401298464324817e-45  # the smallest float32 above 0 (subnormal)
INT64_MAX = 2**63 - 1
SEED_MAX = 2**32 - 1
# An epoch count above this cannot finish (a million epochs of one step each is days of work): a typo.
MAX_EPOCHS = 1_000_000


def _float(value: Any, where: str) -> float:
    try:
        x = float(value)
    except OverflowError:  # an int too large for a Python float
        x = math.inf
    if not math.isfinite(x):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    if abs(x) > FLOAT32_MAX or 0 < abs(x) < FLOAT32_TINY:
        raise ConfigError(
            f"{where}={x:g} is beyond what float32 holds (|x| up to 3.4e38, and not below 1.4e-45 unless 0): "
            "the run's tensors cannot use it"
        )
    return x


def _choice(where: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{where}: unknown value {value!r}; choose from {', '.join(choices)}")


def _at_least(where: str, value: float | None, low: float, strict: bool = False) -> None:
    if value is not None and (value <= low if strict else value < low):
        raise ConfigError(f"{where} must be {'>' if strict else '>='} {low:g}, got {value:g}")


@dataclass
class ModelConfig:
    backbone: str = "resnet32"
    num_blocks: int = 16  # K, all gradient-isolated blocks including the last (MAN++ Table I: K=16)
    split: str = "even"  # even | cuts | infopro | infopro_balanced | manpp (split.py)
    cuts: list[int] | None = None  # explicit first-layer indices of blocks 1..K-1
    # backbone=torchvision:NAME | timm:NAME | package.module:factory: module names where a layer
    # starts (None = the model's stages); docs/backbones.md "Any model"
    cut_at: list[str] | None = None
    # the module where the model's classifier (the last block's head) starts; None = found at the global
    # pool (a conv classifier before the pool, SqueezeNet's, then stays in the last layer)
    head_at: str | None = None
    droprate: float = 0.0  # InfoPro --droprate 0.0
    # a state dict file for the backbone (e.g. torchvision's ImageNet resnet50-0676ba61.pth), loaded
    # right after the backbone is built, before any aux net copies a layer; torchvision backbones only.
    # Not read again when a run resumes or a checkpoint is evaluated (the checkpoint holds the weights).
    pretrained: str = ""
    # the first N blocks and their aux nets are not trained (torchvision's trainable_backbone_layers,
    # counted from the input): no backward, no optimizer step, no EMA sync, and they stay in eval mode
    # (batch-norm running statistics stay as loaded, dropout off); still scored per block. 0 <= N < K.
    frozen_blocks: int = 0
    # backbone=torchvision:NAME | timm:NAME | package.module:factory: keyword arguments of its constructor
    # (model.kwargs.img_size=64, or 'model.kwargs={img_size: 64, drop_path_rate: 0.1}'); the number of
    # classes comes from the data, pretrained weights from model.weights
    kwargs: dict[str, Any] = field(default_factory=dict)
    # pretrained weights by name: torchvision's weights enum member (DEFAULT, IMAGENET1K_V2, ...) or timm's
    # ``pretrained`` / a tag, from that library's cache (backbones/weights.py); docs/backbones.md "Any model"
    weights: str = ""

    def __post_init__(self) -> None:
        bad = [k for k in self.kwargs if not isinstance(k, str) or not k.isidentifier()]
        if bad:
            raise ConfigError(f"model.kwargs: keys must be argument names, got {bad[0]!r}")
        # initial weights come from model.weights / model.pretrained, read as tensors only
        weights = "model.weights / model.pretrained"
        taken = {
            "num_classes": "the data's classes",
            **dict.fromkeys(("pretrained", "weights", "pretrained_cfg", "pretrained_cfg_overlay"), weights),
            "checkpoint_path": weights,
        }
        for key, where in taken.items():
            if key in self.kwargs:
                raise ConfigError(
                    f"model.kwargs.{key}: set by locallearn ({where}); leave it out of model.kwargs"
                )
        if self.weights and self.pretrained:
            raise ConfigError("model.weights and model.pretrained both name initial weights; set one")
        if not 0 <= self.frozen_blocks < max(self.num_blocks, 1):
            raise ConfigError(
                f"model.frozen_blocks must lie in 0..{self.num_blocks - 1} (the last of the "
                f"{self.num_blocks} blocks, with the task head, must train), got {self.frozen_blocks}"
            )


@dataclass
class MethodConfig:
    name: str = "infopro+manpp"  # base method, optionally "+man" / "+manpp"
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # method.<section>.<field>


@dataclass
class TaskConfig:
    name: str = "classification"  # classification | detection (| segmentation | super_resolution)
    label_smoothing: float = 0.0
    # Options of the dense tasks, checked against the task's own Config dataclass when the model is
    # built (``task.detection.head=yolov1``), as method options are.
    detection: dict[str, Any] = field(default_factory=dict)
    segmentation: dict[str, Any] = field(default_factory=dict)
    super_resolution: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ConfigError(f"task.label_smoothing must lie in [0, 1], got {self.label_smoothing:g}")


@dataclass
class ScenesConfig:
    """``data.name=digit_scenes`` (data/scenes.py): scikit-learn's 8x8 digits pasted onto textured
    backgrounds, generated in memory from ``seed``; docs/detection.md "digit_scenes"."""

    size: int = 96  # the side of every (square) scene, px
    train_images: int = 512
    test_images: int = 128
    objects: int = 3  # digits per scene: 1..objects (fewer where no free place is found)
    min_digit: int = 16  # the side a source digit is upscaled to, drawn in min_digit..max_digit px
    max_digit: int = 40
    # the share of the 1,797 source digits (per class) that only test scenes use: the split is by source
    test_fraction: float = 0.2
    seed: int = 0  # the data's own seed (not the run's): runs with other seeds train on the same scenes

    def __post_init__(self) -> None:
        for key in ("train_images", "test_images", "objects"):
            _at_least(f"data.scenes.{key}", getattr(self, key), 1)
        _at_least("data.scenes.size", self.size, 16)
        _at_least("data.scenes.min_digit", self.min_digit, 8)
        if not self.min_digit <= self.max_digit <= self.size:
            raise ConfigError(
                f"data.scenes: need min_digit <= max_digit <= size, got {self.min_digit}, {self.max_digit}, "
                f"{self.size}"
            )
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"data.scenes.test_fraction must lie in (0, 1), got {self.test_fraction:g}")
        if not 0 <= self.seed <= SEED_MAX:
            raise ConfigError(f"data.scenes.seed must lie in 0..{SEED_MAX}, got {self.seed}")


@dataclass
class DataConfig:
    name: str = "cifar10"
    root: str = "data"  # where dataset files are expected (torchvision layouts)
    download: bool = False  # only when the user asks for it
    batch_size: int = 1024  # InfoPro / MAN++ CIFAR-10: batch 1024
    test_batch_size: int = 1024
    augment: bool = True  # the papers' crops and flips (PRIOR_ART §2.5)
    train_subset: int | None = None  # first N (class-balanced) training images
    test_subset: int | None = None
    num_workers: int = 0
    image_size: int | None = None  # detection: the shorter side images are resized to (default 600)
    # folder / imagenet: the side of the square crop (default 224); docs/backbones.md "Any model"
    mean: list[float] | None = None  # folder / imagenet normalisation (default: ImageNet's)
    std: list[float] | None = None
    scenes: ScenesConfig = field(default_factory=ScenesConfig)  # data.name=digit_scenes only

    def __post_init__(self) -> None:
        for key in ("batch_size", "test_batch_size", "train_subset", "test_subset", "image_size"):
            _at_least(f"data.{key}", getattr(self, key), 1)
        _at_least("data.num_workers", self.num_workers, 0)


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 0.8  # InfoPro / MAN++ CIFAR-10 at batch 1024
    momentum: float = 0.9  # SGD momentum (not the EMA momentum)
    nesterov: bool = True
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW
    epochs: int = 400  # MAN++ CIFAR recipe (InfoPro: 160)
    schedule: str = "cosine"  # cosine | constant
    warmup_epochs: float = 10.0  # InfoPro --cos_lr: linear warm-up over the first 10 epochs
    warmup_lr: float = 0.01  # ... starting from lr 0.01
    # multi-tensor (``foreach``) optimizer kernels; None = PyTorch's default (on for CUDA tensors,
    # off on CPU). Same update rule; see the README's speed section for the numeric difference.
    foreach: bool | None = None
    # fused single-kernel optimizer step (torch.optim's ``fused=``; CPU and CUDA); off by default
    fused: bool = False
    # clip each block's gradients to this global L2 norm before its step (one norm over the block's
    # layers and its aux, torch's clip_grad_norm_); None = off, as in the classification papers. The
    # official MAN++ COCO recipe (mmdetection's optimizer_config grad_clip max_norm) clips at 1.0 per
    # step over the whole model; here each block clips its own (docs/detection.md "Deviations").
    clip_grad_norm: float | None = None

    def __post_init__(self) -> None:
        _choice("optim.name", self.name, ("sgd", "adamw"))
        if self.fused and self.foreach:
            raise ConfigError("optim.fused=true and optim.foreach=true exclude each other; pick one")
        _choice("optim.schedule", self.schedule, ("cosine", "constant"))
        _at_least("optim.epochs", self.epochs, 1)
        if self.epochs > MAX_EPOCHS:
            raise ConfigError(
                f"optim.epochs={self.epochs} cannot finish (more than {MAX_EPOCHS:,} epochs); is a digit too many?"
            )
        _at_least("optim.lr", self.lr, 0, strict=True)
        _at_least("optim.warmup_lr", self.warmup_lr, 0)
        _at_least("optim.clip_grad_norm", self.clip_grad_norm, 0, strict=True)
        for key in ("momentum", "weight_decay", "warmup_epochs"):
            _at_least(f"optim.{key}", getattr(self, key), 0)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")


@dataclass
class EngineConfig:
    mode: str = "sequential"  # sequential | pipeline | ddp (the last two under torchrun)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    amp: str = "none"  # none | bf16 | fp16 (CUDA only)
    channels_last: bool = False
    measure_memory: bool = True  # saved-tensor accounting on the first training step
    threads: int | None = None  # torch.set_num_threads (CPU)
    # speed switches (issue 13; README "Speed"): all off by default
    group_steps: bool = False  # step all blocks' optimizers in one multi-tensor update after the last block
    compile: bool = False  # torch.compile each block's body + aux (regional; once per distinct block shape)
    compile_backend: str = "inductor"  # inductor | aot_eager | eager (the last two: no code generation)
    compile_mode: str = "default"  # default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    # block: each block's body + aux as one compiled region (faster on CPU: benchmarks/results/compile_speed.md)
    # | module: each body and each aux its own region
    compile_region: str = "block"
    # engine.mode=pipeline (engine/pipeline.py) and ddp (engine/ddp.py)
    pipeline_depth: int = 2  # batches sent to the next rank but not yet received by it (bounded queue)
    pipeline_blocks: list[int] | None = (
        None  # blocks per rank, e.g. [3, 1]; None = balanced by the memory meter
    )
    # pipeline x data parallel (engine/mesh.py): the world's P x R ranks are P stages, each replicated R
    # times; every replica takes 1/R of each global batch of data.batch_size images
    replicas: int = 1
    sync_every: int = 1  # momentum aux: ship the next block's first layer backward every N steps ...
    sync_lag: int = 1  # ... and apply the copy made this many steps earlier (deterministic staleness)
    dist_timeout_s: float = 300.0  # a rank silent this long ends the job with an error naming it

    def __post_init__(self) -> None:
        _choice("engine.mode", self.mode, ("sequential", "pipeline", "ddp"))
        _choice("engine.amp", self.amp, ("none", "bf16", "fp16"))
        _choice("engine.compile_backend", self.compile_backend, ("inductor", "aot_eager", "eager"))
        _choice(
            "engine.compile_mode",
            self.compile_mode,
            ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        )
        _choice("engine.compile_region", self.compile_region, ("module", "block"))
        _at_least("engine.threads", self.threads, 1)
        _at_least("engine.pipeline_depth", self.pipeline_depth, 1)
        _at_least("engine.replicas", self.replicas, 1)
        _at_least("engine.sync_every", self.sync_every, 1)
        _at_least("engine.sync_lag", self.sync_lag, 0)
        _at_least("engine.dist_timeout_s", self.dist_timeout_s, 0, strict=True)


@dataclass
class LogConfig:
    """Watching a run (docs/api.md "Watching a run"); changes nothing it computes."""

    progress_every_s: float = 30.0  # off a terminal: a progress line this often (epoch, step, losses)
    # score every block's aux on the test set at each evaluation (test_block{k}_{metric} columns): one
    # more aux forward per block, and per block one more task evaluator (a COCOeval for detection)
    block_metrics: bool = True
    tensorboard: bool = False  # event files in RUN/tensorboard (needs the tensorboard package)

    def __post_init__(self) -> None:
        _at_least("log.progress_every_s", self.progress_every_s, 0)


@dataclass
class Config:
    seed: int = 0
    out_dir: str = "runs"
    name: str | None = None  # run directory name; default derived from method/backbone/K/data
    compare: list[str] = field(
        default_factory=list
    )  # also train these methods (e.g. ["bp"]) on the same budget
    checkpoint_every: int = 1  # epochs
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        _at_least("checkpoint_every", self.checkpoint_every, 1)
        if not 0 <= self.seed <= SEED_MAX:
            raise ConfigError(
                f"seed must lie in 0..{SEED_MAX} (2**32-1, what numpy can seed), got {self.seed}"
            )
        check_run_name(self.name)
        # the pipeline and DDP drivers sync momentum copies and reduce gradients in their own ways
        if self.model.frozen_blocks and self.engine.mode != "sequential":
            raise ConfigError(f"model.frozen_blocks needs engine.mode=sequential (got {self.engine.mode})")
        if self.engine.replicas > 1 and self.engine.mode != "pipeline":
            raise ConfigError(
                f"engine.replicas={self.engine.replicas} needs engine.mode=pipeline (got {self.engine.mode})"
            )
        if self.optim.clip_grad_norm is not None and (self.engine.mode == "ddp" or self.engine.replicas > 1):
            raise ConfigError(
                f"optim.clip_grad_norm is not supported with engine.mode={self.engine.mode}"
                f"{' engine.replicas>1' if self.engine.replicas > 1 else ''} (it would clip each rank's shard)"
            )


def check_run_name(name: str | None) -> None:
    """A run name is one directory inside ``out_dir``: ``../x`` would place the run outside it and
    ``a/b`` nest it (issue 22)."""
    if name is None:
        return
    separators = [c for c in ("/", "\\", "\0") if c in name]
    if not name.strip() or name in (".", "..") or separators:
        raise ConfigError(
            f"name={name!r}: a run name is one directory name inside out_dir (not empty, '.' or '..', "
            "no '/' or '\\'); set out_dir=... to choose where runs go"
        )


def config_warnings(
    cfg: Config, train_images: int | None = None, num_classes: int | None = None
) -> list[str]:
    """Values a run accepts that change what it does without saying so (issue 22): one line each, for
    the run to log when it starts. ``train_images``: the training set's size before
    ``data.train_subset`` takes its first N."""
    out = []
    o, d = cfg.optim, cfg.data
    if o.schedule == "cosine" and o.warmup_epochs > o.epochs:
        out.append(
            f"optim.warmup_epochs={o.warmup_epochs:g} is more than optim.epochs={o.epochs}: the whole run is "
            f"inside the warm-up, so the learning rate never follows the cosine from optim.lr={o.lr:g}"
        )
    if o.schedule == "constant" and o.warmup_epochs > 0:
        out.append(
            f"optim.warmup_epochs={o.warmup_epochs:g} is ignored: the constant schedule has no warm-up "
            f"(every step trains at optim.lr={o.lr:g}; set optim.warmup_epochs=0 to silence this)"
        )
    if d.train_subset is not None and train_images is not None and d.train_subset > train_images:
        out.append(
            f"data.train_subset={d.train_subset} is more than the {train_images} training images of "
            f"{d.name}: the run uses all {train_images}"
        )
    # the classification subsets are class-balanced (one image of each class first); dense images hold many
    classification = cfg.task.name == "classification"
    if classification and d.train_subset is not None and num_classes and d.train_subset < num_classes:
        out.append(
            f"data.train_subset={d.train_subset} is fewer than the {num_classes} classes of {d.name}: "
            f"{num_classes - d.train_subset} classes have no training image"
        )
    used = min(train_images, d.train_subset or train_images) if train_images is not None else None
    if used is not None and d.batch_size > used:
        out.append(
            f"data.batch_size={d.batch_size} is more than the {used} training images: each epoch is one "
            f"step on a batch of {used}"
        )
    return out


def _check_type(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            if option is type(None) and value is None:
                return None
            if option is type(None):
                continue
            try:
                return _check_type(value, option, where)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if errors else ConfigError(f"{where}: bad value {value!r}")
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            # ``{a: 1,b: 2}`` unquoted: the shell's brace expansion made two words, each a string
            hint = (
                "; quote the braces or write key.sub=value" if isinstance(value, str) and ":" in value else ""
            )
            raise ConfigError(f"{where}: expected a mapping, got {value!r}{hint}")
        return dict(value)
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return _float(value, where)
    if tp is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return _float(value, where)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > INT64_MAX:
            raise ConfigError(f"{where}={value} does not fit a 64-bit integer")
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(f"unknown config key {path!r}; valid keys here: {sorted(fields)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, path)
        else:
            kwargs[key] = _check_type(value, tp, path)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:  # a section's own check (__post_init__): a config error, one line
        raise ConfigError(str(e)) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _method_section(data: dict[str, Any]) -> dict[str, Any]:
    """``method:`` in YAML may list per-method sections beside ``name``; gather them into options."""
    method = dict(data.get("method") or {})
    options = dict(method.pop("options", {}) or {})
    name = method.pop("name", None)
    for section, values in method.items():
        if not isinstance(values, dict):
            raise ConfigError(f"method.{section}: expected a mapping of options, got {values!r}")
        options.setdefault(section, {}).update(values)
    out: dict[str, Any] = {"options": options}
    if name is not None:
        out["name"] = name
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. optim.lr=0.05)")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot parse the value ({e.__class__.__name__})") from None
    return key.split("."), value


def merge(base: dict[str, Any], keys: list[str], value: Any) -> None:
    node = base
    for k in keys[:-1]:
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(keys)}: {k!r} is not a section")
        node = child
    node[keys[-1]] = value


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: int, second: int) -> None:
        super().__init__(f"key {key!r} twice")
        self.key, self.first, self.second = key, first, second


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys in a mapping without a word; a config file that sets a
    value twice is a mistake whichever one was meant, so it is refused. ``<<`` merges may still be
    overridden by the mapping's own keys (that is what a merge is for)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise _DuplicateKey(key, seen[key], line)
                    seen[key] = line
                except TypeError:  # an unhashable key: the base class says what is wrong
                    continue
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory; -c takes a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except _DuplicateKey as e:
        raise ConfigError(
            f"config file {str(path)!r} sets {e.key!r} twice in one mapping (lines {e.first} and {e.second}); "
            "YAML would keep the last silently: delete the one you did not mean"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r} is not a text (UTF-8) file") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {str(path)!r}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return data


def load_config(
    path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None
) -> Config:
    """Defaults <- ``base`` <- YAML file <- dotted overrides."""
    data: dict[str, Any] = {}
    for layer in (base or {}), (load_yaml(path) if path else {}):
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                _deep_update(data[key], value)
            else:
                data[key] = value
    for text in overrides:
        keys, value = parse_override(text)
        if keys[0] == "method" and len(keys) == 2 and keys[1] not in ("name", "options"):
            raise ConfigError(f"override {text!r}: method options go in method.<section>.<field>")
        merge(data, keys, value)
    if "method" in data:
        data["method"] = _method_section(data)
    return from_dict(Config, data)


def _deep_update(dst: dict, src: dict) -> None:
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _deep_update(dst[key], value)
        else:
            dst[key] = value


def dump_yaml(cfg: Config) -> str:
    data = to_dict(cfg)
    options = data["method"].pop("options")
    data["method"].update(options)
    return yaml.safe_dump(data, sort_keys=False)
