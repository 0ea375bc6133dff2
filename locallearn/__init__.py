"""locallearn: supervised local learning (DGL, InfoPro, MAN, MAN++, ...) for vision backbones.

Public API (docs/api.md)::

    ll = locallearn.wrap(model, method="dgl+manpp", num_blocks=4, num_classes=10)  # your own loop
    losses = ll.step(x, y)

    cfg = locallearn.load_config("configs/manpp_cifar10/resnet32_k16_infopro_manpp.yaml", ["optim.epochs=10"])
    summary = locallearn.Run(cfg).fit()  # a whole run: run directory, checkpoints, metrics
"""

from locallearn.api import LocalTrainer, wrap  # noqa: E402
from locallearn.build import BACKBONES, METHODS, build_backbone, build_method, build_model, trust_modules  # noqa: E402
from locallearn.config import Config, ConfigError, load_config  # noqa: E402
from locallearn.model import LocalModel  # noqa: E402
from locallearn.run import Run  # noqa: E402
from locallearn.run.launch import evaluate_checkpoint, make_run, resume_run  # noqa: E402
from locallearn.trainer import Trainer  # noqa: E402
from locallearn.types import Batch, FeatureInfo, InputInfo  # noqa: E402
from locallearn.version import __version__  # noqa: E402, F401

__all__ = [
    "BACKBONES",
    "METHODS",
    "Batch",
    "Config",
    "ConfigError",
    "FeatureInfo",
    "InputInfo",
    "LocalModel",
    "LocalTrainer",
    "Run",
    "Trainer",
    "build_backbone",
    "build_method",
    "build_model",
    "evaluate_checkpoint",
    "make_run",
    "resume_run",
    "load_config",
    "trust_modules",
    "wrap",
]
