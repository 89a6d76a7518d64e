"""attention against the float64 reference, through both implementations."""

import pytest
import torch

from hybridpar_ext import ops
from hybridpar_ext.reference import attention as ref
from hybridpar_ext.testing import assert_close_to_reference

# (batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, causal, window)
CASES = {
    "len1": (1, 1, 1, 2, 2, 16, False, None),
    "b3_len17_causal_d40": (3, 17, 17, 4, 4, 40, True, None),
    "gqa8to2_q100_k129_causal": (1, 100, 129, 8, 2, 64, True, None),
    "gqa8to2_q129_k100_causal_d80": (3, 129, 100, 8, 2, 80, True, None),
    "mqa_len129_d128": (1, 129, 129, 4, 1, 128, False, None),
    "window16_0_d96": (1, 100, 100, 2, 1, 96, False, (16, 0)),
    "window8_8_causal_q17_k100": (2, 17, 100, 2, 2, 64, True, (8, 8)),
    "window_left_only": (1, 100, 100, 2, 2, 32, False, (20, None)),
    "decode_q1_k129": (1, 1, 129, 4, 2, 64, True, None),
    "diagonal_only": (1, 33, 33, 2, 2, 16, False, (0, 0)),
    "d256": (1, 64, 64, 2, 2, 256, True, None),
}
HALF_CASES = ["b3_len17_causal_d40", "gqa8to2_q100_k129_causal", "gqa8to2_q129_k100_causal_d80"]


def _skip_interpreted_bf16(backend, dtype, device):
    if backend == "triton" and dtype == torch.bfloat16 and device.type == "cpu":
        pytest.skip("Triton's interpreter computes tl.dot on bf16 wrongly; bf16 runs on a GPU")


def _compare(q, k, v, *, causal=False, window=None, cu_seqlens_q=None, cu_seqlens_k=None,
             lse_grad=False):
    """Output, lse and dq/dk/dv of ops.attention against float64 autograd of the reference."""
    dtype = q.dtype
    ours = [t.detach().requires_grad_() for t in (q, k, v)]
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    kwargs = dict(causal=causal, window=window, cu_seqlens_q=cu_seqlens_q,
                  cu_seqlens_k=cu_seqlens_k, return_lse=True)
    out, lse = ops.attention(*ours, **kwargs)
    e_out, e_lse = ref.attention(*exact, **kwargs)
    assert out.shape == q.shape and out.dtype == dtype and lse.dtype == torch.float32
    assert_close_to_reference(out, e_out, dtype, "out")
    seen = torch.isfinite(e_lse)
    assert torch.equal(torch.isfinite(lse), seen), "rows that see no key must have lse -inf"
    assert torch.all(lse[~seen] == float("-inf"))
    # The lse is fp32 whatever the input dtype; its error comes from the rounded inputs.
    assert_close_to_reference(lse[seen], e_lse[seen], dtype, "lse")

    dout = torch.randn_like(out)
    outs, grads = [out], [dout]
    e_outs, e_grads = [e_out], [dout.double()]
    if lse_grad:
        dlse = torch.randn_like(lse)
        outs.append(lse[seen]), grads.append(dlse[seen])
        e_outs.append(e_lse[seen]), e_grads.append(dlse[seen].double())
    got = torch.autograd.grad(outs, ours, grads)
    expected = torch.autograd.grad(e_outs, exact, e_grads)
    # dq and dk are sums of P * (dP - rowsum(dO * O)) terms that cancel (exactly, for a
    # single key); their rounding error follows the size of the gradients, not their own.
    grad_scale = max(e.abs().max().item() for e in expected if e.numel())
    for name, g, e, t in zip(("dq", "dk", "dv"), got, expected, (q, k, v)):
        assert g.shape == t.shape and g.dtype == dtype, name
        assert_close_to_reference(g, e, dtype, name, scale=grad_scale)


def _inputs(b, sq, sk, h, hk, d, dtype, device):
    torch.manual_seed(0)
    return (torch.randn(b, sq, h, d, dtype=dtype, device=device),
            torch.randn(b, sk, hk, d, dtype=dtype, device=device),
            torch.randn(b, sk, hk, d, dtype=dtype, device=device))


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_reference_fp32(backend, device, case):
    b, sq, sk, h, hk, d, causal, window = case
    _compare(*_inputs(b, sq, sk, h, hk, d, torch.float32, device), causal=causal, window=window)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", HALF_CASES)
def test_matches_reference_half(backend, device, dtype, name):
    _skip_interpreted_bf16(backend, dtype, device)
    b, sq, sk, h, hk, d, causal, window = CASES[name]
    _compare(*_inputs(b, sq, sk, h, hk, d, dtype, device), causal=causal, window=window)


def _packed(lengths_q, lengths_k, h, hk, d, dtype, device):
    torch.manual_seed(0)
    cu = lambda lens: torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(),  # noqa: E731
                                   dtype=torch.int32, device=device)
    q = torch.randn(sum(lengths_q), h, d, dtype=dtype, device=device)
    k = torch.randn(sum(lengths_k), hk, d, dtype=dtype, device=device)
    v = torch.randn(sum(lengths_k), hk, d, dtype=dtype, device=device)
    return q, k, v, cu(lengths_q), cu(lengths_k)


@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (True, (6, 0)),
                                           (False, (3, 9))], ids=str)
def test_varlen_matches_reference(backend, device, causal, window):
    # Sequences of different lengths, including 1 and an empty one, some with more keys
    # than queries and some with fewer.
    q, k, v, cu_q, cu_k = _packed([5, 1, 40, 0, 33], [7, 1, 40, 3, 20], 4, 2, 48,
                                  torch.float32, device)
    _compare(q, k, v, causal=causal, window=window, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


def test_varlen_half(backend, device):
    q, k, v, cu_q, cu_k = _packed([17, 1, 64], [17, 1, 64], 2, 2, 64, torch.float16, device)
    _compare(q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


def test_varlen_equals_padded_per_sequence(backend, device):
    q, k, v, cu_q, cu_k = _packed([9, 30], [9, 30], 2, 1, 32, torch.float32, device)
    packed = ops.attention(q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    for a, b in ((0, 9), (9, 39)):
        alone = ops.attention(q[None, a:b], k[None, a:b], v[None, a:b], causal=True)[0]
        torch.testing.assert_close(packed[a:b], alone, rtol=1e-5, atol=1e-5)


def test_gradient_through_lse(backend, device):
    _compare(*_inputs(2, 33, 40, 4, 2, 32, torch.float32, device), causal=True, lse_grad=True)
    q, k, v, cu_q, cu_k = _packed([5, 1, 20], [6, 0, 20], 2, 2, 16, torch.float32, device)
    _compare(q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, lse_grad=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_non_contiguous_views_of_fused_qkv(backend, device, dtype):
    torch.manual_seed(0)
    b, s, h, d = 2, 45, 4, 40
    qkv = torch.randn(b, s, 3, h, d, dtype=dtype, device=device)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous() and q.stride(-1) == 1
    _compare(q, k, v, causal=True)
    # Heads-first storage viewed as (b, s, h, d): strided tokens and heads.
    qt = torch.randn(b, h, s, d, dtype=dtype, device=device).transpose(1, 2)
    _compare(qt, k, v)


def test_backward_is_deterministic(backend, device):
    q, k, v = (t.requires_grad_() for t in _inputs(1, 129, 129, 4, 2, 64, torch.float32, device))
    dout = torch.randn_like(q)

    def grads():
        return torch.autograd.grad(ops.attention(q, k, v, causal=True), (q, k, v), dout)

    for a, b in zip(grads(), grads()):
        assert torch.equal(a, b)


def test_default_scale_and_explicit_scale(backend, device):
    q, k, v = _inputs(1, 20, 20, 2, 2, 64, torch.float32, device)
    torch.testing.assert_close(ops.attention(q, k, v), ops.attention(q, k, v, softmax_scale=0.125))
    out = ops.attention(q, k, v, softmax_scale=0.3)
    expected = ref.attention(q.double(), k.double(), v.double(), softmax_scale=0.3)
    assert_close_to_reference(out, expected, torch.float32, "out")


def test_matches_sdpa(backend, device):
    q, k, v = _inputs(2, 50, 50, 4, 4, 32, torch.float32, device)
    ours = ops.attention(q, k, v, causal=True)
    theirs = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True).transpose(1, 2)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------- registration

def test_opcheck(backend, device):
    q, k, v = (t.requires_grad_() for t in _inputs(2, 17, 20, 4, 2, 16, torch.float32, device))
    op = torch.ops.hybridpar.attention.default
    torch.library.opcheck(op, (q, k, v, None, None, 17, 20, 0.25, True, -1, -1))
    torch.library.opcheck(op, (q, k, v, None, None, 17, 20, 0.25, False, 4, 2))
    qp, kp, vp, cu_q, cu_k = _packed([3, 9], [5, 9], 2, 1, 16, torch.float32, device)
    torch.library.opcheck(op, (qp.requires_grad_(), kp.requires_grad_(), vp.requires_grad_(),
                               cu_q, cu_k, 9, 9, 0.25, True, -1, -1))


def test_torch_compile_fullgraph(backend, device):
    torch._dynamo.reset()

    def block(q, k, v):
        return ops.attention(q, k, v, causal=True).sum(-1) * 2

    q, k, v = (t.requires_grad_() for t in _inputs(2, 19, 19, 4, 2, 32, torch.float32, device))
    compiled = torch.compile(block, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), block(q, k, v))
    g1 = torch.autograd.grad(compiled(q, k, v).sum(), (q, k, v))
    g2 = torch.autograd.grad(block(q, k, v).sum(), (q, k, v))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------- bad input

def test_float64_runs_the_reference_in_float64(backend):
    """float64 inputs (which the kernels do not take) run the reference under either backend
    setting, lse included, so that float64 training is float64-exact."""
    q, k, v = _inputs(2, 13, 13, 4, 2, 24, torch.float64, torch.device("cpu"))
    ours = [t.detach().requires_grad_() for t in (q, k, v)]
    exact = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = ops.attention(*ours, causal=True, return_lse=True)
    e_out, e_lse = ref.attention(*exact, causal=True, return_lse=True)
    assert out.dtype == lse.dtype == torch.float64
    assert_close_to_reference(out, e_out, torch.float64, "out")
    assert_close_to_reference(lse, e_lse, torch.float64, "lse")
    dout = torch.randn_like(out)
    got, expected = torch.autograd.grad(out, ours, dout), torch.autograd.grad(e_out, exact, dout)
    for name, g, e in zip(("dq", "dk", "dv"), got, expected):
        assert g.dtype == torch.float64, name
        assert_close_to_reference(g, e, torch.float64, name)


def test_bad_input():
    q = torch.randn(2, 8, 4, 32)
    k = v = torch.randn(2, 8, 2, 32)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    qp, kp = torch.randn(8, 4, 32), torch.randn(8, 2, 32)
    cases = [
        (dict(k=torch.randn(3, 8, 2, 32)), ValueError, "one batch size"),
        (dict(k=torch.randn(2, 8, 2, 16), v=torch.randn(2, 8, 2, 16)), ValueError, "one head_dim"),
        (dict(k=torch.randn(2, 8, 3, 32), v=torch.randn(2, 8, 3, 32)), ValueError,
         r"q heads \(4\) must be a multiple of the number of k/v heads \(3\)"),
        (dict(q=torch.randn(2, 8, 4, 264), k=torch.randn(2, 8, 2, 264), v=torch.randn(2, 8, 2, 264)),
         ValueError, r"head_dim must be in \[1, 256\], got 264"),
        (dict(q=q.long()), TypeError, "q must have a floating dtype"),
        (dict(k=k.half()), TypeError, "one dtype"),
        (dict(k=torch.randn(2, 8, 2, 32, device="meta")), ValueError, "k is on meta"),
        (dict(q=torch.randn(8, 4, 32)), ValueError, r"q must be \(batch, seqlen, heads, head_dim\)"),
        (dict(window=(-1, 0)), ValueError, "window left size must be a non-negative int"),
        (dict(window=(4,)), ValueError, r"window must be \(left, right\)"),
        (dict(softmax_scale=0.0), ValueError, "softmax_scale must be a positive number"),
        (dict(q=qp, k=kp, v=kp, cu_seqlens_q=cu), ValueError, "must be given together"),
        (dict(q=qp, k=kp, v=kp, cu_seqlens_q=cu.long(), cu_seqlens_k=cu), TypeError,
         "cu_seqlens_q must be int32"),
        (dict(q=qp, k=kp, v=kp, cu_seqlens_q=torch.tensor([1, 3, 8], dtype=torch.int32),
              cu_seqlens_k=cu), ValueError, "cu_seqlens_q must start at 0"),
        (dict(q=qp, k=kp, v=kp, cu_seqlens_q=cu, cu_seqlens_k=torch.tensor([0, 5, 3, 8], dtype=torch.int32)),
         ValueError, "cu_seqlens_k must be non-decreasing"),
        (dict(q=qp, k=kp, v=kp, cu_seqlens_q=torch.tensor([0, 3, 7], dtype=torch.int32),
              cu_seqlens_k=cu), ValueError, r"cu_seqlens_q must end at the number of tokens \(8\)"),
        (dict(q=qp, k=kp, v=kp, cu_seqlens_q=cu, cu_seqlens_k=torch.tensor([0, 8], dtype=torch.int32)),
         ValueError, "same length"),
        (dict(q=qp, k=kp, v=kp, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=4), ValueError,
         r"max_seqlen_q=4 is less than the longest sequence \(5\)"),
        (dict(q=qp, k=kp, v=kp, cu_seqlens_q=cu, cu_seqlens_k=cu.to("meta")), ValueError,
         "cu_seqlens_k is on meta"),
    ]
    for kwargs, error, message in cases:
        args = dict(q=q, k=k, v=v) | kwargs
        with pytest.raises(error, match=f"^attention: .*{message}"):
            ops.attention(**args)
