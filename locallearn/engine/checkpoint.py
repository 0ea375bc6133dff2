"""Atomic checkpoint files and a clear error for unreadable ones.

A save writes a hidden temp file next to the target and renames it over the target, so a failed
write (full disk, kill) leaves the previous checkpoint intact; a temp file a killed process left
behind is removed by ``remove_stale_temp`` when the run directory is next opened (under its lock).
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or not a locallearn checkpoint."""


FORMAT = "locallearn-checkpoint-v1"
REQUIRED = ("config", "model", "epoch")
TEMP_PATTERNS = (".checkpoint*.pt.*.tmp", "*.csv.tmp")  # what save() and the metrics writer leave


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a temp file in the same directory, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the run's other files follow the umask
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(
    path: str | Path, map_location: str | torch.device = "cpu", require: tuple[str, ...] = REQUIRED
) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for a truncated zip / pickle
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r}: the file is truncated or corrupt ({type(e).__name__})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a locallearn checkpoint")
    missing = [key for key in require if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: it has no {', '.join(missing)}")
    return state


def remove_stale_temp(directory: str | Path) -> list[Path]:
    """Delete the temp files an interrupted save left in ``directory``; call only while holding the
    run's lock (another process's save in progress would otherwise lose its file)."""
    removed = []
    for pattern in TEMP_PATTERNS:
        for p in Path(directory).glob(pattern):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def load_model_state(model: nn.Module, weights: dict[str, torch.Tensor], strict: bool = True) -> None:
    """``model.load_state_dict`` with one line saying what differs instead of torch's dump."""
    own = model.state_dict()
    shapes = [k for k in weights if k in own and tuple(weights[k].shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in weights] if strict else []
    unexpected = [k for k in weights if k not in own]
    if shapes or missing or unexpected:
        parts = []
        if shapes:
            k = shapes[0]
            parts.append(
                f"{len(shapes)} tensor(s) differ in shape, e.g. {k}: checkpoint {tuple(weights[k].shape)} "
                f"vs model {tuple(own[k].shape)}"
            )
        if missing:
            parts.append(f"{len(missing)} missing, e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
        raise CheckpointError(
            "the checkpoint's weights do not fit the model its config builds (was the config, the data "
            f"or the code changed?): {'; '.join(parts)}"
        )
    model.load_state_dict(weights, strict=strict)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, _, gauss = random.getstate()
    random.setstate((version, tuple(state["python"]), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
