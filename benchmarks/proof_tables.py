"""The learning proofs' tables, generated from what the proof tests print (issue 27.5), not typed in.

Every proof test prints one ``PROOF {json}`` line per case and seed (``tests/proof_report.py``). This
script runs the given tests with ``pytest -s`` (slow ones included), or reads saved output, and:

1. merges the PROOF records into ``benchmarks/results/proofs.jsonl`` (one per task, case and seed; a new
   record replaces the old one, so tasks measured by separate runs sit side by side, and it says how far
   each number moved);
2. writes ``benchmarks/results/proofs.md`` (one table per task: case, metric, each seed's value, the
   frozen-blocks control, the bar, the margin) and ``proofs_<task>.md`` (that task's table alone);
3. fills every ``<!-- results:proofs... -->`` block of README.md and docs/*.md with them, through
   ``benchmarks/update_readme.py`` (the same markers as the benchmark tables).

    python benchmarks/proof_tables.py tests/tasks/test_scenes_learns.py tests/tasks/test_sr_learns.py
    python benchmarks/proof_tables.py --from-log pytest_output.txt
    python benchmarks/proof_tables.py               # only re-render from proofs.jsonl
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # ``tests`` and ``benchmarks`` as packages

from benchmarks import update_readme  # noqa: E402
from tests.proof_report import parse  # noqa: E402

STORE = "proofs.jsonl"  # in update_readme.RESULTS (looked up when used: the tests point it elsewhere)
TASKS = ("classification", "detection", "segmentation", "super_resolution")  # table order; others follow
SEEDS = (0, 1)  # always shown as columns (the two seeds); others get a column when measured
COMMAND = "python benchmarks/proof_tables.py"


def key(record: dict) -> tuple:
    return record["task"], record["case"], record["seed"]


def run_tests(tests: list[str], log: Path | None) -> str:
    """``pytest -s`` over ``tests`` (slow tests too), echoed as it runs; the output's text."""
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-s",
        "-q",
        "-p",
        "no:cacheprovider",
        "-m",
        "slow or not slow",
        *tests,
    ]
    print("running:", " ".join(cmd), flush=True)
    proc = subprocess.Popen(
        cmd, cwd=update_readme.ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    for line in proc.stdout:
        sys.stdout.write(line)
        lines.append(line)
    proc.wait()
    text = "".join(lines)
    if log is not None:
        log.write_text(text)
    if proc.returncode not in (0, 1):  # 1: some test failed, whose PROOF line still counts
        raise SystemExit(f"proof_tables: pytest exited {proc.returncode}")
    return text


def load_store() -> dict[tuple, dict]:
    path = update_readme.RESULTS / STORE
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {key(r): r for r in records}


def merge(store: dict[tuple, dict], records: list[dict]) -> list[str]:
    """Put ``records`` into ``store``; a line per number that moved (old -> new)."""
    moved = []
    for r in records:
        old = store.get(key(r))
        if old is not None and old.get("value") != r.get("value"):
            moved.append(f"{r['task']} {r['case']} seed {r['seed']}: {old.get('value')} -> {r.get('value')}")
        store[key(r)] = r
    return moved


def number(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def distinct(by_seed: dict[int, dict], field: str) -> str:
    """A setting of the test (bar, margin) as its seeds printed it: one value, or each distinct one in seed
    order where a seed ran under another (an earlier version of the test)."""
    values = list(dict.fromkeys(r.get(field) for _, r in sorted(by_seed.items())))
    return " / ".join("—" if v is None else f"{v:g}" for v in values)


def blocks(record: dict) -> str:
    """Each block's own score (its aux's; the last is the head's), and at init where printed."""
    if not record.get("blocks"):
        return "—"
    init = record.get("blocks_at_init")
    return record["blocks"] + (f" ({init})" if init else "")


def table(records: list[dict]) -> str:
    """One task's table: a row per case, in the order the cases were first printed."""
    seeds = sorted({*SEEDS, *(r["seed"] for r in records)})
    cases: dict[str, dict[int, dict]] = {}
    for r in records:
        cases.setdefault(r["case"], {})[r["seed"]] = r
    head = [
        "case",
        "metric",
        *(f"seed {s}" for s in seeds),
        "frozen control",
        "bar",
        "margin",
        "at init",
        "steps",
        "per block, lowest seed (at init)",
    ]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case, by_seed in cases.items():
        first = by_seed[min(by_seed)]
        digits = 2 if first["metric"].endswith("dB") else 1
        frozen = [by_seed[s].get("frozen") for s in seeds if s in by_seed]
        inits = [by_seed[s].get("at_init") for s in seeds if s in by_seed]
        cells = [
            f"`{case}`",
            first["metric"],
            *(number(by_seed[s]["value"], digits) if s in by_seed else "—" for s in seeds),
            " / ".join(number(v, digits) for v in frozen) if any(v is not None for v in frozen) else "—",
            ">= " + distinct(by_seed, "bar"),
            distinct(by_seed, "margin"),
            " / ".join(number(v, digits) for v in inits) if any(v is not None for v in inits) else "—",
            str(first.get("steps", "—")),
            blocks(first),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


NOTE = (
    "Values are each seed's held-out score after training; frozen control: the same run with the early blocks "
    "at init (per seed, `/`-separated); the test asserts the value >= bar and, where a margin is given, "
    "value >= frozen control + margin; per block: each block's own score (its aux's; `-`: its aux predicts "
    "nothing to score; the last is the head's). Generated by `{command}` from the tests' `PROOF` lines.\n"
)


def write(store: dict[tuple, dict]) -> list[str]:
    """proofs.md and proofs_<task>.md from ``store``; the names written."""
    tasks = sorted({t for t, _, _ in store}, key=lambda t: (TASKS.index(t) if t in TASKS else len(TASKS), t))
    by_task = {t: [r for k, r in store.items() if k[0] == t] for t in tasks}
    note = NOTE.format(command=COMMAND)
    parts = ["# Learning proofs\n", note]
    names = []
    for t in tasks:
        parts += [f"## {t}\n", table(by_task[t])]
        (update_readme.RESULTS / f"proofs_{t}.md").write_text(note + "\n" + table(by_task[t]))
        names.append(f"proofs_{t}.md")
    (update_readme.RESULTS / "proofs.md").write_text("\n".join(parts))
    (update_readme.RESULTS / STORE).write_text(
        "".join(json.dumps(store[k], sort_keys=True) + "\n" for k in store)
    )
    return ["proofs.md", *names]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tests", nargs="*", help="pytest paths / node ids whose PROOF lines to collect")
    ap.add_argument("--from-log", action="append", default=[], type=Path, help="saved pytest -s output")
    ap.add_argument("--log", type=Path, help="save the tests' output here")
    args = ap.parse_args(argv)
    records = []
    for path in args.from_log:
        if not path.is_file():
            raise SystemExit(f"proof_tables: {path} does not exist")
        records += parse(path.read_text())
    if args.tests:
        records += parse(run_tests(args.tests, args.log))
    if (args.tests or args.from_log) and not records:
        raise SystemExit("proof_tables: no PROOF line found (were the tests run with -s?)")
    store = load_store()
    for line in merge(store, records):
        print("moved:", line)
    written = write(store)
    print(f"{len(records)} PROOF record(s) read; wrote {', '.join(written)}")
    return update_readme.main()


if __name__ == "__main__":
    sys.exit(main())
