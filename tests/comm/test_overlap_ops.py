"""all_gather_matmul and matmul_reduce_scatter on real gloo process groups, forward and
backward, against float64 math on the full data and against the plain composition
(hybridpar_ext.reference.comm) run on the same data. Each rank builds every rank's inputs
from seeds, so it can compute what it should receive."""

import os

import pytest
import torch

from hybridpar_ext.testing import assert_close_to_reference, run_ranks

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# (shape of one rank's x, split dimension, N): a gathered/scattered dimension of one row per
# rank, widths that are not powers of two, a 3-D x split on its first and on its middle dim.
CASES = [((1, 8), 0, 5), ((7, 3, 24), 0, 10), ((2, 5, 12), 1, 9)]
CHUNKS = [1, 2, 3, 8]


def _randn(shape, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _matmul_scale(a, b):
    """Largest sum of |terms| of a @ b.T: what rounding the products is relative to."""
    return (a.abs() @ b.abs().t()).max().item()


def _check_all_gather_matmul(rank, world, dtype, local_shape, dim, n_out, chunks, group=None):
    from hybridpar_ext import ops
    from hybridpar_ext.reference import comm as ref

    k = local_shape[-1]
    xs = [_randn(local_shape, 10 + r, dtype) for r in range(world)]
    ws = [_randn((n_out, k), 100 + r, dtype) for r in range(world)]
    full = torch.cat(xs, dim=dim)
    out_shape = full.shape[:-1] + (n_out,)
    dys = [_randn(out_shape, 1000 + r, dtype) for r in range(world)]

    x = xs[rank].clone().requires_grad_()
    w = ws[rank].clone().requires_grad_()
    out, gathered = ops.all_gather_matmul(x, w, group, gather_dim=dim, chunks=chunks, return_gathered=True)
    out.backward(dys[rank])

    f64 = [t.double() for t in (full, ws[rank], dys[rank])]
    tag = f"all_gather_matmul world={world} {tuple(local_shape)} dim={dim} chunks={chunks}"
    assert_close_to_reference(gathered, f64[0], dtype, f"{tag} gathered")
    assert_close_to_reference(out, f64[0] @ f64[1].t(), dtype, f"{tag} out",
                              scale=_matmul_scale(f64[0], f64[1]))
    # grad_x: every rank's grad of the gathered input, summed, this rank's rows.
    grad_full = sum(dys[r].double() @ ws[r].double() for r in range(world))
    grad_x = grad_full.chunk(world, dim=dim)[rank]
    scale = max(_matmul_scale(dys[r].double(), ws[r].double().t()) for r in range(world)) * world
    assert_close_to_reference(x.grad, grad_x, dtype, f"{tag} grad_x", scale=scale)
    grad_w = f64[2].reshape(-1, n_out).t() @ f64[0].reshape(-1, k)
    assert_close_to_reference(w.grad, grad_w, dtype, f"{tag} grad_weight",
                              scale=_matmul_scale(f64[2].reshape(-1, n_out).t(), f64[0].reshape(-1, k).t()))

    # The plain composition on the same data agrees too.
    x2 = xs[rank].clone().requires_grad_()
    w2 = ws[rank].clone().requires_grad_()
    out2, _ = ref.all_gather_matmul(x2, w2, group, dim)
    out2.backward(dys[rank])
    assert_close_to_reference(out, out2.double(), dtype, f"{tag} out vs composition",
                              scale=_matmul_scale(f64[0], f64[1]))
    assert_close_to_reference(x.grad, x2.grad.double(), dtype, f"{tag} grad_x vs composition",
                              scale=scale)


def _check_matmul_reduce_scatter(rank, world, dtype, local_shape, dim, n_out, chunks, group=None):
    from hybridpar_ext import ops
    from hybridpar_ext.reference import comm as ref

    k = local_shape[-1]
    full_shape = list(local_shape)
    full_shape[dim] *= world
    xs = [_randn(full_shape, 20 + r, dtype) for r in range(world)]
    ws = [_randn((n_out, k), 200 + r, dtype) for r in range(world)]
    out_shape = tuple(local_shape[:-1]) + (n_out,)
    dys = [_randn(out_shape, 2000 + r, dtype) for r in range(world)]

    x = xs[rank].clone().requires_grad_()
    w = ws[rank].clone().requires_grad_()
    out = ops.matmul_reduce_scatter(x, w, group, scatter_dim=dim, chunks=chunks)
    out.backward(dys[rank])

    tag = f"matmul_reduce_scatter world={world} {tuple(full_shape)} dim={dim} chunks={chunks}"
    summed = sum(xs[r].double() @ ws[r].double().t() for r in range(world))
    scale = max(_matmul_scale(xs[r].double(), ws[r].double()) for r in range(world)) * world
    assert_close_to_reference(out, summed.chunk(world, dim=dim)[rank], dtype, f"{tag} out", scale=scale)
    dy_full = torch.cat([d.double() for d in dys], dim=dim)
    w64, x64 = ws[rank].double(), xs[rank].double()
    assert_close_to_reference(x.grad, dy_full @ w64, dtype, f"{tag} grad_x",
                              scale=_matmul_scale(dy_full, w64.t()))
    dy_rows, x_rows = dy_full.reshape(-1, n_out), x64.reshape(-1, k)
    assert_close_to_reference(w.grad, dy_rows.t() @ x_rows, dtype, f"{tag} grad_weight",
                              scale=_matmul_scale(dy_rows.t(), x_rows.t()))

    x2 = xs[rank].clone().requires_grad_()
    w2 = ws[rank].clone().requires_grad_()
    out2 = ref.matmul_reduce_scatter(x2, w2, group, dim)
    out2.backward(dys[rank])
    assert_close_to_reference(out, out2.double(), dtype, f"{tag} out vs composition", scale=scale)
    assert_close_to_reference(w.grad, w2.grad.double(), dtype, f"{tag} grad_weight vs composition",
                              scale=_matmul_scale(dy_rows.t(), x_rows.t()))


def check_overlap_ops(rank, world, group=None):
    cases = 0
    for dtype in DTYPES.values():
        for local_shape, dim, n_out in CASES:
            for chunks in CHUNKS:
                _check_all_gather_matmul(rank, world, dtype, local_shape, dim, n_out, chunks, group)
                _check_matmul_reduce_scatter(rank, world, dtype, local_shape, dim, n_out, chunks, group)
                cases += 2
    return cases


def check_opcheck(rank, world, group=None):
    import torch.distributed as dist

    name = (group or dist.group.WORLD).group_name
    x = _randn((3, 2, 6), 5 + rank, torch.float32).requires_grad_()
    w = _randn((4, 6), 6 + rank, torch.float32).requires_grad_()
    torch.library.opcheck(torch.ops.hybridpar.all_gather_matmul.default, (x, w, name, 1, 2))
    xs = _randn((3, 2 * world, 6), 7 + rank, torch.float32).requires_grad_()
    torch.library.opcheck(torch.ops.hybridpar.matmul_reduce_scatter.default, (xs, w, name, 1, 2))
    return True


def check_bad_input(rank, world):
    """Every rank passes the same bad argument: every rank raises before any collective, and
    a good call afterwards still works (the ranks did not fall out of step)."""
    import torch.distributed as dist

    from hybridpar_ext import ops

    x, w = torch.randn(4, 6), torch.randn(5, 6)
    bad = [
        (lambda: ops.all_gather_matmul(x, torch.randn(5, 7)), ValueError, "weight must have shape (N, 6)"),
        (lambda: ops.all_gather_matmul(x, w.double()), TypeError, "weight must have the dtype of x"),
        (lambda: ops.all_gather_matmul(x, w, gather_dim=1), ValueError, "gather_dim must be a dimension of x other than the last"),
        (lambda: ops.all_gather_matmul(x, w, chunks=0), ValueError, "chunks must be a positive int"),
        (lambda: ops.all_gather_matmul(x.long(), w), TypeError, "x must have a floating dtype"),
        (lambda: ops.all_gather_matmul(torch.randn(6), w), ValueError, "x must have at least 2 dimensions"),
        (lambda: ops.all_gather_matmul(x, w, group="no-such-group"), ValueError, "'no-such-group' is not a registered process group"),
        (lambda: ops.matmul_reduce_scatter(torch.randn(world * 2 + 1, 6), w), ValueError, f"cannot be split evenly over the {world} ranks"),
        (lambda: ops.matmul_reduce_scatter(x, w, scatter_dim=-1), ValueError, "scatter_dim must be a dimension of x"),
        (lambda: ops.GradBucketReducer([torch.zeros(3)]), ValueError, "no tensor that requires grad"),
        (lambda: ops.GradBucketReducer([torch.zeros(3, requires_grad=True)], bucket_cap_mb=0), ValueError, "bucket_cap_mb must be a positive number"),
        # The C++ op checks too, for callers that go straight to torch.ops.
        (lambda: torch.ops.hybridpar.all_gather_matmul(x, w, "no-such-group", 0, 1), RuntimeError, "group 'no-such-group' is not a registered process group"),
        (lambda: torch.ops.hybridpar.matmul_reduce_scatter(x, torch.randn(5, 7), dist.group.WORLD.group_name, 0, 1), RuntimeError, "weight must have shape [N, 6]"),
    ]
    for call, error, message in bad:
        with pytest.raises(error) as info:
            call()
        assert message in str(info.value), str(info.value)
    out = ops.all_gather_matmul(torch.full((1, 6), float(rank)), torch.ones(2, 6))
    assert out[:, 0].tolist() == [6.0 * r for r in range(world)]
    return len(bad)


def check_debug_mode(rank, world):
    """Ranks disagree on a shape: with HYBRIDPAR_DEBUG=1 every rank raises and names the one
    that differs, instead of entering mismatched collectives."""
    from hybridpar_ext import ops

    assert os.environ["HYBRIDPAR_DEBUG"] == "1"
    rows = 3 if rank == 1 else 2
    messages = []
    for call in (lambda: ops.all_gather_matmul(torch.randn(rows, 6), torch.randn(4, 6)),
                 lambda: ops.matmul_reduce_scatter(torch.randn(4, rows), torch.randn(4, rows)),
                 lambda: ops.all_gather_matmul(torch.randn(2, 6), torch.randn(4, 6), chunks=rank + 1)):
        with pytest.raises(RuntimeError) as info:
            call()
        messages.append(str(info.value))
    assert "rank 1 of the group passed float32[3, 6]" in messages[0], messages[0]
    assert "rank 0 passed float32[2, 6]" in messages[0], messages[0]
    assert "rank 1" in messages[1] and "rank 1" in messages[2], messages
    # Agreeing ranks pass the check and get the right answer.
    out = ops.all_gather_matmul(torch.ones(2, 6), torch.ones(4, 6))
    assert out.shape == (2 * world, 4) and bool((out == 6).all())
    return messages[0]


SIZES = (2, 3, 4)   # the overlap ops on groups of 2, 3 and 4 ranks


def check_everything(rank, world):
    """Every check of this file that runs on gloo, in one launch of 4 processes (starting
    them is most of the cost): the overlap ops on groups of the first 2, 3 and all 4 ranks
    (the whole world through the default group), opcheck on 2, bad input and debug mode on
    all 4. Each result is keyed by its check; a rank outside a group reports nothing there."""
    import torch.distributed as dist

    out = {}
    for size in SIZES:
        group = None if size == world else dist.new_group(list(range(size)))   # every rank creates it
        if rank < size:
            out[f"overlap{size}"] = check_overlap_ops(rank, size, group)
            if size == 2:
                out["opcheck"] = check_opcheck(rank, size, group)
        dist.barrier()
    out["bad_input"] = check_bad_input(rank, world)
    dist.barrier()
    os.environ["HYBRIDPAR_DEBUG"] = "1"
    try:
        out["debug"] = check_debug_mode(rank, world)
    finally:
        del os.environ["HYBRIDPAR_DEBUG"]
    return out


@pytest.fixture(scope="module")
def gloo_results():
    return run_ranks(check_everything, max(SIZES), timeout=360)


@pytest.mark.parametrize("world", SIZES)
def test_overlap_ops_match_the_composition(gloo_results, world):
    results = [r.get(f"overlap{world}") for r in gloo_results]
    assert results == [2 * len(DTYPES) * len(CASES) * len(CHUNKS)] * world + [None] * (max(SIZES) - world)


def test_opcheck(gloo_results):
    assert [r.get("opcheck") for r in gloo_results] == [True, True, None, None]


def test_bad_input_raises_on_every_rank(gloo_results):
    assert len({r["bad_input"] for r in gloo_results}) == 1


def test_debug_mode_names_the_rank_that_differs(gloo_results):
    messages = [r["debug"] for r in gloo_results]
    assert len(set(messages)) == 1, messages


def check_device_world_of_one(rank, world):
    """On a GPU: the ops on NCCL with one rank, against the composition."""
    from hybridpar_ext import ops

    x = torch.randn(6, 5, 40, device="cuda", requires_grad=True)
    w = torch.randn(24, 40, device="cuda", requires_grad=True)
    for fn, expected in ((ops.all_gather_matmul, None), (ops.matmul_reduce_scatter, None)):
        out = fn(x, w, chunks=3)
        expected = x.detach().double() @ w.detach().double().t()
        assert_close_to_reference(out, expected, torch.float32, fn.__name__,
                                  scale=_matmul_scale(x.detach().double(), w.detach().double()))
        out.sum().backward()
        ones = torch.ones_like(expected)
        assert_close_to_reference(x.grad, ones @ w.detach().double(), torch.float32, "grad_x", scale=24 * 4.0)
        x.grad = w.grad = None

    # The bucket reducer on CUDA: its flatten-and-scale kernel packs odd-sized fp32 and bf16
    # gradients into their buckets (several per bucket, and a bucket cap that splits them).
    params = [torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
              for shape, dtype in (((37,), torch.float32), ((5, 129), torch.bfloat16), ((3, 7, 11), torch.float32),
                                   ((1000,), torch.bfloat16), ((513, 3), torch.float32))]
    reducer = ops.GradBucketReducer(params, bucket_cap_mb=4e-3)
    assert reducer.num_buckets > 2
    for step in range(2):   # the second backward accumulates into the buckets
        sum((p.float() * (i + 1)).sin().sum() for i, p in enumerate(params)).backward()
    reducer.finish()
    for i, p in enumerate(params):
        expected = 2 * (i + 1) * (p.detach().double() * (i + 1)).cos()
        assert_close_to_reference(p.grad, expected, p.dtype, f"reducer grad {i}", scale=2 * (i + 1))
    return True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nccl_world_of_one():
    assert run_ranks(check_device_world_of_one, 1, backend="nccl", timeout=180) == [True]
