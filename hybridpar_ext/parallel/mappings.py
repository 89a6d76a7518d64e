"""The conjugate communication pairs of tensor and sequence parallelism, as tiny autograd
functions: what one does in forward, its partner does in backward."""

import torch
import torch.distributed as dist


def _all_reduce(x, group):
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def all_reduce_flat(tensors, group):
    """Sum each tensor over `group` in place, one collective for all of them."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def _check_divisible(x, dim, world):
    if x.shape[dim] % world:
        raise ValueError(f"sequence parallel: dimension {dim} of size {x.shape[dim]} cannot be split "
                         f"over {world} tensor-parallel ranks")


def _split(x, dim, group):
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    _check_divisible(x, dim, world)
    return x.chunk(world, dim=dim)[rank].contiguous()


def _gather(x, dim, group):
    world = dist.get_world_size(group)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x, dim, group):
    world = dist.get_world_size(group)
    _check_divisible(x, dim, world)
    parts = [p.contiguous() for p in x.chunk(world, dim=dim)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=group)
    return out


class _CopyToTP(torch.autograd.Function):
    """Forward: identity. Backward: all-reduce (each rank's branch adds to the gradient)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """Forward: all-reduce of the partial sums. Backward: identity."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToSequence(torch.autograd.Function):
    """Forward: keep this rank's slice along `dim`. Backward: all-gather."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _split(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.dim, ctx.group), None, None


class _GatherFromSequence(torch.autograd.Function):
    """Forward: all-gather along `dim`. Backward: reduce-scatter (every rank used the whole)."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.dim, ctx.group), None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    """Forward: reduce-scatter of partial sums along `dim`. Backward: all-gather."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.dim, ctx.group), None, None


def copy_to_tp(x, group):
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x, group):
    return _ReduceFromTP.apply(x, group)


def scatter_to_sequence(x, dim, group):
    return _ScatterToSequence.apply(x, dim, group)


def gather_from_sequence(x, dim, group):
    return _GatherFromSequence.apply(x, dim, group)


def reduce_scatter_to_sequence(x, dim, group):
    return _ReduceScatterToSequence.apply(x, dim, group)
