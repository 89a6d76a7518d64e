"""layer_norm / rms_norm against the float64 reference, through both implementations."""

import pytest
import torch

from hybridpar_ext import ops
from hybridpar_ext.ops import _backend
from hybridpar_ext.reference import norms as ref
from hybridpar_ext.testing import assert_close_to_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (shape, how to build x): odd widths, one row, many rows, 3-D, a non-contiguous view.
SHAPES = {
    "width1": (7, 1),
    "width33": (5, 33),
    "width1000_one_row": (1, 1000),
    "width4097": (3, 4097),
    "many_rows": (130, 96),
    "3d": (2, 3, 33),
}


def _norm(kind, impl, x, weight=None, bias=None, residual=None, eps=1e-5):
    if kind == "layer_norm":
        return impl.layer_norm(x, weight, bias, eps, residual=residual)
    return impl.rms_norm(x, weight, eps, residual=residual)


def _check_against_reference(kind, x, affine, with_residual):
    """Forward and every gradient of the op on x against float64 math on the same values."""
    torch.manual_seed(1)
    width, dtype, device = x.shape[-1], x.dtype, x.device
    inputs = {"x": x}
    if affine != "none":
        inputs["weight"] = torch.randn(width, dtype=dtype, device=device)
    if affine == "weight+bias" and kind == "layer_norm":
        inputs["bias"] = torch.randn(width, dtype=dtype, device=device)
    if with_residual:
        inputs["residual"] = torch.randn(x.shape, dtype=dtype, device=device)
    ours = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    exact = {k: v.detach().double().requires_grad_() for k, v in inputs.items()}

    outs = _norm(kind, ops, **ours)
    expected = _norm(kind, ref, **exact)
    if not with_residual:
        outs, expected = (outs,), (expected,)
    for name, o, e in zip(("y", "h"), outs, expected):
        assert o.dtype == dtype and o.shape == x.shape, name
        assert_close_to_reference(o, e, dtype, name=name)

    grads_out = [torch.randn_like(o) for o in outs]
    grads = torch.autograd.grad(outs, list(ours.values()), grads_out)
    ref_grads = torch.autograd.grad(expected, list(exact.values()), [g.double() for g in grads_out])
    # Each gradient is a sum of terms that are rounded in `dtype`; its error is bounded by
    # the size of those terms, which for a cancelling sum exceeds the result itself.
    h = exact["x"] + exact.get("residual", 0)
    centred = h - h.mean(-1, keepdim=True) if kind == "layer_norm" else h
    rstd = (centred.pow(2).mean(-1, keepdim=True) + 1e-5).rsqrt()
    dy = grads_out[0].double().abs()
    wdy = dy * (exact["weight"].abs() if "weight" in exact else 1)
    terms = {
        "x": (rstd * wdy).max().item(),
        "residual": (rstd * wdy).max().item(),
        "weight": (dy * h.abs() * rstd).reshape(-1, width).sum(0).max().item(),
        "bias": dy.reshape(-1, width).sum(0).max().item(),
    }
    for name, g, e in zip(ours, grads, ref_grads):
        assert g.dtype == ours[name].dtype and g.shape == ours[name].shape, name
        scale = terms[name]
        assert_close_to_reference(g, e, dtype, name=f"d{name}", scale=scale)


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("affine", ["none", "weight", "weight+bias"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_matches_reference(backend, device, kind, dtype, shape, affine, with_residual):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype, device=device) * 2 + 0.5
    _check_against_reference(kind, x, affine, with_residual)


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_input(backend, device, kind, dtype):
    # Every other row and a slice of the columns of a larger tensor: rows are strided.
    base = torch.randn(12, 150, dtype=dtype, device=device)
    x = base[::2, 10:110]
    assert not x.is_contiguous()
    _check_against_reference(kind, x, "weight+bias", with_residual=True)
    # A transposed input: the width is not the unit-stride dimension.
    xt = torch.randn(40, 6, dtype=dtype, device=device).t()
    _check_against_reference(kind, xt, "weight", with_residual=False)


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype,width", [(torch.float32, 16384), (torch.bfloat16, 65536),
                                         (torch.float32, 70001)], ids=str)
def test_wide_rows(backend, device, kind, dtype, width):
    # 16384 fp32 is the widest row kept in registers; the others take the chunked path.
    x = torch.randn(3, width, dtype=dtype, device=device) + 3.0
    _check_against_reference(kind, x, "weight+bias", with_residual=True)


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_mixed_precision_weight(backend, device, kind):
    x = torch.randn(9, 257, dtype=torch.bfloat16, device=device)
    weight = torch.randn(257, dtype=torch.float32, device=device, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    y = _norm(kind, ops, xr, weight)
    assert y.dtype == torch.bfloat16
    dy = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (xr, weight), dy)
    assert dw.dtype == torch.float32
    xd, wd = x.double().requires_grad_(), weight.detach().double().requires_grad_()
    e = _norm(kind, ref, xd, wd)
    edx, edw = torch.autograd.grad(e, (xd, wd), dy.double())
    assert_close_to_reference(y, e, torch.bfloat16, "y")
    assert_close_to_reference(dx, edx, torch.bfloat16, "dx")
    assert_close_to_reference(dw, edw, torch.bfloat16, "dweight")


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_float64_gradcheck(backend, device, kind):
    # torch's own finite-difference check, at its default (float64) tolerances.
    torch.manual_seed(0)
    x, r = (torch.randn(3, 2, 5, dtype=torch.float64, device=device, requires_grad=True)
            for _ in range(2))
    w, b = (torch.randn(2, 5, dtype=torch.float64, device=device, requires_grad=True)
            for _ in range(2))
    if kind == "layer_norm":
        fn = lambda x, w, b, r: ops.layer_norm(x, w, b, 1e-5, r, normalized_shape=(2, 5))  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, w, b, r))
    else:
        fn = lambda x, w, r: ops.rms_norm(x, w, 1e-5, r, normalized_shape=(2, 5))  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, w, r))


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_float64_runs_the_kernels(device, monkeypatch, kind):
    # The kernels compute in float64 for float64 inputs, so the backend sends them there.
    monkeypatch.setenv("HYBRIDPAR_BACKEND", "triton")
    norm = _backend.kernels("norm")
    calls = []
    for name in ("norm_fwd", "norm_bwd"):
        fn = getattr(norm, name)
        monkeypatch.setattr(norm, name, lambda *a, fn=fn, name=name, **k: calls.append(name) or fn(*a, **k))
    x = torch.randn(4, 10, dtype=torch.float64, device=device, requires_grad=True)
    y = _norm(kind, ops, x)
    torch.autograd.grad(y.sum(), x)
    assert calls == ["norm_fwd", "norm_bwd"]
    torch.testing.assert_close(y, _norm(kind, ref, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("shape", [(5, 33), (2, 3, 1000)], ids=["width33", "3d_width1000"])
def test_float64_is_float64_exact(backend, device, kind, shape):
    # Statistics and accumulation in float64: every gradient agrees with float64 autograd
    # to float64 rounding (fp32 statistics would leave errors near 1e-8).
    torch.manual_seed(0)
    _check_against_reference(kind, torch.randn(shape, dtype=torch.float64, device=device) * 2 + 0.5,
                             "weight+bias", with_residual=True)
    x = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(shape[-1], dtype=torch.float64, device=device, requires_grad=True)
    y = _norm(kind, ops, x, w)
    stats = (torch.ops.hybridpar.layer_norm(x, w, None, None, 1e-5)[2:] if kind == "layer_norm"
             else torch.ops.hybridpar.rms_norm(x, w, None, 1e-5)[2:])
    assert all(s.dtype == torch.float64 for s in stats)
    dw = torch.autograd.grad(y.sum(), w)[0]
    assert dw.dtype == torch.float64


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("normalized_shape", [(3, 7), (2, 3, 5), 11], ids=str)
def test_normalized_shape(backend, device, kind, dtype, normalized_shape):
    # Several trailing dims, as torch.nn.functional takes them, against torch's function.
    torch.manual_seed(0)
    trailing = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
    x = (torch.randn(4, *trailing, dtype=dtype, device=device) * 2 + 0.5).requires_grad_()
    w = torch.randn(trailing, dtype=dtype, device=device, requires_grad=True)
    b = torch.randn(trailing, dtype=dtype, device=device, requires_grad=True)
    r = torch.randn(x.shape, dtype=dtype, device=device, requires_grad=True)
    if kind == "layer_norm":
        y, h = ops.layer_norm(x, w, b, 1e-5, r, normalized_shape=normalized_shape)
        params = (w, b)
        torch_norm = lambda t, w, b: torch.nn.functional.layer_norm(t, trailing, w, b, 1e-5)  # noqa: E731
    else:
        y, h = ops.rms_norm(x, w, 1e-5, r, normalized_shape=normalized_shape)
        params = (w,)
        torch_norm = lambda t, w: torch.nn.functional.rms_norm(t, trailing, w, 1e-5)  # noqa: E731
    exact = [t.detach().double().requires_grad_() for t in (x, r, *params)]
    he = exact[0] + exact[1]
    ye = torch_norm(he, *exact[2:])
    assert y.shape == h.shape == x.shape and y.dtype == dtype
    assert_close_to_reference(y, ye, dtype, "y")
    assert_close_to_reference(h, he, dtype, "h")
    dy, dh = torch.randn_like(y), torch.randn_like(h)
    grads = torch.autograd.grad((y, h), (x, r, *params), (dy, dh))
    expected = torch.autograd.grad((ye, he), exact, (dy.double(), dh.double()))
    # The sizes of the rounded terms each gradient sums, as in _check_against_reference.
    rows = he.detach().flatten(1)
    centred = rows - rows.mean(-1, keepdim=True) if kind == "layer_norm" else rows
    rstd = (centred.pow(2).mean(-1, keepdim=True) + 1e-5).rsqrt()
    dy_rows = dy.double().abs().flatten(1)
    wdy = (dy_rows * exact[2].detach().abs().flatten()).max().item()
    terms = {"x": (rstd * wdy).max().item(), "residual": (rstd * wdy).max().item(),
             "weight": (dy_rows * rows.abs() * rstd).sum(0).max().item(),
             "bias": dy_rows.sum(0).max().item()}
    for name, g, e in zip(("x", "residual", "weight", "bias"), grads, expected):
        assert_close_to_reference(g, e, dtype, f"d{name}", scale=terms[name])


def test_rms_norm_eps_none_is_the_dtypes_epsilon(backend, device):
    # As torch.nn.functional.rms_norm: eps=None means torch.finfo(x.dtype).eps.
    x = torch.randn(3, 5, device=device) * 1e-4
    torch.testing.assert_close(ops.rms_norm(x, eps=None), torch.nn.functional.rms_norm(x, (5,)))


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_backward_is_deterministic(backend, device, kind):
    x = torch.randn(300, 515, device=device, requires_grad=True)
    w = torch.randn(515, device=device, requires_grad=True)
    r = torch.randn(300, 515, device=device, requires_grad=True)
    dy = torch.randn(300, 515, device=device)

    def grads():
        y, h = _norm(kind, ops, x, w, residual=r)
        return torch.autograd.grad((y * dy).sum() + h.sum(), (x, w, r))

    for a, b in zip(grads(), grads()):
        assert torch.equal(a, b)


def test_empty_rows(backend, device):
    x = torch.randn(0, 33, device=device, requires_grad=True)
    w = torch.randn(33, device=device, requires_grad=True)
    y = ops.layer_norm(x, w)
    assert y.shape == (0, 33)
    dx, dw = torch.autograd.grad(y.sum(), (x, w))
    assert dx.shape == (0, 33) and torch.equal(dw, torch.zeros_like(w))


# ----------------------------------------------------------------------- registration

def _sample_args(kind, device):
    x = torch.randn(4, 3, 33, device=device, requires_grad=True)
    w = torch.randn(33, device=device, requires_grad=True)
    b = torch.randn(33, device=device, requires_grad=True)
    r = torch.randn(4, 3, 33, device=device, requires_grad=True)
    if kind == "layer_norm":
        return [(x, w, b, r, 1e-5), (x, None, None, None, 1e-5), (x, w, None, r, 1e-3)]
    return [(x, w, r, 1e-6), (x, None, None, 1e-6)]


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_opcheck(backend, device, kind):
    op = getattr(torch.ops.hybridpar, kind).default
    for args in _sample_args(kind, device):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_opcheck_backward_ops(backend, device, kind):
    x = torch.randn(6, 40, device=device)
    dy = torch.randn(6, 40, device=device)
    w = torch.randn(40, device=device)
    rstd = torch.rand(6, device=device) + 0.5
    if kind == "layer_norm":
        mean = torch.randn(6, device=device)
        torch.library.opcheck(torch.ops.hybridpar.layer_norm_backward.default,
                              (dy, None, x, w, True, mean, rstd))
        torch.library.opcheck(torch.ops.hybridpar.layer_norm_backward.default,
                              (dy, dy.clone(), x, None, False, mean, rstd))
    else:
        torch.library.opcheck(torch.ops.hybridpar.rms_norm_backward.default,
                              (dy, None, x, w, rstd))
        torch.library.opcheck(torch.ops.hybridpar.rms_norm_backward.default,
                              (dy, dy.clone(), x, None, rstd))


# ------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_bad_input(kind):
    fn = getattr(ops, kind)
    x = torch.randn(4, 8)
    cases = [
        (dict(x=torch.ones(4, 8, dtype=torch.int64)), TypeError, "x must have a floating dtype"),
        (dict(x=torch.tensor(1.0)), ValueError, "x must have at least one dimension"),
        (dict(x=x, weight=torch.ones(7)), ValueError, r"weight must have shape \(8,\)"),
        (dict(x=x, weight=torch.ones(8, dtype=torch.int32)), TypeError, "weight must have a floating"),
        (dict(x=x, weight=torch.ones(8, device="meta")), ValueError, "weight is on meta"),
        (dict(x=x, residual=torch.ones(4, 9)), ValueError, r"residual must have shape \(4, 8\)"),
        (dict(x=x, residual=torch.ones(4, 8, dtype=torch.float64)), TypeError, "residual must have the dtype"),
        (dict(x=x, eps=0.0), ValueError, "eps must be a positive number"),
        (dict(x=x, eps=-1e-5), ValueError, "eps must be a positive number"),
        (dict(x=x, eps="1e-5"), ValueError, "eps must be a positive number"),
        (dict(x=[1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
    ]
    x3 = torch.randn(4, 2, 8)
    cases += [
        (dict(x=x3, normalized_shape=(4, 8)), ValueError,
         r"x's trailing dimensions must be normalized_shape \(4, 8\), got x of shape \(4, 2, 8\)"),
        (dict(x=x, normalized_shape=(2, 4, 8)), ValueError,
         r"x's trailing dimensions must be normalized_shape \(2, 4, 8\)"),
        (dict(x=x, normalized_shape=()), ValueError, "normalized_shape must be an int or a non-empty"),
        (dict(x=x, normalized_shape=8.0), ValueError, "normalized_shape must be an int or a non-empty"),
        (dict(x=x3, weight=torch.ones(8), normalized_shape=(2, 8)), ValueError,
         r"weight must have shape \(2, 8\), got \(8,\)"),
    ]
    if kind == "layer_norm":
        cases.append((dict(x=x, bias=torch.ones(4)), ValueError, r"bias must have shape \(8,\)"))
    for kwargs, error, message in cases:
        with pytest.raises(error, match=f"{kind}: {message}"):
            fn(**kwargs)
