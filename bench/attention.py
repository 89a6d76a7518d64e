"""Attention: ours against F.scaled_dot_product_attention (each backend that runs) and the
plain math, forward, backward and both.

TFLOP/s follow flash-attention's convention: ``4 * b * h * s_q * s_k * d`` for the forward,
halved when causal, and 2.5 times that for the backward. On a GPU the fraction of the
GPU's dense bf16 peak and the peak memory are reported too; on a CPU (where ours is the
reference path) the times and the ratio to SDPA on the CPU.
"""

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from hybridpar_ext import ops
from hybridpar_ext.hardware import gpu_spec
from hybridpar_ext.reference import attention as ref

from .runner import PASSES, device, on_gpu, pass_timer, peak_memory_mb, time_ms

SDPA_BACKENDS = {"sdpa_flash": SDPBackend.FLASH_ATTENTION,
                 "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
                 "sdpa_math": SDPBackend.MATH}


def _sdpa(backend=None):
    """SDPA on our (b, s, h, d) layout; `backend` None lets torch choose."""
    def attend(q, k, v, causal):
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
        ).transpose(1, 2)

    def run(q, k, v, causal):
        if backend is None:
            return attend(q, k, v, causal)
        with sdpa_kernel(backend):
            return attend(q, k, v, causal)
    return run


def _providers():
    providers = {"ours": lambda q, k, v, causal: ops.attention(q, k, v, causal=causal),
                 "plain_math": lambda q, k, v, causal: ref.attention(q, k, v, causal=causal)}
    if on_gpu():
        providers.update({name: _sdpa(backend) for name, backend in SDPA_BACKENDS.items()})
    else:
        providers["sdpa"] = _sdpa()
    return providers


def _flops(b, h, s, d, causal, mode):
    fwd = 4 * b * h * s * s * d / (2 if causal else 1)
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


def _timer(fn, q, k, v, causal, mode):
    return pass_timer(lambda: (fn(q, k, v, causal),), (q, k, v), mode)


def shapes(quick):
    if on_gpu():
        seqlens = [1024, 4096, 16384] if quick else [512, 1024, 2048, 4096, 8192, 16384]
        # About 16k tokens per batch, so each size does the same work per token.
        return [(max(1, 16384 // s), s, 2048 // d, d) for s in seqlens for d in (64, 128)]
    return [(1, 256, 4, 64)] if quick else [(1, 256, 4, 64), (2, 512, 8, 64), (1, 1024, 4, 128)]


def run(quick: bool = False):
    dev = device()
    dtype = torch.bfloat16 if on_gpu() else torch.float32
    spec = gpu_spec(torch.cuda.get_device_name()) if on_gpu() else None
    providers = _providers()
    results = []
    for b, s, h, d in shapes(quick):
        for causal in (False, True):
            torch.manual_seed(0)
            q, k, v = (torch.randn(b, s, h, d, dtype=dtype, device=dev, requires_grad=True)
                       for _ in range(3))
            for mode in PASSES:
                row = {"dtype": str(dtype).replace("torch.", ""), "batch": b, "seqlen": s,
                       "heads": h, "head_dim": d, "causal": causal, "pass": mode}
                for name, fn in providers.items():
                    # The plain math materialises (b, h, s, s) scores: skip it where they are huge.
                    if name in ("plain_math", "sdpa_math") and b * h * s * s > 2**31:
                        continue
                    try:
                        row[f"{name}_ms"] = time_ms(_timer(fn, q, k, v, causal, mode))
                    except RuntimeError as err:  # a backend that does not take this shape
                        row[f"{name}_ms"] = None
                        print(f"  {name} skipped: {str(err).splitlines()[0][:100]}")
                ours = row["ours_ms"]
                for name in providers:
                    if name != "ours" and row.get(f"{name}_ms"):
                        row[f"{name}/ours"] = row[f"{name}_ms"] / ours
                tflops = _flops(b, h, s, d, causal, mode) / ours / 1e9
                row["ours_TFLOP/s"] = tflops
                if spec:
                    row["ours_frac_peak"] = tflops / spec.bf16_tflops
                    row["ours_peak_MB"] = peak_memory_mb(_timer(providers["ours"], q, k, v, causal, mode))
                results.append(row)
                times = ", ".join(f"{k} {v:.3f}" for k, v in results[-1].items()
                                  if k.endswith("_ms") and v is not None)
                print(f"  b{b} s{s} h{h} d{d} causal={causal} {mode}: {times}", flush=True)
    return results
