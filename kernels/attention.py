"""FlashAttention-2-style attention in Triton: forward and backward.

Features: causal masking aligned to the bottom right (seqlen_q != seqlen_k), sliding
windows ``(left, right)``, grouped-query / multi-query attention, variable-length packed
batches (``cu_seqlens``), head dims 16..256 (any, padded to a power of two inside the
kernel), fp16/bf16/fp32 inputs with fp32 statistics.

Masking, for query row i and key column j of one sequence (``off = seqlen_k - seqlen_q``):
key j is visible iff ``-left <= j - i - off <= right``. Causal is ``right = 0``; an unlimited
side is a huge number. Key blocks are visited in three ranges: masked blocks at the left
edge, blocks every row of the query block sees in full (no mask arithmetic), masked blocks
at the right edge (the causal diagonal); blocks no row sees are never visited.

Layout: q/k/v are addressed as ``base + b * stride_b + (seq_start + t) * stride_t +
h * stride_h + d``. Padded batches have ``seq_start = 0``; packed (varlen) batches have
``stride_b = 0`` and ``seq_start = cu_seqlens[b]``. Only the last dimension needs stride 1.

The backward recomputes probabilities from the log-sum-exp: a preprocessing kernel forms
``delta = rowsum(dO * O)``, one kernel computes dK and dV per key block (looping over the
query heads of its GQA group, so no two programs write the same gradient), another
computes dQ per query block. No atomics: the gradients are deterministic.

This module imports torch and triton only.
"""

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# Stands for an unlimited window side; small enough that index arithmetic stays in int32.
UNLIMITED = 1 << 29


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs(block_pairs, warps_stages):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n in block_pairs for w, s in warps_stages]


def _prune_for_head_dim(configs, named_args, **kwargs):
    # Large head dims need smaller tiles to fit in shared memory and registers.
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    limit = 64 if block_d >= 256 else 128
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= limit and c.kwargs["BLOCK_N"] <= limit]
    return kept or configs[:1]


if _interpreting():
    # The interpreter ignores warps and stages, and autotuning there only costs time.
    # 32x32 tiles make the short test sequences span several blocks of each kind.
    _FWD_CONFIGS = _configs([(32, 32)], [(4, 1)])
    _BWD_CONFIGS = _configs([(32, 32)], [(4, 1)])
else:
    # Configurations that compile and run well on sm_80 and sm_90.
    _FWD_CONFIGS = _configs([(128, 64), (128, 128), (64, 64), (128, 32)], [(4, 3), (8, 3), (8, 4)])
    _BWD_CONFIGS = _configs([(64, 64), (128, 64), (64, 128), (32, 64)], [(4, 2), (8, 2), (4, 3)])


@triton.jit
def _seq_bounds(b, CU_SEQLENS, seqlen, VARLEN: tl.constexpr):
    """(start offset in tokens, length) of sequence b."""
    if VARLEN:
        start = tl.load(CU_SEQLENS + b)
        length = tl.load(CU_SEQLENS + b + 1) - start
    else:
        start = 0
        length = seqlen
    return start, length


@triton.jit
def _visible(rows, cols, seqlen_k, off, left, right):
    rel = cols[None, :] - rows[:, None] - off
    return (cols[None, :] < seqlen_k) & (rel >= -left) & (rel <= right)


@triton.jit
def _key_ranges(m0, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, seqlen_k, off, left, right):
    """Key blocks of query block [m0, m0 + BLOCK_M): masked [lo, full_lo), full [full_lo,
    full_hi), masked [full_hi, hi). All but hi are multiples of BLOCK_N."""
    lo = tl.maximum(m0 + off - left, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(m0 + BLOCK_M - 1 + off + right + 1, seqlen_k)
    hi = tl.maximum(hi, lo)
    full_lo = tl.cdiv(m0 + BLOCK_M - 1 + off - left, BLOCK_N) * BLOCK_N
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = (tl.minimum(m0 + off + right + 1, seqlen_k)) // BLOCK_N * BLOCK_N
    full_hi = tl.maximum(full_hi, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _query_ranges(n0, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, seqlen_q, off, left, right):
    """The mirror of _key_ranges: query blocks that see key block [n0, n0 + BLOCK_N)."""
    lo = tl.maximum(n0 - off - right, 0) // BLOCK_M * BLOCK_M
    hi = tl.minimum(n0 + BLOCK_N - 1 - off + left + 1, seqlen_q)
    hi = tl.maximum(hi, lo)
    full_lo = tl.cdiv(n0 + BLOCK_N - 1 - off - right, BLOCK_M) * BLOCK_M
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = (tl.minimum(n0 - off + left + 1, seqlen_q)) // BLOCK_M * BLOCK_M
    full_hi = tl.maximum(full_hi, full_lo)
    return lo, full_lo, full_hi, hi


# ------------------------------------------------------------------------------ forward

@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, rows, offs_n, offs_d, d_mask,
                start, end, seqlen_k, off, left, right, qk_scale,
                MASKED: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols[:, None] < seqlen_k) & d_mask[None, :]
        k = tl.load(K + cols[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASKED:
            s = tl.where(_visible(rows, cols, seqlen_k, off, left, right), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no visible key yet keeps m = -inf; shift it by 0 instead.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + cols[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_FWD_CONFIGS, key=["SEQ_KEY", "BLOCK_D", "GQA_GROUP", "VARLEN"],
                 prune_configs_by={"early_config_prune": _prune_for_head_dim})
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
    stride_lb, stride_lh,
    n_heads, seqlen_q, seqlen_k, head_dim, qk_scale, left, right,
    SEQ_KEY, GQA_GROUP: tl.constexpr, VARLEN: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    h_kv = h // GQA_GROUP
    q_start, seqlen_q = _seq_bounds(b, CU_Q, seqlen_q, VARLEN)
    k_start, seqlen_k = _seq_bounds(b, CU_K, seqlen_k, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    off = seqlen_k - seqlen_q

    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    row_mask = rows < seqlen_q

    b64 = tl.cast(b, tl.int64)
    Q += b64 * stride_qb + tl.cast(q_start, tl.int64) * stride_qt + h * stride_qh
    K += b64 * stride_kb + tl.cast(k_start, tl.int64) * stride_kt + h_kv * stride_kh
    V += b64 * stride_vb + tl.cast(k_start, tl.int64) * stride_vt + h_kv * stride_vh
    O += b64 * stride_ob + tl.cast(q_start, tl.int64) * stride_ot + h * stride_oh
    LSE += b64 * stride_lb + h * stride_lh + q_start

    q = tl.load(Q + rows[:, None] * stride_qt + offs_d[None, :],
                mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    lo, full_lo, full_hi, hi = _key_ranges(m0, BLOCK_M, BLOCK_N, seqlen_k, off, left, right)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, rows, offs_n,
                                offs_d, d_mask, lo, full_lo, seqlen_k, off, left, right,
                                qk_scale, True, BLOCK_N, PRECISION)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, rows, offs_n,
                                offs_d, d_mask, full_lo, full_hi, seqlen_k, off, left, right,
                                qk_scale, False, BLOCK_N, PRECISION)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, rows, offs_n,
                                offs_d, d_mask, full_hi, hi, seqlen_k, off, left, right,
                                qk_scale, True, BLOCK_N, PRECISION)

    # Rows that see no key at all: output 0 and log-sum-exp -inf (the log of an empty sum).
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    tl.store(O + rows[:, None] * stride_ot + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_mask[:, None] & d_mask[None, :])
    tl.store(LSE + rows, lse, mask=row_mask)


# ----------------------------------------------------------------------------- backward

@triton.jit
def _bwd_preprocess_kernel(
    O, DO, DLSE, DELTA, CU_Q,
    stride_ob, stride_ot, stride_oh, stride_db, stride_dt, stride_dh, stride_lb, stride_lh,
    n_heads, seqlen_q, head_dim,
    HAS_DLSE: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    q_start, seqlen_q = _seq_bounds(b, CU_Q, seqlen_q, VARLEN)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < seqlen_q) & (offs_d[None, :] < head_dim)
    b64 = tl.cast(b, tl.int64)
    t = tl.cast(q_start, tl.int64) + rows[:, None]
    o = tl.load(O + b64 * stride_ob + t * stride_ot + h * stride_oh + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b64 * stride_db + t * stride_dt + h * stride_dh + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    stat = b64 * stride_lb + h * stride_lh + q_start + rows
    if HAS_DLSE:
        # d lse_i / d s_ij = p_ij, so a gradient of the lse shifts delta by -dlse.
        delta -= tl.load(DLSE + stat, mask=rows < seqlen_q, other=0.0)
    tl.store(DELTA + stat, delta, mask=rows < seqlen_q)


@triton.jit
def _load_lse(LSE, rows, seqlen_q):
    lse = tl.load(LSE + rows, mask=rows < seqlen_q, other=0.0)
    # A row with no visible key stored -inf; +inf makes all its probabilities exp2(-inf) = 0.
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


@triton.jit
def _dkdv_blocks(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_dot, cols, offs_m, offs_d,
                 d_mask, start, end, seqlen_q, seqlen_k, off, left, right, qk_scale,
                 MASKED: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
    for start_m in range(start, end, BLOCK_M):
        rows = start_m + offs_m
        row_mask = rows < seqlen_q
        q = tl.load(Q + rows[:, None] * stride_qt + offs_d[None, :],
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        do = tl.load(DO + rows[:, None] * stride_dot + offs_d[None, :],
                     mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        lse2 = _load_lse(LSE, rows, seqlen_q)
        delta = tl.load(DELTA + rows, mask=row_mask, other=0.0)
        # Transposed scores: keys along rows, queries along columns.
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        pt = tl.math.exp2(st - lse2[None, :])
        if MASKED:
            visible = _visible(rows, cols, seqlen_k, off, left, right)
            pt = tl.where(tl.trans(visible) & row_mask[None, :], pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.autotune(configs=_BWD_CONFIGS, key=["SEQ_KEY", "BLOCK_D", "GQA_GROUP", "VARLEN"],
                 prune_configs_by={"early_config_prune": _prune_for_head_dim})
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
    stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt, stride_dvh,
    stride_lb, stride_lh,
    n_kv_heads, seqlen_q, seqlen_k, head_dim, qk_scale, sm_scale, left, right,
    SEQ_KEY, GQA_GROUP: tl.constexpr, VARLEN: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_kv_heads
    h_kv = pid_bh % n_kv_heads
    q_start, seqlen_q = _seq_bounds(b, CU_Q, seqlen_q, VARLEN)
    k_start, seqlen_k = _seq_bounds(b, CU_K, seqlen_k, VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= seqlen_k:
        return
    off = seqlen_k - seqlen_q

    cols = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    kv_mask = (cols[:, None] < seqlen_k) & d_mask[None, :]
    b64 = tl.cast(b, tl.int64)
    k_tok = tl.cast(k_start, tl.int64) + cols[:, None]
    k = tl.load(K + b64 * stride_kb + k_tok * stride_kt + h_kv * stride_kh + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(V + b64 * stride_vb + k_tok * stride_vt + h_kv * stride_vh + offs_d[None, :],
                mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    lo, full_lo, full_hi, hi = _query_ranges(n0, BLOCK_M, BLOCK_N, seqlen_q, off, left, right)
    q_tok = tl.cast(q_start, tl.int64)
    # The query heads of this GQA group, one after another: each dK/dV is written once.
    for g in range(0, GQA_GROUP):
        h = h_kv * GQA_GROUP + g
        Qh = Q + b64 * stride_qb + q_tok * stride_qt + h * stride_qh
        DOh = DO + b64 * stride_dob + q_tok * stride_dot + h * stride_doh
        LSEh = LSE + b64 * stride_lb + h * stride_lh + q_start
        DELTAh = DELTA + b64 * stride_lb + h * stride_lh + q_start
        dk, dv = _dkdv_blocks(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, stride_qt, stride_dot, cols,
                              offs_m, offs_d, d_mask, lo, full_lo, seqlen_q, seqlen_k, off,
                              left, right, qk_scale, True, BLOCK_M, PRECISION)
        dk, dv = _dkdv_blocks(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, stride_qt, stride_dot, cols,
                              offs_m, offs_d, d_mask, full_lo, full_hi, seqlen_q, seqlen_k, off,
                              left, right, qk_scale, False, BLOCK_M, PRECISION)
        dk, dv = _dkdv_blocks(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, stride_qt, stride_dot, cols,
                              offs_m, offs_d, d_mask, full_hi, hi, seqlen_q, seqlen_k, off,
                              left, right, qk_scale, True, BLOCK_M, PRECISION)

    dk *= sm_scale
    tl.store(DK + b64 * stride_dkb + k_tok * stride_dkt + h_kv * stride_dkh + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b64 * stride_dvb + k_tok * stride_dvt + h_kv * stride_dvh + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_blocks(dq, q, do, lse2, delta, K, V, stride_kt, stride_vt, rows, offs_n, offs_d,
               d_mask, start, end, seqlen_k, off, left, right, qk_scale,
               MASKED: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols[:, None] < seqlen_k) & d_mask[None, :]
        k = tl.load(K + cols[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + cols[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            p = tl.where(_visible(rows, cols, seqlen_k, off, left, right), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.autotune(configs=_BWD_CONFIGS, key=["SEQ_KEY", "BLOCK_D", "GQA_GROUP", "VARLEN"],
                 prune_configs_by={"early_config_prune": _prune_for_head_dim})
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
    stride_dqb, stride_dqt, stride_dqh, stride_lb, stride_lh,
    n_heads, seqlen_q, seqlen_k, head_dim, qk_scale, sm_scale, left, right,
    SEQ_KEY, GQA_GROUP: tl.constexpr, VARLEN: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    h_kv = h // GQA_GROUP
    q_start, seqlen_q = _seq_bounds(b, CU_Q, seqlen_q, VARLEN)
    k_start, seqlen_k = _seq_bounds(b, CU_K, seqlen_k, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    off = seqlen_k - seqlen_q

    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    mask = (rows[:, None] < seqlen_q) & d_mask[None, :]
    b64 = tl.cast(b, tl.int64)
    q_tok = tl.cast(q_start, tl.int64) + rows[:, None]
    q = tl.load(Q + b64 * stride_qb + q_tok * stride_qt + h * stride_qh + offs_d[None, :],
                mask=mask, other=0.0)
    do = tl.load(DO + b64 * stride_dob + q_tok * stride_dot + h * stride_doh + offs_d[None, :],
                 mask=mask, other=0.0)
    LSE += b64 * stride_lb + h * stride_lh + q_start
    DELTA += b64 * stride_lb + h * stride_lh + q_start
    lse2 = _load_lse(LSE, rows, seqlen_q)
    delta = tl.load(DELTA + rows, mask=rows < seqlen_q, other=0.0)
    k_base = tl.cast(k_start, tl.int64)
    K += b64 * stride_kb + k_base * stride_kt + h_kv * stride_kh
    V += b64 * stride_vb + k_base * stride_vt + h_kv * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _key_ranges(m0, BLOCK_M, BLOCK_N, seqlen_k, off, left, right)
    dq = _dq_blocks(dq, q, do, lse2, delta, K, V, stride_kt, stride_vt, rows, offs_n, offs_d,
                    d_mask, lo, full_lo, seqlen_k, off, left, right, qk_scale, True, BLOCK_N,
                    PRECISION)
    dq = _dq_blocks(dq, q, do, lse2, delta, K, V, stride_kt, stride_vt, rows, offs_n, offs_d,
                    d_mask, full_lo, full_hi, seqlen_k, off, left, right, qk_scale, False,
                    BLOCK_N, PRECISION)
    dq = _dq_blocks(dq, q, do, lse2, delta, K, V, stride_kt, stride_vt, rows, offs_n, offs_d,
                    d_mask, full_hi, hi, seqlen_k, off, left, right, qk_scale, True, BLOCK_N,
                    PRECISION)
    dq *= sm_scale
    tl.store(DQ + b64 * stride_dqb + q_tok * stride_dqt + h * stride_dqh + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------- launchers

class _Geometry:
    """Batch geometry shared by the launchers: padded (b, s, h, d) or packed (t, h, d)."""

    def __init__(self, q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
        self.varlen = cu_seqlens_q is not None
        if self.varlen:
            self.batch = cu_seqlens_q.numel() - 1
            self.seqlen_q, self.seqlen_k = max_seqlen_q, max_seqlen_k
        else:
            self.batch, self.seqlen_q = q.shape[0], q.shape[1]
            self.seqlen_k = k.shape[1]
        self.n_heads, self.n_kv_heads = q.shape[-2], k.shape[-2]
        self.head_dim = q.shape[-1]
        self.block_d = max(16, triton.next_power_of_2(self.head_dim))
        self.precision = "ieee" if q.dtype == torch.float32 else "tf32"
        self.seq_key = triton.next_power_of_2(max(self.seqlen_q, self.seqlen_k, 1))
        self.cu_q, self.cu_k = cu_seqlens_q, cu_seqlens_k

    def strides(self, t):
        """(batch, token, head) strides; the batch stride is 0 for packed tensors."""
        if self.varlen:
            return 0, t.stride(0), t.stride(1)
        return t.stride(0), t.stride(1), t.stride(2)


def _lse_strides(geo, lse):
    # lse is (b, h, s) padded, (h, total) packed: (batch, head) strides; tokens are unit stride.
    return (lse.stride(0), lse.stride(1)) if not geo.varlen else (0, lse.stride(0))


def _window(causal, window_left, window_right):
    left = UNLIMITED if window_left < 0 else window_left
    right = UNLIMITED if window_right < 0 else window_right
    return left, (min(right, 0) if causal else right)


def attention_fwd(q, k, v, softmax_scale, causal=False, window_left=-1, window_right=-1,
                  cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0):
    """Returns ``(out, lse)``: out like q (contiguous), lse fp32 ``(b, h, s_q)`` padded or
    ``(h, total_q)`` packed, -inf for rows that see no key."""
    geo = _Geometry(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if geo.varlen:
        lse = torch.empty((geo.n_heads, q.shape[0]), dtype=torch.float32, device=q.device)
    else:
        lse = torch.empty((geo.batch, geo.n_heads, geo.seqlen_q), dtype=torch.float32,
                          device=q.device)
    if q.numel() == 0 or geo.batch == 0 or geo.seqlen_q == 0:
        return out, lse
    if k.numel() == 0:  # no keys at all: every row is empty
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    left, right = _window(causal, window_left, window_right)
    grid = lambda meta: (triton.cdiv(geo.seqlen_q, meta["BLOCK_M"]), geo.batch * geo.n_heads)  # noqa: E731
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
        *geo.strides(q), *geo.strides(k), *geo.strides(v), *geo.strides(out), *_lse_strides(geo, lse),
        geo.n_heads, geo.seqlen_q, geo.seqlen_k, geo.head_dim, softmax_scale * LOG2E, left, right,
        geo.seq_key, GQA_GROUP=geo.n_heads // geo.n_kv_heads, VARLEN=geo.varlen,
        PRECISION=geo.precision, BLOCK_D=geo.block_d,
    )
    return out, lse


def attention_bwd(dout, q, k, v, out, lse, softmax_scale, causal=False, window_left=-1,
                  window_right=-1, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0,
                  max_seqlen_k=0, dlse=None):
    """Returns ``(dq, dk, dv)``, contiguous, in the dtypes of q, k, v. ``dlse`` (optional,
    shaped like lse) is a gradient of the log-sum-exp output."""
    geo = _Geometry(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if q.numel() == 0 or k.numel() == 0 or geo.batch == 0 or geo.seqlen_q == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    left, right = _window(causal, window_left, window_right)
    delta = torch.empty_like(lse)
    pre_block = 64
    _bwd_preprocess_kernel[(triton.cdiv(geo.seqlen_q, pre_block), geo.batch * geo.n_heads)](
        out, dout, None if dlse is None else dlse.contiguous(), delta, cu_seqlens_q,
        *geo.strides(out), *geo.strides(dout), *_lse_strides(geo, lse),
        geo.n_heads, geo.seqlen_q, geo.head_dim,
        HAS_DLSE=dlse is not None, VARLEN=geo.varlen, BLOCK_M=pre_block, BLOCK_D=geo.block_d,
    )
    group = geo.n_heads // geo.n_kv_heads
    common = dict(GQA_GROUP=group, VARLEN=geo.varlen, PRECISION=geo.precision, BLOCK_D=geo.block_d)
    grid_kv = lambda meta: (triton.cdiv(geo.seqlen_k, meta["BLOCK_N"]), geo.batch * geo.n_kv_heads)  # noqa: E731
    _attn_bwd_dkdv_kernel[grid_kv](
        q, k, v, dout, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k,
        *geo.strides(q), *geo.strides(k), *geo.strides(v), *geo.strides(dout),
        *geo.strides(dk), *geo.strides(dv), *_lse_strides(geo, lse),
        geo.n_kv_heads, geo.seqlen_q, geo.seqlen_k, geo.head_dim, softmax_scale * LOG2E,
        softmax_scale, left, right, geo.seq_key, **common,
    )
    grid_q = lambda meta: (triton.cdiv(geo.seqlen_q, meta["BLOCK_M"]), geo.batch * geo.n_heads)  # noqa: E731
    _attn_bwd_dq_kernel[grid_q](
        q, k, v, dout, lse, delta, dq, cu_seqlens_q, cu_seqlens_k,
        *geo.strides(q), *geo.strides(k), *geo.strides(v), *geo.strides(dout),
        *geo.strides(dq), *_lse_strides(geo, lse),
        geo.n_heads, geo.seqlen_q, geo.seqlen_k, geo.head_dim, softmax_scale * LOG2E,
        softmax_scale, left, right, geo.seq_key, **common,
    )
    return dq, dk, dv
