"""Parameter counts and training FLOPs have one home (hybridpar_ext.models.flops) and one
convention: by hand, against the built model, and the trainer's MFU numerator equal to the
planner's model FLOPs."""

import pytest

from hybridpar_ext.models import GPT, GPTConfig, flops

CONFIGS = [
    dict(vocab_size=100, layers=2, hidden=64, heads=4, kv_heads=2, ffn=96, mlp="swiglu"),
    dict(vocab_size=97, layers=3, hidden=48, heads=3, norm="rmsnorm", tied_embeddings=False),
    dict(vocab_size=256, layers=1, hidden=128, heads=8, kv_heads=1, ffn=200),
]


def test_flops_per_token_by_hand():
    # 2 layers, hidden 64, 4 heads of 16 with 2 kv heads, SwiGLU ffn 96, vocab 100, seq 32:
    # qkv 64*(64+2*32) + out 64*64 + mlp 3*64*96 = 8192 + 4096 + 18432 = 30720 weights per
    # layer, head 6400; attention QK^T and PV 4*32*64 per layer forward, counted in full
    # (not halved for the causal mask); training = 3 forwards.
    config = GPTConfig(**CONFIGS[0])
    assert config.flops_per_token(32) == 3 * (2 * (2 * 30720 + 6400) + 2 * 4 * 32 * 64)


@pytest.mark.parametrize("kw", CONFIGS)
def test_parameter_count_is_the_built_model(kw):
    config = GPTConfig(**kw)
    assert config.num_parameters() == sum(p.numel() for p in GPT(config).parameters())


@pytest.mark.parametrize("kw", CONFIGS)
def test_trainer_and_planner_count_the_same_flops(kw):
    from hybridpar_ext.plan import ModelSpec
    from hybridpar_ext.plan import costs

    config, seq, batch = GPTConfig(**kw), 40, 3
    spec = ModelSpec.from_gpt_config(config, seq=seq)
    model_flops, hardware_flops = costs.step_flops(spec, batch, "full")
    assert model_flops == batch * seq * config.flops_per_token(seq)
    assert hardware_flops > model_flops   # recomputation is hardware work, not model FLOPs
    assert costs.total_params(spec) == config.num_parameters() == flops.gpt_num_parameters(config)
