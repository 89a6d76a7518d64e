"""Data parallelism for a pipeline stage: gradients averaged over the DP ranks while backward
runs (the bucket reducer of :mod:`hybridpar_ext.ops`), one reduction per optimizer step however
many microbatches accumulate, and optionally a sharded optimizer (ZeRO-1).

Two reducers: the parameters whose gradients tensor parallelism or a tied embedding still
changes after the reduction (:meth:`ParallelGPT.synced_after_reduction`) are always
all-reduced, so those later sums see whole gradients; the rest are all-reduced, or under ZeRO-1
reduce-scattered, so each rank receives only the averaged slice its optimizer updates.
"""

import contextlib

import torch
import torch.distributed as dist

from .. import ops
from ..reference.comm import all_reduce_gradients


def _bucket_views(reducer, bucket: int, flat: torch.Tensor):
    """(param, its slice of `flat` shaped like it) for each parameter of a bucket, `flat`
    being laid out like the bucket's buffer."""
    for i in reducer.bucket_indices[bucket]:
        p = reducer.params[i]
        yield p, flat[reducer.offsets[i]:reducer.offsets[i] + p.numel()].view_as(p)


class GradientSync:
    """Averages a stage's gradients over ``dp_group``.

    ``overlap=True``: bucketed reductions start during the last backward of the step;
    ``overlap=False``: one all-reduce per parameter after backward (for benchmarks; ZeRO-1
    always uses the buckets). With one DP rank and no ZeRO-1 there is nothing to do. Wrap every
    backward of a step but the last in :meth:`no_sync`, then call :meth:`finish`.
    """

    def __init__(self, module, dp_group, zero: bool = False, overlap: bool = True,
                 bucket_cap_mb: float = 25.0):
        self.module, self.dp_group, self.zero, self.overlap = module, dp_group, zero, overlap
        params = [p for p in module.parameters() if p.requires_grad]
        after = getattr(module, "synced_after_reduction", lambda p: False)
        self.whole = [p for p in params if after(p)]
        self.sliced = [p for p in params if not after(p)]
        self.reducers = []
        self.world = dist.get_world_size(dp_group)
        if zero or (overlap and self.world > 1):
            for group_params, scatter in ((self.sliced, zero), (self.whole, False)):
                if group_params:
                    self.reducers.append(ops.GradBucketReducer(group_params, dp_group, bucket_cap_mb,
                                                               reduce_scatter=scatter))

    @contextlib.contextmanager
    def no_sync(self):
        with contextlib.ExitStack() as stack:
            for r in self.reducers:
                stack.enter_context(r.no_sync())
            yield

    def finish(self):
        if self.reducers:
            for r in self.reducers:
                r.finish()
        elif self.world > 1:
            all_reduce_gradients(self.whole + self.sliced, self.dp_group)

    def averaged_grads(self) -> dict:
        """param -> its DP-averaged gradient (under ZeRO-1 all-gathered from the slices)."""
        grads = {p: p.grad for p in self.whole + self.sliced}
        for r in self.reducers:
            if not r.reduce_scatter:
                continue
            for b in range(r.num_buckets):
                full = torch.empty_like(r.buffers[b])
                dist.all_gather_into_tensor(full, r.shards[b], group=self.dp_group)
                grads.update(_bucket_views(r, b, full))
        return grads


class ZeroAdamW:
    """AdamW whose state is sharded over the data-parallel ranks (ZeRO stage 1).

    Each rank keeps float32 copies of its ``1/dp`` slice of every gradient bucket's parameters,
    steps ``torch.optim.AdamW`` on them with the averaged gradient slices the reducers leave
    (reduce-scattered, or this rank's slice of an all-reduced bucket), and all-gathers the
    updated slices back into the parameters. AdamW is elementwise, so this is the same update
    as unsharded AdamW on the whole model.
    """

    def __init__(self, sync: GradientSync, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        if not sync.zero:
            raise ValueError("ZeroAdamW: the GradientSync must be built with zero=True")
        self.sync = sync
        self.dp, self.rank = dist.get_world_size(sync.dp_group), dist.get_rank(sync.dp_group)
        self.slices = []   # (reducer, bucket, master slice)
        for r in sync.reducers:
            for b in range(r.num_buckets):
                flat = torch.zeros(r.buffers[b].numel(), dtype=torch.float32, device=r.buffers[b].device)
                for p, view in _bucket_views(r, b, flat):
                    view.copy_(p.detach())
                master = flat.chunk(self.dp)[self.rank].clone()
                self.slices.append((r, b, master))
        self.optimizer = torch.optim.AdamW([m for _, _, m in self.slices], lr=lr, betas=betas, eps=eps,
                                           weight_decay=weight_decay)

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @torch.no_grad()
    def step(self):
        for r, b, master in self.slices:
            master.grad = r.shards[b].to(torch.float32)
        self.optimizer.step()
        for r, b, master in self.slices:
            full = torch.empty(r.buffers[b].numel(), dtype=torch.float32, device=master.device)
            dist.all_gather_into_tensor(full, master, group=self.sync.dp_group)
            for p, view in _bucket_views(r, b, full):
                p.copy_(view)

    def zero_grad(self, set_to_none: bool = True):
        for p in self.sync.whole + self.sync.sliced:
            p.grad = None

    def state_bytes(self) -> int:
        """Bytes of optimizer state (master slices and Adam moments) this rank holds."""
        total = 0
        for _, _, master in self.slices:
            state = self.optimizer.state.get(master, {})
            total += master.numel() * 4 + sum(t.numel() * t.element_size() for t in state.values()
                                              if torch.is_tensor(t) and t.dim() > 0)
        return total
