import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the norms and fallbacks compute and keep statistics in: fp32 for half and
    fp32 inputs, fp64 for fp64 (never less precise than the input)."""
    return torch.promote_types(dtype, torch.float32)
