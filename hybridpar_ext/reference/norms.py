"""LayerNorm and RMSNorm, plainly.

Two kinds of function live here:

- ``layer_norm`` / ``rms_norm``: the definition, written out as the textbook formula and
  differentiated by autograd. The tests run it in float64 as the oracle.
- ``*_fwd`` / ``*_bwd``: the CPU fallback behind the custom ops, with the explicit
  backward the Triton kernels also implement. They compute in ``acc_dtype(x.dtype)``:
  fp32 for half and fp32 inputs, fp64 for fp64 inputs, and return the statistics and the
  weight/bias gradients in that dtype, so a float64 backward is float64 throughout (an
  fp32 rstd alone costs a float64 gradient about eight digits). LayerNorm goes through
  ``torch.native_layer_norm`` so that the fallback costs what ``F.layer_norm`` costs.

All take ``x`` of any leading shape and normalise over the last dimension; the
``*_fwd``/``*_bwd`` functions take 2-D ``(rows, width)`` tensors.
"""

import torch

from ._dtypes import acc_dtype


def layer_norm(x, weight=None, bias=None, eps=1e-5, residual=None):
    h = x if residual is None else x + residual
    mean = h.mean(-1, keepdim=True)
    var = ((h - mean) ** 2).mean(-1, keepdim=True)
    y = (h - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y if residual is None else (y, h)


def rms_norm(x, weight=None, eps=1e-6, residual=None):
    h = x if residual is None else x + residual
    y = h / torch.sqrt((h * h).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight
    return y if residual is None else (y, h)


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


def layer_norm_fwd(x, weight, bias, residual, eps):
    """Returns ``(y, h, mean, rstd)``; h is None without residual."""
    h = None if residual is None else x + residual
    src = x if h is None else h
    acc = acc_dtype(x.dtype)
    y, mean, rstd = torch.native_layer_norm(
        src.to(acc), [src.shape[-1]], _cast(weight, acc), _cast(bias, acc), eps)
    return y.to(x.dtype), h, mean.view(-1), rstd.view(-1)


def layer_norm_bwd(dy, dh, x, weight, has_bias, mean, rstd, weight_grads=True):
    """Returns ``(dx, dweight, dbias)``: dx in the dtype of x, dweight/dbias (None where
    absent, or not asked for: ``weight_grads=False``) in the compute dtype."""
    acc = acc_dtype(x.dtype)
    width = x.shape[-1]
    # native_layer_norm_backward only reads the bias to know whether dbias is wanted.
    bias = torch.empty(width, dtype=acc, device=x.device) if has_bias else None
    dx, dw, db = torch.ops.aten.native_layer_norm_backward(
        dy.to(acc), x.to(acc), [width], mean.to(acc).view(-1, 1), rstd.to(acc).view(-1, 1),
        _cast(weight, acc), bias, [True, weight is not None and weight_grads, has_bias and weight_grads])
    if dh is not None:
        dx = dx + dh.to(acc)
    return dx.to(x.dtype), dw, db


def rms_norm_fwd(x, weight, residual, eps):
    """Returns ``(y, h, rstd)``; h is None without residual, rstd is in the compute dtype."""
    h = None if residual is None else x + residual
    src = (x if h is None else h).to(acc_dtype(x.dtype))
    rstd = torch.rsqrt(src.pow(2).mean(-1) + eps)
    y = src * rstd.unsqueeze(-1)
    if weight is not None:
        y = y * weight.to(y.dtype)
    return y.to(x.dtype), h, rstd


def rms_norm_bwd(dy, dh, x, weight, rstd, weight_grads=True):
    """Returns ``(dx, dweight)``; dweight (in the compute dtype) is None without weight or
    with ``weight_grads=False``."""
    acc = acc_dtype(x.dtype)
    dy = dy.to(acc)
    rstd = rstd.to(acc).unsqueeze(-1)
    xhat = x.to(acc) * rstd
    wdy = dy if weight is None else dy * weight.to(acc)
    c1 = (xhat * wdy).mean(-1, keepdim=True)
    dx = (wdy - xhat * c1) * rstd
    if dh is not None:
        dx = dx + dh.to(acc)
    dw = None if weight is None or not weight_grads else (dy * xhat).sum(0)
    return dx.to(x.dtype), dw


def norm_weight_grads(dy, x, mean, rstd, has_weight, has_bias):
    """``(dweight, dbias)`` of a LayerNorm (``mean`` given) or an RMSNorm (``mean`` None) from
    its output gradient, normalised input and statistics, in the compute dtype (None where
    not asked for): the half of the backward that zero bubble runs apart from dx."""
    acc = acc_dtype(x.dtype)
    dy = dy.to(acc)
    dw = db = None
    if has_weight:
        centred = x.to(acc) if mean is None else x.to(acc) - mean.to(acc).unsqueeze(-1)
        dw = (dy * (centred * rstd.to(acc).unsqueeze(-1))).sum(0)
    if has_bias:
        db = dy.sum(0)
    return dw, db
