"""The data layer's error, in a leaf module: every dataset module raises it, and the registry
(``datasets.py``) imports those modules, so it cannot live in the registry."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")


class DataError(RuntimeError):
    """A dataset is missing or unreadable."""


def from_workers(batches: Iterator[T]) -> Iterator[T]:
    """``batches`` of a ``DataLoader`` with worker processes, a worker's ``DataError`` re-raised with its
    own one-line message: torch re-raises it as ``DataError("Caught DataError in DataLoader worker
    process 0.\\nOriginal Traceback ...")``, a traceback the CLI would print as the error line."""
    try:
        yield from batches
    except DataError as e:
        text = str(e)
        if not text.startswith("Caught DataError"):
            raise
        last = text.rstrip().splitlines()[-1]  # "locallearn.data.errors.DataError: <message>"
        raise DataError(last.partition("DataError: ")[2] or last) from None
