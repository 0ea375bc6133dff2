"""A run directory's files that do not depend on training: its name, its lock, the environment
record, the per-epoch ``metrics.csv``."""

from __future__ import annotations

import atexit
import csv
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

import torch

from locallearn.config import Config, ConfigError
from locallearn.version import __version__


def git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict[str, str]:
    return {
        "locallearn": __version__,
        "git": git_revision(),
        "torch": str(torch.__version__),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def run_name(cfg: Config) -> str:
    if cfg.name:
        return cfg.name
    # folder data is named after its folder; torchvision:NAME / package.module:factory without the colon
    data = Path(cfg.data.root).expanduser().resolve().name if cfg.data.name == "folder" else cfg.data.name
    backbone = cfg.model.backbone.replace(":", "-")
    return f"{data}-{backbone}-K{cfg.model.num_blocks}-{cfg.method.name}"


def fresh_run_dir(cfg: Config) -> Path:
    base = Path(cfg.out_dir) / run_name(cfg)
    path, i = base, 1
    while path.exists():
        path = base.with_name(f"{base.name}-{i}")
        i += 1
    try:
        path.mkdir(parents=True)
    except OSError as e:
        raise ConfigError(
            f"out_dir={cfg.out_dir!r}: cannot create the run directory {str(path)!r} ({e.strerror or e})"
        ) from None
    return path


def write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    """``metrics.csv``, one row per epoch, replaced atomically (a reader never sees half a file).
    The header is the union of the rows' keys in first-seen order (a resumed run may add columns)."""
    fields = list(dict.fromkeys(key for row in history for key in row))
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in history:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    os.replace(tmp, path)


class RunLock:
    """``RUN/.lock`` holding ``pid host``: one process per run directory. A lock whose process is
    gone (same host) is stale and taken over; the lock is released at the end of ``fit`` or exit."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / ".lock"
        self.token = f"{os.getpid()} {socket.gethostname()}"
        self.held = False

    def _holder_alive(self, text: str) -> bool:
        pid, _, host = text.strip().partition(" ")
        if not pid.isdigit():
            return False  # a half-written lock: its writer died between create and write
        if host != socket.gethostname():
            return True  # cannot tell: another machine's process
        if int(pid) == os.getpid():
            return False  # this process (an earlier Run object on the same directory)
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def holder(self) -> str | None:
        """The process id in the lock file if that process is alive (another run trains here), else None."""
        try:
            text = self.path.read_text()
        except OSError:
            return None
        return text.split()[0] if self._holder_alive(text) else None

    def acquire(self) -> RunLock:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                try:
                    holder = self.path.read_text()
                except FileNotFoundError:
                    continue
                if self._holder_alive(holder):
                    pid, _, host = holder.strip().partition(" ")
                    raise ConfigError(
                        f"run directory {str(self.path.parent)!r} is in use by process {pid} on {host} "
                        f"(lock file {str(self.path)!r}; delete it if that process is gone)"
                    ) from None
                self.path.unlink(missing_ok=True)  # stale
                continue
            except OSError as e:
                raise ConfigError(
                    f"cannot write into the run directory {str(self.path.parent)!r} ({e.strerror})"
                ) from None
            with os.fdopen(fd, "w") as f:
                f.write(self.token + "\n")
            self.held = True
            atexit.register(self.release)
            return self
        raise ConfigError(f"could not take the lock {str(self.path)!r}; another process keeps taking it")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            if self.path.read_text().strip() == self.token:
                self.path.unlink()
        except OSError:
            pass
