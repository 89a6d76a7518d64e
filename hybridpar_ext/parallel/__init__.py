"""Hybrid parallelism on a DeviceMesh: tensor (and sequence) parallel layers in the manner of
Megatron-Core. Models stay plain; parallelism is applied from outside."""

from .layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                     all_reduce_sequence_parallel_grads, vocab_parallel_cross_entropy)
from .mappings import (copy_to_tp, gather_from_sequence, reduce_from_tp, reduce_scatter_to_sequence,
                       scatter_to_sequence)
from .mesh import ParallelMesh, init_mesh

__all__ = ["ColumnParallelLinear", "ParallelMesh", "RowParallelLinear", "VocabParallelEmbedding",
           "all_reduce_sequence_parallel_grads", "copy_to_tp", "gather_from_sequence", "init_mesh",
           "reduce_from_tp", "reduce_scatter_to_sequence", "scatter_to_sequence",
           "vocab_parallel_cross_entropy"]
