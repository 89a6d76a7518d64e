"""State_dict split/merge round trips, the pipeline's stage assignment and the 1F1B order —
pure functions, no process group."""

import pytest
import torch

from hybridpar_ext.models import GPT, GPTConfig
from hybridpar_ext.parallel import (ideal_bubble, merge_state_dicts, one_f_one_b, shard_state_dict,
                                    split_tensor, stage_layers)

CONFIGS = [
    GPTConfig(vocab_size=48, layers=3, hidden=64, heads=4, kv_heads=1, ffn=40, mlp="swiglu"),
    GPTConfig(vocab_size=48, layers=5, hidden=96, heads=4, kv_heads=2, ffn=72, norm="rmsnorm",
              tied_embeddings=False),
    GPTConfig(vocab_size=48, layers=2, hidden=64, heads=4, kv_heads=4, ffn=40),
]


@pytest.mark.parametrize("config", CONFIGS, ids=["gqa1-swiglu", "gqa2-untied", "mha"])
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (4, 2), (2, 3)])
def test_split_and_merge_round_trip_exactly(config, tp, pp):
    if pp > config.layers:
        pytest.skip("fewer layers than stages")
    full = GPT(config).state_dict()
    merged = {}
    for stage in range(pp):
        shards = [shard_state_dict(full, config, tp, r, pp, stage) for r in range(tp)]
        for s in shards:
            assert set(s) == set(shards[0])
        merged.update(merge_state_dicts(shards, config))
    assert set(merged) == set(full)
    for name, t in full.items():
        assert torch.equal(merged[name], t), name


def test_the_split_is_the_documented_one():
    config = CONFIGS[0]   # 4 heads of 16, 1 kv head, SwiGLU ffn 40
    qkv = torch.arange((4 + 2) * 16, dtype=torch.float32)[:, None].expand(-1, 3)
    rank1 = split_tensor("layers.0.attn.qkv.weight", qkv, config, 2, 1)
    # q of heads 2, 3; then the single kv head's k and v rows (replicated on both ranks).
    assert rank1[:, 0].tolist() == list(range(32, 64)) + list(range(64, 96))
    fc1 = torch.arange(80, dtype=torch.float32)[:, None]
    assert split_tensor("layers.0.mlp.fc1.weight", fc1, config, 2, 1)[:, 0].tolist() == \
        list(range(20, 40)) + list(range(60, 80))   # [gate slice 1; up slice 1]
    fc2 = torch.arange(40, dtype=torch.float32)[None, :]
    assert split_tensor("layers.0.mlp.fc2.weight", fc2, config, 4, 3)[0].tolist() == list(range(30, 40))
    norm = torch.ones(64)
    assert torch.equal(split_tensor("layers.0.norm1.weight", norm, config, 4, 2), norm)
    with pytest.raises(ValueError, match=r"heads \(4\) must be divisible by the tensor-parallel size \(3\)"):
        split_tensor("layers.0.attn.qkv.weight", qkv, config, 3, 0)


def test_stage_layers_cover_the_model_in_order():
    for layers, pp in ((4, 2), (5, 2), (7, 3), (3, 3)):
        stages = [stage_layers(layers, pp, s) for s in range(pp)]
        assert [i for r in stages for i in r] == list(range(layers))
        assert max(map(len, stages)) - min(map(len, stages)) <= 1
    with pytest.raises(ValueError, match=r"layers \(2\) must be at least the number of pipeline stages \(3\)"):
        stage_layers(2, 3, 0)


@pytest.mark.parametrize("p,m", [(1, 1), (2, 2), (2, 5), (4, 4), (4, 7)])
def test_one_f_one_b_order(p, m):
    for s in range(p):
        actions = one_f_one_b(s, p, m)
        assert sorted(actions) == sorted([("F", i) for i in range(m)] + [("B", i) for i in range(m)])
        done_f, in_flight, peak = set(), 0, 0
        for kind, i in actions:
            if kind == "F":
                assert i == len(done_f), "forwards in microbatch order"
                done_f.add(i)
                in_flight += 1
            else:
                assert i in done_f, "a backward after its forward"
                in_flight -= 1
            peak = max(peak, in_flight)
        assert peak == min(p - s, m), "1F1B keeps at most p - s microbatches alive"
        assert [i for k, i in actions if k == "B"] == list(range(m))
    assert ideal_bubble(p, m) == pytest.approx((p - 1) / (m + p - 1))
