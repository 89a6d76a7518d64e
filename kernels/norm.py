"""Fused LayerNorm / RMSNorm (+ residual add), forward and backward, in Triton.

RMSNorm is LayerNorm without centring and without bias, so one pair of kernels serves
both (``IS_RMS``), as in flash-attention's ``layer_norm.py``.

Layout: the launchers take 2-D tensors ``(rows, width)`` whose last dimension has
stride 1; rows may have any stride (including 0, as an expanded gradient has).

Precision: the kernels compute in the dtype of the statistics buffers (``MEAN``/``RSTD``),
which the launchers allocate in the compute dtype of the input: fp32 for fp16, bf16 and
fp32 inputs, fp64 for fp64 inputs, so a float64 norm is float64 throughout (statistics,
row sums, the partial dW/dB). ``eps`` arrives as a float64 scalar and is rounded to the
compute dtype in the kernel; a plain float argument would be fp32 and cost a float64 norm
its exactness.

Two code paths, picked per launch:
- the row fits in registers (``width <= 64 KiB / element_size``): one read of x (and
  of the residual), one write of y (and h);
- wider rows are processed in chunks of ``CHUNK`` columns: three passes in the
  forward (mean, variance, normalise), two in the backward.

The weight/bias gradients are reduced without atomics: each program accumulates the
rows it owns into its own row of a buffer in the compute dtype, and the buffer is summed
over programs afterwards, so the backward is deterministic.

This module imports torch and triton only.
"""

import torch
import triton
import triton.language as tl

# A row up to this many bytes is kept in registers (flash-attention uses the same bound).
MAX_FUSED_BYTES = 65536
# Columns per chunk when a row is wider than that.
CHUNK = 4096


@triton.jit
def _load_row(X, RES, H, x_row, res_row, h_row, cols, mask, HAS_RES: tl.constexpr,
              ACC: tl.constexpr):
    """Loads x (plus the residual, storing h = x + residual) in the compute dtype ACC."""
    x = tl.load(X + x_row + cols, mask=mask, other=0.0).to(ACC)
    if HAS_RES:
        x += tl.load(RES + res_row + cols, mask=mask, other=0.0).to(ACC)
        # Normalise h as stored (rounded to its dtype), so the forward, the backward
        # (which reads h back) and the unfused composition all agree.
        h = x.to(H.dtype.element_ty)
        tl.store(H + h_row + cols, h, mask=mask)
        x = h.to(ACC)
    return x


@triton.jit
def _norm_fwd_kernel(
    X, RES, W, B, Y, H, MEAN, RSTD,
    stride_x, stride_res, stride_y, stride_h,
    N, eps: tl.float64,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    HAS_RES: tl.constexpr, SINGLE_PASS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    ACC: tl.constexpr = RSTD.dtype.element_ty
    # tl.full, not tl.cast: the interpreter passes eps as a Python float, which tl.cast
    # would round through fp32.
    eps = tl.full((), eps, ACC)
    row = tl.cast(tl.program_id(0), tl.int64)
    x_row = row * stride_x
    res_row = row * stride_res
    h_row = row * stride_h
    y_row = row * stride_y
    cols = tl.arange(0, BLOCK_N)

    if SINGLE_PASS:
        mask = cols < N
        x = _load_row(X, RES, H, x_row, res_row, h_row, cols, mask, HAS_RES, ACC)
        if IS_RMS:
            var = tl.sum(x * x, axis=0) / N
        else:
            mean = tl.sum(x, axis=0) / N
            xc = tl.where(mask, x - mean, 0.0)
            var = tl.sum(xc * xc, axis=0) / N
            tl.store(MEAN + row, mean)
        rstd = 1.0 / tl.sqrt(var + eps)
        tl.store(RSTD + row, rstd)
        if IS_RMS:
            y = x * rstd
        else:
            y = xc * rstd
        if HAS_W:
            y = y * tl.load(W + cols, mask=mask).to(ACC)
        if HAS_B:
            y = y + tl.load(B + cols, mask=mask).to(ACC)
        tl.store(Y + y_row + cols, y.to(Y.dtype.element_ty), mask=mask)
    else:
        # Chunked: the first pass also writes h, so later passes read h, not x + res.
        if HAS_RES:
            SRC = H
            src_row = h_row
        else:
            SRC = X
            src_row = x_row
        mean = 0.0
        if not IS_RMS:
            acc = tl.zeros([BLOCK_N], dtype=ACC)
            for start in range(0, N, BLOCK_N):
                mask = start + cols < N
                x = _load_row(X, RES, H, x_row, res_row, h_row, start + cols, mask, HAS_RES, ACC)
                acc += x
            mean = tl.sum(acc, axis=0) / N
            tl.store(MEAN + row, mean)
        acc = tl.zeros([BLOCK_N], dtype=ACC)
        for start in range(0, N, BLOCK_N):
            mask = start + cols < N
            if IS_RMS:
                x = _load_row(X, RES, H, x_row, res_row, h_row, start + cols, mask, HAS_RES, ACC)
            else:
                x = tl.load(SRC + src_row + start + cols, mask=mask, other=0.0).to(ACC)
            xc = tl.where(mask, x - mean, 0.0)
            acc += xc * xc
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)
        tl.store(RSTD + row, rstd)
        for start in range(0, N, BLOCK_N):
            mask = start + cols < N
            x = tl.load(SRC + src_row + start + cols, mask=mask, other=0.0).to(ACC)
            y = (x - mean) * rstd
            if HAS_W:
                y = y * tl.load(W + start + cols, mask=mask).to(ACC)
            if HAS_B:
                y = y + tl.load(B + start + cols, mask=mask).to(ACC)
            tl.store(Y + y_row + start + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _chunk_terms(X_row, DY_row, W, cols, mask, mean, rstd, HAS_W: tl.constexpr,
                 ACC: tl.constexpr):
    """dy, x-hat and w * dy of one chunk of a row, in the compute dtype ACC."""
    x = tl.load(X_row + cols, mask=mask, other=0.0).to(ACC)
    dy = tl.load(DY_row + cols, mask=mask, other=0.0).to(ACC)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    wdy = dy
    if HAS_W:
        wdy = dy * tl.load(W + cols, mask=mask).to(ACC)
    return dy, xhat, wdy


@triton.jit
def _norm_bwd_kernel(
    X, W, DY, DH, DX, DW_PART, DB_PART, MEAN, RSTD,
    stride_x, stride_dy, stride_dh, stride_dx,
    M, N, rows_per_program,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    HAS_DH: tl.constexpr, SINGLE_PASS: tl.constexpr, BLOCK_N: tl.constexpr,
    WEIGHT_GRADS: tl.constexpr,
):
    # WEIGHT_GRADS=False: dx only (zero bubble computes dW/dB later, at its W action); the
    # weight is still read for dx, the partial dW/dB rows are neither summed nor stored.
    ACC: tl.constexpr = RSTD.dtype.element_ty
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.arange(0, BLOCK_N)
    part = tl.cast(pid, tl.int64) * N

    if SINGLE_PASS:
        mask = cols < N
        if HAS_W:
            w = tl.load(W + cols, mask=mask).to(ACC)
            if WEIGHT_GRADS:
                dw = tl.zeros([BLOCK_N], dtype=ACC)
        if HAS_B and WEIGHT_GRADS:
            db = tl.zeros([BLOCK_N], dtype=ACC)
        for row in range(row_start, row_end):
            row64 = tl.cast(row, tl.int64)
            x = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0).to(ACC)
            dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(ACC)
            rstd = tl.load(RSTD + row)
            if IS_RMS:
                xhat = x * rstd
            else:
                xhat = tl.where(mask, (x - tl.load(MEAN + row)) * rstd, 0.0)
            if HAS_W:
                wdy = dy * w
                if WEIGHT_GRADS:
                    dw += dy * xhat
            else:
                wdy = dy
            if HAS_B and WEIGHT_GRADS:
                db += dy
            c1 = tl.sum(xhat * wdy, axis=0) / N
            if IS_RMS:
                dx = (wdy - xhat * c1) * rstd
            else:
                c2 = tl.sum(wdy, axis=0) / N
                dx = (wdy - (xhat * c1 + c2)) * rstd
            if HAS_DH:
                dx += tl.load(DH + row64 * stride_dh + cols, mask=mask, other=0.0).to(ACC)
            tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_W and WEIGHT_GRADS:
            tl.store(DW_PART + part + cols, dw, mask=mask)
        if HAS_B and WEIGHT_GRADS:
            tl.store(DB_PART + part + cols, db, mask=mask)
    else:
        # Chunked: the partial dW/dB rows live in memory owned by this program alone
        # (zero-initialised by the launcher), so read-modify-write needs no atomics.
        for row in range(row_start, row_end):
            row64 = tl.cast(row, tl.int64)
            rstd = tl.load(RSTD + row)
            mean = 0.0
            if not IS_RMS:
                mean = tl.load(MEAN + row)
            acc1 = tl.zeros([BLOCK_N], dtype=ACC)
            acc2 = tl.zeros([BLOCK_N], dtype=ACC)
            for start in range(0, N, BLOCK_N):
                mask = start + cols < N
                dy, xhat, wdy = _chunk_terms(X + row64 * stride_x, DY + row64 * stride_dy, W,
                                             start + cols, mask, mean, rstd, HAS_W, ACC)
                acc1 += xhat * wdy
                acc2 += wdy
            c1 = tl.sum(acc1, axis=0) / N
            c2 = 0.0
            if not IS_RMS:
                c2 = tl.sum(acc2, axis=0) / N
            for start in range(0, N, BLOCK_N):
                mask = start + cols < N
                dy, xhat, wdy = _chunk_terms(X + row64 * stride_x, DY + row64 * stride_dy, W,
                                             start + cols, mask, mean, rstd, HAS_W, ACC)
                if HAS_W and WEIGHT_GRADS:
                    dw = tl.load(DW_PART + part + start + cols, mask=mask)
                    tl.store(DW_PART + part + start + cols, dw + dy * xhat, mask=mask)
                if HAS_B and WEIGHT_GRADS:
                    db = tl.load(DB_PART + part + start + cols, mask=mask)
                    tl.store(DB_PART + part + start + cols, db + dy, mask=mask)
                dx = (wdy - (xhat * c1 + c2)) * rstd
                if HAS_DH:
                    dx += tl.load(DH + row64 * stride_dh + start + cols, mask=mask, other=0.0).to(ACC)
                tl.store(DX + row64 * stride_dx + start + cols, dx.to(DX.dtype.element_ty), mask=mask)


def _block_and_warps(width: int, element_size: int):
    """(BLOCK_N, single_pass, num_warps) for a row of `width` elements."""
    block = triton.next_power_of_2(width)
    single_pass = block * element_size <= MAX_FUSED_BYTES
    if not single_pass:
        block = CHUNK
    # One warp per 256 columns, 1 to 16 warps (wider blocks spill otherwise).
    num_warps = min(max(block // 256, 1), 16)
    return block, single_pass, num_warps


def _programs_for_backward(rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        # A few programs per SM keeps every SM busy while the partial buffer stays small.
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(rows, 4 * sms))
    # The interpreter runs programs one after another: few programs, fewer launches.
    return max(1, min(rows, 8))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute and keep statistics in for inputs of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def norm_fwd(x, weight, bias, residual, eps: float, is_rms: bool):
    """Forward of LayerNorm (``is_rms=False``) or RMSNorm over the last dim of 2-D ``x``.

    Returns ``(y, h, mean, rstd)``: ``h = x + residual`` (None without residual),
    ``mean`` (None for RMSNorm) and ``rstd`` are vectors of length ``rows`` in
    ``compute_dtype(x.dtype)``.
    """
    rows, width = x.shape
    assert rows == 0 or (x.stride(-1) == 1 and (residual is None or residual.stride(-1) == 1))
    y = torch.empty((rows, width), dtype=x.dtype, device=x.device)
    h = None if residual is None else torch.empty_like(y)
    acc = compute_dtype(x.dtype)
    mean = None if is_rms else torch.empty(rows, dtype=acc, device=x.device)
    rstd = torch.empty(rows, dtype=acc, device=x.device)
    if rows == 0:
        return y, h, mean, rstd
    block, single_pass, num_warps = _block_and_warps(width, x.element_size())
    _norm_fwd_kernel[(rows,)](
        x, residual, weight, bias, y, h, mean, rstd,
        x.stride(0), 0 if residual is None else residual.stride(0),
        y.stride(0), 0 if h is None else h.stride(0),
        width, eps,
        IS_RMS=is_rms, HAS_W=weight is not None, HAS_B=bias is not None,
        HAS_RES=residual is not None, SINGLE_PASS=single_pass, BLOCK_N=block,
        num_warps=num_warps,
    )
    return y, h, mean, rstd


def norm_bwd(dy, dh, x, weight, has_bias: bool, mean, rstd, is_rms: bool, weight_grads: bool = True):
    """Backward of :func:`norm_fwd`.

    ``x`` is the normalised input (h when the forward had a residual), ``dh`` the
    gradient flowing into h from elsewhere (or None); ``mean``/``rstd`` are the forward's,
    in ``compute_dtype(x.dtype)``. Returns ``(dx, dweight, dbias)``, dweight/dbias in the
    compute dtype (None where there is no weight/bias); dx is also the gradient of the
    residual. ``weight_grads=False``: dx only (dweight and dbias come back None; the kernel
    skips their partial sums), for a caller that computes them later.
    """
    rows, width = x.shape
    assert rows == 0 or (x.stride(-1) == 1 and dy.stride(-1) == 1 and (dh is None or dh.stride(-1) == 1))
    dx = torch.empty((rows, width), dtype=x.dtype, device=x.device)
    has_w = weight is not None
    programs = _programs_for_backward(rows, x.device)
    block, single_pass, num_warps = _block_and_warps(width, x.element_size())
    # The chunked path accumulates into the buffer, so it must start at zero.
    alloc = torch.empty if single_pass and rows > 0 else torch.zeros
    acc = compute_dtype(x.dtype)
    assert rstd.dtype == acc and (is_rms or mean.dtype == acc)
    dw_part = alloc((programs, width), dtype=acc, device=x.device) if has_w and weight_grads else None
    db_part = alloc((programs, width), dtype=acc, device=x.device) if has_bias and weight_grads else None
    if rows > 0:
        rows_per_program = triton.cdiv(rows, programs)
        _norm_bwd_kernel[(programs,)](
            x, weight, dy, dh, dx, dw_part, db_part, mean, rstd,
            x.stride(0), dy.stride(0), 0 if dh is None else dh.stride(0), dx.stride(0),
            rows, width, rows_per_program,
            IS_RMS=is_rms, HAS_W=has_w, HAS_B=has_bias, HAS_DH=dh is not None,
            SINGLE_PASS=single_pass, BLOCK_N=block, WEIGHT_GRADS=weight_grads, num_warps=num_warps,
        )
    dw = dw_part.sum(0) if dw_part is not None else None
    db = db_part.sum(0) if db_part is not None else None
    return dx, dw, db
