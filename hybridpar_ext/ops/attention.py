"""Fused attention as a torch.library custom op: ``hybridpar::attention`` (forward, returning
the output and the log-sum-exp) and ``hybridpar::attention_backward``, tied together by
``register_autograd``. The implementation is chosen per call by :mod:`._backend`: the Triton
kernels (``kernels/attention.py``) or the reference (``hybridpar_ext.reference.attention``).
"""

import math
from typing import Optional

import torch
from torch import Tensor

from ..reference import attention as ref
from . import _backend, _checks

ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)   # the kernels'
# float64 is accepted too and always runs the reference (exact float64 checks on a CPU).
_ACCEPTED_DTYPES = ATTENTION_DTYPES + (torch.float64,)
# Any head_dim up to 256: the kernels pad it to a block of at least 16 and mask the rest.
MIN_HEAD_DIM, MAX_HEAD_DIM = 1, 256


def _unit_stride(t: Tensor) -> Tensor:
    """The kernels take any strides but a unit one along head_dim."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _lse_shape(q: Tensor, varlen: bool):
    return (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])


@torch.library.custom_op("hybridpar::attention", mutates_args=())
def _attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Optional[Tensor],
               cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int,
               softmax_scale: float, causal: bool, window_left: int,
               window_right: int) -> tuple[Tensor, Tensor]:
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    if _backend.use_triton(q):
        return _backend.kernels("attention").attention_fwd(
            q, k, v, softmax_scale, causal, window_left, window_right,
            cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    out, lse = ref.attention_fwd(q, k, v, softmax_scale, causal, window_left, window_right,
                                 cu_seqlens_q, cu_seqlens_k)
    return out.contiguous(), lse.contiguous()


@_attention.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
      window_left, window_right):
    lse = q.new_empty(_lse_shape(q, cu_seqlens_q is not None), dtype=torch.promote_types(q.dtype, torch.float32))
    return q.new_empty(q.shape), lse


@torch.library.custom_op("hybridpar::attention_backward", mutates_args=())
def _attention_backward(dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor,
                        out: Tensor, lse: Tensor, cu_seqlens_q: Optional[Tensor],
                        cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int,
                        softmax_scale: float, causal: bool, window_left: int,
                        window_right: int) -> tuple[Tensor, Tensor, Tensor]:
    dout, q, k, v = _unit_stride(dout), _unit_stride(q), _unit_stride(k), _unit_stride(v)
    # dlse: a gradient reaching the log-sum-exp (ring attention merges partial results
    # through it); both implementations fold it into rowsum(dO * O).
    if _backend.use_triton(q):
        dq, dk, dv = _backend.kernels("attention").attention_bwd(
            dout, q, k, v, out, lse, softmax_scale, causal, window_left, window_right,
            cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dlse=dlse)
    else:
        dq, dk, dv = ref.attention_bwd(dout, q, k, v, out, lse, softmax_scale, causal,
                                       window_left, window_right, cu_seqlens_q, cu_seqlens_k,
                                       dlse=dlse)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_attention_backward.register_fake
def _(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
      softmax_scale, causal, window_left, window_right):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, left, right = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.args = (max_q, max_k, scale, causal, left, right)


def _attention_grad(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = torch.ops.hybridpar.attention_backward(
        dout, dlse, q, k, v, out, lse, cu_q, cu_k, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None, None


_attention.register_autograd(_attention_grad, setup_context=_attention_setup)


# ---------------------------------------------------------------------------- public

def _check_cu_seqlens(name, cu, total, device, check_values):
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"attention: {name} must be int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"attention: {name} must be 1-D with at least 2 entries (batch + 1), "
                         f"got shape {tuple(cu.shape)}")
    _checks.check_same_device("attention", name, cu, device)
    if not check_values:
        return None
    values = cu.tolist()
    if values[0] != 0:
        raise ValueError(f"attention: {name} must start at 0, got {values[0]}")
    lengths = [b - a for a, b in zip(values, values[1:])]
    if min(lengths) < 0:
        raise ValueError(f"attention: {name} must be non-decreasing, got {values}")
    if values[-1] != total:
        raise ValueError(f"attention: {name} must end at the number of tokens ({total}), "
                         f"got {values[-1]}")
    return max(lengths)


def _check_max_seqlen(name, given, actual):
    if given is None:
        if actual is None:
            raise ValueError(f"attention: pass {name} with cu_seqlens under torch.compile")
        return actual
    if not isinstance(given, int) or given < 0:
        raise ValueError(f"attention: {name} must be a non-negative int, got {given!r}")
    if actual is not None and given < actual:
        raise ValueError(f"attention: {name}={given} is less than the longest sequence ({actual})")
    return given


def _check_window(window):
    if window is None:
        return -1, -1
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"attention: window must be (left, right) or None, got {window!r}")
    sides = []
    for side, value in zip(("left", "right"), window):
        if value is None:
            sides.append(-1)
        elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"attention: window {side} size must be a non-negative int or "
                             f"None (unlimited), got {value!r}")
        else:
            sides.append(value)
    return tuple(sides)


def _check_attention_args(q, k, v, softmax_scale, window, cu_seqlens_q, cu_seqlens_k,
                          max_seqlen_q, max_seqlen_k):
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.check_tensor("attention", name, t, _ACCEPTED_DTYPES)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k and v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, t in (("k", k), ("v", v)):
        _checks.check_same_device("attention", name, t, q.device)
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    if varlen and (cu_seqlens_q is None or cu_seqlens_k is None):
        raise ValueError("attention: cu_seqlens_q and cu_seqlens_k must be given together")
    rank = 3 if varlen else 4
    layout = "(total_tokens, heads, head_dim)" if varlen else "(batch, seqlen, heads, head_dim)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != rank:
            raise ValueError(f"attention: {name} must be {layout}, got shape {tuple(t.shape)}")
    if not varlen and not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"attention: q, k and v must have one batch size, got "
                         f"{q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"attention: k and v must have the same (tokens, heads), got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    head_dim = q.shape[-1]
    if not (k.shape[-1] == v.shape[-1] == head_dim):
        raise ValueError(f"attention: q, k and v must have one head_dim, got "
                         f"{q.shape[-1]}, {k.shape[-1]}, {v.shape[-1]}")
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"attention: head_dim must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {head_dim}")
    n_heads, n_kv = q.shape[-2], k.shape[-2]
    if n_kv == 0 or n_heads % n_kv:
        raise ValueError(f"attention: the number of q heads ({n_heads}) must be a multiple of "
                         f"the number of k/v heads ({n_kv})")
    if softmax_scale is not None and (isinstance(softmax_scale, bool) or
                                      not isinstance(softmax_scale, (int, float)) or
                                      not math.isfinite(softmax_scale) or softmax_scale <= 0):
        raise ValueError(f"attention: softmax_scale must be a positive number, got {softmax_scale!r}")
    left, right = _check_window(window)

    if not varlen:
        return left, right, q.shape[1], k.shape[1]
    check_values = not torch.compiler.is_compiling()
    longest_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device, check_values)
    longest_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device, check_values)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"attention: cu_seqlens_q and cu_seqlens_k must have the same length "
                         f"(batch + 1), got {cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
    return (left, right, _check_max_seqlen("max_seqlen_q", max_seqlen_q, longest_q),
            _check_max_seqlen("max_seqlen_k", max_seqlen_k, longest_k))


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False,
              softmax_scale: Optional[float] = None, window=None,
              cu_seqlens_q: Optional[Tensor] = None, cu_seqlens_k: Optional[Tensor] = None,
              max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
              return_lse: bool = False):
    """Scaled dot-product attention, FlashAttention-style (flash-attn's layout and masking).

    ``q``: ``(batch, seqlen_q, heads, head_dim)``; ``k``, ``v``: ``(batch, seqlen_k, kv_heads,
    head_dim)`` with ``heads`` a multiple of ``kv_heads`` (GQA/MQA). Only the last dimension
    needs stride 1. Packed batches: ``(total_tokens, heads, head_dim)`` with int32
    ``cu_seqlens_q``/``cu_seqlens_k`` (offsets of each sequence, starting at 0) and,
    optionally, ``max_seqlen_q``/``max_seqlen_k`` (computed from cu_seqlens when omitted).

    ``causal`` masks the future, aligned to the bottom right when seqlen_q != seqlen_k;
    ``window=(left, right)`` limits each query to keys within that many positions (None on a
    side: unlimited). ``softmax_scale`` defaults to ``1/sqrt(head_dim)``. A query that sees no
    key gets output 0. Returns the output (like q), and with ``return_lse`` also the fp32 (fp64
    for fp64 inputs, which run the reference) log-sum-exp of each row: ``(batch, heads, seqlen_q)``, or ``(heads, total_q)`` packed.
    """
    left, right, max_q, max_k = _check_attention_args(
        q, k, v, softmax_scale, window, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out, lse = torch.ops.hybridpar.attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k,
                                             scale, bool(causal), left, right)
    return (out, lse) if return_lse else out
