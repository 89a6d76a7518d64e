"""Shard specs: how a tensor-parallel rank's local parameter sits in the global one.

Every parameter of a parallelized module has a :class:`ShardSpec` (read them all with
:func:`shard_specs`). A spec is pure data, so everything that moves parameters between their
global and their split form reads it and never a parameter's name:

- ``dim``: the one dimension along which the local tensor differs from the global one (the
  other dimensions are whole);
- ``segments``: the pieces of that dimension this rank holds, as ``(start, length)`` in
  global coordinates; **the local tensor is their concatenation, in order**, followed by
  ``padding`` entries that belong to no global index (a vocabulary padded to a multiple of
  the tensor-parallel size). A fused ``[q; k; v]`` projection is three segments, a
  ``[gate; up]`` weight two, a plain row or column split one, a replicated norm one segment
  covering the whole dimension;
- each segment's ``replica`` and ``replicas``: how many tensor-parallel ranks hold an identical
  copy of that segment, and which copy this is; ``replica == 0`` is the copy that counts
  (saving a checkpoint, a global gradient norm). A norm weight is ``replicas = tp``; a kv head
  shared by ``tp / kv_heads`` ranks (fewer kv heads than ranks) is one segment with
  ``replicas = tp / kv_heads`` inside a tensor whose q segment is this rank's alone;
- ``partial_grad``: after backward, each holder of a replicated segment has only its part of
  that segment's gradient, and the sum over the holders is the gradient (a norm under
  sequence parallelism sees only this rank's slice of the sequence; a replicated kv head only
  this rank's query heads). :func:`~hybridpar_ext.parallel.layers.sync_tensor_parallel_grads`
  does that sum. Segments held once are never summed.

A spec describes the tensor-parallel split only. Data-parallel ranks hold identical copies of
a whole stage (data-parallel rank 0's counts), and pipeline stages hold disjoint parameters,
except a tied embedding held by the first and the last stage: the last stage's spec then says
``tied_to`` (the name of the copy that counts).

Modules carry their specs in ``module._shard_specs`` (local parameter name -> spec); the
parallel layers set it when they are built, the plan styles of
:mod:`hybridpar_ext.parallel.plan` on the modules they keep. A parameter without one is
replicated over tensor parallelism, its gradient complete on every rank.
"""

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

SPECS_ATTR = "_shard_specs"


@dataclass(frozen=True)
class Segment:
    """Global indices ``[start, start + length)`` along the spec's dimension; ``replica`` of
    ``replicas`` identical copies over the tensor-parallel ranks (0: the one that counts)."""
    start: int
    length: int
    replica: int = 0
    replicas: int = 1

    @property
    def stop(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class ShardSpec:
    """This rank's local tensor of a parameter of ``global_shape``: along ``dim``, the
    concatenation of ``segments`` (global ranges) and then ``padding`` entries of no global
    index; whole along every other dimension. See the module docstring."""
    global_shape: Tuple[int, ...]
    dim: int
    segments: Tuple[Segment, ...]
    padding: int = 0
    partial_grad: bool = False
    tied_to: Optional[str] = None

    def __post_init__(self):
        object.__setattr__(self, "global_shape", tuple(int(s) for s in self.global_shape))
        object.__setattr__(self, "segments", tuple(self.segments))
        if self.global_shape and not 0 <= self.dim < len(self.global_shape):
            raise ValueError(f"ShardSpec: dim {self.dim} out of range for shape {self.global_shape}")
        size = self.global_shape[self.dim] if self.global_shape else 1
        for seg in self.segments:
            if seg.start < 0 or seg.length < 0 or seg.stop > size:
                raise ValueError(f"ShardSpec: segment {seg} outside [0, {size}) of dimension {self.dim}")
            if not 0 <= seg.replica < seg.replicas:
                raise ValueError(f"ShardSpec: segment {seg} has replica outside [0, replicas)")
        if self.padding < 0:
            raise ValueError(f"ShardSpec: padding must be >= 0, got {self.padding}")

    @property
    def local_length(self) -> int:
        """Size of the local tensor along ``dim``."""
        return sum(s.length for s in self.segments) + self.padding

    @property
    def local_shape(self) -> Tuple[int, ...]:
        if not self.global_shape:
            return ()
        shape = list(self.global_shape)
        shape[self.dim] = self.local_length
        return tuple(shape)

    @property
    def is_replicated(self) -> bool:
        """The whole tensor, held by every tensor-parallel rank."""
        size = self.global_shape[self.dim] if self.global_shape else 1
        return (len(self.segments) == 1 and self.segments[0].start == 0
                and self.segments[0].length == size and self.padding == 0)

    def local_segments(self):
        """(local offset along ``dim``, segment) for each segment, in order."""
        offset = 0
        for seg in self.segments:
            yield offset, seg
            offset += seg.length

    def counted_mask(self, device=None):
        """Which local elements this rank counts once among all TP ranks (a global gradient
        norm, a checkpoint): ``True`` (all), ``False`` (none), or a bool tensor broadcastable
        to the local tensor (False on padding and on replicas other than 0)."""
        if self.tied_to is not None:
            return False
        if self.padding == 0 and all(s.replica == 0 for s in self.segments):
            return True
        if not any(s.replica == 0 and s.length for s in self.segments):
            return False
        shape = [1] * max(len(self.global_shape), 1)
        shape[self.dim if self.global_shape else 0] = self.local_length
        mask = torch.zeros(self.local_length, dtype=torch.bool, device=device)
        for offset, seg in self.local_segments():
            mask[offset:offset + seg.length] = seg.replica == 0
        return mask.view(shape) if self.global_shape else mask.view(())


# ---------------------------------------------------------------- building specs


def replicated_spec(shape, tp: int, rank: int, partial_grad: bool = False) -> ShardSpec:
    """The whole tensor on each of ``tp`` ranks (this one copy number `rank`)."""
    shape = tuple(shape)
    size = shape[0] if shape else 1
    return ShardSpec(shape, 0, (Segment(0, size, rank, tp),), partial_grad=partial_grad)


def block_segments(blocks: Sequence[int], unit: int, tp: int, rank: int, what: str,
                   replicable: Sequence[int] = ()) -> Tuple[Segment, ...]:
    """This rank's segments of a dimension made of consecutive ``blocks`` (widths), each split
    over ``tp`` ranks in whole ``unit``-wide pieces (a head's width, say): a block of ``n``
    units with ``n >= tp`` gives rank ``r`` units ``[r n/tp, (r+1) n/tp)``; with ``n < tp`` (kv
    heads fewer than ranks), if its index is in ``replicable``, rank ``r`` holds unit
    ``r // (tp/n)``, replicated over ``tp/n`` consecutive ranks. Raises ValueError naming
    `what` when a block does not split."""
    segments, start = [], 0
    for index, width in enumerate(blocks):
        if width % unit:
            raise ValueError(f"{what}: a block of width {width} is not a whole number of "
                             f"{unit}-wide units")
        n = width // unit
        if n >= tp:
            if n % tp:
                raise ValueError(f"{what}: {n} units of width {unit} must be divisible by the "
                                 f"tensor-parallel size ({tp}), or divide it")
            per = n // tp
            segments.append(Segment(start + rank * per * unit, per * unit))
        else:
            if index not in replicable:
                raise ValueError(f"{what}: {n} units of width {unit} must be divisible by the "
                                 f"tensor-parallel size ({tp})")
            if tp % n:
                raise ValueError(f"{what}: {n} units of width {unit} must divide the tensor-parallel "
                                 f"size ({tp}) when there are fewer units than ranks")
            replicas = tp // n
            segments.append(Segment(start + rank // replicas * unit, unit, rank % replicas, replicas))
        start += width
    return tuple(segments)


def padded_segments(size: int, tp: int, rank: int) -> Tuple[Tuple[Segment, ...], int]:
    """(segments, padding) of an even split of `size` padded up to a multiple of ``tp``: rank
    ``r`` holds ``[r L, (r+1) L)`` with ``L = ceil(size / tp)``, the part past `size` padding."""
    local = -(-size // tp)
    start = min(rank * local, size)
    stop = min(start + local, size)
    segments = (Segment(start, stop - start),) if stop > start else ()
    return segments, local - (stop - start)


def with_tied(spec: ShardSpec, tied_to: Optional[str]) -> ShardSpec:
    return dataclasses.replace(spec, tied_to=tied_to)


# ---------------------------------------------------------------- reading specs


def set_shard_specs(module: torch.nn.Module, specs: Dict[str, ShardSpec]) -> None:
    """Record the specs of `module`'s own parameters (local names: ``"weight"``, ``"bias"``)."""
    own = dict(module.named_parameters(recurse=False))
    unknown = set(specs) - set(own)
    if unknown:
        raise ValueError(f"set_shard_specs: {type(module).__name__} has no parameter {sorted(unknown)}")
    setattr(module, SPECS_ATTR, dict(specs))


def shard_specs(module: torch.nn.Module, tp: Optional[int] = None, rank: Optional[int] = None,
                prefix: str = "") -> Dict[str, ShardSpec]:
    """``{qualified parameter name: ShardSpec}`` of every parameter of `module` (a tied
    parameter under each of its names). A parameter whose module carries no spec for it is
    replicated: pass ``tp`` and ``rank`` to describe it (default: a spec of one holder)."""
    out = {}
    for mod_name, mod in module.named_modules(prefix=prefix, remove_duplicate=False):
        own = getattr(mod, SPECS_ATTR, {})
        for name, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            full = f"{mod_name}.{name}" if mod_name else name
            out[full] = own.get(name) or replicated_spec(p.shape, tp or 1, rank or 0)
    return out


def spec_of(module: torch.nn.Module, name: str) -> Optional[ShardSpec]:
    """The spec `module` carries for its own parameter `name`, or None (replicated)."""
    return getattr(module, SPECS_ATTR, {}).get(name)


__all__ = ["Segment", "ShardSpec", "block_segments", "padded_segments", "replicated_spec", "set_shard_specs",
           "shard_specs", "spec_of", "with_tied"]
