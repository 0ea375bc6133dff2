"""locallearn: supervised local learning (DGL, InfoPro, MAN, MAN++, ...) for vision backbones."""

__version__ = "0.1.0"
