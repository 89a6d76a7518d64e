"""The boxes a rank describes to DCP, in one process: any contiguous range of a row-major
tensor cut into boxes exactly; a ZeRO-1 flat slice of a multi-segment, padded, partly
replicated local tensor mapped to the global elements it holds."""

import math

import torch

from hybridpar_ext.checkpoint.chunks import Chunked, flat_boxes, flat_range_boxes, spec_boxes
from hybridpar_ext.parallel.spec import Segment, ShardSpec
from hybridpar_ext.parallel.state_dict import shard_tensor


def test_flat_ranges_are_cut_into_exact_contiguous_boxes():
    for shape in [(5,), (3, 7), (2, 3, 5), (4, 1, 3), (1, 6)]:
        n = math.prod(shape)
        numbers = torch.arange(n).view(shape)
        for a in range(n):
            for b in range(a, n + 1):
                hits = torch.zeros(shape, dtype=torch.long)
                for offsets, sizes, first in flat_range_boxes(shape, a, b):
                    box = tuple(slice(o, o + s) for o, s in zip(offsets, sizes))
                    hits[box] += 1
                    # a contiguous run of the flat range, starting at `first`
                    assert torch.equal(numbers[box].flatten(), torch.arange(first, first + math.prod(sizes)))
                expected = torch.zeros(n, dtype=torch.long)
                expected[a:b] = 1
                assert torch.equal(hits.flatten(), expected), (shape, a, b)


# A fused [q; k; v] of 7-wide rows: this rank's q rows 4..8, a kv head (rows 12..13, 16..17)
# that another rank also holds (this is its replica 1), then one row of padding.
SPEC = ShardSpec((20, 7), 0, (Segment(4, 4), Segment(12, 2, 1, 2), Segment(16, 2, 1, 2)), padding=1)
SPEC_COLS = ShardSpec((5, 11), 1, (Segment(6, 3), Segment(0, 2)))   # two column segments, out of order


def _check_boxes(global_tensor, spec, start, stop, counted_only):
    local = shard_tensor(global_tensor, spec)
    flat = local.flatten()[start:stop]
    boxes = flat_boxes(flat, local.shape, start, spec, counted_only)
    held = torch.zeros(global_tensor.shape, dtype=torch.long)
    for offsets, view in boxes:
        box = tuple(slice(o, o + s) for o, s in zip(offsets, view.shape))
        assert torch.equal(global_tensor[box], view), (offsets, tuple(view.shape))
        held[box] += 1
    # which global elements the range holds, from the local tensor's own element positions
    positions = torch.full(local.shape, -1, dtype=torch.long)
    counted = torch.zeros(local.shape, dtype=torch.bool)
    index = torch.arange(global_tensor.numel()).view(global_tensor.shape)
    for local_offset, seg in spec.local_segments():
        positions.narrow(spec.dim, local_offset, seg.length).copy_(index.narrow(spec.dim, seg.start, seg.length))
        counted.narrow(spec.dim, local_offset, seg.length).fill_(seg.replica == 0 or not counted_only)
    expected = torch.zeros(global_tensor.numel(), dtype=torch.long)
    chosen = positions.flatten()[start:stop][counted.flatten()[start:stop]]
    expected[chosen[chosen >= 0]] = 1
    assert torch.equal(held.flatten(), expected), (start, stop, counted_only)


def test_flat_slices_map_to_the_global_elements_they_hold():
    for spec in (SPEC, SPEC_COLS):
        g = torch.randn(spec.global_shape)
        n = math.prod(spec.local_shape)
        for start, stop in [(0, n), (3, 40), (9, 10), (n - 8, n), (13, 13 + 22)]:
            for counted_only in (False, True):
                _check_boxes(g, spec, start, min(stop, n), counted_only)


def test_spec_boxes_write_replica_zero_and_load_every_copy():
    local = shard_tensor(torch.randn(20, 7), SPEC)
    assert [o for o, _ in spec_boxes(local, SPEC, counted_only=True)] == [(4, 0)]
    assert [o for o, _ in spec_boxes(local, SPEC, counted_only=False)] == [(4, 0), (12, 0), (16, 0)]
    chunked = Chunked(SPEC.global_shape, spec_boxes(local, SPEC, counted_only=False))
    assert chunked.size() == torch.Size((20, 7)) and len(chunked.__create_chunk_list__()) == 3
