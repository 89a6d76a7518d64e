import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the fallbacks compute in: fp32 for half inputs, fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)
