"""Tensor-parallel layers in the manner of Megatron-Core, with optional sequence parallelism,
each built from the dense module it replaces (``from_dense``) and carrying the
:class:`~hybridpar_ext.parallel.spec.ShardSpec` of each of its parameters.

Shapes are batch-first, ``(batch, seq, features)``; under sequence parallelism the
activations between layers are ``(batch, seq / tp, features)`` and the sequence dimension is
gathered into a column-parallel layer and scattered out of a row-parallel one by the
overlapped ops (:func:`hybridpar_ext.ops.all_gather_matmul`,
:func:`hybridpar_ext.ops.matmul_reduce_scatter`).

How a layer's output dimension is cut is data, not a subclass: ``blocks`` (the widths of
consecutive fused blocks, e.g. ``[q, k, v]`` or ``[gate, up]``) each split over TP in whole
``unit``-wide pieces (a head's width), a block with fewer units than ranks replicated (kv heads
fewer than ranks); ``pad=True`` pads a vocabulary up to a multiple of TP. The spec records the
result; :func:`sync_tensor_parallel_grads` sums, from the specs alone, the gradients each rank
holds only in part (replicated segments marked ``partial_grad``).
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import nn as hnn
from .. import ops
from . import weight_grad
from .mappings import (_all_reduce, _gather, _reduce_scatter, all_reduce_flat, copy_to_tp, gather_from_sequence,
                       reduce_from_tp, reduce_scatter_to_sequence)
from .spec import (ShardSpec, block_segments, padded_segments, replicated_spec, set_shard_specs, shard_specs,
                   spec_of)
from .state_dict import shard_tensor

SEQ_DIM = 1


def _shard(op: str, what: str, size: int, tp: int) -> int:
    if size % tp:
        raise ValueError(f"{op}: {what} ({size}) must be divisible by the tensor-parallel size ({tp})")
    return size // tp


def _split_spec(op, what, shape, dim, tp, rank, blocks=None, unit=1, pad=False, replicable=()) -> ShardSpec:
    """The spec of a tensor of global `shape` cut along `dim` (see the module docstring).
    ``blocks``: None (one block), an int (that many equal blocks) or the blocks' widths."""
    size = shape[dim]
    if pad:
        segments, padding = padded_segments(size, tp, rank)
        return ShardSpec(shape, dim, segments, padding)
    if blocks is None and unit == 1 and not replicable:
        local = _shard(op, what, size, tp)
        return ShardSpec(shape, dim, block_segments([size], local, tp, rank, op))
    if blocks is None:
        blocks = [size]
    elif isinstance(blocks, int):
        if blocks < 1 or size % blocks:
            raise ValueError(f"{op}: {what} ({size}) does not split into {blocks} equal blocks")
        blocks = [size // blocks] * blocks
    if sum(blocks) != size:
        raise ValueError(f"{op}: blocks {list(blocks)} must add up to {what} ({size})")
    segments = block_segments(blocks, unit, tp, rank, op, replicable)
    partial = any(s.replicas > 1 for s in segments)
    return ShardSpec(shape, dim, segments, partial_grad=partial)


def linear_shard_specs(op, in_features, out_features, bias, split_dim, tp, rank, sequence_parallel=False,
                       blocks=None, unit=1, pad=False, replicable=()) -> dict:
    """The specs of a Linear's ``weight`` (and ``bias``) split along `split_dim` (0: output
    features, column-parallel; 1: input features, row-parallel) on rank `rank` of `tp`. A pure
    function: the layers and the plan styles both call it."""
    what = ("out_features", "in_features")[split_dim]
    spec = _split_spec(op, what, (out_features, in_features), split_dim, tp, rank, blocks, unit, pad, replicable)
    specs = {"weight": spec}
    if bias and split_dim == 0:
        specs["bias"] = ShardSpec((out_features,), 0, spec.segments, spec.padding, spec.partial_grad)
    elif bias:
        # Added after the reduction: whole on every rank; under SP to this rank's slice of the
        # sequence, so its gradient is a partial sum.
        specs["bias"] = replicated_spec((out_features,), tp, rank, partial_grad=sequence_parallel)
    return specs


def embedding_shard_specs(num_embeddings, embedding_dim, tp, rank, pad=False) -> dict:
    """The spec of a vocabulary-parallel embedding's ``weight`` (rows split, padded if asked)."""
    return {"weight": _split_spec("VocabParallelEmbedding", "num_embeddings", (num_embeddings, embedding_dim),
                                  0, tp, rank, pad=pad)}


def _load_from_dense(module, dense):
    """Copy this rank's slices of `dense`'s parameters into `module` (nothing if `dense` is on
    the meta device: the caller loads a state_dict later)."""
    if dense.weight.is_meta:
        return module
    with torch.no_grad():
        for name, spec in shard_specs(module).items():
            getattr(module, name).copy_(shard_tensor(getattr(dense, name).detach(), spec))
    return module


def _factory(dense, device=None, dtype=None):
    return dict(device=device or dense.weight.device, dtype=dtype or dense.weight.dtype)


class _ColumnLinear(torch.autograd.Function):
    """``x @ W_shard.T`` with x replicated over TP: in backward the all-reduce of grad_x runs
    while grad_W's GEMM computes."""

    @staticmethod
    def forward(ctx, x, weight, group):
        ctx.save_for_backward(x, weight)
        ctx.group = group
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = (grad @ weight).contiguous()
        work = dist.all_reduce(grad_x, group=ctx.group, async_op=True)
        grad_w = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        work.wait()
        return grad_x, grad_w, None


class _DeferredRule:
    """How a parallel linear's matmul and its communication run when zero bubble defers its
    weight gradient (:func:`~hybridpar_ext.parallel.weight_grad.deferrable_matmul`): the input
    backward (B) computes and communicates only ``grad_x``, and hands on the pair ``(a, b)``
    whose ``a^T b`` is the weight gradient, computed at the W action. Together they compute
    what the fused backward does (the overlapped ops' C++ backward returns both at once)."""

    def __init__(self, layer):
        self.group, self.chunks = layer.tp_group, layer.chunks
        self.sp, self.overlap = layer.sequence_parallel, layer.overlap


class _ColumnRule(_DeferredRule):
    """``gather(x) @ W.T``: B reduces (all-reduce; under SP reduce-scatters) ``grad @ W``;
    W needs the (gathered) input, kept from the forward."""

    def forward(self, x, weight):
        if self.sp and self.overlap:
            y, gathered = ops.all_gather_matmul(x, weight, self.group, gather_dim=SEQ_DIM, chunks=self.chunks,
                                                return_gathered=True)
            return y, (gathered,)
        gathered = _gather(x, SEQ_DIM, self.group) if self.sp else x
        return F.linear(gathered, weight), (gathered,)

    def input_grad(self, grad, weight, saved, needs_grad_x):
        (gathered,) = saved
        grad_x = None
        if needs_grad_x:
            if self.sp and self.overlap:   # reduce_scatter(grad @ W), the chunks overlapped
                grad_x = ops.matmul_reduce_scatter(grad, weight.t().contiguous(), self.group,
                                                   scatter_dim=SEQ_DIM, chunks=self.chunks)
            elif self.sp:
                grad_x = _reduce_scatter(grad @ weight, SEQ_DIM, self.group)
            else:
                grad_x = _all_reduce(grad @ weight, self.group)
        return grad_x, (grad, gathered)


class _RowRule(_DeferredRule):
    """``reduce(x @ W.T)`` (all-reduce; under SP reduce-scatter): B gathers the output
    gradient under SP and multiplies it by W; W needs that gathered gradient and the input."""

    def forward(self, x, weight):
        if self.sp and self.overlap:
            return ops.matmul_reduce_scatter(x, weight, self.group, scatter_dim=SEQ_DIM, chunks=self.chunks), (x,)
        y = F.linear(x, weight)
        return (_reduce_scatter(y, SEQ_DIM, self.group) if self.sp else _all_reduce(y, self.group)), (x,)

    def input_grad(self, grad, weight, saved, needs_grad_x):
        (x,) = saved
        if self.sp and self.overlap:   # all_gather(grad) @ W, the chunks overlapped
            grad_x, gathered = ops.all_gather_matmul(grad, weight.t().contiguous(), self.group, gather_dim=SEQ_DIM,
                                                     chunks=self.chunks, return_gathered=True)
            return (grad_x if needs_grad_x else None), (gathered, x)
        gathered = _gather(grad, SEQ_DIM, self.group) if self.sp else grad
        return (gathered @ weight if needs_grad_x else None), (gathered, x)


class _ParallelLinear(torch.nn.Module):
    """The weight of a Linear(in_features, out_features) split over TP along `split_dim`
    (0: output features, 1: input features) as `blocks`/`unit`/`pad` say (by default in
    ``tp`` equal slices); the bias, if any, has the output's width. ``overlap=False`` runs each
    collective before or after its matmul instead of inside it: the same numbers, for
    measuring what the overlap buys."""

    def __init__(self, in_features, out_features, tp_group, split_dim, bias, sequence_parallel,
                 chunks, overlap, device, dtype, blocks=None, unit=1, pad=False, replicable=()):
        super().__init__()
        self.tp_group, self.sequence_parallel, self.chunks = tp_group, sequence_parallel, chunks
        self.overlap = overlap
        self.in_features, self.out_features = in_features, out_features
        tp, rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
        specs = linear_shard_specs(type(self).__name__, in_features, out_features, bias, split_dim, tp, rank,
                                   sequence_parallel, blocks, unit, pad, replicable)
        factory = dict(device=device, dtype=dtype)
        self.weight = torch.nn.Parameter(torch.empty(specs["weight"].local_shape, **factory))
        self.bias = torch.nn.Parameter(torch.zeros(specs["bias"].local_shape, **factory)) if bias else None
        torch.nn.init.normal_(self.weight, std=0.02)
        set_shard_specs(self, specs)
        # Zero bubble's split backward: inside a WeightGradStore's recording the weight (and
        # bias) gradient waits for the W action. Off for a weight that another module of the
        # same stage also uses (a tied LM head), which would accumulate in two steps.
        self.defer_weight_grad = True

    def _deferring(self) -> bool:
        return self.defer_weight_grad and weight_grad.deferring(self.weight)

    @classmethod
    def from_dense(cls, linear: torch.nn.Linear, tp_group, sequence_parallel=False,
                   chunks=ops.comm.DEFAULT_CHUNKS, overlap=True, blocks=None, unit=1, pad=False,
                   replicable=(), device=None, dtype=None):
        """The parallel form of `linear`, holding this rank's slices of its weights (empty if
        `linear` is on the meta device). `linear` is left as it is."""
        module = cls(linear.in_features, linear.out_features, tp_group, bias=linear.bias is not None,
                     sequence_parallel=sequence_parallel, chunks=chunks, overlap=overlap,
                     blocks=blocks, unit=unit, pad=pad, replicable=replicable, **_factory(linear, device, dtype))
        return _load_from_dense(module, linear)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"local={tuple(self.weight.shape)}, sequence_parallel={self.sequence_parallel}")


class ColumnParallelLinear(_ParallelLinear):
    """``Linear(in_features, out_features)`` with the output features split over TP: by default
    this rank holds rows ``[rank * out/tp, (rank+1) * out/tp)`` of the weight and returns that
    slice of the output; ``blocks``/``unit`` cut fused projections block by block, ``pad`` pads
    ``out_features`` to a multiple of TP (see the module docstring). ``sequence_parallel``:
    the input is this rank's sequence slice and is all-gathered inside the matmul."""

    def __init__(self, in_features, out_features, tp_group, bias=False, sequence_parallel=False,
                 chunks=ops.comm.DEFAULT_CHUNKS, overlap=True, device=None, dtype=None, blocks=None,
                 unit=1, pad=False, replicable=()):
        super().__init__(in_features, out_features, tp_group, 0, bias, sequence_parallel, chunks,
                         overlap, device, dtype, blocks, unit, pad, replicable)

    def forward(self, x):
        if self._deferring():
            return weight_grad.deferrable_matmul(x, self.weight, self.bias, _ColumnRule(self))
        if not self.overlap:
            x = (gather_from_sequence(x, SEQ_DIM, self.tp_group) if self.sequence_parallel
                 else copy_to_tp(x, self.tp_group))
            y = F.linear(x, self.weight)
        elif self.sequence_parallel:
            y = ops.all_gather_matmul(x, self.weight, self.tp_group, gather_dim=SEQ_DIM, chunks=self.chunks)
        else:
            y = _ColumnLinear.apply(x, self.weight, self.tp_group)
        return y if self.bias is None else y + self.bias


class RowParallelLinear(_ParallelLinear):
    """``Linear(in_features, out_features)`` with the input features split over TP (the input is
    a column-parallel layer's output slice; ``blocks``/``unit`` as for it); the partial products
    are all-reduced, or under ``sequence_parallel`` reduce-scattered along the sequence inside
    the matmul. The bias is whole on every rank, added after the reduction."""

    def __init__(self, in_features, out_features, tp_group, bias=False, sequence_parallel=False,
                 chunks=ops.comm.DEFAULT_CHUNKS, overlap=True, device=None, dtype=None, blocks=None,
                 unit=1, pad=False, replicable=()):
        if pad:
            raise ValueError("RowParallelLinear: pad is not supported (the input features are a "
                             "column-parallel layer's output, which has no padding)")
        super().__init__(in_features, out_features, tp_group, 1, bias, sequence_parallel, chunks,
                         overlap, device, dtype, blocks, unit, pad, replicable)

    def forward(self, x):
        if self._deferring():
            return weight_grad.deferrable_matmul(x, self.weight, self.bias, _RowRule(self))
        if self.sequence_parallel and self.overlap:
            y = ops.matmul_reduce_scatter(x, self.weight, self.tp_group, scatter_dim=SEQ_DIM, chunks=self.chunks)
        elif self.sequence_parallel:
            y = reduce_scatter_to_sequence(F.linear(x, self.weight), SEQ_DIM, self.tp_group)
        else:
            y = reduce_from_tp(F.linear(x, self.weight), self.tp_group)
        return y if self.bias is None else y + self.bias


class VocabParallelLMHead(ColumnParallelLinear):
    """The LM head: ``Linear(hidden, vocab)`` column-parallel over the vocabulary, padded to a
    multiple of TP. Its output is this rank's vocabulary slice of the logits, which
    :meth:`loss` feeds to :func:`vocab_parallel_cross_entropy` without gathering them; padded
    columns (past ``vocab_size``) are excluded from the softmax there."""

    def __init__(self, in_features, vocab_size, tp_group, bias=False, sequence_parallel=False,
                 chunks=ops.comm.DEFAULT_CHUNKS, overlap=True, device=None, dtype=None):
        super().__init__(in_features, vocab_size, tp_group, bias, sequence_parallel, chunks, overlap,
                         device, dtype, pad=True)
        self.vocab_size = vocab_size
        self.vocab_start = dist.get_rank(tp_group) * self.weight.shape[0]

    @classmethod
    def from_dense(cls, linear: torch.nn.Linear, tp_group, sequence_parallel=False,
                   chunks=ops.comm.DEFAULT_CHUNKS, overlap=True, device=None, dtype=None):
        """The parallel form of the LM head `linear` (``out_features`` is the vocabulary)."""
        module = cls(linear.in_features, linear.out_features, tp_group, bias=linear.bias is not None,
                     sequence_parallel=sequence_parallel, chunks=chunks, overlap=overlap,
                     **_factory(linear, device, dtype))
        return _load_from_dense(module, linear)

    def loss(self, logits, targets):
        """Per-token cross-entropy of this head's logits slice (float32 or wider)."""
        return vocab_parallel_cross_entropy(logits, targets, self.tp_group, self.vocab_start, self.vocab_size)


class VocabParallelEmbedding(torch.nn.Module):
    """``Embedding(num_embeddings, dim)`` with the vocabulary split over TP: each rank looks up
    the tokens of its shard, zeros elsewhere, and the partial embeddings are summed (all-reduce,
    or under ``sequence_parallel`` reduce-scattered along the sequence). ``pad=True`` pads the
    vocabulary to a multiple of TP (the padding rows are never looked up)."""

    def __init__(self, num_embeddings, embedding_dim, tp_group, sequence_parallel=False,
                 device=None, dtype=None, pad=False):
        super().__init__()
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        tp, rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
        spec = embedding_shard_specs(num_embeddings, embedding_dim, tp, rank, pad)["weight"]
        local = spec.local_length
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.vocab_start, self.vocab_end = rank * local, (rank + 1) * local
        self.weight = torch.nn.Parameter(torch.empty(spec.local_shape, device=device, dtype=dtype))
        torch.nn.init.normal_(self.weight, std=0.02)
        set_shard_specs(self, {"weight": spec})
        # Zero bubble defers the table's gradient (a scatter-add of the output gradient's rows)
        # to the W action; off for a table another module of the stage also uses (a tied head).
        self.defer_weight_grad = True

    @classmethod
    def from_dense(cls, embedding: torch.nn.Embedding, tp_group, sequence_parallel=False, pad=True,
                   device=None, dtype=None):
        """The parallel form of `embedding` (padded to a multiple of TP unless ``pad=False``),
        holding this rank's rows of its table (empty if it is on the meta device)."""
        if embedding.padding_idx is not None or embedding.max_norm is not None:
            raise ValueError("VocabParallelEmbedding.from_dense: padding_idx and max_norm are not supported")
        module = cls(embedding.num_embeddings, embedding.embedding_dim, tp_group, sequence_parallel,
                     pad=pad, **_factory(embedding, device, dtype))
        return _load_from_dense(module, embedding)

    def extra_repr(self):
        return (f"{self.num_embeddings}, {self.embedding_dim}, vocab=[{self.vocab_start}, {self.vocab_end}), "
                f"sequence_parallel={self.sequence_parallel}")

    def forward(self, tokens):
        outside = (tokens < self.vocab_start) | (tokens >= self.vocab_end)
        local = (tokens - self.vocab_start).masked_fill(outside, 0)
        if self.defer_weight_grad and weight_grad.deferring(self.weight):
            partial = weight_grad.deferrable_embedding(local, outside, self.weight)
        else:
            partial = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence(partial, SEQ_DIM, self.tp_group)
        return reduce_from_tp(partial, self.tp_group)


class _DeferrableNorm:
    """Zero bubble's split backward for our fused norms: with ``defer_weight_grad`` on, inside
    a WeightGradStore's recording, the weight and bias gradients wait for the W action (B
    computes dx only, W recomputes dW/dB from the normalised input, the statistics and dy);
    otherwise the module is the plain :mod:`hybridpar_ext.nn` norm, its fused kernel untouched.

    Off by default (:func:`defer_norm_weight_grads` turns it on): W would keep each norm's input
    and output gradient from B to W, two activations per norm (on the GPT of
    tests/parallel/test_zero_bubble_memory.py the pipeline's peak goes from 1F1B's +3.7% to
    +38% at p = 2, from +0.0% to +37% at p = 4), to move into the bubble a reduction over the
    rows that costs about as much as reading them once, a small part of a layer's backward."""

    is_rms = False
    defer_weight_grad = False

    @classmethod
    def from_dense(cls, norm):
        """The deferrable twin of our `norm`, holding the same parameters (not copies)."""
        if norm.elementwise_affine is False or norm.weight is None:
            raise ValueError(f"{cls.__name__}.from_dense: a norm without weight has no gradient to defer")
        extra = {} if cls.is_rms else {"bias": norm.bias is not None}
        twin = cls(norm.normalized_shape, eps=norm.eps, device="meta", **extra)
        twin.weight = norm.weight
        if not cls.is_rms:
            twin.bias = norm.bias
        return twin

    def forward(self, input, residual=None):
        if not (self.defer_weight_grad and weight_grad.deferring(self.weight)):
            return super().forward(input, residual)
        return weight_grad.deferrable_norm(input, self.weight, getattr(self, "bias", None), self.eps, residual,
                                           is_rms=self.is_rms, normalized_shape=self.normalized_shape)


class DeferrableLayerNorm(_DeferrableNorm, hnn.LayerNorm):
    """:class:`hybridpar_ext.nn.LayerNorm` whose dW/dB zero bubble defers to its W actions."""


class DeferrableRMSNorm(_DeferrableNorm, hnn.RMSNorm):
    """:class:`hybridpar_ext.nn.RMSNorm` whose dW zero bubble defers to its W actions."""
    is_rms = True


def defer_norm_weight_grads(module, on: bool = True) -> int:
    """Turn zero bubble's deferral of the norms' dW/dB on (or off) for every deferrable norm
    under `module` (a stage, or the chunks of a rank); returns how many."""
    count = 0
    for norm in module.modules():
        if isinstance(norm, _DeferrableNorm):
            norm.defer_weight_grad = on
            count += 1
    return count


def deferrable_norm_of(norm):
    """`norm`'s deferrable twin (same parameters) if it is one of our affine norms, else `norm`."""
    for ours, twin in ((hnn.RMSNorm, DeferrableRMSNorm), (hnn.LayerNorm, DeferrableLayerNorm)):
        if type(norm) is ours and getattr(norm, "weight", None) is not None:
            return twin.from_dense(norm)
    return norm


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, vocab_start, vocab_size, group):
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))   # float64 stays float64
        valid = vocab_size - vocab_start   # columns of this shard inside the vocabulary
        if valid < logits.shape[-1]:
            # Padding: exp(-inf) = 0 leaves it out of the sum and gives it no gradient.
            padded = torch.arange(logits.shape[-1], device=logits.device) >= max(valid, 0)
            logits = logits.masked_fill(padded, float("-inf"))
        local_max = logits.max(dim=-1).values
        dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - local_max.unsqueeze(-1)
        vocab = logits.shape[-1]
        outside = (targets < vocab_start) | (targets >= vocab_start + vocab)
        local_target = (targets - vocab_start).masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        # One all-reduce for both sums.
        both = torch.stack([sum_exp, target_logit])
        dist.all_reduce(both, group=group)
        sum_exp, target_logit = both[0], both[1]
        loss = sum_exp.log() - target_logit
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local_target, outside)
        return loss

    @staticmethod
    def backward(ctx, grad):
        softmax, local_target, outside = ctx.saved_tensors
        grad_logits = softmax.clone(memory_format=torch.contiguous_format)
        rows = grad_logits.view(-1, grad_logits.shape[-1])
        hit = (~outside).view(-1)
        idx = torch.arange(rows.shape[0], device=rows.device)
        rows[idx[hit], local_target.view(-1)[hit]] -= 1.0
        return grad_logits * grad.unsqueeze(-1), None, None, None, None


def vocab_parallel_cross_entropy(logits_shard, targets, tp_group, vocab_start=None, vocab_size=None):
    """Per-token cross-entropy of logits split over TP along the vocabulary (this rank holds
    ``[vocab_start, vocab_start + logits_shard.shape[-1])``), without gathering the logits: the
    max, the sum of exponentials and the target's logit are each reduced over TP. Columns at or
    past ``vocab_size`` (a vocabulary padded to a multiple of TP) are left out of the softmax.
    Returns float32 (float64 for float64 logits) losses of ``targets``' shape."""
    if vocab_start is None:
        vocab_start = dist.get_rank(tp_group) * logits_shard.shape[-1]
    if vocab_size is None:
        vocab_size = dist.get_world_size(tp_group) * logits_shard.shape[-1]
    if targets.shape != logits_shard.shape[:-1]:
        raise ValueError(f"vocab_parallel_cross_entropy: targets must have shape {tuple(logits_shard.shape[:-1])}, "
                         f"got {tuple(targets.shape)}")
    return _VocabParallelCrossEntropy.apply(logits_shard, targets, vocab_start, vocab_size, tp_group)


def _partial_layout(module, tp_group):
    """For the parameters whose replicated segments hold partial gradients: (param, spec, the
    global span [lo, hi) along the spec's dimension that covers every TP rank's replicated
    segments of it). Agreed over TP with one exchange, then cached on `module`."""
    cache = getattr(module, "_partial_grad_layout", None)
    if cache is not None and cache[0] is tp_group:
        return cache[1]
    mine = []
    for name, p in module.named_parameters():
        spec = _spec_for(module, name)
        if spec is not None and spec.partial_grad:
            replicated = [s for s in spec.segments if s.replicas > 1]
            if replicated:
                mine.append((name, min(s.start for s in replicated), max(s.stop for s in replicated)))
    everyone = [None] * dist.get_world_size(tp_group)
    dist.all_gather_object(everyone, mine, group=tp_group)
    names = [[n for n, _, _ in r] for r in everyone]
    if any(n != names[0] for n in names):
        raise RuntimeError("sync_tensor_parallel_grads: the tensor-parallel ranks disagree on which "
                           f"parameters hold partial gradients: {names}")
    params = dict(module.named_parameters())
    layout = []
    for i, name in enumerate(names[0]):
        lo = min(r[i][1] for r in everyone)
        hi = max(r[i][2] for r in everyone)
        layout.append((params[name], _spec_for(module, name), lo, hi))
    module._partial_grad_layout = (tp_group, layout)
    return layout


def _spec_for(module, qualified):
    owner, _, leaf = qualified.rpartition(".")
    return spec_of(module.get_submodule(owner) if owner else module, leaf)


def partial_grad_params(module) -> list:
    """The parameters of `module` whose gradients :func:`sync_tensor_parallel_grads` still
    changes (a sharded optimizer must see them whole before)."""
    out = []
    for name, p in module.named_parameters():
        spec = _spec_for(module, name)
        if spec is not None and spec.partial_grad and any(s.replicas > 1 for s in spec.segments):
            out.append(p)
    return out


def sync_tensor_parallel_grads(module, tp_group):
    """After backward (and after the data-parallel reduction, which commutes with it): sum over
    the ranks that hold it each replicated segment whose gradient is partial (specs with
    ``partial_grad``: norms and row-parallel biases under sequence parallelism, kv heads
    replicated over fewer kv heads than ranks). One collective for all of them: each rank
    writes its segments into a zeroed buffer laid out in global coordinates, so summing over
    all of TP sums each segment over its holders."""
    layout = _partial_layout(module, tp_group)
    pieces, slots = [], []
    for p, spec, lo, hi in layout:
        if p.grad is None:
            continue
        shape = list(spec.global_shape)
        shape[spec.dim] = hi - lo
        slot = p.grad.new_zeros(shape)
        for offset, seg in spec.local_segments():
            if seg.replicas > 1:
                slot.narrow(spec.dim, seg.start - lo, seg.length).copy_(p.grad.narrow(spec.dim, offset, seg.length))
        pieces.append((p, spec, lo))
        slots.append(slot)
    all_reduce_flat(slots, tp_group)
    for (p, spec, lo), slot in zip(pieces, slots):
        for offset, seg in spec.local_segments():
            if seg.replicas > 1:
                p.grad.narrow(spec.dim, offset, seg.length).copy_(slot.narrow(spec.dim, seg.start - lo, seg.length))
