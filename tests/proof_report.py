"""One line per learning-proof result, printed by every proof test (``pytest -s``) and read back by
``benchmarks/proof_tables.py``, so that the tables in README.md and docs/*.md are generated from what the
tests measured instead of typed in (issue 27.5)."""

from __future__ import annotations

import json
import math

PREFIX = "PROOF "


def report(
    task: str, case: str, seed: int, metric: str, value: float, bar: float, **extra: float | str | None
) -> str:
    """Print and return ``PROOF {json}``. ``extra`` carries the case's other numbers, e.g. ``frozen`` (the same run
    with the early blocks frozen), ``margin`` (how far below ``value`` the frozen run must stay), ``at_init``,
    ``steps``, ``blocks`` (per-block metrics as a string)."""
    fields = {"task": task, "case": case, "seed": seed, "metric": metric, "value": value, "bar": bar, **extra}
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in fields.items()}
    line = PREFIX + json.dumps(clean, sort_keys=True)
    print(line, flush=True)
    return line


def parse(text: str) -> list[dict]:
    """Every PROOF record in ``text`` (pytest's captured output, a log), in order."""
    return [
        json.loads(line[line.index(PREFIX) + len(PREFIX) :]) for line in text.splitlines() if PREFIX in line
    ]
