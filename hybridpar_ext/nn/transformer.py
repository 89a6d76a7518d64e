"""The pre-norm transformer block of our GPT, in plain PyTorch on the fused ops.

The residual add is fused into the next norm: a block takes and returns ``(x, residual)``,
and ``norm(x, residual)`` computes ``h = x + residual`` and ``norm(h)`` in one kernel. The
parallel twins in :mod:`hybridpar_ext.parallel` subclass these and swap in sharded
projections; the math (and the state_dict keys) stay the same.
"""

import torch
import torch.nn.functional as F

from .attention import Attention
from .norms import LayerNorm, RMSNorm

NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "swiglu")


def make_norm(kind: str, hidden: int, eps: float = 1e-5, **factory):
    if kind not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")
    return (RMSNorm if kind == "rmsnorm" else LayerNorm)(hidden, eps=eps, **factory)


class MLP(torch.nn.Module):
    """GELU: ``fc2(gelu(fc1(x)))``. SwiGLU: ``fc2(silu(gate) * up)`` with ``fc1`` producing
    ``[gate; up]`` stacked on its output dimension."""

    def __init__(self, hidden, ffn, activation="gelu", device=None, dtype=None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"MLP: activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.swiglu = activation == "swiglu"
        factory = dict(device=device, dtype=dtype)
        self.fc1 = torch.nn.Linear(hidden, 2 * ffn if self.swiglu else ffn, bias=False, **factory)
        self.fc2 = torch.nn.Linear(ffn, hidden, bias=False, **factory)

    def forward(self, x):
        h = self.fc1(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            return self.fc2(F.silu(gate) * up)
        return self.fc2(F.gelu(h, approximate="tanh"))


class TransformerLayer(torch.nn.Module):
    """``norm1 -> attn -> (+ residual) norm2 -> mlp``, causal, RoPE, GQA.

    ``forward(x, residual=None) -> (mlp_out, residual)``; the block's output is their sum.
    ``attn`` and ``mlp`` may be given ready-made (the parallel layers pass sharded ones).
    """

    def __init__(self, hidden, heads, kv_heads=None, ffn=None, norm="layernorm", activation="gelu",
                 rope_theta=10000.0, norm_eps=1e-5, attn=None, mlp=None, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.norm1 = make_norm(norm, hidden, norm_eps, **factory)
        self.attn = attn if attn is not None else Attention(
            hidden, heads, kv_heads, bias=False, rope=True, rope_theta=rope_theta, causal=True, **factory)
        self.norm2 = make_norm(norm, hidden, norm_eps, **factory)
        self.mlp = mlp if mlp is not None else MLP(hidden, ffn or 4 * hidden, activation, **factory)

    def forward(self, x, residual=None):
        if residual is None:
            y, residual = self.norm1(x), x
        else:
            y, residual = self.norm1(x, residual)
        y, residual = self.norm2(self.attn(y), residual)
        return self.mlp(y), residual
