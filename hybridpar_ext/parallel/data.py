"""Data parallelism for a pipeline stage: gradients averaged over the DP ranks while backward
runs (the bucket reducer of :mod:`hybridpar_ext.ops`), one reduction per optimizer step however
many microbatches accumulate, and optionally a sharded optimizer (ZeRO-1).

Two reducers: the parameters whose gradients tensor parallelism or a tied embedding still
changes after the reduction (:meth:`GPTStage.synced_after_reduction`, from the shard specs)
are always all-reduced, so those later sums see whole gradients; the rest are all-reduced, or under ZeRO-1
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
    backward of a step but the last in :meth:`no_sync`, then call :meth:`finish`; clear the
    gradients with :meth:`zero_grad` (in place: after the first step every ``param.grad`` is a
    view of its bucket, and backward accumulates straight into it).

    ``reduce_dtype``: the dtype the reduction sums in; by default the gradients' own (float32
    master gradients under mixed precision, see :mod:`hybridpar_ext.train.precision`).
    ``torch.bfloat16`` halves the bytes on the wire at the price of bf16 rounding in the sum: the
    gradients are then cast, averaged and cast back after backward, one collective per dtype
    (not overlapped; not with ZeRO-1, whose slices are reduce-scattered in the buckets' dtype).
    """

    def __init__(self, module, dp_group, zero: bool = False, overlap: bool = True,
                 bucket_cap_mb: float = 25.0, reduce_dtype: torch.dtype = None):
        self.module, self.dp_group, self.zero, self.overlap = module, dp_group, zero, overlap
        self.reduce_dtype = reduce_dtype
        params = [p for p in module.parameters() if p.requires_grad]
        after = getattr(module, "synced_after_reduction", lambda p: False)
        self.whole = [p for p in params if after(p)]
        self.sliced = [p for p in params if not after(p)]
        self.reducers = []
        self.world = dist.get_world_size(dp_group)
        # Casting for the reduction: only where some gradient is not already in reduce_dtype.
        self.cast = reduce_dtype is not None and any(p.dtype != reduce_dtype for p in params)
        if self.cast and zero:
            raise ValueError(f"GradientSync: reduce_dtype {reduce_dtype} differs from the parameters' dtype, "
                             "which ZeRO-1's reduce-scattered slices cannot; reduce in the parameters' dtype")
        if zero or (overlap and self.world > 1 and not self.cast):
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
        elif self.world > 1 and self.cast:
            self._reduce_cast()
        elif self.world > 1:
            all_reduce_gradients(self.whole + self.sliced, self.dp_group)

    def _reduce_cast(self):
        """Average the gradients in ``reduce_dtype``: one flat buffer, divided before the sum
        (as the bucket reducer does for 16-bit buckets, so it cannot overflow)."""
        params = self.whole + self.sliced
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1).to(self.reduce_dtype) for p in params]).div_(self.world)
        dist.all_reduce(flat, group=self.dp_group)
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
            offset += p.numel()

    @torch.no_grad()
    def zero_grad(self):
        """Clear the gradients for the next step. A gradient that is a view of a bucket is zeroed
        in place (the whole bucket at once), so the next backward accumulates into the bucket
        and the reducer copies nothing; any other is set to None."""
        in_buckets = set()
        for r in self.reducers:
            for b in range(r.num_buckets):
                r.buffers[b].zero_()
                for p, view in _bucket_views(r, b, r.buffers[b]):
                    if p.grad is not None and p.grad.data_ptr() == view.data_ptr():
                        in_buckets.add(p)
        for p in self.whole + self.sliced:
            if p not in in_buckets:
                p.grad = None

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
        """The gradients stay views of the reducers' buckets, zeroed in place."""
        self.sync.zero_grad()

    def state_bytes(self) -> int:
        """Bytes of optimizer state (master slices and Adam moments) this rank holds."""
        total = 0
        for _, _, master in self.slices:
            state = self.optimizer.state.get(master, {})
            total += master.numel() * 4 + sum(t.numel() * t.element_size() for t in state.values()
                                              if torch.is_tensor(t) and t.dim() > 0)
        return total
