"""The plan of our GPT (:class:`hybridpar_ext.models.GPT`), and its pipeline stages.

:func:`gpt_plan` says how each module is split over tensor parallelism:

============================  ===================================================================
``embed``                     vocabulary-parallel, padded to a multiple of TP
``layers.*.norm1/2``, ``norm``  replicated (partial gradients under sequence parallelism)
``layers.*.attn.qkv``         column-parallel in three blocks ``[q; k; v]`` of whole heads: this
                              rank's query heads, then its kv heads (a kv head replicated over
                              ``tp / kv_heads`` ranks when there are fewer kv heads than ranks)
``layers.*.attn.out_proj``    row-parallel, by query heads
``layers.*.attn``             its head counts set to this rank's (:class:`LocalHeads`)
``layers.*.mlp.fc1``          column-parallel; SwiGLU: two blocks ``[gate; up]``, each split
``layers.*.mlp.fc2``          row-parallel
``lm_head``                   column-parallel over the padded vocabulary, into the
                              vocabulary-parallel cross-entropy
============================  ===================================================================

:func:`build_stage` makes one pipeline stage (or interleaved chunk) from the plain model: the
given layers (keeping their global indices, so a stage's state_dict keys are the plain
model's), the embedding on the stage that holds it, the final norm and the head on the one
that holds it. :func:`parallelize` is the usual one-stage-per-rank call.
"""

import torch
import torch.distributed as dist

from ... import nn as hnn
from ... import ops
from ..layers import SEQ_DIM
from ..plan import (ColumnParallel, LMHead, RowParallel, SequenceParallelNorm, Style, VocabEmbedding,
                    materialize, parallelize_module, plan_specs, stage_layers)
from ..spec import set_shard_specs, shard_specs, spec_of, with_tied
from ..state_dict import merge_tensors_by_specs, shard_tensor, split_by_specs
from .common import PipelineStage, check_model_split, check_sequence, kv_heads_per_rank


class LocalHeads(Style):
    """Our :class:`hybridpar_ext.nn.Attention` after its ``qkv`` is split: its head counts
    become this rank's, read from the ``qkv`` spec's three segments (q, k, v)."""

    def apply(self, module, ctx):
        if not isinstance(module, hnn.Attention):
            raise TypeError(f"LocalHeads: expected a hybridpar_ext.nn.Attention, got {type(module).__name__}")
        q, k, _ = spec_of(module.qkv, "weight").segments
        module.num_heads, module.num_kv_heads = q.length // module.head_dim, k.length // module.head_dim
        return module

    def specs(self, shapes, tp, rank, sequence_parallel=False):
        return {}   # no parameters of its own


def layer_plan(hidden: int, heads: int, kv_heads: int, mlp: str) -> dict:
    """The plan of one :class:`hybridpar_ext.nn.TransformerLayer`, names relative to it."""
    head_dim = hidden // heads
    return {
        "norm1": SequenceParallelNorm(),
        "norm2": SequenceParallelNorm(),
        "attn.qkv": ColumnParallel(blocks=(heads * head_dim, kv_heads * head_dim, kv_heads * head_dim),
                                   unit=head_dim, replicable=(1, 2)),
        "attn.out_proj": RowParallel(unit=head_dim),
        "attn": LocalHeads(),
        "mlp.fc1": ColumnParallel(blocks=2 if mlp == "swiglu" else None),
        "mlp.fc2": RowParallel(),
    }


def gpt_plan(config) -> dict:
    """The plan of a whole GPT (see the module docstring)."""
    plan = {"embed": VocabEmbedding()}
    plan.update({f"layers.*.{k}": v for k, v in layer_plan(config.hidden, config.heads, config.kv_heads,
                                                           config.mlp).items()})
    plan.update({"norm": SequenceParallelNorm(), "lm_head": LMHead()})
    return plan


def check_parallel_config(config, dp: int, tp: int, pp: int, sequence_parallel: bool = False,
                          seq: int = None, microbatches: int = None, global_batch: int = None):
    """Raise ValueError naming the first setting that this model cannot be split by. Depends
    only on its arguments, so every rank raises the same message before any collective. The
    vocabulary needs no divisibility: it is padded to a multiple of ``tp``."""
    check_model_split(dp, tp, pp, config.heads, config.kv_heads, ffn=("ffn", config.ffn),
                      layers=("layers", config.layers))
    check_sequence(seq, ("max_seq_len", config.max_seq_len), tp, sequence_parallel)
    if microbatches is not None:
        if microbatches < 1:
            raise ValueError(f"microbatches must be positive, got {microbatches}")
        if microbatches < pp:
            raise ValueError(f"pipeline parallelism: microbatches ({microbatches}) must be at least "
                             f"the number of pipeline stages ({pp})")
        if global_batch is not None and global_batch % (dp * microbatches):
            raise ValueError(f"global batch ({global_batch}) must be divisible by dp * microbatches "
                             f"= {dp} * {microbatches} = {dp * microbatches}")


class ParallelTransformerLayer(hnn.TransformerLayer):
    """A :class:`hybridpar_ext.nn.TransformerLayer` made tensor-parallel by :func:`layer_plan`
    (its weights empty: load this rank's slices, e.g. with :func:`split_tensor`). Under
    ``sequence_parallel`` its inputs and outputs are this rank's slice of the sequence."""

    def __init__(self, hidden, heads, kv_heads, ffn, tp_group, norm="layernorm", activation="gelu",
                 rope_theta=10000.0, norm_eps=1e-5, sequence_parallel=False,
                 chunks=ops.comm.DEFAULT_CHUNKS, overlap=True, device=None, dtype=None):
        kv_heads_per_rank(heads, kv_heads, dist.get_world_size(tp_group), "ParallelTransformerLayer")
        super().__init__(hidden, heads, kv_heads, ffn, norm, activation, rope_theta, norm_eps, device="meta")
        parallelize_module(self, tp_group, layer_plan(hidden, heads, kv_heads, activation), sequence_parallel,
                           chunks, overlap, device=device, dtype=dtype)
        materialize(self, device, dtype)
        with torch.no_grad():
            for mod in (self.norm1, self.norm2):
                mod.reset_parameters()
            for p in (self.attn.qkv.weight, self.attn.out_proj.weight, self.mlp.fc1.weight, self.mlp.fc2.weight):
                torch.nn.init.normal_(p, std=0.02)


class GPTStage(PipelineStage):
    """One pipeline stage (or chunk) of a GPT, tensor-parallel over ``mesh.tp``: layers
    ``layer_ids`` (keeping their global names ``layers.{i}``), plus the embedding if
    ``holds_embedding`` and the final norm and LM head if ``holds_head``.

    ``forward(inputs)``: with the embedding, ``inputs`` are tokens ``(batch, seq)``; otherwise
    the ``(x, residual)`` pair the previous stage returned. With the head it returns this
    rank's vocabulary slice of the logits ``(batch, seq, padded vocab / tp)`` (pass them to
    :meth:`loss`); otherwise ``(x, residual)``, each ``(batch, seq or seq / tp under SP, hidden)``.
    """

    def __init__(self, config, mesh, layer_ids, holds_embedding, holds_head, sequence_parallel=False,
                 chunks=ops.comm.DEFAULT_CHUNKS, overlap=True, device=None, dtype=None):
        super().__init__()
        check_parallel_config(config, mesh.dp, mesh.tp, mesh.pp, sequence_parallel)
        layer_ids = list(layer_ids)
        if any(not 0 <= i < config.layers for i in layer_ids) or len(set(layer_ids)) != len(layer_ids):
            raise ValueError(f"GPTStage: layer_ids must be distinct indices in [0, {config.layers}), "
                             f"got {layer_ids}")
        self.config, self.mesh, self.sequence_parallel = config, mesh, sequence_parallel
        self.stage, self.num_stages = mesh.pp_rank, mesh.pp
        self.is_first, self.is_last = bool(holds_embedding), bool(holds_head)
        from ...models.gpt import make_layer

        # The plain modules on the meta device; the plan swaps in the parallel ones, then every
        # tensor gets its local storage and this rank's weights are loaded into it.
        meta = dict(device="meta")
        if self.is_first:
            self.embed = torch.nn.Embedding(config.vocab_size, config.hidden, **meta)
        self.layers = torch.nn.ModuleDict({str(i): make_layer(config, **meta) for i in layer_ids})
        if self.is_last:
            self.norm = hnn.make_norm(config.norm, config.hidden, config.norm_eps, **meta)
            self.lm_head = torch.nn.Linear(config.hidden, config.vocab_size, bias=False, **meta)
            if config.tied_embeddings and self.is_first:
                self.lm_head.weight = self.embed.weight
        parallelize_module(self, mesh, gpt_plan(config), sequence_parallel, chunks, overlap,
                           device=device, dtype=dtype)
        materialize(self, device, dtype)
        if config.tied_embeddings and self.is_first and self.is_last:
            # One tensor, two users in this stage: the embedding's gradient comes in B, so the
            # head's must too (a deferred one would accumulate into it a second time at W).
            self.lm_head.defer_weight_grad = False
        if self.tied_across_stages and not self.is_first:
            # The last stage's copy of the embedding: kept equal by summing the two gradients,
            # counted once (on the first stage).
            set_shard_specs(self.lm_head, {"weight": with_tied(spec_of(self.lm_head, "weight"), "embed.weight")})

    @property
    def tied_across_stages(self) -> bool:
        """The embedding and the LM head are one tensor held by two stages."""
        return self.config.tied_embeddings and self.is_first != self.is_last

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
        """Mean cross-entropy over the tokens, from the vocabulary-sliced logits (padding excluded)."""
        return self.lm_head.loss(logits, targets).mean()

    def activation_shape(self, microbatch: int, seq: int):
        """Shape of what passes between stages: ``(x, residual)`` stacked."""
        local_seq = seq // self.mesh.tp if self.sequence_parallel else seq
        return (2, microbatch, local_seq, self.config.hidden)


def build_stage(model, mesh, layer_ids, holds_embedding: bool, holds_head: bool, sequence_parallel: bool = False,
                chunks: int = ops.comm.DEFAULT_CHUNKS, overlap: bool = True, device=None, dtype=None) -> GPTStage:
    """A stage (or interleaved chunk) of the plain GPT `model` on `mesh`: layers `layer_ids`,
    the embedding and the head if asked, tensor-parallel, holding this rank's slices of the
    model's current weights (on `device`, in `dtype`; by default the model's). `model` is left
    as it is."""
    param = next(model.parameters())
    device = device or param.device
    dtype = dtype or param.dtype
    stage = GPTStage(model.config, mesh, layer_ids, holds_embedding, holds_head, sequence_parallel, chunks,
                     overlap, device=device, dtype=dtype)
    stage.load_state_dict(split_by_specs(model.state_dict(), shard_specs(stage)), strict=True)
    return stage


def parallelize(model, mesh, sequence_parallel: bool = False, chunks: int = ops.comm.DEFAULT_CHUNKS,
                overlap: bool = True, device=None, dtype=None) -> GPTStage:
    """This rank's part of `model` (a plain GPT) on `mesh`: its pipeline stage
    (:func:`stage_layers`), tensor-parallel, holding its slices of the model's current weights.
    `model` is left as it is.

    ``sequence_parallel``: activations between blocks split along the sequence over TP.
    ``overlap=False``: every collective runs before or after its matmul (for benchmarks)."""
    config = model.config
    check_parallel_config(config, mesh.dp, mesh.tp, mesh.pp, sequence_parallel)
    layers = stage_layers(config.layers, mesh.pp, mesh.pp_rank)
    return build_stage(model, mesh, layers, mesh.pp_rank == 0, mesh.pp_rank == mesh.pp - 1, sequence_parallel,
                       chunks, overlap, device, dtype)


# ------------------------------------------------ the GPT's state_dict, split and merged offline


def _on_stage(name: str, config, pp: int, stage: int) -> bool:
    if name.startswith("embed."):
        return stage == 0
    if name.startswith(("norm.", "lm_head.")):
        return stage == pp - 1
    if name.startswith("layers."):
        return int(name.split(".")[1]) in stage_layers(config.layers, pp, stage)
    raise KeyError(f"unknown GPT parameter {name!r}")


def _plan_for(config):
    """The GPT plan for `config`, which may describe one layer only (hidden, heads, kv_heads,
    mlp): then the layer plan, unprefixed, serves names like ``attn.qkv.weight``."""
    layer = layer_plan(config.hidden, config.heads, config.kv_heads, config.mlp)
    return {**{f"layers.*.{k}": v for k, v in layer.items()}, **layer,
            "embed": VocabEmbedding(), "norm": SequenceParallelNorm(), "lm_head": LMHead()}


def _spec(name, shape, config, tp, rank):
    kv_heads_per_rank(config.heads, config.kv_heads, tp)
    return plan_specs(_plan_for(config), {name: tuple(shape)}, tp, rank)[name]


def split_tensor(name: str, tensor: torch.Tensor, config, tp: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s slice of the full GPT parameter `name` (a copy), by the GPT plan's spec."""
    return shard_tensor(tensor, _spec(name, tensor.shape, config, tp, rank))


def _global_shape(name, local, config, tp):
    """The dense shape of GPT parameter `name` from a rank's local shape: the dimension a spec
    cuts is the only one that differs, and its dense size follows from the config (heads, the
    vocabulary) or is ``tp`` local sizes (even splits)."""
    head_dim = config.hidden // config.heads
    if name.endswith("attn.qkv.weight"):
        return ((config.heads + 2 * config.kv_heads) * head_dim, local[1])
    if name.endswith(("embed.weight", "lm_head.weight")):
        return (config.vocab_size, local[1])
    if name.endswith("mlp.fc1.weight"):
        return (local[0] * tp, local[1])
    if name.endswith(("attn.out_proj.weight", "mlp.fc2.weight")):
        return (local[0], local[1] * tp)
    return tuple(local)


def merge_tensors(name: str, parts, config) -> torch.Tensor:
    """The full GPT parameter `name` from its slices on each of the ``len(parts)`` TP ranks."""
    tp = len(parts)
    shape = _global_shape(name, parts[0].shape, config, tp)
    return merge_tensors_by_specs(list(parts), [_spec(name, shape, config, tp, r) for r in range(tp)])


def shard_state_dict(state_dict: dict, config, tp: int = 1, tp_rank: int = 0, pp: int = 1,
                     pp_rank: int = 0) -> dict:
    """The entries of a plain GPT's `state_dict` that rank (tp_rank, pp_rank) holds, cut to
    its slices. Loads with ``load_state_dict`` into the module :func:`parallelize` builds."""
    return {name: split_tensor(name, t, config, tp, tp_rank) for name, t in state_dict.items()
            if _on_stage(name, config, pp, pp_rank)}


def merge_state_dicts(shards, config) -> dict:
    """The plain state_dict from the state_dicts of one pipeline stage's TP ranks (by rank);
    for several stages, unite the results."""
    return {name: merge_tensors(name, [s[name] for s in shards], config) for name in shards[0]}


__all__ = ["GPTStage", "LocalHeads", "ParallelTransformerLayer", "build_stage", "check_parallel_config",
           "gpt_plan", "kv_heads_per_rank", "layer_plan", "merge_state_dicts", "merge_tensors", "parallelize",
           "shard_state_dict", "split_tensor", "SEQ_DIM"]
