"""Drop-in modules: same constructor arguments and state_dict keys as their torch twins."""

from .attention import Attention, MultiheadAttention
from .huggingface import register_hf_attention
from .norms import LayerNorm, RMSNorm
from .patch import apply_kernels
from .rotary import apply_rotary, rotary_cos_sin
from .transformer import MLP, TransformerLayer, make_norm

__all__ = ["Attention", "LayerNorm", "MLP", "MultiheadAttention", "RMSNorm", "TransformerLayer",
           "apply_kernels", "apply_rotary", "make_norm", "register_hf_attention", "rotary_cos_sin"]
