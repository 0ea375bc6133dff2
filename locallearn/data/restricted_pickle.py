"""Read a pickle that should hold only numpy arrays and plain values, running no code.

The official CIFAR batches are Python pickles. ``pickle.load`` calls whatever global a file names, so a
``data_batch_1`` handed over by someone else could run anything. These files name only numpy's array
and scalar rebuilders (``_reconstruct``, ``ndarray``, ``dtype``, ``scalar``; ``_frombuffer`` and
``_codecs.encode`` in pickles written by Python 3 at protocol 5 / 2). Every other global is refused
before it is looked up, so a payload fails with ``UnpicklingError`` and nothing of it runs.
"""

from __future__ import annotations

import pickle
from typing import Any, BinaryIO

import numpy as np

_CORE = "numpy._core" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core"

# (module, name) -> the module to import it from today (numpy 2 moved numpy.core to numpy._core)
ALLOWED = {
    **{(f"numpy.{core}.multiarray", "_reconstruct"): f"{_CORE}.multiarray" for core in ("core", "_core")},
    **{(f"numpy.{core}.multiarray", "scalar"): f"{_CORE}.multiarray" for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): f"{_CORE}.numeric" for core in ("core", "_core")},
    ("numpy", "ndarray"): "numpy",
    ("numpy", "dtype"): "numpy",
    ("_codecs", "encode"): "_codecs",  # bytes inside a protocol-2 pickle written by Python 3
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        where = ALLOWED.get((module, name))
        if where is None:
            raise pickle.UnpicklingError(
                f"it names {module}.{name}, which no dataset file holds (only numpy arrays are read; "
                "nothing in the file was run)"
            )
        return super().find_class(where, name)


def load(f: BinaryIO, encoding: str = "latin1") -> Any:
    """``pickle.load`` that builds numpy arrays, numbers, strings and containers, and nothing else."""
    return _Unpickler(f, encoding=encoding).load()
