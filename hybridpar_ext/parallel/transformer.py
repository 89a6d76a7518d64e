"""The transformer block split over tensor-parallel ranks: the plain modules of
:mod:`hybridpar_ext.nn` with their projections swapped for sharded ones, so the math is
theirs.

- :class:`ParallelAttention`: query heads split over TP; key/value heads split too when there
  are at least as many as TP ranks, otherwise each rank holds the one kv head its query heads
  use (replicated over ``tp / kv_heads`` ranks, whose gradients are summed after backward).
- :class:`ParallelMLP`: ``fc1`` column-parallel (for SwiGLU each rank holds its slice of the
  gate and its slice of the up projection), ``fc2`` row-parallel.
- :class:`ParallelTransformerLayer`: the pre-norm block around them; the norms run on the
  whole activation, or under sequence parallelism on this rank's sequence slice.
"""

import torch
import torch.distributed as dist

from .. import nn as hnn
from .. import ops
from .layers import ColumnParallelLinear, RowParallelLinear, mark_sequence_parallel, sequence_parallel_grads
from .mappings import all_reduce_flat


def kv_heads_per_rank(heads: int, kv_heads: int, tp: int, op: str = "ParallelAttention"):
    """(kv heads each rank holds, ranks that hold each kv head)."""
    if heads % tp:
        raise ValueError(f"{op}: heads ({heads}) must be divisible by the tensor-parallel size ({tp})")
    if kv_heads >= tp:
        if kv_heads % tp:
            raise ValueError(f"{op}: kv_heads ({kv_heads}) must be divisible by the tensor-parallel "
                             f"size ({tp}), or divide it")
        return kv_heads // tp, 1
    if tp % kv_heads:
        raise ValueError(f"{op}: kv_heads ({kv_heads}) must divide the tensor-parallel size ({tp}) "
                         "when there are fewer kv heads than ranks")
    return 1, tp // kv_heads


class ParallelAttention(hnn.Attention):
    """:class:`hybridpar_ext.nn.Attention` (causal, RoPE, GQA) with ``qkv`` column-parallel and
    ``out_proj`` row-parallel. This rank's ``qkv.weight`` holds the rows
    ``[q of its heads; k of its kv heads; v of its kv heads]``
    (see :mod:`hybridpar_ext.parallel.checkpoint` for the split)."""

    def __init__(self, hidden, heads, kv_heads, tp_group, sequence_parallel=False, rope_theta=10000.0,
                 chunks=ops.comm.DEFAULT_CHUNKS, overlap=True, device=None, dtype=None):
        tp = dist.get_world_size(tp_group)
        if hidden % heads:
            raise ValueError(f"ParallelAttention: hidden ({hidden}) must be divisible by heads ({heads})")
        local_kv, replicas = kv_heads_per_rank(heads, kv_heads, tp)
        head_dim = hidden // heads
        # Built on the meta device: the dense projections are replaced by the sharded ones.
        super().__init__(hidden, heads // tp, local_kv, head_dim, bias=False, rope=True,
                         rope_theta=rope_theta, causal=True, device="meta")
        self.kv_replicas = replicas
        self.kv_index = dist.get_rank(tp_group) // replicas   # the kv head this rank holds, if replicated
        self.tp_group = tp_group
        shard = dict(sequence_parallel=sequence_parallel, chunks=chunks, overlap=overlap,
                     device=device, dtype=dtype)
        self.qkv = ColumnParallelLinear(hidden, tp * (heads // tp + 2 * local_kv) * head_dim, tp_group, **shard)
        self.out_proj = RowParallelLinear(heads * head_dim, hidden, tp_group, **shard)

    def replicated_kv_grad(self):
        """The rows of ``qkv.weight.grad`` that belong to this rank's replicated kv head, or None."""
        if self.kv_replicas == 1 or self.qkv.weight.grad is None:
            return None
        q_rows = self.num_heads * self.head_dim
        return self.qkv.weight.grad[q_rows:]


class ParallelMLP(hnn.MLP):
    """:class:`hybridpar_ext.nn.MLP` with ``fc1`` column-parallel and ``fc2`` row-parallel."""

    def __init__(self, hidden, ffn, activation, tp_group, sequence_parallel=False,
                 chunks=ops.comm.DEFAULT_CHUNKS, overlap=True, device=None, dtype=None):
        super().__init__(hidden, ffn, activation, device="meta")
        shard = dict(sequence_parallel=sequence_parallel, chunks=chunks, overlap=overlap,
                     device=device, dtype=dtype)
        self.fc1 = ColumnParallelLinear(hidden, 2 * ffn if self.swiglu else ffn, tp_group, **shard)
        self.fc2 = RowParallelLinear(ffn, hidden, tp_group, **shard)


class ParallelTransformerLayer(hnn.TransformerLayer):
    """:class:`hybridpar_ext.nn.TransformerLayer` on :class:`ParallelAttention` and
    :class:`ParallelMLP`. Under ``sequence_parallel`` its inputs and outputs are this rank's
    slice of the sequence (dimension 1), and the norms' weights are marked
    ``sequence_parallel`` (their gradients are partial sums until
    :func:`sync_tensor_parallel_grads`)."""

    def __init__(self, hidden, heads, kv_heads, ffn, tp_group, norm="layernorm", activation="gelu",
                 rope_theta=10000.0, norm_eps=1e-5, sequence_parallel=False,
                 chunks=ops.comm.DEFAULT_CHUNKS, overlap=True, device=None, dtype=None):
        shard = dict(sequence_parallel=sequence_parallel, chunks=chunks, overlap=overlap,
                     device=device, dtype=dtype)
        super().__init__(hidden, heads, kv_heads, ffn, norm, activation, rope_theta, norm_eps,
                         attn=ParallelAttention(hidden, heads, kv_heads, tp_group, rope_theta=rope_theta, **shard),
                         mlp=ParallelMLP(hidden, ffn, activation, tp_group, **shard),
                         device=device, dtype=dtype)
        if sequence_parallel:
            mark_sequence_parallel(self.norm1, self.norm2)


def sync_tensor_parallel_grads(module, tp_group):
    """After backward (and after the data-parallel reduction, which commutes with it): sum over
    TP the gradients each rank holds only in part — the weights marked ``sequence_parallel``
    and the rows of replicated kv heads (summed over the ranks that hold the same head). One
    collective for all of them."""
    partial = sequence_parallel_grads(module)
    replicated = [m for m in module.modules()
                  if isinstance(m, ParallelAttention) and m.replicated_kv_grad() is not None]
    slots = []
    for m in replicated:
        # A zeroed slot per kv head: summing over all of TP sums each head over its replicas.
        grad = m.replicated_kv_grad()
        kv_heads = dist.get_world_size(tp_group) // m.kv_replicas
        slot = grad.new_zeros((kv_heads,) + tuple(grad.shape))
        slot[m.kv_index] = grad
        slots.append(slot)
    all_reduce_flat(partial + slots, tp_group)
    for m, slot in zip(replicated, slots):
        m.replicated_kv_grad().copy_(slot[m.kv_index])
