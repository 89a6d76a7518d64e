"""Communication overlap: the overlapped ops against the sequential composition.

Runs in its own processes (``hybridpar_ext.testing.run_ranks``): gloo with 2 ranks on a CPU,
NCCL with one rank per GPU on a GPU machine. For each op the shape is chosen so that the
collective and the matmul take about the same time on this machine (the case overlap is
for): the collective and the matmul are timed alone, then the sequential composition
(``hybridpar_ext.reference.comm``: collective, then matmul) and ours. Reported: all four
times, ``ours/sequential`` (below 1: ours is faster; the target is 0.8 or less) and the
fraction of the collective still exposed, ``(ours - matmul) / collective``.

The bucket reducer is timed the same way on a stack of linear layers: backward alone,
backward then one flat all-reduce of every gradient (what one does without overlap), and
backward with the reducer; exposed fraction ``(reducer - backward) / all-reduce``, target 0.5
or less.
"""

import functools
import os
import statistics
import time

import torch

from hybridpar_ext.testing import run_ranks

CHUNKS = (1, 2, 4)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time_ms(fns: dict, iters: int) -> dict:
    """Median ms of each callable, run in turns (one of each per round, so that a noisy
    stretch of the machine hits every one alike), every rank running the same number of
    rounds so that the collectives inside stay matched; the slowest rank's medians."""
    import torch.distributed as dist

    times = {name: [] for name in fns}
    for round_ in range(iters + 2):
        for name, fn in fns.items():
            _sync()
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            _sync()
            if round_ >= 2:  # the first two rounds warm up
                times[name].append((time.perf_counter() - t0) * 1e3)
    medians = torch.tensor([statistics.median(t) for t in times.values()], dtype=torch.float64,
                           device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(medians, op=dist.ReduceOp.MAX)
    return dict(zip(fns, medians.tolist()))


def _balanced_width(collective_ms, matmul_ms_at, width0, lo=16, hi=16384):
    """The output width at which the matmul takes about as long as the collective (matmul
    time grows linearly with the width), as a multiple of 16."""
    width = width0 * collective_ms / max(matmul_ms_at, 1e-6)
    return int(min(hi, max(lo, round(width / 16) * 16)))


def _overlap_rows(rank, world, quick):
    import torch.distributed as dist

    from hybridpar_ext import ops
    from hybridpar_ext.reference import comm as ref

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    iters = 5 if quick else 15
    rows_per_rank, k = (8192, 8192) if dev.type == "cuda" else ((512, 1024) if quick else (1024, 2048))
    torch.manual_seed(rank)
    x = torch.randn(rows_per_rank, k, device=dev, dtype=dtype)
    full = torch.randn(rows_per_rank * world, k, device=dev, dtype=dtype)
    gathered = torch.empty(rows_per_rank * world, k, device=dev, dtype=dtype)
    out_shard = torch.empty(rows_per_rank, k, device=dev, dtype=dtype)

    results = []
    for op in ("all_gather_matmul", "matmul_reduce_scatter"):
        if op == "all_gather_matmul":
            collective = lambda: dist.all_gather_into_tensor(gathered, x)  # noqa: E731
            inp = x
        else:
            collective = lambda: dist.reduce_scatter_tensor(out_shard, full)  # noqa: E731
            inp = full
        probe = torch.randn(256, k, device=dev, dtype=dtype)
        # Both ops multiply world * rows_per_rank rows.
        first = _time_ms({"collective": collective, "probe": lambda: full @ probe.t()}, iters)
        n = _balanced_width(first["collective"], first["probe"], 256)
        w = torch.randn(n, k, device=dev, dtype=dtype)
        fn = getattr(ops, op)
        fns = {"collective": collective, "matmul": lambda: full @ w.t(),
               "sequential": (lambda: ref.all_gather_matmul(inp, w, None)) if op == "all_gather_matmul"
               else (lambda: ref.matmul_reduce_scatter(inp, w, None))}
        for chunks in CHUNKS:
            fns[f"ours{chunks}"] = functools.partial(fn, inp, w, chunks=chunks)
        ms = _time_ms(fns, iters)
        for chunks in CHUNKS:
            ours = ms[f"ours{chunks}"]
            results.append({
                "op": op, "world": world, "dtype": str(dtype).replace("torch.", ""),
                "x": f"{tuple(inp.shape)}", "weight": f"{tuple(w.shape)}", "chunks": chunks,
                "collective_ms": ms["collective"], "matmul_ms": ms["matmul"],
                "sequential_ms": ms["sequential"], "ours_ms": ours,
                "ours/sequential": ours / ms["sequential"],
                "exposed_comm": min(1.0, max(0.0, (ours - ms["matmul"]) / ms["collective"])),
            })
    return results


def _reducer_rows(rank, world, quick):
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    from hybridpar_ext import ops

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    iters = 5 if quick else 10
    width, layers, batch = (4096, 8, 8192) if dev.type == "cuda" else ((512, 6, 256) if quick else (1024, 8, 512))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU())
                                  for _ in range(layers)]).to(dev)
    params = list(model.parameters())
    x = torch.randn(batch, width, device=dev)

    def backward():
        model(x).square().mean().backward()

    def clear():
        for p in params:
            p.grad = None

    def backward_only():
        clear()
        backward()

    def backward_then_all_reduce():
        clear()
        backward()
        flat = _flatten_dense_tensors([p.grad for p in params])
        dist.all_reduce(flat)
        flat.div_(world)
        for p, g in zip(params, _unflatten_dense_tensors(flat, [p.grad for p in params])):
            p.grad.copy_(g)

    grads = _flatten_dense_tensors([torch.zeros_like(p) for p in params])
    fns = {"collective": lambda: dist.all_reduce(grads), "backward": backward_only,
           "sequential": backward_then_all_reduce}
    reducers = {}
    for cap_mb in (1.0, 4.0, 25.0):
        reducers[cap_mb] = ops.GradBucketReducer(params, bucket_cap_mb=cap_mb)
        # One reducer's hooks at a time: the others are switched off while it runs.
        fns[f"ours{cap_mb}"] = functools.partial(_backward_with, reducers, cap_mb, backward, params)
    for reducer in reducers.values():
        reducer._sync = False
    ms = _time_ms(fns, iters)
    results = []
    for cap_mb, reducer in reducers.items():
        ours = ms[f"ours{cap_mb}"]
        results.append({
            "op": "grad_bucket_reducer", "world": world,
            "model": f"{layers}x Linear({width},{width}), batch {batch}",
            "grad_MB": grads.numel() * grads.element_size() / 2**20, "bucket_cap_MB": cap_mb,
            "buckets": reducer.num_buckets, "collective_ms": ms["collective"],
            "backward_ms": ms["backward"], "sequential_ms": ms["sequential"], "ours_ms": ours,
            "ours/sequential": ours / ms["sequential"],
            "exposed_comm": min(1.0, max(0.0, (ours - ms["backward"]) / ms["collective"])),
        })
        reducer.remove()
    return results


def _backward_with(reducers, cap_mb, backward, params):
    reducer = reducers[cap_mb]
    for p in params:
        if p.grad is not None:
            p.grad.zero_()
    reducer._sync = True
    try:
        backward()
        reducer.finish()
    finally:
        reducer._sync = False


def bench_ranks(rank, world, quick):
    rows = _overlap_rows(rank, world, quick) + _reducer_rows(rank, world, quick)
    return rows if rank == 0 else None


def run(quick: bool = False):
    # The ranks load this file by path, outside the bench package: no relative imports here.
    if torch.cuda.is_available():
        world, backend = torch.cuda.device_count(), "nccl"
        threads = str(max(1, (os.cpu_count() or 1) // world))
    else:
        world, backend = 2, "gloo"
        threads = str(max(1, (os.cpu_count() or 2) // world))
    results = run_ranks(bench_ranks, world, timeout=600, backend=backend,
                        env={"OMP_NUM_THREADS": threads}, quick=quick)[0]
    for row in results:
        print("  " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                               for k, v in row.items()), flush=True)
    return results
