"""LayerNorm and RMSNorm with a fused residual add, as torch.library custom ops.

Each norm is a forward op and a backward op (``hybridpar::layer_norm``,
``hybridpar::layer_norm_backward``, ``hybridpar::rms_norm``, ``hybridpar::rms_norm_backward``)
with a fake implementation, tied together by ``register_autograd``. The implementation is
chosen per call by :mod:`._backend`: the Triton kernels (``kernels/norm.py``) or the
reference fallback (``hybridpar_ext.reference.norms``).
"""

from typing import Optional

import torch
from torch import Tensor

from ..reference import norms as ref
from ..reference._dtypes import acc_dtype
from . import _backend, _checks


# The kernels compute in float64 for float64 inputs, so float64 runs them too.
NORM_TRITON_DTYPES = _backend.TRITON_DTYPES + (torch.float64,)


def _use_triton(x: Tensor) -> bool:
    return _backend.use_triton(x, NORM_TRITON_DTYPES)


def _rows(t: Optional[Tensor]) -> Optional[Tensor]:
    """`t` as (rows, width) with unit stride along the width: a view when possible."""
    if t is None:
        return None
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def _nothing(like: Tensor) -> Tensor:
    """Stands for an absent output: custom ops cannot return None."""
    return like.new_empty(0, dtype=torch.float32)


def _stat(like: Tensor, shape) -> Tensor:
    """An empty tensor for a statistic or a weight gradient of the norm of `like`: in the
    dtype the norms compute in (fp32, or fp64 for fp64 inputs)."""
    return like.new_empty(shape, dtype=acc_dtype(like.dtype))


def _unrows(t: Optional[Tensor], shape, like: Tensor) -> Tensor:
    return _nothing(like) if t is None else t.view(shape)


# --------------------------------------------------------------------------- LayerNorm

@torch.library.custom_op("hybridpar::layer_norm", mutates_args=())
def _layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                residual: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x2, r2 = _rows(x), _rows(residual)
    if _use_triton(x):
        y, h, mean, rstd = _backend.kernels("norm").norm_fwd(
            x2, _contiguous(weight), _contiguous(bias), r2, eps, is_rms=False)
    else:
        y, h, mean, rstd = ref.layer_norm_fwd(x2, weight, bias, r2, eps)
    lead = x.shape[:-1]
    return y.view(x.shape), _unrows(h, x.shape, x), mean.view(lead), rstd.view(lead)


@_layer_norm.register_fake
def _(x, weight, bias, residual, eps):
    lead = x.shape[:-1]
    h = x.new_empty(x.shape) if residual is not None else _nothing(x)
    return x.new_empty(x.shape), h, _stat(x, lead), _stat(x, lead)


@torch.library.custom_op("hybridpar::layer_norm_backward", mutates_args=())
def _layer_norm_backward(dy: Tensor, dh: Optional[Tensor], x: Tensor, weight: Optional[Tensor],
                         has_bias: bool, mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    dy2, dh2, x2 = _rows(dy), _rows(dh), _rows(x)
    if _use_triton(x):
        dx, dw, db = _backend.kernels("norm").norm_bwd(
            dy2, dh2, x2, _contiguous(weight), has_bias, mean.reshape(-1), rstd.reshape(-1),
            is_rms=False)
    else:
        dx, dw, db = ref.layer_norm_bwd(dy2, dh2, x2, weight, has_bias,
                                        mean.reshape(-1), rstd.reshape(-1))
    dw = _nothing(x) if dw is None else dw
    db = _nothing(x) if db is None else db
    return dx.view(x.shape), dw, db


@_layer_norm_backward.register_fake
def _(dy, dh, x, weight, has_bias, mean, rstd):
    width = x.shape[-1]
    dw = _stat(x, width) if weight is not None else _nothing(x)
    db = _stat(x, width) if has_bias else _nothing(x)
    return x.new_empty(x.shape), dw, db


def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, residual, _eps = inputs
    _y, h, mean, rstd = output
    ctx.has_residual = residual is not None
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(h if ctx.has_residual else x, weight, mean, rstd)


def _layer_norm_grad(ctx, dy, dh, _dmean, _drstd):
    src, weight, mean, rstd = ctx.saved_tensors
    has_bias = ctx.bias_dtype is not None
    dx, dw, db = torch.ops.hybridpar.layer_norm_backward(
        dy, dh if ctx.has_residual else None, src, weight, has_bias, mean, rstd)
    dw = None if weight is None else dw.to(weight.dtype)
    db = db.to(ctx.bias_dtype) if has_bias else None
    # h = x + residual, so both receive the gradient of h.
    return dx, dw, db, (dx if ctx.has_residual else None), None


_layer_norm.register_autograd(_layer_norm_grad, setup_context=_layer_norm_setup)


# ----------------------------------------------------------------------------- RMSNorm

@torch.library.custom_op("hybridpar::rms_norm", mutates_args=())
def _rms_norm(x: Tensor, weight: Optional[Tensor], residual: Optional[Tensor],
              eps: float) -> tuple[Tensor, Tensor, Tensor]:
    x2, r2 = _rows(x), _rows(residual)
    if _use_triton(x):
        y, h, _, rstd = _backend.kernels("norm").norm_fwd(
            x2, _contiguous(weight), None, r2, eps, is_rms=True)
    else:
        y, h, rstd = ref.rms_norm_fwd(x2, weight, r2, eps)
    return y.view(x.shape), _unrows(h, x.shape, x), rstd.view(x.shape[:-1])


@_rms_norm.register_fake
def _(x, weight, residual, eps):
    h = x.new_empty(x.shape) if residual is not None else _nothing(x)
    return x.new_empty(x.shape), h, _stat(x, x.shape[:-1])


@torch.library.custom_op("hybridpar::rms_norm_backward", mutates_args=())
def _rms_norm_backward(dy: Tensor, dh: Optional[Tensor], x: Tensor, weight: Optional[Tensor],
                       rstd: Tensor) -> tuple[Tensor, Tensor]:
    dy2, dh2, x2 = _rows(dy), _rows(dh), _rows(x)
    if _use_triton(x):
        dx, dw, _ = _backend.kernels("norm").norm_bwd(
            dy2, dh2, x2, _contiguous(weight), False, None, rstd.reshape(-1), is_rms=True)
    else:
        dx, dw = ref.rms_norm_bwd(dy2, dh2, x2, weight, rstd.reshape(-1))
    return dx.view(x.shape), (_nothing(x) if dw is None else dw)


@_rms_norm_backward.register_fake
def _(dy, dh, x, weight, rstd):
    dw = _stat(x, x.shape[-1]) if weight is not None else _nothing(x)
    return x.new_empty(x.shape), dw


def _rms_norm_setup(ctx, inputs, output):
    x, weight, residual, _eps = inputs
    _y, h, rstd = output
    ctx.has_residual = residual is not None
    ctx.save_for_backward(h if ctx.has_residual else x, weight, rstd)


def _rms_norm_grad(ctx, dy, dh, _drstd):
    src, weight, rstd = ctx.saved_tensors
    dx, dw = torch.ops.hybridpar.rms_norm_backward(
        dy, dh if ctx.has_residual else None, src, weight, rstd)
    dw = None if weight is None else dw.to(weight.dtype)
    return dx, dw, (dx if ctx.has_residual else None), None


_rms_norm.register_autograd(_rms_norm_grad, setup_context=_rms_norm_setup)


# -------------------------------------------------- the split backward (zero bubble)
# The fused backward above computes dx and dW/dB in one pass over the rows. Zero bubble runs
# them apart: dx in its B action (the same kernel, its dW/dB partial sums compiled out), dW/dB
# later in W from the saved input, statistics and dy (torch ops in the compute dtype, fp32 or
# fp64, on every backend: two reductions over the rows, no kernel of their own).

@torch.library.custom_op("hybridpar::norm_input_backward", mutates_args=())
def _norm_input_backward(dy: Tensor, dh: Optional[Tensor], x: Tensor, weight: Optional[Tensor],
                         mean: Optional[Tensor], rstd: Tensor) -> Tensor:
    is_rms = mean is None
    dy2, dh2, x2 = _rows(dy), _rows(dh), _rows(x)
    mean1 = None if is_rms else mean.reshape(-1)
    if _use_triton(x):
        dx, _, _ = _backend.kernels("norm").norm_bwd(
            dy2, dh2, x2, _contiguous(weight), False, mean1, rstd.reshape(-1), is_rms=is_rms,
            weight_grads=False)
    elif is_rms:
        dx, _ = ref.rms_norm_bwd(dy2, dh2, x2, weight, rstd.reshape(-1), weight_grads=False)
    else:
        dx, _, _ = ref.layer_norm_bwd(dy2, dh2, x2, weight, False, mean1, rstd.reshape(-1),
                                      weight_grads=False)
    return dx.view(x.shape)


@_norm_input_backward.register_fake
def _(dy, dh, x, weight, mean, rstd):
    return x.new_empty(x.shape)


@torch.library.custom_op("hybridpar::norm_weight_backward", mutates_args=())
def _norm_weight_backward(dy: Tensor, x: Tensor, mean: Optional[Tensor], rstd: Tensor,
                          has_weight: bool, has_bias: bool) -> tuple[Tensor, Tensor]:
    dw, db = ref.norm_weight_grads(_rows(dy), _rows(x), None if mean is None else mean.reshape(-1),
                                   rstd.reshape(-1), has_weight, has_bias)
    return (_nothing(x) if dw is None else dw), (_nothing(x) if db is None else db)


@_norm_weight_backward.register_fake
def _(dy, x, mean, rstd, has_weight, has_bias):
    width = x.shape[-1]
    return (_stat(x, width) if has_weight else _nothing(x)), (_stat(x, width) if has_bias else _nothing(x))


def norm_forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                 residual: Optional[Tensor], is_rms: bool):
    """The fused forward of LayerNorm (``is_rms=False``) or RMSNorm over the last dim of `x`,
    with the statistics a backward of one's own needs: ``(y, h or None, mean or None, rstd)``
    (mean None for RMSNorm; statistics in the compute dtype). No autograd: pair it with
    :func:`norm_input_grad` and :func:`norm_weight_grads`. Arguments as :func:`layer_norm`'s."""
    op = "rms_norm" if is_rms else "layer_norm"
    _check_norm_args(op, x, weight, None if is_rms else bias, eps, residual, None)
    with torch.no_grad():
        if is_rms:
            y, h, rstd = torch.ops.hybridpar.rms_norm(x, weight, residual, float(eps))
            mean = None
        else:
            y, h, mean, rstd = torch.ops.hybridpar.layer_norm(x, weight, bias, residual, float(eps))
    return y, (h if residual is not None else None), mean, rstd


def norm_input_grad(dy: Tensor, dh: Optional[Tensor], x: Tensor, weight: Optional[Tensor],
                    mean: Optional[Tensor], rstd: Tensor) -> Tensor:
    """dx of :func:`norm_forward` (x: the normalised input, h with a residual; dh: the gradient
    reaching h from elsewhere, or None), without the weight gradients."""
    return torch.ops.hybridpar.norm_input_backward(dy, dh, x, weight, mean, rstd)


def norm_weight_grads(dy: Tensor, x: Tensor, mean: Optional[Tensor], rstd: Tensor, has_weight: bool,
                      has_bias: bool):
    """``(dweight, dbias)`` of :func:`norm_forward` in the compute dtype, None where not asked."""
    dw, db = torch.ops.hybridpar.norm_weight_backward(dy, x, mean, rstd, has_weight, has_bias)
    return (dw if has_weight else None), (db if has_bias else None)


# ---------------------------------------------------------------------------- public

def _normalized_shape(op, x, normalized_shape):
    """The trailing dims of x to normalise over, as a tuple (the last one by default)."""
    if normalized_shape is None:
        return (x.shape[-1],)
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
    try:
        shape = tuple(shape)
    except TypeError:
        shape = None
    if not shape or any(isinstance(n, bool) or not isinstance(n, int) for n in shape):
        raise ValueError(f"{op}: normalized_shape must be an int or a non-empty sequence of "
                         f"ints, got {normalized_shape!r}")
    if len(shape) > x.dim() or tuple(x.shape[x.dim() - len(shape):]) != shape:
        raise ValueError(f"{op}: x's trailing dimensions must be normalized_shape {shape}, "
                         f"got x of shape {tuple(x.shape)}")
    return shape


def _check_norm_args(op, x, weight, bias, eps, residual, normalized_shape):
    """Checks the arguments; returns the normalised shape."""
    _checks.check_tensor(op, "x", x)
    if x.dim() == 0:
        raise ValueError(f"{op}: x must have at least one dimension, got a 0-d tensor")
    shape = _normalized_shape(op, x, normalized_shape)
    _checks.check_optional(op, "weight", weight, shape, x.device)
    _checks.check_optional(op, "bias", bias, shape, x.device)
    _checks.check_optional(op, "residual", residual, x.shape, x.device)
    if residual is not None and residual.dtype != x.dtype:
        raise TypeError(f"{op}: residual must have the dtype of x ({x.dtype}), got {residual.dtype}")
    _checks.check_positive(op, "eps", eps)
    return shape


def _flat(t: Optional[Tensor], ndim: int) -> Optional[Tensor]:
    """`t` with its last `ndim` dims merged into one: the custom ops normalise the last dim."""
    return None if t is None or ndim == 1 else t.flatten(t.dim() - ndim)


def layer_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5, residual: Optional[Tensor] = None, *, normalized_shape=None):
    """LayerNorm over the trailing ``normalized_shape`` dims of ``x`` (default: the last).

    As ``torch.nn.functional.layer_norm(x, normalized_shape, weight, bias, eps)``; with
    ``residual``, computes ``h = x + residual`` and returns ``(layer_norm(h), h)`` in one
    pass, the add + norm of a pre-norm transformer block. Statistics and accumulation are
    fp32 for half and fp32 inputs and fp64 for fp64 inputs; the output has the dtype of
    ``x``. ``weight`` and ``bias`` have shape ``normalized_shape`` and may have another
    floating dtype than ``x``.

    Where it differs from torch's function: the argument order (``normalized_shape`` is
    keyword-only and optional), ``eps`` must be positive (torch takes any number), and a
    ``weight`` or ``bias`` of another dtype than ``x`` is allowed on every device.
    """
    shape = _check_norm_args("layer_norm", x, weight, bias, eps, residual, normalized_shape)
    n = len(shape)
    if n == 1:
        y, h, _, _ = torch.ops.hybridpar.layer_norm(x, weight, bias, residual, float(eps))
    else:
        y, h, _, _ = torch.ops.hybridpar.layer_norm(
            _flat(x, n), _flat(weight, n), _flat(bias, n), _flat(residual, n), float(eps))
        y, h = y.view(x.shape), (h.view(x.shape) if residual is not None else h)
    return y if residual is None else (y, h)


def rms_norm(x: Tensor, weight: Optional[Tensor] = None, eps: Optional[float] = 1e-6,
             residual: Optional[Tensor] = None, *, normalized_shape=None):
    """RMSNorm over the trailing ``normalized_shape`` dims of ``x`` (default: the last):
    ``x / sqrt(mean(x**2) + eps) * weight``.

    As ``torch.nn.functional.rms_norm(x, normalized_shape, weight, eps)``, with
    ``eps=None`` meaning ``torch.finfo(x.dtype).eps`` as there; but the default ``eps`` is
    1e-6 (LLaMA's), not None. ``residual`` and precision as in :func:`layer_norm`.
    """
    _checks.check_tensor("rms_norm", "x", x)
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    shape = _check_norm_args("rms_norm", x, weight, None, eps, residual, normalized_shape)
    n = len(shape)
    if n == 1:
        y, h, _ = torch.ops.hybridpar.rms_norm(x, weight, residual, float(eps))
    else:
        y, h, _ = torch.ops.hybridpar.rms_norm(
            _flat(x, n), _flat(weight, n), _flat(residual, n), float(eps))
        y, h = y.view(x.shape), (h.view(x.shape) if residual is not None else h)
    return y if residual is None else (y, h)
