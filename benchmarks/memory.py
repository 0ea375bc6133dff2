"""Thin script over `locallearn bench memory` (the code lives in locallearn/bench/memory.py, so the installed CLI
has it too): `python benchmarks/memory.py --help`."""

import sys

from locallearn.cli import main

if __name__ == "__main__":
    main(["bench", "memory", *sys.argv[1:]])
