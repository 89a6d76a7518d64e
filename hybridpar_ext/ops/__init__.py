"""The public functional ops. Each is a torch.library custom op whose implementation
(Triton/CUDA or the reference) is chosen per call by ``_backend``."""

from .attention import attention
from .comm import GradBucketReducer, all_gather_matmul, matmul_reduce_scatter
from .norms import layer_norm, rms_norm

__all__ = ["GradBucketReducer", "all_gather_matmul", "attention", "layer_norm",
           "matmul_reduce_scatter", "rms_norm"]
