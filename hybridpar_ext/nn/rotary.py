"""Rotary position embeddings (RoPE), in the "rotate half" convention of LLaMA and of
Hugging Face's models: the first and second halves of each head form the pairs."""

import torch


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float = 10000.0,
                   dtype=torch.float32):
    """cos and sin of shape (*positions.shape, head_dim) for integer `positions`."""
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device,
                                             dtype=torch.float32) / head_dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates `x` (..., seqlen, heads, head_dim) by cos/sin (..., seqlen, head_dim)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return (x * cos + _rotate_half(x) * sin).to(x.dtype)


def packed_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Position of each token within its own sequence, for a packed batch."""
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), cu_seqlens.diff().long(),
                                     output_size=total)
    return torch.arange(total, device=cu_seqlens.device) - starts
