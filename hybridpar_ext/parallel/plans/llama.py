"""The plan of Hugging Face decoders of the LLaMA family (``LlamaForCausalLM``,
``Qwen2ForCausalLM``, ``MistralForCausalLM``), and their pipeline stages.

:func:`decoder_plan` says how each module is split over tensor parallelism; the names are
Hugging Face's, so a stage's state_dict keys are the plain model's:

=====================================  ===============================================================
``model.embed_tokens``                 vocabulary-parallel, padded to a multiple of TP
``model.layers.*.self_attn.q_proj``    column-parallel in whole heads (bias too: Qwen2)
``model.layers.*.self_attn.k/v_proj``  column-parallel in whole kv heads; a kv head replicated over
                                       ``tp / kv_heads`` ranks when there are fewer kv heads than ranks
``model.layers.*.self_attn.o_proj``    row-parallel, by query heads
``model.layers.*.mlp.gate/up_proj``    column-parallel
``model.layers.*.mlp.down_proj``       row-parallel
``model.layers.*.self_attn``, ``mlp``  kept; their input made whole once (all-gathered along the
                                       sequence under SP, else copied with an all-reduced gradient)
                                       for the column-parallel projections inside, which then run
                                       no collective of their own
``*layernorm``, ``model.norm``         our fused RMSNorm (the Hugging Face weight), replicated; partial
                                       gradients under sequence parallelism
``lm_head``                            column-parallel over the padded vocabulary, into the
                                       vocabulary-parallel cross-entropy (no gathered logits)
=====================================  ===============================================================

Attention runs our kernel through transformers' ``AttentionInterface`` (``"hybridpar"``), with
the module's own causal and sliding-window settings; the attention modules reshape with ``-1``
heads, so they need no change to see this rank's heads.

:class:`DecoderStage` is one pipeline stage: consecutive decoder layers (cut at layer
boundaries, uneven allowed, keeping their global indices), the embedding on the first stage,
the final norm and the head on the last, the rotary embedding (no parameters) on every stage
that holds layers, which computes its cos/sin from positions rather than receiving them. It
has the interface of :class:`~hybridpar_ext.parallel.plans.gpt.GPTStage`, so the same
:class:`PipelineSchedule`, :class:`GradientSync` and ``ZeroAdamW`` drive it. Its weights come
from a plain model (:func:`build_decoder_stage`, :func:`parallelize_decoder`) or from a local
``save_pretrained`` directory, each rank reading only its slices (:func:`load_decoder_stage`).
"""

import copy
import importlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ... import ops
from ...nn.huggingface import register_hf_attention
from ...nn.norms import RMSNorm
from .. import weight_grad
from ..layers import SEQ_DIM, ColumnParallelLinear
from ..mappings import copy_to_tp, gather_from_sequence
from ..plan import (ColumnParallel, LMHead, RowParallel, SequenceParallelNorm, Style, VocabEmbedding, materialize,
                    parallelize_module, stage_layers)
from ..spec import set_shard_specs, shard_specs, spec_of, with_tied
from ..state_dict import split_by_specs
from .common import PipelineStage, check_model_split, check_sequence

# config.model_type -> (modeling module, causal-LM class, its RMSNorm class).
ARCHITECTURES = {
    "llama": ("transformers.models.llama.modeling_llama", "LlamaForCausalLM", "LlamaRMSNorm"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2ForCausalLM", "Qwen2RMSNorm"),
    "mistral": ("transformers.models.mistral.modeling_mistral", "MistralForCausalLM", "MistralRMSNorm"),
}
EMBEDDING = "model.embed_tokens.weight"


def _architecture(config):
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        archs = getattr(config, "architectures", None) or [type(config).__name__]
        raise ValueError(f"no parallel plan for {archs[0]} (model_type {model_type!r}); plans exist for "
                         f"{', '.join(ARCHITECTURES[t][1] for t in sorted(ARCHITECTURES))}")
    module, model_class, norm_class = ARCHITECTURES[model_type]
    modeling = importlib.import_module(module)
    return getattr(modeling, model_class), getattr(modeling, norm_class)


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_decoder_config(config, dp: int, tp: int, pp: int, sequence_parallel: bool = False,
                         seq: int = None):
    """Raise ValueError naming the first thing that keeps this Hugging Face config from being
    split by this layout (or run by our kernels). Depends only on its arguments, so every rank
    raises the same message before any collective. The vocabulary is padded, never refused."""
    _architecture(config)
    check_model_split(dp, tp, pp, config.num_attention_heads,
                      config.num_key_value_heads or config.num_attention_heads,
                      ffn=("intermediate_size", config.intermediate_size),
                      layers=("num_hidden_layers", config.num_hidden_layers))
    from ...ops.attention import MAX_HEAD_DIM, MIN_HEAD_DIM
    if not MIN_HEAD_DIM <= head_dim(config) <= MAX_HEAD_DIM:
        raise ValueError(f"our attention kernel takes head_dim {MIN_HEAD_DIM}..{MAX_HEAD_DIM}, the model's "
                         f"is {head_dim(config)}")
    if getattr(config, "attention_dropout", 0.0):
        raise ValueError(f"attention_dropout ({config.attention_dropout}) is not supported by our "
                         "attention kernel: set it to 0")
    check_sequence(seq, ("max_position_embeddings", config.max_position_embeddings), tp, sequence_parallel)


class SharedInputColumnLinear(ColumnParallelLinear):
    """A column-parallel linear whose input is already what every TP rank needs: its parent
    (the attention, the MLP) gathered or copied it once for all its projections
    (:class:`SharedInput`), so it runs no collective of its own. Under zero bubble its weight
    (and bias) gradient waits for the W action like every parallel linear's; the pre-hook's
    collective is on the input gradient, which B computes."""

    def forward(self, x):
        if self._deferring():
            return weight_grad.deferrable_linear(x, self.weight, self.bias)
        y = F.linear(x, self.weight)
        return y if self.bias is None else y + self.bias


@dataclass(frozen=True)
class SharedInputColumn(ColumnParallel):
    """``Linear`` -> :class:`SharedInputColumnLinear` (output features split as ColumnParallel)."""
    cls = SharedInputColumnLinear


class _TensorParallelInput:
    """Forward pre-hook: the module's input made whole on every TP rank, once. Under sequence
    parallelism the sequence is all-gathered (backward: reduce-scatter), so the Hugging Face
    attention, which reads the sequence length off its input, sees all of it; otherwise it is
    the identity whose backward all-reduces. One collective for q, k and v (gate and up)
    instead of one per projection."""

    def __init__(self, group, sequence_parallel):
        self.group, self.sequence_parallel = group, sequence_parallel

    def _whole(self, x):
        if self.sequence_parallel:
            return gather_from_sequence(x, SEQ_DIM, self.group)
        return copy_to_tp(x, self.group)

    def __call__(self, module, args, kwargs):
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": self._whole(kwargs["hidden_states"])}
        return (self._whole(args[0]),) + tuple(args[1:]), kwargs


@dataclass(frozen=True)
class SharedInput(Style):
    """The module kept (the attention, the MLP); its input made whole once for the
    :class:`SharedInputColumn` projections inside it."""

    def apply(self, module, ctx):
        module.register_forward_pre_hook(_TensorParallelInput(ctx.tp_group, ctx.sequence_parallel),
                                         with_kwargs=True)
        return module

    def specs(self, shapes, tp, rank, sequence_parallel=False):
        return {}   # its own parameters (none in these models) stay replicated


def decoder_plan(config) -> dict:
    """The plan of a LLaMA-family causal LM (see the module docstring), names as Hugging Face's."""
    unit = head_dim(config)
    layer = "model.layers.*."
    return {
        "model.embed_tokens": VocabEmbedding(),
        layer + "self_attn.q_proj": SharedInputColumn(unit=unit),
        layer + "self_attn.k_proj": SharedInputColumn(unit=unit, replicable=(0,)),
        layer + "self_attn.v_proj": SharedInputColumn(unit=unit, replicable=(0,)),
        layer + "self_attn.o_proj": RowParallel(unit=unit),
        layer + "self_attn": SharedInput(),
        layer + "mlp.gate_proj": SharedInputColumn(),
        layer + "mlp.up_proj": SharedInputColumn(),
        layer + "mlp.down_proj": RowParallel(),
        layer + "mlp": SharedInput(),
        layer + "input_layernorm": SequenceParallelNorm(),
        layer + "post_attention_layernorm": SequenceParallelNorm(),
        "model.norm": SequenceParallelNorm(),
        "lm_head": LMHead(),
    }


def _our_norms(module, norm_class):
    """Swap every Hugging Face RMSNorm under `module` for ours, holding the same weight."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is norm_class:
                ours = RMSNorm(child.weight.shape, eps=child.variance_epsilon, device="meta",
                               dtype=child.weight.dtype)
                ours.weight = child.weight
                setattr(parent, name, ours)


class _PaddingTokensNoGrad:
    """Forward hook of the parallel embedding: the positions holding ``padding_idx`` pass their
    embedding on without a gradient, so that row gets none from them (torch.nn.Embedding's rule;
    a head tied to the embedding still trains it). Under sequence parallelism the output is this
    rank's slice of the sequence, and so is the mask."""

    def __init__(self, padding_idx, sequence_parallel, tp, tp_rank):
        self.padding_idx, self.sequence_parallel, self.tp, self.tp_rank = padding_idx, sequence_parallel, tp, tp_rank

    def __call__(self, module, args, output):
        padding = args[0] == self.padding_idx
        if self.sequence_parallel:
            padding = padding.chunk(self.tp, dim=SEQ_DIM)[self.tp_rank]
        return torch.where(padding.unsqueeze(-1), output.detach(), output)


class _Container(torch.nn.Module):
    """Holds ``embed_tokens``, ``layers``, ``norm``, ``rotary_emb``: Hugging Face's ``model.``."""


class DecoderStage(PipelineStage):
    """One pipeline stage (or chunk) of a LLaMA-family causal LM, tensor-parallel over
    ``mesh.tp``: decoder layers ``layer_ids`` (keeping their global names
    ``model.layers.{i}``), plus the embedding if ``holds_embedding`` and the final norm and
    ``lm_head`` if ``holds_head``. Its parameters are empty: load them (see the module docstring).

    ``forward(inputs)``: with the embedding, ``inputs`` are tokens ``(batch, seq)``; otherwise
    the 1-tuple ``(hidden,)`` the previous stage returned. With the head it returns this rank's
    vocabulary slice of the logits ``(batch, seq, padded vocab / tp)`` (pass them to
    :meth:`loss`); otherwise ``(hidden,)``, ``(batch, seq or seq / tp under SP, hidden_size)``.
    """

    def __init__(self, config, mesh, layer_ids, holds_embedding, holds_head, sequence_parallel=False,
                 chunks=ops.comm.DEFAULT_CHUNKS, overlap=True, device=None, dtype=None):
        super().__init__()
        check_decoder_config(config, mesh.dp, mesh.tp, mesh.pp, sequence_parallel)
        layer_ids = list(layer_ids)
        n = config.num_hidden_layers
        if any(not 0 <= i < n for i in layer_ids) or len(set(layer_ids)) != len(layer_ids):
            raise ValueError(f"DecoderStage: layer_ids must be distinct indices in [0, {n}), got {layer_ids}")
        model_class, norm_class = _architecture(config)
        # Our attention, through the config every layer reads (a copy: the caller's is left alone).
        config = copy.deepcopy(config)
        config._attn_implementation = register_hf_attention()
        self.config, self.mesh, self.sequence_parallel = config, mesh, sequence_parallel
        self.stage, self.num_stages = mesh.pp_rank, mesh.pp
        self.is_first, self.is_last = bool(holds_embedding), bool(holds_head)
        self.tied_embeddings = bool(getattr(config, "tie_word_embeddings", False))

        # The plain model on the meta device, from which this stage takes its modules.
        with torch.device("meta"):
            dense = model_class(config)
        self.model = _Container()
        padding_idx = None
        if self.is_first:
            embed = dense.model.embed_tokens
            padding_idx = embed.padding_idx
            # The parallel embedding takes no padding_idx: its one effect in training (no
            # gradient through the lookups of that token) is kept by a hook below.
            embed.padding_idx = None
            self.model.embed_tokens = embed
        self.model.layers = torch.nn.ModuleDict({str(i): dense.model.layers[i] for i in layer_ids})
        if self.is_last:
            self.model.norm = dense.model.norm
            self.lm_head = dense.lm_head
            if self.tied_embeddings and self.is_first:
                self.lm_head.weight = self.model.embed_tokens.weight
        rotary_class = type(dense.model.rotary_emb)
        del dense
        if layer_ids:
            # Its buffers (inv_freq) are computed from the config, so it is built for real; it
            # has no parameters and its buffers are not in the state_dict.
            self.model.rotary_emb = rotary_class(config).to(device)
        _our_norms(self, norm_class)
        parallelize_module(self, mesh, decoder_plan(config), sequence_parallel, chunks, overlap,
                           device=device, dtype=dtype)
        materialize(self, device, dtype)
        if self.tied_embeddings and self.is_first and self.is_last:
            # One tensor, two users in this stage: zero bubble defers neither gradient (one would
            # accumulate in B, the other a second time at W). parallelize_module's re-tie turns
            # both off already; said here too, as the GPT's stage does.
            self.lm_head.defer_weight_grad = False
            self.model.embed_tokens.defer_weight_grad = False
        if self.tied_across_stages and not self.is_first:
            # The last stage's copy of the embedding: kept equal by summing the two gradients,
            # counted once (on the first stage), read from the embedding's name when loading.
            set_shard_specs(self.lm_head, {"weight": with_tied(spec_of(self.lm_head, "weight"), EMBEDDING)})
        if padding_idx is not None:
            self.model.embed_tokens.register_forward_hook(
                _PaddingTokensNoGrad(padding_idx, sequence_parallel, mesh.tp, mesh.tp_rank))

    @property
    def tied_across_stages(self) -> bool:
        """The embedding and the LM head are one tensor held by two stages."""
        return self.tied_embeddings and self.is_first != self.is_last

    def tied_weight(self):
        return self.model.embed_tokens.weight if self.is_first else self.lm_head.weight

    def forward(self, inputs):
        if self.is_first:
            hidden = self.model.embed_tokens(inputs)
        else:
            (hidden,) = inputs
        if len(self.model.layers):
            seq = hidden.shape[SEQ_DIM] * (self.mesh.tp if self.sequence_parallel else 1)
            positions = torch.arange(seq, device=hidden.device).unsqueeze(0)
            rotary = self.model.rotary_emb(hidden, positions)
            for layer in self.model.layers.values():
                # No mask: our attention applies the causal (and sliding-window) pattern itself.
                hidden = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=rotary)
        if not self.is_last:
            return (hidden,)
        return self.lm_head(self.model.norm(hidden))

    def loss(self, logits, targets):
        """Mean cross-entropy over the tokens, from the vocabulary-sliced logits (padding excluded)."""
        return self.lm_head.loss(logits, targets).mean()

    def activation_shape(self, microbatch: int, seq: int):
        """Shape of what passes between stages: ``(hidden,)`` stacked."""
        local_seq = seq // self.mesh.tp if self.sequence_parallel else seq
        return (1, microbatch, local_seq, self.config.hidden_size)


def build_decoder_stage(model, mesh, layer_ids, holds_embedding: bool, holds_head: bool,
                        sequence_parallel: bool = False, chunks: int = ops.comm.DEFAULT_CHUNKS,
                        overlap: bool = True, device=None, dtype=None) -> DecoderStage:
    """A stage (or interleaved chunk) of the plain Hugging Face `model` on `mesh`, holding this
    rank's slices of the model's current weights (on `device`, in `dtype`; by default the
    model's). `model` is left as it is."""
    param = next(model.parameters())
    stage = DecoderStage(model.config, mesh, layer_ids, holds_embedding, holds_head, sequence_parallel, chunks,
                         overlap, device=device or param.device, dtype=dtype or param.dtype)
    plain = model.state_dict()
    if stage.tied_across_stages and not stage.is_first and "lm_head.weight" not in plain:
        plain["lm_head.weight"] = plain[EMBEDDING]
    stage.load_state_dict(split_by_specs(plain, shard_specs(stage)), strict=True)
    return stage


def parallelize_decoder(model, mesh, sequence_parallel: bool = False, chunks: int = ops.comm.DEFAULT_CHUNKS,
                        overlap: bool = True, device=None, dtype=None) -> DecoderStage:
    """This rank's part of the plain Hugging Face `model` on `mesh`: its pipeline stage
    (:func:`stage_layers`: consecutive layers, the earlier stages taking one more when the
    stages do not divide them), tensor-parallel, holding its slices of the model's weights."""
    check_decoder_config(model.config, mesh.dp, mesh.tp, mesh.pp, sequence_parallel)
    layers = stage_layers(model.config.num_hidden_layers, mesh.pp, mesh.pp_rank)
    return build_decoder_stage(model, mesh, layers, mesh.pp_rank == 0, mesh.pp_rank == mesh.pp - 1,
                               sequence_parallel, chunks, overlap, device, dtype)


def load_decoder_stage(path, mesh, sequence_parallel: bool = False, chunks: int = ops.comm.DEFAULT_CHUNKS,
                       overlap: bool = True, device=None, dtype=None, layer_ids=None,
                       holds_embedding=None, holds_head=None) -> DecoderStage:
    """This rank's stage of the model saved in the local directory `path` (``config.json`` and
    safetensors weights, the ``save_pretrained`` layout), each rank reading only its own slices.
    By default the stage :func:`parallelize_decoder` would give; `dtype` (default float32) is
    the one the parameters take, whatever the files hold."""
    from transformers import AutoConfig

    from ..loading import load_safetensors

    config = AutoConfig.from_pretrained(path)
    check_decoder_config(config, mesh.dp, mesh.tp, mesh.pp, sequence_parallel)
    if layer_ids is None:
        layer_ids = stage_layers(config.num_hidden_layers, mesh.pp, mesh.pp_rank)
    first = mesh.pp_rank == 0 if holds_embedding is None else holds_embedding
    last = mesh.pp_rank == mesh.pp - 1 if holds_head is None else holds_head
    stage = DecoderStage(config, mesh, layer_ids, first, last, sequence_parallel, chunks, overlap,
                         device=device, dtype=dtype)
    aliases = {"lm_head.weight": EMBEDDING} if stage.tied_embeddings else {}
    load_safetensors(stage, path, aliases=aliases)
    return stage


# ------------------------------------------------ for the trainer: train --model PATH


def read_decoder_config(path):
    """The Hugging Face config of the local model directory `path`; ValueError naming what is
    missing, unreadable or without a plan (read from files only: the same on every rank)."""
    import os

    from transformers import AutoConfig

    if not os.path.isdir(path):
        raise ValueError(f"--model: {path!r} is neither 'gpt' nor a directory (a local Hugging Face model: "
                         "config.json and optionally its safetensors weights)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"--model: {path} has no config.json")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"--model: cannot read {os.path.join(path, 'config.json')}: {err}") from None
    try:
        _architecture(config)
    except ValueError as err:
        raise ValueError(f"--model: {err}") from None
    if has_weights(path):
        from ..loading import SafetensorsDirectory
        try:
            SafetensorsDirectory(path)
        except (OSError, ValueError) as err:
            raise ValueError(f"--model: {err}") from None
    return config


def has_weights(path) -> bool:
    """Whether the directory holds safetensors weights (else the model starts from random init)."""
    import os

    from ..loading import INDEX_FILE, SINGLE_FILE

    return any(os.path.isfile(os.path.join(path, f)) for f in (SINGLE_FILE, INDEX_FILE))


# Selective recomputation of the Hugging Face layers under tensor parallelism does not give the
# gradients of the run without it (full recomputation, and selective at tp 1, do): refused.
SELECTIVE_UNDER_TP = ("--recompute selective does not take --model PATH with --tp > 1 yet (its gradients "
                      "differ from the run without recomputation there); use --recompute full, or --tp 1")


def trainer_config(args):
    """For ``train --model PATH``: reads the Hugging Face config (kept as ``args.hf_config``),
    takes the vocabulary from it (``args.vocab``; checkpoints then describe this config, and
    ``--recompute`` wraps the stage's decoder layers; selective is refused under tp > 1), and returns the :class:`~hybridpar_ext.models.GPTConfig` of the same shapes
    (LLaMA's layout: RMSNorm, SwiGLU, rotary), which the trainer's layout checks, planner,
    FLOPs and log read. Its parameter count leaves out Qwen2's q/k/v biases."""
    from ...models import GPTConfig

    config = read_decoder_config(args.model)
    if getattr(args, "recompute", None) == "selective" and (getattr(args, "tp", None) or 1) > 1:
        raise ValueError(SELECTIVE_UNDER_TP)
    if head_dim(config) * config.num_attention_heads != config.hidden_size:
        raise ValueError(f"--model: head_dim ({head_dim(config)}) * num_attention_heads "
                         f"({config.num_attention_heads}) must be hidden_size ({config.hidden_size})")
    args.vocab, args.hf_config = config.vocab_size, config
    return GPTConfig(vocab_size=config.vocab_size, max_seq_len=config.max_position_embeddings,
                     layers=config.num_hidden_layers, hidden=config.hidden_size,
                     heads=config.num_attention_heads,
                     kv_heads=config.num_key_value_heads or config.num_attention_heads,
                     ffn=config.intermediate_size, norm="rmsnorm", mlp="swiglu",
                     tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
                     rope_theta=float(getattr(config, "rope_theta", None) or 10000.0),
                     norm_eps=config.rms_norm_eps)


def trainer_builders(path, config, seed):
    """``(parallelize, build_stage, source)`` for the trainer, shaped as the GPT's
    ``parallelize(source, mesh, **built)`` and ``build_stage(source, mesh, ids, first, last,
    **built)``: from the directory's weights, each rank reading only its slices, or, when it has
    none, from the model's random init under ``torch.manual_seed(seed)`` (the same on every rank)."""
    if has_weights(path):
        def whole(source, mesh, **built):
            return load_decoder_stage(source, mesh, **built)

        def part(source, mesh, ids, first, last, **built):
            return load_decoder_stage(source, mesh, layer_ids=ids, holds_embedding=first, holds_head=last, **built)

        return whole, part, path
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return parallelize_decoder, build_decoder_stage, AutoModelForCausalLM.from_config(config)


__all__ = ["ARCHITECTURES", "DecoderStage", "build_decoder_stage", "check_decoder_config", "decoder_plan",
           "has_weights", "load_decoder_stage", "parallelize_decoder", "read_decoder_config", "trainer_builders",
           "trainer_config"]
