"""Reference models built from :mod:`hybridpar_ext.nn`, free of parallel plumbing."""

from .gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
