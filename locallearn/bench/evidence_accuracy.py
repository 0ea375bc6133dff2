"""Part 1 of ``locallearn bench evidence``: a Table I proxy on Fashion-MNIST, every run at once on one device.

One process per (method, seed) (``evidence_worker.py``), all on the same device, the data held there. The runs build
their models, then time a few steps together; the slowest run's epoch time sets E, the one schedule every run
follows (cosine over E epochs), so that all finish inside the part's budget. A run still
going at the deadline stops after its current step, tests, and says how far it got.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import queue
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from locallearn.bench.common import markdown_table
from locallearn.bench.evidence_worker import save_data, worker

log = logging.getLogger(__name__)

METHODS = ["bp", "dgl", "dgl+manpp", "infopro", "infopro+manpp"]
BASES = {"dgl+manpp": "dgl", "infopro+manpp": "infopro"}
# MAN++ (TPAMI) Table I: CIFAR-10 test error (%), ResNet-32 K=16, 400 epochs at batch 1024
PAPER_TABLE_I = {"bp": 6.37, "dgl": 14.08, "dgl+manpp": 8.75, "infopro": 12.93, "infopro+manpp": 8.25}
# the pre-registered rule (docs/gpu.md), fixed before the kit first ran
MIN_EPOCHS, MIN_GAP, REPRODUCES, REFUTES = 5, 1.0, 0.35, 0.10
READY_SHARE = (
    0.6  # of the part's budget, at most, for the runs to start and build (all must be ready together)
)
CALIBRATE_SHARE = 0.5  # of what is left then, at most, for the timed steps
EPOCH_COLUMNS = ["method", "seed", "epoch", "test_error", "train_loss", "lr", "elapsed_s"]
METHOD_COLUMNS = ["method", "runs", "epochs_planned", "epochs_done", "test_error_mean", "test_error_std", "errors",
                  "status", "gap_closed", "paper_cifar10_error", "paper_gap_closed", "batch", "train_images",
                  "test_images", "step_ms_calibrated"]  # fmt: skip


def gap_closed(err: dict[str, float], method: str) -> float | None:
    base = BASES.get(method)
    if base not in err or "bp" not in err or method not in err or err[base] == err["bp"]:
        return None
    return (err[base] - err[method]) / (err[base] - err["bp"])


def plan_epochs(
    calibrations: list[dict], steps_per_epoch: int, seconds: float, cap: int | None, safety: float
) -> int:
    """Whole epochs that the slowest run fits into ``seconds`` (one train pass + one test pass each)."""
    per_epoch = max(c["step_s"] * steps_per_epoch + c["test_s"] for c in calibrations) * safety
    epochs = max(1, int(seconds // per_epoch))
    return min(epochs, cap) if cap else epochs


def verdict(errors: dict[str, list[float]], complete: bool, epochs: int) -> tuple[str, list[str]]:
    """The pre-registered reading (docs/gpu.md) of the final test errors per method (one per seed)."""
    why = []
    if not complete:
        why.append("not every run finished its planned schedule")
    if epochs < MIN_EPOCHS:
        why.append(f"E = {epochs} < {MIN_EPOCHS} epochs")
    mean = {m: statistics.mean(v) for m, v in errors.items() if v}
    lines, outcomes = [], []
    for method, base in BASES.items():
        if not all(m in mean for m in ("bp", base, method)):
            lines.append(f"- {method}: no verdict (a method has no result)")
            outcomes.append("none")
            continue
        gap, gain = mean[base] - mean["bp"], mean[base] - mean[method]
        spread = max(max(errors[m]) - min(errors[m]) for m in (base, method))
        closed = gain / gap if gap else math.nan
        text = f"gap {gap:.2f} pp, gain {gain:.2f} pp, gap_closed {closed:.2f}, seed spread {spread:.2f} pp"
        if why or gap < MIN_GAP:
            reason = "; ".join(why + ([f"gap {gap:.2f} < {MIN_GAP} pp"] if gap < MIN_GAP else []))
            outcome = "none"
            lines.append(f"- {method} vs {base}: {text} -> no verdict ({reason})")
        else:
            outcome = (
                "reproduces"
                if closed >= REPRODUCES and gain > spread
                else "refutes"
                if closed <= REFUTES
                else "weaker"
            )
            word = {"reproduces": "reproduces", "refutes": "refutes", "weaker": "weaker than claimed"}[
                outcome
            ]
            lines.append(f"- {method} vs {base}: {text} -> {word}")
        outcomes.append(outcome)
    if "none" in outcomes:
        overall = "no verdict"
    elif all(o == "reproduces" for o in outcomes):
        overall = "reproduced at this budget"
    elif all(o == "refutes" for o in outcomes):
        overall = "refuted at this budget"
    else:
        overall = "mixed"
    return overall, lines


def run(s: dict[str, Any], deadline: float, log_file: str | None) -> dict[str, Any]:
    part = AccuracyPart(s, deadline, log_file)
    try:
        return part.finish()
    finally:
        part.close()  # whatever happened, no run outlives the part (the next parts need the device)


class AccuracyPart:
    """Starts the runs at once (``__init__``), then calibrates, trains and collects them (``finish``)."""

    def __init__(self, s: dict[str, Any], deadline: float, log_file: str | None) -> None:
        self.s, self.deadline, self.t0 = s, deadline, time.time()
        self.folder = tempfile.mkdtemp(prefix="locallearn-evidence-data-")
        self.runs: dict[str, dict[str, Any]] = {}
        try:
            data_file = str(
                Path(self.folder) / "data.pt"
            )  # a missing data set fails here, before any process
            self.images = save_data(
                s["dataset"], s["data_root"], s["train_subset"], s["test_subset"], data_file
            )
            self.outbox = multiprocessing.get_context("spawn").Queue()
            self._start(s, deadline, data_file, log_file)
        except BaseException:
            self.close()
            raise
        log.info("accuracy: %d runs started on %s", len(self.runs), s["device"])

    def _start(self, s: dict[str, Any], deadline: float, data_file: str, log_file: str | None) -> None:
        ctx = multiprocessing.get_context("spawn")
        for method in s["methods"]:
            for seed in s["seeds"]:
                name = f"{method}-seed{seed}"
                spec = {
                    **{k: s[k] for k in ("backbone", "k", "batch_size", "lr", "warmup_epochs", "overrides", "threads",
                                         "device", "calib_warmup_s", "calib_s")},  # fmt: skip
                    "data_file": data_file,
                    "run": name, "method": method, "seed": seed, "log_file": log_file,
                    "wait_s": max(60.0, deadline - time.time()),
                }  # fmt: skip
                inbox = ctx.Queue()
                process = ctx.Process(target=worker, args=(spec, inbox, self.outbox), daemon=True, name=name)
                process.start()
                self.runs[name] = {"name": name, "method": method, "seed": seed, "inbox": inbox, "process": process,
                                   "state": "starting", "history": [], "status": "not started"}  # fmt: skip

    def close(self) -> None:
        for run in self.runs.values():
            if run["process"].is_alive():
                run["process"].kill()
                run["process"].join(timeout=5.0)
        shutil.rmtree(self.folder, ignore_errors=True)

    def _handle(self, msg: dict[str, Any]) -> None:
        run = self.runs[msg.pop("run")]
        kind = msg.pop("kind")
        if kind == "epoch":
            run["history"].append(msg)
            return
        run.update(msg)
        run["state"] = kind
        detail = {k: v for k, v in msg.items() if k in ("step_s", "test_s", "status", "error")}
        log.info("accuracy: %s %s after %.0f s %s", run["name"], kind, time.time() - self.t0, detail or "")
        if kind == "error":
            run["status"] = f"failed: {msg['error']}"

    def _wait(self, names: list[str], states: set[str], until: float) -> None:
        """Handle messages until every run in ``names`` is in one of ``states`` (or failed), or ``until``."""
        while True:
            pending = [n for n in names if self.runs[n]["state"] not in states | {"error"}]
            for n in pending:
                process = self.runs[n]["process"]
                if not process.is_alive() and self.outbox.empty():
                    self.runs[n].update(state="error", status=f"failed: process exited ({process.exitcode})")
            pending = [n for n in names if self.runs[n]["state"] not in states | {"error"}]
            if not pending or time.time() >= until:
                return
            try:
                self._handle(self.outbox.get(timeout=min(1.0, max(0.05, until - time.time()))))
            except queue.Empty:
                pass

    def finish(self) -> dict[str, Any]:
        s = self.s
        names = list(self.runs)
        # start-up and calibration get shares of the budget, not fixed times: a slow (shared) machine is slow
        # at everything, and a run that never gets ready must not take the others' time
        self._wait(names, {"ready"}, self.t0 + READY_SHARE * (self.deadline - self.t0))
        ready = [n for n in names if self.runs[n]["state"] == "ready"]
        for n in names:
            self.runs[n]["inbox"].put("calibrate" if n in ready else "stop")
        self._wait(ready, {"calibrated"}, time.time() + CALIBRATE_SHARE * (self.deadline - time.time()))
        go = [n for n in ready if self.runs[n]["state"] == "calibrated"]
        epochs = 0
        if go:
            calibrations = [self.runs[n] for n in go]
            steps = max(self.runs[n]["steps_per_epoch"] for n in go)
            stop_margin = 2 * max(c["test_s"] for c in calibrations) + s["stop_margin_s"]
            stop_at = self.deadline - stop_margin
            epochs = plan_epochs(calibrations, steps, stop_at - time.time(), s["max_epochs"], s["safety"])
            log.info("accuracy: %d runs calibrated; %d epochs until %.0f s from now", len(go), epochs,
                     stop_at - time.time())  # fmt: skip
            for n in go:
                self.runs[n]["status"] = "running"
                self.runs[n]["inbox"].put({"epochs": epochs, "deadline": stop_at})
        for n in names:
            if n not in go:
                self.runs[n]["inbox"].put("stop")
                if self.runs[n]["state"] != "error":
                    self.runs[n]["status"] = f"not trained (was '{self.runs[n]['state']}' at the budget)"
        self._wait(go, {"done"}, self.deadline + s["grace_s"])
        for n in names:
            run = self.runs[n]
            if n in go and run["state"] not in ("done", "error"):
                run["status"] = "killed at budget"
            run["process"].join(timeout=1.0)  # close() kills what did not exit by itself
        return self.results(epochs)

    def results(self, epochs: int) -> dict[str, Any]:
        s = self.s
        history = [
            {"method": r["method"], "seed": r["seed"], **h} for r in self.runs.values() for h in r["history"]
        ]
        per_run = []
        for name, r in self.runs.items():
            last = r["history"][-1] if r["history"] else {}
            per_run.append({"run": name, "method": r["method"], "seed": r["seed"], "status": r["status"],
                            "epochs_done": last.get("epoch"), "test_error": last.get("test_error"),
                            "step_ms_calibrated": 1e3 * r["step_s"] if "step_s" in r else None})  # fmt: skip
        finals = {m: [r["test_error"] for r in per_run if r["method"] == m and r["test_error"] is not None]
                  for m in s["methods"]}  # fmt: skip
        err = {m: statistics.mean(v) for m, v in finals.items() if v}
        images = self.images
        rows = []
        for m in s["methods"]:
            mine = [r for r in per_run if r["method"] == m]
            statuses = sorted({r["status"] for r in mine})
            steps = [r["step_ms_calibrated"] for r in mine if r["step_ms_calibrated"] is not None]
            done = [r["epochs_done"] for r in mine if r["epochs_done"] is not None]
            rows.append({
                "method": m, "runs": len(finals[m]), "epochs_planned": epochs, "epochs_done": min(done, default=None),
                "test_error_mean": err.get(m), "errors": " / ".join(f"{e:.2f}" for e in finals[m]),
                "test_error_std": statistics.stdev(finals[m]) if len(finals[m]) > 1 else None,
                "status": "; ".join(statuses), "gap_closed": gap_closed(err, m),
                "paper_cifar10_error": PAPER_TABLE_I.get(m), "paper_gap_closed": gap_closed(PAPER_TABLE_I, m),
                "batch": s["batch_size"], "train_images": images.get("train_images"),
                "test_images": images.get("test_images"), "step_ms_calibrated": max(steps, default=None),
            })  # fmt: skip
        complete = bool(per_run) and all(r["status"] == "finished" for r in per_run)
        overall, lines = verdict(finals, complete, epochs)
        all_finished = all(r["status"] == "finished" for r in per_run)
        status = f"{epochs} epochs, " + ("every run finished" if all_finished else "NOT every run finished")
        return {"rows": rows, "history": history, "per_run": per_run, "verdict": overall, "verdict_lines": lines,
                "epochs": epochs, "status": status}  # fmt: skip


def report(result: dict[str, Any], s: dict[str, Any]) -> list[str]:
    lines = [
        "## 1. Table I proxy: test error on Fashion-MNIST",
        "",
        f"- {s['backbone']} K={s['k']} (split even; bp K=1), batch {s['batch_size']}, SGD nesterov lr {s['lr']} "
        f"cosine over E = {result['epochs']} epochs ({s['warmup_epochs']} warm-up, at most E/4), weight decay 1e-4; "
        f"extra options {s['overrides'] or 'none'}; seeds {s['seeds']}; every run a process on {s['device']}, "
        "data held there; E = the whole epochs the slowest run fits into the budget, timed before training",
        f"- data: {s['dataset']} from data root `{s['data_root']}`, "
        f"{'all' if s['train_subset'] is None else s['train_subset']} training / "
        f"{'all' if s['test_subset'] is None else s['test_subset']} test images; pad 2 + crop + flip",
        "- gap_closed = (err_base - err_manpp) / (err_base - err_bp) on the means; paper columns: MAN++ Table I "
        "(CIFAR-10, ResNet-32 K=16, 400 epochs, batch 1024)",
        "",
    ]
    lines += markdown_table(result["rows"], ["method", "runs", "epochs_done", "test_error_mean", "test_error_std",
                                             "errors", "gap_closed", "paper_cifar10_error", "paper_gap_closed",
                                             "step_ms_calibrated", "status"])  # fmt: skip
    lines += [
        "",
        f"**Pre-registered reading (docs/gpu.md): {result['verdict']}**",
        "",
        *result["verdict_lines"],
        "",
    ]
    lines += ["Runs:", ""]
    lines += markdown_table(
        result["per_run"], ["run", "status", "epochs_done", "test_error", "step_ms_calibrated"]
    )
    return lines + ["", "Per epoch: `accuracy_epochs.csv`."]
