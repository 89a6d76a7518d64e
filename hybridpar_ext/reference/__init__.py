"""Plain, obviously-correct PyTorch for every op: the CPU fallback and the tests' oracle."""

from . import norms

__all__ = ["norms"]
