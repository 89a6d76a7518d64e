"""The public functional ops. Each is a torch.library custom op whose implementation
(Triton/CUDA or the reference) is chosen per call by ``_backend``."""

from .attention import attention
from .norms import layer_norm, rms_norm

__all__ = ["attention", "layer_norm", "rms_norm"]
