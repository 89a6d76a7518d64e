"""The Triton kernels compile for real GPUs (sm_80, sm_90) on a machine without one.

The other tests run the kernels in Triton's interpreter, which accepts code the compiler
would reject. Here each kernel is compiled down to a cubin for A100 and H100 targets, with
the specialisations the launchers use, in a fresh process (the test process has
TRITON_INTERPRET=1 set) and a fresh Triton cache (so nothing is taken from earlier runs).
"""

import os
import subprocess
import sys

import pytest

NORM_FLAGS = dict(IS_RMS=False, HAS_W=True, HAS_B=True)


def _signature(kernel, constexprs, pointer_types, float_args=()):
    sig, const = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            const[(i,)] = constexprs[name]
        elif name in pointer_types:
            sig[name] = pointer_types[name]
        else:
            sig[name] = "fp32" if name in float_args else "i32"
    return sig, const


def _compile_all(capability: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from hybridpar_ext.kernels import attention as A
    from hybridpar_ext.kernels import norm as N

    target = GPUTarget("cuda", capability, 32)
    compiled = []

    def build(kernel, constexprs, pointers, floats=(), **options):
        sig, const = _signature(kernel, constexprs, pointers, floats)
        out = triton.compile(ASTSource(kernel, sig, const), target=target, options=options)
        compiled.append((kernel.__name__, constexprs, out.metadata.shared))

    # The norms compute in the dtype of their statistics: fp32, or fp64 for fp64 inputs.
    for dt, acc in (("*bf16", "*fp32"), ("*fp32", "*fp32"), ("*fp64", "*fp64")):
        stats = {p: acc for p in ("W", "B", "MEAN", "RSTD", "DW_PART", "DB_PART")}
        for single, block in ((True, 8192), (False, N.CHUNK)):
            flags = dict(NORM_FLAGS, SINGLE_PASS=single, BLOCK_N=block)
            build(N._norm_fwd_kernel, dict(flags, HAS_RES=True),
                  dict(stats, X=dt, RES=dt, Y=dt, H=dt, eps="fp64"), num_warps=16)
            # WEIGHT_GRADS=False: zero bubble's input-only backward (dW/dB later, at W).
            for weight_grads in (True, False):
                build(N._norm_bwd_kernel, dict(flags, HAS_DH=True, WEIGHT_GRADS=weight_grads),
                      dict(stats, X=dt, W=dt, DY=dt, DH=dt, DX=dt), num_warps=16)

    stats = {"LSE": "*fp32", "DELTA": "*fp32", "DLSE": "*fp32", "CU_Q": "*i32", "CU_K": "*i32"}
    floats = ("qk_scale", "sm_scale")
    # (dtype, varlen, BLOCK_D, forward tile, backward tile): bf16 padded at head_dim 256, the
    # largest (which takes the smaller tiles), bf16 packed at head_dim 128 with the larger
    # forward tile, and fp32 (IEEE dots). Padded at 128 adds nothing these two do not cover
    # (the padded path, the 128x64 tile), so it is not compiled. fp32 takes the smallest
    # backward tile of the launcher's autotuning list: IEEE dots unroll into FMAs, compiling
    # the 64x64 tile took most of this test's time, and any tile exercises that lowering.
    for dt, varlen, block_d, (block_m, block_n), (bwd_m, bwd_n) in (
            ("*bf16", True, 128, (128, 64), (64, 64)),
            ("*bf16", False, 256, (64, 64), (64, 64)),
            ("*fp32", True, 64, (64, 64), (32, 64))):
        tensors = {p: dt for p in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
        const = dict(GQA_GROUP=4, VARLEN=varlen, BLOCK_D=block_d,
                     PRECISION="ieee" if dt == "*fp32" else "tf32")
        build(A._attn_fwd_kernel.fn, dict(const, BLOCK_M=block_m, BLOCK_N=block_n),
              dict(stats, **tensors), floats, num_warps=8, num_stages=2)
        build(A._attn_bwd_dkdv_kernel.fn, dict(const, BLOCK_M=bwd_m, BLOCK_N=bwd_n),
              dict(stats, **tensors), floats, num_warps=4, num_stages=2)
        build(A._attn_bwd_dq_kernel.fn, dict(const, BLOCK_M=bwd_m, BLOCK_N=bwd_n),
              dict(stats, **tensors), floats, num_warps=4, num_stages=2)
        build(A._bwd_preprocess_kernel, dict(HAS_DLSE=True, VARLEN=varlen, BLOCK_M=64, BLOCK_D=block_d),
              dict(stats, O=dt, DO=dt), num_warps=4)
    return compiled


def test_kernels_compile_for_gpu(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # One process per target, side by side: each compile is single-threaded.
    runs = {}
    for capability in (80, 90):
        cache = tmp_path / f"sm_{capability}"
        cache.mkdir()
        runs[capability] = subprocess.Popen(
            [sys.executable, __file__, str(capability)], cwd=cache,
            env=dict(env, TRITON_CACHE_DIR=str(cache / "triton-cache")),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for capability, run in runs.items():
            stdout, stderr = run.communicate(timeout=280)
            assert run.returncode == 0, f"sm_{capability}: " + stderr[-4000:]
            assert "compiled 30 kernels" in stdout, f"sm_{capability}: " + stdout[-2000:]
    finally:
        for run in runs.values():
            run.kill()


if __name__ == "__main__":
    kernels = _compile_all(int(sys.argv[1]))
    print(f"compiled {len(kernels)} kernels")
