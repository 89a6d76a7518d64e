"""Scaled dot-product attention, plainly.

- :func:`attention`: the definition (scores, mask, softmax, weighted sum), differentiated
  by autograd. The tests run it in float64 as the oracle.
- :func:`attention_fwd` / :func:`attention_bwd`: the CPU fallback behind the custom op,
  the same math with the explicit backward the Triton kernel implements (probabilities
  recomputed from the log-sum-exp), in fp32 (fp64 for fp64 inputs).

Masking follows flash-attention: with ``off = seqlen_k - seqlen_q``, query i sees key j
iff ``-left <= j - i - off <= right``; ``causal`` means ``right = 0`` (the mask is aligned to
the bottom right). ``left``/``right`` of -1 mean unlimited. A query that sees no key gets
output 0 and log-sum-exp -inf.

Layouts: padded ``(batch, seqlen, heads, head_dim)``, or packed ``(total, heads, head_dim)``
with ``cu_seqlens`` (int32 offsets of each sequence, starting at 0).
"""

import math

import torch

from ._dtypes import acc_dtype


def visible_mask(seqlen_q, seqlen_k, causal=False, left=-1, right=-1, device=None):
    """Boolean (seqlen_q, seqlen_k): True where query i may attend key j."""
    i = torch.arange(seqlen_q, device=device)[:, None]
    j = torch.arange(seqlen_k, device=device)[None, :]
    rel = j - i - (seqlen_k - seqlen_q)
    if causal:
        right = 0 if right < 0 else min(right, 0)
    mask = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if left >= 0:
        mask &= rel >= -left
    if right >= 0:
        mask &= rel <= right
    return mask


def _window_sides(window):
    if window is None:
        return -1, -1
    left, right = window
    return (-1 if left is None else left), (-1 if right is None else right)


def _sequences(cu_seqlens_q, cu_seqlens_k, batch):
    """(query index, key index) of each sequence: a batch row, or a token range if packed."""
    if cu_seqlens_q is None:
        return [(b, b) for b in range(batch)]
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return [(slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])) for b in range(len(cq) - 1)]


def _heads_first(t):
    """(seqlen, heads, d) -> (heads, seqlen, d)."""
    return t.transpose(0, 1)


def _expand_kv(t, n_heads):
    """(kv_heads, s, d) -> (heads, s, d): each kv head serves n_heads // kv_heads query heads."""
    return t.repeat_interleave(n_heads // t.shape[0], dim=0)


def _scores(q, k, scale, causal, left, right):
    """Masked scores (heads, s_q, s_k), -inf where hidden, and the visibility mask."""
    s = (q @ _expand_kv(k, q.shape[0]).transpose(-1, -2)) * scale
    mask = visible_mask(q.shape[1], k.shape[1], causal, left, right, device=q.device)
    return s.masked_fill(~mask, float("-inf")), mask


def attention(q, k, v, causal=False, softmax_scale=None, window=None, cu_seqlens_q=None,
              cu_seqlens_k=None, return_lse=False):
    """The definition, in the dtype of the inputs; differentiable by autograd."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    left, right = _window_sides(window)
    outs, lses = [], []
    for qi, ki in _sequences(cu_seqlens_q, cu_seqlens_k, q.shape[0]):
        qs, ks, vs = _heads_first(q[qi]), _heads_first(k[ki]), _heads_first(v[ki])
        s, mask = _scores(qs, ks, scale, causal, left, right)
        seen = mask.any(-1, keepdim=True)
        # Rows that see no key would be softmax of all -inf (NaN): give them 0 instead.
        p = torch.softmax(s.masked_fill(~seen, 0.0), dim=-1) * seen
        outs.append(_heads_first(p @ _expand_kv(vs, qs.shape[0])))
        lses.append(torch.logsumexp(s, dim=-1))
    if cu_seqlens_q is None:
        out, lse = torch.stack(outs), torch.stack(lses)
    else:
        out, lse = torch.cat(outs), torch.cat(lses, dim=1)
    return (out, lse) if return_lse else out


def attention_fwd(q, k, v, softmax_scale, causal=False, window_left=-1, window_right=-1,
                  cu_seqlens_q=None, cu_seqlens_k=None):
    """The fallback forward: ``(out, lse)`` with out in q's dtype and lse fp32 (fp64 for fp64
    inputs, so that their backward recomputes the probabilities exactly)."""
    acc = acc_dtype(q.dtype)
    out, lse = attention(q.to(acc), k.to(acc), v.to(acc), causal, softmax_scale,
                         (window_left, window_right), cu_seqlens_q, cu_seqlens_k, return_lse=True)
    return out.to(q.dtype), lse.to(acc)


def attention_bwd(dout, q, k, v, out, lse, softmax_scale, causal=False, window_left=-1,
                  window_right=-1, cu_seqlens_q=None, cu_seqlens_k=None, dlse=None):
    """The fallback backward: ``(dq, dk, dv)``, probabilities recomputed from lse.

    ``dlse`` (optional) is the gradient of the log-sum-exp output: since
    ``d lse_i / d s_ij = p_ij``, it enters as ``dS = P * (dP - (rowsum(dO * O) - dlse))``.
    """
    acc = acc_dtype(q.dtype)
    dtypes = q.dtype, k.dtype, v.dtype
    q, k, v, out, dout, lse = (t.to(acc) for t in (q, k, v, out, dout, lse))
    dlse = torch.zeros_like(lse) if dlse is None else dlse.to(acc)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    n_heads, n_kv = q.shape[-2], k.shape[-2]
    for qi, ki in _sequences(cu_seqlens_q, cu_seqlens_k, q.shape[0]):
        qs, ks, vs = _heads_first(q[qi]), _heads_first(k[ki]), _heads_first(v[ki])
        dos, os_ = _heads_first(dout[qi]), _heads_first(out[qi])
        row_lse = lse[qi] if cu_seqlens_q is None else lse[:, qi]
        row_dlse = dlse[qi] if cu_seqlens_q is None else dlse[:, qi]
        s, _ = _scores(qs, ks, softmax_scale, causal, window_left, window_right)
        # exp(s - lse); rows that see no key (lse = -inf) get probability 0 everywhere.
        p = torch.exp(s - row_lse.masked_fill(row_lse == float("-inf"), float("inf"))[..., None])
        dp = dos @ _expand_kv(vs, n_heads).transpose(-1, -2)
        ds = p * (dp - ((dos * os_).sum(-1) - row_dlse)[..., None])
        dq[qi] = _heads_first(ds @ _expand_kv(ks, n_heads)) * softmax_scale
        # A shared kv head's gradient sums those of the query heads in its group.
        dk_s = (ds.transpose(-1, -2) @ qs).unflatten(0, (n_kv, -1)).sum(1) * softmax_scale
        dv_s = (p.transpose(-1, -2) @ dos).unflatten(0, (n_kv, -1)).sum(1)
        dk[ki], dv[ki] = _heads_first(dk_s), _heads_first(dv_s)
    return tuple(g.to(dt) for g, dt in zip((dq, dk, dv), dtypes))
