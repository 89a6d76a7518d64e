"""Activation recomputation: the memory a stack of transformer layers keeps for backward and the
time of a forward + backward, under none, selective and full (``--recompute``), side by side.

One row per (model shape, mode): the activation bytes per layer that autograd keeps (measured
by :func:`hybridpar_ext.train.recompute.saved_activation_bytes`, any device), on a GPU the peak
memory of a forward + backward, the step time and its ratio to ``none`` (above 1: slower), and
the planner's model of the bytes per layer (:func:`hybridpar_ext.plan.costs.layer_activation_bytes`;
its "selective" is Korthikanti et al.'s, which keeps what our selective recomputes, so it
over-estimates ours: the planner errs on the safe side).
"""

import torch

from hybridpar_ext.models import GPT, GPTConfig
from hybridpar_ext.plan.costs import layer_activation_bytes
from hybridpar_ext.plan.specs import ModelSpec
from hybridpar_ext.train.precision import apply_mixed_precision
from hybridpar_ext.train.recompute import MODES, apply_recompute, saved_activation_bytes

from .runner import device, on_gpu, peak_memory_mb, time_ms


def shapes(quick: bool):
    """(label, GPTConfig kwargs, microbatch, seq)."""
    if on_gpu():
        out = [("1.3B-like layer", dict(hidden=2048, heads=16, kv_heads=16, ffn=8192, mlp="gelu",
                                        norm="layernorm"), 4, 2048),
               ("llama-8B-like layer", dict(hidden=4096, heads=32, kv_heads=8, ffn=14336, mlp="swiglu",
                                            norm="rmsnorm"), 1, 4096)]
    else:
        out = [("small gelu", dict(hidden=256, heads=4, kv_heads=4, ffn=1024, mlp="gelu", norm="layernorm"), 2, 128),
               ("small swiglu gqa", dict(hidden=256, heads=4, kv_heads=2, ffn=688, mlp="swiglu", norm="rmsnorm"),
                2, 128)]
    return out[:1] if quick else out


def _model(kwargs, seq, layers, dtype):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=256, max_seq_len=seq, layers=layers, **kwargs)
    model = GPT(config).to(device())
    if dtype == torch.bfloat16:
        apply_mixed_precision(model, dtype)
    return model, config


def run(quick: bool = False):
    dtype = torch.bfloat16 if on_gpu() else torch.float32
    act_bytes = 2 if dtype == torch.bfloat16 else 4
    layers = 2 if quick else 4
    rows = []
    for label, kwargs, batch, seq in shapes(quick):
        base_ms = None
        for mode in MODES:
            model, config = _model(kwargs, seq, layers, dtype)
            apply_recompute(model, mode)
            stack = torch.nn.Sequential(*[_Layer(layer) for layer in model.layers])
            x = torch.randn(batch, seq, config.hidden, device=device(), dtype=dtype, requires_grad=True)
            saved_activation_bytes(stack, x)                # warm-up (RoPE tables, kernels)
            saved, _ = saved_activation_bytes(stack, x)

            def step():
                out = stack(x)
                out.float().sum().backward()

            ms = time_ms(step)
            base_ms = base_ms or ms
            spec = ModelSpec.from_gpt_config(config, seq=seq)
            rows.append({
                "shape": label, "microbatch": batch, "seq": seq, "recompute": mode, "dtype": str(dtype)[6:],
                "kept_mb_per_layer": saved / layers / 2**20,
                "planner_mb_per_layer": layer_activation_bytes(spec, batch, 1, False, mode, act_bytes) / 2**20,
                "peak_mb_fwd_bwd": peak_memory_mb(step) if on_gpu() else None,
                "step_ms": ms, "time_vs_none": ms / base_ms,
            })
    return rows


class _Layer(torch.nn.Module):
    """A transformer layer as one tensor in, one out (the block's output is mlp_out + residual)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        out, residual = self.layer(x)
        return out + residual
