"""The data layer's error, in a leaf module: every dataset module raises it, and the registry
(``datasets.py``) imports those modules, so it cannot live in the registry."""


class DataError(RuntimeError):
    """A dataset is missing or unreadable."""
