"""Mixed precision as Megatron-LM and torchtitan train: bf16 compute, fp32 everything that
accumulates.

The stage's parameters stay float32 — they are the master weights — and each module casts its
own parameters to the compute dtype as its forward begins (the cast is part of the autograd
graph, as in FSDP2's ``MixedPrecisionPolicy``). So:

- matmuls, attention, norms and the activations between them run in bf16;
- each microbatch's bf16 weight gradient flows back through the cast into the float32
  ``param.grad``: gradients accumulate across microbatches in float32;
- the data-parallel buckets, the tensor-parallel sums, the tied-embedding exchange and the
  global norm all see float32 gradients (the reduction in bf16 is
  :class:`~hybridpar_ext.parallel.GradientSync`'s ``reduce_dtype``, on request);
- AdamW (torch's, or ZeroAdamW on its slices) steps the float32 parameters: an update below
  bf16's resolution (``2**-8`` relative) is kept and adds up, where a bf16 parameter would round
  it away every step.

One copy of the truth — no second set of weights to keep in step, checkpoint or reshard — at the
price of one cast per module per forward (a recomputed forward casts again). What passes
between pipeline stages is cast back to the parameters' dtype at the stage's edge, because the
pipeline allocates its receive buffers in that dtype.
"""

import torch

_KEPT = "_mixed_precision_kept"


def apply_mixed_precision(stage: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """Make `stage` (float32 parameters) compute in `compute_dtype`; see the module docstring."""
    if any(p.dtype != torch.float32 for p in stage.parameters()):
        raise ValueError("apply_mixed_precision: the stage's parameters must be float32 (the master weights)")
    for module in stage.modules():
        if next(module.parameters(recurse=False), None) is None:
            continue
        module.register_forward_pre_hook(_cast_own_parameters(compute_dtype))
        module.register_forward_hook(_restore_own_parameters, always_call=True)
    stage.register_forward_pre_hook(_cast_floating(compute_dtype))
    if not getattr(stage, "is_last", True):
        stage.register_forward_hook(lambda module, args, out: _to_floating(out, torch.float32))


def _cast_own_parameters(dtype):
    def hook(module, args):
        kept = {}
        for name, p in module._parameters.items():
            if p is not None and p.is_floating_point() and p.dtype != dtype:
                kept[name] = p
                # A differentiable cast: the gradient reaches the float32 parameter.
                module._parameters[name] = p.to(dtype)
        setattr(module, _KEPT, kept)
    return hook


def _restore_own_parameters(module, args, out):
    for name, p in getattr(module, _KEPT, {}).items():
        module._parameters[name] = p
    setattr(module, _KEPT, {})


def _to_floating(value, dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_to_floating(v, dtype) for v in value)
    return value


def _cast_floating(dtype):
    return lambda module, args: _to_floating(args, dtype)
