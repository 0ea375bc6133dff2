"""Models named in a config: ``torchvision:NAME``, ``timm:NAME``, ``package.module:factory``."""

from __future__ import annotations

import contextvars
import inspect
import pkgutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import nn

from locallearn.backbones.graph_split import SplitError

PREFIXES = ("torchvision", "timm")


def is_spec(name: str) -> bool:
    """Whether a ``model.backbone`` value names a model from outside (``torchvision:resnet18``, ...)."""
    return ":" in name


def runs_code(name: str) -> bool:
    """Whether building ``name`` imports a module of the user's and calls it (``package.module:factory``).
    ``torchvision:`` / ``timm:`` names and the listed backbones only look a name up in a registry."""
    return is_spec(name) and name.partition(":")[0] not in PREFIXES


# The ``package.module:factory`` specs the user has named in this command (on its command line, with
# ``--trust-module``, or in Python with ``trust_modules``): a config read from a file someone handed
# over (a checkpoint) may build only these.
_TRUSTED: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
    "trusted_modules", default=frozenset()
)


@contextmanager
def trust_modules(specs: Iterable[str]) -> Iterator[None]:
    """Within this block, a checkpoint whose config names one of ``specs`` as ``model.backbone`` may
    build it (importing and calling that module's factory)."""
    token = _TRUSTED.set(_TRUSTED.get() | frozenset(specs))
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def untrusted(name: str) -> bool:
    """Whether a ``model.backbone`` read from a file would run code the user has not named."""
    return runs_code(name) and name not in _TRUSTED.get()


def _factory(spec: str):
    """The constructor ``spec`` names, called as ``make(**kw)``; ``SplitError`` if there is none."""
    prefix, _, rest = spec.partition(":")
    if prefix == "torchvision":
        import torchvision

        if rest not in torchvision.models.list_models():
            raise SplitError(
                f"model.backbone={spec}: torchvision has no model {rest!r} (torchvision.models.list_models())"
            )
        return lambda **kw: torchvision.models.get_model(rest, weights=None, **kw)
    if prefix == "timm":
        try:
            import timm
        except ImportError:
            raise SplitError(f"model.backbone={spec}: timm is not installed (pip install timm)") from None
        if not timm.is_model(rest):
            raise SplitError(f"model.backbone={spec}: timm has no model {rest!r} (timm.list_models())")
        return lambda **kw: timm.create_model(rest, **{"pretrained": False, **kw})
    try:
        factory = pkgutil.resolve_name(spec)
    except (ImportError, AttributeError, ValueError) as e:
        raise SplitError(
            f"model.backbone={spec}: cannot import it ({e}); write torchvision:NAME, timm:NAME or "
            "package.module:factory"
        ) from None
    if not callable(factory):
        raise SplitError(f"model.backbone={spec}: {rest!r} is not callable")
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    takes = "num_classes" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    if takes:
        return lambda **kw: factory(**kw)
    return lambda num_classes=None, **kw: factory(**kw)  # model.kwargs still go in


def check_spec(spec: str) -> None:
    """Raise ``SplitError`` unless ``spec`` names a model that can be built (nothing is built)."""
    _factory(spec)


def source_model(spec: str, num_classes: int | None = None, kwargs: dict | None = None) -> nn.Module:
    """Build the model ``spec`` names, untrained: ``torchvision:NAME`` (``weights=None``),
    ``timm:NAME`` (``pretrained=False``) or ``package.module:factory`` (called with
    ``num_classes=`` when it takes it), with ``kwargs`` (``model.kwargs``). Raises ``SplitError``
    with one line if it cannot, naming the factory and its exception when building fails."""
    kw = {**(kwargs or {}), **({} if num_classes is None else {"num_classes": num_classes})}
    make = _factory(spec)
    try:
        model = make(**kw)
    except Exception as e:  # the user's factory (or the library's constructor) failed: one line naming it
        first = (str(e).strip().splitlines() or [""])[0][:200]
        if kwargs and isinstance(e, TypeError):  # most likely an argument the constructor does not take
            raise SplitError(f"model.backbone={spec} with model.kwargs={kwargs}: {first}") from None
        raise SplitError(
            f"model.backbone={spec}: building the model raised {type(e).__name__}: {first}"
        ) from None
    if not isinstance(model, nn.Module):
        raise SplitError(
            f"model.backbone={spec}: the factory returned a {type(model).__name__}, not an nn.Module"
        )
    return model
