"""Checkpoints: save and load time and bytes per rank of our DCP checkpoints (synchronous, and
asynchronous: how long training is held, and how long until the write is done) against what a
user without them does: gather the whole state_dict on rank 0 and ``torch.save`` it (and to
load, ``torch.load`` it on every rank and cut each rank's part).

The state is a GPT stage's parameters and AdamW's two moments, under dp2 x tp2 (4
processes on gloo, the checkpoint on a gloo group of its own). Times are medians of a
few repeats on rank 0, bytes are the files each rank wrote. On a CPU the 4 processes share the
machine's cores and the disk is whatever the temporary directory is on: the ratios are what to
read.
"""

import os
import statistics
import tempfile
import time

from hybridpar_ext.testing import run_ranks

MODEL = dict(vocab_size=512, max_seq_len=128, layers=4, hidden=256, heads=4, kv_heads=2, ffn=688,
             norm="rmsnorm", mlp="swiglu")
REPEATS = 3


def _dir_bytes(path) -> dict:
    """Bytes of each rank's DCP data file (``__{rank}_0.distcp``)."""
    out = {}
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if name.endswith(".distcp"):
            out[int(name[2:].split("_")[0])] = os.path.getsize(full)
    return out


def measure(rank, world, dp, tp, root, layers, hidden):
    import torch
    import torch.distributed as dist

    from hybridpar_ext.checkpoint import load_state, save_state
    from hybridpar_ext.models import GPT, GPTConfig
    from hybridpar_ext.parallel import gather_state_dict, init_mesh, parallelize, shard_specs, split_by_specs

    mesh = init_mesh(dp=dp, tp=tp, pp=1)
    group = dist.new_group(backend="gloo")
    torch.manual_seed(0)
    config = GPTConfig(**dict(MODEL, layers=layers, hidden=hidden))
    stage = parallelize(GPT(config), mesh)
    optimizer = torch.optim.AdamW(stage.parameters(), lr=1e-3)
    stage(torch.randint(0, config.vocab_size, (1, 8))).float().sum().backward()
    optimizer.step()
    rows = {}

    def timed(fn):
        times = []
        for i in range(REPEATS):
            dist.barrier(group=group)
            start = time.perf_counter()
            result = fn(i)
            dist.barrier(group=group)
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3, result

    # DCP, synchronous.
    save_ms, _ = timed(lambda i: save_state(f"{root}/sync{i}", stage, optimizer, mesh, {"step": 1}, group))
    load_ms, _ = timed(lambda i: load_state(f"{root}/sync{i}", stage, optimizer, mesh, group))
    rows["dcp"] = {"save_ms": save_ms, "load_ms": load_ms, "bytes": _dir_bytes(f"{root}/sync0")}

    # DCP, asynchronous: the time training is held (copying to CPU memory, planning), then the
    # time until the background write is done.
    held, total = [], []
    for i in range(REPEATS):
        dist.barrier(group=group)
        start = time.perf_counter()
        future = save_state(f"{root}/async{i}", stage, optimizer, mesh, {"step": 1}, group, async_save=True)
        held.append(time.perf_counter() - start)
        future.result()
        dist.barrier(group=group)
        total.append(time.perf_counter() - start)
    rows["dcp async"] = {"save_ms": statistics.median(total) * 1e3, "blocks_training_ms": statistics.median(held) * 1e3,
                         "bytes": _dir_bytes(f"{root}/async0")}

    # torch.save of the gathered state_dict (model and moments), on rank 0.
    named = dict(stage.named_parameters())

    def gathered_save(i):
        full = gather_state_dict(stage, mesh)
        for k in ("exp_avg", "exp_avg_sq"):
            moments = gather_state_dict(stage, mesh, tensors={n: optimizer.state[p][k] for n, p in named.items()})
            full.update({f"{n}.{k}": t for n, t in moments.items()})
        if rank == 0:
            torch.save(full, f"{root}/gathered{i}.pt")

    def gathered_load(i):
        full = torch.load(f"{root}/gathered{i}.pt")
        specs = shard_specs(stage)
        local = split_by_specs({n: full[n] for n in specs}, specs)
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(local[n])
                for k in ("exp_avg", "exp_avg_sq"):
                    optimizer.state[p][k].copy_(split_by_specs({n: full[f"{n}.{k}"]}, {n: specs[n]})[n])

    save_ms, _ = timed(gathered_save)
    load_ms, _ = timed(gathered_load)
    rows["torch.save gathered"] = {"save_ms": save_ms, "load_ms": load_ms,
                                   "bytes": {0: os.path.getsize(f"{root}/gathered0.pt")}}
    return rows if rank == 0 else None


def run(quick: bool = False):
    layers, hidden = (2, 128) if quick else (4, 256)
    rows = []
    for dp, tp in ((2, 2),):
        with tempfile.TemporaryDirectory() as root:
            result = run_ranks(measure, dp * tp, timeout=600, dp=dp, tp=tp, root=root, layers=layers,
                               hidden=hidden)[0]
        for method, r in result.items():
            per_rank = [b for b in r["bytes"].values() if b > 0]
            rows.append({"layout": f"dp{dp} tp{tp}", "layers x hidden": f"{layers} x {hidden}", "method": method,
                         "save ms": r["save_ms"], "blocks training ms": r.get("blocks_training_ms", r["save_ms"]),
                         "load ms": r.get("load_ms"), "max MB per rank": max(per_rank) / 2**20,
                         "total MB": sum(per_rank) / 2**20, "ranks writing": len(per_rank)})
    return rows
