"""Communication ops that overlap collectives with compute.

- :func:`all_gather_matmul` — ``all_gather(x) @ weight.T``: the gather is split into chunks and
  the matmul of each chunk runs as soon as it has arrived (this rank's shard first).
- :func:`matmul_reduce_scatter` — ``reduce_scatter(x @ weight.T)``: the product is computed
  in chunks and each chunk's reduce-scatter starts as soon as it is computed.
- :class:`GradBucketReducer` — data-parallel gradient averaging in buckets that start their
  all-reduce (or reduce-scatter) during backward.

The first two are custom ops (``hybridpar::all_gather_matmul``,
``hybridpar::matmul_reduce_scatter``) implemented in C++ against c10d (``csrc/comm/``), so
the same code runs on NCCL and on gloo; autograd pairs them as Megatron's sequence
parallelism does (the backward of each is the other, with the weight-gradient GEMM overlapping
the input gradient's collective). ``HYBRIDPAR_BACKEND=reference`` runs the plain
compositions from :mod:`hybridpar_ext.reference.comm` instead. ``HYBRIDPAR_DEBUG=1`` makes
every call check that all ranks pass the same shapes, dtypes and options first.
"""

import contextlib
import functools
import weakref
import zlib
from typing import Iterable, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from ..reference import comm as ref
from . import _backend, _checks, _debug

DEFAULT_CHUNKS = 4
GroupLike = Union[None, str, dist.ProcessGroup]


def _resolve(op: str, group: GroupLike):
    """(ProcessGroup, its registered name) for a group, a group name or None (the world)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{op}: torch.distributed is not initialized; call "
                           "dist.init_process_group (or run under torchrun) first")
    if group is None:
        group = dist.group.WORLD
    if isinstance(group, str):
        try:
            group = dist.distributed_c10d._resolve_process_group(group)
        except Exception:
            raise ValueError(f"{op}: group {group!r} is not a registered process group") from None
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{op}: group must be a ProcessGroup, a group name or None, "
                        f"got {type(group).__name__}")
    return group, group.group_name


def _world(group_name: str) -> int:
    return dist.distributed_c10d._resolve_process_group(group_name).size()


def _check_matmul_args(op: str, x, weight, dim_name: str, dim, chunks):
    _checks.check_tensor(op, "x", x)
    _checks.check_tensor(op, "weight", weight)
    if x.dim() < 2:
        raise ValueError(f"{op}: x must have at least 2 dimensions (rows to split and the "
                         f"features the matmul contracts), got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{op}: weight must have shape (N, {x.shape[-1]}) to match the last "
                         f"dimension of x {tuple(x.shape)}, got {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{op}: weight must have the dtype of x ({x.dtype}), got {weight.dtype}")
    _checks.check_same_device(op, "weight", weight, x.device)
    if (isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim()
            or dim % x.dim() == x.dim() - 1):
        raise ValueError(f"{op}: {dim_name} must be a dimension of x other than the last (which "
                         f"the matmul contracts): an int in [{-x.dim()}, {x.dim() - 2}] for x of "
                         f"shape {tuple(x.shape)} (and not -1), got {dim!r}")
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"{op}: chunks must be a positive int, got {chunks!r}")
    return dim % x.dim()


def _check_device_backend(op: str, group, x):
    try:
        group._get_backend(x.device)
    except RuntimeError:
        raise ValueError(f"{op}: the group has no backend for {x.device.type} tensors (x is on "
                         f"{x.device}); gloo serves CPU tensors, NCCL CUDA tensors") from None


def _prepare(op: str, x, weight, group: GroupLike, dim_name: str, dim, chunks):
    """Every check of a matmul op before its collectives start (the cross-rank one first, in
    debug mode, so that ranks passing different shapes fail together); returns the group, its
    name and the split dimension, normalised."""
    group, name = _resolve(op, group)
    if _debug.enabled():
        _debug.check_same_on_all_ranks(op, group, x.device, [x, weight], [dim, chunks])
    dim = _check_matmul_args(op, x, weight, dim_name, dim, chunks)
    _check_device_backend(op, group, x)
    return group, name, dim


# ------------------------------------------------------------------------- custom ops

@torch.library.register_fake("hybridpar::all_gather_matmul")
def _(x, weight, group_name, gather_dim=0, chunks=1):
    front = x.movedim(gather_dim, 0)
    shape = (front.shape[0] * _world(group_name),) + tuple(front.shape[1:])
    out = x.new_empty(shape[:-1] + (weight.shape[0],)).movedim(0, gather_dim)
    return out, x.new_empty(shape).movedim(0, gather_dim)


@torch.library.register_fake("hybridpar::all_gather_matmul_backward")
def _(grad_out, gathered, weight, group_name, gather_dim, chunks):
    front = gathered.movedim(gather_dim, 0)
    shape = (front.shape[0] // _world(group_name),) + tuple(front.shape[1:])
    return gathered.new_empty(shape).movedim(0, gather_dim), weight.new_empty(weight.shape)


@torch.library.register_fake("hybridpar::matmul_reduce_scatter")
def _(x, weight, group_name, scatter_dim=0, chunks=1):
    front = x.movedim(scatter_dim, 0)
    shape = (front.shape[0] // _world(group_name),) + tuple(front.shape[1:-1]) + (weight.shape[0],)
    return x.new_empty(shape).movedim(0, scatter_dim)


@torch.library.register_fake("hybridpar::matmul_reduce_scatter_backward")
def _(grad_out, x, weight, group_name, scatter_dim, chunks):
    front = x.movedim(scatter_dim, 0)
    return x.new_empty(front.shape).movedim(0, scatter_dim), weight.new_empty(weight.shape)


def _all_gather_matmul_setup(ctx, inputs, output):
    _x, weight, group_name, gather_dim, chunks = inputs
    _out, gathered = output
    ctx.mark_non_differentiable(gathered)
    ctx.save_for_backward(gathered, weight)
    ctx.args = (group_name, gather_dim, chunks)


def _all_gather_matmul_grad(ctx, grad_out, _grad_gathered):
    gathered, weight = ctx.saved_tensors
    grad_x, grad_weight = torch.ops.hybridpar.all_gather_matmul_backward(
        grad_out, gathered, weight, *ctx.args)
    return grad_x, grad_weight, None, None, None


def _matmul_reduce_scatter_setup(ctx, inputs, output):
    x, weight, group_name, scatter_dim, chunks = inputs
    ctx.save_for_backward(x, weight)
    ctx.args = (group_name, scatter_dim, chunks)


def _matmul_reduce_scatter_grad(ctx, grad_out):
    x, weight = ctx.saved_tensors
    grad_x, grad_weight = torch.ops.hybridpar.matmul_reduce_scatter_backward(
        grad_out, x, weight, *ctx.args)
    return grad_x, grad_weight, None, None, None


torch.library.register_autograd("hybridpar::all_gather_matmul", _all_gather_matmul_grad,
                                setup_context=_all_gather_matmul_setup)
torch.library.register_autograd("hybridpar::matmul_reduce_scatter", _matmul_reduce_scatter_grad,
                                setup_context=_matmul_reduce_scatter_setup)


# ----------------------------------------------------------------------------- public

def all_gather_matmul(x: Tensor, weight: Tensor, group: GroupLike = None, gather_dim: int = 0,
                      chunks: int = DEFAULT_CHUNKS, return_gathered: bool = False):
    """``all_gather(x, gather_dim) @ weight.T`` over ``group``, overlapped.

    ``x`` is this rank's shard (``(..., K)``; every rank passes the same shape), ``weight``
    is ``(N, K)``. Returns ``(..., N)`` with ``x.shape[gather_dim] * world`` rows along
    ``gather_dim``; with ``return_gathered=True`` also the gathered ``x`` (no extra
    communication: it is the buffer the chunks arrive in). ``chunks`` (clamped to the rows
    each rank has) trades per-collective overhead against overlap.

    Backward: ``grad_x = reduce_scatter(grad @ weight)`` by :func:`matmul_reduce_scatter`'s
    chunked path, and ``grad_weight = grad^T @ gathered`` while those reduce-scatters run.
    """
    group, name, gather_dim = _prepare("all_gather_matmul", x, weight, group, "gather_dim",
                                       gather_dim, chunks)
    if _backend.requested() == "reference":
        out, gathered = ref.all_gather_matmul(x, weight, group, gather_dim)
    else:
        out, gathered = torch.ops.hybridpar.all_gather_matmul(x, weight, name, gather_dim, chunks)
    return (out, gathered) if return_gathered else out


def matmul_reduce_scatter(x: Tensor, weight: Tensor, group: GroupLike = None,
                          scatter_dim: int = 0, chunks: int = DEFAULT_CHUNKS) -> Tensor:
    """``reduce_scatter(x @ weight.T, scatter_dim)`` over ``group`` (a sum), overlapped.

    ``x`` is ``(..., K)`` with ``x.shape[scatter_dim]`` divisible by the group's size;
    ``weight`` is ``(N, K)``. Returns this rank's ``1/world`` of the summed product along
    ``scatter_dim``.

    Backward: ``grad_x = all_gather(grad) @ weight`` by :func:`all_gather_matmul`'s chunked
    path, with ``grad_weight = all_gather(grad)^T @ x`` accumulated chunk by chunk as the
    gathered gradient arrives.
    """
    group, name, scatter_dim = _prepare("matmul_reduce_scatter", x, weight, group, "scatter_dim",
                                        scatter_dim, chunks)
    world = group.size()
    if x.shape[scatter_dim] % world:
        raise ValueError(f"matmul_reduce_scatter: x.shape[{scatter_dim}] = {x.shape[scatter_dim]} cannot be split "
                         f"evenly over the {world} ranks of the group")
    if _backend.requested() == "reference":
        return ref.matmul_reduce_scatter(x, weight, group, scatter_dim)
    return torch.ops.hybridpar.matmul_reduce_scatter(x, weight, name, scatter_dim, chunks)


# ---------------------------------------------------------------------- bucket reducer

class GradBucketReducer:
    """Averages the gradients of ``params`` over ``group`` while backward runs.

    Parameters are packed, last registered first, into flat buckets of about
    ``bucket_cap_mb`` (one dtype per bucket). A hook on each parameter marks its gradient
    ready; a bucket whose gradients are all ready is flattened and its all-reduce starts at
    once, in bucket order on every rank. After backward, :meth:`finish` waits for all of them
    and leaves every ``param.grad`` as a view of its bucket, averaged over the ranks; the next
    backward accumulates straight into the buckets. ::

        reducer = GradBucketReducer(model.parameters(), bucket_cap_mb=25)
        for microbatch in microbatches[:-1]:
            with reducer.no_sync():          # accumulate locally, no communication
                loss_fn(model(microbatch)).backward()
        loss_fn(model(microbatches[-1])).backward()   # buckets start during this backward
        reducer.finish()
        optimizer.step()

    A parameter that gets no gradient on a rank in a step contributes zeros there (its
    bucket starts in :meth:`finish`), so ranks that take different branches never hang each
    other; one that no rank touched ends with a zero gradient. float32/float64 are summed,
    then divided by the world size: exactly ``all_reduce(grad) / world``. float16 and
    bfloat16 are divided by the world size first (so the sum cannot overflow), then summed in
    their own dtype by the backend, which rounds once per addition.

    With ``reduce_scatter=True`` (for a sharded optimizer, ZeRO-1) each bucket is
    reduce-scattered instead: after :meth:`finish`, ``shards[b]`` holds this rank's averaged
    ``1/world`` of bucket ``b`` (buckets are zero-padded to a multiple of the world size), and
    ``param.grad`` still holds this rank's own, unreduced gradient.
    """

    def __init__(self, params: Iterable[Tensor], group: GroupLike = None,
                 bucket_cap_mb: float = 25.0, reduce_scatter: bool = False):
        op = "GradBucketReducer"
        self.group, name = _resolve(op, group)
        _checks.check_positive(op, "bucket_cap_mb", bucket_cap_mb)
        unique = {}
        for p in params:
            if not isinstance(p, Tensor):
                raise TypeError(f"{op}: params must be tensors, got {type(p).__name__}")
            if p.requires_grad:
                unique.setdefault(id(p), p)
        self.params = list(unique.values())
        if not self.params:
            raise ValueError(f"{op}: params holds no tensor that requires grad")
        if _debug.enabled():
            self._check_layout(op)
        from .. import _C
        self._impl = _C.GradBucketReducer(self.params, name, max(1, int(bucket_cap_mb * 2**20)),
                                          bool(reduce_scatter))
        self.reduce_scatter = bool(reduce_scatter)
        self._sync = True
        # The hooks hold the reducer weakly: parameters outliving it must not keep it (and its
        # process group) alive.
        this = weakref.ref(self)
        self._hooks = [p.register_post_accumulate_grad_hook(functools.partial(_mark_ready, this, i))
                       for i, p in enumerate(self.params)]

    def _check_layout(self, op):
        layout = repr([(tuple(p.shape), str(p.dtype)) for p in self.params]).encode()
        options = [len(self.params), sum(p.numel() for p in self.params), zlib.crc32(layout)]
        _debug.check_same_on_all_ranks(f"{op} (parameter count, numel, layout checksum)",
                                       self.group, self.params[0].device, [], options)

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside accumulate gradients locally and communicate nothing."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    def finish(self) -> None:
        """Start the buckets backward did not, wait for all, average; call after backward."""
        self._impl.finish()

    def remove(self) -> None:
        """Detach the hooks: backward no longer starts reductions."""
        for h in getattr(self, "_hooks", []):
            h.remove()
        self._hooks = []

    def __del__(self):
        self.remove()

    @property
    def num_buckets(self) -> int:
        return self._impl.num_buckets

    @property
    def bucket_indices(self) -> list:
        """Indices into ``params`` of each bucket's parameters, in bucket order."""
        return self._impl.bucket_indices

    @property
    def buffers(self) -> list:
        return self._impl.buffers

    @property
    def shards(self) -> list:
        return self._impl.shards

    @property
    def offsets(self) -> list:
        """Element offset of each parameter in its bucket."""
        return self._impl.offsets

    @property
    def started_during_backward(self) -> int:
        """How many buckets had started before the last :meth:`finish` was called."""
        return self._impl.started_during_backward


def _mark_ready(reducer_ref, index: int, _param: Tensor):
    reducer = reducer_ref()
    if reducer is not None and reducer._sync:
        reducer._impl.mark_ready(index)
