"""Thin script over `locallearn bench pipeline` (the code lives in locallearn/bench/pipeline.py, so the
installed CLI has it too): `python benchmarks/pipeline.py --help`."""

import sys

from locallearn.cli import main

if __name__ == "__main__":
    main(["bench", "pipeline", *sys.argv[1:]])
