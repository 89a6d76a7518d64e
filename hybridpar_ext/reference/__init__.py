"""Plain, obviously-correct PyTorch for every op: the CPU fallback and the tests' oracle."""

from . import attention, comm, norms

__all__ = ["attention", "comm", "norms"]
