"""Thin script over `locallearn bench speed` (the code lives in locallearn/bench/speed.py, so the installed CLI
has it too): `python benchmarks/speed.py --help`."""

import sys

from locallearn.cli import main

if __name__ == "__main__":
    main(["bench", "speed", *sys.argv[1:]])
