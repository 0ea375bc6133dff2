"""Atomic checkpoint files and a clear error for unreadable ones.

A save writes a hidden temp file next to the target and renames it over the target, so a failed
write (full disk, kill) leaves the previous checkpoint intact; a temp file a killed process left
behind is removed by ``remove_stale_temp`` when the run directory is next opened (under its lock).

Every checkpoint is read with ``torch.load(weights_only=True)``: a file someone else made cannot run
code when it is loaded. What ``save`` writes is tensors and plain types only (dicts, lists, numbers,
strings), so our own files always pass.
"""

from __future__ import annotations

import errno
import importlib
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or not a locallearn checkpoint."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, I/O error); the previous one is intact. An
    ``OSError`` with the checkpoint's path as ``filename``, so callers report it like any failed write."""


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
    save_atomic(path, plain({"format": FORMAT, **state}))


def save_atomic(path: Path, obj: Any) -> None:
    """``torch.save(obj)`` to ``path`` through a temp file beside it, fsync and rename: a failed write
    (full disk, read-only place, kill) leaves no half-written ``path`` and keeps an older one intact.
    Raises ``CheckpointWriteError`` (an ``OSError`` naming ``path``) when the write fails."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the run's other files follow the umask
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, Exception):
            raise _write_error(e, path) from None
        raise


def plain(obj: Any) -> Any:
    """``obj`` with numpy scalars as Python numbers and numpy arrays as tensors, so that the file
    loads with ``weights_only=True`` (a metric or a memory count may come back from numpy). Containers
    without numpy inside are returned as they are (a state dict keeps its type and ``_metadata``)."""
    if isinstance(obj, dict):
        values = {k: plain(v) for k, v in obj.items()}
        return obj if all(values[k] is v for k, v in obj.items()) else values
    if type(obj) in (list, tuple):
        values = [plain(v) for v in obj]
        return obj if all(a is b for a, b in zip(values, obj)) else type(obj)(values)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.array(obj))
    return obj


# numpy values in a checkpoint written before ``plain`` (arrays, scalars, dtypes): rebuilt from raw
# bytes, no code runs; read with these allowed rather than refused.
_NUMPY_GLOBALS = re.compile(
    r"numpy\.(_core\.|core\.)?(multiarray\._reconstruct|multiarray\.scalar|ndarray|dtype|dtypes\.\w+DType)"
)


def _numpy_globals(path: Path) -> list[Any] | None:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        return None
    if not names or not all(_NUMPY_GLOBALS.fullmatch(n) for n in names):
        return None
    found = []
    for name in names:
        module, _, attr = name.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            return None
    # the dtype classes are reached inside the arrays' state, not listed above; object arrays stay refused
    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType") and n != "ObjectDType"]
    return found + dtypes


def _write_error(e: Exception, path: Path) -> Exception:
    """One error naming the checkpoint for a failed write. torch reports a full disk as the file's
    ``OSError`` followed, while its zip writer closes, by ``RuntimeError: [enforce fail at
    inline_container.cc] unexpected pos`` (the OSError is that one's ``__context__``)."""
    cause: BaseException | None = e
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__context__ or cause.__cause__
    if isinstance(cause, OSError):
        code, reason = cause.errno or errno.EIO, cause.strerror or str(cause)
    elif isinstance(e, RuntimeError) and ("unexpected pos" in str(e) or "inline_container" in str(e)):
        free = shutil.disk_usage(path.parent).free
        code = errno.ENOSPC if free < 64 * 2**20 else errno.EIO
        reason = f"{os.strerror(code)} (torch's zip writer stopped; {free / 2**20:.0f} MiB free there)"
    else:
        return e  # not a write failure (a bug, an object torch cannot save): keep its traceback
    if code == errno.ENOSPC:
        reason += "; free some space (an earlier checkpoint, if any, is left as it was)"
    return CheckpointWriteError(code, reason, str(path))


def _torch_file(head: bytes) -> bool:
    """Whether a file's first bytes are what ``torch.save`` writes: a zip archive, or a pickle
    (protocol 2 to 5). A damaged archive still counts: torch then says it is truncated or corrupt."""
    return head.startswith(b"PK") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def load(
    path: str | Path, map_location: str | torch.device = "cpu", require: tuple[str, ...] = REQUIRED
) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    with open(path, "rb") as f:
        head = f.read(4)
    if not _torch_file(head):  # else torch's pickle reader calls random bytes "Python objects"
        raise CheckpointError(
            f"{str(path)!r} is not a checkpoint: torch.save writes a zip archive (or, before torch 1.6, a "
            "pickle), and this file is neither (a .npy, a text file, random bytes?)"
        )
    try:
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:
            allowed = _numpy_globals(path) if "Weights only load failed" in str(e) else None
            if not allowed:
                raise
            with torch.serialization.safe_globals(allowed):
                state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for a truncated zip / pickle
        if "Weights only load failed" in str(e):  # a valid file holding objects that would run code
            raise CheckpointError(
                f"{str(path)!r} holds Python objects besides tensors and plain types; locallearn reads "
                "checkpoints with torch.load(weights_only=True) so that a file cannot run code, and does "
                "not load this one"
            ) from None
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
