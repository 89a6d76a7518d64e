"""Shard specs of every plan style on odd shapes, checked as data (no process group): each
global index held exactly once by a replica 0, equal local shapes on every rank, the
documented order, and split -> merge round trips that are bitwise exact."""

import pytest
import torch

from hybridpar_ext.parallel import (ColumnParallel, LMHead, Replicate, RowParallel, Segment, SequenceParallelNorm,
                                    ShardSpec, VocabEmbedding, merge_tensors_by_specs, plan_specs, shard_tensor)
from hybridpar_ext.parallel.spec import block_segments, padded_segments


def _all_ranks(style, shapes, tp, sp=False):
    return [style.specs(shapes, tp, r, sp) for r in range(tp)]


def _check_cover(specs):
    """Every global index along the spec's dimension held by exactly one replica 0; the local
    shapes agree across ranks; replicas agree with how many ranks hold a segment."""
    first = specs[0]
    size = first.global_shape[first.dim]
    count = torch.zeros(size, dtype=torch.int64)
    holders = {}
    for s in specs:
        assert s.local_shape == first.local_shape
        for seg in s.segments:
            holders.setdefault((seg.start, seg.length), []).append(seg)
            if seg.replica == 0:
                count[seg.start:seg.stop] += 1
    assert torch.equal(count, torch.ones_like(count)), count.tolist()
    for held in holders.values():
        assert sorted(seg.replica for seg in held) == list(range(held[0].replicas))


def _round_trip(specs, seed=0):
    full = torch.randn(specs[0].global_shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    parts = [shard_tensor(full, s) for s in specs]
    for part, spec in zip(parts, specs):
        assert tuple(part.shape) == spec.local_shape
    merged = merge_tensors_by_specs(parts, specs)
    assert torch.equal(merged, full)
    return parts


# (heads, kv_heads, tp): kv split, kv equal to tp, kv fewer than tp (replicated), MHA, GQA 3:1
GQA = [(6, 2, 2), (4, 4, 4), (8, 2, 4), (4, 1, 4), (12, 3, 3), (6, 3, 6), (10, 5, 5)]


@pytest.mark.parametrize("heads,kv,tp", GQA, ids=[f"h{h}-kv{k}-tp{t}" for h, k, t in GQA])
def test_fused_qkv_with_gqa(heads, kv, tp):
    hd, hidden = 16, 40
    style = ColumnParallel(blocks=(heads * hd, kv * hd, kv * hd), unit=hd, replicable=(1, 2))
    shapes = {"weight": ((heads + 2 * kv) * hd, hidden), "bias": ((heads + 2 * kv) * hd,)}
    per_rank = _all_ranks(style, shapes, tp)
    for name in shapes:
        specs = [s[name] for s in per_rank]
        _check_cover(specs)
        parts = _round_trip(specs)
        assert all(p.shape[0] == (heads // tp + 2 * max(kv // tp, 1)) * hd for p in parts)
    replicas = max(tp // kv, 1)
    for r, s in enumerate(per_rank):
        q, k, v = s["weight"].segments
        assert (q.start, q.length, q.replicas) == (r * heads // tp * hd, heads // tp * hd, 1)
        # This rank's query heads use the kv heads it holds.
        kv_first = r // replicas if replicas > 1 else r * kv // tp
        assert k.start == heads * hd + kv_first * hd and v.start == (heads + kv) * hd + kv_first * hd
        assert (k.replicas, k.replica) == (replicas, r % replicas if replicas > 1 else 0)
        assert s["weight"].partial_grad == (replicas > 1)
        mask = s["weight"].counted_mask()
        if replicas > 1 and r % replicas:
            assert mask.flatten().tolist() == [True] * q.length + [False] * (2 * hd)
        else:
            assert mask is True


def test_query_heads_are_never_replicated_and_kv_must_divide():
    with pytest.raises(ValueError, match=r"must be divisible by the tensor-parallel size \(4\)"):
        block_segments([2 * 16, 16, 16], 16, 4, 0, "qkv", replicable=(1, 2))
    with pytest.raises(ValueError, match=r"must divide the tensor-parallel size \(4\)"):
        block_segments([12 * 16, 3 * 16, 3 * 16], 16, 4, 0, "qkv", replicable=(1, 2))
    with pytest.raises(ValueError, match="not a whole number of 16-wide units"):
        block_segments([40], 16, 2, 0, "qkv")


@pytest.mark.parametrize("ffn,tp", [(40, 2), (36, 3), (40, 4), (24, 8)])
def test_gate_up_and_the_row_split(ffn, tp):
    hidden = 24
    fc1 = _all_ranks(ColumnParallel(blocks=2), {"weight": (2 * ffn, hidden)}, tp)
    fc2 = _all_ranks(RowParallel(), {"weight": (hidden, ffn), "bias": (hidden,)}, tp)
    _check_cover([s["weight"] for s in fc1])
    _check_cover([s["weight"] for s in fc2])
    for r in range(tp):
        gate, up = fc1[r]["weight"].segments
        assert (gate.start, up.start, gate.length) == (r * ffn // tp, ffn + r * ffn // tp, ffn // tp)
        assert fc2[r]["weight"].dim == 1 and fc2[r]["weight"].segments == (Segment(r * ffn // tp, ffn // tp),)
        assert fc2[r]["bias"].is_replicated and fc2[r]["bias"].segments[0].replica == r
        assert not fc2[r]["bias"].partial_grad
    _round_trip([s["weight"] for s in fc1])
    _round_trip([s["weight"] for s in fc2])
    # Under sequence parallelism the row-parallel bias sees only this rank's tokens.
    assert RowParallel().specs({"weight": (hidden, ffn), "bias": (hidden,)}, tp, 0, True)["bias"].partial_grad


@pytest.mark.parametrize("vocab,tp", [(50257, 2), (50257, 4), (50257, 8), (5, 8), (48, 4)])
def test_padded_vocabulary(vocab, tp):
    for style in (VocabEmbedding(), LMHead()):
        specs = [s["weight"] for s in _all_ranks(style, {"weight": (vocab, 24)}, tp)]
        _check_cover(specs)
        local = -(-vocab // tp)
        assert all(s.local_length == local for s in specs)
        assert sum(s.padding for s in specs) == local * tp - vocab
        parts = _round_trip(specs)
        for part, spec in zip(parts, specs):   # the padding is zeros, and never counted
            if spec.padding:
                assert torch.equal(part[local - spec.padding:], torch.zeros_like(part[local - spec.padding:]))
                mask = spec.counted_mask()
                assert mask is False or not mask.flatten()[local - spec.padding:].any()
    segments, padding = padded_segments(5, 8, 6)
    assert segments == () and padding == 1


def test_replicated_norms_and_their_partial_grads():
    for tp in (1, 3):
        for sp in (False, True):
            specs = [s["weight"] for s in _all_ranks(SequenceParallelNorm(), {"weight": (40,)}, tp, sp)]
            _check_cover(specs)
            assert all(s.partial_grad == sp for s in specs)
            assert [s.counted_mask() for s in specs] == [True] + [False] * (tp - 1)
            assert not any(s.partial_grad for s in
                           (x["weight"] for x in _all_ranks(Replicate(), {"weight": (40,)}, tp, sp)))


def test_plan_specs_match_patterns_in_order():
    plan = [("blocks.*.up", ColumnParallel()), ("blocks.0.*", RowParallel()), ("blocks.*", RowParallel())]
    shapes = {"blocks.0.up.weight": (12, 6), "blocks.1.down.weight": (6, 12), "head.weight": (6, 6)}
    specs = plan_specs(plan, shapes, 3, 1)
    assert specs["blocks.0.up.weight"].dim == 0 and specs["blocks.0.up.weight"].segments == (Segment(4, 4),)
    assert specs["blocks.1.down.weight"].dim == 1
    assert specs["head.weight"].is_replicated   # no pattern: replicated
    with pytest.raises(TypeError, match="must be a Style"):
        plan_specs({"x": "column"}, shapes, 2, 0)


def test_spec_validation():
    with pytest.raises(ValueError, match="outside"):
        ShardSpec((10, 4), 0, (Segment(8, 4),))
    with pytest.raises(ValueError, match="replica outside"):
        ShardSpec((10, 4), 0, (Segment(0, 4, 2, 2),))
    spec = ShardSpec((10, 4), 1, (Segment(0, 2), Segment(3, 1)), padding=1)
    assert spec.local_shape == (10, 4) and spec.local_length == 4
    full = torch.arange(40.).view(10, 4)
    assert torch.equal(shard_tensor(full, spec), torch.cat([full[:, :2], full[:, 3:], torch.zeros(10, 1)], 1))
    with pytest.raises(ValueError, match="held by no rank's replica 0"):
        merge_tensors_by_specs([shard_tensor(full, spec)], [spec])
