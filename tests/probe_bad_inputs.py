"""The bad-input table through the real command line (issue 22): every case must end with exactly one
``locallearn: error:`` line, no ``Traceback``, the documented exit code, and no run directory.

As a script (each case a fresh ``python -m locallearn`` process; ~5 s a case on a loaded CPU)::

    python tests/probe_bad_inputs.py            # the whole table
    python tests/probe_bad_inputs.py seed name  # only the cases whose id contains one of the words
    PROBE_TIMEOUT=900 python tests/probe_bad_inputs.py  # a slow machine: seconds per case (default 300)

Under pytest, ``tests/test_reliability.py`` runs the whole table in-process (fast), a few cases as real
processes, and the whole table as processes in a slow test.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script, ``tests`` is not on the path
from tests.helpers import TINY_CLI  # noqa: E402

# a CLI run in seconds, so that a case the CLI wrongly accepts ends soon
TINY = [*TINY_CLI, "engine.measure_memory=false", "engine.threads=1"]


@dataclass
class Case:
    id: str
    args: list[str]  # {dir} is the case's scratch directory (files made by ``make_files``)
    code: int  # the documented exit code (README "Exit codes": 2 bad input, 1 I/O, 3 diverged)
    message: str  # a part of the one error line
    train: bool = True  # a `train` case: no run directory may remain in {dir}/runs
    env: dict[str, str] | None = None  # set for the case ({dir} filled in), e.g. an empty weights cache
    prepare: Callable[[Path], None] | None = None  # makes what only this case needs (a finished run)


class CodeRunner:
    """Unpickling it creates the file ``path``: what a malicious checkpoint could do."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def make_files(d: Path) -> None:
    """The files the table's cases point at."""
    (d / "dup.yaml").write_text("optim:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n")
    (d / "broken.yaml").write_text("optim: [1, 2\n")
    (d / "list.yaml").write_text("- 1\n- 2\n")
    (d / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (d / "truncated.pt").write_bytes(b"PK\x03\x04" + b"\0" * 40)
    (d / "not-ours.pt").write_bytes(b"")
    torch.save({"w": torch.zeros(1)}, d / "plain.pt")
    evil = {"format": "locallearn-checkpoint-v1", "config": {}, "model": {}, "epoch": 1}
    torch.save({**evil, "x": CodeRunner(str(d / "code-ran"))}, d / "evil.pt")
    (d / "evilrun").mkdir(exist_ok=True)
    torch.save({**evil, "x": CodeRunner(str(d / "code-ran"))}, d / "evilrun" / "checkpoint.pt")
    torch.save({"model": {"w": torch.zeros(1)}, "x": CodeRunner(str(d / "code-ran"))}, d / "evil-weights.pt")
    np.zeros(3).tofile(d / "weights.npy")
    # a checkpoint whose config names a module to import (issue 28.1): importing it would create code-ran
    (d / "evilmod.py").write_text(f"open({str(d / 'code-ran')!r}, 'w')\nmake = None\n")
    (d / "modrun").mkdir(exist_ok=True)
    torch.save({**evil, "config": {"model": {"backbone": "evilmod:make"}}}, d / "modrun" / "checkpoint.pt")
    # files that are not checkpoints at all (issue 28.12)
    np.save(d / "array.npy", np.zeros(3))
    (d / "notes.txt").write_text("not a checkpoint\n")
    (d / "random.pt").write_bytes(np.random.default_rng(0).bytes(2048))
    # a folder dataset of one class (issue 28.13)
    for split in ("train", "val"):
        (d / "oneclass" / split / "cat").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "oneclass" / split / "cat" / "0.png")
    # a model factory that raises (issue 28.11)
    (d / "raising_factory.py").write_text(
        "def make(num_classes):\n    raise RuntimeError('no such weights')\n"
    )
    # a run directory whose process was killed during its first save (issue 22.6)
    killed = d / "killed"
    killed.mkdir(exist_ok=True)
    (killed / "config.yaml").write_text("seed: 0\n")
    (killed / "train.log").write_text("")
    (killed / ".checkpoint.pt.abc123.tmp").write_bytes(b"")
    (killed / ".lock").write_text(f"999999999 {socket.gethostname()}\n")  # its process is gone


# no download may happen in a case: an empty torch hub and Hugging Face cache, downloads off
OFFLINE = {
    "TORCH_HOME": "{dir}/torch",
    "HF_HOME": "{dir}/hf",
    "LOCALLEARN_OFFLINE": "1",
    "HF_HUB_OFFLINE": "1",
}


def finished_run(d: Path) -> None:
    """``{dir}/done``: a finished one-epoch run of a torchvision model on a 2-class folder (exportable)."""
    for split in ("train", "val"):
        for c in range(2):
            folder = d / "pics" / split / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(3):
                Image.fromarray(np.full((8, 8, 3), 100 * c + i, np.uint8)).save(folder / f"{i}.png")
    from locallearn.config import load_config
    from locallearn.run import Run

    model = [
        "model.backbone=torchvision:resnet18",
        "method.name=dgl",
        "data.name=folder",
        f"data.root={d}/pics",
    ]
    cfg = load_config(
        None, [*TINY, *model, "data.image_size=32", "data.batch_size=6", f"out_dir={d}", "name=done"]
    )
    Run(cfg, quiet=True).fit()


SR = ["-c", str(ROOT / "configs/super_resolution/smoke_edsr_tiny_photos.yaml")]
OUT = "out_dir={dir}/runs"
CASES = [
    # -- configuration: one line, exit 2, before anything is written
    Case("unknown-key", ["train", *TINY, "optim.lrr=0.1", OUT], 2, "unknown config key 'optim.lrr'"),
    Case("bad-type", ["train", *TINY, "optim.lr=fast", OUT], 2, "optim.lr: expected float"),
    Case("no-equals", ["train", *TINY, "optim.lr", OUT], 2, "must look like key=value"),
    Case("seed-negative", ["train", *TINY, "seed=-1", OUT], 2, "seed must lie in 0..4294967295"),
    Case("seed-2^32", ["train", *TINY, "seed=4294967296", OUT], 2, "seed must lie in 0..4294967295"),
    Case("lr-float32", ["train", *TINY, "optim.lr=1e39", OUT], 2, "beyond what float32 holds"),
    Case("lr-nan", ["train", *TINY, "optim.lr=.nan", OUT], 2, "expected a finite number"),
    Case("lr-inf", ["train", *TINY, "optim.lr=1e400", OUT], 2, "expected a finite number"),
    Case("lr-zero", ["train", *TINY, "optim.lr=0", OUT], 2, "optim.lr must be > 0"),
    Case("batch-zero", ["train", *TINY, "data.batch_size=0", OUT], 2, "data.batch_size must be >= 1"),
    Case("batch-int64", ["train", *TINY, "data.batch_size=99999999999999999999", OUT], 2, "64-bit"),
    Case("epochs-absurd", ["train", *TINY, "optim.epochs=99999999999", OUT], 2, "cannot finish"),
    Case("name-escapes", ["train", *TINY, "name=../../x", OUT], 2, "one directory name inside out_dir"),
    Case("name-nested", ["train", *TINY, "name=a/b", OUT], 2, "one directory name inside out_dir"),
    Case("name-dotdot", ["train", *TINY, "name=..", OUT], 2, "one directory name inside out_dir"),
    Case("name-empty", ["train", *TINY, "name=", OUT], 2, "one directory name inside out_dir"),
    Case("method-unknown", ["train", *TINY, "method.name=magic", OUT], 2, "magic"),
    Case("device-unknown", ["train", *TINY, "engine.device=tpu9", OUT], 2, "engine.device"),
    Case("task-vs-data", ["train", *TINY, "task.name=segmentation", OUT], 2, "does not fit data.name=digits"),
    # -- config files
    Case("yaml-missing", ["train", "-c", "{dir}/nowhere.yaml", OUT], 2, "does not exist"),
    Case("yaml-binary", ["train", "-c", "{dir}/binary.yaml", OUT], 2, "not a text"),
    Case("yaml-broken", ["train", "-c", "{dir}/broken.yaml", OUT], 2, "not valid YAML"),
    Case("yaml-list", ["train", "-c", "{dir}/list.yaml", OUT], 2, "must hold a mapping"),
    Case("yaml-duplicate-key", ["train", "-c", "{dir}/dup.yaml", OUT], 2, "sets 'lr' twice"),
    # -- data
    Case(
        "data-missing", ["train", "data.name=cifar10", "data.root={dir}/nodata", OUT], 2, "data.name=digits"
    ),
    # -- files a user names: never unpickled with code, one line each
    Case("eval-missing", ["eval", "{dir}/nowhere.pt"], 2, "does not exist", train=False),
    Case("eval-truncated", ["eval", "{dir}/truncated.pt"], 2, "truncated or corrupt", train=False),
    Case("eval-empty", ["eval", "{dir}/not-ours.pt"], 2, "not-ours.pt", train=False),
    Case("eval-plain-weights", ["eval", "{dir}/plain.pt"], 2, "not a locallearn checkpoint", train=False),
    Case("eval-runs-code", ["eval", "{dir}/evil.pt"], 2, "weights_only=True", train=False),
    Case("resume-runs-code", ["train", "--resume", "{dir}/evilrun"], 2, "weights_only=True", train=False),
    Case("analyze-runs-code", ["analyze", "gradcam", "{dir}/evilrun"], 2, "weights_only=True", train=False),
    Case("eval-module-spec", ["eval", "{dir}/modrun"], 2, "--trust-module evilmod:make", train=False),
    Case("export-module-spec", ["export", "{dir}/modrun", "{dir}/o.pt"], 2, "imports and runs", train=False),
    Case("resume-module-spec", ["train", "--resume", "{dir}/modrun"], 2, "imports and runs", train=False),
    Case("analyze-module-spec", ["analyze", "probe", "{dir}/modrun"], 2, "imports and runs", train=False),
    Case("analyze-missing", ["analyze", "gradcam", "{dir}/nowhere"], 2, "does not exist", train=False),
    Case(
        "pretrained-runs-code",
        ["train", *TINY, "model.backbone=resnet18", "model.pretrained={dir}/evil-weights.pt", OUT],
        2,
        "cannot read",
    ),
    Case(
        "pretrained-not-torch",
        ["train", *TINY, "model.backbone=resnet18", "model.pretrained={dir}/weights.npy", OUT],
        2,
        "cannot read",
    ),  # fmt: skip
    Case(
        "sr-pretrained-runs-code",
        ["train", *SR, "task.super_resolution.pretrained={dir}/evil-weights.pt", OUT],
        2,
        "cannot read",
    ),  # fmt: skip
    # -- any model: its options and weights by name (issue 28.5 / 28.6)
    Case(
        "weights-not-cached",
        ["train", *TINY, "model.backbone=torchvision:resnet18", "model.weights=DEFAULT", OUT],
        2,
        "resnet18-f37072fd.pth",
        env=OFFLINE,
    ),
    Case(
        "weights-timm-not-cached",
        ["train", *TINY, "model.backbone=timm:test_resnet", "model.weights=pretrained", OUT],
        2,
        "not in the Hugging Face cache",
        env=OFFLINE,
    ),
    Case(
        "weights-unknown",
        ["train", *TINY, "model.backbone=torchvision:resnet18", "model.weights=IMAGENET9", OUT],
        2,
        "has weights IMAGENET1K_V1, DEFAULT",
        env=OFFLINE,
    ),
    Case("weights-listed", ["train", *TINY, "model.weights=DEFAULT", OUT], 2, "model.pretrained=FILE"),
    Case(
        "kwargs-not-taken",
        ["train", *TINY, "model.backbone=torchvision:resnet18", "model.kwargs={bogus: 1}", OUT],
        2,
        "model.kwargs={'bogus': 1}",
    ),
    Case("kwargs-classes", ["train", *TINY, "model.kwargs.num_classes=3", OUT], 2, "the data's classes"),
    Case("kwargs-brace-split", ["train", *TINY, "model.kwargs=img_size:64", OUT], 2, "quote the braces"),
    Case("kwargs-listed", ["train", *TINY, "model.kwargs.depth=3", OUT], 2, "model.kwargs applies to"),
    Case(
        "model-channels",  # digits are 1-channel, timm's model 3
        ["train", *TINY, "model.backbone=timm:test_resnet", OUT],
        2,
        "model.kwargs.in_chans",
    ),
    # -- issue 28
    Case("yaml-directory", ["train", "-c", "{dir}", OUT], 2, "is a directory"),
    Case("eval-npy", ["eval", "{dir}/array.npy"], 2, "is not a checkpoint", train=False),
    Case("eval-text", ["eval", "{dir}/notes.txt"], 2, "is not a checkpoint", train=False),
    Case("eval-random-bytes", ["eval", "{dir}/random.pt"], 2, "is not a checkpoint", train=False),
    Case(
        "folder-one-class",
        ["train", *TINY, "data.name=folder", "data.root={dir}/oneclass", OUT],
        2,
        "a classifier needs at least two classes",
    ),  # fmt: skip
    Case(
        "factory-raises",
        ["train", *TINY, "model.backbone=raising_factory:make", OUT],
        2,
        "building the model raised RuntimeError: no such weights",
    ),  # fmt: skip
    Case(
        "export-missing-dir",
        ["export", "{dir}/done", "{dir}/nowhere/m.pt"],
        2,
        "does not exist",
        train=False,
        prepare=lambda d: finished_run(d),
    ),
    Case(
        "export-to-a-directory",
        ["export", "{dir}/done", "{dir}"],
        2,
        "is a directory",
        train=False,
        prepare=lambda d: finished_run(d),
    ),  # fmt: skip
    # -- a run killed during its first save (issue 22.6)
    Case(
        "resume-never-started",
        ["train", "--resume", "{dir}/killed"],
        2,
        "never finished an epoch",
        train=False,
    ),  # fmt: skip
]


@dataclass
class Result:
    case: Case
    code: int
    err: str
    problems: list[str]


def check(case: Case, code: int, err: str, d: Path) -> Result:
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("locallearn: error:")]
    problems = []
    if "Traceback" in err:
        problems.append("a Traceback on stderr")
    if code != case.code:
        problems.append(f"exit code {code}, documented {case.code}")
    if len(errors) != 1:
        problems.append(f"{len(errors)} error lines")
    elif case.message not in errors[0]:
        problems.append(f"the error line lacks {case.message!r}")
    if (d / "code-ran").exists():
        problems.append("a file it read ran code")
    runs = d / "runs"
    if case.train and runs.exists() and any(runs.iterdir()):
        problems.append(f"left a run directory: {sorted(p.name for p in runs.iterdir())}")
    return Result(case, code, err, problems)


def fill(args: list[str], d: Path) -> list[str]:
    return [a.replace("{dir}", str(d)) for a in args]


def run_process(case: Case, d: Path, timeout: float | None = None) -> Result:
    timeout = timeout or float(os.environ.get("PROBE_TIMEOUT", 300))  # seconds a case may take
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **case_env(case, d)}
    proc = subprocess.run(
        [sys.executable, "-m", "locallearn", *fill(case.args, d)],
        cwd=d,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return check(case, proc.returncode, proc.stderr, d)


def case_env(case: Case, d: Path) -> dict[str, str]:
    return {k: v.replace("{dir}", str(d)) for k, v in (case.env or {}).items()}


@contextlib.contextmanager
def environment(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_in_process(case: Case, d: Path) -> Result:
    """The same case through ``locallearn.cli.main`` in this process (no interpreter start-up)."""
    from locallearn.cli import main

    err = io.StringIO()
    sys.path.insert(0, str(d))  # as ``python -m`` run in ``d`` has it: a case's own module imports
    with (
        environment(case_env(case, d)),
        contextlib.redirect_stderr(err),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        try:
            main(fill(case.args, d))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except Exception:  # what the process would print as a traceback
            import traceback

            traceback.print_exc(file=err)
            code = 1
        finally:
            sys.path.remove(str(d))
    return check(case, code, err.getvalue(), d)


def probe(cases: list[Case], runner=run_process, report=print) -> list[Result]:
    """Each case in a fresh scratch directory; the results with problems."""
    failed = []
    for case in cases:
        with tempfile.TemporaryDirectory(prefix=f"probe-{case.id}-") as tmp:
            d = Path(tmp)
            make_files(d)
            if case.prepare is not None:
                case.prepare(d)
            result = runner(case, d)
        status = "ok" if not result.problems else "FAIL: " + "; ".join(result.problems)
        last = (result.err.strip().splitlines() or [""])[-1]
        report(f"{case.id:<26} exit {result.code:<3} {status}\n{'':<26} {last[:150]}")
        if result.problems:
            failed.append(result)
    return failed


def select(words: list[str]) -> list[Case]:
    return [c for c in CASES if not words or any(w in c.id for w in words)]


if __name__ == "__main__":
    cases = select(sys.argv[1:])
    failed = probe(cases)
    print(f"\n{len(cases) - len(failed)} of {len(cases)} cases give one line and the documented exit code")
    sys.exit(1 if failed else 0)
