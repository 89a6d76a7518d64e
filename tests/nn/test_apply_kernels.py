"""nn.apply_kernels: our norms and attention patched into a Hugging Face model instance."""

import copy
import warnings

import pytest
import torch

import hybridpar_ext.nn as hnn
from hybridpar_ext.nn import huggingface

transformers = pytest.importorskip("transformers")


def _tiny_config(family):
    # head_dim 16 (the kernel's smallest), GQA 6:2, an odd vocabulary and FFN width.
    common = dict(vocab_size=97, hidden_size=96, intermediate_size=136, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64)
    return {
        "llama": lambda: transformers.LlamaConfig(**common),
        "qwen2": lambda: transformers.Qwen2Config(**common),  # q/k/v carry biases
        "qwen3": lambda: transformers.Qwen3Config(**common, head_dim=16),  # q/k norms too
        "mistral": lambda: transformers.MistralConfig(**common, sliding_window=7),
        "gpt2": lambda: transformers.GPT2Config(vocab_size=97, n_embd=80, n_layer=2, n_head=5,
                                                n_positions=64, attn_pdrop=0.0, resid_pdrop=0.0,
                                                embd_pdrop=0.0),
    }[family]()


def _twins(family, dtype=torch.float32):
    torch.manual_seed(0)
    theirs = transformers.AutoModelForCausalLM.from_config(_tiny_config(family),
                                                           attn_implementation="eager")
    theirs = theirs.to(dtype)
    # Non-trivial norm weights and biases, so that a swapped norm that dropped them would show.
    with torch.no_grad():
        for module in theirs.modules():
            for p in module.parameters(recurse=False):
                if p.dim() == 1:
                    p.add_(0.1 * torch.randn_like(p))
    return copy.deepcopy(theirs), theirs


# Every family on the reference path; on the Triton kernels (slow in the CPU interpreter) the
# ones that add a kernel case: RMSNorm + GQA (LLaMA), the sliding window (Mistral), LayerNorm (GPT-2).
FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gpt2"]


@pytest.mark.parametrize("backend,family", [("reference", f) for f in FAMILIES]
                         + [("triton", f) for f in ("llama", "mistral", "gpt2")],
                         indirect=["backend"])
def test_apply_kernels_matches_the_unpatched_model(backend, device, family, monkeypatch):
    ours, theirs = _twins(family)
    ours.to(device), theirs.to(device)
    params_before = dict(ours.named_parameters())
    keys_before = list(ours.state_dict())
    others_before = {name: m for name, m in ours.named_modules()
                     if "Norm" not in type(m).__name__}

    assert hnn.apply_kernels(ours) is ours

    # Only norms changed (into ours), holding the very same Parameters; attention is ours.
    norms = [m for m in ours.modules() if "Norm" in type(m).__name__]
    assert norms and all(type(m) in (hnn.RMSNorm, hnn.LayerNorm) for m in norms)
    assert ours.config._attn_implementation == huggingface.NAME
    assert theirs.config._attn_implementation == "eager"
    params_after = dict(ours.named_parameters())
    assert params_after.keys() == params_before.keys()
    assert all(params_after[k] is params_before[k] for k in params_before)
    assert list(ours.state_dict()) == keys_before
    others_after = {name: m for name, m in ours.named_modules()
                    if "Norm" not in type(m).__name__}
    assert others_after.keys() == others_before.keys()
    assert all(others_after[k] is others_before[k] for k in others_before)

    calls = []
    fused = huggingface.ops.attention
    monkeypatch.setattr(huggingface.ops, "attention",
                        lambda *a, **k: calls.append(k) or fused(*a, **k))
    norm_calls = []
    for m in norms:
        m.register_forward_hook(lambda *_: norm_calls.append(1))
    ids = torch.randint(0, 97, (2, 21), device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback to transformers' attention
        logits = ours(ids).logits
    assert len(calls) == 2, "each layer must run the fused attention"
    assert len(norm_calls) == len(norms)
    expected = theirs(ids).logits
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)

    logits.square().mean().backward()
    expected.square().mean().backward()
    theirs_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs_params[name].grad, atol=1e-4, rtol=1e-3, msg=name)


def test_apply_kernels_keeps_mode_eps_and_dtype():
    ours, _ = _twins("llama", torch.float64)
    ours.config.rms_norm_eps = 3e-5
    for m in ours.modules():
        if hasattr(m, "variance_epsilon"):
            m.variance_epsilon = 3e-5
    ours.eval()
    hnn.apply_kernels(ours, attention=False)
    norm = ours.model.layers[1].post_attention_layernorm
    assert isinstance(norm, hnn.RMSNorm) and norm.eps == 3e-5 and not norm.training
    assert norm.weight.dtype == torch.float64
    assert ours.config._attn_implementation == "eager"  # attention=False leaves it alone


def test_apply_kernels_attention_only_leaves_norms():
    ours, _ = _twins("qwen2")
    hnn.apply_kernels(ours, norms=False)
    assert type(ours.model.norm).__name__ == "Qwen2RMSNorm"
    assert ours.config._attn_implementation == huggingface.NAME


def test_apply_kernels_refuses_unknown_architectures():
    # Gemma's RMSNorm scales by (1 + weight): swapping it for ours would change the model.
    config = transformers.GemmaConfig(vocab_size=97, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=1, head_dim=16)
    gemma = transformers.AutoModelForCausalLM.from_config(config)
    before = {name: type(m) for name, m in gemma.named_modules()}
    with pytest.raises(ValueError, match=r"GemmaForCausalLM \(config.model_type 'gemma'\).*llama"):
        hnn.apply_kernels(gemma)
    assert {name: type(m) for name, m in gemma.named_modules()} == before
    with pytest.raises(ValueError, match="no kernel mapping for Linear; supported"):
        hnn.apply_kernels(torch.nn.Linear(3, 3))
