"""Applying a tensor-parallel plan to a plain model, in place (as torchtitan's
``parallelize_module``).

A **plan** maps module-name patterns to **styles**: a dict ``{pattern: style}`` or a list of
``(pattern, style)`` pairs. Patterns are :mod:`fnmatch` patterns over the qualified names of
``model.named_modules()`` (``"layers.*.attn.qkv"``; ``*`` also crosses dots); each module takes
the style of the first pattern that matches it, and a pattern that matches nothing is no
error (a pipeline stage holds only part of a model). A style turns the dense module into its
parallel form and says how its parameters are split, as :class:`~.spec.ShardSpec` data:

========================  ==========================================================================
:class:`ColumnParallel`   ``Linear`` -> :class:`ColumnParallelLinear`; ``blocks`` (an int: equal
                          blocks, e.g. 2 for ``[gate; up]``; or the widths, e.g. ``[q, k, v]``),
                          ``unit`` (split in whole heads), ``replicable`` (indices of blocks that may
                          have fewer units than ranks: kv heads, then replicated)
:class:`RowParallel`      ``Linear`` -> :class:`RowParallelLinear` (input features split; same options)
:class:`VocabEmbedding`   ``Embedding`` -> :class:`VocabParallelEmbedding`, vocabulary padded to a
                          multiple of TP
:class:`LMHead`           ``Linear`` -> :class:`VocabParallelLMHead`: column-parallel over a padded
                          vocabulary, its ``loss`` the vocabulary-parallel cross-entropy
:class:`SequenceParallelNorm`  the module kept (our fused norms: their zero-bubble deferrable twins);
                          its parameters replicated, their gradients partial under sequence
                          parallelism (it sees this rank's slice of the sequence)
:class:`Replicate`        the module kept; its parameters replicated, gradients complete
========================  ==========================================================================

A plan may add its own styles (subclass :class:`Style`): model-specific code lives in plans,
never here. After the styles, every parameter without a spec gets a replicated one, and
parameters the dense model tied (one tensor under two names) are tied again when their
parallel forms have equal specs.

:func:`plan_specs` computes the specs a plan gives a model's parameters from their shapes
alone (no process group, no module built): splitting and merging state_dicts offline.
"""

import abc
import fnmatch
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .. import ops
from .layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, VocabParallelLMHead,
                     deferrable_norm_of, embedding_shard_specs, linear_shard_specs)
from .spec import SPECS_ATTR, ShardSpec, replicated_spec, set_shard_specs, shard_specs


@dataclass(frozen=True)
class PlanContext:
    """What every style of one :func:`parallelize_module` call shares."""
    tp_group: object
    tp: int
    rank: int
    sequence_parallel: bool = False
    chunks: int = ops.comm.DEFAULT_CHUNKS
    overlap: bool = True
    device: Optional[torch.device] = None
    dtype: Optional[torch.dtype] = None

    def linear_options(self):
        return dict(sequence_parallel=self.sequence_parallel, chunks=self.chunks, overlap=self.overlap,
                    device=self.device, dtype=self.dtype)


class Style(abc.ABC):
    """How one module is parallelized. ``apply`` returns the module to put in its place (itself
    or a new one) carrying its specs; ``specs`` gives the same specs from the dense
    parameters' shapes alone (``{local name: shape}``)."""

    @abc.abstractmethod
    def apply(self, module: torch.nn.Module, ctx: PlanContext) -> torch.nn.Module:
        """The parallel form of `module` (or `module` itself, its specs set)."""

    @abc.abstractmethod
    def specs(self, shapes: Dict[str, Tuple[int, ...]], tp: int, rank: int,
              sequence_parallel: bool = False) -> Dict[str, ShardSpec]:
        """The specs :meth:`apply` gives parameters of these dense shapes on rank `rank`."""


def _expect(module, cls, style):
    if not isinstance(module, cls):
        raise TypeError(f"{type(style).__name__}: expected a {cls.__name__}, got {type(module).__name__}")


@dataclass(frozen=True)
class _LinearStyle(Style):
    blocks: object = None            # None, an int (equal blocks) or a sequence of widths
    unit: int = 1
    replicable: Tuple[int, ...] = ()

    cls = None
    split_dim = None

    def apply(self, module, ctx):
        _expect(module, torch.nn.Linear, self)
        return self.cls.from_dense(module, ctx.tp_group, blocks=self.blocks, unit=self.unit,
                                   replicable=self.replicable, **ctx.linear_options())

    def specs(self, shapes, tp, rank, sequence_parallel=False):
        out, inp = shapes["weight"]
        return linear_shard_specs(self.cls.__name__, inp, out, "bias" in shapes, self.split_dim, tp, rank,
                                  sequence_parallel, self.blocks, self.unit, False, self.replicable)


@dataclass(frozen=True)
class ColumnParallel(_LinearStyle):
    """``Linear`` -> :class:`ColumnParallelLinear` (output features split)."""
    cls = ColumnParallelLinear
    split_dim = 0


@dataclass(frozen=True)
class RowParallel(_LinearStyle):
    """``Linear`` -> :class:`RowParallelLinear` (input features split)."""
    cls = RowParallelLinear
    split_dim = 1


@dataclass(frozen=True)
class LMHead(Style):
    """``Linear(hidden, vocab)`` -> :class:`VocabParallelLMHead` (vocabulary padded to a
    multiple of TP)."""

    def apply(self, module, ctx):
        _expect(module, torch.nn.Linear, self)
        return VocabParallelLMHead.from_dense(module, ctx.tp_group, **ctx.linear_options())

    def specs(self, shapes, tp, rank, sequence_parallel=False):
        out, inp = shapes["weight"]
        return linear_shard_specs(VocabParallelLMHead.__name__, inp, out, "bias" in shapes, 0, tp, rank,
                                  sequence_parallel, pad=True)


@dataclass(frozen=True)
class VocabEmbedding(Style):
    """``Embedding`` -> :class:`VocabParallelEmbedding` (padded to a multiple of TP unless
    ``pad=False``)."""
    pad: bool = True

    def apply(self, module, ctx):
        _expect(module, torch.nn.Embedding, self)
        return VocabParallelEmbedding.from_dense(module, ctx.tp_group, ctx.sequence_parallel, pad=self.pad,
                                                 device=ctx.device, dtype=ctx.dtype)

    def specs(self, shapes, tp, rank, sequence_parallel=False):
        return embedding_shard_specs(*shapes["weight"], tp, rank, self.pad)


@dataclass(frozen=True)
class Replicate(Style):
    """The module kept; each of its own parameters whole on every rank."""
    partial_under_sp: bool = False

    def apply(self, module, ctx):
        set_shard_specs(module, self.specs({n: tuple(p.shape) for n, p in module.named_parameters(recurse=False)},
                                           ctx.tp, ctx.rank, ctx.sequence_parallel))
        return module

    def specs(self, shapes, tp, rank, sequence_parallel=False):
        partial = self.partial_under_sp and sequence_parallel
        return {n: replicated_spec(s, tp, rank, partial_grad=partial) for n, s in shapes.items()}


@dataclass(frozen=True)
class SequenceParallelNorm(Replicate):
    """A norm (or anything applied token by token): replicated; under sequence parallelism it
    runs on this rank's slice of the sequence, so its gradients are partial sums over TP."""
    partial_under_sp: bool = True

    def apply(self, module, ctx):
        # Our fused norms become their deferrable twins (same parameters): under zero bubble
        # their dW/dB wait for the W action like the linears' weight gradients.
        return super().apply(deferrable_norm_of(module), ctx)


def _plan_items(plan) -> Sequence[Tuple[str, Style]]:
    items = list(plan.items()) if isinstance(plan, dict) else list(plan)
    for entry in items:
        if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str)):
            raise TypeError(f"parallelize_module: plan entries must be (pattern, style) pairs, got {entry!r}")
        if not isinstance(entry[1], Style):
            raise TypeError(f"parallelize_module: the style for {entry[0]!r} must be a Style, got {entry[1]!r}")
    return items


def match_style(name: str, plan) -> Optional[Style]:
    """The style of the first pattern of `plan` matching the module name `name`, or None."""
    for pattern, style in _plan_items(plan):
        if fnmatch.fnmatchcase(name, pattern):
            return style
    return None


def _tp_group_of(mesh):
    return mesh.tp_group if hasattr(mesh, "tp_group") else mesh


def parallelize_module(model: torch.nn.Module, mesh, plan, sequence_parallel: bool = False,
                       chunks: int = ops.comm.DEFAULT_CHUNKS, overlap: bool = True, device=None,
                       dtype=None) -> torch.nn.Module:
    """Swap `model`'s modules for their tensor-parallel forms in place, as `plan` says, and
    return `model`. `mesh`: a :class:`ParallelMesh` (its TP group is used) or a process group.
    A dense module on the meta device gives a parallel one with empty local tensors on
    ``device`` (load a state_dict into it); otherwise the local tensors are this rank's slices
    of its weights. Raises (the same on every rank, before any collective) for a bad plan or
    a module its style does not fit."""
    group = _tp_group_of(mesh)
    ctx = PlanContext(group, dist.get_world_size(group), dist.get_rank(group), sequence_parallel, chunks,
                      overlap, device, dtype)
    items = _plan_items(plan)
    # One tensor under several names (tied embeddings): tied again after the swap.
    names_of = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    chosen = [(name, match_style(name, items)) for name, _ in model.named_modules()]
    # Deepest first, so a style applied to a parent sees its children already parallel.
    for name, style in sorted((c for c in chosen if c[1] is not None), key=lambda c: -c[0].count(".")):
        module = model.get_submodule(name)
        new = style.apply(module, ctx)
        if new is not module:
            if not name:
                raise ValueError("parallelize_module: the root module can only be kept, not replaced")
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, new)
    for mod in model.modules():
        own = getattr(mod, SPECS_ATTR, {})
        missing = {n: replicated_spec(p.shape, ctx.tp, ctx.rank)
                   for n, p in mod.named_parameters(recurse=False) if n not in own}
        if missing:
            set_shard_specs(mod, {**own, **missing})
    _retie(model, [names for names in names_of.values() if len(names) > 1])
    return model


def _retie(model, groups):
    specs = shard_specs(model)
    for names in groups:
        present = [n for n in names if n in specs]
        if len(present) < 2:
            continue
        first = present[0]
        if any(specs[n] != specs[first] for n in present[1:]):
            raise ValueError(f"parallelize_module: {present} are one tensor in the dense model but the "
                             f"plan splits them differently: {[specs[n] for n in present]}")
        shared = model.get_parameter(first)
        for n in present[1:]:
            owner, _, leaf = n.rpartition(".")
            setattr(model.get_submodule(owner) if owner else model, leaf, shared)
        # One tensor, several users (an embedding and its tied head): zero bubble must not defer
        # any of their gradients, or one use would accumulate in B and another at W, and a
        # data-parallel bucket would start after the first.
        for n in present:
            owner = n.rpartition(".")[0]
            module = model.get_submodule(owner) if owner else model
            if hasattr(module, "defer_weight_grad"):
                module.defer_weight_grad = False


def plan_specs(plan, shapes: Dict[str, Tuple[int, ...]], tp: int, rank: int,
               sequence_parallel: bool = False) -> Dict[str, ShardSpec]:
    """The specs `plan` gives parameters of the dense shapes `shapes` (``{qualified parameter
    name: shape}``, e.g. from a state_dict) on rank `rank` of `tp`, without building anything."""
    items = _plan_items(plan)
    by_module = {}
    for name, shape in shapes.items():
        owner, _, leaf = name.rpartition(".")
        by_module.setdefault(owner, {})[leaf] = tuple(shape)
    out = {}
    for owner, own in by_module.items():
        style = match_style(owner, items)
        specs = (style.specs(own, tp, rank, sequence_parallel) if style is not None
                 else {n: replicated_spec(s, tp, rank) for n, s in own.items()})
        for leaf in own:
            out[f"{owner}.{leaf}" if owner else leaf] = specs.get(leaf) or replicated_spec(own[leaf], tp, rank)
    return out


def stage_layers(num_layers: int, pp: int, stage: int) -> range:
    """The layers of pipeline stage `stage`: consecutive, as even as can be, the earlier
    stages taking one more when `pp` does not divide `num_layers`."""
    if num_layers < pp:
        raise ValueError(f"layers ({num_layers}) must be at least the number of pipeline stages ({pp})")
    base, extra = divmod(num_layers, pp)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (1 if stage < extra else 0))


def materialize(module: torch.nn.Module, device=None, dtype=None) -> torch.nn.Module:
    """Give every parameter and buffer of `module` still on the meta device an empty tensor on
    `device` (floating ones in `dtype`), keeping tied parameters tied and specs as they are."""
    done = {}
    for mod in module.modules():
        for kind in ("_parameters", "_buffers"):
            for name, t in list(getattr(mod, kind).items()):
                if t is None or not t.is_meta:
                    continue
                if id(t) not in done:
                    new = torch.empty(t.shape, device=device,
                                      dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
                    done[id(t)] = torch.nn.Parameter(new, t.requires_grad) if kind == "_parameters" else new
                getattr(mod, kind)[name] = done[id(t)]
    return module


__all__ = ["ColumnParallel", "LMHead", "PlanContext", "Replicate", "RowParallel", "SequenceParallelNorm", "Style",
           "VocabEmbedding", "match_style", "materialize", "parallelize_module", "plan_specs", "stage_layers"]
