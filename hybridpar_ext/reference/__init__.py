"""Plain, obviously-correct PyTorch for every op: the CPU fallback and the tests' oracle."""

from . import attention, norms

__all__ = ["attention", "norms"]
