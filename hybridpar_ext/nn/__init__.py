"""Drop-in modules: same constructor arguments and state_dict keys as their torch twins."""

from .attention import Attention, MultiheadAttention
from .huggingface import register_hf_attention
from .norms import LayerNorm, RMSNorm
from .rotary import apply_rotary, rotary_cos_sin

__all__ = ["Attention", "LayerNorm", "MultiheadAttention", "RMSNorm", "apply_rotary",
           "register_hf_attention", "rotary_cos_sin"]
