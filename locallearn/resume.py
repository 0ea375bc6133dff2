"""What a checkpoint says about its run: the saved config (in today's keys), and which keys a resume
may change. Shared by every engine mode's run (``locallearn/run/``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from locallearn.build import untrusted
from locallearn.config import Config, ConfigError, from_dict, load_config, to_dict
from locallearn.engine import checkpoint

# What ``--resume RUN key=value`` (or ``-c``) may change: nothing that alters shapes, data or the method.
# More epochs extend the cosine schedule: it is recomputed over the new total (README, "Resume").
SAFE_ON_RESUME = (
    "optim.epochs",
    "checkpoint_every",
    "engine.device",
    "engine.threads",
    "engine.measure_memory",
    "engine.dist_timeout_s",
    "engine.compile",  # the same computation, compiled or not
    "engine.compile_backend",
    "engine.compile_mode",
    "engine.compile_region",
    "data.num_workers",
    "log.progress_every_s",  # watching a run changes nothing it computes
    "log.tensorboard",
)


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_config(saved: Config, config_file: str | None, overrides: list[str], epochs_done: int) -> Config:
    """The saved config with the user's ``-c`` file and overrides on top, if they change only
    ``SAFE_ON_RESUME`` keys; anything else is refused with one line naming the key."""
    if not config_file and not overrides:
        return saved
    cfg = load_config(config_file, overrides, base=to_dict(saved))
    old, new = _flat(to_dict(saved)), _flat(to_dict(cfg))
    for key in sorted(old.keys() | new.keys()):
        if key not in SAFE_ON_RESUME and old.get(key) != new.get(key):
            raise ConfigError(
                f"--resume cannot change {key} ({old.get(key)!r} -> {new.get(key)!r}): it would not be the "
                f"same run; only {', '.join(SAFE_ON_RESUME)} may change (start a new run for the rest)"
            )
    if cfg.optim.epochs < epochs_done:
        raise ConfigError(
            f"optim.epochs={cfg.optim.epochs}: this run has already trained {epochs_done} epochs"
        )
    return cfg


def refuse_merged(state: dict[str, Any], path: Path) -> None:
    if state.get("merged_from"):
        raise checkpoint.CheckpointError(
            f"{str(path)!r} is the merged copy of a {state['merged_from']} run, for eval and export; "
            "resume the run directory itself (its per-rank checkpoints)"
        )


def config_from_checkpoint(state: dict[str, Any]) -> Config:
    """The run's config as saved in ``state``. A ``model.backbone=package.module:factory`` in it is
    refused unless the user named that spec in this command (``--trust-module``, or ``model.backbone=``
    on a ``--resume`` command line; ``locallearn.trust_modules`` in Python): building it imports and runs
    that module, and a checkpoint handed over by someone else must not choose code to run."""
    try:
        cfg = from_dict(Config, migrate_config(state["config"]))
    except (KeyError, ConfigError) as e:
        raise checkpoint.CheckpointError(f"checkpoint holds no usable config ({e})") from None
    spec = cfg.model.backbone
    if untrusted(spec):
        raise checkpoint.CheckpointError(
            f"the checkpoint's config names model.backbone={spec}, and building it imports and runs that "
            f"module; a file cannot choose code to run: if you trust this file and that module, name it again "
            f"(--trust-module {spec})"
        )
    return cfg


def migrate_config(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config in today's keys: ``task.segmentation.pretrained`` became ``model.pretrained``."""
    segmentation = (saved.get("task") or {}).get("segmentation") or {}
    if "pretrained" not in segmentation:
        return saved
    saved = {**saved, "task": {**saved["task"], "segmentation": dict(segmentation)}}
    path = saved["task"]["segmentation"].pop("pretrained")
    saved["model"] = {**(saved.get("model") or {}), "pretrained": path}
    return saved
