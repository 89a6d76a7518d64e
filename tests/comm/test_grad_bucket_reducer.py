"""GradBucketReducer on real gloo process groups: after finish(), every gradient equals the
average over ranks of what each rank's backward produced — checked against float64 math on
every rank's data — for buckets smaller than one gradient, larger than all of them and in
between; with a parameter no rank uses and one only rank 0 uses (neither may hang the
others); with gradient accumulation under no_sync; in all-reduce and reduce-scatter mode."""

import pytest
import torch

from hybridpar_ext.testing import assert_close_to_reference, run_ranks

# Registration order; backward produces gradients roughly in reverse, and buckets are
# packed in reverse, so "unused" ends up in the last bucket.
SHAPES = {"unused": (3,), "w1": (17, 13), "b1": (17,), "rank0_only": (5,), "w2": (5, 17), "b2": (5,)}
# Bucket caps in MiB: smaller than any gradient (one bucket per parameter), about two
# gradients' worth, and larger than all of them (one bucket).
CAPS = {"tiny": 1e-8, "middle": 1200 / 2**20, "huge": 1.0}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _data(rank, step, micro, dtype):
    g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    return torch.randn(4, 13, generator=g, dtype=torch.float64).to(dtype)


def _loss(params, x, rank):
    h = torch.tanh(x @ params["w1"].t() + params["b1"])
    y = h @ params["w2"].t() + params["b2"]
    if rank == 0:
        y = y + params["rank0_only"]
    return (y.float() ** 2).mean() * (rank + 1)


def _expected_grads(params, world, step, micros):
    """Float64: each rank's gradient summed over its microbatches, averaged over ranks."""
    total = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in params.items()}
    for r in range(world):
        p64 = {k: v.detach().double().requires_grad_() for k, v in params.items()}
        for m in range(micros):
            _loss(p64, _data(r, step, m, torch.float64), r).backward()
        for k, v in p64.items():
            if v.grad is not None:
                total[k] += v.grad
    return {k: v / world for k, v in total.items()}


def _check(rank, world, cap, dtype, reduce_scatter, micros, group=None):
    from hybridpar_ext.ops import GradBucketReducer

    g = torch.Generator().manual_seed(7)
    params = {k: (torch.randn(s, generator=g, dtype=torch.float64) * 0.5).to(dtype).requires_grad_()
              for k, s in SHAPES.items()}
    names = list(params)
    reducer = GradBucketReducer(params.values(), group, bucket_cap_mb=cap, reduce_scatter=reduce_scatter)
    tag = f"world={world} cap={cap} {dtype} reduce_scatter={reduce_scatter} micros={micros}"
    if cap == CAPS["tiny"]:
        assert reducer.num_buckets == len(SHAPES), tag
    if cap == CAPS["huge"]:
        assert reducer.num_buckets == 1, tag

    for step in range(3):
        expected = _expected_grads(params, world, step, micros)
        for m in range(micros - 1):
            with reducer.no_sync():
                _loss(params, _data(rank, step, m, dtype), rank).backward()
        _loss(params, _data(rank, step, micros - 1, dtype), rank).backward()
        reducer.finish()

        if cap == CAPS["tiny"]:
            # The buckets before rank0_only's started during backward on every rank; the rest
            # waited for finish() (rank0_only has no gradient on the other ranks).
            assert reducer.started_during_backward >= 2, (tag, reducer.started_during_backward)
        if reduce_scatter:
            for b, shard in enumerate(reducer.shards):
                flat = torch.zeros(reducer.buffers[b].numel(), dtype=torch.float64)
                for i in reducer.bucket_indices[b]:
                    n = params[names[i]].numel()
                    flat[reducer.offsets[i]:reducer.offsets[i] + n] = expected[names[i]].flatten()
                assert_close_to_reference(shard, flat.view(world, -1)[rank], dtype,
                                          f"{tag} step {step} shard {b}", scale=1.0)
        else:
            storages = {b.untyped_storage().data_ptr() for b in reducer.buffers}
            for k, p in params.items():
                assert p.grad.untyped_storage().data_ptr() in storages, f"{tag}: {k}.grad is not a bucket view"
                assert_close_to_reference(p.grad, expected[k], dtype, f"{tag} step {step} {k}.grad",
                                          scale=1.0)
        # Same update everywhere (the averaged gradients agree), then the three ways of
        # clearing gradients: None, set_to_none, zeroed in place (views kept).
        with torch.no_grad():
            for k, p in params.items():
                if reduce_scatter:
                    p.sub_(0.1 * expected[k].to(dtype))
                else:
                    p.sub_(0.1 * p.grad)
                if step == 0:
                    p.grad = None
                else:
                    p.grad.zero_()


def check_reducer(rank, world, group=None):
    runs = 0
    for dtype in DTYPES.values():
        for cap in CAPS.values():
            for reduce_scatter in (False, True):
                _check(rank, world, cap, dtype, reduce_scatter, micros=2, group=group)
                runs += 1
    _check(rank, world, CAPS["middle"], torch.float32, False, micros=1, group=group)
    return runs + 1


def check_exact_fp32_average(rank, world, group=None):
    """float32 buckets give exactly what all_reduce(grad) / world gives."""
    import torch.distributed as dist

    from hybridpar_ext.ops import GradBucketReducer

    p = torch.zeros(1000, requires_grad=True)
    q = torch.zeros(37, requires_grad=True)
    reducer = GradBucketReducer([p, q], group, bucket_cap_mb=1.0)
    g = torch.Generator().manual_seed(rank)
    gp, gq = torch.randn(1000, generator=g), torch.randn(37, generator=g)
    ((p * gp).sum() + (q * gq).sum()).backward()
    reducer.finish()
    for grad, mine in ((p.grad, gp), (q.grad, gq)):
        dist.all_reduce(mine, group=group)
        assert torch.equal(grad, mine / world)
    return True


SIZES = (2, 3, 4)   # the reducer on groups of 2, 3 and 4 ranks


def check_on_groups(rank, world):
    """Every check of this file in one launch of 4 processes (starting them is most of the
    cost): the reducer on groups of the first 2, 3 and all 4 ranks (the whole world through
    the default group), the exact float32 average on 2. A rank outside a group reports
    nothing for it."""
    import torch.distributed as dist

    out = {}
    for size in SIZES:
        group = None if size == world else dist.new_group(list(range(size)))   # every rank creates it
        if rank < size:
            out[f"reducer{size}"] = check_reducer(rank, size, group)
            if size == 2:
                out["exact"] = check_exact_fp32_average(rank, size, group)
        dist.barrier()
    return out


@pytest.fixture(scope="module")
def results():
    return run_ranks(check_on_groups, max(SIZES), timeout=360)


@pytest.mark.parametrize("world", SIZES)
def test_reducer_averages_gradients(results, world):
    runs = [r.get(f"reducer{world}") for r in results]
    assert runs == [2 * 3 * 2 + 1] * world + [None] * (max(SIZES) - world)


def test_fp32_average_is_exact(results):
    assert [r.get("exact") for r in results] == [True, True, None, None]
