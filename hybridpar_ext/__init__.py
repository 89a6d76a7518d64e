"""hybridpar_ext: fused kernels and compute-overlapped communication for hybrid-parallel
transformer training, with a pure-PyTorch fallback for every op."""

import torch  # noqa: F401  (the extension links against torch's libraries)

from ._build import build_info, load_extension

_C = load_extension()

from . import nn, ops, reference  # noqa: E402

__version__ = "0.1.0"
__all__ = ["build_info", "nn", "ops", "reference"]
