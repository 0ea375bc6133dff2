"""Thin script over `locallearn bench evidence` (the code lives in locallearn/bench/evidence.py, so the installed CLI
has it too): `python benchmarks/evidence.py --help`; the GPU command is in docs/gpu.md."""

import sys

from locallearn.cli import main

if __name__ == "__main__":
    main(["bench", "evidence", *sys.argv[1:]])
