"""A GPT in its DP x TP x PP form, built from outside the model (as torchtitan does).

:func:`parallelize` takes a plain :class:`hybridpar_ext.models.GPT` (anything with its
``config`` and parameter names) and a :class:`ParallelMesh`, and returns this rank's pipeline
stage: its layers made tensor-parallel, loaded with this rank's slices of the model's weights.
Data parallelism is applied to the stage by :class:`~hybridpar_ext.parallel.data.GradientSync`,
and the stage is driven by :class:`~hybridpar_ext.parallel.pipeline.PipelineSchedule`.
"""

import torch
import torch.distributed as dist

from .. import nn as hnn
from .. import ops
from .checkpoint import shard_state_dict, stage_layers
from .layers import (SEQ_DIM, ColumnParallelLinear, VocabParallelEmbedding, mark_sequence_parallel,
                     vocab_parallel_cross_entropy)
from .transformer import ParallelTransformerLayer, kv_heads_per_rank, sync_tensor_parallel_grads


def check_parallel_config(config, dp: int, tp: int, pp: int, sequence_parallel: bool = False,
                          seq: int = None, microbatches: int = None, global_batch: int = None):
    """Raise ValueError naming the first setting that this model cannot be split by. Depends
    only on its arguments, so every rank raises the same message before any collective."""
    for name, value in (("dp", dp), ("tp", tp), ("pp", pp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    kv_heads_per_rank(config.heads, config.kv_heads, tp, op="tensor parallelism")
    for name, width in (("vocab", config.vocab_size), ("ffn", config.ffn)):
        if width % tp:
            raise ValueError(f"tensor parallelism: {name} ({width}) must be divisible by the "
                             f"tensor-parallel size ({tp})")
    if config.layers < pp:
        raise ValueError(f"pipeline parallelism: layers ({config.layers}) must be at least the "
                         f"number of pipeline stages ({pp})")
    if seq is not None:
        if seq > config.max_seq_len:
            raise ValueError(f"seq ({seq}) is longer than the model's max_seq_len ({config.max_seq_len})")
        if sequence_parallel and seq % tp:
            raise ValueError(f"sequence parallelism: seq ({seq}) must be divisible by the "
                             f"tensor-parallel size ({tp})")
    if microbatches is not None:
        if microbatches < 1:
            raise ValueError(f"microbatches must be positive, got {microbatches}")
        if microbatches < pp:
            raise ValueError(f"pipeline parallelism: microbatches ({microbatches}) must be at least "
                             f"the number of pipeline stages ({pp})")
        if global_batch is not None and global_batch % (dp * microbatches):
            raise ValueError(f"global batch ({global_batch}) must be divisible by dp * microbatches "
                             f"= {dp} * {microbatches} = {dp * microbatches}")


class ParallelGPT(torch.nn.Module):
    """This rank's pipeline stage of a GPT, tensor-parallel over ``mesh.tp``.

    ``forward(inputs)``: on the first stage ``inputs`` are tokens ``(batch, seq)``; on the others
    the ``(x, residual)`` pair the previous stage returned. The last stage returns this rank's
    vocabulary slice of the logits ``(batch, seq, vocab / tp)`` (pass them to :meth:`loss`); the
    others return ``(x, residual)``, each ``(batch, seq or seq / tp under SP, hidden)``.
    """

    def __init__(self, config, mesh, sequence_parallel=False, chunks=ops.comm.DEFAULT_CHUNKS,
                 overlap=True, device=None, dtype=None):
        super().__init__()
        check_parallel_config(config, mesh.dp, mesh.tp, mesh.pp, sequence_parallel)
        self.config, self.mesh, self.sequence_parallel = config, mesh, sequence_parallel
        self.stage, self.num_stages = mesh.pp_rank, mesh.pp
        self.is_first, self.is_last = self.stage == 0, self.stage == mesh.pp - 1
        group = mesh.tp_group
        shard = dict(sequence_parallel=sequence_parallel, chunks=chunks, overlap=overlap,
                     device=device, dtype=dtype)
        factory = dict(device=device, dtype=dtype)
        if self.is_first:
            self.embed = VocabParallelEmbedding(config.vocab_size, config.hidden, group,
                                                sequence_parallel=sequence_parallel, **factory)
        self.layers = torch.nn.ModuleDict({
            str(i): ParallelTransformerLayer(config.hidden, config.heads, config.kv_heads, config.ffn, group,
                                             config.norm, config.mlp, config.rope_theta, config.norm_eps, **shard)
            for i in stage_layers(config.layers, mesh.pp, self.stage)})
        if self.is_last:
            self.norm = hnn.make_norm(config.norm, config.hidden, config.norm_eps, **factory)
            if sequence_parallel:
                mark_sequence_parallel(self.norm)
            self.lm_head = ColumnParallelLinear(config.hidden, config.vocab_size, group, **shard)
            if config.tied_embeddings and self.is_first:
                self.lm_head.weight = self.embed.weight

    @property
    def tied_across_stages(self) -> bool:
        """The embedding and the LM head are one tensor held by two stages."""
        return self.config.tied_embeddings and self.num_stages > 1 and (self.is_first or self.is_last)

    def tied_weight(self):
        return self.embed.weight if self.is_first else self.lm_head.weight

    def forward(self, inputs):
        if self.is_first:
            x, residual = self.embed(inputs), None
        else:
            x, residual = inputs
        for layer in self.layers.values():
            x, residual = layer(x, residual)
        if not self.is_last:
            return x, residual
        x, _ = self.norm(x, residual)
        return self.lm_head(x)

    def loss(self, logits, targets):
        """Mean cross-entropy over the tokens, from the vocabulary-sliced logits."""
        return vocab_parallel_cross_entropy(logits, targets, self.mesh.tp_group).mean()

    def activation_shape(self, microbatch: int, seq: int):
        """Shape of what passes between stages: ``(x, residual)`` stacked."""
        local_seq = seq // self.mesh.tp if self.sequence_parallel else seq
        return (2, microbatch, local_seq, self.config.hidden)

    def finish_grads(self):
        """The gradient sums that tensor parallelism and tied stages owe, after backward (and
        after the data-parallel reduction): sequence-parallel partial sums and replicated kv
        heads over TP; the embedding's and the LM head's gradients across the first and last
        stages."""
        sync_tensor_parallel_grads(self, self.mesh.tp_group)
        if self.tied_across_stages:
            grad = self.tied_weight().grad
            other = self.mesh.pp - 1 if self.is_first else 0
            peer = dist.get_global_rank(self.mesh.pp_group, other)
            received = torch.empty_like(grad)
            # No copy to send: the send is waited for before the gradient changes.
            send = dist.isend(grad, dst=peer, group=self.mesh.pp_group)
            dist.recv(received, src=peer, group=self.mesh.pp_group)
            send.wait()
            grad.add_(received)

    def synced_after_reduction(self, param) -> bool:
        """Whether `param`'s gradient is still changed by :meth:`finish_grads` after the
        data-parallel reduction (so a sharded optimizer must see it whole)."""
        if getattr(param, "sequence_parallel", False):
            return True
        if self.tied_across_stages and param is self.tied_weight():
            return True
        return any(param is layer.attn.qkv.weight for layer in self.layers.values()
                   if layer.attn.kv_replicas > 1)


def parallelize(model, mesh, sequence_parallel: bool = False, chunks: int = ops.comm.DEFAULT_CHUNKS,
                overlap: bool = True, device=None, dtype=None) -> ParallelGPT:
    """This rank's part of `model` (a plain GPT) on `mesh`: its pipeline stage, tensor-parallel,
    holding its slices of the model's current weights. `model` is left as it is.

    ``sequence_parallel``: activations between blocks split along the sequence over TP.
    ``overlap=False``: every collective runs before or after its matmul (for benchmarks)."""
    config = model.config
    param = next(model.parameters())
    device = device or param.device
    dtype = dtype or param.dtype
    stage = ParallelGPT(config, mesh, sequence_parallel, chunks, overlap, device=device, dtype=dtype)
    state = shard_state_dict(model.state_dict(), config, mesh.tp, mesh.tp_rank, mesh.pp, mesh.pp_rank)
    stage.load_state_dict(state, strict=True)
    return stage


__all__ = ["ParallelGPT", "check_parallel_config", "parallelize", "SEQ_DIM"]
