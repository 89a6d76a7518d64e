"""nn.Attention, nn.MultiheadAttention and the Hugging Face registration."""

import warnings

import pytest
import torch

import hybridpar_ext.nn as hnn
from hybridpar_ext.nn import huggingface
from hybridpar_ext.reference import attention as ref


def _grads_close(ours, theirs, atol=1e-5, rtol=1e-5):
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=atol, rtol=rtol, msg=name)


# -------------------------------------------------------------------------- Attention

def _attention_by_hand(module, x, positions):
    """The module's math written out with the reference attention, for a padded batch."""
    hd, h, hk = module.head_dim, module.num_heads, module.num_kv_heads
    q, k, v = module.qkv(x).split([h * hd, hk * hd, hk * hd], dim=-1)
    q, k, v = q.unflatten(-1, (h, hd)), k.unflatten(-1, (hk, hd)), v.unflatten(-1, (hk, hd))
    if module.rope:
        cos, sin = hnn.rotary_cos_sin(positions, hd, module.rope_theta, dtype=x.dtype)
        q, k = hnn.apply_rotary(q, cos, sin), hnn.apply_rotary(k, cos, sin)
    out = ref.attention(q, k, v, causal=module.causal, window=module.window)
    return module.out_proj(out.flatten(-2))


@pytest.mark.parametrize("heads,kv_heads,rope,window", [(4, 4, False, None), (8, 2, True, None),
                                                       (4, 1, True, (5, 0))], ids=str)
def test_attention_module(backend, device, heads, kv_heads, rope, window):
    torch.manual_seed(0)
    module = hnn.Attention(128, heads, kv_heads, rope=rope, window=window, device=device)
    x = torch.randn(2, 19, 128, device=device, requires_grad=True)
    y = module(x)
    expected = _attention_by_hand(module, x, torch.arange(19, device=device))
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    gx, = torch.autograd.grad(y.square().sum(), x)
    ex, = torch.autograd.grad(expected.square().sum(), x)
    torch.testing.assert_close(gx, ex, atol=1e-4, rtol=1e-4)


def test_attention_module_packed_equals_padded(backend, device):
    torch.manual_seed(0)
    module = hnn.Attention(64, 4, 2, rope=True, device=device)
    a, b = torch.randn(1, 7, 64, device=device), torch.randn(1, 12, 64, device=device)
    cu = torch.tensor([0, 7, 19], dtype=torch.int32, device=device)
    packed = module(torch.cat([a[0], b[0]]), cu_seqlens=cu)
    torch.testing.assert_close(packed[:7], module(a)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[7:], module(b)[0], atol=1e-5, rtol=1e-5)


def test_attention_module_rejects_bad_heads():
    with pytest.raises(ValueError, match=r"num_heads \(6\) must be a multiple of num_kv_heads \(4\)"):
        hnn.Attention(96, 6, 4)
    with pytest.raises(ValueError, match=r"dim \(100\) must be divisible by num_heads \(3\)"):
        hnn.Attention(100, 3)


# ----------------------------------------------------------------- MultiheadAttention

def _twins(device, **kwargs):
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(**kwargs, device=device)
    ours = hnn.MultiheadAttention(**kwargs, device=device)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("causal", ["none", "is_causal", "mask_bool", "mask_float"])
def test_multihead_self_attention(backend, device, batch_first, causal):
    ours, theirs = _twins(device, embed_dim=96, num_heads=4, batch_first=batch_first)
    shape = (3, 21, 96) if batch_first else (21, 3, 96)
    x = torch.randn(shape, device=device)
    kwargs = dict(need_weights=False)
    if causal != "none":
        mask = torch.nn.Transformer.generate_square_subsequent_mask(21, device=device)
        kwargs["attn_mask"] = mask.isneginf() if causal == "mask_bool" else mask
        kwargs["is_causal"] = causal == "is_causal"
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fused path must not fall back
        ya, none = ours(xa, xa, xa, **kwargs)
    yb, _ = theirs(xb, xb, xb, **kwargs)
    assert none is None
    torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-5)
    ya.square().sum().backward()
    yb.square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-5)
    _grads_close(ours, theirs)


def test_multihead_cross_attention_with_kdim(backend, device):
    ours, theirs = _twins(device, embed_dim=64, num_heads=2, kdim=40, vdim=24, batch_first=True)
    q, k, v = (torch.randn(2, 9, 64, device=device), torch.randn(2, 30, 40, device=device),
               torch.randn(2, 30, 24, device=device))
    ya, _ = ours(q, k, v, need_weights=False)
    yb, _ = theirs(q, k, v, need_weights=False)
    torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-5)


def test_multihead_falls_back_with_a_warning(device):
    ours, theirs = _twins(device, embed_dim=64, num_heads=2, batch_first=True)
    x = torch.randn(2, 9, 64, device=device)
    with pytest.warns(UserWarning, match="need_weights=True .* using torch's implementation"):
        ya, wa = ours(x, x, x)
    yb, wb = theirs(x, x, x)
    torch.testing.assert_close(ya, yb)
    torch.testing.assert_close(wa, wb)
    padding = torch.zeros(2, 9, dtype=torch.bool, device=device)
    padding[0, -3:] = True
    with pytest.warns(UserWarning, match="key_padding_mask"):
        ya, _ = ours(x, x, x, key_padding_mask=padding, need_weights=False)
    torch.testing.assert_close(ya, theirs(x, x, x, key_padding_mask=padding, need_weights=False)[0])


# ----------------------------------------------------------------------- Hugging Face

def _tiny_configs():
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
    return {
        "llama": transformers.LlamaConfig(**common),
        "qwen2": transformers.Qwen2Config(**common),
        "mistral": transformers.MistralConfig(**common, sliding_window=8),
        "gpt2": transformers.GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4,
                                        n_positions=64, bos_token_id=0, eos_token_id=0),
    }


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2"])
def test_hugging_face_models_match_eager(backend, device, family, monkeypatch):
    from transformers import AutoModelForCausalLM
    config = _tiny_configs()[family]
    name = hnn.register_hf_attention()
    torch.manual_seed(0)
    # eval(): GPT-2's default config has attention dropout, which the fused path refuses.
    eager = AutoModelForCausalLM.from_config(config, attn_implementation="eager").to(device).eval()
    ours = AutoModelForCausalLM.from_config(config, attn_implementation=name).to(device).eval()
    ours.load_state_dict(eager.state_dict())
    calls = []
    fused = huggingface.ops.attention
    monkeypatch.setattr(huggingface.ops, "attention",
                        lambda *a, **k: calls.append(k) or fused(*a, **k))
    ids = torch.randint(0, 97, (2, 21), device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback to sdpa
        logits = ours(ids).logits
    assert len(calls) == 2, "each layer must run the fused attention"
    expected = eager(ids).logits
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    logits.square().mean().backward()
    expected.square().mean().backward()
    _grads_close(ours, eager, atol=1e-4, rtol=1e-3)


def test_hugging_face_padding_mask_falls_back(device):
    from transformers import AutoModelForCausalLM
    config = _tiny_configs()["llama"]
    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_config(config, attn_implementation="eager").to(device)
    ours = AutoModelForCausalLM.from_config(config, attn_implementation=hnn.register_hf_attention()).to(device)
    ours.load_state_dict(eager.state_dict())
    ids = torch.randint(0, 97, (2, 12), device=device)
    mask = torch.ones(2, 12, dtype=torch.long, device=device)
    mask[1, :4] = 0  # left padding
    huggingface._warned.clear()
    with pytest.warns(UserWarning, match="other than the causal pattern"):
        logits = ours(ids, attention_mask=mask).logits
    expected = eager(ids, attention_mask=mask).logits
    torch.testing.assert_close(logits[mask.bool()], expected[mask.bool()], atol=1e-4, rtol=1e-4)
