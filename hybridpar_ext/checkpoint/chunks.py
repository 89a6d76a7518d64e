"""How this rank's tensors are described to ``torch.distributed.checkpoint`` (DCP): as boxes
(an offset and a size in every dimension) of global tensors.

DCP reshards any tensor whose every saved piece says where it sits in the global tensor: it
stores each piece with its box, and a loader asks, for each box it holds, for the overlapping
parts of the saved ones. DTensor and ShardedTensor are two ways of saying it; neither fits
our shards well:

- a DTensor's placements (``Shard(dim)``, ``Replicate()``) give each rank one even slice of a
  dimension, so a fused ``[q; k; v]`` projection (three pieces, kv heads possibly replicated
  over some ranks), a ``[gate; up]`` weight, or a vocabulary padded to a multiple of tp cannot
  be said at all;
- a ShardedTensor can hold several pieces per rank, but its pieces must be contiguous tensors
  of their own, so loading into a column slice of a weight, or into the part of a parameter
  that a ZeRO-1 flat slice covers, needs a copy and a copy back; and it validates a global
  layout that every rank would have to know.

So :class:`Chunked` implements DCP's checkpointable protocol itself (``__create_write_items__``,
``__create_chunk_list__``, ``__get_tensor_shard__``, the methods DCP calls on a DTensor): any
number of boxes per rank, each a *view* of the rank's own storage (a parameter, an Adam moment,
a slice of ZeRO-1's flat fp32 buffer), so saving writes straight from the views and loading
writes straight into them, without a staging copy. Because it is not a ``torch.Tensor``,
DCP's default planners cannot look up its boxes; :class:`ChunkSavePlanner` and
:class:`ChunkLoadPlanner` add that one lookup and otherwise are DCP's defaults.

The boxes come from the shard specs (:mod:`hybridpar_ext.parallel.spec`): a spec's segments
along its dimension are this rank's boxes, in global coordinates (:func:`spec_boxes`); padding
is no box; a replicated segment is saved by its replica 0 alone and loaded by every replica.
A contiguous range of a tensor's flattened elements (what a ZeRO-1 slice covers of a
parameter) is cut into row-major boxes first (:func:`flat_range_boxes`), then mapped the same way.

One global tensor per parameter: DCP keeps a single copy of plain tensors that have the same
name on several ranks (pytorch#156002), so a tensor-parallel slice saved as a plain tensor is
silently lost. Here no sharded tensor is ever a plain tensor: every parameter, moment and
master weight is a :class:`Chunked` whose boxes are disjoint across ranks (DCP's global plan
validation checks they do not overlap), and only true replicas (a step count, the LR
schedule's state) are saved as plain values.
"""

import math
from typing import Iterable, List, Sequence, Tuple

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex, TensorProperties)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

Box = Tuple[Tuple[int, ...], torch.Tensor]   # (global offsets, a view of this rank's data)


class Chunked:
    """``boxes`` of a global tensor of ``global_shape``: each ``(offsets, view)`` says that
    ``view`` holds ``global[offsets[d]:offsets[d] + view.shape[d] for each d]``. The views alias
    this rank's own tensors: saving reads them, loading writes into them."""

    def __init__(self, global_shape: Sequence[int], boxes: Iterable[Box]):
        self.global_shape = torch.Size(global_shape)
        self.boxes: List[Box] = []
        for offsets, view in boxes:
            offsets = tuple(int(o) for o in offsets)
            if len(offsets) != len(self.global_shape) or view.dim() != len(self.global_shape):
                raise ValueError(f"Chunked: a box of {len(offsets)} offsets and {view.dim()} dimensions in a "
                                 f"tensor of shape {tuple(self.global_shape)}")
            if any(o < 0 or o + s > g for o, s, g in zip(offsets, view.shape, self.global_shape)):
                raise ValueError(f"Chunked: box at {offsets} of size {tuple(view.shape)} lies outside "
                                 f"{tuple(self.global_shape)}")
            if view.numel():
                self.boxes.append((offsets, view.detach()))
        self._by_offsets = {offsets: view for offsets, view in self.boxes}
        if len(self._by_offsets) != len(self.boxes):
            raise ValueError("Chunked: two boxes start at the same offsets")

    def size(self) -> torch.Size:
        """The global shape (DCP checks it against the saved one before loading)."""
        return self.global_shape

    # DCP's checkpointable protocol (torch.distributed.checkpoint.planner_helpers).
    def __create_write_items__(self, fqn: str, obj) -> List[WriteItem]:
        return [WriteItem(index=MetadataIndex(fqn, torch.Size(offsets)), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(
                              chunk=ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=view.size()),
                              properties=TensorProperties.create_from_tensor(view), size=self.global_shape))
                for offsets, view in self.boxes]

    def __create_chunk_list__(self) -> List[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=view.size()) for offsets, view in self.boxes]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        if index.index is not None and index.index < len(self.boxes):
            offsets, view = self.boxes[index.index]
            if torch.Size(offsets) == index.offset:
                return view
        view = self._by_offsets.get(tuple(index.offset or ()))
        if view is None:
            raise ValueError(f"Chunked: {index.fqn} has no box at {index.offset}")
        return view

    def staged(self) -> "Chunked":
        """The same boxes holding contiguous CPU copies (what an asynchronous save writes while
        training changes the originals)."""
        return Chunked(self.global_shape, [(o, v.to("cpu", copy=True).contiguous()) for o, v in self.boxes])


class ChunkSavePlanner(DefaultSavePlanner):
    """DCP's default save planner, able to find the boxes of a :class:`Chunked`. The state_dict
    is flat (names are already unique), so nothing is flattened."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def lookup_object(self, index: MetadataIndex):
        obj = self.state_dict[index.fqn]
        if isinstance(obj, Chunked):
            return obj.__get_tensor_shard__(index)
        return super().lookup_object(index)


class ChunkLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, able to find the boxes of a :class:`Chunked`; loads in place.
    ``allow_partial_load``: names the checkpoint lacks are skipped (the caller checks which)."""

    def __init__(self, allow_partial_load: bool = False):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False,
                         allow_partial_load=allow_partial_load)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        # The default's first step materialises meta tensors and, walking the state_dict,
        # replaces objects it does not know (a Chunked) with None: nothing here is on meta.
        self.original_state_dict = self.state_dict = state_dict
        self.metadata, self.is_coordinator = metadata, is_coordinator

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        obj = self.state_dict[index.fqn]
        if isinstance(obj, Chunked):
            return obj.__get_tensor_shard__(index)
        return super().lookup_tensor(index)


# ---------------------------------------------------------------- boxes from shard specs


def spec_boxes(local: torch.Tensor, spec, counted_only: bool) -> List[Box]:
    """The boxes of a parameter-shaped local tensor under its shard spec: one per segment along
    ``spec.dim`` (padding is none). ``counted_only``: only segments of replica 0 (what a save
    writes: every global element once over the tensor-parallel ranks); otherwise all of them
    (what a load fills)."""
    if tuple(local.shape) != tuple(spec.local_shape):
        raise ValueError(f"spec_boxes: a tensor of shape {tuple(local.shape)} under a spec of local shape "
                         f"{tuple(spec.local_shape)}")
    if local.dim() == 0:
        return [((), local)] if not counted_only or all(s.replica == 0 for s in spec.segments) else []
    boxes = []
    for local_offset, seg in spec.local_segments():
        if counted_only and seg.replica != 0:
            continue
        offsets = [0] * local.dim()
        offsets[spec.dim] = seg.start
        boxes.append((tuple(offsets), local.narrow(spec.dim, local_offset, seg.length)))
    return boxes


def flat_range_boxes(shape: Sequence[int], start: int, stop: int) -> List[Tuple[Tuple[int, ...], Tuple[int, ...], int]]:
    """Elements ``[start, stop)`` of a row-major tensor of `shape`, cut into boxes: a list of
    ``(offsets, sizes, flat offset of the box's first element)``. Each box is a contiguous run
    of the flat range (a partial row, whole rows, a partial row, recursively), so its data is
    ``flat[first:first + prod(sizes)].view(sizes)``."""
    shape = tuple(int(s) for s in shape)
    if not shape:
        return [((), (), 0)] if start < stop else []
    return _cut(shape, start, stop)


def _cut(dims, lo, hi):
    if lo >= hi:
        return []
    if len(dims) == 1:
        return [((lo,), (hi - lo,), lo)]
    inner = math.prod(dims[1:])

    def within(row, a, b):   # a partial row: boxes one deep in this dimension
        return [((row,) + o, (1,) + s, row * inner + f) for o, s, f in _cut(dims[1:], a, b)]

    first, last = lo // inner, (hi - 1) // inner
    if first == last:
        return within(first, lo - first * inner, hi - first * inner)
    out = []
    if lo % inner:
        out += within(first, lo % inner, inner)
        first += 1
    whole_stop = hi // inner
    if whole_stop > first:
        out.append(((first,) + (0,) * (len(dims) - 1), (whole_stop - first,) + dims[1:], first * inner))
    if hi % inner:
        out += within(whole_stop, 0, hi % inner)
    return out


def flat_boxes(flat: torch.Tensor, shape: Sequence[int], start: int, spec, counted_only: bool) -> List[Box]:
    """Boxes, in global coordinates, of `flat`: elements ``[start, start + flat.numel())`` of a
    local tensor of `shape` (this rank's parameter under `spec`), flattened row-major. Used for
    ZeRO-1, whose slices cut parameters anywhere."""
    stop = start + flat.numel()
    boxes = []
    for offsets, sizes, first in flat_range_boxes(shape, start, stop):
        view = flat[first - start:first - start + math.prod(sizes)].view(sizes)
        if not offsets:
            boxes += spec_boxes(view, spec, counted_only) if spec is not None else [((), view)]
            continue
        boxes += _map_box(offsets, view, spec, counted_only)
    return boxes


def _map_box(local_offsets, view, spec, counted_only) -> List[Box]:
    """A box in local coordinates to its pieces in global coordinates: split along
    ``spec.dim`` at the segments' boundaries (padding and, if `counted_only`, replicas other
    than 0 dropped)."""
    if spec is None:
        return [(tuple(local_offsets), view)]
    d = spec.dim
    lo, hi = local_offsets[d], local_offsets[d] + view.shape[d]
    out = []
    for seg_local, seg in spec.local_segments():
        a, b = max(lo, seg_local), min(hi, seg_local + seg.length)
        if a >= b or (counted_only and seg.replica != 0):
            continue
        offsets = list(local_offsets)
        offsets[d] = seg.start + (a - seg_local)
        out.append((tuple(offsets), view.narrow(d, a - lo, b - a)))
    return out


__all__ = ["Chunked", "ChunkLoadPlanner", "ChunkSavePlanner", "flat_boxes", "flat_range_boxes", "spec_boxes"]
