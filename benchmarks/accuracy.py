"""Thin script over `locallearn bench accuracy` (the code lives in locallearn/bench/accuracy.py, so the installed CLI
has it too): `python benchmarks/accuracy.py --help`."""

import sys

from locallearn.cli import main

if __name__ == "__main__":
    main(["bench", "accuracy", *sys.argv[1:]])
