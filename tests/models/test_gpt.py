"""The plain GPT: shapes, loss at initialisation, tied weights, config checks, and that its
blocks are the pre-norm transformer written out by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from hybridpar_ext.models import GPT, GPTConfig


@pytest.mark.parametrize("kw", [dict(), dict(norm="rmsnorm", mlp="swiglu", kv_heads=2, tied_embeddings=False)])
def test_forward_loss_and_gradients(kw):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=97, max_seq_len=24, layers=2, hidden=64, heads=4, **kw)
    model = GPT(config)
    tokens = torch.randint(0, 97, (3, 21))
    logits = model(tokens[:, :-1])
    assert logits.shape == (3, 20, 97)
    loss = model(tokens[:, :-1], tokens[:, 1:])
    assert abs(loss.item() - math.log(97)) < 0.1  # small init: near-uniform predictions
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert (model.lm_head.weight is model.embed.weight) == config.tied_embeddings


def test_block_is_the_prenorm_transformer_by_hand():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50, max_seq_len=16, layers=1, hidden=64, heads=4, kv_heads=2, mlp="swiglu",
                       norm="rmsnorm", tied_embeddings=False)
    model = GPT(config)
    tokens = torch.randint(0, 50, (2, 11))
    layer = model.layers[0]
    x = model.embed.weight[tokens]
    h = x + layer.attn(F.rms_norm(x, (64,), layer.norm1.weight, config.norm_eps))
    y = F.rms_norm(h, (64,), layer.norm2.weight, config.norm_eps)
    gate, up = (y @ layer.mlp.fc1.weight.t()).chunk(2, dim=-1)
    h = h + (F.silu(gate) * up) @ layer.mlp.fc2.weight.t()
    expected = F.rms_norm(h, (64,), model.norm.weight, config.norm_eps) @ model.lm_head.weight.t()
    torch.testing.assert_close(model(tokens), expected, rtol=1e-5, atol=1e-5)


def test_config_checks():
    with pytest.raises(ValueError, match="hidden \\(66\\) must be divisible by heads \\(4\\)"):
        GPTConfig(hidden=66, heads=4)
    with pytest.raises(ValueError, match="heads \\(4\\) must be a multiple of kv_heads \\(3\\)"):
        GPTConfig(heads=4, kv_heads=3)
    with pytest.raises(ValueError, match="mlp must be one of"):
        GPTConfig(mlp="relu")
    with pytest.raises(ValueError, match="layers must be a positive int"):
        GPTConfig(layers=0)
    with pytest.raises(ValueError, match="longer than max_seq_len 8"):
        GPT(GPTConfig(max_seq_len=8, layers=1, hidden=32, heads=2))(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="head_dim = hidden / heads = 8 must be in"):
        GPTConfig(hidden=32, heads=4)
