"""Our drop-ins and ops on PyTorch's own test samples.

- torch's ModuleInfo samples (``common_modules.module_db``) of LayerNorm, RMSNorm and
  MultiheadAttention through ``hybridpar_ext.nn``'s drop-ins, float32 and float64, training
  and eval: the output and every gradient (inputs and parameters) against torch's module with
  the same state_dict, run in float64 as the oracle, at the tolerance of the dtype. A case the
  drop-in sends to torch's implementation passes only if it says so (the warning) and its
  results are torch's, bit for bit.
- torch's OpInfo samples (``common_methods_invocations.op_db``) of
  ``nn.functional.layer_norm``, ``rms_norm`` and ``scaled_dot_product_attention`` through
  ``ops``, where their arguments map; a sample that cannot map is skipped, saying why.

The sample lists ship inside the torch wheel; importing them needs ``expecttest``.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_map

import hybridpar_ext.nn as hnn
from hybridpar_ext import ops
from hybridpar_ext.testing import assert_close_to_reference

pytest.importorskip("expecttest", reason="torch's test samples need expecttest (pip install '.[test]')")
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402
from torch.testing._internal.common_modules import module_db  # noqa: E402

DTYPES = (torch.float32, torch.float64)
DROP_INS = {torch.nn.LayerNorm: hnn.LayerNorm, torch.nn.RMSNorm: hnn.RMSNorm,
            torch.nn.MultiheadAttention: hnn.MultiheadAttention}
FALLBACK = "using torch's implementation"


def _tensors(tree):
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _copy(tree, dtype=None):
    """Fresh leaves with the same values (in `dtype` if given, for floating tensors)."""
    def copy(t):
        if not isinstance(t, torch.Tensor):
            return t
        floating = t.is_floating_point()
        c = t.detach().to(dtype) if dtype is not None and floating else t.detach().clone()
        return c.requires_grad_(t.requires_grad and floating)
    return tree_map(copy, tree)


def _run(module, args, kwargs, cotangents=None):
    """Output tensors, and the gradients of sum(output * cotangent) with respect to every
    input and parameter that requires grad (zeros where one does not reach the output)."""
    outs = [o for o in _tensors(module(*args, **kwargs)) if o.is_floating_point()]
    leaves = [t for t in _tensors((args, kwargs)) if t.requires_grad] + list(module.parameters())
    if cotangents is None:
        cotangents = [torch.randn_like(o) for o in outs]
    loss = sum((o * c.to(o.dtype)).sum() for o, c in zip(outs, cotangents) if o.requires_grad)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True) if torch.is_tensor(loss) else []
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]
    return outs, grads, cotangents


# ----------------------------------------------------------------------- ModuleInfo

def _module_samples(info, dtype, training, device="cpu"):
    return info.module_inputs_func(info, device=device, dtype=dtype, requires_grad=True,
                                   training=training)


def _module_cases():
    for info in module_db:
        if info.module_cls not in DROP_INS:
            continue
        # torch's MultiheadAttention samples all ask for the attention weights (the default),
        # which only torch's implementation returns; run them once more without, as a user
        # of the fused path would.
        variants = ([{}, {"need_weights": False}] if info.module_cls is torch.nn.MultiheadAttention
                    else [{}])
        for dtype in DTYPES:
            for training in (True, False):
                for i, sample in enumerate(_module_samples(info, dtype, training)):
                    for extra in variants:
                        mode = "train" if training else "eval"
                        desc = f"-{sample.desc}" if sample.desc else ""
                        desc += "".join(f"-{k}={v}" for k, v in extra.items())
                        yield pytest.param(info, dtype, training, i, extra,
                                           id=f"{info.name}-{str(dtype)[6:]}-{mode}-{i}{desc}")


def _assert_as_close_as_torch(ours, theirs, exact, dtype, name):
    """`ours` within the dtype's tolerance of the float64 oracle `exact`, or, where the
    problem is too ill-conditioned for that dtype (torch's module in the same dtype, `theirs`,
    misses the tolerance too), no further from the oracle than twice torch's own error.

    torch's attention samples take inputs up to 9 in magnitude: with random projections the
    softmax saturates and a float32 gradient through it is a small difference of large terms.
    """
    try:
        assert_close_to_reference(ours, exact, dtype, name=name)
    except AssertionError:
        try:
            assert_close_to_reference(theirs, exact, dtype, name=name)
        except AssertionError:
            ours_err = (ours.detach().double() - exact).abs().max().item()
            torch_err = (theirs.detach().double() - exact).abs().max().item()
            assert ours_err <= 2 * torch_err, (
                f"{name} ({dtype}): error {ours_err:.3g} against float64, torch's own {torch_err:.3g}")
        else:
            raise


def _must_fall_back(theirs, kwargs):
    """Cases our MultiheadAttention documents as torch's: attention weights asked for (the
    default), a padding mask, add_bias_kv / add_zero_attn."""
    if not isinstance(theirs, torch.nn.MultiheadAttention):
        return False
    return (kwargs.get("need_weights", True) or kwargs.get("key_padding_mask") is not None
            or theirs.bias_k is not None or theirs.add_zero_attn)


@pytest.mark.parametrize("info,dtype,training,index,extra_kwargs", list(_module_cases()))
def test_module_samples(backend, device, info, dtype, training, index, extra_kwargs):
    torch.manual_seed(index)
    sample = _module_samples(info, dtype, training, device)[index]
    ctor = sample.constructor_input
    theirs = info.module_cls(*ctor.args, **ctor.kwargs).to(device=device, dtype=dtype)
    with torch.no_grad():  # non-trivial parameters: default ones and zeros hide bugs
        for p in theirs.parameters():
            p.normal_()
    ours = DROP_INS[info.module_cls](*ctor.args, **ctor.kwargs).to(device=device, dtype=dtype)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    theirs.train(training)
    ours.train(training)
    args, kwargs = sample.forward_input.args, dict(sample.forward_input.kwargs, **extra_kwargs)

    if _must_fall_back(theirs, kwargs):
        with pytest.warns(UserWarning, match=FALLBACK):
            outs, grads, cotangents = _run(ours, *_copy((args, kwargs)))
        fell_back = True
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outs, grads, cotangents = _run(ours, *_copy((args, kwargs)))
        fell_back = any(FALLBACK in str(w.message) for w in caught)
    if fell_back:
        # torch's implementation: the very same numbers as torch's module in this dtype.
        same_outs, same_grads, _ = _run(theirs, *_copy((args, kwargs)), cotangents)
        assert len(outs) == len(same_outs) and len(grads) == len(same_grads)
        for a, b in zip(outs + grads, same_outs + same_grads):
            assert torch.equal(a, b)
        return
    # The fused path: against torch's module run in float64 (the oracle), the same state_dict.
    torch_outs, torch_grads, _ = _run(theirs, *_copy((args, kwargs)), cotangents)
    exact = theirs.to(torch.float64)
    exact_outs, exact_grads, _ = _run(exact, *_copy((args, kwargs), torch.float64), cotangents)
    assert len(outs) == len(exact_outs) and len(grads) == len(exact_grads)
    names = [f"output {n}" for n in range(len(outs))]
    names += [f"d(input {n})" for n in range(len(grads) - len(list(exact.parameters())))]
    names += [f"d({name})" for name, _ in exact.named_parameters()]
    for name, a, t, e in zip(names, outs + grads, torch_outs + torch_grads, exact_outs + exact_grads):
        assert a.dtype == dtype and a.shape == e.shape, name
        _assert_as_close_as_torch(a, t, e, dtype, name)


def test_module_samples_cover_every_drop_in():
    covered = {info.module_cls for info in module_db}
    assert set(DROP_INS) <= covered


# ------------------------------------------------------------------------- OpInfo

OPS = ("nn.functional.layer_norm", "nn.functional.rms_norm",
       "nn.functional.scaled_dot_product_attention")


def _norm_term_scales(kind, shape, eps, exact, dy):
    """The size of the rounded terms each gradient of a norm sums (x, weight, bias), as in
    tests/ops/test_norm_ops.py: a gradient that cancels to nearly nothing (dweight over one
    column, whose x-hat is exactly 0) is held to those terms, not to itself."""
    width = torch.Size(shape).numel()
    x = exact[0].detach().reshape(-1, width)
    if x.numel() == 0:
        return [0.0, 0.0, 0.0]
    centred = x - x.mean(-1, keepdim=True) if kind == "layer_norm" else x
    if eps is None:
        eps = torch.finfo(dy.dtype).eps
    rstd = (centred.pow(2).mean(-1, keepdim=True) + eps).rsqrt()
    dy = dy.double().abs().reshape(-1, width)
    w = exact[1].detach().abs().reshape(-1) if len(exact) > 1 and exact[1] is not None else 1.0
    return [(rstd * dy * w).max().item(), (dy * x.abs() * rstd).sum(0).max().item(),
            dy.sum(0).max().item()]


def _norm_call(name, sample):
    """(ours, torch's, tensors, gradient scales) for the sample, or why it cannot map."""
    kind = name.split(".")[-1]
    shape, *params = sample.args
    eps = sample.kwargs.get("eps", 1e-5 if kind == "layer_norm" else None)
    if eps is not None and eps <= 0:
        return f"eps={eps}: our ops take a positive eps only"
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if name.endswith("layer_norm"):
        def ours(x, weight=None, bias=None):
            return ops.layer_norm(x, weight, bias, eps, normalized_shape=shape)

        def theirs(x, weight=None, bias=None):
            return F.layer_norm(x, shape, weight, bias, eps)
    else:
        def ours(x, weight=None):
            return ops.rms_norm(x, weight, eps, normalized_shape=shape)

        def theirs(x, weight=None):
            return F.rms_norm(x, shape, weight, eps)

    def scales(exact, dy, exact_grads):
        return _norm_term_scales(kind, shape, eps, exact, dy)
    return ours, theirs, [sample.input, *params], scales


def _attention_call(sample, dtype):
    q, (k, v) = sample.input, sample.args
    kw = dict(sample.kwargs)
    if kw.pop("dropout_p", 0.0):
        return "dropout_p > 0: our attention has no dropout"
    if kw.pop("attn_mask", None) is not None:
        return "attn_mask: our attention takes causal and window masks, not a tensor mask"
    causal = kw.pop("is_causal", False)
    if causal and q.shape[-2] != k.shape[-2]:
        return ("is_causal with seqlen_q != seqlen_k: torch aligns the mask top-left, "
                "ours bottom-right (as flash-attn)")
    if kw.pop("enable_gqa", False):
        return "enable_gqa: our op takes GQA as (batch, seqlen, heads, head_dim) heads"
    scale = kw.pop("scale", None)
    if kw:
        return f"arguments our op does not take: {sorted(kw)}"

    def ours(q, k, v):
        # torch's (..., seqlen, head_dim) with broadcast leading dims becomes our
        # (batch, seqlen, 1 head, head_dim): every leading index is independent.
        lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
        flat = [t.expand(*lead, *t.shape[-2:]).reshape(-1, *t.shape[-2:]).unsqueeze(2)
                for t in (q, k, v)]
        out = ops.attention(*flat, causal=causal, softmax_scale=scale)
        return out.squeeze(2).reshape(*lead, q.shape[-2], v.shape[-1])

    def theirs(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    def scales(exact, dy, exact_grads):
        # As tests/ops/test_attention_op.py: dq, dk and dv are held to the largest of them.
        return [max(g.abs().max().item() for g in exact_grads)] * 3
    return ours, theirs, [q, k, v], scales


def _op_samples(op, dtype, device="cpu"):
    return list(op.sample_inputs(device, dtype, requires_grad=True))


def _op_cases():
    for op in op_db:
        if op.name not in OPS:
            continue
        for dtype in DTYPES:
            for i, _ in enumerate(_op_samples(op, dtype)):
                yield pytest.param(op, dtype, i, id=f"{op.name[14:]}-{str(dtype)[6:]}-{i}")


@pytest.mark.parametrize("op,dtype,index", list(_op_cases()))
def test_op_samples(backend, device, op, dtype, index):
    torch.manual_seed(index)
    sample = _op_samples(op, dtype, device)[index]
    call = (_attention_call(sample, dtype) if op.name.endswith("attention")
            else _norm_call(op.name, sample))
    if isinstance(call, str):
        pytest.skip(f"cannot map onto our op: {call}")
    ours, theirs, tensors, scales = call
    inputs = _copy(tensors)
    exact = _copy(tensors, torch.float64)
    y, e = ours(*inputs), theirs(*exact)
    assert y.dtype == dtype and y.shape == e.shape
    assert_close_to_reference(y, e, dtype, name="output")
    leaves = [(n, a, b) for n, (a, b) in enumerate(zip(inputs, exact)) if a.requires_grad]
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [a for _, a, _ in leaves], dy)
    exact_grads = torch.autograd.grad(e, [b for _, _, b in leaves], dy.double())
    scale = scales(exact, dy, exact_grads)
    for (n, _, _), g, eg in zip(leaves, grads, exact_grads):
        assert_close_to_reference(g, eg, dtype, name=f"d(argument {n})", scale=scale[n])


def test_op_samples_exist():
    assert {op.name for op in op_db} >= set(OPS)
