"""Helpers for testing against the float64 reference: tolerances by dtype."""

import torch

# Relative to the largest magnitude of the expected tensor: about two units in the last
# place of each dtype, so an error of a few roundings passes and a wrong formula fails.
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 2e-2,
}


def assert_close_to_reference(actual: torch.Tensor, expected: torch.Tensor, dtype=None, name="",
                              scale=None):
    """`actual` (computed in `dtype`) against `expected` (computed in float64).

    Elementwise ``|a - e| <= tol * (|e| + scale)``: relative error where values are large,
    and an absolute floor where they pass near zero. ``scale`` defaults to ``max|e|``; a
    result that is a small difference of large terms (a norm's input gradient, say) passes
    the size of those terms instead, since rounding them in `dtype` is unavoidable.
    """
    dtype = dtype or actual.dtype
    tol = TOLERANCE[dtype]
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if e.numel() == 0:
        return
    scale = max(e.abs().max().item(), scale or 0.0, 1e-30)
    torch.testing.assert_close(a, e, rtol=tol, atol=tol * scale,
                               msg=lambda m: f"{name} ({dtype}): {m}")
