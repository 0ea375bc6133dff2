"""``locallearn bench evidence``: MAN++ accuracy, CUDA peak memory and GPU step time in one 9-minute GPU command.

What CPU runs cannot settle, in one command that finishes within 9 minutes on one H100/H200.

Parts, in order of priority, each with a budget it stops at cleanly, recording how far it got:

1. Table I proxy (``evidence_accuracy.py``): Fashion-MNIST 60k/10k, ResNet-32 K=16, bp / dgl / dgl+manpp / infopro /
   infopro+manpp x 2 seeds, one process each on the one GPU, the data held there; as many epochs as the budget
   allows; test error per epoch, mean/std per method, gap_closed next to the paper's, the pre-registered reading.
2. Peak memory (``evidence_memory.py``): ``torch.cuda.max_memory_allocated`` over whole steps next to the
   saved-tensor meter, ResNet-110 K=55 at batch 1024 and RetinaNet-R50 K=4 at 600 px, batch 16.
3. Step time (``evidence_speed.py``): ResNet-101 K=4, 224 px, batch 128, eager and ``engine.compile``, fp32 and
   bf16 autocast, with whatever time is left.

The parts run one after the other, each with the device to itself.

Writes ``evidence.md`` (also printed), ``accuracy.csv``, ``accuracy_epochs.csv``, ``memory.csv``, ``speed.csv`` and
``evidence.log`` into ``--out``; every CSV row carries the command, device, torch version and date. ``--tiny`` runs
every part on the CPU in a few minutes (CI runs it). The exact GPU command and the pre-registration: docs/gpu.md.
"""

from __future__ import annotations

import datetime
import logging
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from locallearn.bench import evidence_accuracy, evidence_memory, evidence_speed
from locallearn.bench.common import header, machine, markdown_table, write_csv

log = logging.getLogger(__name__)

PARTS = ("accuracy", "memory", "speed")
FULL: dict[str, Any] = {
    # seconds: accuracy ends accuracy_s after the start, then memory gets up to memory_s, then speed up to
    # speed_s, all within budget_s less reserve_s (writing the files)
    "budget_s": 510, "accuracy_s": 290, "memory_s": 90, "speed_s": 240, "reserve_s": 10,
    "methods": evidence_accuracy.METHODS, "seeds": [0, 1], "backbone": "resnet32", "k": 16, "batch_size": 128,
    "lr": 0.1, "warmup_epochs": 1.0, "overrides": ["engine.group_steps=true"], "threads": 1,
    "dataset": "fashion_mnist", "train_subset": None, "test_subset": None, "max_epochs": None,
    "calib_warmup_s": 5.0, "calib_s": 10.0, "safety": 1.15, "stop_margin_s": 3,
    "grace_s": 20,
    "memory_cell": "resnet110:55", "memory_batch": 1024, "memory_fit": [2, 4],
    "memory_methods": evidence_memory.CLASSIFICATION_METHODS, "detection_backbone": "resnet50",
    "detection_size": 600, "detection_batch": 16, "detection_fit": [1, 2],
    "detection_methods": evidence_memory.DETECTION_METHODS,
    "speed_cell": "resnet101:4", "speed_size": 224, "speed_batch": 128, "speed_split": "manpp", "speed_steps": 20,
    "speed_warmup": 3, "speed_methods": ["bp", "infopro+manpp", "dgl+manpp"], "speed_modes": ["eager", "compile"],
    "speed_amps": ["none", "bf16"], "compile_backend": "inductor",
}  # fmt: skip
TINY: dict[str, Any] = {
    **FULL,
    "budget_s": 170, "accuracy_s": 90, "memory_s": 35, "speed_s": 60, "batch_size": 8, "train_subset": 96,
    "test_subset": 64, "max_epochs": 2, "warmup_epochs": 0.2, "calib_warmup_s": 0.5, "calib_s": 1.0,
    "grace_s": 30, "memory_cell": "resnet20:4", "memory_batch": 8, "detection_size": 128,
    "detection_batch": 2, "speed_cell": "resnet18:4", "speed_size": 32, "speed_batch": 4, "speed_split": "even",
    "speed_steps": 2, "speed_warmup": 1, "compile_backend": "eager",
}  # fmt: skip
# CLI flag -> settings key, type, nargs (None = one value); every one defaults to the profile's value
OPTIONS = [
    ("--budget", "budget_s", float, None), ("--accuracy-s", "accuracy_s", float, None),
    ("--memory-s", "memory_s", float, None), ("--speed-s", "speed_s", float, None),
    ("--methods", "methods", str, "+"), ("--seeds", "seeds", int, "+"), ("--backbone", "backbone", str, None),
    ("--num-blocks", "k", int, None), ("--batch", "batch_size", int, None), ("--lr", "lr", float, None),
    ("--warmup-epochs", "warmup_epochs", float, None), ("--overrides", "overrides", str, "*"),
    ("--train-subset", "train_subset", int, None), ("--test-subset", "test_subset", int, None),
    ("--max-epochs", "max_epochs", int, None), ("--threads", "threads", int, None),
    ("--memory-cell", "memory_cell", str, None), ("--memory-batch", "memory_batch", int, None),
    ("--memory-methods", "memory_methods", str, "*"), ("--detection-size", "detection_size", int, None),
    ("--detection-batch", "detection_batch", int, None), ("--detection-methods", "detection_methods", str, "*"),
    ("--speed-cell", "speed_cell", str, None), ("--speed-size", "speed_size", int, None),
    ("--speed-batch", "speed_batch", int, None), ("--speed-split", "speed_split", str, None),
    ("--speed-steps", "speed_steps", int, None), ("--speed-warmup", "speed_warmup", int, None),
    ("--speed-methods", "speed_methods", str, "+"), ("--speed-modes", "speed_modes", str, "+"),
    ("--speed-amps", "speed_amps", str, "+"), ("--compile-backend", "compile_backend", str, None),
]  # fmt: skip
FILES = ("evidence.md", "accuracy.csv", "accuracy_epochs.csv", "memory.csv", "speed.csv", "evidence.log")


def add_arguments(p) -> None:
    p.add_argument(
        "--tiny", action="store_true", help="every part on the CPU at toy sizes, in a few minutes (CI)"
    )
    p.add_argument("--out", default="benchmarks/results/evidence", help="output folder (at most 8 files)")
    p.add_argument(
        "--data-root",
        default="data",
        help="holds fashion-mnist/*-ubyte.gz (else /usr/share/datasets/fashion-mnist)",
    )
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="the parts to run")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu (--tiny: cpu)")
    for flag, key, kind, nargs in OPTIONS:
        p.add_argument(flag, dest=key, type=kind, nargs=nargs, default=None, help=f"default: {FULL[key]!r} ({TINY[key]!r} with --tiny)")  # fmt: skip


def settings(args) -> dict[str, Any]:
    s = dict(TINY if args.tiny else FULL)
    s.update({key: getattr(args, key) for _, key, _, _ in OPTIONS if getattr(args, key) is not None})
    for key in ("train_subset", "test_subset"):
        s[key] = s[key] or None  # 0 = all
    device = "cpu" if args.tiny else args.device
    s["device"] = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    s["data_root"] = args.data_root
    return s


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu: {machine().split(',')[0]}"


def provenance(device: str) -> dict[str, str]:
    name = Path(sys.argv[0]).name
    prog = {"locallearn": "locallearn", "__main__.py": "python -m locallearn"}.get(
        name, f"python {sys.argv[0]}"
    )
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "date": datetime.datetime.now().isoformat(timespec="minutes"),
        "command": f"{prog} {' '.join(shlex.quote(a) for a in sys.argv[1:])}".strip(),
    }


def attempt(name: str, parts: dict, fn) -> Any:
    """Run one part; an exception is recorded as its status (and logged with its traceback), not raised."""
    t0 = time.time()
    try:
        result = fn()
        parts[name].update(status=result["status"], used_s=time.time() - t0)
        return result
    except Exception as e:
        log.error("evidence part %s failed:\n%s", name, traceback.format_exc())
        parts[name].update(status=f"failed: {type(e).__name__}: {e}", used_s=time.time() - t0)
        return None


def run(s: dict[str, Any], chosen: list[str], out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    log_file = out / "evidence.log"
    log_file.write_text("")
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s [main] %(name)s: %(message)s"))
    root = logging.getLogger("locallearn")
    root.addHandler(handler)
    threads = torch.get_num_threads()
    if s["device"] == "cpu":
        torch.set_num_threads(s["threads"])  # the runs' processes share the cores with this one
    t0 = time.time()
    parts = {p: {"part": p, "status": "skipped (--parts)", "used_s": None} for p in PARTS}
    budgets = {"accuracy": s["accuracy_s"], "memory": s["memory_s"], "speed": s["speed_s"]}
    for p in chosen:
        parts[p].update(budget_s=budgets[p], status="not reached")
    acc = mem = spd = None
    end = t0 + s["budget_s"] - s["reserve_s"]
    try:
        # one after the other: each part has the device to itself (the accuracy runs time their steps, and
        # the speed part times its own)
        if "accuracy" in chosen:
            acc = attempt(
                "accuracy", parts, lambda: evidence_accuracy.run(s, t0 + s["accuracy_s"], str(log_file))
            )
        if "memory" in chosen:
            deadline = min(time.time() + s["memory_s"], end)
            mem = attempt(
                "memory", parts, lambda: evidence_memory.run(s, deadline, torch.device(s["device"]))
            )
            if s["device"].startswith("cuda"):
                torch.cuda.empty_cache()  # the speed part's process needs the device's memory
        if "speed" in chosen:
            deadline = min(time.time() + s["speed_s"], end)
            spd = attempt("speed", parts, lambda: evidence_speed.run(s, deadline, s["device"], str(log_file)))
        md = write(s, out, parts, acc, mem, spd, time.time() - t0)
    finally:
        torch.set_num_threads(threads)
        root.removeHandler(handler)
        handler.close()
    return md


def write(s, out: Path, parts, acc, mem, spd, wall: float) -> str:
    prov = provenance(s["device"])
    stamp = list(prov)
    if acc:
        write_csv(
            out / "accuracy.csv",
            [{**r, **prov} for r in acc["rows"]],
            evidence_accuracy.METHOD_COLUMNS + stamp,
        )
        write_csv(out / "accuracy_epochs.csv", [{**r, **prov} for r in acc["history"]],
                  evidence_accuracy.EPOCH_COLUMNS + stamp)  # fmt: skip
    if mem:
        write_csv(out / "memory.csv", [{**r, **prov} for r in mem["rows"]], evidence_memory.COLUMNS + stamp)
    if spd:
        write_csv(out / "speed.csv", [{**r, **prov} for r in spd["rows"]], evidence_speed.COLUMNS + stamp)
    notes = [
        f"device: {prov['device']} (`{s['device']}`); cuDNN TF32 convolutions {torch.backends.cudnn.allow_tf32}, "
        f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}",
        f"budget {s['budget_s']:.0f} s: accuracy until {s['accuracy_s']:.0f} s, then memory for up to "
        f"{s['memory_s']:.0f} s, then speed for up to {s['speed_s']:.0f} s; wall time {wall:.0f} s",
    ]
    lines = header(
        "Evidence: MAN++ accuracy, peak memory and step time on one device", "per part", notes=notes
    )
    lines[2] = (
        f"- command: `{prov['command']}`"  # as typed (`python -m locallearn`, not its __main__.py path)
    )
    lines += ["## Parts", ""]
    lines += markdown_table(list(parts.values()), ["part", "budget_s", "used_s", "status"])
    lines.append("")
    if acc:
        lines += [*evidence_accuracy.report(acc, s), ""]
    if mem:
        lines += [*evidence_memory.report(mem, s), ""]
    if spd:
        lines += [*evidence_speed.report(spd, s, prov["device"]), ""]
    written = [f for f in FILES if (out / f).exists()]
    lines += [
        f"Files: {', '.join(f'`{f}`' for f in written)}; every CSV row carries device, torch, date, command."
    ]
    md = "\n".join(lines) + "\n"
    (out / "evidence.md").write_text(md)
    return md


def main(args) -> str:
    return run(settings(args), list(dict.fromkeys(args.parts)), Path(args.out))
