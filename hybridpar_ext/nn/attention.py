"""Attention modules on the fused op.

- :class:`Attention`: the attention of our transformer layer: fused QKV projection, GQA,
  optional RoPE, causal by default, padded or packed (varlen) batches.
- :class:`MultiheadAttention`: a drop-in for ``torch.nn.MultiheadAttention`` in the common
  training use; what the fused op cannot do goes to torch's implementation, with a warning.
"""

import warnings

import torch
import torch.nn.functional as F

from .. import ops
from ..ops.attention import MAX_HEAD_DIM, MIN_HEAD_DIM
from .rotary import apply_rotary, packed_positions, rotary_cos_sin


class Attention(torch.nn.Module):
    """Multi-head self-attention with grouped-query heads.

    Parameters: ``qkv`` (Linear ``dim -> (heads + 2 * kv_heads) * head_dim``, rows ordered
    q, k, v) and ``out_proj`` (Linear ``heads * head_dim -> dim``).

    ``forward(x, positions=None, cu_seqlens=None, max_seqlen=None)``: ``x`` is
    ``(batch, seqlen, dim)``, or ``(total_tokens, dim)`` packed with ``cu_seqlens``.
    ``positions`` (for RoPE) defaults to 0.. within each sequence.
    """

    def __init__(self, dim, num_heads, num_kv_heads=None, head_dim=None, bias=False, rope=True,
                 rope_theta=10000.0, causal=True, window=None, device=None, dtype=None):
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"Attention: num_heads ({num_heads}) must be a multiple of "
                             f"num_kv_heads ({num_kv_heads})")
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"Attention: dim ({dim}) must be divisible by num_heads "
                                 f"({num_heads}) unless head_dim is given")
            head_dim = dim // num_heads
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rope, self.rope_theta, self.causal, self.window = rope, rope_theta, causal, window
        factory = dict(device=device, dtype=dtype)
        self.qkv = torch.nn.Linear(dim, (num_heads + 2 * num_kv_heads) * head_dim, bias=bias, **factory)
        self.out_proj = torch.nn.Linear(num_heads * head_dim, dim, bias=bias, **factory)

    def forward(self, x, positions=None, cu_seqlens=None, max_seqlen=None):
        qkv = self.qkv(x)
        # Shapes from the projection, not from x: a sequence-parallel projection gathers the
        # sequence, so its output is longer than its input.
        lead = qkv.shape[:-1]
        q, k, v = qkv.split(
            [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
             self.num_kv_heads * self.head_dim], dim=-1)
        q = q.unflatten(-1, (self.num_heads, self.head_dim))
        k = k.unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim))
        if self.rope:
            if positions is None:
                positions = (packed_positions(cu_seqlens, qkv.shape[0]) if cu_seqlens is not None
                             else torch.arange(qkv.shape[-2], device=x.device))
            cos, sin = rotary_cos_sin(positions, self.head_dim, self.rope_theta, dtype=q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = ops.attention(q, k, v, causal=self.causal, window=self.window,
                            cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                            max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen)
        return self.out_proj(out.reshape(*lead, -1))


def _is_causal_mask(mask, length):
    """True if `mask` is the standard causal mask for a square (length, length) attention."""
    if mask.shape != (length, length):
        return False
    future = torch.ones(length, length, dtype=torch.bool, device=mask.device).triu(1)
    if mask.dtype == torch.bool:
        return bool(torch.equal(mask, future))
    return bool(torch.all(torch.isneginf(mask) == future) and torch.all(mask[~future] == 0))


class MultiheadAttention(torch.nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` on the fused op: same arguments, parameters and
    state_dict keys, so a model can swap it in and load its checkpoint.

    The fused path covers ``need_weights=False`` with no mask, or a causal mask
    (``is_causal=True``, or an ``attn_mask`` that is the causal mask), self- and
    cross-attention, ``batch_first`` either way, batched or unbatched ``(seq, embed)``
    inputs. Anything else (attention weights, padding or arbitrary masks, dropout while
    training, ``add_bias_kv``, ``add_zero_attn``) runs torch's implementation, with a warning
    saying why.
    """

    def _unsupported(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                     is_causal):
        if need_weights:
            return "need_weights=True (pass need_weights=False for the fused path)"
        if key_padding_mask is not None:
            return "key_padding_mask"
        if self.bias_k is not None or self.add_zero_attn:
            return "add_bias_kv / add_zero_attn"
        if self.dropout > 0 and self.training:
            return "attention dropout while training"
        if query.dim() not in (2, 3) or not query.dim() == key.dim() == value.dim():
            return "inputs that are not all (seq, embed) or all batched"
        if not MIN_HEAD_DIM <= self.head_dim <= MAX_HEAD_DIM:
            return f"head_dim {self.head_dim} outside [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]"
        seq_dim = 1 if self.batch_first and query.dim() == 3 else 0
        causal = is_causal or attn_mask is not None
        if causal and query.shape[seq_dim] != key.shape[seq_dim]:
            return "a causal mask with different query and key lengths"
        if attn_mask is not None and not _is_causal_mask(attn_mask, query.shape[seq_dim]):
            return "an attn_mask that is not the causal mask"
        return None

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        reason = self._unsupported(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   is_causal)
        if reason is not None:
            warnings.warn(f"hybridpar_ext.nn.MultiheadAttention: {reason} is not supported by "
                          f"the fused kernel; using torch's implementation", stacklevel=2)
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)
        self_attention = query is key and key is value
        # Unbatched (seq, embed) inputs are a batch of one.
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        heads, head_dim = self.num_heads, self.head_dim
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = (self.in_proj_bias.chunk(3) if self.in_proj_bias is not None
                         else (None, None, None))
        if self_attention and self._qkv_same_embed_dim:
            # Self-attention: one GEMM for q, k and v.
            q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:
            q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        out = ops.attention(q.unflatten(-1, (heads, head_dim)), k.unflatten(-1, (heads, head_dim)),
                            v.unflatten(-1, (heads, head_dim)),
                            causal=bool(is_causal or attn_mask is not None))
        out = self.out_proj(out.flatten(-2))
        if unbatched:
            return out.squeeze(0), None
        return (out if self.batch_first else out.transpose(0, 1)), None
