"""The global gradient norm of a model split over DP x TP x PP, and clipping by it.

The norm one process would compute (``torch.nn.utils.clip_grad_norm_`` on the plain model)
is the root of the sum of squares over every parameter element, counted once. Split over the
mesh, an element may sit on several ranks with the same gradient: every DP rank holds the
averaged gradient (without ZeRO-1), every TP rank a norm's weight (whole, or summed from
sequence-parallel partials), the ranks that share a replicated kv head its rows of ``qkv``,
and the first and last pipeline stages the tied embedding. Each rank therefore sums the
squares of the elements it *owns* — one replica of each — and one all-reduce over the world
adds the stages, TP ranks and DP ranks up.

Which elements a rank owns is :func:`owned_mask`: per parameter ``True`` (all of it), ``False``
(none) or a boolean mask broadcastable to it, read from the shard specs
(:mod:`hybridpar_ext.parallel.spec`); :func:`grad_norm` itself only takes (gradient, owned)
pairs.
"""

import torch
import torch.distributed as dist

from .data import _bucket_views
from .spec import shard_specs


def owned_mask(stage, param):
    """Whether this rank counts `param`'s gradient in the global norm, over TP and PP (DP is the
    caller's: see :class:`GradClipper`). ``True``, ``False`` or a bool mask tensor: read
    from the parameter's shard spec (replica 0 of each segment counts; padding and the last
    stage's copy of a tied embedding do not)."""
    return owned_masks(stage)[param]


def owned_masks(stage) -> dict:
    """:func:`owned_mask` of every parameter of `stage` (the specs read once)."""
    specs = shard_specs(stage)
    return {p: specs[name].counted_mask(p.device) for name, p in stage.named_parameters()}


class GradClipper:
    """The global gradient norm of a stage under a :class:`GradientSync`, and clipping by it.

    Call after :meth:`GradientSync.finish` and ``stage.finish_grads()``: it reads the gradients
    the optimizer will step on — every ``param.grad`` without ZeRO-1 (counted on DP rank 0, as
    they are averaged), and under ZeRO-1 each DP rank's reduce-scattered slices (counted on
    every DP rank, each holding its own) plus the all-reduced parameters (on DP rank 0).
    ``owned`` maps a parameter to :func:`owned_mask`'s answer (the default)."""

    def __init__(self, stage, sync, owned=None):
        self.stage, self.sync = stage, sync
        masks = None if owned else owned_masks(stage)
        owned = owned or masks.__getitem__
        self.dp_rank = dist.get_rank(sync.dp_group)
        self.owned = {p: owned(p) for p in sync.whole + sync.sliced}
        self.scattered = [r for r in sync.reducers if r.reduce_scatter]
        in_scattered = {p for r in self.scattered for p in r.params}
        self.direct = [p for p in sync.whole + sync.sliced if p not in in_scattered]
        # Under ZeRO-1 a rank's slice of a bucket mixes parameters: one flat mask per bucket.
        self.shard_masks = []
        world = dist.get_world_size(sync.dp_group)
        for r in self.scattered:
            for b in range(r.num_buckets):
                flat = torch.zeros(r.buffers[b].numel(), dtype=torch.bool, device=r.buffers[b].device)
                for p, view in _bucket_views(r, b, flat):
                    view.copy_(torch.as_tensor(self.owned[p], device=view.device).expand_as(view))
                self.shard_masks.append((r, b, flat.chunk(world)[self.dp_rank].clone()))

    def entries(self):
        """(gradient, owned) pairs whose squares this rank adds to the global sum."""
        for p in self.direct:
            if p.grad is not None and self.dp_rank == 0:
                yield p.grad, self.owned[p]
        for r, b, mask in self.shard_masks:
            yield r.shards[b], mask

    def grads_to_scale(self):
        """Every gradient the optimizer reads, each once (views of a bucket are scaled through
        the parameter, never also through the bucket)."""
        for p in self.direct:
            if p.grad is not None:
                yield p.grad
        for r, b, _ in self.shard_masks:
            yield r.shards[b]

    @torch.no_grad()
    def norm(self) -> torch.Tensor:
        """The global L2 norm of the gradients (a float64 scalar, the same on every rank)."""
        return grad_norm(self.entries(), device=next(self.stage.parameters()).device)

    @torch.no_grad()
    def clip(self, max_norm: float) -> torch.Tensor:
        """Scale the gradients so their global norm is at most `max_norm`, as
        ``torch.nn.utils.clip_grad_norm_`` does; returns the norm before clipping."""
        total = self.norm()
        coef = max_norm / (total.item() + 1e-6)
        if coef < 1.0:
            for g in self.grads_to_scale():
                g.mul_(coef)
        return total


def grad_norm(entries, group=None, device=None) -> torch.Tensor:
    """The L2 norm of every owned gradient element over all ranks of `group` (the world by
    default). `entries`: (gradient, owned) pairs; owned is True, False or a bool mask."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for grad, owned in entries:
        if owned is False:
            continue
        squares = grad.detach().float().square()
        if owned is not True:
            squares = squares * owned
        total += squares.sum(dtype=torch.float64)
    dist.all_reduce(total, group=group)
    return total.sqrt()
