"""Hybrid parallelism on a DeviceMesh, in the manner of Megatron-Core: tensor (and sequence)
parallel layers, data parallelism with gradients reduced during backward (optionally ZeRO-1),
and 1F1B pipeline parallelism. Models stay plain: a plan (:mod:`.plans`) applied by
:func:`parallelize_module` swaps in the parallel layers, each carrying the
:class:`ShardSpec` of its parameters; :func:`parallelize` does it for our GPT."""

from .data import GradientSync, ZeroAdamW
from .layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, VocabParallelLMHead,
                     partial_grad_params, sync_tensor_parallel_grads, vocab_parallel_cross_entropy)
from .mappings import (copy_to_tp, gather_from_sequence, reduce_from_tp, reduce_scatter_to_sequence,
                       scatter_to_sequence)
from .mesh import ParallelMesh, init_mesh
from .pipeline import PipelineSchedule, StepStats, ideal_bubble, one_f_one_b
from .plan import (ColumnParallel, LMHead, Replicate, RowParallel, SequenceParallelNorm, Style, VocabEmbedding,
                   materialize, parallelize_module, plan_specs, stage_layers)
from .plans.gpt import (GPTStage, ParallelTransformerLayer, build_stage, check_parallel_config, gpt_plan,
                        merge_state_dicts, merge_tensors, parallelize, shard_state_dict, split_tensor)
from .spec import Segment, ShardSpec, shard_specs
from .state_dict import gather_state_dict, merge_by_specs, merge_tensors_by_specs, shard_tensor, split_by_specs

__all__ = ["ColumnParallel", "ColumnParallelLinear", "GPTStage", "GradientSync", "LMHead", "ParallelMesh",
           "ParallelTransformerLayer", "PipelineSchedule", "Replicate", "RowParallel", "RowParallelLinear",
           "Segment", "SequenceParallelNorm", "ShardSpec", "StepStats", "Style", "VocabEmbedding",
           "VocabParallelEmbedding", "VocabParallelLMHead", "ZeroAdamW", "build_stage", "check_parallel_config",
           "copy_to_tp", "gather_from_sequence", "gather_state_dict", "gpt_plan", "ideal_bubble", "init_mesh",
           "materialize", "merge_by_specs", "merge_state_dicts", "merge_tensors", "merge_tensors_by_specs",
           "one_f_one_b", "parallelize", "parallelize_module", "partial_grad_params", "plan_specs",
           "reduce_from_tp", "reduce_scatter_to_sequence", "scatter_to_sequence", "shard_specs",
           "shard_state_dict", "shard_tensor", "split_by_specs", "split_tensor", "stage_layers",
           "sync_tensor_parallel_grads", "vocab_parallel_cross_entropy"]
