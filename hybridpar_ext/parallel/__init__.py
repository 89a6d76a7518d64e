"""Hybrid parallelism on a DeviceMesh, in the manner of Megatron-Core: tensor (and sequence)
parallel layers, data parallelism with gradients reduced during backward (optionally ZeRO-1),
and 1F1B pipeline parallelism. Models stay plain; :func:`parallelize` applies it from outside."""

from .checkpoint import (gather_state_dict, merge_state_dicts, merge_tensors, shard_state_dict,
                         split_tensor, stage_layers)
from .data import GradientSync, ZeroAdamW
from .layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                     all_reduce_sequence_parallel_grads, vocab_parallel_cross_entropy)
from .mappings import (copy_to_tp, gather_from_sequence, reduce_from_tp, reduce_scatter_to_sequence,
                       scatter_to_sequence)
from .mesh import ParallelMesh, init_mesh
from .model import ParallelGPT, check_parallel_config, parallelize
from .pipeline import PipelineSchedule, StepStats, ideal_bubble, one_f_one_b
from .transformer import (ParallelAttention, ParallelMLP, ParallelTransformerLayer,
                          sync_tensor_parallel_grads)

__all__ = ["ColumnParallelLinear", "GradientSync", "ParallelAttention", "ParallelGPT", "ParallelMLP",
           "ParallelMesh", "ParallelTransformerLayer", "PipelineSchedule", "RowParallelLinear", "StepStats",
           "VocabParallelEmbedding", "ZeroAdamW", "all_reduce_sequence_parallel_grads",
           "check_parallel_config", "copy_to_tp", "gather_from_sequence", "gather_state_dict",
           "ideal_bubble", "init_mesh", "merge_state_dicts", "merge_tensors", "one_f_one_b", "parallelize",
           "reduce_from_tp", "reduce_scatter_to_sequence", "scatter_to_sequence", "shard_state_dict",
           "split_tensor", "stage_layers", "sync_tensor_parallel_grads", "vocab_parallel_cross_entropy"]
