"""Models named in a config: ``torchvision:NAME``, ``timm:NAME``, ``package.module:factory``."""

from __future__ import annotations

import inspect
import pkgutil

from torch import nn

from locallearn.backbones.graph_split import SplitError

PREFIXES = ("torchvision", "timm")


def is_spec(name: str) -> bool:
    """Whether a ``model.backbone`` value names a model from outside (``torchvision:resnet18``, ...)."""
    return ":" in name


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
        return lambda **kw: timm.create_model(rest, pretrained=False, **kw)
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
    return (lambda **kw: factory(**kw)) if takes else (lambda **kw: factory())


def check_spec(spec: str) -> None:
    """Raise ``SplitError`` unless ``spec`` names a model that can be built (nothing is built)."""
    _factory(spec)


def source_model(spec: str, num_classes: int | None = None) -> nn.Module:
    """Build the model ``spec`` names, untrained: ``torchvision:NAME`` (``weights=None``),
    ``timm:NAME`` (``pretrained=False``) or ``package.module:factory`` (called with
    ``num_classes=`` when it takes it). Raises ``SplitError`` with one line if it cannot."""
    make = _factory(spec)
    try:
        model = make(**({} if num_classes is None else {"num_classes": num_classes}))
    except Exception as e:  # the user's factory (or the library's constructor) failed: one line naming it
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise SplitError(
            f"model.backbone={spec}: building the model raised {type(e).__name__}: {first}"
        ) from None
    if not isinstance(model, nn.Module):
        raise SplitError(
            f"model.backbone={spec}: the factory returned a {type(model).__name__}, not an nn.Module"
        )
    return model
