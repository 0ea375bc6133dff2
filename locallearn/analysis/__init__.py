"""``locallearn analyze cka|gradcam|probe|curves RUN_DIR ...``: look at trained runs, never retrain.

An analysis is a module with ``add_arguments(parser)`` and ``main(args) -> str`` (the report the CLI
prints); each writes a PNG and the CSV it was drawn from into ``--out`` (default ``RUN_DIR/analysis``).
"""

from __future__ import annotations

import argparse

from locallearn.analysis import cka, curves, gradcam, probe

ANALYSES = {"cka": cka, "gradcam": gradcam, "probe": probe, "curves": curves}


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (config + checkpoint.pt)")
    p.add_argument("--out", help="directory for the PNG and CSV (default: FIRST_RUN_DIR/analysis)")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--data", metavar="ROOT", help="data.root to read the runs' dataset from (default: the runs')"
    )
