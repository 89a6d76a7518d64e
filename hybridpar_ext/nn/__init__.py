"""Drop-in modules: same constructor arguments and state_dict keys as their torch twins."""

from .norms import LayerNorm, RMSNorm

__all__ = ["LayerNorm", "RMSNorm"]
