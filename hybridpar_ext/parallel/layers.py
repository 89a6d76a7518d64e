"""Tensor-parallel layers in the manner of Megatron-Core, with optional sequence parallelism.

Shapes are batch-first, ``(batch, seq, features)``; under sequence parallelism the
activations between layers are ``(batch, seq / tp, features)`` and the sequence dimension is
gathered into a column-parallel layer and scattered out of a row-parallel one by the
overlapped ops (:func:`hybridpar_ext.ops.all_gather_matmul`,
:func:`hybridpar_ext.ops.matmul_reduce_scatter`).

Parameters that every tensor-parallel rank holds whole but whose gradient each rank only
computes in part (a norm's weight or a row-parallel bias under sequence parallelism) carry
``param.sequence_parallel = True``; :func:`all_reduce_sequence_parallel_grads` sums them.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import ops
from .mappings import all_reduce_flat, copy_to_tp, gather_from_sequence, reduce_from_tp, reduce_scatter_to_sequence

SEQ_DIM = 1


def _shard(op: str, what: str, size: int, tp: int) -> int:
    if size % tp:
        raise ValueError(f"{op}: {what} ({size}) must be divisible by the tensor-parallel size ({tp})")
    return size // tp


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


class _ParallelLinear(torch.nn.Module):
    """The weight of a Linear(in_features, out_features) split over TP along `split_dim`
    (0: output features, 1: input features); the bias, if any, has the output's width.
    ``overlap=False`` runs each collective before or after its matmul instead of inside it:
    the same numbers, for measuring what the overlap buys."""

    def __init__(self, in_features, out_features, tp_group, split_dim, bias, sequence_parallel,
                 chunks, overlap, device, dtype):
        super().__init__()
        self.tp_group, self.sequence_parallel, self.chunks = tp_group, sequence_parallel, chunks
        self.overlap = overlap
        self.in_features, self.out_features = in_features, out_features
        shape = [out_features, in_features]
        name = ("out_features", "in_features")[split_dim]
        shape[split_dim] = _shard(type(self).__name__, name, shape[split_dim], dist.get_world_size(tp_group))
        factory = dict(device=device, dtype=dtype)
        self.weight = torch.nn.Parameter(torch.empty(shape, **factory))
        self.bias = torch.nn.Parameter(torch.zeros(shape[0], **factory)) if bias else None
        torch.nn.init.normal_(self.weight, std=0.02)


class ColumnParallelLinear(_ParallelLinear):
    """``Linear(in_features, out_features)`` with the output features split over TP: this rank
    holds rows ``[rank * out/tp, (rank+1) * out/tp)`` of the weight and returns that slice of
    the output. ``sequence_parallel``: the input is this rank's sequence slice and is
    all-gathered inside the matmul."""

    def __init__(self, in_features, out_features, tp_group, bias=False, sequence_parallel=False,
                 chunks=ops.comm.DEFAULT_CHUNKS, overlap=True, device=None, dtype=None):
        super().__init__(in_features, out_features, tp_group, 0, bias, sequence_parallel, chunks,
                         overlap, device, dtype)

    def forward(self, x):
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
    a column-parallel layer's output slice); the partial products are all-reduced, or under
    ``sequence_parallel`` reduce-scattered along the sequence inside the matmul."""

    def __init__(self, in_features, out_features, tp_group, bias=False, sequence_parallel=False,
                 chunks=ops.comm.DEFAULT_CHUNKS, overlap=True, device=None, dtype=None):
        super().__init__(in_features, out_features, tp_group, 1, bias, sequence_parallel, chunks,
                         overlap, device, dtype)
        if self.bias is not None:
            self.bias.sequence_parallel = sequence_parallel

    def forward(self, x):
        if self.sequence_parallel and self.overlap:
            y = ops.matmul_reduce_scatter(x, self.weight, self.tp_group, scatter_dim=SEQ_DIM, chunks=self.chunks)
        elif self.sequence_parallel:
            y = reduce_scatter_to_sequence(F.linear(x, self.weight), SEQ_DIM, self.tp_group)
        else:
            y = reduce_from_tp(F.linear(x, self.weight), self.tp_group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(torch.nn.Module):
    """``Embedding(num_embeddings, dim)`` with the vocabulary split over TP: each rank looks up
    the tokens of its shard, zeros elsewhere, and the partial embeddings are summed (all-reduce,
    or under ``sequence_parallel`` reduce-scattered along the sequence)."""

    def __init__(self, num_embeddings, embedding_dim, tp_group, sequence_parallel=False,
                 device=None, dtype=None):
        super().__init__()
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        tp, rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
        local = _shard("VocabParallelEmbedding", "num_embeddings", num_embeddings, tp)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.vocab_start, self.vocab_end = rank * local, (rank + 1) * local
        self.weight = torch.nn.Parameter(torch.empty(local, embedding_dim, device=device, dtype=dtype))
        torch.nn.init.normal_(self.weight, std=0.02)

    def forward(self, tokens):
        outside = (tokens < self.vocab_start) | (tokens >= self.vocab_end)
        local = (tokens - self.vocab_start).masked_fill(outside, 0)
        partial = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence(partial, SEQ_DIM, self.tp_group)
        return reduce_from_tp(partial, self.tp_group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, vocab_start, group):
        logits = logits.float()
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
        return grad_logits * grad.unsqueeze(-1), None, None, None


def vocab_parallel_cross_entropy(logits_shard, targets, tp_group, vocab_start=None):
    """Per-token cross-entropy of logits split over TP along the vocabulary (this rank holds
    ``[vocab_start, vocab_start + logits_shard.shape[-1])``), without gathering the logits: the
    max, the sum of exponentials and the target's logit are each reduced over TP. Returns
    float32 losses of ``targets``' shape."""
    if vocab_start is None:
        vocab_start = dist.get_rank(tp_group) * logits_shard.shape[-1]
    if targets.shape != logits_shard.shape[:-1]:
        raise ValueError(f"vocab_parallel_cross_entropy: targets must have shape {tuple(logits_shard.shape[:-1])}, "
                         f"got {tuple(targets.shape)}")
    return _VocabParallelCrossEntropy.apply(logits_shard, targets, vocab_start, tp_group)


def mark_sequence_parallel(*modules):
    """Mark the parameters of modules that run on this rank's sequence slice (norms under
    sequence parallelism): each rank's gradient of them is a partial sum over TP."""
    for module in modules:
        for p in module.parameters():
            p.sequence_parallel = True


def sequence_parallel_grads(module) -> list:
    return [p.grad for p in module.parameters() if getattr(p, "sequence_parallel", False) and p.grad is not None]


def all_reduce_sequence_parallel_grads(module, tp_group):
    """Sum over TP the gradients that sequence parallelism leaves partial (marked
    ``param.sequence_parallel``), one collective for all of them."""
    all_reduce_flat(sequence_parallel_grads(module), tp_group)
